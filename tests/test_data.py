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
    read_meta,
    token_dtype,
)
from gpt.data.tokenizer import from_spec


def prepared_text(folder) -> tuple[str, str]:
    meta = read_meta(folder)
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
    meta = read_meta(folder)
    assert meta["dtype"] == "uint16" and meta["train_tokens"] + meta["val_tokens"] > 0


def test_big_file_streams_in_pieces(tmp_path, tiny_corpus, monkeypatch):
    monkeypatch.setattr(gdata, "CHUNK_CHARS", 1000)  # many pieces: the split point lands inside one
    folder = ensure_prepared(cfg_for(tmp_path, tiny_corpus), log=lambda *_: None)
    train, val = prepared_text(folder)
    assert train + val == tiny_corpus.read_text()


def write_docs(tmp_path, n=30):
    return [f"document {i}: " + "To be, or not to be. " * (i % 5 + 1) for i in range(n)]


def test_directory_jsonl_parquet_and_datasets_folder_agree(tmp_path):
    import datasets

    docs = write_docs(tmp_path)
    d = tmp_path / "txt"
    d.mkdir()
    for i, doc in enumerate(docs):
        (d / f"{i:03d}.txt").write_text(doc)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(docs)))
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "c.parquet"))
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    results = []
    for i, src in enumerate([d, tmp_path / "c.jsonl", tmp_path / "c.parquet", tmp_path / "saved"]):
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
