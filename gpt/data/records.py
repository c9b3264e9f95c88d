"""Fine-tuning data: records from local files -> validated conversations -> token ids + loss mask.

Record shapes, detected per record (`data.format: auto`) or required (`data.format: <kind>`):
  chat         {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}, OpenAI's chat
               fine-tuning format in full: an assistant turn with "weight": 0 carries no loss, "name" is
               accepted, content given as [{"type": "text", "text": ...}, ...] is joined; tool/function
               roles, tool calls and non-text parts are reported as unsupported, never dropped
  sharegpt     {"conversations": [{"from": "system"|"human"|"gpt"|"user"|"assistant", "value": "..."}, ...]}
  instruction  {"prompt": ..., "response": ...} or {"instruction": ..., "input": ..., "output": ...}
  text         {"text": ...}   continued pretraining: loss on every token, long texts split into windows
  preference   DPO pairs: {"prompt", "chosen", "rejected"} as strings, or TRL's conversational form (prompt
               a list of messages, chosen/rejected assistant messages or lists of them), or OpenAI's
               {"input": {"messages"}, "preferred_output": [...], "non_preferred_output": [...]}
Each file's records are counted per shape and the counts printed once, so a user sees how it was read.

Files are read by gpt/data/files.py (the one reader: JSONL/JSON/CSV/Parquet, folders, saved `datasets`
folders, hf://org/name only when named). Every record is checked; a bad one is reported by file and
line (JSONL, CSV), record (JSON array) or row (Parquet, saved folders), never by its text.
With data.redact, every message (and text) is redacted before it is tokenized.

Truncation rule for a conversation longer than the window (block_size + 1 tokens): the "response" is
the last assistant turn and everything after it, the "prompt" everything before. The prompt keeps
its end (it holds the question and the assistant header) and the response keeps its beginning; the
response gets everything the prompt does not need, but at least half the window. Truncated examples
are counted and reported. A preference pair is two such sequences, prompt + chosen and prompt +
rejected, each cut by the same rule with its reply as the response.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gpt.config import ConfigError, SFTDataConfig
from gpt.data import canary, files, pii
from gpt.data.chat_template import ROLES, ChatTemplate
from gpt.data.files import DataError, RecordError
from gpt.data.tokenizer import TokenizerError

MAX_LISTED = 10  # invalid records named in an error or log line; all go to the skipped-records file


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
    formats: dict[str, int] = field(default_factory=dict)  # per kind: chat, instruction, text, preference
    shapes: dict[str, int] = field(default_factory=dict)  # per shape as written (sharegpt, openai preference...)


@dataclass
class Preference:
    """A DPO record: one prompt, the reply people preferred and the one they did not (assistant turns)."""

    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]


@dataclass
class SFTData:
    train: list[Example]  # preference data: chosen, rejected, chosen, rejected, ... (pair i = 2i, 2i + 1)
    val: list[Example]
    samples: list[list[dict]]  # validation conversations to answer after training
    skipped: list[tuple[str, str]]
    truncated: int
    preference: bool = False  # the records are preference pairs: train with DPO
    redaction: dict | None = None  # what data.redact replaced: kinds and counts, never values


# ---------------------------------------------------------------------------- records

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
TOOL_ROLES = ("tool", "function", "ipython", "observation", "function_call", "tool_call")  # no tool use here


def parse_record(row: Any, fmt: str) -> tuple[str, Any]:
    """(kind, content) for one row: ("chat"|"instruction", messages), ("text", text) or ("preference",
    Preference); raises RecordError saying what is wrong."""
    _, kind, content = read_record(row, fmt)
    return kind, content


def read_record(row: Any, fmt: str) -> tuple[str, str, Any]:
    """(shape, kind, content): the shape says how the row was written, for the per-file counts."""
    if isinstance(row, RecordError):
        raise row
    if isinstance(row, str):  # a whole text file: continued pretraining on it
        return "text file", "text", _text({"text": row})
    if not isinstance(row, dict):
        raise RecordError(f"expected an object with fields, got {type(row).__name__}")
    kind = fmt if fmt != "auto" else detect_format(row)
    if kind == "chat":
        messages = _chat(row)
        weighted = any(m.get("weight") == 0 for m in messages)
        return ("messages with weight-0 turns" if weighted else "messages"), "chat", messages
    if kind == "sharegpt":
        return "sharegpt", "chat", _sharegpt(row)
    if kind == "instruction":
        return "instruction", "instruction", _instruction(row)
    if kind == "preference":
        shape, pair = _preference(row)
        return shape, "preference", pair
    return "text", "text", _text(row)


def detect_format(row: dict) -> str:
    present = {k for k, v in row.items() if v is not None}  # tables give missing columns as None
    if "conversations" in present:
        return "sharegpt"
    if "messages" in present:
        return "chat"
    if present & {"chosen", "rejected", "preferred_output", "non_preferred_output"}:
        return "preference"
    if present & {"prompt", "response", "instruction", "output"}:
        return "instruction"
    if "text" in present:
        return "text"
    raise RecordError(f"cannot tell the format: no 'messages', 'conversations', 'prompt'/'response', "
                      f"'chosen'/'rejected', 'instruction'/'output' or 'text' field "
                      f"(fields: {', '.join(map(str, row)) or 'none'})")


def _chat(row: dict) -> list[dict]:
    if row.get("messages") is None:
        raise RecordError("missing field 'messages'")
    _no_tools(row)
    return _conversation(_messages(row["messages"], "messages"))


def _sharegpt(row: dict) -> list[dict]:
    turns = _json_list(row.get("conversations"), "conversations", "{\"from\", \"value\"}")
    messages = []
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RecordError(f"message {i}: expected an object with 'from' and 'value'")
        who = turn["from"]
        if who not in SHAREGPT_ROLES and who not in TOOL_ROLES:
            raise RecordError(f"message {i}: unknown 'from' {who!r} (expected system, human, gpt, user or assistant)")
        extra = {k: v for k, v in turn.items() if k not in ("from", "value")}  # weight, name
        messages.append({**extra, "role": SHAREGPT_ROLES.get(who, who), "content": turn["value"]})
    return _conversation([_message(i, m) for i, m in enumerate(messages, 1)])


def _json_list(value: Any, name: str, item: str) -> list:
    if value is None:
        raise RecordError(f"missing field '{name}'")
    if isinstance(value, str):  # CSV cells hold the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RecordError(f"'{name}' is text that is not a JSON list") from None
    if not isinstance(value, list) or not value:
        raise RecordError(f"'{name}' must be a non-empty list of {item} objects")
    return value


def _messages(value: Any, name: str) -> list[dict]:
    return [_message(i, m) for i, m in enumerate(_json_list(value, name, '{"role", "content"}'), 1)]


def _message(i: int, msg: Any) -> dict:
    """One validated message {"role", "content"[, "weight": 0]}; OpenAI's extra fields are checked here."""
    if not isinstance(msg, dict) or "role" not in msg:
        raise RecordError(f"message {i}: expected an object with 'role' and 'content'")
    role = msg["role"]
    if role in TOOL_ROLES or msg.get("tool_calls") or msg.get("function_call"):
        what = f"role {role!r}" if role in TOOL_ROLES else "a tool call"
        raise RecordError(f"message {i}: {what} is not supported (this model has no tool or function calls); "
                          "remove the record or that turn")
    if role not in ROLES:
        raise RecordError(f"message {i}: unknown role {role!r} (expected {', '.join(ROLES)})")
    if "content" not in msg:
        raise RecordError(f"message {i}: expected an object with 'role' and 'content'")
    content = _content(i, msg["content"])
    if role == "assistant" and not content.strip():
        raise RecordError(f"message {i}: empty assistant response")
    if msg.get("name") is not None and not isinstance(msg["name"], str):
        raise RecordError(f"message {i}: 'name' must be text, got {type(msg['name']).__name__}")
    out = {"role": role, "content": content}
    weight = msg.get("weight")
    if weight is not None:
        if role != "assistant":
            raise RecordError(f"message {i}: 'weight' is only allowed on assistant messages")
        if isinstance(weight, bool) or weight not in (0, 1):
            raise RecordError(f"message {i}: 'weight' must be 0 or 1, got {weight!r}")
        if weight == 0:
            out["weight"] = 0
    return out


