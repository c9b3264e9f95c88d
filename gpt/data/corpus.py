"""Pretraining data: corpus -> train.bin/val.bin token files -> random windows as batches.

Prepared data lives in <data_dir>/<dataset>/<tokenizer>/ as flat token arrays (uint16, or
uint32 when the vocabulary does not fit) plus meta.json with the tokenizer spec. A batch is a
pure function of (seed, rank, step, micro-step), so a resumed run sees exactly the batches an
uninterrupted run would have seen, and accumulation or N ranks see exactly what one big batch sees.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from gpt.config import DataConfig
from gpt.data import bpe, canary, files, pii
from gpt.data import tokenizer as tokenizers
from gpt.data.batch import Batch
from gpt.data.files import DataError
from gpt.data.token_files import TokenFiles, token_dtype

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
PIECE_BYTES = files.PIECE_BYTES  # stream big text files in ~4 MB pieces
DOCS_PER_BATCH = 1024


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
        if meta.get("settings") == _settings(cfg, source) and _tokens_match(folder, meta):
            return folder
        log(f"data: {folder} was prepared from other settings or source files; preparing again")
    prepare(cfg, source, folder, log, tokenizer)
    return folder


def _tokens_match(folder: Path, meta: dict) -> bool:
    """The token files hold the token counts meta.json records (a folder left half-replaced by an older
    version of this code, which renamed the files one by one, is prepared again)."""
    try:
        size = np.dtype(meta["dtype"]).itemsize
        return all((folder / f"{split}.bin").stat().st_size == meta[f"{split}_tokens"] * size
                   for split in ("train", "val"))
    except (KeyError, TypeError, ValueError, OSError):
        return False


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
    the redaction counts go into meta.json (never the values). The three files (and canaries.json) are
    one unit: written into a temporary folder next to `folder` and renamed into place together, so a
    crash never leaves token files next to the meta.json of another preparation."""
    tmp, old = (folder.parent / f".{folder.name}.{part}-{os.getpid()}" for part in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        summary = _prepare_into(tmp, folder, cfg, source, kept, log)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    for line in summary:
        log(line)
    return folder


def _prepare_into(tmp: Path, folder: Path, cfg: DataConfig, source: str, kept: tokenizers.Tokenizer | None,
                  log=print) -> list[str]:
    """prepare()'s work, into the empty folder `tmp` (renamed to `folder` after): the summary lines to log."""
    redactor = pii.from_config(cfg)  # one salt for every pass: the same pseudonyms each time
    secrets = canary.make(cfg)  # planted in the training split only; see gpt/data/canary.py
    dec = files.Decoding(cfg.encoding, cfg.encoding_errors)
    passes = functools.partial(corpus_pass, source, cfg, dec, redactor, secrets)
    tok = build_tokenizer(cfg, source, passes, bool(secrets), kept, log)
    compression = bpe.Compression() if cfg.tokenizer == "bpe" and kept is None else None
    if tok.vocab_size == 0:
        raise DataError(f"corpus {source} is empty")
    dtype = token_dtype(tok.vocab_size)
    with TokenFiles(tmp, dtype) as out:
        encode_corpus(passes(), tok, out, cfg.num_workers or os.cpu_count() or 1, compression, source)
        if out.counts["train"] == 0:
            raise DataError(f"corpus {source} is empty: no text to train on")
    meta = {
        "tokenizer": tok.to_spec(),
        "vocab_size": tok.vocab_size,
        "dtype": np.dtype(dtype).name,
        "train_tokens": out.counts["train"],
        "val_tokens": out.counts["val"],
        "settings": _settings(cfg, source),
        "replaced_bytes": dec.replaced,
        "redaction": redactor.summary() if redactor else None,
    }
    canary.write_record(tmp, secrets, cfg, context="\n")
    (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    planted = (f"data: planted {len(secrets)} canaries x {cfg.canary_repeats} in the training split "
               f"(secrets in {folder / canary.FILE})") if secrets else ""
    counts = f"data: {out.counts['train']:,} train and {out.counts['val']:,} val tokens in {folder}"
    lines = [planted, dec.report(), redactor.log_line() if redactor else "", counts,
             compression.summary() if compression is not None else ""]
    return [line for line in lines if line]


def corpus_pass(source: str, cfg: DataConfig, dec: files.Decoding, redactor: pii.Redactor | None,
                secrets: list[str]) -> Iterator[tuple[str, str, bool]]:
    """One pass over the corpus: (split, text, doc_end) of the decoded, redacted text, then the
    canaries (after redaction, so they stay as planted). The decoding and redaction counts start
    afresh with each pass, so after the last one (the tokenized one) they describe that pass."""
    dec.replaced.clear()
    if redactor:
        redactor.reset()
    yield from canary.insert(iter_documents(source, cfg, dec, redactor), secrets, cfg.canary_repeats,
                             cfg.canary_seed)


def build_tokenizer(cfg: DataConfig, source: str, passes: Callable[[], Iterator[tuple[str, str, bool]]],
                    canaries: bool, kept: tokenizers.Tokenizer | None, log=print) -> tokenizers.Tokenizer:
    """The tokenizer data.tokenizer names: `kept` as it is, a character vocabulary or a BPE built
    from the corpus (a pass over it; with canaries, their characters too), or a tiktoken encoding."""
    if kept is not None:
        log(f"data: encoding {source} with the tokenizer of the starting checkpoint ({kept.vocab_size} tokens)")
        return kept
    if cfg.tokenizer == "char":
        log(f"data: building a character vocabulary from {source}")
        return tokenizers.CharTokenizer.from_text(
            itertools.chain((text for _, text, _ in passes()),
                            [canary.Format(cfg.canary_format).charset if canaries else ""])
        )
    if cfg.tokenizer == "bpe":
        settings = tokenizer_settings(cfg)
        return bpe.train_bpe((text for split, text, _ in passes() if split == "train"),
                             settings["bpe_vocab_size"], settings["bpe_pattern"], log)
    return tokenizers.TiktokenTokenizer(cfg.tokenizer)


def encode_corpus(pieces: Iterator[tuple[str, str, bool]], tok: tokenizers.Tokenizer, out: TokenFiles,
                  threads: int, compression: bpe.Compression | None, source: str) -> None:
    """Encode the pieces DOCS_PER_BATCH at a time per split (on `threads` threads) into `out`; an
    end-of-text token closes each document; compression is measured on the validation text."""
    pending: dict[str, list[tuple[str, bool]]] = {"train": [], "val": []}
    for split, text, doc_end in pieces:
        pending[split].append((text, doc_end))
        if len(pending[split]) >= DOCS_PER_BATCH:
            _encode_batch(pending[split], split, tok, out, threads, compression, source)
            pending[split] = []
    for split, batch in pending.items():
        _encode_batch(batch, split, tok, out, threads, compression, source)


def _encode_batch(batch: list[tuple[str, bool]], split: str, tok: tokenizers.Tokenizer, out: TokenFiles,
                  threads: int, compression: bpe.Compression | None, source: str) -> None:
    texts = [text for text, _ in batch]
    try:
        encoded = tok.encode_batch(texts, num_threads=threads)
    except tokenizers.TokenizerError as e:  # a kept character vocabulary lacks a character
        raise DataError(f"{source}: {e}") from None
    if compression is not None and split == "val":
        compression.add(texts, encoded)
    for ids, (_, doc_end) in zip(encoded, batch):
        if doc_end and tok.eot_id is not None:  # separate documents, never pieces of one
            ids.append(tok.eot_id)
        out.write(split, ids)


def iter_documents(source: str, cfg: DataConfig, dec: files.Decoding,
                   redactor: pii.Redactor | None = None) -> Iterator[tuple[str, str, bool]]:
    """Yield (split, text, doc_end) pieces, decoded and redacted. One text file splits by position
    (its tail, from a line end, is validation); many documents split by a seeded coin per document.
    doc_end marks the end of a document (where an end-of-text token goes); pieces of a single
    document never get one."""
    clean = (lambda text, where: redactor.redact(text, where)) if redactor else (lambda text, where: text)
    if not files.is_hub(source) and files.is_text_file(Path(source)):
        pieces = ((text, split) for split, text, _ in split_text_file(Path(source), cfg.val_fraction, dec))
        for text, split in redactor.redact_stream(pieces, source) if redactor else pieces:
            yield split, text, False  # redacted across piece ends: a long line is read in pieces
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
