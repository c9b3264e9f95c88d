"""Scoring a prompt: the model's log-probability of each of its tokens given the ones before it.

The server's echo + logprobs (/v1/completions) reports these for the prompt, ahead of the
generated tokens' own (which the engine records while decoding). One forward pass over the
prompt's window, outside the decode batch and its KV cache, so it may run on any thread.
`score_continuations` does the same for a batch of sequences (right-padded: causal attention keeps
the padding out of every real position) and sums the log-probabilities of each one's last tokens:
lm-evaluation-harness's loglikelihood (gpt/lm_eval_model.py).
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


class ContinuationScore(NamedTuple):
    """The summed log-probability of a sequence's scored tokens, and whether each was the model's argmax."""

    logprob: float
    greedy: bool


@torch.inference_mode()
def score_continuations(model: GPT, rows: list[tuple[list[int], int]], vocab_size: int) -> list[ContinuationScore]:
    """For each (ids, n): the log-probability of ids' last n tokens given those before them, in one batched
    forward pass (ids of at most block_size + 1 tokens, n < len(ids))."""
    device = next(model.parameters()).device
    width = max(len(ids) - 1 for ids, _ in rows)
    x = torch.zeros(len(rows), width, dtype=torch.long)
    for r, (ids, _) in enumerate(rows):
        x[r, : len(ids) - 1] = torch.tensor(ids[:-1])
    logits, _ = model(x.to(device))
    out = []
    for r, (ids, n) in enumerate(rows):
        end = len(ids) - 1
        logp = logits[r, end - n : end, :vocab_size].float().log_softmax(-1)
        target = torch.tensor(ids[-n:], device=device)
        chosen = logp.gather(-1, target[:, None])[:, 0]
        out.append(ContinuationScore(float(chosen.sum()), bool((logp.argmax(-1) == target).all())))
    return out
