"""The one reader of data files, shared by pretraining corpora and fine-tuning records.

A data path is a text file, a folder of files, a JSONL/JSON/CSV/Parquet file, or a folder saved by
`datasets.save_to_disk`; all of them are read here with the standard library and pyarrow, in memory
or streamed, and nothing is written anywhere (no Arrow copies in ~/.cache). A Hugging Face hub data
set is read only when it is named explicitly as `hf://org/name`; a path that does not exist is
"no such file", never a lookup on the network.

Text is decoded strictly by default: a file that is not valid in `encoding` is refused with the
byte offset and line of the first invalid sequence and how many there are. `errors="replace"` puts
U+FFFD in their place and counts them, so the caller can report it.

Rows come as (where, row): `where` is file:line (JSONL, CSV), "file: record N" (a JSON array) or
"file: row N" (Parquet, saved folders, the hub), so a bad record can be named without its text.
A record (a JSONL line, a CSV row) is read whole however long it is, up to MAX_LINE_CHARS characters.

A folder written by `python -m gpt.redact` carries REDACTION_MARKER (written last, listing its files,
their sizes and the kinds redacted); such a folder is read only when it is complete: no file missing,
added or of another size (a killed or mixed redaction is refused, never trained on).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from gpt.config import ConfigError
from gpt.errors import UserError

HUB_PREFIX = "hf://"
TEXT_SUFFIXES = (".txt", ".md", ".text")
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
PIECE_BYTES = 4 << 20  # text files are read in ~4 MB pieces that end at a line end
LONG_LINE_PIECES = 4  # a text line longer than this many pieces (16 MiB) is streamed in pieces
MAX_LINE_CHARS = 1 << 28  # a record (one JSONL line, CSV row) is read whole up to 256 Mi characters
ROWS_PER_BATCH = 1024
REDACTION_MARKER = ".redaction.json"  # written last by gpt.redact into a redacted folder


class DataError(UserError):
    """Missing, empty or unreadable data; the message says which file and what to do."""


class RecordError(UserError):
    """One record is malformed; the caller adds where it is."""


# ---------------------------------------------------------------------------- decoding


_reading = threading.local()  # the _Tracker of the file being decoded on this thread


def _count_invalid(err: UnicodeDecodeError) -> tuple[str, int]:
    _reading.tracker.seen(err)
    return "\ufffd", err.end


codecs.register_error("gpt.data.count", _count_invalid)


class _Tracker:
    """Counts the invalid byte sequences of one file and where the first one is."""

    def __init__(self) -> None:
        self.count, self.first, self.end = 0, -1, 0  # end: file offset just past the bytes decoded so far

    def seen(self, err: UnicodeDecodeError) -> None:
        if self.first < 0:  # the decoder's buffer (held bytes + this chunk) ends at self.end
            self.first = self.end - len(err.object) + err.start
        self.count += 1


@dataclass
class Decoding:
    """How text files are decoded: `encoding`, and `errors` = strict (refuse) or replace (count)."""

    encoding: str = "utf-8"
    errors: str = "strict"
    hint: str = "set data.encoding (e.g. latin-1) or data.encoding_errors=replace"
    replaced: dict[str, int] = field(default_factory=dict)  # file -> invalid sequences replaced

    def __post_init__(self) -> None:
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ConfigError(f"data.encoding '{self.encoding}' is not a text encoding Python knows "
                              "(e.g. utf-8, latin-1, cp1252)") from None
        if self.errors not in ("strict", "replace"):
            raise ConfigError(f"data.encoding_errors must be strict or replace, got '{self.errors}'")

    def pieces(self, path: Path, piece_bytes: int | None = None, cut: int | None = None,
               whole_lines: bool = False) -> Iterator[tuple[str, bool]]:
        """(text, after_cut) pieces of a text file of about `piece_bytes` (default PIECE_BYTES), each
        ending at a line end. A line longer than LONG_LINE_PIECES pieces is cut where a piece ends (the
        redactor reads across such cuts: pii.Redactor.redact_stream) unless `whole_lines`: then every
        line comes whole, up to MAX_LINE_CHARS characters (a longer one is refused). With `cut` (a byte
        offset) the pieces after it are marked; the cut moves back to the start of its line (when
        that line starts within the last piece) so no line is split between the two sides."""
        piece_bytes = piece_bytes or PIECE_BYTES
        tracker = _Tracker()
        decoder = codecs.getincrementaldecoder(self.encoding)("gpt.data.count")
        state = "none" if cut is None else ("before" if cut > 0 else "after")
        carry, first, lines = "", True, 0
        with open(path, "rb") as f:
            while True:
                # a long line read whole: reads grow with it, so it is copied O(1) times, not O(n)
                size = min(piece_bytes, cut - tracker.end) if state == "before" else \
                    max(piece_bytes, len(carry) if whole_lines else 0)
                raw = f.read(size)
                tracker.end += len(raw)
                _reading.tracker = tracker
                text = carry + decoder.decode(raw, final=not raw)
                if tracker.count and self.errors == "strict":
                    self._refuse(path, f, decoder, tracker)
                if first and text.startswith("\ufeff"):  # a byte order mark is not text
                    text = text[1:]
                first = first and not text
                if state == "before" and tracker.end >= cut:  # the cut moves back to a line start
                    k = text.rfind("\n") + 1 or len(text)
                    if k:
                        yield text[:k], False
                    text, state = text[k:], "after"
                if not raw:
                    if text:
                        yield text, state == "after"
                    break
                k = text.rfind("\n") + 1
                if not k and len(text) >= LONG_LINE_PIECES * piece_bytes:
                    if not whole_lines:
                        k = len(text)  # a text file with a very long line: streamed in pieces
                    elif len(text) > MAX_LINE_CHARS:
                        raise DataError(f"{path}:{lines + 1}: a line of more than {MAX_LINE_CHARS:,} characters; "
                                        "a record (one line) is read whole up to that size: split it")
                if k:
                    lines += text.count("\n", 0, k) if whole_lines else 0
                    yield text[:k], state == "after"
                    text = text[k:]
                carry = text
        if tracker.count:
            self.replaced[str(path)] = self.replaced.get(str(path), 0) + tracker.count

    def _refuse(self, path: Path, f, decoder, tracker: _Tracker) -> None:
        """Count the rest of the file's invalid sequences, then raise naming the first."""
        while raw := f.read(PIECE_BYTES):
            tracker.end += len(raw)
            decoder.decode(raw)
        decoder.decode(b"", final=True)
        line = 1 + _count_newlines(path, tracker.first)
        raise DataError(f"{path}: not valid {self.encoding}: {tracker.count} invalid byte sequence(s), the first "
                        f"at byte {tracker.first} (line {line}); fix the file, or {self.hint}")

    def read(self, path: Path) -> str:
        return "".join(text for text, _ in self.pieces(path))

    def lines(self, path: Path) -> Iterator[str]:
        """The file's lines with their line ends, each whole (only '\\n' ends a line: JSON text may
        hold U+2028); a line of more than MAX_LINE_CHARS characters is refused."""
        for text, _ in self.pieces(path, whole_lines=True):
            *whole, rest = text.split("\n")
            for line in whole:
                yield line + "\n"
            if rest:
                yield rest

    def report(self) -> str:
        """One line for the log when invalid sequences were replaced ('' when none were)."""
        if not self.replaced:
            return ""
        total = sum(self.replaced.values())
        return (f"data: replaced {total} invalid {self.encoding} byte sequence(s) with U+FFFD in "
                f"{len(self.replaced)} file(s) (data.encoding_errors=replace)")


