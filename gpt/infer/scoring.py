"""Scoring a prompt: the model's log-probability of each of its tokens given the ones before it.

The server's echo + logprobs (/v1/completions) reports these for the prompt, ahead of the
generated tokens' own (which the engine records while decoding). One forward pass over the
prompt's window, outside the decode batch and its KV cache, so it may run on any thread.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from gpt.model import GPT


class TokenScore(NamedTuple):
    """One token, its log-probability (None for a prompt's first token: nothing comes before it), and the
    most likely tokens at its position as (id, log-probability), best first."""

    id: int
    logprob: float | None
    top: list[tuple[int, float]]


@torch.inference_mode()
def score_prompt(model: GPT, ids: list[int], top_k: int, vocab_size: int) -> list[TokenScore]:
    """Each prompt token's log-probability and the top_k alternatives (the last block_size tokens only)."""
    window = ids[-model.config.block_size :]
    logits, _ = model(torch.tensor([window], device=next(model.parameters()).device))
    logp = logits[0, :, :vocab_size].float().log_softmax(-1)
    out = [TokenScore(window[0], None, [])]
    for j in range(1, len(window)):
        top = logp[j - 1].topk(min(top_k, vocab_size)) if top_k else None
        alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        out.append(TokenScore(window[j], float(logp[j - 1, window[j]]), alts))
    return out
