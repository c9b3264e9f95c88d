"""Hostile inputs: every bad input a user can give an entry point ends in exit code 1 and exactly one
line on stderr that names the cause (no traceback); a failed save leaves the previous checkpoint
byte-identical.

Each row of CASES is one hostile input to one entry point. A new entry point (or a new way to get an
input wrong) adds its rows here; `World` holds the shared material (a corpus, a trained run, records).
The entry scripts run in-process through runpy, exactly as `python train.py ...` runs them, so a row
costs milliseconds unless it trains; tests/test_errors_one_line.py checks the same in real processes.
"""

from __future__ import annotations

import errno
import fractions
import json
import os
import shutil
import subprocess
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import run_in_process, tiny_overrides

from gpt import checkpoint
from gpt.config import PretrainConfig, load_config
from gpt.train.pretrain import pretrain

WORDS = "to be or not to be that is the question whether tis nobler in the mind to suffer\n"


@dataclass
class World:
    """Material the rows share (built once per module): a corpus, a trained run, its overrides."""

    root: Path
    corpus: Path
    run: Path  # out_dir of a finished 4-step run: best/ and latest/

    def train_args(self, tmp: Path, **extra) -> list[str]:
        return tiny_overrides(tmp, self.corpus, **{"train.max_iters": 4, "train.eval_interval": 2,
                                                    "train.eval_iters": 1, **extra})

    def finetune_args(self, tmp: Path, records: list[dict], **extra) -> list[str]:
        data = tmp / "qa.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        values = {"init_from": self.run, "data.path": data, "out_dir": tmp / "sft", "train.max_iters": 2,
                  "train.device": "cpu", "train.dtype": "float32", "logging.progress": "false",
                  "logging.sample_tokens": 0, **extra}
        return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("world")
    corpus = root / "corpus.txt"
    corpus.write_text(WORDS * 200, encoding="utf-8")
    w = World(root, corpus, root / "out")
    pretrain(load_config(PretrainConfig, None, w.train_args(root)))
    return w


@dataclass
class Case:
    name: str
    entry: str  # train.py, finetune.py, sample.py, serve.py or gpt.convert
    args: Callable[[World, Path], list[str]]  # (world, this row's tmp_path) -> command-line arguments
    cause: str  # the one stderr line must contain this
    lines: int = 1  # stderr lines; only the records summary lists its records one per line
    setup: Callable[[pytest.MonkeyPatch, Path], None] | None = None  # e.g. cut the network


def qa(content_roles: list[tuple[str, str]]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in content_roles]}


GOOD = qa([("user", "to be"), ("assistant", "or not to be")])


def written(tmp: Path, name: str, data: bytes) -> Path:
    (tmp / name).write_bytes(data)
    return tmp / name


def edited_ckpt(w: World, tmp: Path, name: str, edit: Callable[[bytes], bytes]) -> Path:
    """A copy of the world's best checkpoint with one file's bytes changed by `edit`."""
    ckpt = shutil.copytree(w.run / "best", tmp / "best")
    (ckpt / name).write_bytes(edit((ckpt / name).read_bytes()))
    return ckpt


def flip_a_weight(data: bytes) -> bytes:
    """One bit of the last tensor: the file still parses, the model changes."""
    return data[:-7] + bytes([data[-7] ^ 0x40]) + data[-6:]


def pickled_hf_dir(tmp: Path) -> Path:
    """A Hugging Face-style folder whose pytorch_model.bin holds an object the safe loader refuses."""
    folder = tmp / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 1,
                                                    "vocab_size": 16, "n_positions": 8}))
    torch.save({"wte.weight": torch.zeros(16, 8), "note": fractions.Fraction(1, 3)}, folder / "pytorch_model.bin")
    return folder


def truncated_hf_dir(tmp: Path) -> Path:
    folder = pickled_hf_dir(tmp)
    (folder / "pytorch_model.bin").unlink()
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    return folder


