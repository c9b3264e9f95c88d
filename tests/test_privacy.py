"""Private data stays private: no network, no copies outside the run's folders, no record text in
logs, and PII redaction (quality on a labelled synthetic set, pseudonyms, the report, the prep step)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import chat_template, qa, run_in_process, run_scripts, write_base, write_jsonl
from pii_synth import make_set, score

from gpt.config import ConfigError, DataConfig, SFTDataConfig
from gpt.data import pii
from gpt.data.corpus import DataError, ensure_prepared, read_data_meta
from gpt.data.pii import Redactor, iban_ok, luhn_ok
from gpt.data.tokenizer import from_spec

MARKER = "Quokkabell"  # record text that must never leave the run's folders
STRUCTURED = ("email", "phone", "card", "iban", "ipv4", "ipv6", "ssn", "url_credentials", "secret")


def unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


UNSHARE = unshare_works()


# ---------------------------------------------------------------------------- offline


def test_guard_fails_any_connection_off_this_machine(network_guard):
    with pytest.raises(RuntimeError, match="network guard"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)
    with pytest.raises(RuntimeError, match="network guard"):
        socket.getaddrinfo("huggingface.co", 443)
    assert len(network_guard) == 2
    network_guard.clear()  # recorded: the fixture would fail this test otherwise
    server = socket.create_server(("127.0.0.1", 0))  # loopback stays open (servers, gloo)
    socket.create_connection(server.getsockname(), timeout=1).close()
    server.close()
    child = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('192.0.2.1', 80), 1)"],
                           capture_output=True, text=True)
    assert child.returncode != 0 and "network guard" in child.stderr  # processes the tests start, too


@pytest.mark.parametrize("name", ["acme/claims", "mydata"])
def test_a_path_that_does_not_exist_is_no_such_file_never_a_hub_lookup(tmp_path, name):
    from gpt.data.finetune_data import load_file

    cfg = DataConfig(dataset="x", path=name, data_dir=str(tmp_path))
    with pytest.raises(DataError, match=f"^{name}: no such file or directory") as err:
        ensure_prepared(cfg, log=lambda *_: None)
    assert "\n" not in str(err.value)
    assert ("hf://acme/claims" in str(err.value)) == (name == "acme/claims")  # says how to ask for the hub
    with pytest.raises(DataError, match=f"^{name}: no such file or directory"):
        load_file(name, "auto", None, 16, False)


def hub_offline(monkeypatch) -> None:
    """Offline mode for `datasets` and `huggingface_hub`, whether or not this process imported them before:
    both read HF_HUB_OFFLINE once, at import, so a user's shell without it would otherwise reach the network."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setattr(datasets.config, name, True)


def test_hf_names_are_the_only_hub_access_and_fail_in_one_line_offline(tmp_path, monkeypatch):
    from gpt import convert
    from gpt.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="gpt2: no such folder; for a Hugging Face hub model write hf://gpt2"):
        convert.from_hf("gpt2", tmp_path / "o")
    hub_offline(monkeypatch)
    cfg = DataConfig(dataset="x", path="hf://acme/claims", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="hf://acme/claims: could not read it from the Hugging Face hub"):
        ensure_prepared(cfg, log=lambda *_: None)


