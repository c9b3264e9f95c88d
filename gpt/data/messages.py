"""OpenAI chat messages, checked by one set of rules for fine-tuning records and the server alike.

A message is {"role", "content"} with OpenAI's optional fields:
  role     system, user or assistant; developer (OpenAI's newer name for system) is read as system.
           Tool and function roles, tool calls and function calls are refused: this model has no tools.
  content  text, or OpenAI's list of {"type": "text", "text": ...} parts, joined as written (no
           separator); other part types (images, audio) are refused.
  name     accepted when it is text (not rendered).
  weight   0 or 1, on assistant messages only (OpenAI's fine-tuning format): 0 = context, no loss.
One rule depends on the context: a record's assistant turn is a reply to learn from, so it must
hold text; a request's assistant turns are context and may be empty or null (`empty_replies`).

A bad message raises MessageError naming the message (0-based index), the field and why; its text
is the records' form ("message 3: ..."), and the server turns the same parts into OpenAI's `param`.
"""

from __future__ import annotations

from typing import Any

from gpt.data.chat_template import ROLES
from gpt.data.files import RecordError

TOOL_ROLES = ("tool", "function", "ipython", "observation", "function_call", "tool_call")  # no tool use here
DEVELOPER = "developer"  # read as system


class MessageError(RecordError):
    """One message is malformed: `index` (0-based), `field` (role, content, name, weight or tool_calls) and `why`."""

    def __init__(self, index: int, field: str, why: str):
        super().__init__(f"message {index + 1}: {why}")
        self.index, self.field, self.why = index, field, why


def read_messages(value: Any, name: str = "messages", *, empty_replies: bool = False) -> list[dict]:
    """Validated messages {"role", "content"[, "weight": 0]} of a non-empty list."""
    if not isinstance(value, list) or not value:
        raise RecordError(f"'{name}' must be a non-empty list of {{\"role\", \"content\"}} objects")
    return [read_message(i, m, empty_replies=empty_replies) for i, m in enumerate(value)]


def read_message(i: int, msg: Any, *, empty_replies: bool = False) -> dict:
    """Message i (0-based) checked field by field, in this order: role, content, name, weight."""
    if not isinstance(msg, dict) or "role" not in msg:
        raise MessageError(i, "role", "expected an object with 'role' and 'content'")
    role = msg["role"]
    if role in TOOL_ROLES or msg.get("tool_calls") or msg.get("function_call"):
        what, field = (f"role {role!r}", "role") if role in TOOL_ROLES else ("a tool call", "tool_calls")
        raise MessageError(i, field, f"{what} is not supported (this model has no tool or function calls); "
                                     "remove the record or that turn")
    if role not in ROLES and role != DEVELOPER:
        raise MessageError(i, "role", f"unknown role {role!r} (expected {', '.join(ROLES)})")  # developer: an alias
    role = "system" if role == DEVELOPER else role
    if empty_replies and role == "assistant" and msg.get("content") is None:
        content = ""  # OpenAI allows an assistant turn without content
    elif "content" not in msg:
        raise MessageError(i, "content", "expected an object with 'role' and 'content'")
    else:
        content = _content(i, msg["content"])
    if role == "assistant" and not content.strip() and not empty_replies:
        raise MessageError(i, "content", "empty assistant response")
    if msg.get("name") is not None and not isinstance(msg["name"], str):
        raise MessageError(i, "name", f"'name' must be text, got {type(msg['name']).__name__}")
    out = {"role": role, "content": content}
    weight = msg.get("weight")
    if weight is not None:
        if role != "assistant":
            raise MessageError(i, "weight", "'weight' is only allowed on assistant messages")
        if isinstance(weight, bool) or weight not in (0, 1):
            raise MessageError(i, "weight", f"'weight' must be 0 or 1, got {weight!r}")
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
                raise MessageError(i, "content", f"content part {j} of type {kind!r} is not supported (text only)")
            else:
                raise MessageError(i, "content", f"content part {j}: expected {{\"type\": \"text\", \"text\": ...}}")
        return "".join(texts)
    what = "null" if content is None else type(content).__name__
    raise MessageError(i, "content", f"'content' must be text or a list of text parts, got {what}")
