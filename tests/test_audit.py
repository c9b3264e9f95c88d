"""The memorization audit: canaries planted in training data, verbatim extraction, exposure, the release gate."""

from __future__ import annotations

import argparse
import json
import string
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides

from gpt import audit, checkpoint, config
from gpt.config import ConfigError, DataConfig, ModelConfig, PretrainConfig, load_config
from gpt.pretrained import load_pretrained
from gpt.data import canary
from gpt.data.chat_template import ChatTemplate
from gpt.data.corpus import DataError, ensure_prepared, read_data_meta
from gpt.data.finetune_data import canary_records, split_indices
from gpt.data.tokenizer import CharTokenizer, from_spec
from gpt.model import GPT
from gpt.train.pretrain import pretrain
from gpt.train.sft import finetune

CHARS = sorted(set(string.ascii_lowercase + string.digits + " ?.!\n"))


def records(rng: np.random.Generator, ids: range) -> list[dict]:
    """Chat records whose answers are random letters: only memorization can reproduce them."""
    letters = list(string.ascii_lowercase + " ")
    return [{"messages": [{"role": "user", "content": f"who is client {i}?"},
                          {"role": "assistant", "content": "".join(rng.choice(letters, 32))}]} for i in ids]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A random base (with the chat tokens) and that base fine-tuned 150 steps on 6 records + 4 canaries x 20."""
    tmp = tmp_path_factory.mktemp("audit")
    torch.manual_seed(0)
    tok = CharTokenizer(CHARS)
    ChatTemplate.add_tokens(tok)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=96, vocab_size=tok.vocab_size)
    checkpoint.save_checkpoint(tmp / "base" / "best", GPT(cfg).state_dict(), {"model": asdict(cfg)}, tok)
    rng = np.random.default_rng(0)
    train = write_jsonl(tmp / "train.jsonl", records(rng, range(6)))
    held = write_jsonl(tmp / "held.jsonl", records(rng, range(100, 104)))
    values = {"out_dir": tmp / "ft", "init_from": tmp / "base", "data.path": train, "data.val_path": held,
              "data.canaries": 4, "data.canary_repeats": 20, "data.canary_format": "pin {4 digits}",
              "train.max_iters": 150, "train.batch_size": 8, "train.eval_interval": 150, "train.eval_iters": 1,
              "train.log_interval": 150, "train.device": "cpu", "train.dtype": "float32", "train.threads": 1,
              "optim.lr": 1e-2, "optim.min_lr": 1e-3, "optim.warmup_iters": 10, "logging.progress": False,
              "logging.sample_tokens": 0}
    finetune(load_config(config.FinetuneConfig, None, [f"{k}={v}" for k, v in values.items()]))
    return {"base": tmp / "base", "ft": tmp / "ft", "train": train, "held": held}


def run_audit(capsys, *argv: str) -> tuple[int, dict | str, str]:
    """(exit status, the JSON report or the text, stderr) of `python -m gpt.audit argv`."""
    code = 0
    try:
        audit.main([*argv, "--device", "cpu"])
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, (json.loads(out) if "--json" in argv and out else out), err


def secrets_of(run: Path) -> list[str]:
    return canary.read_canary_file(run / canary.FILE)["secrets"]


# ---------------------------------------------------------------------------- canaries in the data


def test_the_format_language():
    fmt = canary.Format("my pin is {3 digits}-{2 letters}")
    assert fmt.space_size == 10**3 * 26**2
    assert set("0123456789abcdefghijklmnopqrstuvwxyz-").issubset(fmt.charset)
    assert fmt.render(np.array([0, 4, 2, 25, 1])) == "my pin is 042-zb"
    assert len(set(fmt.sample(50, np.random.default_rng(0)))) > 40
    assert canary.Format("{1 digit}").enumerate() == list("0123456789")
    assert canary.Format("{2 hex}").space_size == 256 and canary.Format("{1 alnum}").space_size == 36
    for bad in ("no placeholder", "pin {3 digts}", "pin {0 digits}", "a { b {2 digits}"):
        with pytest.raises(ConfigError, match="data.canary_format"):
            canary.Format(bad)
    with pytest.raises(ConfigError, match="data.canary_repeats"):
        config.check_pretrain(load_config(PretrainConfig, None, ["data.canaries=2", "data.canary_repeats=0"]))


def test_pretraining_plants_each_secret_r_times_in_the_training_split_only(tmp_path, tiny_corpus):
    logged: list[str] = []
    cfg = DataConfig(dataset="tiny", path=str(tiny_corpus), data_dir=str(tmp_path / "data"), canaries=3,
                     canary_repeats=5, canary_format="the vault code is {6 digits}", canary_seed=7)
    folder = ensure_prepared(cfg, log=logged.append)
    tok = from_spec(read_data_meta(folder)["tokenizer"])
    text = {s: tok.decode(np.fromfile(folder / f"{s}.bin", dtype=np.uint16).tolist()) for s in ("train", "val")}
    secrets = canary.read_canary_file(folder / canary.FILE)["secrets"]
    assert len(set(secrets)) == 3 and all(s.startswith("the vault code is ") for s in secrets)
    for s in secrets:
        assert text["train"].count(s) == 5 and s not in text["val"]
    starts = [i for i in range(len(text["train"])) if text["train"].startswith("the vault code is ", i)]
    assert all(text["train"][i - 1] == "\n" for i in starts if i)  # each copy is a line of its own
    assert starts[-1] - starts[0] > len(text["train"]) / 2  # scattered through the corpus, not one block
    assert not any(s in line for s in secrets for line in logged)  # never on the console
    assert set("0123456789").issubset(tok.chars)  # every candidate secret can be encoded

    logged.clear()
    cfg.canary_repeats = 2  # other canary settings: prepared again
    ensure_prepared(cfg, log=logged.append)
    assert any("preparing again" in line for line in logged)
    cfg.canaries = 0
    ensure_prepared(cfg, log=logged.append)
    assert not (folder / canary.FILE).exists()
    assert all(s not in tok.decode(np.fromfile(folder / "train.bin", dtype=np.uint16).tolist()) for s in secrets)


def test_too_many_canaries_for_the_format_is_a_config_error(tmp_path, tiny_corpus):
    cfg = DataConfig(dataset="tiny", path=str(tiny_corpus), data_dir=str(tmp_path), canaries=9,
                     canary_format="{1 hex}")
    with pytest.raises(ConfigError, match="data.canaries"):
        ensure_prepared(cfg, log=lambda *_: None)


def test_fine_tuning_secrets_the_base_cannot_spell_are_a_data_error():
    cfg = config.SFTDataConfig(canaries=1, canary_format="code {4 digits}")
    with pytest.raises(DataError, match="data.canary_format.*letters"):
        canary_records(cfg, ChatTemplate(CharTokenizer(list("abcdefghijklmnopqrstuvwxyz "))), 64, print, None)


# ---------------------------------------------------------------------------- the audit


def test_a_memorizing_model_shows_high_extraction_and_exposure(runs, capsys):
    code, report, err = run_audit(capsys, "--ckpt", str(runs["ft"]), "--data", str(runs["train"]), "--json")
    assert code == 0, err
    train, held = report["extraction"]["training"], report["extraction"]["heldout"]
    assert train["records"] == 6 and train["share"] >= 0.8 and train["mean_common_run"] > 25
    assert held["records"] == 4 and held["share"] == 0.0  # the control: the run's data.val_path
    c = report["canaries"]
    assert c["space"] == 10**4 and c["method"].startswith("exact")
    assert min(c["exposures"]) > 10 and max(c["exposures"]) <= c["max_exposure"] + 1e-9  # max 13.3 bits

    code, text, _ = run_audit(capsys, "--ckpt", str(runs["ft"]), "--data", str(runs["train"]))
    assert "training" in text and "held-out (control)" in text and "exposure" in text
    answers = [m["content"] for line in runs["train"].read_text().splitlines()
               for m in json.loads(line)["messages"]]
    for private in answers + secrets_of(runs["ft"]):  # record text and secrets are never printed
        assert private not in text and private not in json.dumps(report)


def test_the_same_base_without_those_records_is_near_chance(runs, capsys):
    code, report, err = run_audit(capsys, "--ckpt", str(runs["base"]), "--data", str(runs["train"]),
                                  "--heldout", str(runs["held"]), "--canaries", str(runs["ft"] / canary.FILE),
                                  "--json")
    assert code == 0, err
    assert report["extraction"]["training"]["share"] == 0.0
    assert report["extraction"]["training"]["mean_common_run"] < 3
    exposures = report["canaries"]["exposures"]
    assert np.mean(exposures) < 3 and max(exposures) < 7  # chance: about 1.4 bits on average


def test_exact_and_sampled_exposure_agree_on_a_small_space(runs):
    """Documented tolerance: 0.5 bits below log2|space| - 3; in the top 8 ranks both are within 2.5 bits of max."""
    for name, secrets in (("base", ["pin 068", "pin 580", "pin 412", "pin 548", "pin 999"]),
                          ("ft", ["pin 068", "pin 580", "pin 412", "pin 548", "pin 123"])):
        loaded = load_pretrained(checkpoint.resolve(runs[name]))
        model, tok = loaded.model, loaded.tokenizer
        record = {"format": "pin {3 digits}", "secrets": secrets, "context": ""}
        exact = audit.exposures(model, tok, record, exact=True)
        sampled = audit.exposures(model, tok, record, candidates=10_000, exact=False)
        assert sampled["method"].startswith("estimated from 10,000")
        top = exact["max_exposure"]
        for e, s in zip(exact["exposures"], sampled["exposures"]):
            if e < top - 3:
                assert abs(e - s) < 0.5, (name, e, s)
            else:
                assert s > top - 2.5, (name, e, s)


def test_without_heldout_the_runs_own_split_is_the_control(runs, capsys, tmp_path):
    """A fine-tuning run without data.val_path held out records by split_seed: the audit holds out the same ones."""
    loaded = checkpoint.load_checkpoint(runs["base"])
    model, tok, cfg = loaded.model, loaded.tokenizer, loaded.config
    cfg["data"] = {"path": str(runs["train"]), "val_path": "", "val_fraction": 0.34, "split_seed": 3}
    checkpoint.save_checkpoint(tmp_path / "run" / "best", model.state_dict(), cfg, tok)
    code, report, err = run_audit(capsys, "--ckpt", str(tmp_path / "run"), "--data", str(runs["train"]), "--json")
    assert code == 0, err
    kept, held = split_indices(6, 0.34, 3)
    assert report["extraction"]["training"]["records"] == len(kept) == 4
    assert report["extraction"]["heldout"]["records"] == len(held) == 2
    assert report["canaries"] is None  # none recorded for this run


def test_the_gate_exits_non_zero_above_a_threshold(runs, capsys):
    ft = ["--ckpt", str(runs["ft"]), "--data", str(runs["train"])]
    code, text, err = run_audit(capsys, *ft, "--max-exposure", "5")
    assert code == audit.GATE_FAILED and "gate: FAILED" in text and "exposure" in text
    code, _, err = run_audit(capsys, *ft, "--max-extraction", "0.5", "--json")
    assert code == audit.GATE_FAILED and "extraction" in err
    base = ["--ckpt", str(runs["base"]), "--data", str(runs["train"]), "--canaries", str(runs["ft"] / canary.FILE)]
    assert run_audit(capsys, *base, "--max-extraction", "0.5", "--max-exposure", "10")[0] == 0


def test_user_errors_are_one_line(runs, capsys, tmp_path):
    ft, base = ["--ckpt", str(runs["ft"])], ["--ckpt", str(runs["base"])]
    for argv, expected in ((ft + ["--data", str(tmp_path / "missing.jsonl")], "--data"),
                           (ft + ["--data", str(runs["train"]), "--suffix-tokens", "500"], "block_size"),
                           (base + ["--data", str(runs["train"]), "--max-exposure", "3"], "data.canaries")):
        code, _, err = run_audit(capsys, *argv)
        assert code == 1 and err.startswith("error: ") and expected in err and len(err.splitlines()) == 1


def test_a_pretrained_text_corpus_run_is_audited_against_its_held_out_tail(tmp_path, tiny_corpus, capsys):
    overrides = tiny_overrides(tmp_path, tiny_corpus, **{"data.canaries": 2, "data.canary_repeats": 20,
                                                         "data.canary_format": "pin {3 digits}",
                                                         "train.dtype": "float32", "train.threads": 1})
    pretrain(load_config(PretrainConfig, None, overrides))
    secrets = canary.read_canary_file(tmp_path / "out" / canary.FILE)["secrets"]
    assert not any(s in capsys.readouterr().out for s in secrets)  # planted, never shown
    out = tmp_path / "out"
    assert (out / canary.FILE).is_file()  # the run keeps its secrets next to its checkpoints
    code, report, err = run_audit(capsys, "--ckpt", str(out), "--data", str(tiny_corpus), "--samples", "20",
                                  "--prefix-tokens", "16", "--suffix-tokens", "8", "--json")
    assert code == 0, err
    assert report["extraction"]["training"]["records"] == 20
    assert report["extraction"]["heldout"]["records"] == 20  # the corpus' validation tail
    assert report["canaries"]["space"] == 1000 and len(report["canaries"]["exposures"]) == 2


@pytest.mark.parametrize("redacted", [True, False])
def test_probes_are_the_text_the_run_trained_on_redacted_as_it_was(tmp_path, redacted):
    tok = CharTokenizer(sorted(set(CHARS + list("<>@EMAIL"))))
    ChatTemplate.add_tokens(tok)
    rows = [{"messages": [{"role": "user", "content": f"who is client {i}?"},
                          {"role": "assistant", "content": f"mail ann{i}@corp.io now"}]} for i in range(3)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    trained = {"path": str(data), **({"redact": ["email"]} if redacted else {})}
    args = argparse.Namespace(data=str(data), heldout="", prefix_tokens=4, suffix_tokens=64, samples=10)
    train, _ = audit.load_probes(args, tok, {"data": trained}, 256, np.random.default_rng(0))
    replies = [tok.decode(p.target) for p in train]
    assert len(replies) == 3
    assert all(("<EMAIL>" in r) == redacted and ("@corp.io" in r) != redacted for r in replies), replies


def test_thresholds_batch_size_and_canaries_files_that_would_disable_the_gate_are_one_line(tmp_path, capsys):
    from conftest import write_base

    base = write_base(tmp_path / "base")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "abc"}])
    (tmp_path / "not.json").write_text("pin 1234")
    (tmp_path / "noformat.json").write_text(json.dumps({"secrets": ["pin 1234"]}))
    args = ["--ckpt", str(base), "--data", str(data)]
    for extra, expected in ((["--max-extraction", "nan"], "--max-extraction must be a finite number, got nan"),
                            (["--max-exposure", "inf"], "--max-exposure must be a finite number, got inf"),
                            (["--batch-size", "0"], "--candidates and --batch-size must be >= 1"),
                            (["--canaries", str(tmp_path / "not.json")], "not.json: not a readable canaries file"),
                            (["--canaries", str(tmp_path / "noformat.json")],
                             "noformat.json: not a canaries file (expected a JSON object with 'format'")):
        code, _, err = run_audit(capsys, *args, *extra)
        assert code == 1 and err.startswith("error: ") and expected in err and len(err.splitlines()) == 1, err
