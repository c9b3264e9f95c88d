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

Loss masks are found by rendering incrementally: the conversation up to each assistant turn with the
generation prompt, then with the turn; the tokens in between are the reply and its end of turn, learned
up to and including the last end-of-turn token (a newline after it is not). Every rendered prefix must
tokenize as a prefix of the whole conversation; a template that rewrites earlier turns (or text whose
BPE merges cross the boundary) is refused, never masked wrong.
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
        end of turn, found by incremental rendering (module docstring); tool turns and definitions never."""
        ids = self.encode(messages, add_generation_prompt, tools)
        mask = [False] * len(ids)
        ends = set(end_ids)
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant" or msg.get("weight", 1) == 0:
                continue
            start = self._prefix_length(ids, messages[:i], True, i, tools)
            stop = self._prefix_length(ids, messages[:i + 1], False, i, tools)
            reply = ids[start:stop]
            last = max((k for k, t in enumerate(reply) if t in ends), default=len(reply) - 1)
            mask[start:start + last + 1] = [True] * (last + 1)
        return ids, mask

    def _prefix_length(self, ids: list[int], prefix: list[dict], add_generation_prompt: bool, turn: int,
                       tools: list[dict] | None = None) -> int:
        part = self.encode(prefix, add_generation_prompt, tools) if prefix or add_generation_prompt else []
        if ids[:len(part)] != part:
            raise ChatTemplateError(
                f"the model's chat template renders the conversation up to message {turn + 1} differently from "
                "the whole conversation (it rewrites earlier turns, or tokens merge across the turn), so the "
                "assistant replies cannot be found for the loss mask")
        return len(part)