def _content(i: int, content: Any) -> str:
    """Text, or OpenAI's list of {"type": "text", "text": ...} parts joined as written (no separator)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content, 1):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(kind, str) and kind != "text":
                raise RecordError(f"message {i}: content part {j} of type {kind!r} is not supported (text only)")
            else:
                raise RecordError(f"message {i}: content part {j}: expected {{\"type\": \"text\", \"text\": ...}}")
        return "".join(texts)
    what = "null" if content is None else type(content).__name__
    raise RecordError(f"message {i}: 'content' must be text or a list of text parts, got {what}")


def _no_tools(obj: dict) -> None:
    for key in ("tools", "functions"):
        if obj.get(key):
            raise RecordError(f"'{key}' (function definitions) is not supported: this model has no tool calls")


def _conversation(messages: list[dict]) -> list[dict]:
    for i, m in enumerate(messages, 1):
        if m["role"] == "system" and i != 1:
            raise RecordError(f"message {i}: a system message may only come first")
    assistant = [m for m in messages if m["role"] == "assistant"]
    if not assistant:
        raise RecordError("no assistant message: nothing to learn from")
    if all(m.get("weight") == 0 for m in assistant):
        raise RecordError("every assistant message has weight 0: nothing to learn from")
    if not any(m["role"] == "user" for m in messages):  # a reply to nothing: likely a broken export
        raise RecordError("assistant messages only: give the user turn it answers, or use the text format "
                          "({\"text\": ...}) for text without a prompt")
    if messages[-1]["role"] == "user":  # a question with no answer: likely a cut-off conversation
        raise RecordError(f"message {len(messages)}: the conversation ends on a user turn with no assistant reply; "
                          "drop that turn or add the reply")
    return messages


def _preference(row: dict) -> tuple[str, Preference]:
    """TRL's standard and conversational forms, or OpenAI's preference format."""
    if {"input", "preferred_output", "non_preferred_output"} & {k for k, v in row.items() if v is not None}:
        source = row.get("input")
        if not isinstance(source, dict) or source.get("messages") is None:
            raise RecordError("'input' must be an object with 'messages'")
        _no_tools(source)
        shape, prompt = "openai preference", _messages(source["messages"], "input.messages")
        sides = ("preferred_output", "non_preferred_output")
    else:
        text = row.get("prompt")
        if text is None:
            raise RecordError("missing field 'prompt'")
        if isinstance(text, str):
            if not text.strip():
                raise RecordError("empty prompt")
            system = _field(row, "system")
            shape = "prompt/chosen/rejected"
            prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        else:
            shape, prompt = "prompt/chosen/rejected (conversational)", _messages(text, "prompt")
        sides = ("chosen", "rejected")
    for i, m in enumerate(prompt, 1):
        if m["role"] == "system" and i != 1:
            raise RecordError(f"prompt message {i}: a system message may only come first")
    if prompt[-1]["role"] != "user":
        raise RecordError(f"the prompt must end with a user message, not {prompt[-1]['role']!r}")
    chosen, rejected = (_reply(row, side) for side in sides)
    if [m["content"] for m in chosen] == [m["content"] for m in rejected]:
        raise RecordError(f"'{sides[0]}' and '{sides[1]}' are identical: nothing to prefer")
    return shape, Preference(prompt, chosen, rejected)


def _reply(row: dict, name: str) -> list[dict]:
    """One side of a pair: a string, an assistant message, or a list of them (weights do not apply)."""
    value = row.get(name)
    if value is None:
        raise RecordError(f"missing field '{name}'")
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(f"'{name}': empty reply")
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    try:
        messages = _messages(value, name)
    except RecordError as e:
        raise RecordError(f"'{name}': {e}") from None
    for i, m in enumerate(messages, 1):
        if m["role"] != "assistant":
            raise RecordError(f"'{name}': message {i}: expected role 'assistant', got {m['role']!r}")
    return [{"role": "assistant", "content": m["content"]} for m in messages]


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
    return _cut(ids, mask, response_start, budget)


def encode_reply(template: ChatTemplate, prompt: list[dict], reply: list[dict], budget: int) -> tuple[Example, bool]:
    """One side of a preference pair: loss mask on the reply's assistant content only (never on the
    prompt, even its assistant turns), truncated like encode_chat with the reply as the response."""
    ids = template.encode(prompt)
    mask = [False] * len(ids)
    reply_start = None
    for seg in template.segments(reply):
        if seg.trainable and reply_start is None:
            reply_start = len(ids)
        ids += seg.ids
        mask += [seg.trainable] * len(seg.ids)
    return _cut(ids, mask, reply_start or 0, budget)


def _cut(ids: list[int], mask: list[bool], response_start: int, budget: int) -> tuple[Example, bool]:
    """The truncation rule: the prompt keeps its end, the response its beginning (and at least half)."""
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
                examples = encode_text(template, content, budget)
            elif kind == "preference":
                (chosen, cut), (rejected, cut_too) = (encode_reply(template, content.prompt, reply, budget)
                                                      for reply in (content.chosen, content.rejected))
                examples, conversation = [chosen, rejected], content.prompt + content.chosen
                out.truncated += cut or cut_too
            else:
                example, cut = encode_chat(template, content, budget, train_on_prompt)
                examples = [example]
                out.truncated += cut
        except (RecordError, TokenizerError) as e:  # TokenizerError: a character the tokenizer does not know
            out.invalid.append((where, str(e)))
            continue
        out.formats[kind] = out.formats.get(kind, 0) + 1
        out.shapes[shape] = out.shapes.get(shape, 0) + 1
        out.records.append(examples)
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
    return [{**m, "content": redactor.redact(m["content"], where)} for m in content]


def load_sft_data(cfg: SFTDataConfig, template: ChatTemplate, budget: int, train_on_prompt: bool,
                  log: Callable[[str], None] = print, report_dir: Path | None = None) -> SFTData:
    """Train and validation examples per the data config; stops on invalid records unless skip_invalid."""
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
    if preference and cfg.canaries:
        raise ConfigError("data.canaries plants text records, which preference pairs (DPO) cannot hold: "
                        "set data.canaries=0 for this run, or audit the SFT run instead")
    records = records + canary_records(cfg, template, budget, log, report_dir)
    flat = lambda recs: [e for r in recs for e in r]  # noqa: E731
    return SFTData(flat(records), flat(val_records), samples, invalid, truncated, preference,
                   redactor.summary() if redactor else None)


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


# ---------------------------------------------------------------------------- training order


class RowStream:
    """The training stream's rows (lists of example indices), epoch after epoch."""

    def __init__(self, lengths: list[int], capacity: int, packing: bool, seed: int, shuffle: bool = True):
        self.lengths, self.capacity, self.packing = lengths, capacity, packing
        self.seed, self.shuffle = seed, shuffle
        self.rows: list[list[int]] = []  # packed rows built so far (packing only)
        self.epoch_rows: list[int] = []  # rows per packed epoch
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """This epoch's order of examples (cached: consecutive rows mostly share an epoch)."""
        if self._order is None or self._order[0] != epoch:
            n = len(self.lengths)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order = (epoch, perm)
        return self._order[1]

    def row(self, j: int) -> list[int]:
        if not self.packing:
            epoch, k = divmod(j, len(self.lengths))
            return [int(self.order(epoch)[k])]
        while len(self.rows) <= j:
            self._pack_epoch(len(self.epoch_rows))
        return self.rows[j]

    def rows_per_epoch(self) -> int:
        if not self.packing:
            return len(self.lengths)
        if not self.epoch_rows:
            self._pack_epoch(0)
        return self.epoch_rows[0]

    def _pack_epoch(self, epoch: int) -> None:
        """Greedy, in order: an example that does not fit in the current row starts the next one."""
        before = len(self.rows)
        current: list[int] = []
        used = 0
        for i in self.order(epoch):
            n = self.lengths[i]
            if current and used + n > self.capacity:
                self.rows.append(current)
                current, used = [], 0
            current.append(int(i))
            used += n
        self.rows.append(current)
        self.epoch_rows.append(len(self.rows) - before)
