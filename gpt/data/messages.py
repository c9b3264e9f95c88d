"""OpenAI chat messages and tool definitions, checked by one set of rules for fine-tuning records and the server.

A message is {"role", "content"} with OpenAI's optional fields:
  role        system, user, assistant or tool; developer (OpenAI's newer name for system) is read as system.
              OpenAI's legacy `function` role and `function_call` field are refused (use tools); so are
              other frameworks' tool roles (ipython, observation, ...): write them as role "tool".
  content     text, or OpenAI's list of {"type": "text", "text": ...} parts, joined as written (no
              separator); other part types (images, audio) are refused.
  name        accepted when it is text (not rendered).
  weight      0 or 1, on assistant messages only (OpenAI's fine-tuning format): 0 = context, no loss.
  tool_calls  on assistant messages: [{"id", "type": "function", "function": {"name", "arguments"}}] with
              arguments a JSON object written as text (OpenAI) or given as an object (Hugging Face datasets);
              read into {"id", "type", "function": {"name", "arguments": <the object>}}, the mapping
              transformers hands chat templates. The content of such a turn may be empty or null. With
              tools declared, every call names one of them.
  tool_call_id on tool messages: the id of a call of the assistant turn they answer (the turns right before).
One rule depends on the context: a record's assistant turn is a reply to learn from, so it must
hold text or calls; a request's assistant turns are context and may be empty or null (`empty_replies`).

Tools (`read_tools`) are OpenAI's list of {"type": "function", "function": {"name", "description",
"parameters", "strict"}}: names of 1-64 letters, digits, '_' or '-', unique; parameters a JSON schema of
an object (absent: no arguments).

A bad message raises MessageError naming the message (0-based index), the field and why; its text
is the records' form ("message 3: ..."), and the server turns the same parts into OpenAI's `param`.
A bad tool raises ToolsError with `param` (e.g. "tools[1].function.name").
"""

from __future__ import annotations

import json
import re
from typing import Any

from gpt.data.chat_template import ROLES
from gpt.data.files import RecordError

OTHER_TOOL_ROLES = ("function", "ipython", "observation", "function_call", "tool_call")  # refused: write "tool"
TOOL_ROLES = ("tool", *OTHER_TOOL_ROLES)
DEVELOPER = "developer"  # read as system
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
NO_PARAMETERS = {"type": "object", "properties": {}}


class MessageError(RecordError):
    """One message is malformed: `index` (0-based), `field` (role, content, name, weight, tool_calls, tool_call_id)
    and `why`."""

    def __init__(self, index: int, field: str, why: str):
        super().__init__(f"message {index + 1}: {why}")
        self.index, self.field, self.why = index, field, why


class ToolsError(RecordError):
    """A malformed tool definition: `param` says where (OpenAI's form, "tools[0].function.name")."""

    def __init__(self, param: str, why: str):
        super().__init__(f"{param}: {why}")
        self.param, self.why = param, why


class Conversation(list):
    """A record's messages and the tools it declares (`tools`, None when it declares none); a slice keeps them."""

    def __init__(self, messages=(), tools: list[dict] | None = None):
        super().__init__(messages)
        self.tools = tools

    def __getitem__(self, i):
        item = super().__getitem__(i)
        return Conversation(item, self.tools) if isinstance(i, slice) else item


def tools_of(messages: list[dict]) -> list[dict] | None:
    """The tools a conversation declares (a Conversation's), else None."""
    return getattr(messages, "tools", None)


def read_tools(value: Any, name: str = "tools") -> list[dict] | None:
    """Validated tool definitions {"type": "function", "function": {"name", "description", "parameters"}};
    None for an absent or empty list."""
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise ToolsError(name, "must be a list of {\"type\": \"function\", \"function\": {...}} objects")
    out, seen = [], set()
    for i, tool in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ToolsError(where, "expected {\"type\": \"function\", \"function\": {\"name\", \"parameters\"}}")
        fn = tool["function"]
        fname, params, desc = fn.get("name"), fn.get("parameters"), fn.get("description")
        if not isinstance(fname, str) or not TOOL_NAME.fullmatch(fname):
            raise ToolsError(f"{where}.function.name", f"must be 1-64 letters, digits, '_' or '-', got {fname!r}")
        if fname in seen:
            raise ToolsError(f"{where}.function.name", f"the tool {fname!r} is declared twice")
        seen.add(fname)
        if desc is not None and not isinstance(desc, str):
            raise ToolsError(f"{where}.function.description", "must be text")
        if params is None:
            params = dict(NO_PARAMETERS)
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise ToolsError(f"{where}.function.parameters", "must be a JSON schema of an object "
                                                             "({\"type\": \"object\", \"properties\": {...}})")
        if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
            raise ToolsError(f"{where}.function.strict", "must be true or false")
        clean = {"name": fname, **({"description": desc} if desc is not None else {}), "parameters": params}
        out.append({"type": "function", "function": clean})
    return out