def _count_newlines(path: Path, upto: int) -> int:
    n = 0
    with open(path, "rb") as f:
        while upto > 0 and (raw := f.read(min(PIECE_BYTES, upto))):
            n += raw.count(b"\n")
            upto -= len(raw)
    return n


# ---------------------------------------------------------------------------- sources


def is_hub(path: str) -> bool:
    return path.startswith(HUB_PREFIX)


def local_path(path: str) -> Path:
    """The file or folder `path` names; a path that does not exist is an error (never a hub lookup)."""
    p = Path(path).expanduser()
    if not p.exists():
        hint = f"; for a Hugging Face hub data set write {HUB_PREFIX}{path}" if path.count("/") == 1 else ""
        raise DataError(f"{path}: no such file or directory{hint}")
    return p


def is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file())


def is_text_file(p: Path) -> bool:
    """A single file that is not a table is text (input.txt, notes.md, a log, a file with no suffix)."""
    return p.is_file() and p.suffix.lower() not in TABLE_SUFFIXES


def folder_files(folder: Path) -> list[Path]:
    """The data files of a folder, recursively, in a fixed order; hidden files and others are skipped."""
    known = TEXT_SUFFIXES + TABLE_SUFFIXES
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in known
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not found:
        raise DataError(f"{folder}: a folder with no data files (expected {', '.join(known)})")
    check_redacted(folder, found)
    return found