def test_editing_any_file_of_a_folder_prepares_again(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    for i in range(3):
        (d / f"{i}.txt").write_text(f"document {i} " * 20)
    cfg = DataConfig(dataset="f", path=str(d), data_dir=str(tmp_path / "prep"))
    logs: list[str] = []
    ensure_prepared(cfg, log=logs.append)
    ensure_prepared(cfg, log=logs.append)
    assert not any("preparing again" in line for line in logs)
    (d / "1.txt").write_text("document one, edited " * 20)
    ensure_prepared(cfg, log=logs.append)
    assert sum("preparing again" in line for line in logs) == 1
    (d / "sub").mkdir()
    (d / "sub" / "new.txt").write_text("a new document " * 20)
    ensure_prepared(cfg, log=logs.append)
    assert sum("preparing again" in line for line in logs) == 2


# ---------------------------------------------------------------------------- entry points


def write_run_inputs(tmp: Path) -> dict[str, Path]:
    corpus = tmp / "corpus.txt"
    corpus.write_text((f"the {MARKER} of the harbour sails at noon.\nwho sails? the {MARKER} sails.\n") * 400)
    records = tmp / "records.csv"  # CSV: the format that used to leave Arrow copies in ~/.cache
    records.write_text("prompt,response\n" + "".join(f"who sails {w}?,the {MARKER} sails\n"
                                                           for w in "at of the who noon sails harbour the".split()))
    return {"corpus": corpus, "records": records}


@pytest.fixture(scope="module")
def entry_runs(tmp_path_factory):
    """train, finetune, sample, convert and redact run with HOME and TMPDIR pointing at empty folders
    (and under `unshare -n`, with no network at all, where the platform allows it)."""
    tmp = tmp_path_factory.mktemp("private")
    home, tmpdir, run = tmp / "home", tmp / "tmpdir", tmp / "run"
    for d in (home, tmpdir, run):
        d.mkdir()
    inputs = write_run_inputs(run)
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmpdir), "XDG_CACHE_HOME": str(home / ".cache")}
    for key in ("HF_HOME", "HF_DATASETS_CACHE", "TORCHINDUCTOR_CACHE_DIR", "MPLCONFIGDIR"):
        env.pop(key, None)
    prefix = ["unshare", "-n"] if UNSHARE else []
    tiny = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=32", "train.batch_size=4",
            "train.eval_interval=5", "train.eval_iters=1", "train.log_interval=5", "train.device=cpu",
            "logging.progress=false", "optim.warmup_iters=1"]
    commands = {
        "train": ["train.py", f"data.path={inputs['corpus']}", f"data.data_dir={run / 'data'}", "data.dataset=p",
                  f"out_dir={run / 'base'}", "train.max_iters=5", "logging.sample_tokens=0", "data.redact=all", *tiny],
        "finetune": ["finetune.py", f"init_from={run / 'base'}", f"data.path={inputs['records']}",
                     f"out_dir={run / 'sft'}", "train.max_iters=5", "data.val_fraction=0.25", "sft.block_size=32",
                     *[t for t in tiny if not t.startswith("model.")]],
        "sample": ["sample.py", "--ckpt", str(run / "sft"), "--prompt", "who", "--max-new-tokens", "8", "--seed", "1",
                   "--device", "cpu"],
        "convert": ["gpt.convert", "to-hf", str(run / "base"), str(run / "hf")],
        "convert from-hf": ["gpt.convert", "from-hf", str(run / "hf"), str(run / "back")],
        "redact": ["gpt.redact", str(inputs["records"]), str(run / "redacted.csv"), "--report",
                   str(run / "report.json")],
    }
    # each its own process, in this order (finetune starts from train's run); their output is kept in run/
    procs = run_scripts([(args[0], args[1:]) for args in commands.values()], run / "std", env=env, prefix=prefix)
    results = dict(zip(commands, procs))
    return {"results": results, "home": home, "tmpdir": tmpdir, "run": run}


def files_with(folder: Path, needle: bytes) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.mark.parametrize("entry", ["train", "finetune", "sample", "convert", "convert from-hf", "redact"])
def test_entry_point_runs_offline_and_leaves_no_record_text_outside_its_folders(entry_runs, entry):
    proc = entry_runs["results"][entry]
    assert proc.returncode == 0, proc.stderr[-2000:]
    for folder in (entry_runs["home"], entry_runs["tmpdir"]):
        assert not files_with(folder, MARKER.encode()), f"record text copied under {folder}"
        # nothing else either: not even matplotlib's font cache (gpt.plot keeps it in the run's folder)
        left = [p for p in folder.rglob("*") if p.is_file()]
        assert not left, f"files left under {folder}: {left}"
    if entry != "sample":  # sample prints what the model writes: that is its job
        assert MARKER not in proc.stdout + proc.stderr, "record text on the console"
    if entry in ("train", "finetune"):
        out = entry_runs["run"] / ("base" if entry == "train" else "sft")
        assert MARKER not in (out / "metrics.jsonl").read_text()
    if entry == "train":  # the checkpoint records that its data was redacted, and how
        assert "redact:\n  - all\n" in (entry_runs["run"] / "base" / "best" / "config.yaml").read_text()
    if not UNSHARE:
        pytest.skip("ran with the network available: `unshare -n` does not work here")


