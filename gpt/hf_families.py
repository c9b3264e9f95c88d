"""Hugging Face's Llama, Qwen2, Qwen3, Mistral and Gemma 3 (text) as our ModelConfig and weights.

Each family is data: which ModelConfig options it sets (`config_from_hf`, `config_to_hf`) and how its
tensor names map to ours (`weight_map`). Our fused tensors are theirs concatenated: c_attn = q_proj,
k_proj, v_proj along the output rows; c_fc = gate_proj, up_proj. Both use the rotate-half rotary layout,
so q and k need no permutation. Norms are named by place: Llama's "post_attention_layernorm" is the norm
before the MLP (our ln_2); Gemma 3's is the norm of the attention output (our post_attn_norm), its
"pre_feedforward_layernorm" our ln_2. GPT-2 lives in gpt/convert.py (Conv1D weights, learned positions).
"""

from __future__ import annotations

from typing import Any

import torch

from gpt.checkpoint import CheckpointError
from gpt.config import ModelConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                 "MistralForCausalLM": "mistral", "Gemma3ForCausalLM": "gemma3_text"}
TIED_BY_DEFAULT = {"gemma3_text"}  # the family's own default when config.json does not say
ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}
SKIPPED = ("rotary_emb.inv_freq",)  # buffers some old exports kept in the state dict


def architecture(hf: dict[str, Any], where: str) -> str:
    """The one architecture name of a config.json, checked to be one we convert."""
    by_type = [a for a, t in ARCHITECTURES.items() if t == hf.get("model_type")]
    names = hf.get("architectures") or by_type
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise CheckpointError(f"{where}: architecture {', '.join(map(str, names)) or hf.get('model_type')!r} is "
                              f"not supported; supported: GPT2LMHeadModel, {', '.join(ARCHITECTURES)}")
    return names[0]


# ---------------------------------------------------------------------------- configs


def _rope(hf: dict[str, Any], layer_type: str, where: str) -> tuple[float, dict[str, Any]]:
    """(theta, scaling dict) for one layer type: transformers 5's rope_parameters (per layer type for
    Gemma 3) or the older rope_theta + rope_scaling (+ Gemma 3's rope_local_base_freq)."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and layer_type in params:
        params = params[layer_type]
    if not isinstance(params, dict) or "rope_theta" not in params:
        scaling = dict(hf.get("rope_scaling") or {})
        theta = hf.get("rope_theta", 10000.0)
        if layer_type == "sliding_attention" and "rope_local_base_freq" in hf:
            theta, scaling = hf["rope_local_base_freq"], {}
        params = {**scaling, "rope_theta": theta}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise CheckpointError(f"{where}: rope scaling {kind!r} is not supported (default, linear, llama3)")
    return float(params["rope_theta"]), {**params, "rope_type": kind}


def _layer_pattern(hf: dict[str, Any], family: str, n_layer: int, where: str) -> tuple[int, int]:
    """(sliding_window, sliding_window_pattern) from the family's layer types."""
    window = hf.get("sliding_window") or 0
    if family == "mistral":
        return window, 0
    if family in ("qwen2", "qwen3") and not hf.get("use_sliding_window"):
        return 0, 0
    types = hf.get("layer_types")
    if types is None and family == "gemma3_text":
        pattern = hf.get("sliding_window_pattern", 6)
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layer)]
    if not types or "sliding_attention" not in types:
        return 0, 0
    for pattern in [0, *range(1, n_layer + 1)]:
        probe = ModelConfig(n_layer=n_layer, sliding_window=max(window, 1), sliding_window_pattern=pattern)
        if [probe.slides(i) for i in range(n_layer)] == [t == "sliding_attention" for t in types]:
            return window, pattern
    raise CheckpointError(f"{where}: layer_types {types} are not every-Nth-layer-global; not expressible here")


