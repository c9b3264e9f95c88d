"""Turning next-token logits into a token: penalties, temperature, top-k, top-p, then a draw.

Pure tensor functions on (B, V) float logits, applied in this order (the order of HF and vLLM):

1. repetition_penalty (CTRL / HF semantics): a token already in the context (prompt or output)
   has its logit divided by the penalty when positive and multiplied by it when negative.
2. frequency_penalty and presence_penalty (OpenAI semantics): logit -= count * frequency_penalty
   + (count > 0) * presence_penalty, where count is how often the token was generated so far
   (the prompt does not count). Negative values encourage repetition.
3. temperature: 0 means greedy (argmax of the penalised logits); otherwise logits / temperature.
4. top_k: keep the k most likely tokens. 5. top_p (nucleus): keep the smallest set of most likely
   tokens whose probability reaches top_p (the most likely token is always kept).
6. a multinomial draw from a seeded torch.Generator, so one seed gives one output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass
class SamplingParams:
    """Decoding controls; the names match sample.py's flags (--top-k is top_k, ...)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 1 (or 0/None for no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")

    @property
    def needs_history(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """seen: (B, V) bool, tokens present in the context. Positive logits shrink, negative grow."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_frequency_presence(logits: torch.Tensor, counts: torch.Tensor, frequency: float, presence: float):
    """counts: (B, V) how often each token was generated so far (OpenAI's c[j])."""
    if frequency == 0.0 and presence == 0.0:
        return logits
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def apply_top_k(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    if not k or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens until their total probability reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass of strictly more likely tokens
    drop_sorted = before >= p  # the top token has before == 0, so it is always kept
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def process_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Penalties, temperature, top-k and top-p; the result feeds `sample` (or argmax at temperature 0)."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if counts is not None:
        logits = apply_frequency_presence(logits, counts, params.frequency_penalty, params.presence_penalty)
    if params.temperature == 0:
        return logits
    if params.temperature != 1.0:
        logits = logits / params.temperature
    logits = apply_top_k(logits, params.top_k)
    return apply_top_p(logits, params.top_p)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) processed logits -> (B,) token ids."""
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
