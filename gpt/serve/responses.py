"""OpenAI's Responses API (POST /v1/responses), translated onto the chat path: one validator, one engine path.

A Responses request becomes a chat request (`chat_request`) that `chat_job` (gpt/serve/protocol.py) checks
and builds, exactly as for /v1/chat/completions: `instructions` is a system message first; `input` is text
(one user message) or a list of items: messages (text, or input_text/output_text parts), `function_call`
items (an assistant turn's tool_calls) and `function_call_output` items (a `tool` message); `text.format`
is `response_format`; `max_output_tokens` is `max_completion_tokens`; function tools in the flat form
({"type": "function", "name", "description", "parameters", "strict"}) are chat's nested ones, `tool_choice`
likewise. An error of the chat validator is renamed to the Responses parameter it came from (`input[2]`,
`text.format`, `max_output_tokens`, ...). The reply is the chat reply translated back (`Responses`): the
assistant message as a `message` item with `output_text`, its tool_calls as `function_call` items, usage as
input/output tokens; a stream is OpenAI's event sequence, built from the chat stream's chunks.

This server keeps nothing: every response says `"store": false`; `store: true`, `previous_response_id`,
`conversation` and `background` are a 400 naming the field (send the whole conversation in `input`), as
are built-in tools (web_search, file_search, ...), non-text input parts and any field the API does not
have.
"""

from __future__ import annotations

import json
import re
import secrets
import time

from gpt.data.tokenizer import Tokenizer
from gpt.serve.protocol import APIError, Job, bad, chat_job

FIELDS = frozenset({"model", "input", "instructions", "text", "max_output_tokens", "temperature", "top_p", "tools",
                    "tool_choice", "parallel_tool_calls", "stream", "store", "metadata", "user"})  # user: ignored
UNSTORED = "this server keeps no responses (every response has store: false): send the whole conversation in input"
# OpenAI's fields this server does not do: the value that asks for nothing is accepted (null always), else a 400
NOT_HERE = {"store": (False, "store: true is not supported: " + UNSTORED), "previous_response_id": (None, UNSTORED),
            "conversation": (None, UNSTORED), "background": (False, "background responses are not supported"),
            "include": ([], None), "truncation": ("disabled", None), "reasoning": (None, None),
            "prompt": (None, None), "max_tool_calls": (None, None), "top_logprobs": (0, None),
            "service_tier": (None, None), "stream_options": (None, None), "prompt_cache_key": (None, None),
            "safety_identifier": (None, None), "context_management": (None, None)}
ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = {"input_text": {"type", "text"}, "output_text": {"type", "text", "annotations", "logprobs"}}
RENAMED = {"max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
           "response_format": "text.format", "messages": "input"}  # chat's param -> ours


# ---------------------------------------------------------------------------- the request


def response_job(body: dict, tokenizer: Tokenizer, block_size: int) -> Job:
    """The request as chat's job (the same validator and job builder), its errors named in Responses' terms."""
    chat, where = chat_request(body)
    try:
        return chat_job(chat, tokenizer, block_size)
    except APIError as e:
        raise _renamed(e, where) from None


def chat_request(body: dict) -> tuple[dict, list[tuple[str, bool]]]:
    """The chat request of a Responses request, and for each chat message the Responses param it came from
    (and whether that is a message, whose role and content are named as chat names them)."""
    _check_fields(body)
    messages: list[dict] = []
    where: list[tuple[str, bool]] = []
    if body.get("instructions") is not None:
        if not isinstance(body["instructions"], str):
            raise bad("instructions", "instructions must be a string")
        messages.append({"role": "system", "content": body["instructions"]})
        where.append(("instructions", False))
    _input(body.get("input"), messages, where)
    chat = {"model": body.get("model"), "messages": messages}
    for ours, theirs in (("max_output_tokens", "max_completion_tokens"), ("temperature", "temperature"),
                         ("top_p", "top_p"), ("stream", "stream"), ("parallel_tool_calls", "parallel_tool_calls"),
                         ("user", "user")):
        if body.get(ours) is not None:
            chat[theirs] = body[ours]
    if body.get("text") is not None:
        chat["response_format"] = text_format(body["text"])
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        choice = body["tool_choice"]
        chat["tool_choice"] = _tool_choice(choice) if isinstance(choice, dict) else choice  # auto, none, required
    _metadata(body.get("metadata"))
    return chat, where


def _check_fields(body: dict) -> None:
    for name, value in body.items():
        if name in NOT_HERE:
            nothing, why = NOT_HERE[name]
            if value is not None and value != nothing:
                raise bad(name, f"{name} is not supported by this server" if why is None else why)
        elif name not in FIELDS:
            raise bad(name, f"Unrecognized request argument supplied: {name}")


