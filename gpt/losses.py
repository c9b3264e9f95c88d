"""Token cross-entropy, plain and fused with the LM head (never holding the full logits).

With a 50k vocabulary the (B*T, V) fp32 logits and their gradient are the largest tensors of a
small model's step: at 2 layers x 128 they cost more time (allocation, page zeroing, memory traffic)
than every transformer block together. `linear_cross_entropy` computes head + loss in row chunks
and, while each chunk's logits are at hand, their gradient too (softmax - one_hot), folded straight
into the gradients of the hidden states and of the head weight. So the step holds one chunk of
logits at a time, and the backward pass only scales the saved gradients: no recomputation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets with this value carry no loss (prompt tokens in SFT, padding)
CHUNK_ELEMENTS = 2**23  # logits per chunk: 32 MB in fp32, whatever the vocabulary


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
    x2, t = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // weight.size(0))
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        total = _LinearCrossEntropy.apply(x2, weight, t, rows, dtype)
    else:
        with torch.autocast(x.device.type, enabled=False):
            total = sum_chunked_loss(x2, weight, t, rows, dtype)
    return _reduce(total, targets, reduction)


def _reduce(total: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def sum_chunked_loss(x, weight, targets, rows: int, dtype, grads: tuple | None = None) -> torch.Tensor:
    """Summed token loss over row chunks; with grads=(grad_x or None, grad_w or None), also the gradient
    of that sum, written into grad_x (rows of x) and accumulated into grad_w (fp32)."""
    w = weight.to(dtype)
    total = torch.zeros((), device=x.device, dtype=torch.float32)
    for start in range(0, x.size(0), rows):
        xc, tc = x[start : start + rows].to(dtype), targets[start : start + rows]
        logits = (xc @ w.t()).float()
        lse = torch.logsumexp(logits, dim=-1)
        valid = tc != IGNORE_INDEX
        tgt = tc.clamp(min=0)[:, None]  # ignored rows point at token 0 and are masked out (no device sync)
        total += ((lse - logits.gather(1, tgt).squeeze(1)) * valid).sum()
        if grads is None:
            continue
        # d(sum of losses)/d(logits) = softmax - one_hot(target), zero on ignored rows; in the logits' buffer
        g = logits.sub_(lse[:, None]).exp_()
        g.scatter_add_(1, tgt, -torch.ones_like(tgt, dtype=g.dtype))
        g = g.mul_(valid[:, None]).to(dtype)
        grad_x, grad_w = grads
        if grad_x is not None:
            if grad_x.dtype == dtype:
                torch.mm(g, w, out=grad_x[start : start + rows])
            else:
                grad_x[start : start + rows] = g @ w
        if grad_w is not None:
            if dtype == torch.float32:
                grad_w.addmm_(g.t(), xc)
            else:
                grad_w += (g.t() @ xc).float()
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed loss of x @ weight.T; the gradients are computed chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, x, weight, targets, rows: int, dtype):
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        with torch.autocast(x.device.type, enabled=False):
            total = sum_chunked_loss(x, weight, targets, rows, dtype, grads=(grad_x, grad_w))
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_x, grad_w = ctx.saved_tensors
        grad_x = grad_x * grad_total if grad_x is not None else None
        grad_w = (grad_w * grad_total).to(ctx.weight_dtype) if grad_w is not None else None
        return grad_x, grad_w, None, None, None
