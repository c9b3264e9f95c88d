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

from gpt.model import GPT, MLP, Block, CausalSelfAttention, KVCache

# Module types whose math Decoder.step reproduces; anything else (an adapter wrapping a Linear,
# a subclass with other math) makes `supports` false and generation uses GPT.forward instead.
KNOWN_MODULES = (GPT, Block, CausalSelfAttention, MLP, torch.nn.ModuleDict, torch.nn.ModuleList, torch.nn.Linear,
                 torch.nn.LayerNorm, torch.nn.Embedding, torch.nn.Dropout, torch.nn.GELU)


_DECODERS: "weakref.WeakKeyDictionary[GPT, tuple[tuple, Decoder]]" = weakref.WeakKeyDictionary()


class Decoder:
    """decoder.forward(tokens (B, T), pos, cache) -> logits (B, vocab) of the last token: the prefill
    (pos 0) and every decoding step (T = 1) of cached generation."""

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

    def forward(self, tokens: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
        """tokens (B, T) at positions pos.. -> logits (B, vocab) of the last one; writes their keys and
        values into the cache. Either a prefill (pos 0, any T) or one decoding step (T = 1)."""
        B, T = tokens.shape
        if T > 1 and pos != 0:
            raise ValueError("Decoder.forward takes a prefill from position 0 or a single token")
        C, nh = self.n_embd, self.n_head
        x = (F.embedding(tokens, self.wte) + self.wpe[pos : pos + T]).view(B * T, C)
        for (l1w, l1b, aw, ab, pw, pb, l2w, l2b, fw, fb, mw, mb), k_cache, v_cache in zip(self.layers, cache.k, cache.v):
            h = torch.layer_norm(x, (C,), l1w, l1b)
            qkv = _linear(h, aw, ab).view(B, T, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # each (B, nh, T, hd)
            k_cache.narrow(2, pos, T).copy_(k)  # k_cache: (B, nh, max_len, hd)
            v_cache.narrow(2, pos, T).copy_(v)
            # is_causal is right here: with pos 0 queries and keys start together; T = 1 sees everything
            y = F.scaled_dot_product_attention(q, k_cache.narrow(2, 0, pos + T), v_cache.narrow(2, 0, pos + T),
                                               is_causal=T > 1)
            x = x + _linear(y.transpose(1, 2).reshape(B * T, C), pw, pb)
            h = F.gelu(_linear(torch.layer_norm(x, (C,), l2w, l2b), fw, fb), approximate="tanh")
            x = x + _linear(h, mw, mb)
        return torch.layer_norm(x.view(B, T, C)[:, -1], (C,), *self.ln_f) @ self.lm_head


def _linear(x: torch.Tensor, w_in_out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x @ w_in_out if bias is None else torch.addmm(bias, x, w_in_out)
