"""Pretraining data: corpus -> train.bin/val.bin token files -> random windows as batches.

Prepared data lives in <data_dir>/<dataset>/<tokenizer>/ as flat token arrays (uint16, or
uint32 when the vocabulary does not fit) plus meta.json with the tokenizer spec. A batch is a
pure function of (seed, rank, step, micro-step), so a resumed run sees exactly the batches an
uninterrupted run would have seen, and accumulation or N ranks see exactly what one big batch sees.
"""

from __future__ import annotations

import itertools
import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from gpt.config import DataConfig
from gpt.data import bpe, canary
from gpt.data import tokenizer as tokenizers
from gpt.errors import UserError

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TEXT_SUFFIXES = (".txt", ".md", ".text")
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
CHUNK_CHARS = 4 << 20  # stream big text files in ~4 MB pieces
DOCS_PER_BATCH = 1024


class DataError(UserError):
    """Missing, empty or unreadable training data; the message says what to do."""


@dataclass
class Batch:
    x: torch.Tensor  # (B, T) input ids
    y: torch.Tensor  # (B, T) target ids, IGNORE_INDEX where no loss
    doc_ids: torch.Tensor | None = None  # (B, T) packed-document numbers (SFT packing)


# ---------------------------------------------------------------------------- preparation


def prepared_dir(cfg: DataConfig) -> Path:
    return Path(cfg.data_dir) / cfg.dataset / cfg.tokenizer


def read_meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text(encoding="utf-8"))


def ensure_prepared(cfg: DataConfig, log=print) -> Path:
    """Prepare the data set unless an up-to-date preparation is already on disk."""
    folder = prepared_dir(cfg)
    source = resolve_source(cfg, log)
    if all((folder / f).is_file() for f in ("meta.json", "train.bin", "val.bin")):
        meta = read_meta(folder)
        same = (meta.get("source"), meta.get("source_stamp"), meta.get("val_fraction"),
                meta.get("tokenizer_settings", {}), meta.get("canaries"))
        if same == (_source_name(source), _stamp(source), cfg.val_fraction, tokenizer_settings(cfg),
                    canary.settings(cfg)):
            return folder
        log(f"data: {folder} was prepared from other settings; preparing again")
    prepare(cfg, source, folder, log)
    return folder


def tokenizer_settings(cfg: DataConfig) -> dict:
    """Settings that change the tokenizer itself: a change means preparing again."""
    if cfg.tokenizer != "bpe":
        return {}
    return {"bpe_vocab_size": cfg.bpe_vocab_size, "bpe_pattern": cfg.bpe_pattern or bpe.GPT2_PATTERN}


def resolve_source(cfg: DataConfig, log=print) -> Path | str:
    """Where the corpus comes from: data.path, or the built-in Tiny Shakespeare (downloaded if absent)."""
    if cfg.path:
        p = Path(cfg.path)
        if p.exists():
            return p
        if _looks_like_hub_name(cfg.path):
            return cfg.path  # a Hugging Face hub dataset; only reached when the user names one
        raise DataError(f"data.path '{cfg.path}': no such file or directory")
    if cfg.dataset != "shakespeare":
        raise DataError(f"data.dataset '{cfg.dataset}' is not built in: set data.path to your corpus")
    target = Path(cfg.data_dir) / "shakespeare" / "input.txt"
    if not target.is_file():
        if not cfg.allow_download:
            raise DataError(f"{target} is missing and data.allow_download is false: put Tiny Shakespeare there")
        download(SHAKESPEARE_URL, target, log)
    return target


def _source_name(source: Path | str) -> str:
    """The same corpus reached by a relative or an absolute path has the same name."""
    return str(source.resolve()) if isinstance(source, Path) else source


def _stamp(source: Path | str) -> list[int] | None:
    """Size and modification time of a corpus file, so an edited corpus is prepared again."""
    if isinstance(source, Path) and source.is_file():
        st = source.stat()
        return [st.st_size, st.st_mtime_ns]
    return None


def _looks_like_hub_name(name: str) -> bool:
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1 and not Path(name).suffix


def download(url: str, target: Path, log=print) -> None:
    log(f"data: downloading {url} -> {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            f.write(r.read())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not download {url} ({e}); offline, copy the file to {target}") from None
    os.replace(tmp, target)


