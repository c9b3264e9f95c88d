"""Data preparation: every source round-trips to the same token files; bad corpora get clear errors."""

import json

import numpy as np
import pytest
import torch

from gpt.config import DataConfig
from gpt.data import corpus as gdata
from gpt.data.corpus import (
    DataError,
    TokenBatches,
    ensure_prepared,
    read_data_meta,
)
from gpt.data.token_files import token_dtype
from gpt.data.tokenizer import from_spec


def prepared_text(folder) -> tuple[str, str]:
    meta = read_data_meta(folder)
    tok = from_spec(meta["tokenizer"])
    dtype = np.dtype(meta["dtype"])
    out = []
    for split in ("train", "val"):
        ids = np.fromfile(folder / f"{split}.bin", dtype=dtype).tolist()
        out.append(tok.decode([i for i in ids if i != tok.eot_id]))
    return out[0], out[1]


def cfg_for(tmp_path, path, **kw) -> DataConfig:
    return DataConfig(dataset="t", path=str(path), data_dir=str(tmp_path / "prepared"), **kw)


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_text_file_round_trips_with_tail_as_validation(tmp_path, tiny_corpus, tokenizer):
    folder = ensure_prepared(cfg_for(tmp_path, tiny_corpus, tokenizer=tokenizer, val_fraction=0.1), log=lambda *_: None)
    train, val = prepared_text(folder)
    text = tiny_corpus.read_text()
    assert train + val == text
    assert len(val) == pytest.approx(0.1 * len(text), rel=0.02)
    meta = read_data_meta(folder)
    assert meta["dtype"] == "uint16" and meta["train_tokens"] + meta["val_tokens"] > 0


def test_big_file_streams_in_pieces(tmp_path, tiny_corpus, monkeypatch):
    monkeypatch.setattr(gdata, "PIECE_BYTES", 1000)  # many pieces: the split point lands inside one
    folder = ensure_prepared(cfg_for(tmp_path, tiny_corpus), log=lambda *_: None)
    train, val = prepared_text(folder)
    assert train + val == tiny_corpus.read_text()


def write_docs(tmp_path, n=30):
    return [f"document {i}: " + "To be, or not to be. " * (i % 5 + 1) for i in range(n)]


def test_directory_jsonl_parquet_csv_mixed_folder_and_datasets_folder_agree(tmp_path):
    import datasets

    docs = write_docs(tmp_path)
    d = tmp_path / "txt"
    d.mkdir()
    for i, doc in enumerate(docs):
        (d / f"{i:03d}.txt").write_text(doc)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(docs)))
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "c.parquet"))
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "c.csv").write_text("id,text\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(docs)))
    mixed = tmp_path / "mixed"  # a folder of several formats
    (mixed / "b").mkdir(parents=True)
    (mixed / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in docs[:10]))
    (mixed / "b" / "c.txt").write_text(docs[10])
    (mixed / "b" / "d.csv").write_text("text\n" + "".join(f'"{t}"\n' for t in docs[11:]))
    (mixed / ".hidden.txt").write_text("never read")
    results = []
    for i, src in enumerate([d, tmp_path / "c.jsonl", tmp_path / "c.parquet", tmp_path / "saved",
                             tmp_path / "c.csv", mixed]):
        cfg = DataConfig(dataset=f"s{i}", path=str(src), data_dir=str(tmp_path / "prep"), tokenizer="gpt2",
                         val_fraction=0.2)
        train, val = prepared_text(ensure_prepared(cfg, log=lambda *_: None))
        assert train and val
        results.append(sorted(train.split("document ") + val.split("document ")))
    assert all(r == results[0] for r in results)
    assert len(results[0]) == len(docs) + 2  # every document once (plus the two empty heads)


def test_missing_text_field_names_it(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"body": "hello"}\n{"body": "world"}\n')
    with pytest.raises(DataError, match="no 'text' field.*body.*data.text_field"):
        ensure_prepared(cfg_for(tmp_path, tmp_path / "c.jsonl"), log=lambda *_: None)


def test_empty_missing_and_too_short_corpora(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        ensure_prepared(cfg_for(tmp_path, empty), log=lambda *_: None)
    with pytest.raises(DataError, match="no such file"):
        ensure_prepared(cfg_for(tmp_path, tmp_path / "nope.txt"), log=lambda *_: None)
    short = tmp_path / "short.txt"
    short.write_text("hello world, " * 10)
    folder = ensure_prepared(cfg_for(tmp_path, short), log=lambda *_: None)
    with pytest.raises(DataError, match="fewer than block_size"):
        TokenBatches(folder, block_size=64, batch_size=2, device=torch.device("cpu"))


def test_offline_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(gdata.urllib.request, "urlopen", offline)
    cfg = DataConfig(dataset="shakespeare", data_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"input.txt is missing: put Tiny Shakespeare there, or set "
                                        r"data.allow_download=true"):
        ensure_prepared(cfg, log=lambda *_: None)  # no network unless asked
    cfg.allow_download = True
    with pytest.raises(DataError, match=r"could not download.*copy the file to .*shakespeare/input.txt"):
        ensure_prepared(cfg, log=lambda *_: None)


def test_token_dtype_and_uint32_files(tmp_path):
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(100277) == np.uint32
    folder = tmp_path / "p"
    folder.mkdir()
    ids = np.arange(70000, 70000 + 500, dtype=np.uint32)
    ids.tofile(folder / "train.bin")
    ids.tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps({"dtype": "uint32"}))
    b = TokenBatches(folder, block_size=8, batch_size=2, device=torch.device("cpu")).train_batch(0, 0)
    assert b.x.min() >= 70000 and torch.equal(b.y[:, :-1], b.x[:, 1:])


