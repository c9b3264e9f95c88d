"""The chat template: how a conversation becomes tokens, for fine-tuning and for `sample.py --chat`.

A conversation is rendered turn by turn as

    <|system|>\\n{content}<|end|>\\n<|user|>\\n{content}<|end|>\\n<|assistant|>\\n{content}<|end|>\\n

where the markers are special tokens added to the tokenizer (ids past the base vocabulary).
Text inside a message is always encoded as plain text, so a user writing "<|end|>" cannot end
a turn. Fine-tuning puts loss on each assistant turn's content and its <|end|> (what the model
must learn to write, including when to stop); role headers, other turns and the newline after
<|end|> carry none, nor does an assistant turn marked `"weight": 0` (OpenAI's fine-tuning format: a
reply shown as context, not learned). Models without these tokens (plain pretrained checkpoints) get a
plain template, "User: ...\\nAssistant: ...\\n", whose turn ends at a newline followed by "User:".

Tools (gpt/data/tool_calls.py): the tool definitions go at the end of the system turn (one is added when the
conversation has none) in `render_tools`' text form; an assistant turn's calls follow its content in the Hermes
form (`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one per call, separated by newlines) and
are learned like its text; a tool result is its own turn, `<|tool|>\n{content}<|end|>\n`, never learned. The
<|tool|> marker is added by fine-tuning with the other markers; a chat model from before it gets a
ChatTemplateError for a tool turn, never a silent misrendering. The plain template writes "Tool: {content}\n".

A model that ships its own Jinja chat template (a Hugging Face tokenizer carrying `chat_template`) is
rendered with that template instead (gpt/data/jinja_template.py), through the same methods: its ids are
`apply_chat_template`'s, its turns end with its own end-of-turn token (<|im_end|>, <|eot_id|>, ...), and
fine-tuning adds none of our markers to it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gpt.data.jinja_template import ChatTemplateError, JinjaTemplate
from gpt.data.tokenizer import HFTokenizer, Tokenizer
from gpt.data.tool_calls import HERMES, TOOLS_INTRO, TOOLS_OUTRO, ToolFormat, format_of_template, render_tools

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_TOKEN = "<|end|>"
CHAT_TOKENS = [*ROLE_TOKENS.values(), END_TOKEN]
TOOL_TOKEN = "<|tool|>"  # the header of a tool result's turn (added with the others; older chat models lack it)
PLAIN_NAMES = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


@dataclass
class Segment:
    ids: list[int]
    trainable: bool  # True for assistant content and its end marker (unless weight 0): what SFT puts loss on


def has_own_template(tokenizer: Tokenizer) -> bool:
    """A model's tokenizer that ships its own Jinja chat template (which then replaces ours)."""
    return isinstance(tokenizer, HFTokenizer) and tokenizer.chat_template is not None