def test_finetune_prints_example_replies_only_when_asked(tmp_path, capsys):
    from gpt.config import FinetuneConfig, load_config
    from gpt.train.sft import finetune

    base = write_base(tmp_path / "base")
    data = write_jsonl(tmp_path / "d.jsonl", [qa("cat", "dog"), qa("sun", "moon"), qa("red", "blue")])
    common = {"out_dir": tmp_path / "out", "init_from": base, "data.path": data, "train.max_iters": 2,
              "train.eval_interval": 2, "train.eval_iters": 1, "train.batch_size": 2, "train.device": "cpu",
              "logging.progress": False, "logging.sample_tokens": 5}
    finetune(load_config(FinetuneConfig, None, [f"{k}={v}" for k, v in common.items()]))
    assert "expected:" not in capsys.readouterr().out
    finetune(load_config(FinetuneConfig, None, [f"{k}={v}" for k, v in common.items()]
                         + ["logging.show_examples=true", f"out_dir={tmp_path / 'out2'}"]))
    assert "expected:" in capsys.readouterr().out


# ---------------------------------------------------------------------------- redaction quality


@pytest.mark.parametrize("seed", [0, 1])
def test_structured_kinds_meet_the_quality_bar_on_a_labelled_synthetic_set(seed):
    text, labels = make_set(1500, seed)
    scores = score(Redactor(), text, labels)
    for kind in STRUCTURED:
        assert scores[kind]["labelled"] >= 20, kind
        assert scores[kind]["recall"] >= 0.99, (kind, scores[kind])
        assert scores[kind]["precision"] >= 0.95, (kind, scores[kind])


NEAR_MISSES = [
    "4111 1111 1111 1112", "DE89 3704 0044 0532 0130 01", "version 1.2.3.4", "v2.0.1.3", "1.3.6.1.4.1.311",
    "256.1.1.1", "2024-01-15", "15.01.2024", "12:30:45", "00:1a:2b:3c:4d:5e", "000-12-3456", "666-12-3456",
    "912-34-5678", "user@localhost", "std::vector<int>", "order #12345678", "$1,234,567.89", "room 1234",
    "ISBN 978-3-16-148410-0", "we must talk in secret: --nurse", "ssh://git@github.com/org/repo",
]


@pytest.mark.parametrize("text", NEAR_MISSES)
def test_near_misses_stay(text):
    assert Redactor().redact(f"see {text} here") == f"see {text} here"


def test_each_kind_and_its_placeholder():
    r = Redactor()
    cases = {
        "mail jane.doe@example.com now": "mail <EMAIL> now",
        "call +44 20 7946 0958 or (555) 123-4567": "call <PHONE> or <PHONE>",
        "card 4111-1111-1111-1111.": "card <CARD>.",
        "iban GB82 WEST 1234 5698 7654 32": "iban <IBAN>",
        "from 192.168.1.20:8080 and 2001:db8::8a2e:370:7334": "from <IP>:8080 and <IP>",
        "mapped ::ffff:192.0.2.128. link fe80::1%eth0": "mapped <IP>. link <IP>%eth0",
        "Jo.Ng+news@mail.eu.example.co.uk; +49 (0)30 1234567": "<EMAIL>; <PHONE>",
        "ssn 123-45-6789": "ssn <SSN>",
        "db postgres://admin:hunter2@db.internal/app": "db postgres://<CREDENTIALS>@db.internal/app",
        "key AKIAIOSFODNN7EXAMPLE and password=s3cr3tpass": "key <SECRET> and password=<SECRET>",
    }
    for text, expected in cases.items():
        assert r.redact(text) == expected
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB83WEST12345698765432")