def check_redacted(folder: Path, found: list[Path]) -> None:
    """A folder written by gpt.redact (it holds REDACTION_MARKER) must be complete: the marker says so and
    its data files are exactly the ones listed, at the listed sizes; otherwise a killed or mixed
    redaction would be read as if it were whole."""
    marker = folder / REDACTION_MARKER
    if not marker.exists():
        return
    redo = "run python -m gpt.redact again into a new folder"
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        listed, complete = dict(record["files"]), record["complete"] is True
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{marker}: unreadable redaction marker ({type(e).__name__}); {redo}") from None
    if not complete:
        raise DataError(f"{folder}: an unfinished redaction (gpt.redact was stopped before it completed); {redo}")
    have = {f.relative_to(folder).as_posix(): f.stat().st_size for f in found}
    changed = sorted(set(have) ^ set(listed)) + sorted(n for n in have if n in listed and have[n] != listed[n])
    if changed:
        raise DataError(f"{folder}: not the folder gpt.redact wrote ({len(changed)} data file(s) missing, added "
                        f"or changed since, the first: {changed[0]}); a partial or mixed redaction is not "
                        f"read: {redo}")


def stamp(path: str) -> str | None:
    """A fingerprint of the source's files (names, sizes, modification times): when any file of a
    folder changes, appears or disappears, the prepared data is out of date. None for the hub."""
    if is_hub(path):
        return None
    p = local_path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(p) if p.is_dir() else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------- rows


def file_of(where: str) -> str:
    """The file part of a row's `where` ("a.jsonl:3" -> "a.jsonl", "b.parquet: row 2" -> "b.parquet")."""
    return re.sub(r"(:\d+|: (row|record) \d+)$", "", where)


def iter_rows(path: str, decoding: Decoding, cache_dir: Path | None = None) -> Iterator[tuple[str, Any]]:
    """(where, row) for every record of a data path. A row is a dict of fields, a str (a whole text
    file, one document) or a RecordError (a line that is not JSON, a CSV row of the wrong width)."""
    if is_hub(path):
        yield from _hub_rows(path, cache_dir)
        return
    p = local_path(path)
    if is_saved_dataset(p):
        yield from _saved_rows(p)
    elif p.is_dir():
        for f in folder_files(p):
            yield from _file_rows(f, decoding)
    else:
        yield from _file_rows(p, decoding)


def _file_rows(p: Path, decoding: Decoding) -> Iterator[tuple[str, Any]]:
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        yield from _json_rows(p, decoding)
    elif suffix == ".csv":
        yield from _csv_rows(p, decoding)
    elif suffix == ".parquet":
        yield from _parquet_rows(p)
    else:
        yield str(p), decoding.read(p)


