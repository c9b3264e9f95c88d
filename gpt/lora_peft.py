"""A LoRA run's adapters in PEFT's format, on the Hugging Face module names of our `to-hf` export.

`write_peft_adapter(model, cfg, folder, base)` writes `adapter_config.json` + `adapter_model.safetensors`,
which `peft.PeftModel.from_pretrained(<transformers model of the base's to-hf export>, folder)` loads.
GPT-2's layers are Conv1D there (weights stored transposed): PEFT's `fan_in_fan_out=True` transposes the
delta, so A (r, in) and B (out, r) go across as they are. The families split our fused layers (c_attn into
q/k/v_proj, c_fc into gate/up_proj): B @ A split by rows is (B_q @ A, B_k @ A, B_v @ A), so each projection
gets its rows of B and a copy of the shared A, and keeps rank r. The delta of every weight is unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from gpt.config import LoRAConfig, ModelConfig
from gpt.hf_families import weight_map
from gpt.lora import LoRALinear

PREFIX = "base_model.model."


def hf_lora_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's tensors (without PREFIX) for every LoRALinear in `model`, under the Hugging Face module names."""
    cfg: ModelConfig = model.config
    split = {} if cfg.position == "learned" else {ours[: -len(".weight")]: theirs for ours, theirs in weight_map(cfg)}
    qkv = [cfg.n_head * cfg.head_size, cfg.kv_heads * cfg.head_size, cfg.kv_heads * cfg.head_size]
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        A, B = module.lora_A.detach().cpu(), module.lora_B.detach().cpu()
        if cfg.position == "learned":  # GPT-2: the same module names
            parts = [(name, B)]
        else:
            theirs = [t[: -len(".weight")] for t in split[name]]
            sizes = qkv if len(theirs) == 3 else [cfg.ffn_size] * 2 if len(theirs) == 2 else [B.shape[0]]
            parts = list(zip(theirs, B.split(sizes)))
        for hf_name, b in parts:
            out[f"{hf_name}.lora_A.weight"] = A.clone().contiguous()
            out[f"{hf_name}.lora_B.weight"] = b.clone().contiguous()
    return out


def write_peft_adapter(model: torch.nn.Module, lora: LoRAConfig, folder: str | Path, base: str) -> Path:
    """Write `folder`/adapter_config.json and adapter_model.safetensors; `base` is init_from as given."""
    tensors = hf_lora_tensors(model)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "bias": "none",
        "target_modules": modules, "fan_in_fan_out": model.config.position == "learned",  # GPT-2's Conv1D
        "use_rslora": False, "use_dora": False, "inference_mode": True, "modules_to_save": None,
    }
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    save_file({PREFIX + k: v for k, v in tensors.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out
