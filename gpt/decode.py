"""A lean one-token forward pass for cached decoding: the same math as GPT.forward, minus the overhead.

Decoding one token is a chain of matrix-vector products, and on a CPU two costs dominate:
  * memory bandwidth: every weight is read once per token. CPU BLAS reads a weight stored as
    (in, out) -- GPT-2's original Conv1D layout -- markedly faster in a vector-matrix product than
    nn.Linear's (out, in), so on CPU the decoder keeps transposed copies of the matrices (on GPUs
    both layouts are equally fast and the decoder uses views, no copy);
  * Python overhead: a small model (the character-level Shakespeare one) spends most of its time
    in nn.Module calls, view/transpose chains and dropout no-ops. Calling the functional ops
    directly halves the time per token.

The KV cache is model.KVCache, filled by GPT.forward during prefill; tests check that this step
gives the logits of GPT.forward and that cached decoding reproduces uncached decoding.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from gpt.model import MLP, GPT, Block, CausalSelfAttention, KVCache

# Module types whose math Decoder.step reproduces; anything else (an adapter wrapping a Linear,
# a subclass with other math) makes `supports` false and generation uses GPT.forward instead.
KNOWN_MODULES = (GPT, Block, CausalSelfAttention, MLP, torch.nn.ModuleDict, torch.nn.ModuleList, torch.nn.Linear,
                 torch.nn.LayerNorm, torch.nn.Embedding, torch.nn.Dropout, torch.nn.GELU)


_DECODERS: "weakref.WeakKeyDictionary[GPT, tuple[tuple, Decoder]]" = weakref.WeakKeyDictionary()


class Decoder:
    """decoder.step(tokens (B,), pos, cache) -> logits (B, vocab) for the token at position pos."""

    @classmethod
    def for_model(cls, model: GPT) -> "Decoder | None":
        """The decoder of `model`, built once and reused while its weights are unchanged (building
        copies every matrix: ~0.4 s for 124M parameters); None for models it does not support."""
        if not cls.supports(model):
            return None
        fingerprint = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in model.parameters())
        cached = _DECODERS.get(model)
        if cached is None or cached[0] != fingerprint:
            _DECODERS.pop(model, None)  # free the old copies before making new ones
            cached = (fingerprint, cls(model))
            _DECODERS[model] = cached
        return cached[1]

    def __init__(self, model: GPT):
        cfg = model.config
        self.n_embd, self.n_head = cfg.n_embd, cfg.n_head
        device = model.lm_head.weight.device
        # (in, out) copies on CPU (see module doc); zero-copy transposed views elsewhere
        t = (lambda w: w.detach().t().contiguous()) if device.type == "cpu" else (lambda w: w.detach().t())
        d = lambda p: None if p is None else p.detach()  # noqa: E731  (bias=False models have no biases)
        tr = model.transformer
        self.wte, self.wpe = tr.wte.weight.detach(), tr.wpe.weight.detach()
        self.layers = [
            (d(b.ln_1.weight), d(b.ln_1.bias), t(b.attn.c_attn.weight), d(b.attn.c_attn.bias),
             t(b.attn.c_proj.weight), d(b.attn.c_proj.bias), d(b.ln_2.weight), d(b.ln_2.bias),
             t(b.mlp.c_fc.weight), d(b.mlp.c_fc.bias), t(b.mlp.c_proj.weight), d(b.mlp.c_proj.bias))
            for b in tr.h
        ]
        self.ln_f = (d(tr.ln_f.weight), d(tr.ln_f.bias))
        self.lm_head = t(model.lm_head.weight)  # tied to wte in the model; a separate (in, out) copy on CPU

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        return all(type(m) in KNOWN_MODULES for m in model.modules()) and not model._forward_hooks

    def step(self, tokens: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
        B, C, nh = tokens.shape[0], self.n_embd, self.n_head
        x = F.embedding(tokens, self.wte) + self.wpe[pos]  # (B, C)
        for (l1w, l1b, aw, ab, pw, pb, l2w, l2b, fw, fb, mw, mb), k_cache, v_cache in zip(self.layers, cache.k, cache.v):
            h = F.layer_norm(x, (C,), l1w, l1b)
            qkv = _linear(h, aw, ab).view(B, 3, nh, 1, C // nh)  # (B, q/k/v, nh, T=1, hd)
            k_cache.select(2, pos).copy_(qkv[:, 1, :, 0])  # k_cache: (B, nh, max_len, hd)
            v_cache.select(2, pos).copy_(qkv[:, 2, :, 0])
            y = F.scaled_dot_product_attention(qkv[:, 0], k_cache.narrow(2, 0, pos + 1), v_cache.narrow(2, 0, pos + 1))
            x = x + _linear(y.view(B, C), pw, pb)
            h = F.gelu(_linear(F.layer_norm(x, (C,), l2w, l2b), fw, fb), approximate="tanh")
            x = x + _linear(h, mw, mb)
        return F.layer_norm(x, (C,), *self.ln_f) @ self.lm_head


def _linear(x: torch.Tensor, w_in_out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x @ w_in_out if bias is None else torch.addmm(bias, x, w_in_out)
