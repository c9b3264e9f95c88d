"""LoRA adapters in PEFT's format, both ways, on the Hugging Face module names of our `to-hf` export.

`hf_modules(cfg)` is the one map: a Hugging Face module -> our Linear layer and its rows. GPT-2's layers keep
their names; they are Conv1D there (weights stored transposed) and PEFT's `fan_in_fan_out=True` transposes
the delta only, so A (r, in) and B (out, r) are the same tensors either way. The families split our fused
layers (c_attn into q/k/v_proj, c_fc into gate/up_proj).

Export: `write_peft_adapter(model, cfg, folder, base)` writes `adapter_config.json` +
`adapter_model.safetensors`, which `peft.PeftModel.from_pretrained(<transformers model of the base's to-hf
export>, folder)` loads. B @ A split by rows is (B_q @ A, B_k @ A, B_v @ A): each projection gets its rows of
B and a copy of the shared A, and keeps rank r. The delta of every weight is unchanged.

Import: `read_peft_adapter(folder, model)` gives `gpt.lora.load_adapters`'s layers for a model of the
adapter's base. Projections of one fused layer that share one A (our export) become that layer's rank-r
adapter again; separate A's (PEFT trained q/k/v_proj apart) become a block-diagonal one (LoRALinear's
blocks): the same delta, each block trained on its own rows. Whatever PEFT can express and our LoRA cannot
(DoRA, trained biases, modules outside the blocks' Linear layers, a rank per module...) is refused, naming it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt.checkpoint import CheckpointError
from gpt.config import LoRAConfig, ModelConfig
from gpt.hf_families import weight_map
from gpt.lora import LoRALinear

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # the Linear layers of a block
# PEFT settings our LoRA cannot honour, refused when set (non-empty), with the reason
UNSUPPORTED = {
    "use_dora": "DoRA is not supported", "modules_to_save": "whole trained modules are not supported",
    "rank_pattern": "a rank per module is not supported", "alpha_pattern": "an alpha per module is not supported",
    "lora_bias": "LoRA biases are not supported", "trainable_token_indices": "trained token embeddings are not supported",
    "target_parameters": "adapters on parameters are not supported", "layer_replication": "replicated layers are not supported",
    "alora_invocation_tokens": "activated LoRA is not supported", "use_qalora": "QALoRA is not supported",
    "use_bdlora": "block-diagonal LoRA is not supported", "arrow_config": "Arrow routing is not supported",
    "monteclora_config": "MonteCLoRA is not supported", "velora_config": "VeLoRA is not supported",
    "kasa_config": "KaSA is not supported",
}
PLAIN = "gpt loads plain LoRA adapters (r, lora_alpha, target_modules, use_rslora, bias none)"


class AdapterError(CheckpointError):
    """A PEFT adapter folder we cannot read or honour."""


def is_peft_dir(path: str | Path) -> bool:
    """A PEFT adapter folder holds adapter_config.json."""
    return (Path(path) / CONFIG_FILE).is_file()


def hf_modules(cfg: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """Hugging Face module name -> (our Linear layer, first row, end row), for the Linear layers of every block."""
    qkv = [cfg.n_head * cfg.head_size, cfg.kv_heads * cfg.head_size, cfg.kv_heads * cfg.head_size]
    rows = {"attn.c_attn": qkv, "attn.c_proj": [cfg.n_embd], "mlp.c_fc": [cfg.ffn_size] * 2, "mlp.c_proj": [cfg.n_embd]}
    out = {}
    if cfg.position == "learned":  # GPT-2: the same names, whole layers (c_fc is not gated)
        rows["mlp.c_fc"] = [cfg.ffn_size]
        for i in range(cfg.n_layer):
            out.update({f"transformer.h.{i}.{layer}": (f"transformer.h.{i}.{layer}", 0, sum(n)) for layer, n in rows.items()})
        return out
    for ours, theirs in weight_map(cfg):
        layer = ours[: -len(".weight")]
        if not ours.endswith(".weight") or not layer.endswith(LAYERS):
            continue
        first = 0
        for hf, n in zip(theirs, rows[next(t for t in LAYERS if layer.endswith(t))]):
            out[hf[: -len(".weight")]] = (layer, first, first + n)
            first += n
    return out


def hf_lora_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's tensors (without PREFIX) for every LoRALinear in `model`, under the Hugging Face module names."""
    parts: dict[str, list[tuple[str, int, int]]] = {}
    for hf, (ours, first, end) in hf_modules(model.config).items():
        parts.setdefault(ours, []).append((hf, first, end))
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        A, B = module.lora_A.detach().cpu(), module.B().detach().cpu()
        offsets, offset = {}, 0
        for first, end, r in module.blocks or []:
            offsets[(first, end)] = (offset, offset + r)
            offset += r
        for hf_name, first, end in parts[name]:
            if module.blocks is None:
                a, b = A, B[first:end]
            elif (first, end) in offsets:
                lo, hi = offsets[(first, end)]
                a, b = A[lo:hi], B[first:end, lo:hi]
            else:
                continue  # an imported adapter that left this projection alone
            out[f"{hf_name}.lora_A.weight"] = a.clone().contiguous()
            out[f"{hf_name}.lora_B.weight"] = b.clone().contiguous()
    return out