def stale_temp_ckpt(w: World, tmp: Path) -> Path:
    return shutil.copytree(w.run / "best", tmp / ".best.tmp-999999")


def offline_without_cache(monkeypatch, tmp: Path) -> None:
    """tiktoken with an empty cache and no network (whatever this machine has)."""
    import tiktoken.load
    import tiktoken.registry

    def no_network(url: str) -> bytes:
        raise ConnectionError(f"cannot reach {url}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp / "empty-cache"))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)


def disk_full_outside_checkpoints(monkeypatch, tmp: Path) -> None:
    """Any other write that hits a full disk (here out_dir/config.yaml) is one line too."""
    import gpt.train.loop

    def full(data, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(gpt.train.loop, "save_yaml", full)


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

CASES = [
    # ---- train.py: config values and files
    Case("nan min_lr", "train.py", lambda w, t: w.train_args(t, **{"optim.min_lr": "nan"}),
         "key 'optim.min_lr' must be >= 0, got nan"),
    Case("nan grad_clip", "train.py", lambda w, t: w.train_args(t, **{"optim.grad_clip": "nan"}),
         "key 'optim.grad_clip' must be >= 0, got nan"),
    Case("negative warmup", "train.py", lambda w, t: w.train_args(t, **{"optim.warmup_iters": -10}),
         "key 'optim.warmup_iters' must be >= 0, got -10"),
    Case("threads -1", "train.py", lambda w, t: w.train_args(t, **{"train.threads": -1}),
         "key 'train.threads' must be >= 0, got -1"),
    pytest.param(Case("cuda without a GPU", "train.py", lambda w, t: w.train_args(t, **{"train.device": "cuda"}),
                      "device 'cuda' requested but this machine has no usable CUDA GPU"), marks=NO_CUDA),
    Case("impossible out_dir", "train.py", lambda w, t: w.train_args(t, out_dir="/dev/null/x"),
         "out_dir /dev/null/x: cannot write there (Not a directory)"),
    Case("disk full writing out_dir/config.yaml", "train.py", lambda w, t: w.train_args(t),
         "error: No space left on device: ", setup=disk_full_outside_checkpoints),
    Case("non-UTF-8 config file", "train.py",
         lambda w, t: [str(written(t, "latin1.yaml", "train:\n  seed: 1  # r\xe9sum\xe9\n".encode("latin-1")))],
         "latin1.yaml: not UTF-8 text"),
    Case("tiktoken encoding not cached, offline", "train.py",
         lambda w, t: w.train_args(t, **{"data.tokenizer": "r50k_base"}),
         "could not load the tiktoken encoding 'r50k_base': it is not in", setup=offline_without_cache),
    Case("unsafe pickle as init_from", "train.py", lambda w, t: w.train_args(t, init_from=pickled_hf_dir(t)),
         "pytorch_model.bin: contains Python objects that the safe loader refuses; this project never loads"),
    # ---- finetune.py: records
    Case("conversation ends on a user turn", "finetune.py",
         lambda w, t: w.finetune_args(t, [GOOD, qa([("user", "to be"), ("assistant", "or not"), ("user", "to be")]),
                                          GOOD]),
         "qa.jsonl:2: message 3: the conversation ends on a user turn", lines=2),
    Case("assistant turns only", "finetune.py",
         lambda w, t: w.finetune_args(t, [GOOD, GOOD, qa([("assistant", "to be")])]),
         "qa.jsonl:3: assistant messages only", lines=2),
    Case("finetune into an impossible out_dir", "finetune.py",
         lambda w, t: w.finetune_args(t, [GOOD, GOOD], out_dir="/dev/null/x"), "out_dir /dev/null/x: cannot write"),
    # ---- sample.py: flags and checkpoints
    Case("nan temperature", "sample.py", lambda w, t: ["--ckpt", str(w.run), "--temperature", "nan"],
         "--temperature must be >= 0, got nan"),
    Case("nan frequency penalty", "sample.py", lambda w, t: ["--ckpt", str(w.run), "--frequency-penalty", "nan"],
         "--frequency-penalty must be a finite number, got nan"),
    Case("top-p above 1", "sample.py", lambda w, t: ["--ckpt", str(w.run), "--top-p", "1.5"],
         "--top-p must be > 0 and <= 1, got 1.5"),
    pytest.param(Case("--device cuda without a GPU", "sample.py",
                      lambda w, t: ["--ckpt", str(w.run), "--device", "cuda"], "no usable CUDA GPU"), marks=NO_CUDA),
    Case("character outside the vocabulary", "sample.py", lambda w, t: ["--ckpt", str(w.run), "--prompt", "Zebra"],
         "character 'Z' is not in this model's character vocabulary"),
    Case("unknown --dtype", "sample.py", lambda w, t: ["--ckpt", str(w.run), "--dtype", "float8"],
         "dtype must be auto, float32, bfloat16 or float16, got 'float8'"),
    Case("non-UTF-8 --prompt-file", "sample.py",
         lambda w, t: ["--ckpt", str(w.run), "--prompt-file", str(written(t, "prompt.txt", b"to be \xe9"))],
         "prompt.txt: not UTF-8 text (byte 6)"),
    Case("out-of-range key in a checkpoint's config.yaml", "sample.py",
         lambda w, t: ["--ckpt", str(edited_ckpt(w, t, "config.yaml", lambda b: b.replace(b"n_layer: 2",
                                                                                            b"n_layer: -2")))],
         "best/config.yaml: key 'model.n_layer' must be >= 1"),
    Case("non-UTF-8 config.yaml in a checkpoint", "sample.py",
         lambda w, t: ["--ckpt", str(edited_ckpt(w, t, "config.yaml", lambda b: b"model:\n  n_layer: \xff\n"))],
         "best/config.yaml: not UTF-8 text"),
    Case("weights changed on disk", "sample.py",
         lambda w, t: ["--ckpt", str(edited_ckpt(w, t, checkpoint.MODEL_FILE, flip_a_weight))],
         "model.safetensors: its SHA-256 differs from the one recorded"),
    Case("a temp folder of an interrupted save", "sample.py", lambda w, t: ["--ckpt", str(stale_temp_ckpt(w, t))],
         ".best.tmp-999999: an unfinished checkpoint"),
    # ---- serve.py
    Case("serve.py: weights changed on disk", "serve.py",
         lambda w, t: ["--ckpt", str(edited_ckpt(w, t, checkpoint.MODEL_FILE, flip_a_weight))],
         "model.safetensors: its SHA-256 differs from the one recorded"),
    Case("serve.py: --max-batch 0", "serve.py", lambda w, t: ["--ckpt", str(w.run), "--max-batch", "0"],
         "--max-batch must be >= 1, got 0"),
    Case("serve.py: --shutdown-timeout -1", "serve.py",
         lambda w, t: ["--ckpt", str(w.run), "--shutdown-timeout", "-1"], "--shutdown-timeout must be >= 0"),
    Case("serve.py: no such checkpoint", "serve.py", lambda w, t: ["--ckpt", str(t / "none")], "no such checkpoint"),
    # ---- python -m gpt.convert
    Case("unsafe pickle in from-hf", "gpt.convert", lambda w, t: ["from-hf", str(pickled_hf_dir(t)), str(t / "o")],
         "pytorch_model.bin: contains Python objects that the safe loader refuses"),
    Case("damaged model.safetensors in from-hf", "gpt.convert",
         lambda w, t: ["from-hf", str(truncated_hf_dir(t)), str(t / "o")], "hf/model.safetensors: unreadable weights"),
    Case("to-hf into an impossible folder", "gpt.convert", lambda w, t: ["to-hf", str(w.run), "/dev/null/hf"],
         "out_dir /dev/null/hf: cannot write there"),
]


# ---- data integrity and redaction (issue 27): rows of their own, appended to CASES


def swap_two_characters(data: bytes) -> bytes:
    """A character tokenizer.json with 'a' and 'b' swapped: still valid, every id of them changed."""
    return data.replace(b'"a"', b'"\0"').replace(b'"b"', b'"a"').replace(b'"\0"', b'"b"')


def deep_jsonl(tmp: Path) -> Path:
    return written(tmp, "deep.jsonl", b'{"text": ' + b"[" * 3000 + b"]" * 3000 + b"}\n")


def unfinished_redaction(tmp: Path) -> Path:
    """A folder gpt.redact was writing when it was killed: its marker still says unfinished."""
    folder = tmp / "redacted"
    folder.mkdir()
    (folder / "a.txt").write_text(WORDS * 20)
    (folder / ".redaction.json").write_text(json.dumps({"complete": False, "kinds": ["email"], "files": {}}))
    return folder


def audit_args(w: World, *extra: str) -> list[str]:
    return ["--ckpt", str(w.run), "--data", str(w.corpus), "--device", "cpu", *extra]


CASES += [
    Case("data.bpe_vocab_size 1e9", "train.py",
         lambda w, t: w.train_args(t, **{"data.tokenizer": "bpe", "data.bpe_vocab_size": 1_000_000_000}),
         "key 'data.bpe_vocab_size' must be <= 1,048,576, got 1000000000"),
    Case("a JSONL record nested 3,000 deep", "train.py", lambda w, t: w.train_args(t, **{"data.path": deep_jsonl(t)}),
         "deep.jsonl:1: JSON nested too deeply to read"),
    Case("a redacted folder left unfinished", "train.py",
         lambda w, t: w.train_args(t, **{"data.path": unfinished_redaction(t)}), "an unfinished redaction"),
    Case("an empty --salt-file", "gpt.redact",
         lambda w, t: [w.corpus, t / "out.txt", "--mode", "pseudonym", "--salt-file", written(t, "salt", b"")],
         "the pseudonym secret is 0 bytes, fewer than the 16 it needs"),
    Case("a character tokenizer.json changed on disk", "sample.py",
         lambda w, t: ["--ckpt", str(edited_ckpt(w, t, "tokenizer.json", swap_two_characters))],
         "tokenizer.json: its SHA-256 differs from the one recorded"),
    Case("gpt.audit --max-extraction nan", "gpt.audit", lambda w, t: audit_args(w, "--max-extraction", "nan"),
         "--max-extraction must be a finite number, got nan"),
    Case("gpt.audit --batch-size 0", "gpt.audit", lambda w, t: audit_args(w, "--batch-size", "0"),
         "--batch-size must be >= 1"),
    Case("gpt.audit canaries file that is not JSON", "gpt.audit",
         lambda w, t: audit_args(w, "--canaries", str(written(t, "c.json", b"pin 1234"))),
         "c.json: not a readable canaries file"),
]


def run_entry(entry: str, args: list[str], monkeypatch, capsys) -> tuple[int, list[str]]:
    """Run an entry point as `python ENTRY ARGS` would, in this process: (exit code, stderr lines)."""
    proc = run_in_process(capsys, entry, *args)
    return proc.returncode, proc.stderr.strip().splitlines()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hostile_input_is_one_line(case: Case, world, tmp_path, monkeypatch, capsys):
    if case.setup is not None:
        case.setup(monkeypatch, tmp_path)
    code, lines = run_entry(case.entry, case.args(world, tmp_path), monkeypatch, capsys)
    assert code == 1, lines
    assert len(lines) == case.lines and lines[0].startswith("error: "), lines
    assert case.cause in "\n".join(lines)
    assert "weights_only" not in "\n".join(lines)  # never point at the unsafe loader


def test_no_verify_loads_changed_weights(world, tmp_path, monkeypatch, capsys):
    ckpt = edited_ckpt(world, tmp_path, checkpoint.MODEL_FILE, flip_a_weight)
    args = ["--ckpt", str(ckpt), "--max-new-tokens", "3", "--no-verify"]
    code, lines = run_entry("sample.py", args, monkeypatch, capsys)
    assert code == 0, lines


# ---------------------------------------------------------------------------- failed saves


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def resume_args(world: World, out: Path) -> list[str]:
    """Go on with the world's run (a copy in `out`), from the world's prepared data."""
    return world.train_args(out.parent, out_dir=out, **{"train.max_iters": 6, "train.resume": "true",
                                                         "data.data_dir": world.root / "data"})


def check_failed_save(world: World, out: Path, monkeypatch, capsys) -> None:
    before = {kind: snapshot(out / kind) for kind in ("latest", "best")}
    code, lines = run_entry("train.py", resume_args(world, out), monkeypatch, capsys)
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: disk full: saving {out / 'latest'} needs about "), lines
    assert f"the previous {out / 'latest'} is intact" in lines[0]
    assert {kind: snapshot(out / kind) for kind in ("latest", "best")} == before
    assert not list(out.glob(".*.tmp-*"))
    assert checkpoint.load_train_state(out / "latest")["iter"] == 4  # the world's run, not the resumed one


@pytest.mark.parametrize("failure", ["ENOSPC", "hidden errno"])
def test_disk_full_during_save_keeps_the_previous_checkpoint(failure, world, tmp_path, monkeypatch, capsys):
    """A resumed run whose checkpoint save fails: one line, and latest/ and best/ stay byte-identical."""
    out = shutil.copytree(world.run, tmp_path / "out")
    if failure == "ENOSPC":  # safetensors and plain writes report the errno
        def broken(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(checkpoint, "save_file", broken)
    else:  # torch.save reports "unexpected pos ..." and no errno: the free space tells
        def broken(*args, **kwargs):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4416 vs 4304")
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(checkpoint.torch, "save", broken)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 20, 1 << 20, 0))
    check_failed_save(world, out, monkeypatch, capsys)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(options) -> a fresh tmpfs folder (root on Linux only; skipped elsewhere: the patched tests
    above cover the same code)."""
    mounted = []

    def mount(options: str) -> Path:
        if os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("mounting a tmpfs needs root")
        target = tmp_path / f"disk{len(mounted)}"
        target.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                          capture_output=True).returncode:
            pytest.skip("this platform does not allow mounting a tmpfs")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", str(target)], capture_output=True)


def test_really_full_disk_keeps_the_previous_checkpoint(world, tmpfs, monkeypatch, capsys):
    disk = tmpfs("size=1m")
    out = shutil.copytree(world.run, disk / "out")
    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(b"\0" * max(0, free - 16384))  # 16 KiB left: less than one checkpoint
    check_failed_save(world, out, monkeypatch, capsys)


def test_read_only_out_dir_is_one_line(world, tmpfs, monkeypatch, capsys):
    out = tmpfs("ro,size=1m") / "out"
    code, lines = run_entry("train.py", world.train_args(out.parent, out_dir=out), monkeypatch, capsys)
    assert code == 1 and lines == [f"error: out_dir {out}: cannot write there (Read-only file system); "
                                   "choose a writable out_dir"]


def test_stale_temp_folders_of_dead_processes_are_removed(world, tmp_path):
    out = shutil.copytree(world.run, tmp_path / "out")
    dead = shutil.copytree(out / "latest", out / ".latest.tmp-999999")
    alive = shutil.copytree(out / "latest", out / f".latest.tmp-{os.getppid()}")  # a save still in progress
    assert checkpoint.resolve(out, prefer="latest") == out / "latest"  # loading never picks a temp folder
    pretrain(load_config(PretrainConfig, None, resume_args(world, out)))
    assert not dead.exists() and alive.exists()


def test_no_verify_loads_a_changed_tokenizer(world, tmp_path, monkeypatch, capsys):
    ckpt = edited_ckpt(world, tmp_path, "tokenizer.json", swap_two_characters)
    code, lines = run_entry("sample.py", ["--ckpt", str(ckpt), "--max-new-tokens", "3", "--no-verify"], monkeypatch,
                            capsys)
    assert code == 0, lines