def test_pseudonyms_are_consistent_under_a_salt_and_keep_the_shape(tmp_path):
    import re

    salt_file = tmp_path / "salt"
    a = Redactor(mode="pseudonym", salt=pii.read_salt(str(salt_file)))
    b = Redactor(mode="pseudonym", salt=pii.read_salt(str(salt_file)))
    assert oct(salt_file.stat().st_mode & 0o777) == "0o600"
    text = "Mail Jane@Example.com, then jane@example.com or bob@example.org"
    out = a.redact(text)
    assert out == b.redact(text)  # the same salt: the same pseudonyms
    assert out != Redactor(mode="pseudonym").redact(text)  # another salt: others
    emails = re.findall(r"\S+@example\.com", out)
    assert len(emails) == 3 and emails[0] == emails[1] != emails[2]  # one person, one pseudonym
    assert "jane" not in out.lower() and "bob" not in out
    card = a.redact("4111 1111 1111 1111")
    assert card != "4111 1111 1111 1111" and re.fullmatch(r"4\d{3}( \d{4}){3}", card)
    assert luhn_ok(card.replace(" ", ""))
    assert re.fullmatch(r"9\d\d-\d\d-\d{4}", a.redact("123-45-6789"))  # area 9xx is never issued
    iban = a.redact("GB82WEST12345698765432")
    assert iban != "GB82WEST12345698765432" and iban.startswith("GB") and iban_ok(iban)
    assert re.fullmatch(r"10\.\d+\.\d+\.\d+", a.redact("192.168.1.20"))


def test_terms_are_whole_words_in_any_case_and_patterns_are_checked(tmp_path):
    terms = tmp_path / "names.txt"
    terms.write_text("Acme\nJohn Smith\n")
    r = Redactor([], terms=pii.read_terms(str(terms)), patterns=[r"CUST-\d{6}"])
    assert r.redact("ACME and john  smith; Acmeville; CUST-123456") == "<TERM> and <TERM>; Acmeville; <CUSTOM>"
    with pytest.raises(ConfigError, match=r"data.redact_patterns\[0\]: not a valid regular expression"):
        Redactor([], patterns=["(unclosed"])
    with pytest.raises(ConfigError, match="unknown kind 'emails'"):
        Redactor(["emails"])
    assert "unavailable" in pii.ner_status() or "available" in pii.ner_status()


# ---------------------------------------------------------------------------- the CLI and the prep step


def pii_lines() -> list[str]:
    return ["write to jane.doe@example.com", "card 4111 1111 1111 1111", "call +44 20 7946 0958"]


ORIGINALS = ["jane.doe@example.com", "4111 1111 1111 1111", "+44 20 7946 0958"]


def test_redact_cli_on_a_folder_of_every_format_reports_counts_never_values(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "notes.txt").write_text("\n".join(pii_lines()) + "\n")
    (src / "chat.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": t},
                                                                     {"role": "assistant", "content": "ok"}]}) + "\n"
                                            for t in pii_lines()))
    (src / "sub" / "t.csv").write_text("prompt,response\n" + "".join(f'"{t}",fine\n' for t in pii_lines()))
    pq.write_table(pa.table({"text": pii_lines(), "n": [1, 2, 3]}), src / "sub" / "t.parquet")
    (src / "image.png").write_bytes(b"\x89PNG")
    report = tmp_path / "report.json"
    proc = run_in_process(capsys, "gpt.redact", src, tmp_path / "out", "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert "12 email" not in proc.stdout and "4 email" in proc.stdout and "names in free text:" in proc.stdout
    out = tmp_path / "out"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        ".gpt-output", ".redaction.json", "chat.jsonl", "notes.txt", "sub/t.csv", "sub/t.parquet"]  # the markers: gpt/outputs.py, and the redaction's, written last
    written = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file()) + report.read_bytes()
    for value in ORIGINALS:
        assert value.encode() not in written and value not in proc.stdout
    assert pq.read_table(out / "sub" / "t.parquet").column("n").to_pylist() == [1, 2, 3]
    assert json.loads((out / "chat.jsonl").read_text().splitlines()[0])["messages"][0]["content"] == "write to <EMAIL>"
    rep = json.loads(report.read_text())
    assert rep["counts"] == {"card": 4, "email": 4, "phone": 4}
    assert rep["files"][str(src / "sub" / "t.csv")] == {"email": 1, "card": 1, "phone": 1}
    assert rep["examples"]["email"] == ["j***@e***.com"] and rep["skipped_files"] == ["image.png"]


