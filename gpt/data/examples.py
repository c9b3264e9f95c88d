"""Fine-tuning examples: a conversation, a preference pair or a text -> token ids + loss mask, cut to fit.

Truncation rule for a conversation longer than the window (block_size + 1 tokens): the "response" is
the last assistant turn and everything after it, the "prompt" everything before. The prompt keeps
its end (it holds the question and the assistant header) and the response keeps its beginning; the
response gets everything the prompt does not need, but at least half the window. A preference pair
is two such sequences, prompt + chosen and prompt + rejected, each cut by the same rule with its
reply as the response. A text (continued pretraining) is every token a target, in windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from gpt.data.chat_template import ChatTemplate


@dataclass
class Example:
    ids: np.ndarray  # (n,) token ids of one example
    mask: np.ndarray  # (n,) bool: token i is a target (carries loss); mask[0] is never used


class Pair(NamedTuple):
    """A preference pair as two sequences: prompt + the preferred reply, prompt + the other one."""

    chosen: Example
    rejected: Example

    def identical(self) -> bool:
        """Both sides are the same tokens (two replies that differ only past the window): nothing to
        prefer, and DPO's loss on the pair would stay at log 2 (0.693) whatever the model does."""
        return np.array_equal(self.chosen.ids, self.rejected.ids)


def encode_chat(template: ChatTemplate, messages: list[dict], budget: int,
                train_on_prompt: bool = False) -> tuple[Example, bool]:
    """Token ids and loss mask of one conversation, truncated to `budget` tokens by the module's rule."""
    ids: list[int] = []
    mask: list[bool] = []
    response_start = 0
    for seg in template.segments(messages):
        if seg.trainable:
            response_start = len(ids)
        ids += seg.ids
        mask += [seg.trainable or train_on_prompt] * len(seg.ids)
    return _cut(ids, mask, response_start, budget)


def encode_reply(template: ChatTemplate, prompt: list[dict], reply: list[dict], budget: int) -> tuple[Example, bool]:
    """One side of a preference pair: loss mask on the reply's assistant content only (never on the
    prompt, even its assistant turns), truncated like encode_chat with the reply as the response. The two are
    rendered as one conversation (a model's own template may render a turn by what precedes it)."""
    context = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in prompt]  # shown, never learned
    ids: list[int] = []
    mask: list[bool] = []
    reply_start = None
    for seg in template.segments(context + reply):
        if seg.trainable and reply_start is None:
            reply_start = len(ids)
        ids += seg.ids
        mask += [seg.trainable] * len(seg.ids)
    return _cut(ids, mask, reply_start or 0, budget)


def encode_pair(template: ChatTemplate, prompt: list[dict], chosen: list[dict], rejected: list[dict],
                budget: int) -> tuple[Pair, bool]:
    """Both sides of a preference pair (encode_reply each); truncated when either side was cut."""
    (chosen_ex, cut), (rejected_ex, cut_too) = (encode_reply(template, prompt, reply, budget)
                                                for reply in (chosen, rejected))
    return Pair(chosen_ex, rejected_ex), cut or cut_too


def _cut(ids: list[int], mask: list[bool], response_start: int, budget: int) -> tuple[Example, bool]:
    """The truncation rule: the prompt keeps its end, the response its beginning (and at least half)."""
    truncated = len(ids) > budget
    if truncated:
        response_len = len(ids) - response_start
        prompt_keep = min(response_start, max(budget // 2, budget - response_len))
        lo, hi = response_start - prompt_keep, response_start + budget - prompt_keep
        ids, mask = ids[lo:hi], mask[lo:hi]
    return Example(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)), truncated


def encode_text(template: ChatTemplate, text: str, budget: int) -> list[Example]:
    """Continued pretraining: every token is a target; a long text becomes consecutive windows
    overlapping by one token, so each token after the first is predicted exactly once."""
    tok = template.tok
    ids = tok.encode(text) + ([tok.eot_id] if tok.eot_id is not None else [])
    step = budget - 1
    out = []
    for start in range(0, max(1, len(ids) - 1), step):
        piece = np.asarray(ids[start:start + budget], dtype=np.int64)
        if len(piece) >= 2:
            out.append(Example(piece, np.ones(len(piece), dtype=bool)))
    return out