def config_from_hf(hf: dict[str, Any], where: str) -> ModelConfig:
    """Our ModelConfig for a Llama/Qwen2/Qwen3/Mistral/Gemma 3 config.json; anything we would compute
    differently is refused in one line naming it."""
    family = ARCHITECTURES[architecture(hf, where)]
    gemma = family == "gemma3_text"
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
               if k not in hf]
    if missing:
        raise CheckpointError(f"{where}: missing {', '.join(missing)}")
    act = hf.get("hidden_activation" if gemma else "hidden_act", "gelu_pytorch_tanh" if gemma else "silu")
    if act not in (("gelu_pytorch_tanh",) if gemma else ("silu",)):
        raise CheckpointError(f"{where}: activation {act!r} is not supported for {family}")
    for flag in ("attention_bias", "mlp_bias", "attn_logit_softcapping"):
        if hf.get(flag):
            raise CheckpointError(f"{where}: {flag}={hf[flag]} is not supported")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or n_embd // n_head
    if gemma and hf.get("query_pre_attn_scalar", head_dim) != head_dim:
        raise CheckpointError(f"{where}: query_pre_attn_scalar {hf['query_pre_attn_scalar']} != head_dim "
                              f"{head_dim} is not supported")
    theta, scaling = _rope(hf, "full_attention", where)
    window, pattern = _layer_pattern(hf, family, hf["num_hidden_layers"], where)
    local_theta = _rope(hf, "sliding_attention", where)[0] if gemma else 0.0
    return ModelConfig(
        block_size=hf.get("max_position_embeddings", 2048), vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
        n_head=n_head, n_embd=n_embd, dropout=0.0, bias=False, gelu="tanh", norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), norm_offset=1.0 if gemma else 0.0, post_norms=gemma, embed_scale=gemma,
        position="rope", rope_theta=theta, rope_local_theta=local_theta, rope_scaling=ROPE_TYPES[scaling["rope_type"]],
        rope_factor=float(scaling.get("factor", 1.0)), rope_low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        rope_original_context=int(scaling.get("original_max_position_embeddings", 8192)),
        mlp="geglu" if gemma else "swiglu", intermediate_size=hf["intermediate_size"],
        n_kv_head=hf.get("num_key_value_heads") or n_head, head_dim=head_dim,
        qk_norm=family in ("qwen3", "gemma3_text"), qkv_bias=family == "qwen2",
        tie_embeddings=hf.get("tie_word_embeddings", family in TIED_BY_DEFAULT),
        logit_softcap=float(hf.get("final_logit_softcapping") or 0.0), sliding_window=window,
        sliding_window_pattern=pattern,
    )


def family_of(cfg: ModelConfig) -> str:
    """The Hugging Face architecture that computes this config (checked by converting back)."""
    if cfg.post_norms:
        return "Gemma3ForCausalLM"
    if cfg.qk_norm:
        return "Qwen3ForCausalLM"
    if cfg.qkv_bias:
        return "Qwen2ForCausalLM"
    return "MistralForCausalLM" if cfg.sliding_window else "LlamaForCausalLM"


