"""Tool calls as text: how a model writes a call, how its output is read back into calls, and the grammar
that makes every call it writes parse.

A `ToolFormat` is one way of writing calls in a reply:
  hermes       (ours, Qwen2.5, Qwen3, Hermes) each call on its own lines, calls separated by a newline:
                   <tool_call>
                   {"name": "get_weather", "arguments": {"city": "Paris"}}
                   </tool_call>
  llama3-json  (Llama 3.1/3.2) the whole reply is one call: {"name": "get_weather", "parameters": {"city": "Paris"}}
The JSON is written as `json.dumps` writes it (", " and ": " separators, no other whitespace), the form
the chat templates render histories in (transformers' `tojson`), so generation and training agree.

`tool_grammar` is the Lark grammar (llguidance's, with `%json{...}` for each tool's parameters) that the
server hands the engine as a `Constraint`: `required` (or one named tool) makes the whole reply calls,
one or, with parallel calls, several; `auto` lets it be text (which never contains the call marker) or
calls; every call names a declared tool and its arguments follow that tool's schema, compactly.

`CallReader` reads generated text into content and calls, incrementally (for streaming, OpenAI's deltas:
a call's name once it is known, then fragments of its arguments) or all at once (`read_calls`); both
give the same calls, so a stream reassembles to the non-streamed reply. A call cut off (max_tokens)
is reported as unfinished, never as complete. The arguments are the text the model wrote.

`render_tools` is the text form of tool definitions our special-token template puts in the system turn.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

NAME_RE = r"[a-zA-Z0-9_-]{1,64}"
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}  # json.dumps' form
TOOLS_INTRO = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
               "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n")
TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
               "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
               "\"arguments\": <args-json-object>}\n</tool_call>")


@dataclass(frozen=True)
class ToolFormat:
    """One way of writing calls: `trigger` starts a call (and never appears in plain text under a grammar)."""

    name: str
    open: str  # text before a call's JSON object
    close: str  # text after it
    arguments_key: str  # "arguments" or "parameters"
    separator: str | None  # between calls; None: one call per reply
    trigger: str

    def write(self, name: str, arguments: dict) -> str:
        """One call as the model writes it."""
        return (f'{self.open}{{"name": "{name}", "{self.arguments_key}": '
                f"{json.dumps(arguments, ensure_ascii=False)}}}{self.close}")

    def write_all(self, calls: list[dict]) -> str:
        """An assistant turn's calls ({"function": {"name", "arguments": <object>}}) as the model writes them."""
        return (self.separator or "").join(self.write(c["function"]["name"], c["function"]["arguments"])
                                           for c in calls)


HERMES = ToolFormat("hermes", "<tool_call>\n", "\n</tool_call>", "arguments", "\n", "<tool_call>")
LLAMA3_JSON = ToolFormat("llama3-json", "", "", "parameters", None, '{"name":')
FORMATS = {f.name: f for f in (HERMES, LLAMA3_JSON)}


def format_of_template(source: str) -> ToolFormat | None:
    """The format a Jinja chat template writes calls in (what its model was trained on), or None when it
    renders no calls (a template without tool support)."""
    if "<tool_call>" in source:
        return HERMES
    if "tool_calls" in source and '"parameters": ' in source:
        return LLAMA3_JSON
    return None


