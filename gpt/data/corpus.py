"""Pretraining data: corpus -> train.bin/val.bin token files -> random windows as batches.

Prepared data lives in <data_dir>/<dataset>/<tokenizer>/ as flat token arrays (uint16, or
uint32 when the vocabulary does not fit) plus meta.json with the tokenizer spec. A batch is a
pure function of (seed, rank, step, micro-step), so a resumed run sees exactly the batches an
uninterrupted run would have seen, and accumulation or N ranks see exactly what one big batch sees.
"""

from __future__ import annotations

import hashlib
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
from gpt.data import bpe, canary, files, pii
from gpt.data import tokenizer as tokenizers
from gpt.data.files import DataError

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
PIECE_BYTES = files.PIECE_BYTES  # stream big text files in ~4 MB pieces
DOCS_PER_BATCH = 1024


@dataclass
class Batch:
    x: torch.Tensor  # (B, T) input ids
    y: torch.Tensor  # (B, T) target ids, IGNORE_INDEX where no loss
    doc_ids: torch.Tensor | None = None  # (B, T) packed-document numbers (SFT packing)


# ---------------------------------------------------------------------------- preparation


def prepared_dir(cfg: DataConfig, tokenizer: tokenizers.Tokenizer | None = None) -> Path:
    """data_dir/dataset/tokenizer; a kept tokenizer (see ensure_prepared) adds a hash of itself."""
    name = cfg.tokenizer if tokenizer is None else f"{cfg.tokenizer}-{spec_hash(tokenizer)}"
    return Path(cfg.data_dir) / cfg.dataset / name


def spec_hash(tokenizer: tokenizers.Tokenizer) -> str:
    return hashlib.sha256(json.dumps(tokenizer.to_spec(), sort_keys=True).encode()).hexdigest()[:12]


def read_data_meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text(encoding="utf-8"))


def ensure_prepared(cfg: DataConfig, log=print, tokenizer: tokenizers.Tokenizer | None = None) -> Path:
    """Prepare the data set unless an up-to-date preparation is already on disk: the same source
    files (names, sizes and modification times of every file of a folder), split, encoding and
    redaction settings. `tokenizer`: encode with this one as it is instead of building one from the
    corpus (continued pretraining of a char or BPE checkpoint on new text)."""
    folder = prepared_dir(cfg, tokenizer)
    source = resolve_source(cfg, log)
    if all((folder / f).is_file() for f in ("meta.json", "train.bin", "val.bin")):
        meta = read_data_meta(folder)
        if meta.get("settings") == _settings(cfg, source):
            return folder
        log(f"data: {folder} was prepared from other settings or source files; preparing again")
    prepare(cfg, source, folder, log, tokenizer)
    return folder


def tokenizer_settings(cfg: DataConfig) -> dict:
    """Settings that change the tokenizer itself: a change means preparing again."""
    if cfg.tokenizer != "bpe":
        return {}
    return {"bpe_vocab_size": cfg.bpe_vocab_size, "bpe_pattern": cfg.bpe_pattern or bpe.GPT2_PATTERN}


def resolve_source(cfg: DataConfig, log=print) -> str:
    """Where the corpus comes from: data.path (a local path, or hf://org/name for the hub), or the
    built-in Tiny Shakespeare (downloaded only when data.allow_download is true)."""
    if cfg.path:
        return cfg.path if files.is_hub(cfg.path) else str(files.local_path(cfg.path).resolve())
    if cfg.dataset != "shakespeare":
        raise DataError(f"data.dataset '{cfg.dataset}' is not built in: set data.path to your corpus")
    target = Path(cfg.data_dir) / "shakespeare" / "input.txt"
    if not target.is_file():
        if not cfg.allow_download:
            raise DataError(f"{target} is missing: put Tiny Shakespeare there, or set data.allow_download=true "
                            f"to fetch it from {SHAKESPEARE_URL}")
        download(SHAKESPEARE_URL, target, log)
    return str(target.resolve())


def _settings(cfg: DataConfig, source: str) -> dict:
    """Everything the prepared tokens depend on besides the tokenizer (which names the folder)."""
    return {"source": source, "stamp": files.stamp(source), "val_fraction": cfg.val_fraction,
            "text_field": cfg.text_field, "encoding": [cfg.encoding, cfg.encoding_errors],
            "redact": pii.settings(cfg), "tokenizer": tokenizer_settings(cfg),
            "canaries": canary.settings(cfg)}


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


