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

A model that ships its own Jinja chat template (a Hugging Face tokenizer carrying `chat_template`) is
rendered with that template instead (gpt/data/jinja_template.py), through the same methods: its ids are
`apply_chat_template`'s, its turns end with its own end-of-turn token (<|im_end|>, <|eot_id|>, ...), and
fine-tuning adds none of our markers to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpt.data.jinja_template import JinjaTemplate
from gpt.data.tokenizer import HFTokenizer, Tokenizer

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_TOKEN = "<|end|>"
CHAT_TOKENS = [*ROLE_TOKENS.values(), END_TOKEN]
PLAIN_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


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
        return [] if has_own_template(tokenizer) else [t for t in CHAT_TOKENS if t not in tokenizer.special_tokens]

    @staticmethod
    def add_tokens(tokenizer: Tokenizer) -> dict[str, int]:
        """Extend a tokenizer with the chat markers (fine-tuning does this once); none for a model with its own
        template. Returns marker -> id."""
        return {} if has_own_template(tokenizer) else tokenizer.add_special_tokens(CHAT_TOKENS)

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

    def segments(self, messages: list[dict], add_generation_prompt: bool = False) -> list[Segment]:
        """Render messages as segments; header tokens are never trainable, assistant content is."""
        if self.jinja:
            ids, mask = self.jinja.encode_with_mask(messages, self.end_ids, add_generation_prompt)
            return _runs(ids, mask)
        out: list[Segment] = []
        for msg in messages:
            role, content = msg["role"], msg["content"]
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
            out.append(Segment(self._header(role), False))
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

    def encode(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        if self.jinja:
            return self.jinja.encode(messages, add_generation_prompt)
        return [i for seg in self.segments(messages, add_generation_prompt) for i in seg.ids]

    def _header(self, role: str) -> list[int]:
        if self.special:
            return [self.tok.special_id(ROLE_TOKENS[role])] + self.tok.encode("\n")
        return self.tok.encode(f"{PLAIN_NAMES[role]}: ")


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
    markers = ", ".join(f"'{role}': '{tok}'" for role, tok in ROLE_TOKENS.items())
    return (
        "{% set markers = {" + markers + "} %}"
        "{% for message in messages %}"
        "{% if message['role'] not in markers %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
        "{{ markers[message['role']] + '\\n' + message['content'] + '" + END_TOKEN + "\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '" + ROLE_TOKENS["assistant"] + "\\n' }}{% endif %}"
    )
