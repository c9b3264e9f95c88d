"""Text generation from a GPT (sampler)."""

from __future__ import annotations

import torch

from gpt.model import GPT


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, seed: int | None = None, vocab_limit: int | None = None) -> torch.Tensor:
    """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 is greedy."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=idx.device)
    if seed is not None:
        gen.manual_seed(seed)
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size:], logits_to_keep=1)
        logits = logits[:, -1, :].float()
        if vocab_limit is not None:
            logits[:, vocab_limit:] = -float("inf")
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
        idx = torch.cat([idx, nxt], dim=1)
    model.train(was_training)
    return idx