def test_prepared_corpus_is_redacted_before_tokenization_and_says_so(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(pii_lines() * 30) + "\n")
    cfg = DataConfig(dataset="r", path=str(corpus), data_dir=str(tmp_path / "prep"), redact=["all"])
    logs: list[str] = []
    folder = ensure_prepared(cfg, log=logs.append)
    meta = read_data_meta(folder)
    tok = from_spec(meta["tokenizer"])
    import numpy as np

    text = "".join(tok.decode(np.fromfile(folder / f"{s}.bin", dtype=meta["dtype"]).tolist()) for s in ("train", "val"))
    assert all(v not in text for v in ORIGINALS) and text.count("<EMAIL>") == 30
    assert meta["redaction"]["counts"] == {"card": 30, "email": 30, "phone": 30}
    assert any("redacted (placeholder) 30 card, 30 email, 30 phone" in line for line in logs)
    assert not any(v in line for line in logs for v in ORIGINALS)
    cfg.redact = ["email"]
    ensure_prepared(cfg, log=logs.append)  # other redaction settings: prepared again
    assert read_data_meta(folder)["redaction"]["counts"] == {"email": 30}
    cfg.redact_mode = "pseudonym"  # the character vocabulary sees the same pseudonyms as the tokens
    meta = read_data_meta(ensure_prepared(cfg, log=logs.append))
    assert meta["redaction"]["mode"] == "pseudonym" and meta["redaction"]["counts"] == {"email": 30}


def test_finetuning_records_are_redacted_and_the_report_is_written(tmp_path):
    from gpt.data.finetune_data import load_sft_data

    tpl = chat_template(sorted(set("abcdefghijklmnopqrstuvwxyz ?.!\n<>@ACDEILMNOPRT0123456789+_-")))
    rows = [qa("mail me at jane@example.com", "ok"), qa("a", "my card 4111111111111111"), qa("b", "c")]
    data_path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = SFTDataConfig(path=str(data_path), val_path=str(data_path), redact=["email", "card"])
    data = load_sft_data(cfg, tpl, 64, False, log=lambda *_: None, report_dir=tmp_path / "out")
    decoded = [tpl.tok.decode(e.ids.tolist()) for e in data.train]
    assert "mail me at <EMAIL>" in decoded[0] and "my card <CARD>" in decoded[1]
    assert data.redaction["counts"] == {"card": 2, "email": 2}  # train and val both read the file
    report = (tmp_path / "out" / "redaction_report.json").read_text()
    assert "jane@example.com" not in report and "4111111111111111" not in report


def test_custom_bpe_is_trained_on_redacted_text(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(pii_lines() * 40) + "\n" + "plain words for the merges to learn\n" * 40)
    cfg = DataConfig(dataset="b", path=str(corpus), data_dir=str(tmp_path / "prep"), tokenizer="bpe",
                     bpe_vocab_size=300, redact=["email"])
    folder = ensure_prepared(cfg, log=lambda *_: None)
    meta = read_data_meta(folder)
    tok = from_spec(meta["tokenizer"])
    # the merges were learned from "<EMAIL>", not from the address (unredacted: 8 tokens and 7)
    assert len(tok.encode("jane.doe@example.com")) >= 16 and len(tok.encode("<EMAIL>")) <= 4
    assert meta["redaction"]["counts"] == {"email": 40}