class ChatTemplate:
    """One interface for every chat format: the model's own Jinja template when its tokenizer carries one
    (`jinja`), else our special-token template, else the plain one."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.jinja = JinjaTemplate(tokenizer) if has_own_template(tokenizer) else None
        self.special = self.jinja is None and all(t in tokenizer.special_tokens for t in CHAT_TOKENS)

    @staticmethod
    def missing_tokens(tokenizer: Tokenizer) -> list[str]:
        """The chat markers `add_tokens` adds: none for a model with its own template (it brings its own)."""
        if has_own_template(tokenizer):
            return []
        missing = [t for t in CHAT_TOKENS if t not in tokenizer.special_tokens]
        return missing + [TOOL_TOKEN] if missing and TOOL_TOKEN not in tokenizer.special_tokens else missing

    @staticmethod
    def add_tokens(tokenizer: Tokenizer) -> dict[str, int]:
        """Extend a tokenizer with the chat markers and <|tool|> (fine-tuning does this once, when the chat markers
        are missing: a chat model keeps its vocabulary); none for a model with its own template. Returns marker -> id."""
        missing = ChatTemplate.missing_tokens(tokenizer)
        return tokenizer.add_special_tokens(missing) if missing else {}

    @property
    def name(self) -> str:
        return "jinja" if self.jinja else "special-tokens" if self.special else "plain"

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end an assistant turn."""
        if self.jinja:
            return self.jinja.end_of_turn_ids
        return [self.tok.special_id(END_TOKEN)] if self.special else []

    @property
    def end_ids(self) -> list[int]:
        """Token ids that end generation: the end-of-turn marker of chat models first, then end-of-text (every eos
        id a Hugging Face model lists). Every decoder stops at these by default (sample.py, chat, the server,
        eval, the Hugging Face export)."""
        ends = self.tok.eos_ids if isinstance(self.tok, HFTokenizer) else [self.tok.eot_id]
        return list(dict.fromkeys(self.stop_ids + [i for i in ends if i is not None]))

    @property
    def stop_strings(self) -> list[str]:
        """Text that ends an assistant turn (the plain template has no end token)."""
        return [] if self.special or self.jinja else [f"\n{PLAIN_NAMES['user']}:"]

    @property
    def tool_format(self) -> ToolFormat | None:
        """How this template's model writes tool calls (gpt/data/tool_calls.py); None: its template has no tools."""
        return format_of_template(self.jinja.source) if self.jinja else HERMES

    def check_tools(self, messages: list[dict], tools: list[dict] | None) -> None:
        """ChatTemplateError when the conversation has tools, calls or tool turns this template cannot show."""
        used = tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
        if used and self.tool_format is None:
            raise ChatTemplateError("the model's chat template has no tool calling (it renders no tool calls): "
                                    "send no tools, tool calls or tool messages to this model")
        if not self.jinja and self.special and any(m["role"] == "tool" for m in messages) \
                and TOOL_TOKEN not in self.tok.special_tokens:
            raise ChatTemplateError(f"this chat model has no {TOOL_TOKEN} marker (its chat markers predate tool "
                                    "turns): it cannot be shown tool results; fine-tune a base model on records "
                                    "with tools to get one")

    def segments(self, messages: list[dict], add_generation_prompt: bool = False,
                 tools: list[dict] | None = None) -> list[Segment]:
        """Render messages (and the tools they may call) as segments; header tokens, tool definitions and tool
        results are never trainable, assistant content and calls are. A record's Conversation brings its tools."""
        tools = tools if tools is not None else getattr(messages, "tools", None)
        self.check_tools(messages, tools)
        if self.jinja:
            ids, mask = self.jinja.encode_with_mask(messages, self.end_ids, add_generation_prompt, tools)
            return _runs(ids, mask)
        out: list[Segment] = []
        for msg in _with_tools(messages, tools):
            role, content = msg["role"], msg["content"]
            if role not in ROLES and role != "tool":
                raise ValueError(f"unknown role {role!r}: expected one of {', '.join(ROLES)} or tool")
            out.append(Segment(self._header(role), False))
            if msg.get("tool_calls"):
                content += ("\n" if content else "") + HERMES.write_all(msg["tool_calls"])
            body = self.tok.encode(content)
            learned = role == "assistant" and msg.get("weight", 1) != 0
            if self.special:
                out.append(Segment(body + [self.tok.special_id(END_TOKEN)], learned))
                out.append(Segment(self.tok.encode("\n"), False))  # separator: never generated
            else:
                out.append(Segment(body + self.tok.encode("\n"), learned))
        if add_generation_prompt:
            out.append(Segment(self._header("assistant"), False))
        return out

    def encode(self, messages: list[dict], add_generation_prompt: bool = False,
               tools: list[dict] | None = None) -> list[int]:
        if self.jinja:
            tools = tools if tools is not None else getattr(messages, "tools", None)
            self.check_tools(messages, tools)
            return self.jinja.encode(messages, add_generation_prompt, tools)
        return [i for seg in self.segments(messages, add_generation_prompt, tools) for i in seg.ids]

    def _header(self, role: str) -> list[int]:
        if self.special:
            return [self.tok.special_id(TOOL_TOKEN if role == "tool" else ROLE_TOKENS[role])] + self.tok.encode("\n")
        return self.tok.encode(f"{PLAIN_NAMES[role]}: ")


def _with_tools(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Our templates' conversation with the tool definitions at the end of the system turn (added when absent)."""
    if not tools:
        return messages
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{**first, "content": first["content"] + "\n\n" + render_tools(tools)}, *messages[1:]]
    return [{"role": "system", "content": render_tools(tools)}, *messages]


def _runs(ids: list[int], mask: list[bool]) -> list[Segment]:
    """Token ids and their mask as segments: each run of equal mask values one segment."""
    out: list[Segment] = []
    for i, learned in zip(ids, mask):
        if out and out[-1].trainable == learned:
            out[-1].ids.append(i)
        else:
            out.append(Segment([i], learned))
    return out


def hf_chat_template() -> str:
    """The special-token template as a Hugging Face Jinja `chat_template`.

    It renders the text our `encode` spells; an exported tokenizer splits that text at the markers
    (special tokens) and encodes the rest as plain text, so apply_chat_template gives our ids. (Two
    places can differ: a message containing a marker's literal text, which we keep as plain text, and
    one that starts with whitespace followed by more whitespace or nothing, which BPE may join with the
    header's newline.)
    """
    markers = ", ".join(f"'{role}': '{tok}'" for role, tok in [*ROLE_TOKENS.items(), ("tool", TOOL_TOKEN)])
    intro, outro = (json.dumps(t)[1:-1].replace("'", "\\'") for t in (TOOLS_INTRO, TOOLS_OUTRO))
    tools_text = "'" + intro + "' + (tools | map('tojson') | join('\\n')) + '" + outro + "'"
    call = ("'<tool_call>\\n{\"name\": \"' + c.function.name + '\", \"arguments\": ' + (c.function.arguments if "
            "c.function.arguments is string else c.function.arguments | tojson) + '}\\n</tool_call>'")
    return (
        "{% set markers = {" + markers + "} %}"
        "{% if tools and messages[0]['role'] != 'system' %}{{ markers['system'] + '\\n' + " + tools_text + " + '"
        + END_TOKEN + "\\n' }}{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] not in markers %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
        "{% set ns = namespace(text=message['content'] or '') %}"
        "{% if loop.first and tools and message['role'] == 'system' %}"
        "{% set ns.text = ns.text + '\\n\\n' + " + tools_text + " %}{% endif %}"
        "{% if message.tool_calls %}{% for c in message.tool_calls %}"
        "{% set ns.text = ns.text + ('\\n' if ns.text else '') + " + call + " %}{% endfor %}{% endif %}"
        "{{ markers[message['role']] + '\\n' + ns.text + '" + END_TOKEN + "\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '" + ROLE_TOKENS["assistant"] + "\\n' }}{% endif %}"
    )
