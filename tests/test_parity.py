"""One forward pass: cached decoding computes the uncached model for every ModelConfig option.

The levels above this one check the same promise once each: tests/test_generate.py under continuous
batching (requests joining a running batch, the uncached engine alongside), tests/test_sample_cli.py
through sample.py's --no-kv-cache.

OPTIONS lists, for every field of ModelConfig, the values the parity tests try; a field added to
ModelConfig without a row here fails `test_every_model_option_is_covered`, so a new option cannot
skip the parity check; REQUIRES names the companions that make an option matter. VARIANTS adds the model states that are not config fields (LoRA, a vocabulary
grown for chat tokens, padded vocabulary rows). Parity is checked in float32: bf16 matmuls of one
row and of a whole window reduce in different orders, so there cached and uncached greedy decoding
may part after a near-tie (docs/sampling.md#where-cached-uncached-holds).
"""

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from gpt.config import LoRAConfig, ModelConfig
from gpt.infer.engine import generate
from gpt.infer.sampling import SamplingParams
from gpt.lora import apply_lora, merged_state_dict
from gpt.model import GPT, KVCache

ROOT = Path(__file__).resolve().parents[1]

BASE = dict(n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=40, dropout=0.1)
OPTIONS = {
    "block_size": [5, 12],
    "vocab_size": [40, 70],
    "vocab_multiple": [1, 64],
    "n_layer": [1, 3],
    "n_head": [1, 4],
    "n_embd": [16, 24],
    "dropout": [0.0, 0.3],  # eval mode: dropout is off in both paths
    "bias": [True, False],
    "gelu": ["tanh", "exact"],
    "fused_loss": ["off", "on"],  # changes only how the loss is computed with targets; logits never
    "norm": ["layernorm", "rmsnorm"],
    "norm_eps": [1e-5, 1e-2],
    "norm_offset": [0.0, 1.0],
    "post_norms": [False, True],
    "embed_scale": [False, True],
    "position": ["learned", "rope"],
    "rope_theta": [10000.0, 500.0],
    "rope_local_theta": [0.0, 100.0],
    "rope_scaling": ["none", "linear", "llama3"],
    "rope_factor": [1.0, 4.0],
    "rope_low_freq_factor": [1.0, 2.0],
    "rope_high_freq_factor": [4.0, 8.0],
    "rope_original_context": [8192, 8],
    "mlp": ["gelu", "swiglu", "geglu", "relu2"],
    "intermediate_size": [0, 24],
    "n_kv_head": [0, 1, 2],
    "head_dim": [0, 12],
    "qk_norm": [False, True],
    "qkv_bias": [False, True],
    "tie_embeddings": [True, False],
    "logit_softcap": [0.0, 2.0],
    "sliding_window": [0, 3],
    "sliding_window_pattern": [0, 2],
}
# what makes an option matter: its companions (a rotary base needs rotary positions, ...)
ROPE = dict(position="rope")
LLAMA3 = dict(ROPE, rope_scaling="llama3", rope_factor=4.0, rope_original_context=8)  # 8: bands at head_dim 8
REQUIRES = {
    "norm_eps": dict(norm="rmsnorm"), "norm_offset": dict(norm="rmsnorm"),
    "rope_theta": ROPE, "rope_scaling": dict(LLAMA3, rope_factor=4.0), "rope_factor": dict(ROPE, rope_scaling="linear"),
    "rope_low_freq_factor": LLAMA3, "rope_high_freq_factor": LLAMA3, "rope_original_context": LLAMA3,
    "rope_local_theta": dict(ROPE, sliding_window=3, sliding_window_pattern=2),
    "n_kv_head": dict(n_head=4), "head_dim": ROPE, "qkv_bias": dict(bias=False),
    "sliding_window": ROPE, "sliding_window_pattern": dict(ROPE, sliding_window=3),
}
VARIANTS = ["plain", "lora", "lora_merged", "chat_vocab", "untied_head"]


def test_every_model_option_is_covered():
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert fields == set(OPTIONS), f"add the new ModelConfig option(s) {fields - set(OPTIONS)} to OPTIONS"