def test_preference_pairs_are_redacted_on_every_side():
    from gpt.data.finetune_data import redact_content
    from gpt.data.record_formats import Preference

    pair = Preference([{"role": "user", "content": "mail jane@example.com?"}],
                      [{"role": "assistant", "content": "sure, jane@example.com"}],
                      [{"role": "assistant", "content": "call +44 20 7946 0958"}])
    out = redact_content(pair, Redactor(), "p.jsonl")
    assert (out.prompt[0]["content"], out.chosen[0]["content"], out.rejected[0]["content"]) == (
        "mail <EMAIL>?", "sure, <EMAIL>", "call <PHONE>")


# ---------------------------------------------------------------------------- redaction that must not miss


LONG_LINE = " ".join(f"w{i} jane.doe@example.com 4111 1111 1111 1111 or +44 20 7946 0958 x" for i in range(60))


@pytest.mark.parametrize("context", [64, pii.CONTEXT])
def test_values_straddling_a_piece_end_of_a_long_line_are_redacted_whole(tmp_path, monkeypatch, capsys, context):
    from gpt.data import corpus, files

    for module in (files, corpus):  # a line is cut into 64-byte pieces: values straddle them
        monkeypatch.setattr(module, "PIECE_BYTES", 16)
    monkeypatch.setattr(pii, "CONTEXT", context)  # 64: the stream gives text out many times
    (tmp_path / "long.txt").write_text(LONG_LINE)
    proc = run_in_process(capsys, "gpt.redact", tmp_path / "long.txt", tmp_path / "out.txt")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.txt").read_text() == Redactor().redact(LONG_LINE)  # as if read in one piece
    assert "60 card, 60 email, 60 phone" in proc.stdout
    cfg = DataConfig(dataset="long", path=str(tmp_path / "long.txt"), data_dir=str(tmp_path / "prep"), redact=["all"])
    folder = ensure_prepared(cfg, log=lambda *_: None)  # the corpus too, with the val cut inside the line
    meta = read_data_meta(folder)
    import numpy as np

    tok = from_spec(meta["tokenizer"])
    text = "".join(tok.decode(np.fromfile(folder / f"{s}.bin", dtype=meta["dtype"]).tolist()) for s in ("train", "val"))
    assert text == Redactor().redact(LONG_LINE) and meta["redaction"]["counts"]["card"] == 60


def test_a_long_jsonl_record_is_redacted_whole(tmp_path, monkeypatch, capsys):
    from gpt.data import files

    monkeypatch.setattr(files, "PIECE_BYTES", 16)
    write_jsonl(tmp_path / "r.jsonl", [{"text": LONG_LINE}, {"text": "short jane@example.com"}])
    proc = run_in_process(capsys, "gpt.redact", tmp_path / "r.jsonl", tmp_path / "o.jsonl")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert rows == [{"text": Redactor().redact(LONG_LINE)}, {"text": "short <EMAIL>"}]


def test_numbers_keys_and_the_first_csv_row_are_scanned(tmp_path, capsys):
    record = {"card": 4111111111111111, "phone": 4155550123, "tel_no": 442079460958, "count": 4155550123,
              "jane@example.com": "x", "john@example.com": 2, "n": 42, "ok": True, "price": 1.5}
    write_jsonl(tmp_path / "r.jsonl", [record])
    (tmp_path / "r.csv").write_text("jane@example.com,4111 1111 1111 1111\nplain,words\n")
    for name in ("r.jsonl", "r.csv"):
        proc = run_in_process(capsys, "gpt.redact", tmp_path / name, tmp_path / f"o-{name}")
        assert proc.returncode == 0, proc.stderr
    out = json.loads((tmp_path / "o-r.jsonl").read_text())
    assert out == {"card": "<CARD>", "phone": "<PHONE>", "tel_no": "<PHONE>", "count": 4155550123,
                   "<EMAIL>": "x", "<EMAIL>'": 2, "n": 42, "ok": True, "price": 1.5}
    assert (tmp_path / "o-r.csv").read_text().splitlines() == ["<EMAIL>,<CARD>", "plain,words"]
    salt = tmp_path / "salt"
    proc = run_in_process(capsys, "gpt.redact", tmp_path / "r.jsonl", tmp_path / "p.jsonl", "--mode", "pseudonym",
                          "--salt-file", salt)
    out = json.loads((tmp_path / "p.jsonl").read_text())
    assert isinstance(out["card"], int) and out["card"] != record["card"] and luhn_ok(str(out["card"]))
    assert str(record["card"]) not in (tmp_path / "p.jsonl").read_text()