def prepare(cfg: DataConfig, source: Path | str, folder: Path, log=print) -> Path:
    """Tokenize `source` into folder/train.bin, val.bin and meta.json, streaming to disk."""
    folder.mkdir(parents=True, exist_ok=True)
    secrets = canary.make(cfg)  # planted in the training split only; see gpt/data/canary.py

    def pieces() -> Iterator[tuple[str, str, bool]]:
        return canary.insert(iter_documents(source, cfg), secrets, cfg.canary_repeats, cfg.canary_seed)

    if cfg.tokenizer == "char":
        log(f"data: building a character vocabulary from {source}")
        tok: tokenizers.Tokenizer = tokenizers.CharTokenizer.from_text(
            itertools.chain((text for _, text, _ in pieces()), [canary.Format(cfg.canary_format).charset
                                                                if secrets else ""])
        )
    elif cfg.tokenizer == "bpe":
        settings = tokenizer_settings(cfg)
        tok = bpe.train_bpe((text for split, text, _ in pieces() if split == "train"),
                            settings["bpe_vocab_size"], settings["bpe_pattern"], log)
    else:
        tok = tokenizers.TiktokenTokenizer(cfg.tokenizer)
    compression = bpe.Compression() if cfg.tokenizer == "bpe" else None
    if tok.vocab_size == 0:
        raise DataError(f"corpus {source} is empty")
    dtype = token_dtype(tok.vocab_size)
    threads = cfg.num_workers or os.cpu_count() or 1
    counts = {"train": 0, "val": 0}
    tmp = {split: folder / f"{split}.bin.tmp-{os.getpid()}" for split in counts}  # per process: runs may race
    files = {split: open(path, "wb") for split, path in tmp.items()}
    try:
        pending: dict[str, list[tuple[str, bool]]] = {"train": [], "val": []}

        def flush(split: str) -> None:
            texts = [text for text, _ in pending[split]]
            encoded = tok.encode_batch(texts, num_threads=threads)
            if compression is not None and split == "val":
                compression.add(texts, encoded)
            for ids, (_, doc_end) in zip(encoded, pending[split]):
                if doc_end and tok.eot_id is not None:  # separate documents, never pieces of one
                    ids.append(tok.eot_id)
                arr = np.asarray(ids, dtype=dtype)
                arr.tofile(files[split])
                counts[split] += arr.size
            pending[split].clear()

        for split, text, doc_end in pieces():
            pending[split].append((text, doc_end))
            if len(pending[split]) >= DOCS_PER_BATCH:
                flush(split)
        for split in pending:
            flush(split)
    finally:
        for f in files.values():
            f.close()
    if counts["train"] == 0:
        for p in tmp.values():
            p.unlink(missing_ok=True)
        raise DataError(f"corpus {source} is empty: no text to train on")
    for split, path in tmp.items():
        os.replace(path, folder / f"{split}.bin")
    meta = {
        "tokenizer": tok.to_spec(),
        "vocab_size": tok.vocab_size,
        "dtype": np.dtype(dtype).name,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "source": _source_name(source),
        "source_stamp": _stamp(source),
        "val_fraction": cfg.val_fraction,
        "tokenizer_settings": tokenizer_settings(cfg),
        "canaries": canary.settings(cfg),
    }
    canary.write_record(folder, secrets, cfg, context="\n")
    if secrets:
        log(f"data: planted {len(secrets)} canaries x {cfg.canary_repeats} in the training split "
            f"(secrets in {folder / canary.FILE})")
    meta_tmp = folder / f"meta.json.tmp-{os.getpid()}"
    meta_tmp.write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    os.replace(meta_tmp, folder / "meta.json")
    log(f"data: {counts['train']:,} train and {counts['val']:,} val tokens in {folder}")
    if compression is not None:
        log(compression.summary())
    return folder