def build(field: str, value, variant: str = "plain") -> GPT:
    kw = {**BASE, **REQUIRES.get(field, {}), field: value}
    if field == "vocab_multiple":  # as training builds it: the vocabulary rounded up
        kw["vocab_size"] = -(-kw["vocab_size"] // value) * value
    torch.manual_seed(0)
    model = GPT(ModelConfig(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.5 if "ln" not in name else 0.1).add_(1.0 if name.endswith("ln_1.weight") else 0.0)
    if variant in ("lora", "lora_merged"):
        apply_lora(model, LoRAConfig(rank=2, alpha=4.0, targets=["c_attn", "c_fc"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
        if variant == "lora_merged":
            merged = GPT(model.config)
            merged.load_state_dict(merged_state_dict(model))
            model = merged
    elif variant == "chat_vocab":
        model.resize_vocab(model.config.vocab_size + 4)
    elif variant == "untied_head":
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone().mul_(0.5))
    return model.eval()


CASES = [(f, v, "plain") for f, vs in OPTIONS.items() for v in vs] + [("bias", True, v) for v in VARIANTS[1:]]


def cached_steps_give_the_uncached_logits(model: GPT) -> None:
    """Rows of different lengths in one cache, each decoding at its own position, one token at a time."""
    block, V = model.config.block_size, model.config.vocab_size
    seqs = torch.randint(0, V, (3, block), generator=torch.Generator().manual_seed(1))
    lengths = [1, block // 2, block - 1]  # prefilled tokens per row
    cache = KVCache.empty(model.config, 3, block, "cpu", torch.float32)
    with torch.no_grad():
        for r, n in enumerate(lengths):
            if n > 1:
                row = KVCache(cache.k[:, r : r + 1], cache.v[:, r : r + 1])
                model(seqs[r : r + 1, : n - 1], kv_cache=row, start_pos=0)
        pos = torch.tensor(lengths) - 1
        for _ in range(2):
            last = seqs[torch.arange(3), pos.clamp(max=block - 1)][:, None]
            step = model(last, kv_cache=cache, start_pos=pos.clamp(max=block - 1), logits_to_keep=1)[0][:, -1]
            for r in range(3):
                p = min(int(pos[r]), block - 1)
                ref = model(seqs[r : r + 1, : p + 1])[0][0, -1]
                torch.testing.assert_close(step[r], ref, rtol=0, atol=1e-5)
            pos = pos + 1
            if int(pos.max()) >= block:
                break


@pytest.mark.parametrize("field,value,variant", CASES)
def test_cached_decoding_computes_the_uncached_model(field, value, variant):
    """The logits of cached steps at per-row positions (continuous batching: rows of different lengths,
    one token at a time) are the uncached model's; greedy and sampled decoding past the window (the
    window slides; the sampled prompt is longer than the window) give the same tokens either way."""
    model = build(field, value, variant)
    cached_steps_give_the_uncached_logits(model)
    idx = torch.randint(0, model.config.vocab_size, (2, 3), generator=torch.Generator().manual_seed(2))
    n = 2 * model.config.block_size + 3  # the window slides
    params = SamplingParams(temperature=0)
    assert torch.equal(generate(model, idx, n, params), generate(model, idx, n, params, use_kv_cache=False))
    long = torch.randint(0, model.config.vocab_size, (2, model.config.block_size + 3),
                         generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=1.0, top_k=10, seed=5)
    assert torch.equal(generate(model, long, n, params), generate(model, long, n, params, use_kv_cache=False))


# the architecture options of configs/shakespeare_modern.yaml (RoPE, RMSNorm, SwiGLU, QK-norm, untied head)
MODERN_KEYS = ("position", "norm", "mlp", "qk_norm", "tie_embeddings", "bias")
MODERN = {k: v for k, v in yaml.safe_load((ROOT / "configs" / "shakespeare_modern.yaml").read_text())["model"].items()
          if k in MODERN_KEYS}


def briefly_trained(**options) -> tuple[GPT, list[int]]:
    """A char model trained for a few seconds on the README (float32): peaked, near-tie-prone logits."""
    text = (ROOT / "README.md").read_text()[:20000]
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=len(chars), **options))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, len(data) - 33, (16,), generator=gen)
        batch = torch.stack([data[s : s + 33] for s in starts.tolist()])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), [chars.index(c) for c in "## Training\n"]


@pytest.mark.parametrize("options", [dict(gelu="exact", bias=False), dict(gelu="tanh", bias=True), MODERN],
                         ids=["exact-nobias", "tanh-bias", "modern"])
def test_trained_model_cached_greedy_equals_uncached_for_300_tokens(options):
    model, prompt = briefly_trained(**options)
    idx = torch.tensor([prompt])
    params = SamplingParams(temperature=0)
    cached = generate(model, idx, 300, params)  # block_size 32: the window slides about 18 times
    assert torch.equal(cached, generate(model, idx, 300, params, use_kv_cache=False))
    assert len(set(cached[0].tolist())) > 5


def test_the_modern_options_are_the_modern_config():
    assert MODERN == dict(position="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, tie_embeddings=False,
                          bias=False)