def render_tools(tools: list[dict]) -> str:
    """The tool definitions as our template shows them (one JSON object per line between <tools> tags)."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return TOOLS_INTRO + lines + TOOLS_OUTRO


# ---------------------------------------------------------------------------- the grammar


def tool_grammar(fmt: ToolFormat, tools: list[dict], mode: str, parallel: bool = True,
                 only: str | None = None) -> str:
    """The Lark grammar of a reply: mode "required" (calls only) or "auto" (text or calls); `only` restricts
    the calls to that tool; `parallel` allows several calls (when the format has a separator)."""
    if mode not in ("required", "auto"):
        raise ValueError(f"tool grammar mode must be 'required' or 'auto', got {mode!r}")
    chosen = [t for t in tools if only is None or t["function"]["name"] == only]
    if not chosen:
        raise ValueError(f"no declared tool is named {only!r}")
    rules = []
    for i, tool in enumerate(chosen):
        fn = tool["function"]
        schema = {**(fn.get("parameters") or {"type": "object"}), "x-guidance": JSON_STYLE}
        head = f'"{fn["name"]}", "{fmt.arguments_key}": '
        rules.append(f"f{i}: {json.dumps(head)} %json {json.dumps(schema)}")
    several = parallel and fmt.separator is not None
    calls = f"call ({json.dumps(fmt.separator)} call)*" if several else "call"
    start = "calls" if mode == "required" else "TEXT | calls"
    lines = [f"start: {start}", f"calls: {calls}",
             f'call: {json.dumps(fmt.open + "{" + chr(34) + "name" + chr(34) + ": ")} '
             f'({" | ".join(f"f{i}" for i in range(len(chosen)))}) {json.dumps("}" + fmt.close)}',
             *rules]
    if mode == "auto":
        lines.append(f"TEXT: /(?s:.*)/ & ~/(?s:.*){_regex_escape(fmt.trigger)}(?s:.*)/")
    return "\n".join(lines) + "\n"


def _regex_escape(text: str) -> str:
    """Text as a literal inside a Lark /regex/ (llguidance's regex syntax escapes punctuation only)."""
    return "".join("\\" + c if c in "\\.^$|?*+()[]{}/" else c for c in text)


# ---------------------------------------------------------------------------- reading calls back


@dataclass
class ParsedCall:
    name: str
    arguments: str  # the JSON text the model wrote
    complete: bool = False


@dataclass
class Delta:
    """What the newest text adds: content, a call's start (index and name) or a fragment of its arguments."""

    kind: str  # "content", "call" or "arguments"
    text: str = ""
    index: int = 0


@dataclass
class CallReader:
    """Generated text -> content and calls, fed piece by piece (`feed`, then `finish` once the reply ended)."""

    fmt: ToolFormat
    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)
    _buf: str = ""
    _state: str = "text"  # text, head (a call begun, its name not yet complete) or arguments

    def __post_init__(self):
        self._head = re.compile(re.escape(self.fmt.open) + r'\{"name": "(' + NAME_RE + ')", "'
                                + re.escape(self.fmt.arguments_key) + '": ')
        self._end = "}" + self.fmt.close  # closes a call's object (the arguments' own braces come before)

    def feed(self, text: str) -> list[Delta]:
        """The deltas the new text completes; text that may still turn into a call marker is held back."""
        self._buf += text
        out: list[Delta] = []
        while self._step(out):
            pass
        return [d for d in out if d.text or d.kind == "call"]

    def finish(self) -> list[Delta]:
        """The reply ended: held-back text goes out; a call not closed stays incomplete (and a call whose
        name never completed is no call)."""
        out = self.feed("")
        if self._state == "arguments" and self.fmt.close == "" and self._buf.endswith("}"):
            self._close_call(self._buf[:-1], out)  # a format whose call ends the reply: its last "}" closes it
        elif self._state == "arguments":
            out.append(self._fragment(self._buf))
        elif self._state == "text":
            out.append(self._content(self._buf))
        self._buf = ""
        return [d for d in out if d.text or d.kind == "call"]

    def _step(self, out: list[Delta]) -> bool:
        """One move of the reader; False when it needs more text."""
        buf = self._buf
        if self._state == "text":
            at = buf.find(self.fmt.trigger)
            if at < 0:
                keep = _partial_suffix(buf, self.fmt.trigger)
                out.append(self._content(buf[:len(buf) - keep]))
                self._buf = buf[len(buf) - keep:]
                return False
            out.append(self._content(buf[:at]))
            self._buf, self._state = buf[at:], "head"
            return True
        if self._state == "head":
            m = self._head.match(buf)
            if m is None:
                if len(buf) > len(self.fmt.open) + len(self.fmt.arguments_key) + 90:  # not a call after all
                    out.append(self._content(buf))
                    self._buf, self._state = "", "text"
                return False
            self.calls.append(ParsedCall(m.group(1), ""))
            out.append(Delta("call", m.group(1), len(self.calls) - 1))
            self._buf, self._state = buf[m.end():], "arguments"
            return True
        if self.fmt.close and self._end in buf:
            at = buf.index(self._end)  # compact JSON has no raw newline: the first end is the call's
            self._close_call(buf[:at], out)
            self._buf, self._state = buf[at + len(self._end):], "text"
            return True
        keep = _partial_suffix(buf, self._end) if self.fmt.close else int(buf.endswith("}"))  # may close the call
        out.append(self._fragment(buf[:len(buf) - keep]))
        self._buf = buf[len(buf) - keep:]
        return False

    def _content(self, text: str) -> Delta:
        if self.calls and not text.strip():  # between and after calls: the separator is not content
            text = ""
        self.content += text
        return Delta("content", text)

    def _fragment(self, text: str) -> Delta:
        self.calls[-1].arguments += text
        return Delta("arguments", text, len(self.calls) - 1)

    def _close_call(self, rest: str, out: list[Delta]) -> None:
        out.append(self._fragment(rest))
        call = self.calls[-1]
        try:
            call.complete = isinstance(json.loads(call.arguments), dict)
        except json.JSONDecodeError:
            call.complete = False


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker` (text held back until it is known)."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


def read_calls(text: str, fmt: ToolFormat) -> CallReader:
    """A whole reply read at once (the same reader a stream uses): .content and .calls."""
    reader = CallReader(fmt)
    reader.feed(text)
    reader.finish()
    return reader
