"""Fine-tuning data: data files -> checked, redacted, tokenized examples, split and reported.

Files are read by gpt/data/files.py (the one reader: JSONL/JSON/CSV/Parquet, folders, saved `datasets`
folders, hf://org/name only when named), each row by gpt/data/record_formats.py and encoded by
gpt/data/examples.py. Every record is checked; a bad one is reported by file and line (JSONL, CSV),
record (JSON array) or row (Parquet, saved folders), never by its text. Each file's records are
counted per shape and the counts printed once, so a user sees how it was read. With data.redact,
every message (and text) is redacted before it is tokenized. Truncated examples are counted and
reported. Preference records become `Pair`s, kept apart from SFT examples (DPO trains on pairs only);
a pair whose two sides are the same tokens once truncated is an invalid record (refused with the
count, or skipped and counted with data.skip_invalid), never a pair trained at a constant loss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gpt.config import ConfigError, SFTDataConfig
from gpt.data import canary, files, pii
from gpt.data.chat_template import ChatTemplate
from gpt.data.examples import Example, Pair, encode_chat, encode_pair, encode_text
from gpt.data.files import DataError, RecordError
from gpt.data.messages import Conversation, tools_of
from gpt.data.record_formats import Preference, read_record
from gpt.data.tokenizer import TokenizerError

MAX_LISTED = 10  # invalid records named in an error or log line; all go to the skipped-records file


@dataclass
class Loaded:
    """The examples of one file, grouped by record (a long text record gives several windows, a
    preference record one Pair)."""

    records: list[list[Example] | Pair] = field(default_factory=list)
    conversations: list[list[dict] | None] = field(default_factory=list)  # per record; None for text
    total: int = 0
    invalid: list[tuple[str, str]] = field(default_factory=list)  # (where, why)
    truncated: int = 0
    formats: dict[str, int] = field(default_factory=dict)  # per kind: chat, instruction, text, preference
    shapes: dict[str, int] = field(default_factory=dict)  # per shape as written (sharegpt, openai preference...)


@dataclass
class SFTData:
    """The examples of an SFT run, or the pairs of a DPO run (the other two lists are then empty)."""

    train: list[Example]
    val: list[Example]
    train_pairs: list[Pair]
    val_pairs: list[Pair]
    samples: list[list[dict]]  # validation conversations to answer after training
    skipped: list[tuple[str, str]]
    truncated: int
    redaction: dict | None = None  # what data.redact replaced: kinds and counts, never values

    @property
    def preference(self) -> bool:
        """The records are preference pairs: train with DPO."""
        return bool(self.train_pairs)


# ---------------------------------------------------------------------------- one file


def load_file(path: str, fmt: str, template: ChatTemplate, budget: int, train_on_prompt: bool,
              decoding: files.Decoding | None = None, redactor: pii.Redactor | None = None,
              cache_dir: Path | None = None) -> Loaded:
    """Read, check, redact and tokenize every record of one data path; problems are collected, not raised."""
    out = Loaded()
    for where, row in files.iter_rows(path, decoding or files.Decoding(), cache_dir):
        out.total += 1
        try:
            shape, kind, content = read_record(row, fmt)
            if redactor is not None:
                content = redact_content(content, redactor, files.file_of(where))
            conversation = content if kind != "text" else None
            if kind == "text":
                record = encode_text(template, content, budget)
            elif kind == "preference":
                record, cut = encode_pair(template, content.prompt, content.chosen, content.rejected, budget)
                if record.identical():
                    raise RecordError(f"'chosen' and 'rejected' are identical once cut to the {budget - 1}-token "
                                      "window: nothing to prefer; a larger model.block_size keeps them apart")
                conversation = content.prompt + content.chosen
                out.truncated += cut
            else:
                example, cut = encode_chat(template, content, budget, train_on_prompt)
                record = [example]
                out.truncated += cut
        except (RecordError, TokenizerError) as e:  # TokenizerError: a character the tokenizer does not know
            out.invalid.append((where, str(e)))
            continue
        out.formats[kind] = out.formats.get(kind, 0) + 1
        out.shapes[shape] = out.shapes.get(shape, 0) + 1
        out.records.append(record)
        out.conversations.append(conversation)
    if out.total == 0:
        raise DataError(f"{path}: no records found")
    return out


def redact_content(content: Any, redactor: pii.Redactor, where: str) -> Any:
    """A text, a conversation's message contents or a preference pair's, with the configured kinds replaced."""
    if isinstance(content, str):
        return redactor.redact(content, where)
    if isinstance(content, Preference):
        return Preference(*(redact_content(part, redactor, where)
                            for part in (content.prompt, content.chosen, content.rejected)))
    messages = [_redact_message(m, redactor, where) for m in content]
    return Conversation(messages, tools_of(content)) if isinstance(content, Conversation) else messages


def _redact_message(m: dict, redactor: pii.Redactor, where: str) -> dict:
    """A message's content and the text values in its calls' arguments, redacted (tool definitions are not data)."""
    out = {**m, "content": redactor.redact(m["content"], where)}
    if m.get("tool_calls"):
        out["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _redact_value(c["function"]["arguments"],
                                                                                           redactor, where)}}
                             for c in m["tool_calls"]]
    return out


def _redact_value(value: Any, redactor: pii.Redactor, where: str) -> Any:
    if isinstance(value, str):
        return redactor.redact(value, where)
    if isinstance(value, dict):
        return {k: _redact_value(v, redactor, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_value(v, redactor, where) for v in value]
    return value


# ---------------------------------------------------------------------------- a run's data


def load_sft_data(cfg: SFTDataConfig, template: ChatTemplate, budget: int, train_on_prompt: bool,
                  log: Callable[[str], None] = print, report_dir: Path | None = None) -> SFTData:
    """Train and validation examples per the data config; stops on invalid records unless skip_invalid."""
    train, val, redactor = _read_files(cfg, template, budget, train_on_prompt, log, report_dir)
    preference = _log_shapes(cfg, train, val, log)
    invalid = _skip_invalid(cfg, train, val, log, report_dir)
    records, val_records, samples = _split(cfg, train, val)
    truncated = train.truncated + (val.truncated if val else 0)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(train.formats.items()))
    log(f"data: {len(records)} train / {len(val_records)} val records ({kinds}); "
        f"{truncated} truncated to fit the {budget - 1}-token window")
    if preference and cfg.canaries:
        raise ConfigError("data.canaries plants text records, which preference pairs (DPO) cannot hold: "
                        "set data.canaries=0 for this run, or audit the SFT run instead")
    records = records + canary_records(cfg, template, budget, log, report_dir)
    redaction = redactor.summary() if redactor else None
    if preference:
        return SFTData([], [], records, val_records, samples, invalid, truncated, redaction)
    flat = lambda recs: [e for r in recs for e in r]  # noqa: E731
    return SFTData(flat(records), flat(val_records), [], [], samples, invalid, truncated, redaction)


def _read_files(cfg: SFTDataConfig, template: ChatTemplate, budget: int, train_on_prompt: bool,
                log: Callable[[str], None], report_dir: Path | None) -> tuple[Loaded, Loaded | None, pii.Redactor | None]:
    """data.path and data.val_path read; the decoding and redaction reported (redaction_report.json)."""
    decoding = files.Decoding(cfg.encoding, cfg.encoding_errors)
    redactor = pii.from_config(cfg)
    read = dict(decoding=decoding, redactor=redactor, cache_dir=report_dir / "hf_cache" if report_dir else None)
    train = load_file(cfg.path, cfg.format, template, budget, train_on_prompt, **read)
    val = load_file(cfg.val_path, cfg.format, template, budget, train_on_prompt, **read) if cfg.val_path else None
    if decoding.report():
        log(decoding.report())
    if redactor is not None:
        log(redactor.log_line())
        if report_dir is not None:
            report_dir.mkdir(parents=True, exist_ok=True)
            (report_dir / "redaction_report.json").write_text(json.dumps(redactor.report(), indent=1),
                                                              encoding="utf-8")
    return train, val, redactor


def _log_shapes(cfg: SFTDataConfig, train: Loaded, val: Loaded | None, log: Callable[[str], None]) -> bool:
    """One line per file saying how its records were read; True for preference pairs (never mixed)."""
    kinds: set[str] = set()
    for path, loaded in ((cfg.path, train), (cfg.val_path, val)):
        if loaded is not None:
            shapes = ", ".join(f"{n} {shape}" for shape, n in sorted(loaded.shapes.items(), key=lambda kv: -kv[1]))
            log(f"data: {path}: read as {shapes or 'nothing valid'}")
            kinds |= set(loaded.formats)
    preference = "preference" in kinds
    if preference and len(kinds) > 1:
        raise DataError(f"{cfg.path}{' and ' + cfg.val_path if cfg.val_path else ''}: preference pairs mixed with "
                        f"SFT records ({', '.join(sorted(kinds))}); DPO trains on pairs only: use separate files")
    return preference


def _skip_invalid(cfg: SFTDataConfig, train: Loaded, val: Loaded | None, log: Callable[[str], None],
                  report_dir: Path | None) -> list[tuple[str, str]]:
    """The invalid records: an error naming them, or with data.skip_invalid a log line and skipped_records.txt."""
    invalid = train.invalid + (val.invalid if val else [])
    total = train.total + (val.total if val else 0)
    if not invalid:
        return invalid
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
    return invalid


def _split(cfg: SFTDataConfig, train: Loaded, val: Loaded | None) -> tuple[list, list, list[list[dict]]]:
    """(training records, validation records, up to 3 validation conversations to answer after training):
    data.val_path's records, or data.val_fraction of data.path's held out by data.split_seed."""
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
    return records, val_records, samples


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
