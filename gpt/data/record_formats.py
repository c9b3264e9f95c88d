"""Fine-tuning record shapes: one row of a data file -> a validated conversation, text or preference.

Shapes, detected per record (`data.format: auto`) or required (`data.format: <kind>`):
  chat         {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...], "tools": [...]},
               OpenAI's chat fine-tuning format in full (the message and tool rules of gpt/data/messages.py: an
               assistant turn with "weight": 0 carries no loss, "name" is accepted, text content parts are
               joined, "developer" is read as system, assistant "tool_calls" and "tool" turns answering them,
               the record's "tools" (a list, or JSON text of one in a CSV cell); legacy "functions" and
               "function_call", other tool roles and non-text parts are reported as unsupported, never dropped).
               The messages come back as a Conversation carrying the tools.
  sharegpt     {"conversations": [{"from": "system"|"human"|"gpt"|"user"|"assistant", "value": "..."}, ...]}
  instruction  {"prompt": ..., "response": ...} or {"instruction": ..., "input": ..., "output": ...}
  text         {"text": ...}   continued pretraining: loss on every token, long texts split into windows
  preference   DPO pairs: {"prompt", "chosen", "rejected"} as strings, or TRL's conversational form (prompt
               a list of messages, chosen/rejected assistant messages or lists of them), or OpenAI's
               {"input": {"messages"}, "preferred_output": [...], "non_preferred_output": [...]}
A bad record raises RecordError saying what is wrong, never quoting its text; the caller adds where.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gpt.data.files import RecordError
from gpt.data.messages import TOOL_ROLES, Conversation, read_messages, read_tools

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Preference:
    """A DPO record: one prompt, the reply people preferred and the one they did not (assistant turns)."""

    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]


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


def _chat(row: dict) -> Conversation:
    if row.get("messages") is None:
        raise RecordError("missing field 'messages'")
    if row.get("functions"):
        raise RecordError("'functions' (OpenAI's legacy function definitions) is not supported: use 'tools'")
    tools = read_tools(_json_text(row["tools"], "tools") if row.get("tools") is not None else None)
    messages = read_messages(_json_text(row["messages"], "messages"), "messages", tools=tools)
    return Conversation(_conversation(messages), tools)


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
    return _conversation(read_messages(messages, "conversations"))


def _json_list(value: Any, name: str, item: str) -> list:
    value = _json_text(value, name)
    if not isinstance(value, list) or not value:
        raise RecordError(f"'{name}' must be a non-empty list of {item} objects")
    return value


def _json_text(value: Any, name: str) -> Any:
    """A field's value; text is read as JSON (CSV cells hold lists as JSON text)."""
    if value is None:
        raise RecordError(f"missing field '{name}'")
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise RecordError(f"'{name}' is text that is not a JSON list") from None
    return value


def _messages(value: Any, name: str) -> list[dict]:
    """A record's messages (a list, or JSON text of one in a CSV cell), by the rules of gpt/data/messages.py."""
    return read_messages(_json_text(value, name), name)


def _no_tools(obj: dict) -> None:
    for key in ("tools", "functions"):
        if obj.get(key):
            raise RecordError(f"'{key}' (function definitions) is not supported in preference records")


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
        _no_tools(source)  # preference pairs with tools: not yet
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
        if m.get("tool_calls"):
            raise RecordError(f"'{name}': message {i}: tool calls in preference replies are not supported")
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
