"""LoRA: train a low-rank update B @ A next to frozen Linear weights (Hu et al., 2021).

`apply_lora(model, cfg)` freezes every parameter of a GPT and wraps the chosen Linear layers
(by name: c_attn, c_proj, c_fc, or a dotted suffix such as mlp.c_proj) in LoRALinear, so only
the adapters train. B starts at zero, so the wrapped model starts out computing exactly the base
model, and `adapters_disabled(model)` switches them off for a while (DPO's reference model is
the base, held once). `load_adapters(model, adapters)` wraps layers around given A and B (an imported
PEFT adapter, gpt/lora_peft.py), and `merge_adapters(model)` folds them in place for decoding. `merged_state_dict(model)` folds W + (alpha / rank) * B @ A back into plain GPT weights:
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
    """y = base(x) + scale * dropout(x) @ A^T @ B^T, with base frozen and A (r, in), B (out, r) trained.

    `blocks` ((first row, end row, rank), in A's order) makes B block diagonal: each block maps its own rank
    slice of A to its own rows only, through a fixed mask that training keeps. It holds separate adapters of
    the parts of a fused layer (a PEFT adapter's q/k/v_proj on our c_attn). `scale` overrides alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None, *, scale: float | None = None,
                 blocks: list[tuple[int, int, int]] | None = None):
        super().__init__()
        self.base = base
        self.scale = alpha / rank if scale is None else scale
        self.blocks = blocks
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        # kaiming-uniform as nn.Linear uses; B = 0 keeps the initial output equal to the base layer's
        bound = 1.0 / math.sqrt(base.in_features)
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)
        self.dropout = nn.Dropout(dropout)
        self.enabled = True
        mask = None
        if blocks is not None:
            mask = torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype)
            offset = 0
            for first, end, r in blocks:
                mask[first:end, offset:offset + r] = 1
                offset += r
            if offset != rank:
                raise ValueError(f"blocks hold rank {offset}, not {rank}")
        self.register_buffer("mask", mask, persistent=False)  # None: B is whole

    def B(self) -> torch.Tensor:
        """B as the layer applies it (masked to its blocks)."""
        return self.lora_B if self.mask is None else self.lora_B * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.B().t()) * self.scale

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + (self.B() @ self.lora_A) * self.scale


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


def load_adapters(model: nn.Module, adapters: dict[str, dict]) -> None:
    """Freeze `model` and wrap each named Linear in a LoRALinear holding the given weights: `adapters` maps a
    layer name to dict(A=(r, in), B=(out, r), scale=float, blocks=None or LoRALinear's blocks)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, a in adapters.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        w = base.weight
        layer = LoRALinear(base, a["A"].shape[0], 1.0, 0.0, torch.Generator(), scale=a["scale"],
                           blocks=a.get("blocks"))  # its own generator: the global RNG stays untouched
        with torch.no_grad():
            layer.lora_A.copy_(a["A"].to(w.dtype))
            layer.lora_B.copy_(a["B"].to(w.dtype))
        setattr(parent, child, layer.to(w.device))


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear into a plain Linear in place (W + scale * B @ A): the ordinary GPT, trainable
    again, that a LoRA run's checkpoints hold. Returns `model`."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    with torch.no_grad():
        for name, layer in layers:
            layer.base.weight.copy_(layer.merged_weight())
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


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
