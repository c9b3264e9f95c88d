"""A model's own chat template: the Jinja `chat_template` it ships, rendered as transformers renders it.

A template is untrusted input (a program from the internet), so it runs in jinja2's
ImmutableSandboxedEnvironment (jinja2 >= 3.1.6: older ones have known sandbox escapes) with transformers'
hardened `dict` and `namespace`: no attribute of Python internals, no changing the messages. It sees
what transformers gives it: `messages`, `add_generation_prompt`, `tools` (OpenAI's tool definitions, or None),
`documents=None`, the
tokenizer's `bos_token`/`eos_token`/`pad_token` (when it has them), `raise_exception`, `strftime_now`,
transformers' `tojson` filter, loop controls, and `{% generation %}` blocks (rendered as written).
Anything that goes wrong in it (a syntax error, a forbidden attribute, its own raise_exception) is a
ChatTemplateError in one line. The rendered text is tokenized reading special-token text as those
tokens and adding no BOS (the template writes its own), as `apply_chat_template(..., tokenize=True)` does.

Messages reach it in transformers' convention: an assistant turn's `tool_calls` carry `function.arguments` as
a mapping (templates write it with `tojson`), a tool turn has `role: "tool"`, its `content` and `tool_call_id`.

Loss masks are found in the conversation rendered once (the ids are those of the whole conversation, as
`apply_chat_template` gives them). For each assistant message to learn, the conversation is rendered again with
that message replaced by a sentinel reply (no calls): the characters where the two renderings differ are what
the message made the template write (its text as the template writes it: trimmed, its tool calls in the model's
format), wherever the template puts it and however it renders the other turns, as long as it renders them the same
in both. Tokens carrying any of those characters are learned (their character offsets from `tokenizers`), and
so is the end-of-turn token the template writes next (a newline after it is not). Template text that does not
depend on the reply is not learned: Qwen3's empty `<think>\n\n</think>\n\n` before the replies after the last
user message is the template's (the prompt Qwen3 gets with `enable_thinking=False`), so a reply without
reasoning learns its text only. A reply that changes the template's text before it (reasoning written as
`<think>...</think>` at the start of its content, which Qwen3 shows for those last replies and drops from
earlier ones) is learned from the end of the generation prompt: the whole block. A template that drops or
rewrites a reply's text (the sentinel is not written as given), or whose difference reaches past the turn's
end-of-turn token, is refused for that message, never masked wrong. `{% generation %}` blocks are rendered as
written; the mask found this way is transformers' assistant mask for templates whose blocks hold the reply and
its end-of-turn token.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gpt.data.tokenizer import HFTokenizer
from gpt.errors import UserError

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")  # when a probe conversation cannot render
PROBE = "Probe reply 7."
SENTINEL = "Qx7ReplySentinel4zW"  # stands in for a reply to find where the template writes it


class ChatTemplateError(UserError):
    """A model's chat template that does not compile or render, or whose loss mask cannot be found."""