def read_messages(value: Any, name: str = "messages", *, empty_replies: bool = False,
                  tools: list[dict] | None = None) -> list[dict]:
    """Validated messages {"role", "content"[, "weight": 0][, "tool_calls"][, "tool_call_id"]} of a non-empty
    list; with `tools` (read_tools'), every call names one of them."""
    if not isinstance(value, list) or not value:
        raise RecordError(f"'{name}' must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = [read_message(i, m, empty_replies=empty_replies) for i, m in enumerate(value)]
    _check_tool_turns(out, tools)
    return out


def read_message(i: int, msg: Any, *, empty_replies: bool = False) -> dict:
    """Message i (0-based) checked field by field, in this order: role, content, tool calls, name, weight."""
    if not isinstance(msg, dict) or "role" not in msg:
        raise MessageError(i, "role", "expected an object with 'role' and 'content'")
    role = msg["role"]
    if role in OTHER_TOOL_ROLES:
        raise MessageError(i, "role", f"role {role!r} is not supported: write calls as an assistant message's "
                                      "'tool_calls' and results as role 'tool' with the call's 'tool_call_id'")
    if msg.get("function_call") is not None:
        raise MessageError(i, "function_call", "'function_call' (OpenAI's legacy functions) is not supported: "
                                               "use 'tool_calls'")
    if role not in ROLES and role not in (DEVELOPER, "tool"):
        raise MessageError(i, "role", f"unknown role {role!r} (expected {', '.join(ROLES)} or tool)")
    role = "system" if role == DEVELOPER else role
    calls = _tool_calls(i, msg.get("tool_calls")) if role == "assistant" else None
    if msg.get("tool_calls") is not None and role != "assistant":
        raise MessageError(i, "tool_calls", "'tool_calls' is only allowed on assistant messages")
    if role == "assistant" and msg.get("content") is None and (empty_replies or calls):
        content = ""  # OpenAI allows an assistant turn without content
    elif "content" not in msg:
        raise MessageError(i, "content", "expected an object with 'role' and 'content'")
    else:
        content = _content(i, msg["content"])
    if role == "assistant" and not content.strip() and not calls and not empty_replies:
        raise MessageError(i, "content", "empty assistant response")
    if msg.get("name") is not None and not isinstance(msg["name"], str):
        raise MessageError(i, "name", f"'name' must be text, got {type(msg['name']).__name__}")
    out = {"role": role, "content": content}
    if calls:
        out["tool_calls"] = calls
    if role == "tool":
        if not isinstance(msg.get("tool_call_id"), str) or not msg["tool_call_id"]:
            raise MessageError(i, "tool_call_id", "a tool message needs the 'tool_call_id' of the call it answers")
        out["tool_call_id"] = msg["tool_call_id"]
    weight = msg.get("weight")
    if weight is not None:
        if role != "assistant":
            raise MessageError(i, "weight", "'weight' is only allowed on assistant messages")
        if isinstance(weight, bool) or weight not in (0, 1):
            raise MessageError(i, "weight", f"'weight' must be 0 or 1, got {weight!r}")
        if weight == 0:
            out["weight"] = 0
    return out


def _tool_calls(i: int, value: Any) -> list[dict] | None:
    """An assistant turn's calls: {"id", "type": "function", "function": {"name", "arguments": <object>}}."""
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise MessageError(i, "tool_calls", "'tool_calls' must be a list of {\"id\", \"type\", \"function\"} objects")
    out = []
    for j, call in enumerate(value):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or call.get("type", "function") != "function":
            raise MessageError(i, f"tool_calls[{j}]", f"tool call {j + 1}: expected {{\"id\", \"type\": "
                                                      "\"function\", \"function\": {\"name\", \"arguments\"}}")
        name, args, cid = fn.get("name"), fn.get("arguments"), call.get("id")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise MessageError(i, f"tool_calls[{j}].function.name",
                               f"tool call {j + 1}: the name must be 1-64 letters, digits, '_' or '-', got {name!r}")
        if cid is not None and not isinstance(cid, str):
            raise MessageError(i, f"tool_calls[{j}].id", f"tool call {j + 1}: 'id' must be text")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise MessageError(i, f"tool_calls[{j}].function.arguments",
                                   f"tool call {j + 1}: 'arguments' is not valid JSON ({e.msg})") from None
        if not isinstance(args, dict):
            raise MessageError(i, f"tool_calls[{j}].function.arguments",
                               f"tool call {j + 1}: 'arguments' must be a JSON object (as text)")
        out.append({"id": cid or f"call_{i}_{j}", "type": "function", "function": {"name": name, "arguments": args}})
    return out


def _check_tool_turns(messages: list[dict], tools: list[dict] | None) -> None:
    """Calls name a declared tool (when tools are given); a tool message answers a call of the assistant turn
    just before it (only tool messages in between)."""
    names = None if tools is None else {t["function"]["name"] for t in tools}
    open_ids: set[str] | None = None
    for i, m in enumerate(messages):
        for j, call in enumerate(m.get("tool_calls") or []):
            if names is not None and call["function"]["name"] not in names:
                raise MessageError(i, f"tool_calls[{j}].function.name",
                                   f"tool call {j + 1} names {call['function']['name']!r}, which is not among the "
                                   f"declared tools ({', '.join(sorted(names))})")
        if m["role"] == "tool":
            if open_ids is None:
                raise MessageError(i, "role", "a tool message must answer the tool_calls of the assistant message "
                                              "before it")
            if m["tool_call_id"] not in open_ids:
                raise MessageError(i, "tool_call_id", f"tool_call_id {m['tool_call_id']!r} is not the id of a call of "
                                                      "the assistant message before it")
        else:
            open_ids = {c["id"] for c in m["tool_calls"]} if m.get("tool_calls") else None


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