def test_batches_are_a_function_of_step_and_split_across_ranks(tmp_path, tiny_corpus):
    folder = ensure_prepared(cfg_for(tmp_path, tiny_corpus), log=lambda *_: None)
    cpu = torch.device("cpu")
    one = TokenBatches(folder, block_size=16, batch_size=4, device=cpu, seed=1)
    acc = [TokenBatches(folder, block_size=16, batch_size=2, device=cpu, seed=1, grad_accum=2).train_batch(5, m).x for m in (0, 1)]
    assert torch.equal(torch.cat(acc), one.train_batch(5, 0).x)
    assert torch.equal(one.train_batch(5, 0).x, TokenBatches(folder, block_size=16, batch_size=4, device=cpu, seed=1).train_batch(5, 0).x)
    assert not torch.equal(one.train_batch(5, 0).x, one.train_batch(6, 0).x)
    r0 = TokenBatches(folder, block_size=16, batch_size=2, device=cpu, seed=1, rank=0, world_size=2).train_batch(5, 0).x
    r1 = TokenBatches(folder, block_size=16, batch_size=2, device=cpu, seed=1, rank=1, world_size=2).train_batch(5, 0).x
    assert torch.equal(torch.cat([r0, r1]), one.train_batch(5, 0).x)
    v1 = [b.x for b in one.val_batches()]
    v2 = [b.x for b in one.val_batches()]
    assert all(torch.equal(a, b) for a, b in zip(v1, v2))


def test_preparation_is_reused_and_redone_when_settings_change(tmp_path, tiny_corpus):
    logs = []
    cfg = cfg_for(tmp_path, tiny_corpus)
    ensure_prepared(cfg, log=logs.append)
    n = len(logs)
    ensure_prepared(cfg, log=logs.append)
    assert len(logs) == n  # nothing redone
    cfg.val_fraction = 0.2
    ensure_prepared(cfg, log=logs.append)
    assert any("preparing again" in line for line in logs[n:])


# ---------------------------------------------------------------------------- text encodings (issue 16.1)


def test_text_that_is_not_utf8_is_refused_naming_file_offset_line_and_count(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"abc\n" * 10 + "caf\u00e9 cr\u00e8me\n".encode("latin-1") + b"more text\n" * 50)
    with pytest.raises(DataError) as err:
        ensure_prepared(cfg_for(tmp_path, bad), log=lambda *_: None)
    msg = str(err.value)
    assert msg.startswith(f"{bad}: not valid utf-8: 2 invalid byte sequence(s), the first at byte 43 (line 11)")
    assert "data.encoding (e.g. latin-1) or data.encoding_errors=replace" in msg and "\n" not in msg
    assert not list((tmp_path / "prepared").rglob("*.bin*"))  # nothing half-written stays behind

    binary = tmp_path / "random.bin"
    binary.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match=r"random.bin: not valid utf-8: \d+ invalid byte sequence\(s\), the first at"):
        ensure_prepared(cfg_for(tmp_path, binary), log=lambda *_: None)


def test_encoding_and_counted_replacement_are_opt_in(tmp_path):
    bad = tmp_path / "latin1.txt"
    text = "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n" * 200
    bad.write_bytes(text.encode("latin-1"))
    folder = ensure_prepared(cfg_for(tmp_path, bad, encoding="latin-1"), log=lambda *_: None)
    train, val = prepared_text(folder)
    assert train + val == text  # é stays é
    logs: list[str] = []
    folder = ensure_prepared(cfg_for(tmp_path, bad, encoding_errors="replace"), log=logs.append)
    assert "data: replaced 800 invalid utf-8 byte sequence(s) with U+FFFD in 1 file(s)" in "\n".join(logs)
    assert read_data_meta(folder)["replaced_bytes"] == {str(bad.resolve()): 800}
    from gpt.config import ConfigError

    with pytest.raises(ConfigError, match="data.encoding 'latin-9000' is not a text encoding"):
        ensure_prepared(cfg_for(tmp_path, bad, encoding="latin-9000"), log=lambda *_: None)


def test_multibyte_characters_across_piece_boundaries_are_not_invalid(tmp_path, monkeypatch):
    monkeypatch.setattr(gdata, "PIECE_BYTES", 7)  # every few characters a piece ends inside one
    p = tmp_path / "utf8.txt"
    text = "\u00e9t\u00e9 \u2014 \u65e5\u672c\u8a9e \U0001f600 na\u00efve\n" * 40
    p.write_text(text, encoding="utf-8")
    train, val = prepared_text(ensure_prepared(cfg_for(tmp_path, p), log=lambda *_: None))
    assert train + val == text


