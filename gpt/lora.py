"""LoRA: train a low-rank update B @ A next to frozen Linear weights (Hu et al., 2021).

`apply_lora(model, cfg)` freezes every parameter of a GPT and wraps the chosen Linear layers
(by name: c_attn, c_proj, c_fc, or a dotted suffix such as mlp.c_proj) in LoRALinear, so only
the adapters train. B starts at zero, so the wrapped model starts out computing exactly the base
model, and `adapters_disabled(model)` switches them off for a while (DPO's reference model is
the base, held once). `merged_state_dict(model)` folds W + (alpha / rank) * B @ A back into plain GPT weights:
every checkpoint of a LoRA run is an ordinary GPT that sample.py loads directly.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

from gpt.config import ConfigError, LoRAConfig


class LoRALinear(nn.Module):
    """y = base(x) + scale * dropout(x) @ A^T @ B^T, with base frozen and A (r, in), B (out, r) trained."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        # kaiming-uniform as nn.Linear uses; B = 0 keeps the initial output equal to the base layer's
        bound = 1.0 / math.sqrt(base.in_features)
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)
        self.dropout = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + (self.lora_B @ self.lora_A) * self.scale


def apply_lora(model: nn.Module, cfg: LoRAConfig, seed: int = 0) -> list[str]:
    """Freeze `model` and wrap the target Linear layers inside its blocks; returns the wrapped names."""
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    targets = [t.strip() for t in cfg.targets]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, targets)]
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, nn.Linear) and n.startswith("transformer.")})
        raise ConfigError(f"lora.targets {targets} match no Linear layer; choose from {', '.join(linear)}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        setattr(parent, child, LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout, gen).to(base.weight.device))
    return names


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside this block the model computes its frozen base weights exactly, as if LoRA were absent."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.enabled = True


def _matches(name: str, targets: list[str]) -> bool:
    """Only layers inside the transformer blocks: lm_head is tied to the embedding and stays frozen."""
    if not name.startswith("transformer.h."):
        return False
    return any(name == t or name.endswith("." + t) for t in targets)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain GPT weights with every adapter folded in (names as if LoRA had never been applied)."""
    state: dict[str, torch.Tensor] = {}
    lora_modules = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            owner = next((n for n in lora_modules if name.startswith(n + ".")), None)
            if owner is None:
                state[name] = tensor
                continue
            leaf = name[len(owner) + 1:]
            if leaf == "base.weight":
                state[f"{owner}.weight"] = lora_modules[owner].merged_weight().detach()
            elif leaf == "base.bias":
                state[f"{owner}.bias"] = tensor
            # lora_A / lora_B are folded into the weight above
    return state


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