def _metadata(v) -> None:
    """OpenAI's metadata: up to 16 string pairs (echoed in the response; nothing is stored)."""
    if v is None:
        return
    if not isinstance(v, dict) or len(v) > 16 or not all(isinstance(k, str) and isinstance(x, str)
                                                         for k, x in v.items()):
        raise bad("metadata", "metadata must be an object of at most 16 string keys and string values")


def _input(v, messages: list[dict], where: list[tuple[str, bool]]) -> None:
    """`input` as chat messages appended to `messages` (and their origins to `where`)."""
    if isinstance(v, str):
        messages.append({"role": "user", "content": v})
        where.append(("input", False))
        return
    if not isinstance(v, list) or not v:
        raise bad("input", "input must be a string or a non-empty list of input items")
    for i, item in enumerate(v):
        at = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad(at, f"{at} must be an object (a message, function_call or function_call_output item)")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            _only(item, {"type", "role", "content", "id", "status"}, at)
            if item.get("role") not in ROLES:
                raise bad(f"{at}.role", f"{at}.role must be one of {', '.join(ROLES)}, got {item.get('role')!r}")
            messages.append({"role": item["role"], "content": _content(item.get("content"), f"{at}.content")})
            where.append((at, True))
        elif kind == "function_call":
            _only(item, {"type", "call_id", "name", "arguments", "id", "status"}, at)
            call = {"id": _text(item, "call_id", at), "type": "function",
                    "function": {"name": _text(item, "name", at), "arguments": _text(item, "arguments", at)}}
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)  # one assistant turn: its text and calls
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                where.append((at, False))
        elif kind == "function_call_output":
            _only(item, {"type", "call_id", "output", "id", "status"}, at)
            messages.append({"role": "tool", "tool_call_id": _text(item, "call_id", at),
                             "content": _content(item.get("output"), f"{at}.output")})
            where.append((at, False))
        else:
            raise bad(f"{at}.type", f"input items of type {kind!r} are not supported by this server (message, "
                                    "function_call and function_call_output are)")


def _only(obj: dict, keys: set[str], at: str) -> None:
    for k in obj:
        if k not in keys:
            raise bad(f"{at}.{k}", f"Unrecognized argument in {at}: {k}")


def _text(item: dict, key: str, at: str) -> str:
    if not isinstance(item.get(key), str):
        raise bad(f"{at}.{key}", f"{at}.{key} must be a string")
    return item[key]


def _content(v, at: str):
    """Text, or text parts as chat's [{"type": "text", "text"}]; other parts (images, files, audio) are refused."""
    if isinstance(v, str):
        return v
    if not isinstance(v, list):
        raise bad(at, f"{at} must be a string or a list of input_text parts")
    parts = []
    for j, part in enumerate(v):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS:
            raise bad(f"{at}[{j}].type", f"{at}[{j}]: only text parts (input_text, output_text) are supported by "
                                         f"this server, got {kind!r}")
        _only(part, TEXT_PARTS[kind], f"{at}[{j}]")
        parts.append({"type": "text", "text": _text(part, "text", f"{at}[{j}]")})
    return parts


def text_format(v) -> dict:
    """`text` ({"format": ...}) as chat's response_format; the format itself is checked by the chat path."""
    if not isinstance(v, dict):
        raise bad("text", "text must be an object with a format")
    _only(v, {"format"}, "text")
    fmt = v.get("format")
    if fmt is None:
        return {"type": "text"}
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return fmt  # text, json_object or a wrong one: chat's checks name it (text.format)
    _only(fmt, {"type", "name", "schema", "strict", "description"}, "text.format")
    return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict", "description")
                                                   if k in fmt}}


def _tools(v) -> list:
    """Function tools in the flat form as chat's {"type": "function", "function": {...}}; built-in tools refused."""
    if not isinstance(v, list):
        raise bad("tools", "tools must be a list of function tools")
    out = []
    for i, tool in enumerate(v):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise bad(f"tools[{i}].type", f"tools[{i}]: only function tools are supported by this server; the "
                                          f"built-in tool {kind!r} is not")
        _only(tool, {"type", "name", "description", "parameters", "strict"}, f"tools[{i}]")
        out.append({"type": "function", "function": {k: x for k, x in tool.items() if k != "type"}})
    return out