class GenerationBlocks(Extension):
    """`{% generation %}...{% endgeneration %}`: transformers' marker of the text a model writes, rendered as written."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' tojson: no HTML escaping, non-ASCII kept."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Dict:
    """The template's `dict`: builds dicts, but is no class a template could climb from (transformers' hardening)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """The template's `namespace`, refusing underscore names (a way to reach Python internals)."""

    def __init__(*args, **kwargs):  # Jinja's signature trick: namespace(self=...) still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_' ({name!r})")


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The template compiled once per source text, in the sandbox with transformers' settings and globals."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlocks, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"], env.globals["namespace"] = _Dict(), _Namespace
    try:
        return env.from_string(source)
    except Exception as e:  # TemplateSyntaxError, or anything else the parser meets
        raise ChatTemplateError(f"the model's chat template does not compile: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class JinjaTemplate:
    """A tokenizer's own chat template: messages to token ids, loss masks and end-of-turn tokens."""

    def __init__(self, tokenizer: HFTokenizer):
        if tokenizer.chat_template is None:
            raise ValueError("this tokenizer has no chat template of its own")
        self.tok = tokenizer
        self.source = tokenizer.chat_template
        name = lambda i: tokenizer.hf.id_to_token(i) if i is not None else None  # noqa: E731
        tokens = {"bos_token": name(tokenizer.bos_id), "eos_token": name(tokenizer.eot_id),
                  "pad_token": name(tokenizer.pad_id)}
        self.tokens = {k: v for k, v in tokens.items() if v is not None}
        self._end_of_turn: list[int] | None = None

    def render(self, messages: list[dict], add_generation_prompt: bool = False,
               tools: list[dict] | None = None) -> str:
        """The conversation as text (the template's own text; `weight` is ours and is not shown to it)."""
        chat = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
        template = compile_template(self.source)
        try:
            return template.render(messages=chat, add_generation_prompt=add_generation_prompt, tools=tools or None,
                                   documents=None, **self.tokens)
        except Exception as e:  # the template's own raise_exception, a SecurityError, a type error in it, ...
            raise ChatTemplateError(f"the model's chat template failed: {_first_line(e)}") from None

    def encode(self, messages: list[dict], add_generation_prompt: bool = False,
               tools: list[dict] | None = None) -> list[int]:
        """Token ids of the rendered conversation, as `apply_chat_template(..., tokenize=True)` gives them."""
        return self.tok.encode(self.render(messages, add_generation_prompt, tools), split_special_tokens=False)

    @property
    def end_of_turn_ids(self) -> list[int]:
        """The token that ends an assistant turn: the first added token the template writes after a reply
        (<|im_end|>, <|eot_id|>, <end_of_turn>, ...); a template that cannot render the probe falls back to
        the usual names the vocabulary has."""
        if self._end_of_turn is None:
            self._end_of_turn = self._probe_end_of_turn()
        return self._end_of_turn

    def _probe_end_of_turn(self) -> list[int]:
        added = set(self.tok.hf.get_added_tokens_decoder())
        try:
            text = self.render([{"role": "user", "content": "Hi."}, {"role": "assistant", "content": PROBE}])
        except ChatTemplateError:
            text = ""
        if PROBE in text:
            tail = self.tok.encode(text[text.rindex(PROBE) + len(PROBE):], split_special_tokens=False)
            return [t for t in tail if t in added][:1]
        return [i for i in map(self.tok.hf.token_to_id, END_OF_TURN) if i is not None and i in added][:1]

    def encode_with_mask(self, messages: list[dict], end_ids: list[int], add_generation_prompt: bool = False,
                         tools: list[dict] | None = None) -> tuple[list[int], list[bool]]:
        """Token ids and the loss mask: True on each assistant reply (unless `weight` 0: its text and calls) and its
        end of turn, located in the conversation rendered once (module docstring); tool turns and definitions never."""
        text = self.render(messages, add_generation_prompt, tools)
        encoding = self.tok.hf.encode(text, add_special_tokens=False)  # encode()'s ids, with character offsets
        ids, offsets = encoding.ids, encoding.offsets
        mask = [False] * len(ids)
        ends, added = set(end_ids), set(self.tok.hf.get_added_tokens_decoder())
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant" or msg.get("weight", 1) == 0:
                continue
            start, stop = self._reply_span(text, messages, i, add_generation_prompt, tools, ends)
            learned = [k for k, (a, b) in enumerate(offsets) if a < stop and b > start]  # any of the reply's text
            after = learned[-1] + 1 if learned else next((k for k, (a, _) in enumerate(offsets) if a >= stop),
                                                         len(ids))
            for k in range(after, len(ids)):  # the first marker after the reply is learned if it ends the turn
                if ids[k] in added:
                    if ids[k] in ends and not text[stop:offsets[k][0]].strip():
                        learned += range(after, k + 1)
                    break
            for k in learned:
                mask[k] = True
        return ids, mask

    def _reply_span(self, text: str, messages: list[dict], turn: int, add_generation_prompt: bool,
                    tools: list[dict] | None, ends: set[int]) -> tuple[int, int]:
        """Characters [start, stop) of `text` (the whole conversation rendered) that assistant message `turn` wrote:
        where `text` differs from the conversation rendered with that message replaced by SENTINEL (module
        docstring). ChatTemplateError when the reply's text is not found, or reaches past its own turn."""
        where = f"assistant message {turn + 1}"
        probe = [*messages[:turn], {"role": "assistant", "content": SENTINEL}, *messages[turn + 1:]]
        other = self.render(probe, add_generation_prompt, tools)
        if other.count(SENTINEL) != 1:
            raise ChatTemplateError(f"the model's chat template does not write the text of {where} as given (it "
                                    "drops or rewrites it), so its reply cannot be found for the loss mask; give "
                                    "that message \"weight\": 0 to show it without learning it")
        at = other.index(SENTINEL)
        tail = len(other) - at - len(SENTINEL)  # the probe's text after the sentinel
        start = min(_common_prefix(text, other), at)
        same_tail = min(_common_suffix(text, other, start), tail)
        stop = len(text) - same_tail
        if start < at:  # the reply changed the template's text before it (Qwen3's <think> block): all of it is learned
            start = self._after_generation_prompt(other, messages[:turn], start, at, tools, ends, where)
        if self._has(other[at + len(SENTINEL):len(other) - same_tail], ends):
            raise ChatTemplateError(f"the model's chat template renders later turns by what {where} says, so its "
                                    "reply cannot be found for the loss mask; give that message \"weight\": 0")
        return start, stop

    def _after_generation_prompt(self, other: str, before: list[dict], start: int, at: int,
                                 tools: list[dict] | None, ends: set[int], where: str) -> int:
        """Where the generation prompt that opens the turn ends in `other` (at or before `start`): the reply changed
        the template's text between that prompt and the reply, which is then learned from there."""
        try:
            plain = self.render(before, False, tools) if before else ""
            prompt = self.render(before, True, tools)
        except ChatTemplateError:
            plain = prompt = None
        header = prompt[len(plain):] if prompt is not None and prompt.startswith(plain) else None
        opened = other.rfind(header, 0, start) if header is not None else -1
        if opened < 0 or self._has(other[opened + len(header):at], ends):
            raise ChatTemplateError(f"the model's chat template renders the text before {where} by what it says, "
                                    "so its reply cannot be found for the loss mask; give that message \"weight\": 0")
        return opened + len(header)

    def _has(self, text: str, ids: set[int]) -> bool:
        """Whether `text` holds one of these tokens (an end of turn: the text reaches past one turn)."""
        return bool(text) and not ids.isdisjoint(self.tok.encode(text, split_special_tokens=False))


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _common_suffix(a: str, b: str, floor: int) -> int:
    """How many characters a and b share at their ends, leaving a's first `floor` characters out."""
    n, most = 0, min(len(a) - floor, len(b))
    while n < most and a[-1 - n] == b[-1 - n]:
        n += 1
    return n