TOO_DEEP = "JSON nested too deeply to read (Python's parser stops near 1,000 levels)"


def _json_rows(p: Path, decoding: Decoding) -> Iterator[tuple[str, Any]]:
    if p.suffix.lower() == ".json":
        text = decoding.read(p)
        if text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
            except RecursionError:
                raise DataError(f"{p}: {TOO_DEEP}") from None
            for i, row in enumerate(rows, 1):
                yield f"{p}: record {i}", row
            return
        lines: Iterator[str] = iter(text.split("\n"))
    else:
        lines = decoding.lines(p)
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            row = RecordError(f"malformed JSON: {e.msg} (column {e.colno})")
        except RecursionError:
            row = RecordError(TOO_DEEP)
        yield f"{p}:{lineno}", row


def csv_lines(p: Path, decoding: Decoding) -> Iterator[tuple[int, list[str]]]:
    """(line, cells) of every CSV row, the header first; line is where the row starts."""
    csv.field_size_limit(1 << 30)  # long texts in one cell are fine
    reader = csv.reader(decoding.lines(p))
    line = 0
    try:
        for cells in reader:
            yield line + 1, cells
            line = reader.line_num
    except csv.Error as e:
        raise DataError(f"{p}:{reader.line_num}: malformed CSV: {e}") from None


def _csv_rows(p: Path, decoding: Decoding) -> Iterator[tuple[str, Any]]:
    """CSV with a header row; every cell is text and an empty cell is a missing value."""
    rows = csv_lines(p, decoding)
    _, header = next(rows, (0, []))
    for line, cells in rows:
        if not any(cells):
            continue
        if len(cells) != len(header):
            yield f"{p}:{line}", RecordError(f"{len(cells)} fields, but the header has {len(header)}")
            continue
        yield f"{p}:{line}", {k: (v if v != "" else None) for k, v in zip(header, cells)}


def parquet_batches(p: Path) -> Iterator[Any]:
    """The record batches of a Parquet file (pyarrow), streamed."""
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(p)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{p}: not a readable Parquet file ({type(e).__name__})") from None
    yield from table.iter_batches(batch_size=ROWS_PER_BATCH)


def _parquet_rows(p: Path) -> Iterator[tuple[str, Any]]:
    i = 0
    for batch in parquet_batches(p):
        for row in batch.to_pylist():
            i += 1
            yield f"{p}: row {i}", row


def _saved_rows(p: Path) -> Iterator[tuple[str, Any]]:
    """The Arrow files of a `save_to_disk` folder (its train split for a DatasetDict), read in place."""
    import pyarrow as pa

    if (p / "dataset_dict.json").is_file():
        splits = json.loads((p / "dataset_dict.json").read_text(encoding="utf-8")).get("splits") or ["train"]
        p = p / ("train" if "train" in splits else splits[0])
    try:
        state = json.loads((p / "state.json").read_text(encoding="utf-8"))
        names = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{p}: not a folder written by datasets.save_to_disk (no readable state.json)") from None
    i = 0
    for name in names:
        with pa.memory_map(str(p / name)) as source:
            for batch in pa.ipc.open_stream(source):
                for row in batch.to_pylist():
                    i += 1
                    yield f"{p}: row {i}", row


def _hub_rows(path: str, cache_dir: Path | None) -> Iterator[tuple[str, Any]]:
    """A hub data set, named explicitly: streamed (no Arrow copy), any cache inside `cache_dir`."""
    name = path[len(HUB_PREFIX):]
    try:
        import datasets

        rows = datasets.load_dataset(name, split="train", streaming=True,
                                     cache_dir=str(cache_dir) if cache_dir else None)
        for i, row in enumerate(rows, 1):
            yield f"{path}: row {i}", row
    except Exception as e:  # datasets raises many types for unknown names and no network
        raise DataError(f"{path}: could not read it from the Hugging Face hub ({type(e).__name__}); "
                        "offline, download it once and point data.path at the files") from None
