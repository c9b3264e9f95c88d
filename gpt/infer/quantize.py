"""Weight-only int8 for decoding: every Linear's weight stored as int8 with one scale per output channel.

Decoding one token reads every weight once, so its speed is memory bandwidth: int8 weights are a
quarter of fp32's bytes. Activations stay in floating point (weight-only, as gpt-fast does); on CPU
the few-row products of decoding use torch's int8-weight kernel (`_weight_int8pack_mm`, bf16
activations), larger ones (prefill) dequantize the weight once per call. The tied embedding keeps
its float weights (a lookup reads one row); the LM head gets its own int8 copy. Quality cost on
Shakespeare: docs/performance.md#int8-weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FEW_ROWS = 16  # up to this many rows the int8 kernel beats a float matmul on CPU (bench/quantize.py)


class Int8Linear(nn.Module):
    """y = x @ (q * scale[:, None]).T + bias, q int8 in [-127, 127], one scale per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.size(-1)
        if x.device.type == "cpu" and rows <= FEW_ROWS:
            y = torch._weight_int8pack_mm(x.reshape(rows, -1).to(torch.bfloat16), self.weight,
                                          self.scale.to(torch.bfloat16))
            y = y.to(x.dtype).view(*x.shape[:-1], -1)
        else:
            y = F.linear(x, self.weight.to(x.dtype) * self.scale.to(x.dtype)[:, None])
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by an Int8Linear; returns the model, for inference.
    The tied LM head is untied first so the input embedding keeps its float weights."""
    lm_head = getattr(model, "lm_head", None)
    if isinstance(lm_head, nn.Linear) and lm_head.weight is getattr(model.transformer.wte, "weight", None):
        head = nn.Linear(lm_head.in_features, lm_head.out_features, bias=False, device=lm_head.weight.device)
        head.weight = nn.Parameter(lm_head.weight.detach().clone(), requires_grad=False)
        model.lm_head = head
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, Int8Linear(child))
    return model.eval().requires_grad_(False)