def token_dtype(vocab_size: int) -> type:
    """uint16 halves disk and memory; ids of 65536 and above need uint32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def iter_documents(source: Path | str, cfg: DataConfig) -> Iterator[tuple[str, str, bool]]:
    """Yield (split, text, doc_end) pieces. One text file splits by position (its tail is
    validation); many documents split by a seeded coin per document. doc_end marks the end of a
    document (where an end-of-text token goes); pieces of a single document never get one."""
    if isinstance(source, Path) and source.is_file() and source.suffix.lower() not in TABLE_SUFFIXES:
        yield from _split_text_file(source, cfg.val_fraction)
        return
    rng = np.random.default_rng(0)
    docs = _iter_texts(source, cfg)
    first = next(docs, None)
    second = next(docs, None)
    if first is None:
        raise DataError(f"corpus {source} is empty: no documents found")
    if second is None:  # a single document: split it by position like a text file
        cut = int(len(first) * (1 - cfg.val_fraction))
        yield "train", first[:cut], False
        yield "val", first[cut:], False
        return
    yield "train", first, True
    yield "val", second, True  # both splits are never empty
    for doc in docs:
        yield ("val" if rng.random() < cfg.val_fraction else "train"), doc, True


def _split_text_file(path: Path, val_fraction: float) -> Iterator[tuple[str, str, bool]]:
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"corpus {path} is empty")
    cut = int(size * (1 - val_fraction))
    with open(path, "r", encoding="utf-8", errors="replace", newline="") as f:
        done = 0
        while True:
            lines = f.readlines(CHUNK_CHARS)
            if not lines:
                break
            text = "".join(lines)
            n = len(text.encode("utf-8"))
            if done < cut < done + n:  # the split point falls in this piece
                k = _char_index_of_byte(text, cut - done)
                yield "train", text[:k], False
                yield "val", text[k:], False
            else:
                yield ("train" if done + n <= cut else "val"), text, False
            done += n


def _char_index_of_byte(text: str, byte_offset: int) -> int:
    return len(text.encode("utf-8")[:byte_offset].decode("utf-8", errors="ignore"))


def _iter_texts(source: Path | str, cfg: DataConfig) -> Iterator[str]:
    if isinstance(source, Path) and source.is_dir() and any(source.rglob("*.txt")):
        for f in sorted(p for p in source.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES):
            yield f.read_text(encoding="utf-8", errors="replace")
        return
    for row in _load_table(source):
        if cfg.text_field not in row:
            raise DataError(
                f"{source}: records have no '{cfg.text_field}' field (fields: {', '.join(row)}); set data.text_field"
            )
        text = row[cfg.text_field]
        if isinstance(text, str) and text:
            yield text


def _load_table(source: Path | str):
    """Rows of a JSONL/JSON/CSV/Parquet file or a `datasets` dataset (folder or hub name)."""
    import datasets  # heavy import, only for these sources

    if isinstance(source, Path) and source.is_file():
        builder = TABLE_SUFFIXES[source.suffix.lower()]
        return datasets.load_dataset(builder, data_files=str(source), split="train", streaming=True)
    if isinstance(source, Path) and (source / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(source))
    if isinstance(source, Path) and (source / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(source))["train"]
    return datasets.load_dataset(str(source), split="train", streaming=True)


# ---------------------------------------------------------------------------- batches


class TokenBatches:
    """Random (B, block_size) windows from prepared token files.

    Step s draws one global batch of batch_size * grad_accum * world_size windows from a generator
    seeded by (seed, s); micro-step m of rank r takes its own rows of it. So a step sees the same
    windows whether it runs as one big batch, with accumulation, or spread over ranks, and a
    resumed run sees exactly what an uninterrupted one would have.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        block_size: int,
        batch_size: int,
        device: torch.device,
        seed: int = 0,
        rank: int = 0,
        eval_batch_size: int = 0,
        eval_iters: int = 20,
        world_size: int = 1,
        grad_accum: int = 1,
    ):
        folder = Path(folder)
        meta = read_meta(folder)
        dtype = np.dtype(meta["dtype"])
        self.train = np.memmap(folder / "train.bin", dtype=dtype, mode="r")
        self.val = np.memmap(folder / "val.bin", dtype=dtype, mode="r")
        for split, arr in (("train", self.train), ("val", self.val)):
            if len(arr) < block_size + 1:
                raise DataError(
                    f"{folder}/{split}.bin has {len(arr)} tokens, fewer than block_size+1 ({block_size + 1}): "
                    "use more text, a larger data.val_fraction, or a smaller model.block_size"
                )
        self.block_size, self.batch_size, self.device = block_size, batch_size, device
        self.seed, self.rank, self.world_size, self.grad_accum = seed, rank, world_size, grad_accum
        self.eval_batch_size, self.eval_iters = eval_batch_size or batch_size, eval_iters

    def _windows(self, data: np.ndarray, rng: np.random.Generator, batch_size: int, n_slots: int, slot: int) -> Batch:
        """Rows [slot*B, (slot+1)*B) of one global draw of n_slots * B windows."""
        T = self.block_size
        starts = rng.integers(0, len(data) - T, size=batch_size * n_slots)[slot * batch_size : (slot + 1) * batch_size]
        window = torch.from_numpy(data[starts[:, None] + np.arange(T + 1)].astype(np.int64))
        if self.device.type == "cuda":
            window = window.pin_memory().to(self.device, non_blocking=True)
        else:
            window = window.to(self.device)
        return Batch(window[:, :-1], window[:, 1:])

    def train_batch(self, step: int, micro: int) -> Batch:
        rng = np.random.default_rng([self.seed, step])
        n_slots = self.grad_accum * self.world_size
        return self._windows(self.train, rng, self.batch_size, n_slots, micro * self.world_size + self.rank)

    def val_batches(self) -> Iterator[Batch]:
        """The same validation windows at every evaluation, so val losses compare fairly."""
        for i in range(self.eval_iters):
            rng = np.random.default_rng([self.seed, 1 << 30, i])
            yield self._windows(self.val, rng, self.eval_batch_size, self.world_size, self.rank)