def _tool_choice(v: dict) -> dict:
    """{"type": "function", "name"} as chat's {"type": "function", "function": {"name"}}; other kinds refused."""
    if v.get("type") != "function":
        raise bad("tool_choice", f"tool_choice of type {v.get('type')!r} is not supported by this server (auto, "
                                 "none, required or a function)")
    _only(v, {"type", "name"}, "tool_choice")
    return {"type": "function", "function": {"name": v.get("name")}}


def _renamed(e: APIError, where: list[tuple[str, bool]]) -> APIError:
    """A chat-path error in Responses' terms: messages[k] -> the input item it came from, chat's params -> ours."""
    param, message = e.param or "", e.message

    def item(m: re.Match) -> str:
        k = int(m.group(1))
        return where[k][0] if k < len(where) else "input"

    m = re.fullmatch(r"messages\[(\d+)\]\.(\w+)", param)
    if m:
        k = int(m.group(1))
        is_message = k < len(where) and where[k][1] and m.group(2) in ("role", "content")
        param = f"{item(m)}.{m.group(2)}" if is_message else item(m)
    elif param.startswith("tools"):
        param = param.replace(".function.", ".")
    elif param.startswith("tool_choice"):
        param = "tool_choice"
    else:
        param = RENAMED.get(param, param)
    message = re.sub(r"messages\[(\d+)\]", item, message)
    for chat_name, ours in (("response_format.json_schema.", "text.format."), ("response_format", "text.format"),
                            ("max_completion_tokens", "max_output_tokens")):
        message = message.replace(chat_name, ours)
    return APIError(e.status, message, type=e.type, param=param or None, code=e.code, headers=e.headers)


# ---------------------------------------------------------------------------- the response


def output_items(message: dict, complete: bool) -> list[dict]:
    """A chat reply's message as Responses output items: a `message` with its text (unless the reply is only
    tool calls), then a `function_call` per tool call."""
    calls = message.get("tool_calls") or []
    items = []
    if message.get("content") or not calls:
        items.append(message_item("msg_" + secrets.token_hex(12), message.get("content") or "", complete))
    items += [function_call_item("fc_" + secrets.token_hex(12), c["id"], c["function"]["name"],
                                 c["function"]["arguments"], True) for c in calls]
    return items


def message_item(item_id: str, text: str | None, complete: bool) -> dict:
    """A message item; text None: just opened, no content part yet."""
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"type": "message", "id": item_id, "status": "completed" if complete else "incomplete",
            "role": "assistant", "content": content}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, done: bool) -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": "completed" if done else "in_progress"}


def usage(chat_usage: dict) -> dict:
    prompt, completion = chat_usage["prompt_tokens"], chat_usage["completion_tokens"]
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached}, "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + completion}


