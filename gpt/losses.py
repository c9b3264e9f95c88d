"""Token cross-entropy, plain and fused with the LM head (never holding the full logits).

With a 50k vocabulary the (B*T, V) fp32 logits and their gradient are the largest tensors of a
small model's step: at 2 layers x 128 they cost more time (allocation, page zeroing, memory traffic)
than every transformer block together. `linear_cross_entropy` computes head + loss in row chunks
and, while each chunk's logits are at hand, their gradient too (softmax - one_hot): at once into the
gradient of the hidden states, and kept in the matmul dtype (bf16 under autocast) for the head's
gradient, which takes one matmul per C rows (two chunks at least) of them: a fold per chunk would
read and write all V x C fp32 each time, which at the 124M shape on a CPU made the fused path slower
than the plain one. So the step holds one fp32 chunk of logits and a bounded bf16 buffer, and the
backward pass only scales the saved gradients, in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets with this value carry no loss (prompt tokens in SFT, padding)
CHUNK_ELEMENTS = 2**24  # logits per chunk: 64 MB in fp32, whatever the vocabulary (~340 rows of a 50k vocabulary)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy ignoring IGNORE_INDEX; an all-ignored batch gives 0, not NaN.
    reduction "none" gives each token's loss, shaped like targets (0 where ignored)."""
    flat = logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1)
    if reduction == "none":
        return F.cross_entropy(*flat, ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
    return _reduce(F.cross_entropy(*flat, ignore_index=IGNORE_INDEX, reduction="sum"), targets, reduction)


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean", chunk_rows: int = 0
) -> torch.Tensor:
    """cross_entropy(x @ weight.T, targets) without materialising the logits; same value and gradients.

    x: (..., C) hidden states, weight: (V, C) the head, targets: (...) ids or IGNORE_INDEX.
    Under autocast the matmuls run in the autocast dtype and the softmax in fp32, as in the plain path.
    chunk_rows: rows per chunk (0 = as many as keep one chunk's logits near CHUNK_ELEMENTS).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    x2, t = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // weight.size(0))
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    scale = 1.0 if reduction == "sum" else 1.0 / (t != IGNORE_INDEX).sum().clamp(min=1)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x2, weight, t, rows, dtype, scale)
    with torch.autocast(x.device.type, enabled=False):
        return chunked_loss(x2, weight, t, rows, dtype, scale)[0]


def _reduce(total: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def chunked_loss(x, weight, targets, rows: int, dtype, scale, grad_x=None, head_grad: bool = False):
    """(scale * the summed token loss, the head's gradient or None), over row chunks. With grad_x (shaped
    like x) its gradient to x is written there; with head_grad its gradient to weight is returned (fp32)."""
    w = weight.to(dtype)
    n = x.size(0)
    total = torch.zeros((), device=x.device, dtype=torch.float32)
    grad_w = torch.zeros(weight.shape, device=x.device, dtype=torch.float32) if head_grad and n == 0 else None
    # the head's gradient is (chunk gradients)^T @ x: gather chunk gradients, as many as the head has
    # elements (C rows) and at least two chunks, and fold them in with one matmul rather than one per
    # chunk: each fold reads and writes all V x C of the fp32 gradient, more than the chunk's matmul costs
    group = rows * max(2, w.size(1) // rows) if head_grad else rows
    for first in range(0, n, group):
        last = min(n, first + group)
        buffer = torch.empty(last - first, w.size(0), device=x.device, dtype=dtype) if head_grad else None
        for start in range(first, last, rows):
            end = min(last, start + rows)
            xc, tc = x[start:end].to(dtype), targets[start:end]
            # one row-wise kernel per pass, each row (V fp32) staying in cache: log-softmax, then exp
            log_probs = torch.log_softmax(xc @ w.t(), dim=-1, dtype=torch.float32)
            valid = tc != IGNORE_INDEX
            tgt = tc.clamp(min=0)[:, None]  # ignored rows point at token 0 and are masked out (no device sync)
            total -= (log_probs.gather(1, tgt).squeeze(1) * valid).sum()
            if grad_x is None and not head_grad:
                continue
            # d(scale * sum of losses)/d(logits) = scale * (softmax - one_hot(target)), 0 on ignored rows
            g = log_probs.exp_().scatter_add_(1, tgt, -torch.ones_like(tgt, dtype=log_probs.dtype))
            out = buffer[start - first : end - first] if head_grad else torch.empty_like(g, dtype=dtype)
            g = torch.mul(g, valid[:, None] * scale, out=out)  # scaled and cast in one pass
            if grad_x is not None:
                grad_x[start:end] = g @ w
        if head_grad:
            part = buffer.t() @ x[first:last].to(dtype)
            grad_w = part.float() if grad_w is None else grad_w.add_(part)
    return total * scale, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    """scale * summed loss of x @ weight.T; the gradients are computed chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, x, weight, targets, rows: int, dtype, scale):
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        with torch.autocast(x.device.type, enabled=False):
            total, grad_w = chunked_loss(x, weight, targets, rows, dtype, scale, grad_x, ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype, ctx.consumed = weight.dtype, False
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.consumed:
            raise RuntimeError("the fused head + loss supports one backward pass per forward; "
                               "set model.fused_loss=off to backpropagate through it twice")
        ctx.consumed = True
        grad_x, grad_w = ctx.saved_tensors
        # scaled in place: these gradients are this function's own (a new V x C tensor a step costs time)
        for g in (grad_x, grad_w):
            if g is not None:
                g.mul_(grad_total)
        grad_w = grad_w.to(ctx.weight_dtype) if grad_w is not None else None
        return grad_x, grad_w, None, None, None, None
