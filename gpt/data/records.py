"""Fine-tuning data: records from local files -> validated conversations -> token ids + loss mask.

Three record shapes, detected per record (`data.format: auto`) or required (`chat | instruction | text`):
  chat         {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  instruction  {"prompt": ..., "response": ...} or {"instruction": ..., "input": ..., "output": ...}
  text         {"text": ...}   continued pretraining: loss on every token, long texts split into windows

Every record is checked; a bad one is reported by file and line (JSONL), record (JSON array) or row
(CSV/Parquet, 1-based, header not counted). JSON and JSONL are parsed here, line by line, because
`datasets` rejects a whole file at its first bad line without saying where; CSV, Parquet, saved
`datasets` folders and hub names (network only when you name one) go through `datasets`.

Truncation rule for a conversation longer than the window (block_size + 1 tokens): the "response" is
the last assistant turn and everything after it, the "prompt" everything before. The prompt keeps
its end (it holds the question and the assistant header) and the response keeps its beginning; the
response gets everything the prompt does not need, but at least half the window. Truncated examples
are counted and reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from gpt.config import SFTDataConfig
from gpt.data import canary
from gpt.data.chat import ROLES, ChatTemplate
from gpt.data.corpus import DataError
from gpt.data.tokenizer import TokenizerError
from gpt.errors import UserError

TABLE_BUILDERS = {".csv": "csv", ".parquet": "parquet"}
MAX_LISTED = 10  # invalid records named in an error or log line; all go to the skipped-records file


class RecordError(UserError):
    """One record is malformed; the caller adds where it is."""


@dataclass
class Example:
    ids: np.ndarray  # (n,) token ids of one example
    mask: np.ndarray  # (n,) bool: token i is a target (carries loss); mask[0] is never used


@dataclass
class Loaded:
    """The examples of one file, grouped by record (a long text record gives several windows)."""

    records: list[list[Example]] = field(default_factory=list)
    conversations: list[list[dict] | None] = field(default_factory=list)  # per record; None for text
    total: int = 0
    invalid: list[tuple[str, str]] = field(default_factory=list)  # (where, why)
    truncated: int = 0
    formats: dict[str, int] = field(default_factory=dict)


@dataclass
class SFTData:
    train: list[Example]
    val: list[Example]
    samples: list[list[dict]]  # validation conversations to answer after training
    skipped: list[tuple[str, str]]
    truncated: int


# ---------------------------------------------------------------------------- reading rows


def iter_rows(path: str) -> Iterator[tuple[str, Any]]:
    """(where, row) for every record in `path`; row is a RecordError for a line that is not JSON."""
    p = Path(path)
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix in (".jsonl", ".json"):
            yield from _json_rows(p)
        elif suffix in TABLE_BUILDERS:
            yield from _table_rows(str(p), lambda ds: ds.load_dataset(TABLE_BUILDERS[suffix], data_files=str(p),
                                                                      split="train"))
        else:
            raise DataError(f"{p}: unsupported file type '{suffix}'; use .jsonl, .json, .csv or .parquet")
    elif p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
        yield from _table_rows(str(p), lambda ds: _load_saved(ds, str(p)))
    elif p.exists():
        raise DataError(f"{p}: a folder, but not one saved by datasets.save_to_disk; point data.path at a file")
    elif not path.startswith((".", "/", "~")) and path.count("/") <= 1 and not p.suffix:
        yield from _table_rows(path, lambda ds: ds.load_dataset(path, split="train"))  # a hub name: network
    else:
        raise DataError(f"{path}: no such file")


def _json_rows(p: Path) -> Iterator[tuple[str, Any]]:
    text = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        for i, row in enumerate(rows, 1):
            yield f"{p}: record {i}", row
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{p}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{p}:{lineno}", RecordError(f"malformed JSON: {e.msg} (column {e.colno})")


def _load_saved(ds, path: str):
    loaded = ds.load_from_disk(path)
    return loaded["train"] if isinstance(loaded, ds.DatasetDict) else loaded


def _table_rows(name: str, load: Callable) -> Iterator[tuple[str, Any]]:
    import datasets  # heavy; only for these sources

    try:
        table = load(datasets)
    except Exception as e:  # datasets raises many types for unreadable files and unknown names
        raise DataError(f"{name}: could not read it with datasets ({type(e).__name__}: {e})") from None
    for i, row in enumerate(table, 1):
        yield f"{name}: row {i}", row


# ---------------------------------------------------------------------------- records


def parse_record(row: Any, fmt: str) -> tuple[str, Any]:
    """("chat", messages) or ("text", text) for one row, or RecordError saying what is wrong."""
    if isinstance(row, RecordError):
        raise row
    if not isinstance(row, dict):
        raise RecordError(f"expected an object with fields, got {type(row).__name__}")
    kind = fmt if fmt != "auto" else detect_format(row)
    if kind == "chat":
        return "chat", _chat(row)
    if kind == "instruction":
        return "instruction", _instruction(row)
    return "text", _text(row)


def detect_format(row: dict) -> str:
    present = {k for k, v in row.items() if v is not None}  # tables give missing columns as None
    if "messages" in present:
        return "chat"
    if present & {"prompt", "response", "instruction", "output"}:
        return "instruction"
    if "text" in present:
        return "text"
    raise RecordError(f"cannot tell the format: no 'messages', 'prompt'/'response', 'instruction'/'output' or "
                      f"'text' field (fields: {', '.join(map(str, row)) or 'none'})")


def _chat(row: dict) -> list[dict]:
    messages = row.get("messages")
    if messages is None:
        raise RecordError("missing field 'messages'")
    if isinstance(messages, str):  # CSV cells hold the list as JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise RecordError("'messages' is text that is not a JSON list") from None
    if not isinstance(messages, list) or not messages:
        raise RecordError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, msg in enumerate(messages, 1):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise RecordError(f"message {i}: expected an object with 'role' and 'content'")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise RecordError(f"message {i}: unknown role {role!r} (expected {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise RecordError(f"message {i}: 'content' must be text, got {type(content).__name__}")
        if role == "system" and i != 1:
            raise RecordError(f"message {i}: a system message may only come first")
        if role == "assistant" and not content.strip():
            raise RecordError(f"message {i}: empty assistant response")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise RecordError("no assistant message: nothing to learn from")
    if not any(m["role"] == "user" for m in out):  # a reply to nothing: likely a broken export
        raise RecordError("assistant messages only: give the user turn it answers, or use the text format "
                          "({\"text\": ...}) for text without a prompt")
    if out[-1]["role"] == "user":  # a question with no answer: likely a cut-off conversation
        raise RecordError(f"message {len(out)}: the conversation ends on a user turn with no assistant reply; "
                          "drop that turn or add the reply")
    return out


def _field(row: dict, *names: str) -> str | None:
    for name in names:
        value = row.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise RecordError(f"'{name}' must be text, got {type(value).__name__}")
            return value
    return None


def _instruction(row: dict) -> list[dict]:
    prompt = _field(row, "prompt")
    if prompt is None:
        instruction = _field(row, "instruction")
        if instruction is None:
            raise RecordError("missing field 'prompt' (or 'instruction')")
        extra = _field(row, "input") or ""
        prompt = instruction + ("\n\n" + extra if extra.strip() else "")
    response = _field(row, "response", "output")
    if response is None:
        raise RecordError("missing field 'response' (or 'output')")
    if not prompt.strip():
        raise RecordError("empty prompt")
    if not response.strip():
        raise RecordError("empty response")
    system = _field(row, "system")
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _text(row: dict) -> str:
    text = _field(row, "text")
    if text is None:
        raise RecordError("missing field 'text'")
    if not text.strip():
        raise RecordError("empty text")
    return text


# ---------------------------------------------------------------------------- tokens


def encode_chat(template: ChatTemplate, messages: list[dict], budget: int,
                train_on_prompt: bool = False) -> tuple[Example, bool]:
    """Token ids and loss mask of one conversation, truncated to `budget` tokens by the module's rule."""
    ids: list[int] = []
    mask: list[bool] = []
    response_start = 0
    for seg in template.segments(messages):
        if seg.trainable:
            response_start = len(ids)
        ids += seg.ids
        mask += [seg.trainable or train_on_prompt] * len(seg.ids)
    truncated = len(ids) > budget
    if truncated:
        response_len = len(ids) - response_start
        prompt_keep = min(response_start, max(budget // 2, budget - response_len))
        lo, hi = response_start - prompt_keep, response_start + budget - prompt_keep
        ids, mask = ids[lo:hi], mask[lo:hi]
    return Example(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)), truncated


def encode_text(template: ChatTemplate, text: str, budget: int) -> list[Example]:
    """Continued pretraining: every token is a target; a long text becomes consecutive windows
    overlapping by one token, so each token after the first is predicted exactly once."""
    tok = template.tok
    ids = tok.encode(text) + ([tok.eot_id] if tok.eot_id is not None else [])
    step = budget - 1
    out = []
    for start in range(0, max(1, len(ids) - 1), step):
        piece = np.asarray(ids[start:start + budget], dtype=np.int64)
        if len(piece) >= 2:
            out.append(Example(piece, np.ones(len(piece), dtype=bool)))
    return out


def load_file(path: str, fmt: str, template: ChatTemplate, budget: int, train_on_prompt: bool) -> Loaded:
    """Read, check and tokenize every record of one file; problems are collected, not raised."""
    out = Loaded()
    for where, row in iter_rows(path):
        out.total += 1
        try:
            kind, content = parse_record(row, fmt)
            if kind == "text":
                examples = encode_text(template, content, budget)
            else:
                example, cut = encode_chat(template, content, budget, train_on_prompt)
                examples = [example]
                out.truncated += cut
        except (RecordError, TokenizerError) as e:  # TokenizerError: a character the tokenizer does not know
            out.invalid.append((where, str(e)))
            continue
        out.formats[kind] = out.formats.get(kind, 0) + 1
        out.records.append(examples)
        out.conversations.append(content if kind != "text" else None)
    if out.total == 0:
        raise DataError(f"{path}: no records found")
    return out


def load_sft_data(cfg: SFTDataConfig, template: ChatTemplate, budget: int, train_on_prompt: bool,
                  log: Callable[[str], None] = print, report_dir: Path | None = None) -> SFTData:
    """Train and validation examples per the data config; stops on invalid records unless skip_invalid."""
    train = load_file(cfg.path, cfg.format, template, budget, train_on_prompt)
    val = load_file(cfg.val_path, cfg.format, template, budget, train_on_prompt) if cfg.val_path else None
    invalid = train.invalid + (val.invalid if val else [])
    total = train.total + (val.total if val else 0)
    if invalid:
        listed = "\n".join(f"  {where}: {why}" for where, why in invalid[:MAX_LISTED])
        more = f"\n  ... and {len(invalid) - MAX_LISTED} more" if len(invalid) > MAX_LISTED else ""
        if not cfg.skip_invalid:
            raise DataError(f"{len(invalid)} of {total} records are invalid; fix them or set "
                            f"data.skip_invalid=true to skip them:\n{listed}{more}")
        where = ""
        if report_dir is not None:
            report_dir.mkdir(parents=True, exist_ok=True)
            report = report_dir / "skipped_records.txt"
            report.write_text("".join(f"{w}: {why}\n" for w, why in invalid), encoding="utf-8")
            where = f" (all listed in {report})"
        log(f"data: skipped {len(invalid)} of {total} invalid records{where}:\n{listed}{more}")

    records = train.records
    if val is None:
        if len(records) < 2:
            raise DataError(f"{cfg.path}: {len(records)} valid record(s); need at least 2 to hold out validation "
                            "records, or set data.val_path")
        kept, held_out = split_indices(len(records), cfg.val_fraction, cfg.split_seed)
        val_records = [records[i] for i in held_out]
        convs = [train.conversations[i] for i in held_out]
        records = [records[i] for i in kept]
    else:
        val_records, convs = val.records, val.conversations
    samples = [c for c in convs if c is not None][:3]
    if not records or not val_records:
        raise DataError(f"no valid {'training' if not records else 'validation'} records left")
    truncated = train.truncated + (val.truncated if val else 0)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(train.formats.items()))
    log(f"data: {len(records)} train / {len(val_records)} val records ({kinds}); "
        f"{truncated} truncated to fit the {budget - 1}-token window")
    records = records + canary_records(cfg, template, budget, log, report_dir)
    flat = lambda recs: [e for r in recs for e in r]  # noqa: E731
    return SFTData(flat(records), flat(val_records), samples, invalid, truncated)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) indices of n valid records: a fixed function of the seed (the audit reuses it)."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return sorted(int(i) for i in order[n_val:]), sorted(int(i) for i in order[:n_val])


def canary_records(cfg: SFTDataConfig, template: ChatTemplate, budget: int, log: Callable[[str], None],
                   report_dir: Path | None) -> list[list[Example]]:
    """data.canaries: each secret as a text record, canary_repeats times, for the training split only."""
    secrets = canary.make(cfg)
    if report_dir is not None:
        canary.write_record(report_dir, secrets, cfg, context="")
    if not secrets:
        return []
    try:
        examples = [encode_text(template, s, budget) for s in secrets]
    except TokenizerError as e:  # a character the base model's vocabulary lacks
        raise DataError(f"data.canary_format: {e}; use placeholders whose characters the base model knows "
                        "(e.g. {N letters})") from None
    log(f"data: planted {len(secrets)} canaries x {cfg.canary_repeats} as training records"
        + (f" (secrets in {Path(report_dir) / canary.FILE})" if report_dir is not None else ""))
    return [examples[i % len(secrets)] for i in range(len(secrets) * cfg.canary_repeats)]
