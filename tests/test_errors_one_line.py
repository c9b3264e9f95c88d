"""Every entry point, run as a real process, turns a user's mistake into exit code 1 and one line on
stderr that starts with `error:` and names the cause: no traceback.

Each row of CASES is one mistake given to one entry point (a script at the repo root or a `python -m`
tool). A new entry point adds its rows here. The rows run as real processes through conftest's
`run_scripts`: each its own process running its real entry point as __main__ and exiting through the
interpreter, for one interpreter start-up in all. `Files` is the material the rows share (a corpus,
checkpoints, records), built once. tests/test_hostile.py holds the larger table of hostile inputs,
run in-process.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import pytest
from conftest import qa, run_scripts, tiny_overrides, write_base, write_jsonl


@dataclass
class Files:
    """What the rows share, built once in `root`."""

    root: Path
    corpus: Path  # 100k characters of Tiny Shakespeare
    base: Path  # a random char-model checkpoint folder (out_dir with best/)
    bpe_ckpt: Path  # a checkpoint whose tokenizer.json was edited after saving
    bpe_tokenizer: Path  # that tokenizer.json
    records: Path  # two SFT records, the second with an empty response


@dataclass
class Case:
    name: str
    entry: str  # train.py, finetune.py, sample.py, serve.py, or a module for `python -m`
    args: Callable[[Files, Path], list]  # (files, this row's own folder) -> command-line arguments
    cause: Callable[[Files, Path], str] | str  # the stderr line(s) must contain this
    whole: bool = False  # the cause is the whole of stderr (one line), not a part of it
    lines: int = 1  # stderr lines; only the records summary lists its records one per line


def train_args(f: Files, t: Path, *args: str) -> list[str]:
    """train.py on the tiny corpus with `args` in place of the tiny overrides for the same keys."""
    base = [a for a in tiny_overrides(t, f.corpus) if not a.startswith(tuple(x.split("=")[0] for x in args))]
    return ["configs/shakespeare.yaml", *base, *args]


def phi_dir(t: Path) -> Path:
    (t / "bad").mkdir()
    (t / "bad" / "config.json").write_text(json.dumps({"model_type": "phi", "architectures": ["PhiForCausalLM"]}))
    return t / "bad"


def broken_ckpt(t: Path) -> Path:
    broken = t / "broken" / "best"
    broken.mkdir(parents=True)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    (broken / "config.yaml").write_text("model: {n_layer: 1, n_head: 1, n_embd: 8, block_size: 8, vocab_size: 8}\n")
    return t / "broken"


def empty_file(t: Path) -> Path:
    (t / "empty.txt").write_text("", encoding="utf-8")
    return t / "empty.txt"


CASES = [
    # ---- train.py
    Case("train.py: unknown key", "train.py", lambda f, t: train_args(f, t, "train.max_iter=5"),
         "unknown key 'train.max_iter'"),
    Case("train.py: no such corpus", "train.py", lambda f, t: train_args(f, t, "data.path=/no/such/corpus.txt"),
         "no such file or directory"),
    Case("train.py: n_embd not divisible by n_head", "train.py", lambda f, t: train_args(f, t, "model.n_head=3"),
         "divisible"),
    # ---- finetune.py
    Case("finetune.py: an invalid record", "finetune.py",
         lambda f, t: [f"init_from={f.base}", f"data.path={f.records}", f"out_dir={t / 'out'}", "train.device=cpu"],
         lambda f, t: f"error: 1 of 2 records are invalid; fix them or set data.skip_invalid=true to skip them:\n"
                      f"  {f.records}:2: empty response", lines=2),
    # ---- sample.py
    Case("sample.py: top-p nan", "sample.py", lambda f, t: ["--ckpt", f.base, "--top-p", "nan"],
         "error: sampling: --top-p must be > 0 and <= 1, got nan", whole=True),
    Case("sample.py: no such checkpoint", "sample.py", lambda f, t: ["--ckpt", t / "nothing", "--prompt", "a"],
         "no such checkpoint"),
    Case("sample.py: unreadable weights", "sample.py", lambda f, t: ["--ckpt", broken_ckpt(t), "--prompt", "a"],
         "model.safetensors: unreadable weights"),
    Case("sample.py: tampered tokenizer file", "sample.py", lambda f, t: ["--ckpt", f.bpe_ckpt, "--max-new-tokens", 2],
         lambda f, t: f"error: {f.bpe_tokenizer}: BPE tokenizer checksum mismatch: the file was edited or damaged; "
                      "restore it from the run that trained it", whole=True),
    # ---- serve.py
    Case("serve.py: no such checkpoint", "serve.py", lambda f, t: ["--ckpt", t / "none"], "no such checkpoint"),
    # ---- python -m gpt.convert, gpt.eval, gpt.redact
    Case("gpt.convert: an unsupported architecture", "gpt.convert", lambda f, t: ["from-hf", phi_dir(t), t / "o"],
         lambda f, t: f"error: {t / 'bad'}: architecture 'PhiForCausalLM' is not supported; supported: GPT2LMHeadModel, "
                      "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM, Gemma3ForCausalLM",
         whole=True),
    Case("gpt.eval: empty data", "gpt.eval", lambda f, t: ["--ckpt", t / "nope", "--data", empty_file(t)],
         "empty.txt is empty"),
    Case("gpt.redact: no such input", "gpt.redact", lambda f, t: ["nope.txt", "o"], "nope.txt: no such file"),
    Case("gpt.redact: unknown kind", "gpt.redact", lambda f, t: [Path("README.md").resolve(), t / "o", "--kinds",
                                                                 "emails"], "unknown kind 'emails'"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory, shakespeare_text) -> Files:
    from gpt import checkpoint
    from gpt.config import ModelConfig
    from gpt.data.bpe import train_bpe
    from gpt.model import GPT

    root = tmp_path_factory.mktemp("errors")
    corpus = root / "corpus.txt"
    corpus.write_text(shakespeare_text[:100_000], encoding="utf-8")
    bpe = train_bpe([shakespeare_text[:20_000]], 320, log=lambda line: None)
    cfg = ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=bpe.vocab_size)
    checkpoint.save_checkpoint(root / "bpe", GPT(cfg).state_dict(), {"model": asdict(cfg)}, bpe)
    tokenizer = root / "bpe" / "tokenizer.json"
    spec = json.loads(tokenizer.read_text())
    spec["tokens"][300], spec["tokens"][301] = spec["tokens"][301], spec["tokens"][300]
    tokenizer.write_text(json.dumps(spec))
    records = write_jsonl(root / "d.jsonl", [qa("cat", "dog"), {"prompt": "cat", "response": ""}])
    return Files(root, corpus, write_base(root / "base"), root / "bpe", tokenizer, records)


@pytest.fixture(scope="module")
def results(files) -> dict[str, tuple[object, str]]:
    """Every row run as its own process, two at a time (the rows share only what they read): name -> (the
    finished process, the cause it must show)."""
    folders = [files.root / f"case{i}" for i in range(len(CASES))]
    for folder in folders:
        folder.mkdir()
    procs = run_scripts([(c.entry, c.args(files, t)) for c, t in zip(CASES, folders)], files.root / "std", parallel=2)
    return {c.name: (p, c.cause(files, t) if callable(c.cause) else c.cause) for c, t, p in zip(CASES, folders, procs)}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_user_error_is_one_line(case: Case, results):
    proc, cause = results[case.name]
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == case.lines and proc.stderr.startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert (proc.stderr.strip() == cause) if case.whole else (cause in proc.stderr), (cause, proc.stderr)