class Responses:
    """The reply in Responses' shape, made from the chat shape's (gpt/serve/app.py ChatCompletions, whose
    stream interface it speaks: opening, delta, finish, closing, frame, failure; `full` for the whole reply).

    A stream sends response.created and response.in_progress, then per output item output_item.added, its
    content (content_part.added, output_text.delta..., output_text.done, content_part.done; or
    function_call_arguments.delta... and .done) and output_item.done, then response.completed (or
    response.incomplete: cut off at max_output_tokens), each event with its sequence_number."""

    def __init__(self, chat, body: dict):
        self.chat, self.body = chat, body
        self.id, self.created = "resp_" + secrets.token_hex(12), int(time.time())
        self.sequence = 0
        self.output: list[dict] = []  # items done
        self.open: dict | None = None  # the item being streamed
        self.text = ""  # of the open message
        self.reason: str | None = None  # chat's finish_reason, once finished
        self.stuck = False  # cut off: the vocabulary cannot continue the text.format

    def response(self, status: str, output: list[dict], chat_usage: dict | None) -> dict:
        b = self.body
        incomplete = None
        if status == "incomplete":
            incomplete = {"reason": "response_format_unreachable" if self.stuck else "max_output_tokens"}
        fmt = (b.get("text") or {}).get("format") or {"type": "text"}
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status, "error": None,
                "incomplete_details": incomplete, "instructions": b.get("instructions"),
                "max_output_tokens": b.get("max_output_tokens"), "model": self.chat.server.config.model_name,
                "output": output, "parallel_tool_calls": b.get("parallel_tool_calls", True),
                "previous_response_id": None, "reasoning": None, "store": False,
                "temperature": b.get("temperature", 1.0), "text": {"format": fmt},
                "tool_choice": b.get("tool_choice", "auto"), "tools": b.get("tools") or [],
                "top_p": b.get("top_p", 1.0), "truncation": "disabled", "metadata": b.get("metadata") or {},
                "user": b.get("user"), "usage": None if chat_usage is None else usage(chat_usage)}

    def status(self) -> str:
        return "incomplete" if self.reason == "length" else "completed"

    async def full(self, reply) -> dict:
        chat = await self.chat.full(reply)
        choice = chat["choices"][0]
        self.reason, self.stuck = choice["finish_reason"], "error" in choice
        status = self.status()
        return self.response(status, output_items(choice["message"], status == "completed"), chat["usage"])

    # ------------------------------------------------------------------------ the stream

    def event(self, kind: str, **fields) -> dict:
        return {"type": "response." + kind, **fields}

    def opening(self, seqs) -> list[list[dict]]:
        started = self.response("in_progress", [], None)
        return [[self.event("created", response=started), self.event("in_progress", response=started)]]

    def chunks(self, i: int, e) -> list[list[dict]]:
        """A token event's chat chunks (text, a tool call's start or arguments) as Responses events."""
        events = [ev for chunk in self.chat.chunks(i, e) for ev in self._events(chunk)]
        return [events] if events else []

    def _events(self, chunk: dict) -> list[dict]:
        d = chunk["choices"][0].get("delta") or {}
        events = self._text(d["content"]) if d.get("content") else []
        for call in d.get("tool_calls") or []:
            events += self._call(call)
        return events

    def _where(self) -> dict:
        return {"item_id": self.open["id"], "output_index": len(self.output)}

    def _open_message(self) -> list[dict]:
        events = self._close()
        self.open, self.text = message_item("msg_" + secrets.token_hex(12), None, False), ""
        self.open["status"] = "in_progress"
        return events + [self.event("output_item.added", output_index=len(self.output), item=self.open),
                         self.event("content_part.added", **self._where(), content_index=0,
                                    part={"type": "output_text", "text": "", "annotations": []})]

    def _text(self, text: str) -> list[dict]:
        events = self._open_message() if self.open is None or self.open["type"] != "message" else []
        self.text += text
        return events + [self.event("output_text.delta", **self._where(), content_index=0, delta=text, logprobs=[])]

    def _call(self, call: dict) -> list[dict]:
        """A chat tool-call delta: the first of a call has its id and name, the rest pieces of its arguments."""
        events = []
        fn = call.get("function") or {}
        if call.get("id"):  # a new call
            events += self._close()
            self.open = function_call_item("fc_" + secrets.token_hex(12), call["id"], fn.get("name", ""), "", False)
            events.append(self.event("output_item.added", output_index=len(self.output), item=dict(self.open)))
        if fn.get("arguments"):
            self.open["arguments"] += fn["arguments"]
            events.append(self.event("function_call_arguments.delta", **self._where(), delta=fn["arguments"]))
        return events

    def _close(self) -> list[dict]:
        """The done events of the open item, which joins the output."""
        item, complete = self.open, self.reason != "length"
        if item is None:
            return []
        where, events = self._where(), []
        if item["type"] == "message":
            part = {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}
            item = message_item(item["id"], self.text, complete)
            events += [self.event("output_text.done", **where, content_index=0, text=self.text, logprobs=[]),
                       self.event("content_part.done", **where, content_index=0, part=part)]
        else:
            item = {**item, "status": "completed"}
            events.append(self.event("function_call_arguments.done", **where, name=item["name"],
                                     arguments=item["arguments"]))
        self.output.append(item)
        self.open = None
        return events + [self.event("output_item.done", output_index=where["output_index"], item=item)]

    def finish_chunks(self, i: int, seq, reply) -> list[list[dict]]:
        """The chat stream's last chunks (a call's last arguments, the finish reason) as the closing events."""
        *deltas, last = self.chat.finish_chunks(i, seq, reply)
        events = [ev for chunk in deltas for ev in self._events(chunk)]
        choice = last["choices"][0]
        self.reason, self.stuck = choice["finish_reason"], "error" in choice
        events += [] if self.output or self.open else self._open_message()  # an empty reply: an empty message
        return [events + self._close()]

    def closing(self, reply) -> str:
        status = self.status()
        return self.frame([self.event(status, response=self.response(status, self.output,
                                                                     self.chat.usage(reply.seqs)))])

    def frame(self, events: list[dict]) -> str:
        """Server-Sent Events with their names, numbered in order."""
        out = []
        for ev in events:
            ev["sequence_number"] = self.sequence
            self.sequence += 1
            out.append(f"event: {ev['type']}\ndata: {json.dumps(ev, ensure_ascii=False)}\n\n")
        return "".join(out)

    def failure(self, e: APIError) -> str:
        return self.frame([{"type": "error", "code": e.code, "message": e.message, "param": e.param}])
