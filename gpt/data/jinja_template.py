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

Loss masks are found in the conversation rendered once (its ids are the whole conversation's, as
`apply_chat_template` gives them). For each assistant message to learn, the conversation is rendered again with
that message replaced by a sentinel reply (no calls): the reply ends where the two renderings stop differing
(its text as the template writes it: trimmed, its tool calls in the model's format), and starts where the prompt
the model answers ends (the turns before it and the generation prompt, found in the rendering even when the
template renders the earlier turns differently on their own), so it holds everything the model writes after
that prompt, as at inference. Tokens carrying any of those characters are learned (their character offsets from
`tokenizers`), and so is the end-of-turn token the template writes next (a newline after it is not). This holds
wherever the template puts a reply and however it rewrites the other turns, as long as it renders them the same
with the sentinel: Qwen3's template drops reasoning (`<think>...</think>` at the start of a reply's content) from
the replies before the last user message and writes a `<think>` block before the last reply (and later ones that
have reasoning), empty when it has none. That block is learned with the reply: the prompt ends at
`<|im_start|>assistant\n`, so the model writes it (an empty one is how Qwen3 answers without reasoning, as the
records do). A template that drops
or rewrites a reply's text (the sentinel is not written as given), or whose difference reaches past the turn's
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
        from the end of the generation prompt that opens its turn to the end of where `text` differs from the
        conversation rendered with that message replaced by SENTINEL (module docstring). ChatTemplateError when the
        reply's text is not found, or the difference reaches past its own turn."""
        where = f"assistant message {turn + 1}"
        refuse = "so its reply cannot be found for the loss mask; give that message \"weight\": 0 to show it unlearned"
        probe = [*messages[:turn], {"role": "assistant", "content": SENTINEL}, *messages[turn + 1:]]
        other = self.render(probe, add_generation_prompt, tools)
        if other.count(SENTINEL) != 1:
            raise ChatTemplateError(f"the model's chat template does not write the text of {where} as given (it drops "
                                    f"or rewrites it), {refuse}")
        at = other.index(SENTINEL)
        tail = len(other) - at - len(SENTINEL)  # the probe's text after the sentinel
        same = min(_common_prefix(text, other), at)  # text[:same] == other[:same]
        same_tail = min(_common_suffix(text, other, same), tail)
        start = self._prompt_end(other, messages[:turn], same, tools)
        if start is None:
            raise ChatTemplateError(f"the model's chat template does not render the prompt of {where} (the turns "
                                    f"before it, the generation prompt) as in the conversation, {refuse}")
        if self._has(other[start:at], ends):
            raise ChatTemplateError(f"the model's chat template renders the text before {where} by what it says, "
                                    f"{refuse}")
        if self._has(other[at + len(SENTINEL):len(other) - same_tail], ends):
            raise ChatTemplateError(f"the model's chat template renders later turns by what {where} says, {refuse}")
        return start, len(text) - same_tail

    def _prompt_end(self, other: str, before: list[dict], limit: int, tools: list[dict] | None) -> int | None:
        """Where, in `other`, the prompt the model answers ends (the turns before the reply and the generation
        prompt, as the template renders them to ask for it), at or before `limit`; None when it cannot be found."""
        try:
            prompt = self.render(before, True, tools)
            if other.startswith(prompt) and len(prompt) <= limit:  # the rendered prompt is a prefix of the whole
                return len(prompt)
            plain = self.render(before, False, tools) if before else ""
        except ChatTemplateError:  # a template that cannot render the turns before the reply on their own
            return None
        header = prompt[len(plain):] if prompt.startswith(plain) else ""  # the generation prompt (<|im_start|>...)
        opened = other.rfind(header, 0, limit) if header else -1  # the template rewrote earlier turns: find it
        return opened + len(header) if opened >= 0 else None

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