def config_to_hf(cfg: ModelConfig, bos_id: int | None, eos_id: int | None) -> dict[str, Any]:
    """config.json for `cfg`; refused (CheckpointError) unless reading it back gives `cfg` again."""
    arch = family_of(cfg)
    family, gemma = ARCHITECTURES[arch], arch == "Gemma3ForCausalLM"
    scaling = {"none": None, "linear": {"rope_type": "linear", "factor": cfg.rope_factor},
               "llama3": {"rope_type": "llama3", "factor": cfg.rope_factor,
                          "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                          "original_max_position_embeddings": cfg.rope_original_context}}[cfg.rope_scaling]
    hf = {
        "architectures": [arch], "model_type": family, "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.ffn_size, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size, "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": scaling,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": "float32",
        "hidden_act" if not gemma else "hidden_activation": "gelu_pytorch_tanh" if gemma else "silu",
    }
    if family in ("qwen2", "qwen3"):
        hf.update(use_sliding_window=False, sliding_window=None)
    if family == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    if gemma:
        hf.update(sliding_window=cfg.sliding_window or cfg.block_size, query_pre_attn_scalar=cfg.head_size,
                  rope_local_base_freq=cfg.rope_local_theta or cfg.rope_theta,
                  final_logit_softcapping=cfg.logit_softcap or None, attn_logit_softcapping=None,
                  layer_types=["sliding_attention" if cfg.slides(i) else "full_attention" for i in range(cfg.n_layer)])
    back = config_from_hf(hf, "export")
    expected = ModelConfig(**{**vars(cfg), "dropout": 0.0, "fused_loss": back.fused_loss,
                              "vocab_multiple": back.vocab_multiple})
    if back != expected:
        diff = [k for k in vars(cfg) if getattr(back, k) != getattr(expected, k)]
        raise CheckpointError(f"this model has no Hugging Face {arch} form: {', '.join(diff)} differ; nothing was written")
    return hf


# ---------------------------------------------------------------------------- weights


def weight_map(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...]]]:
    """(our tensor, the Hugging Face tensors concatenated along dim 0 to make it), for every tensor."""
    layer = [("attn.c_attn.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")),
             ("attn.c_proj.weight", ("self_attn.o_proj.weight",)),
             ("mlp.c_fc.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
             ("mlp.c_proj.weight", ("mlp.down_proj.weight",)),
             ("ln_1.weight", ("input_layernorm.weight",))]
    if cfg.qkv_bias:
        layer.append(("attn.c_attn.bias", ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")))
    if cfg.qk_norm:
        layer += [("attn.q_norm.weight", ("self_attn.q_norm.weight",)), ("attn.k_norm.weight", ("self_attn.k_norm.weight",))]
    if cfg.post_norms:
        layer += [("post_attn_norm.weight", ("post_attention_layernorm.weight",)),
                  ("ln_2.weight", ("pre_feedforward_layernorm.weight",)),
                  ("post_mlp_norm.weight", ("post_feedforward_layernorm.weight",))]
    else:
        layer.append(("ln_2.weight", ("post_attention_layernorm.weight",)))
    names = [("transformer.wte.weight", ("model.embed_tokens.weight",)), ("transformer.ln_f.weight", ("model.norm.weight",))]
    names += [(f"transformer.h.{i}.{ours}", tuple(f"model.layers.{i}.{t}" for t in theirs))
              for i in range(cfg.n_layer) for ours, theirs in layer]
    return names + ([] if cfg.tie_embeddings else [("lm_head.weight", ("lm_head.weight",))])


def weights_from_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """Our state dict from a family's; a missing or unexpected tensor is named."""
    mapping = weight_map(cfg)
    used = {t for _, theirs in mapping for t in theirs} | ({"lm_head.weight"} if cfg.tie_embeddings else set())
    missing = sorted({t for _, theirs in mapping for t in theirs} - set(state))
    unexpected = sorted(n for n in set(state) - used if not n.endswith(SKIPPED))
    if missing or unexpected:
        raise CheckpointError(f"{where}: does not fit {family_of(cfg)}: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return {ours: torch.cat([state[t] for t in theirs]) if len(theirs) > 1 else state[theirs[0]]
            for ours, theirs in mapping}


def weights_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A family's state dict from ours: fused tensors split back at their Hugging Face sizes."""
    qkv = [cfg.n_head * cfg.head_size, cfg.kv_heads * cfg.head_size, cfg.kv_heads * cfg.head_size]
    out = {}
    for ours, theirs in weight_map(cfg):
        sizes = qkv if len(theirs) == 3 else [cfg.ffn_size] * 2 if len(theirs) == 2 else [state[ours].shape[0]]
        out.update({t: part.contiguous() for t, part in zip(theirs, state[ours].split(sizes))})
    return out