@pytest.mark.parametrize("content", [b"", b"short\n"])
def test_a_short_salt_file_is_refused(tmp_path, capsys, content):
    salt = tmp_path / "salt"
    salt.write_bytes(content)
    (tmp_path / "t.txt").write_text("jane@example.com\n")
    proc = run_in_process(capsys, "gpt.redact", tmp_path / "t.txt", tmp_path / "o.txt", "--mode", "pseudonym",
                          "--salt-file", salt)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1
    assert f"--salt-file {salt}: the pseudonym secret is {len(content.strip())} bytes, fewer than the 16" in proc.stderr
    with pytest.raises(ConfigError, match="data.redact_salt_file .* fewer than the 16"):
        pii.from_config(DataConfig(redact=["email"], redact_mode="pseudonym", redact_salt_file=str(salt)))


def test_a_redacted_folder_is_written_whole_and_read_only_while_whole(tmp_path, monkeypatch, capsys):
    import gpt.redact

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name in ("a.txt", "b.txt"):
        (src / name).write_text("mail jane@example.com or call +44 20 7946 0958\n" * 30)
    real = gpt.redact.redact_file

    def killed_after_one(f, dst, *args):  # the run is stopped after its first file
        real(f, dst, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(gpt.redact, "redact_file", killed_after_one)
    with pytest.raises(SystemExit) as stopped:
        gpt.redact.main([str(src), str(out)])
    assert stopped.value.code == 130
    assert not out.exists() and not list(tmp_path.glob(".out.*"))  # nothing half-written is left
    monkeypatch.setattr(gpt.redact, "redact_file", real)
    assert run_in_process(capsys, "gpt.redact", src, out, "--kinds", "email").returncode == 0
    marker = json.loads((out / ".redaction.json").read_text())
    assert marker["complete"] and marker["kinds"] == ["email"] and sorted(marker["files"]) == ["a.txt", "b.txt"]
    cfg = DataConfig(dataset="r", path=str(out), data_dir=str(tmp_path / "prep"))
    assert ensure_prepared(cfg, log=lambda *_: None)  # a whole redacted folder is read
    assert run_in_process(capsys, "gpt.redact", src, out, "--kinds", "phone").returncode == 0  # replaced whole
    assert "jane@example.com" in (out / "a.txt").read_text() and "<PHONE>" in (out / "b.txt").read_text()
    (out / "c.txt").write_text("a file from elsewhere\n")  # a mixed folder
    with pytest.raises(DataError, match=r"not the folder gpt.redact wrote \(1 data file\(s\) missing, added or "
                                        r"changed since, the first: c.txt\)"):
        ensure_prepared(cfg, log=lambda *_: None)
    (out / "c.txt").unlink()
    marker = json.loads((out / ".redaction.json").read_text())
    (out / ".redaction.json").write_text(json.dumps({**marker, "complete": False}))  # a run killed outright
    with pytest.raises(DataError, match="an unfinished redaction"):
        ensure_prepared(cfg, log=lambda *_: None)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("not ours to replace")
    proc = run_in_process(capsys, "gpt.redact", src, tmp_path / "mine")
    assert proc.returncode == 1 and "not written by gpt.redact" in proc.stderr
    assert (tmp_path / "mine" / "keep.txt").is_file()