def write_peft_adapter(model: torch.nn.Module, lora: LoRAConfig, folder: str | Path, base: str) -> Path:
    """Write `folder`/adapter_config.json and adapter_model.safetensors; `base` is the base model as given
    (init_from). r and lora_alpha are those of the model's adapters (an imported adapter's own)."""
    tensors = hf_lora_tensors(model)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")}
    scales = {m.scale for m in model.modules() if isinstance(m, LoRALinear)}
    if len(ranks) != 1 or len(scales) != 1:
        raise ValueError(f"adapters of ranks {sorted(ranks)} and scales {sorted(scales)}: PEFT holds one of each")
    r, scale = ranks.pop(), scales.pop()
    alpha = lora.alpha if (r, scale) == (lora.rank, lora.alpha / max(lora.rank, 1)) else scale * r
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": r, "lora_alpha": alpha, "lora_dropout": lora.dropout, "bias": "none",
        "target_modules": modules, "fan_in_fan_out": model.config.position == "learned",  # GPT-2's Conv1D
        "use_rslora": False, "use_dora": False, "inference_mode": True, "modules_to_save": None,
    }
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    save_file({PREFIX + k: v for k, v in tensors.items()}, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


# ---------------------------------------------------------------------------- PEFT -> ours


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """adapter_config.json, checked to describe an adapter our LoRA computes exactly."""
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: unreadable ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: not a PEFT adapter config (a JSON object)")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r} is not supported; {PLAIN}")
    for key, why in UNSUPPORTED.items():
        if config.get(key):
            raise AdapterError(f"{path}: {key}={config[key]!r}: {why}; {PLAIN}")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias={config['bias']!r}: trained biases are not supported; {PLAIN}")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise AdapterError(f"{path}: r must be a positive integer and lora_alpha a number (r={r!r}, lora_alpha={alpha!r})")
    return config


def peft_base(folder: str | Path, override: str = "") -> str:
    """The model an adapter folder adapts: `override` when given, else its base_model_name_or_path."""
    base = override or read_adapter_config(folder).get("base_model_name_or_path") or ""
    if not base:
        raise AdapterError(f"{Path(folder) / CONFIG_FILE}: no base_model_name_or_path; name the base model "
                           "(fine-tuning: adapter_base: DIR)")
    return str(base)


def read_peft_adapter(folder: str | Path, model: torch.nn.Module) -> dict[str, dict]:
    """The adapter of `folder` as `gpt.lora.load_adapters` takes it, for `model` (the adapter's base)."""
    config = read_adapter_config(folder)
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise AdapterError(f"{path}: missing (gpt reads adapters saved as safetensors, PEFT's default)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{path}: unreadable ({e})") from None
    r = config["r"]
    scale = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
    modules = hf_modules(model.config)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, _, kind = key.removeprefix(PREFIX).rpartition(".lora_")
        if not key.startswith(PREFIX) or kind not in ("A.weight", "B.weight"):
            raise AdapterError(f"{path}: tensor {key} is not a LoRA A or B weight of a Linear layer; {PLAIN}")
        if module not in modules:
            raise AdapterError(f"{path}: module {module} is not supported: gpt adapts the attention and MLP "
                               "projections of the blocks only")
        pairs.setdefault(module, {})[kind[0]] = t.float()
    by_layer: dict[str, list[tuple[int, int, torch.Tensor, torch.Tensor]]] = {}
    for module, ab in sorted(pairs.items()):
        ours, first, end = modules[module]
        layer = model.get_submodule(ours)
        A, B = ab.get("A"), ab.get("B")
        if A is None or B is None or A.shape != (r, layer.in_features) or B.shape != (end - first, r):
            shapes = {k: tuple(v.shape) for k, v in ab.items()}
            raise AdapterError(f"{path}: {module}: lora_A and lora_B of shapes ({r}, {layer.in_features}) and "
                               f"({end - first}, {r}) expected, found {shapes}")
        by_layer.setdefault(ours, []).append((first, end, A, B))
    return {ours: _fused(sorted(parts, key=lambda p: p[0]), model.get_submodule(ours).out_features, scale)
            for ours, parts in by_layer.items()}


def _fused(parts: list[tuple[int, int, torch.Tensor, torch.Tensor]], rows: int, scale: float) -> dict:
    """One layer's adapter from its projections' (first row, end row, A, B): one shared A when they all have
    it and cover the layer, else block diagonal."""
    bounds = [0] + [end for _, end, _, _ in parts]
    whole = [(f, e) for f, e, _, _ in parts] == list(zip(bounds, bounds[1:])) and bounds[-1] == rows
    if whole and all(torch.equal(parts[0][2], a) for _, _, a, _ in parts):
        return dict(A=parts[0][2], B=torch.cat([b for *_, b in parts]), scale=scale)
    A = torch.cat([a for _, _, a, _ in parts])
    B = torch.zeros(rows, A.shape[0])
    offset = 0
    for first, end, a, b in parts:
        B[first:end, offset:offset + a.shape[0]] = b
        offset += a.shape[0]
    return dict(A=A, B=B, scale=scale, blocks=[(f, e, a.shape[0]) for f, e, a, _ in parts])