def prepare(cfg: DataConfig, source: str, folder: Path, log=print, kept: tokenizers.Tokenizer | None = None) -> Path:
    """Tokenize `source` into folder/train.bin, val.bin and meta.json, streaming to disk, with the
    tokenizer data.tokenizer names (char and bpe are built from the corpus) or `kept` as it is.

    Text is decoded per data.encoding and redacted per data.redact before anything is tokenized;
    the redaction counts go into meta.json (never the values)."""
    folder.mkdir(parents=True, exist_ok=True)
    redactor = pii.from_config(cfg)  # one salt for every pass: the same pseudonyms each time
    secrets = canary.make(cfg)  # planted in the training split only; see gpt/data/canary.py

    def pieces(dec: files.Decoding) -> Iterator[tuple[str, str, bool]]:
        """Decoded, redacted text, then the canaries (after redaction, so they stay as planted)."""
        return canary.insert(iter_documents(source, cfg, dec, redactor), secrets, cfg.canary_repeats,
                             cfg.canary_seed)

    if kept is not None:
        log(f"data: encoding {source} with the tokenizer of the starting checkpoint ({kept.vocab_size} tokens)")
        tok = kept
    elif cfg.tokenizer == "char":
        log(f"data: building a character vocabulary from {source}")
        tok: tokenizers.Tokenizer = tokenizers.CharTokenizer.from_text(
            itertools.chain((text for _, text, _ in pieces(decoding(cfg))),
                            [canary.Format(cfg.canary_format).charset if secrets else ""])
        )
    elif cfg.tokenizer == "bpe":
        settings = tokenizer_settings(cfg)
        tok = bpe.train_bpe((text for split, text, _ in pieces(decoding(cfg)) if split == "train"),
                            settings["bpe_vocab_size"], settings["bpe_pattern"], log)
    else:
        tok = tokenizers.TiktokenTokenizer(cfg.tokenizer)
    compression = bpe.Compression() if cfg.tokenizer == "bpe" and kept is None else None
    if tok.vocab_size == 0:
        raise DataError(f"corpus {source} is empty")
    dtype = token_dtype(tok.vocab_size)
    threads = cfg.num_workers or os.cpu_count() or 1
    counts = {"train": 0, "val": 0}
    tmp = {split: folder / f"{split}.bin.tmp-{os.getpid()}" for split in counts}  # per process: runs may race
    files_out = {split: open(path, "wb") for split, path in tmp.items()}
    dec = decoding(cfg)
    if redactor:
        redactor.reset()  # count the pass that is tokenized
    try:
        pending: dict[str, list[tuple[str, bool]]] = {"train": [], "val": []}

        def flush(split: str) -> None:
            texts = [text for text, _ in pending[split]]
            try:
                encoded = tok.encode_batch(texts, num_threads=threads)
            except tokenizers.TokenizerError as e:  # a kept character vocabulary lacks a character
                raise DataError(f"{source}: {e}") from None
            if compression is not None and split == "val":
                compression.add(texts, encoded)
            for ids, (_, doc_end) in zip(encoded, pending[split]):
                if doc_end and tok.eot_id is not None:  # separate documents, never pieces of one
                    ids.append(tok.eot_id)
                arr = np.asarray(ids, dtype=dtype)
                arr.tofile(files_out[split])
                counts[split] += arr.size
            pending[split].clear()

        for split, text, doc_end in pieces(dec):
            pending[split].append((text, doc_end))
            if len(pending[split]) >= DOCS_PER_BATCH:
                flush(split)
        for split in pending:
            flush(split)
    except BaseException:
        for f in files_out.values():
            f.close()
        for p in tmp.values():  # no half-written tokens of a refused corpus stay behind
            p.unlink(missing_ok=True)
        raise
    for f in files_out.values():
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
        "settings": _settings(cfg, source),
        "replaced_bytes": dec.replaced,
        "redaction": redactor.summary() if redactor else None,
    }
    canary.write_record(folder, secrets, cfg, context="\n")
    if secrets:
        log(f"data: planted {len(secrets)} canaries x {cfg.canary_repeats} in the training split "
            f"(secrets in {folder / canary.FILE})")
    meta_tmp = folder / f"meta.json.tmp-{os.getpid()}"
    meta_tmp.write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    os.replace(meta_tmp, folder / "meta.json")
    if dec.report():
        log(dec.report())
    if redactor:
        log(redactor.log_line())
    log(f"data: {counts['train']:,} train and {counts['val']:,} val tokens in {folder}")
    if compression is not None:
        log(compression.summary())
    return folder


def decoding(cfg: DataConfig) -> files.Decoding:
    return files.Decoding(cfg.encoding, cfg.encoding_errors)


def token_dtype(vocab_size: int) -> type:
    """uint16 halves disk and memory; ids of 65536 and above need uint32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def iter_documents(source: str, cfg: DataConfig, dec: files.Decoding,
                   redactor: pii.Redactor | None = None) -> Iterator[tuple[str, str, bool]]:
    """Yield (split, text, doc_end) pieces, decoded and redacted. One text file splits by position
    (its tail, from a line end, is validation); many documents split by a seeded coin per document.
    doc_end marks the end of a document (where an end-of-text token goes); pieces of a single
    document never get one."""
    clean = (lambda text, where: redactor.redact(text, where)) if redactor else (lambda text, where: text)
    if not files.is_hub(source) and files.is_text_file(Path(source)):
        for split, text, _ in split_text_file(Path(source), cfg.val_fraction, dec):
            yield split, clean(text, source), False
        return
    rng = np.random.default_rng(0)
    docs = (clean(text, where) for where, text in _iter_texts(source, cfg, dec))
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


def split_text_file(path: Path, val_fraction: float, dec: files.Decoding) -> Iterator[tuple[str, str, bool]]:
    """(split, piece, False) of one text file: its last val_fraction (from a line start) is validation."""
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"corpus {path} is empty")
    cut = int(size * (1 - val_fraction)) if val_fraction > 0 else None  # 0: all of it is training text
    for text, is_val in dec.pieces(path, PIECE_BYTES, cut=cut):
        yield ("val" if is_val else "train"), text, False


def _iter_texts(source: str, cfg: DataConfig, dec: files.Decoding) -> Iterator[tuple[str, str]]:
    """(file, text) of every document: a whole text file, or the text field of every record."""
    for where, row in files.iter_rows(source, dec, cache_dir=Path(cfg.data_dir) / "hf_cache"):
        if isinstance(row, str):
            text = row
        elif isinstance(row, files.RecordError):
            raise DataError(f"{where}: {row}")
        elif isinstance(row, dict):
            if cfg.text_field not in row:
                raise DataError(f"{where}: records have no '{cfg.text_field}' field (fields: {', '.join(row)}); "
                                "set data.text_field")
            text = row[cfg.text_field]
        else:
            raise DataError(f"{where}: not a record with a '{cfg.text_field}' field")
        if isinstance(text, str) and text:
            yield files.file_of(where), text


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
        meta = read_data_meta(folder)
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