def test_fine_tuning_records_that_are_not_utf8_are_refused(tmp_path):
    from gpt.data.finetune_data import load_file

    p = tmp_path / "r.jsonl"
    p.write_bytes(b'{"text": "ok"}\n' + '{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"{p}: not valid utf-8: 1 invalid byte sequence\(s\), the first at byte 28 "
                                        r"\(line 2\)"):
        load_file(str(p), "auto", None, 16, False)
    csv = tmp_path / "r.csv"
    csv.write_bytes("prompt,response\nq,caf\u00e9\n".encode("cp1252"))
    with pytest.raises(DataError, match=r"r.csv: not valid utf-8"):
        load_file(str(csv), "auto", None, 16, False)


def test_reading_tables_imports_no_datasets_and_writes_no_cache(tmp_path):
    import subprocess
    import sys

    import datasets
    from conftest import ROOT

    docs = write_docs(tmp_path)
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "c.parquet"))
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "c.csv").write_text("text\n" + "".join(f'"{d}"\n' for d in docs))
    code = ("import sys; from gpt.data import files; d = files.Decoding(); "
            "n = [sum(1 for _ in files.iter_rows(p, d)) for p in sys.argv[1:]]; "
            "print(n, 'datasets' in sys.modules)")
    home = tmp_path / "home"
    home.mkdir()
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.parquet"), str(tmp_path / "saved"),
                           str(tmp_path / "c.csv")], cwd=ROOT, capture_output=True, text=True,
                          env={**__import__("os").environ, "HOME": str(home)})
    assert proc.stdout.strip() == "[30, 30, 30] False", proc.stderr
    assert not list(home.rglob("*"))


def test_a_malformed_jsonl_line_in_a_corpus_names_file_and_line(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(DataError, match=rf"^{p}:2: malformed JSON"):
        ensure_prepared(cfg_for(tmp_path, p), log=lambda *_: None)


# ---------------------------------------------------------------------------- long and deep records, one unit


def test_a_long_jsonl_record_is_read_whole_up_to_the_limit(tmp_path, monkeypatch):
    from gpt.data import files

    monkeypatch.setattr(files, "PIECE_BYTES", 16)  # pieces of 16 bytes, long lines streamed from 64
    p = tmp_path / "r.jsonl"
    text = "to be or not to be " * 200  # one 3.8 KB record: 60 times a long line's piece
    p.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "b"}) + "\n")
    rows = list(files.iter_rows(str(p), files.Decoding()))
    assert rows == [(f"{p}:1", {"text": text}), (f"{p}:2", {"text": "b"})]
    monkeypatch.setattr(files, "MAX_LINE_CHARS", 1000)
    with pytest.raises(DataError, match=rf"^{p}:1: a line of more than 1,000 characters; a record"):
        list(files.iter_rows(str(p), files.Decoding()))


def test_a_record_nested_too_deeply_is_one_line(tmp_path):
    from conftest import chat_template

    from gpt.data.finetune_data import load_file

    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "a"}\n' + '{"text": ' + "[" * 3000 + "]" * 3000 + "}\n")
    with pytest.raises(DataError, match=rf"^{p}:2: JSON nested too deeply to read"):
        ensure_prepared(cfg_for(tmp_path, p), log=lambda *_: None)
    invalid = load_file(str(p), "auto", chat_template(), 16, False).invalid  # fine-tuning: an invalid record
    assert invalid == [(f"{p}:2", "JSON nested too deeply to read (Python's parser stops near 1,000 levels)")]
    arr = tmp_path / "a.json"
    arr.write_text("[" * 3000 + "]" * 3000)
    with pytest.raises(DataError, match="a.json: JSON nested too deeply"):
        ensure_prepared(cfg_for(tmp_path, arr), log=lambda *_: None)


def test_token_files_and_meta_are_replaced_as_one_unit(tmp_path, tiny_corpus, monkeypatch):
    from gpt.data import canary

    cfg = cfg_for(tmp_path, tiny_corpus)
    folder = ensure_prepared(cfg, log=lambda *_: None)
    before = {f.name: f.read_bytes() for f in folder.iterdir()}

    def crash(*args, **kw):  # after the token files are written, before meta.json
        raise KeyboardInterrupt

    monkeypatch.setattr(canary, "write_record", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_prepared(cfg_for(tmp_path, tiny_corpus, val_fraction=0.5), log=lambda *_: None)
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before  # the previous unit, intact
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temporary folder left
    monkeypatch.undo()
    (folder / "val.bin").write_bytes(before["val.bin"][:-2])  # token files that do not match their meta.json
    logs: list[str] = []
    ensure_prepared(cfg, log=logs.append)
    assert "preparing again" in logs[0] and (folder / "val.bin").read_bytes() == before["val.bin"]
