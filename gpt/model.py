"""The decoder-only transformer: one file, no training, no files, no tokenizer.

One forward pass for GPT-2 and the families after it: what differs is data in ModelConfig (norm,
position, mlp, heads, biases, ...), never a subclass; the defaults are GPT-2 exactly. Parameter
names follow GPT-2 (transformer.wte, transformer.h.N.attn.c_attn, ...) whatever the family: queries,
keys and values come from one fused `c_attn` (n_head + 2 n_kv_head heads), a gated MLP's gate and up
projections from one fused `c_fc` (gate first), so LoRA and int8 target the same names everywhere;
gpt/convert.py and gpt/hf_families.py map them to Hugging Face's names.

Rotary embeddings use Hugging Face's rotate-half layout (pairs i and i + head_dim / 2), angles computed
in fp32 from the per-row positions below; grouped-query attention keeps n_kv_head heads in the cache
and repeats them only inside attention; sliding-window layers read their own view of the positions
(`Positions.local`: the window's mask and, for Gemma 3, their own rotary base).

Positions and masks. GPT.forward turns its arguments into one `Positions`, once per call, and every
layer reads it: `pos`, the position of each token, a (B, T) tensor, or (1, T) when every row shares it
(it indexes wpe, or the rotary angles `rope`), and `mask`, the answer of the one mask
builder, `attention_mask`: CAUSAL (SDPA's is_causal, the fast path), None (every key) or a boolean
(B or 1, 1, T, keys) tensor, True where a query may attend. A query sees the keys at its own position
and before, inside its own document, and in a sliding layer only the last `window` of them. Neither
the rotary embedding nor the window needs to know which of the cases below it is in.

| call                                  | pos                         | keys attended        | mask                               |
| ------------------------------------- | --------------------------- | -------------------- | ---------------------------------- |
| training, scoring (no cache)          | 0..T-1, shared (1, T)       | the T tokens         | CAUSAL                             |
| packed rows (doc_ids, no cache)       | restart at each document    | the T tokens         | (B, 1, T, T) causal, same document |
| prefill: cache, start_pos=0           | 0..T-1, shared              | cache[:T]            | CAUSAL                             |
| chunked prefill: cache, start_pos=s>0 | s..s+T-1, shared            | cache[:s+T]          | (1, 1, T, s+T)                     |
| decode: cache, start_pos=s, T=1       | s, shared                   | cache[:s+1]          | None                               |
| per-row starts: cache, start_pos (B,) | start_pos[b].., one per row | the whole cache view | (B, 1, T, max_len)                 |

The last row is continuous batching: each row of the cache holds a sequence of its own length,
and the mask hides each row's unused tail.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gpt.config import ModelConfig
from gpt.losses import IGNORE_INDEX, cross_entropy, linear_cross_entropy

__all__ = ["GPT", "KVCache", "Positions", "attention_mask", "CAUSAL", "IGNORE_INDEX", "cross_entropy"]
FUSED_LOSS_MIN_LOGITS = 2**25  # "auto" fuses head + loss on CPU from this many logits a batch (128 MB in fp32)
MATMUL_ATTENTION_SCORES = (2**11, 2**24)  # CPU bf16 attention with this many scores uses matmul_attention
CAUSAL = "causal"  # attention_mask's answer when plain causal attention applies (SDPA's is_causal=True)


@dataclass
class KVCache:
    """Pre-allocated keys and values for every layer: (n_layer, B, n_kv_head, max_len, head_dim)."""

    k: torch.Tensor
    v: torch.Tensor
    whole: "KVCache | None" = None  # the cache this is a view of (its first rows and slots): row writes index it

    @classmethod
    def empty(cls, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype) -> "KVCache":
        shape = (cfg.n_layer, batch_size, cfg.kv_heads, max_len, cfg.head_size)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def layer(self, i: int) -> "LayerCache":
        return LayerCache(self.k[i], self.v[i], self.whole, i)


class LayerCache(NamedTuple):
    """One layer's keys and values (B, n_kv_head, max_len, head_dim); whole/layer: where the per-row write goes
    when they are a view of a larger cache (compiled_decode.decode_step): whole.k[layer, rows, :, pos]. Traced,
    a write into the view copied the whole cache every layer and step; into the whole cache it stays in place."""

    k: torch.Tensor
    v: torch.Tensor
    whole: KVCache | None = None
    layer: int = 0


@dataclass(frozen=True)
class Positions:
    """Where one forward call's tokens sit and what they attend to; built once, read by every layer.

    pos: (B, T) position of each token, or (1, T) when all rows share them. In a KV cache a token's
        keys and values live at its position.
    mask: attention_mask's answer for these queries: CAUSAL, None (every key) or a boolean tensor.
    start: the first position when every row's tokens sit at start, start+1, ... (an int start_pos):
        the cache is written as one slice and attention sees its first start + T slots. None: each
        row at its own positions, written row by row; attention sees the whole cache view.
    rope: (cos, sin), (B or 1, 1, T, head_dim), the rotary angles of `pos` (computed in fp32, then held in
        the weights' dtype, once for every layer); None for learned positions.
    local: the same tokens as sliding-window layers see them (their mask and rotary angles); None when
        no layer slides.
    rows: (B, 1) row numbers when start is None: the cache write's row index, built once for every layer.
    """

    pos: torch.Tensor
    mask: torch.Tensor | str | None
    start: int | None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    local: "Positions | None" = None
    rows: torch.Tensor | None = None


def attention_mask(q_pos: torch.Tensor, cache_len: int | None = None, docs: torch.Tensor | None = None, *,
                   shared: bool = False, window: int = 0) -> torch.Tensor | str | None:
    """The one mask builder: which keys each query may attend to (see the table in the module docstring).

    q_pos: (B or 1, T) query positions. cache_len: keys are cache slots 0..cache_len-1, each at its own
    position; None: the keys are the queries themselves. docs: (B, T) document of each token (packed
    rows, keys = queries). shared: every row's queries sit at the same consecutive positions, the last T
    keys (an int start_pos), so the answer needs no tensor: CAUSAL when the queries are all the keys,
    None for one query. Otherwise a boolean (B or 1, 1, T, keys) mask, True = attend: a query sees the
    keys at its position and before, in its own document. window > 0: only the last `window` of those
    keys, its own included (a sliding-window layer).
    """
    T = q_pos.shape[-1]
    keys = T if cache_len is None else cache_len
    if shared and docs is None and (not window or keys <= window):  # the window hides nothing
        if keys == T:
            return CAUSAL  # SDPA's triangle is aligned to the top left: right when queries = keys
        if T == 1:
            return None  # one new token sees every key before it
    k_pos = q_pos if cache_len is None else torch.arange(cache_len, device=q_pos.device)[None]
    visible = k_pos[:, None, :] <= q_pos[:, :, None]  # (B or 1, T, keys)
    if window:
        visible = visible & (k_pos[:, None, :] > q_pos[:, :, None] - window)
    if docs is not None:
        visible = visible & (docs[:, None, :] == docs[:, :, None])
    return visible[:, None]


@functools.lru_cache(maxsize=16)
def rope_frequencies(head_dim: int, theta: float, scaling: str, factor: float, low: float, high: float,
                     original: int, device: torch.device) -> torch.Tensor:
    """The (head_dim / 2,) fp32 inverse frequencies of the rotary embedding, as Hugging Face computes them.

    linear: every frequency divided by factor (positions stretched). llama3: wavelengths longer than
    original / low divided by factor, shorter than original / high kept, the band between interpolated.
    """
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    if scaling == "linear":
        return inv / factor
    if scaling == "llama3":
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > original / low, inv / factor, inv)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < original / high) * ~(wavelen > original / low)
        return torch.where(medium, smoothed, scaled)
    return inv


def rope_angles(pos: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of each position's angles, fp32 (B or 1, T, head_dim): both halves share a frequency."""
    freqs = pos[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate (B, nh, T, hd) queries or keys in the rotate-half layout: pairs i and i + hd/2; rope's
    (cos, sin) are (B or 1, 1, T, hd) (a no-op cast unless autocast computes x in another dtype)."""
    cos, sin = (t.to(x.dtype) for t in rope)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _document_positions(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions restarting at each document of packed rows, and each token's document (run) number.

    A document is a run of equal doc_ids; numbering the runs keeps a repeated id apart from its earlier run.
    """
    B, T = doc_ids.shape
    t = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values
    return t - first, starts.cumsum(dim=1)


def _write_cache(layer_cache: LayerCache, k: torch.Tensor, v: torch.Tensor, at: Positions):
    """Store this call's keys/values (B, nh, T, hd) at their positions; return the keys/values attended."""
    cache_k, cache_v, whole, layer = layer_cache  # (B, nh, max_len, hd)
    if at.start is None:  # each row at its own positions: cache[b, :, pos[b, t]] = k[b, :, t]
        rows = at.rows if at.rows is not None else torch.arange(k.shape[0], device=k.device)[:, None]
        if whole is None:
            _write_rows(cache_k, cache_v, k, v, (rows,), at.pos)
        else:
            _write_rows(whole.k, whole.v, k, v, (torch.full_like(rows, layer), rows), at.pos)
        return cache_k, cache_v  # the mask hides each row's unused tail
    end = at.start + k.shape[2]
    cache_k[:, :, at.start : end] = k
    cache_v[:, :, at.start : end] = v
    return cache_k[:, :, :end], cache_v[:, :, :end]


def _write_rows(cache_k: torch.Tensor, cache_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                index: tuple[torch.Tensor, ...], pos: torch.Tensor) -> None:
    """cache[*index, :, pos[b, t]] = k[b, :, t] (and v), index: (rows,) or (layer, rows), each (B, 1) -
    index_put (scatter_ on this layout copied the whole cache)."""
    cache_k[(*index, slice(None), pos)] = k.transpose(1, 2).to(cache_k.dtype)
    cache_v[(*index, slice(None), pos)] = v.transpose(1, 2).to(cache_v.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + weight), computed in fp32: offset 0 is Llama's, 1 Gemma's (weights near zero)."""

    def __init__(self, width: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.full((width,), 1.0 - offset))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.weight.float() if not self.offset else self.offset + self.weight.float()
        return (h * weight).type_as(x)


def make_norm(cfg: ModelConfig, width: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(width, cfg.norm_eps, cfg.norm_offset)
    return nn.LayerNorm(width, eps=cfg.norm_eps, bias=cfg.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_size
        # q, k, v in one matmul: n_head query heads, then n_kv_head key heads, then n_kv_head value heads
        qkv = (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_size
        self.c_attn = nn.Linear(cfg.n_embd, qkv, bias=cfg.bias or cfg.qkv_bias)
        self.c_proj = nn.Linear(cfg.n_head * cfg.head_size, cfg.n_embd, bias=cfg.bias)
        self.q_norm = make_norm(cfg, cfg.head_size) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, cfg.head_size) if cfg.qk_norm else None
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, at: Positions, layer_cache=None):
        B, T, _ = x.shape
        heads = self.c_attn(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh + 2 nkv, T, hd)
        q, k, v = heads.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if at.rope is not None:
            q, k = apply_rope(q, at.rope), apply_rope(k, at.rope)
        if layer_cache is not None:  # q: (B, nh, T, hd); k, v: (B, nkv, T, hd)
            k, v = _write_cache(layer_cache, k, v, at)
        # grouped-query attention: kv head j serves query heads j*r .. j*r+r-1, never copied r times (enable_gqa)
        gqa = self.n_kv_head != self.n_head
        causal = at.mask is CAUSAL
        attend = matmul_attention if _matmul_attention_pays(q, k) else F.scaled_dot_product_attention
        y = attend(q, k, v, attn_mask=None if causal else at.mask, is_causal=causal,
                   dropout_p=self.dropout if self.training else 0.0, **({"enable_gqa": True} if gqa else {}))
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.c_proj(y))


def matmul_attention(q, k, v, attn_mask=None, is_causal: bool = False, dropout_p: float = 0.0,
                     enable_gqa: bool = False) -> torch.Tensor:
    """F.scaled_dot_product_attention as two batched matmuls around a softmax: the same function
    (boolean masks keep True; is_causal aligns the triangle to the top left; enable_gqa: k and v have
    fewer heads, each serving q.size(1) // k.size(1) consecutive query heads), holding every score."""
    q = q * q.size(-1) ** -0.5
    B, heads, T, hd = q.shape
    if enable_gqa and k.size(1) != heads and T == 1:  # decoding: a kv head's r queries as r rows, k and v as they lie
        q = q.reshape(B, k.size(1), heads // k.size(1), hd)
    elif enable_gqa and k.size(1) != heads:
        k, v = (t.repeat_interleave(heads // k.size(1), dim=1) for t in (k, v))
    if T == 1:  # decoding: k @ q^T reads a cache view as it lies (q @ k^T copied it transposed, 5x slower)
        scores = (k @ q.transpose(-2, -1)).transpose(-2, -1)
    else:
        scores = q @ k.transpose(-2, -1)
    if is_causal:
        hidden = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu_(1)
        scores = scores.masked_fill_(hidden, float("-inf"))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill_(~attn_mask, float("-inf"))
    elif attn_mask is not None:  # additive
        scores = scores + attn_mask
    return (F.dropout(torch.softmax(scores, -1), dropout_p) @ v).reshape(B, heads, T, hd)


def _matmul_attention_pays(q: torch.Tensor, k: torch.Tensor) -> bool:
    # SDPA's CPU kernels are slow in bf16: training 4 x 12 heads x 256 x 64, fwd + bwd, 16.3 vs 7.7 ms;
    # decoding 8 rows against 512 cached positions, 1.97 vs 0.41 ms a layer. Below ~2k scores (one row
    # against 128 positions) SDPA's single call wins on overhead; above the upper bound the scores get big.
    # Compiled, one-token decoding pays in every dtype: inductor fuses the softmax between the two products,
    # where SDPA's flash kernel took 0.18 ms a layer for 8 rows (124M int8 step 15.5 -> 14.3 ms, fp32 4% less).
    if q.device.type != "cpu":
        return False
    low, high = MATMUL_ATTENTION_SCORES
    scores = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
    if torch.compiler.is_compiling() and (q.dtype == torch.bfloat16 or q.shape[2] == 1):  # no lower bound: the
        return scores <= high  # overhead is compiled away, and a test on the growing cache would recompile
    return q.dtype == torch.bfloat16 and low <= scores <= high


class MLP(nn.Module):
    """c_proj(act(c_fc(x))); gated forms (swiglu, geglu) split c_fc's output into gate and up: c_proj(act(gate) * up)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp in ("swiglu", "geglu")
        self.c_fc = nn.Linear(cfg.n_embd, (2 if self.gated else 1) * cfg.ffn_size, bias=cfg.bias)
        # GPT-2's tanh GELU by default (exact GELU breaks weight parity); "exact" trains as well, faster on CPU
        gelu = nn.GELU(approximate="tanh" if cfg.gelu == "tanh" else "none")
        self.act = {"gelu": gelu, "geglu": gelu, "swiglu": nn.SiLU(), "relu2": ReLUSquared()}[cfg.mlp]
        self.c_proj = nn.Linear(cfg.ffn_size, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.dropout(self.c_proj(self.act(gate) * up))
        return self.dropout(self.c_proj(self.act(h)))


class ReLUSquared(nn.Module):
    def forward(self, x):
        return F.relu(x).square()


class Block(nn.Module):
    """Pre-norm residual block; post_norms (Gemma 3) also norm each branch's output before it is added."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.sliding = cfg.slides(layer)
        self.ln_1 = make_norm(cfg, cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)
        self.post_attn_norm = make_norm(cfg, cfg.n_embd) if cfg.post_norms else None
        self.post_mlp_norm = make_norm(cfg, cfg.n_embd) if cfg.post_norms else None

    def forward(self, x, at: Positions, layer_cache=None):
        at = at.local if self.sliding else at
        a = self.attn(self.ln_1(x), at, layer_cache)
        x = x + (a if self.post_attn_norm is None else self.post_attn_norm(a))
        m = self.mlp(self.ln_2(x))
        return x + (m if self.post_mlp_norm is None else self.post_mlp_norm(m))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size must be set (>= 1) before building the model")
        if cfg.shape_error():
            raise ValueError(cfg.shape_error())
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                **({"wpe": nn.Embedding(cfg.block_size, cfg.n_embd)} if cfg.position == "learned" else {}),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
                ln_f=make_norm(cfg, cfg.n_embd),
            )
        )
        self.has_sliding_layers = any(block.sliding for block in self.transformer.h)
        # recompute each block's activations in the backward pass instead of keeping them (set by fit() from
        # train.activation_checkpointing); only where a graph is built: decoding and no_grad passes never do
        self.activation_checkpointing = False
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # residual projections: GPT-2's 1/sqrt(2 * n_layer)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        start_pos: int | torch.Tensor = 0,
        doc_ids: torch.Tensor | None = None,
        reduction: str = "mean",
        logits_to_keep: int = 0,
    ):
        """Return (logits, loss); with targets and the fused loss (model.fused_loss), logits is None.

        idx, targets: (B, T) token ids; targets equal to IGNORE_INDEX carry no loss.
        kv_cache/start_pos: write this chunk's keys/values at start_pos and attend to all before it.
            start_pos may also be a (B,) tensor, row b's tokens sitting at start_pos[b], start_pos[b] + 1,
            ...: continuous batching, where each row of the cache holds a sequence of its own length.
            The caller keeps every position below the cache's max_len.
        doc_ids: (B, T) document number of each token in a packed window: positions restart and
            attention stays inside each document, so packed examples never see each other.
        reduction: "mean" over supervised tokens, "sum" (the loop normalises across micro-batches), or
            "none": the (B, T) token losses, 0 where ignored (DPO sums them per sequence).
        logits_to_keep: 0 = logits for every position, k = only the last k (cheap decoding).
        """
        at = self.positions(idx, start_pos, kv_cache, doc_ids)
        x = self.transformer.wte(idx)
        if self.config.embed_scale:  # Gemma: sqrt(n_embd) rounded to the compute dtype first
            x = x * torch.tensor(self.config.n_embd**0.5, dtype=x.dtype)
        if self.config.position == "learned":
            x = x + self.transformer.wpe(at.pos)
        x = self.transformer.drop(x)
        recompute = self.activation_checkpointing and kv_cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.transformer.h):
            if recompute:  # the same block, run again in backward (same RNG state: dropout masks repeat)
                x = checkpoint(block, x, at, use_reentrant=False)
                continue
            layer_cache = kv_cache.layer(i) if kv_cache is not None else None
            x = block(x, at, layer_cache)
        x = self.transformer.ln_f(x)

        if targets is None:
            if logits_to_keep:
                x = x[:, -logits_to_keep:]
            return self.head(x), None
        if self.fuses_loss(idx.numel()) and reduction != "none":  # no (B*T, vocab) logits built: none returned
            return None, linear_cross_entropy(x, self.lm_head.weight, targets, reduction)
        logits = self.head(x)
        return logits, cross_entropy(logits, targets, reduction)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head, with the logit soft-cap c * tanh(logits / c) when model.logit_softcap is set."""
        logits = self.lm_head(x)
        cap = self.config.logit_softcap
        return logits if not cap else torch.tanh(logits / cap) * cap

    # ------------------------------------------------------------------ helpers

    def positions(self, idx: torch.Tensor, start_pos: int | torch.Tensor = 0, kv_cache: KVCache | None = None,
                  doc_ids: torch.Tensor | None = None) -> Positions:
        """The Positions of a forward call (the table in the module docstring), once for all layers."""
        T = idx.shape[1]
        if doc_ids is not None and kv_cache is not None:
            raise ValueError("doc_ids (packed documents) cannot be combined with a KV cache")
        if isinstance(start_pos, torch.Tensor):  # one start per row
            if kv_cache is None:
                raise ValueError("per-row start positions need a KV cache")
            pos = start_pos[:, None] if T == 1 else start_pos[:, None] + torch.arange(T, device=idx.device)
            rows = torch.arange(pos.shape[0], device=idx.device)[:, None]
            return self._view(pos, None, dict(cache_len=kv_cache.max_len), rows)
        end = start_pos + T
        limit = kv_cache.max_len if kv_cache is not None else self.config.block_size
        if end > self.config.block_size or end > limit:
            raise ValueError(
                f"sequence of {end} tokens is longer than the model's block_size ({self.config.block_size}); "
                "shorten the prompt or crop it to the last block_size tokens"
            )
        if doc_ids is not None:
            pos, docs = _document_positions(doc_ids)
            return self._view(pos, None, dict(docs=docs))
        pos = torch.arange(start_pos, end, device=idx.device)[None]
        return self._view(pos, start_pos, dict(cache_len=None if kv_cache is None else end, shared=True))

    def _view(self, pos: torch.Tensor, start: int | None, keys: dict, rows: torch.Tensor | None = None) -> Positions:
        """Positions with their mask (attention_mask(pos, **keys)) and rotary angles; sliding-window layers,
        if any, get their own view in `local`."""
        cfg = self.config
        local = None
        if self.has_sliding_layers:
            theta = cfg.rope_local_theta
            rope = self._rope(pos, theta, "none") if theta else self._rope(pos, cfg.rope_theta, cfg.rope_scaling)
            local = Positions(pos, attention_mask(pos, **keys, window=cfg.sliding_window), start, rope, rows=rows)
        return Positions(pos, attention_mask(pos, **keys), start, self._rope(pos, cfg.rope_theta, cfg.rope_scaling),
                         local, rows)

    def _rope(self, pos: torch.Tensor, theta: float, scaling: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        cfg = self.config
        if cfg.position != "rope":
            return None
        inv_freq = rope_frequencies(cfg.head_size, theta, scaling, cfg.rope_factor, cfg.rope_low_freq_factor,
                                    cfg.rope_high_freq_factor, cfg.rope_original_context, pos.device)
        dtype = self.transformer.wte.weight.dtype  # fp32 angles held in the weights' dtype: one cast, not one a layer
        return tuple(t[:, None].to(dtype) for t in rope_angles(pos, inv_freq))

    def fuses_loss(self, tokens: int) -> bool:
        """Head + loss fused in row chunks (gpt/losses.py) for a batch of `tokens` targets. "auto": on a CPU
        once the logits would be large (bench/train_throughput.py, 50k vocabulary, 1,024 tokens: 124M
        shape fused 849 vs plain 770 tok/s and 1.07 vs 1.23 GB a step; 2 x 128 shape 7.3k vs 8.7k tok/s
        but 0.2 vs 0.6 GB; at 4,096 tokens the plain path thrashed memory: 3.8k vs 8.2k). Small batches
        and vocabularies keep the plain path. On a GPU the plain path was faster (H100 + torch.compile)."""
        mode = self.config.fused_loss
        plain_head = type(self.lm_head) is nn.Linear  # a quantized or adapted head has no plain weight
        if mode == "auto":
            on_cpu = self.lm_head.weight.device.type == "cpu"
            return plain_head and on_cpu and tokens * self.config.vocab_size >= FUSED_LOSS_MIN_LOGITS
        return plain_head and mode == "on"

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the position embedding is excluded by default (it does no matmuls)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding and "wpe" in self.transformer else n

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs per token (PaLM appendix B): 6N + 12 L H Q T for training, a third for inference."""
        cfg = self.config
        T = seq_len or cfg.block_size
        fwd_bwd = 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * T
        return fwd_bwd if training else fwd_bwd / 3

    @torch.no_grad()
    def resize_vocab(self, new_size: int) -> None:
        """Grow the embedding and LM head (tied or not); new rows start at the mean row (a neutral token)."""
        if new_size <= self.lm_head.weight.shape[0]:
            return
        head, wte = self.lm_head.weight, self.transformer.wte.weight
        self.transformer.wte = nn.Embedding(new_size, wte.shape[1], device=wte.device, dtype=wte.dtype)
        self.transformer.wte.weight = _grown(wte, new_size)
        self.lm_head = nn.Linear(wte.shape[1], new_size, bias=False, device=wte.device, dtype=wte.dtype)
        self.lm_head.weight = self.transformer.wte.weight if head is wte else _grown(head, new_size)
        self.config.vocab_size = new_size


def _grown(old: torch.Tensor, new_size: int) -> nn.Parameter:
    weight = torch.empty(new_size, old.shape[1], device=old.device, dtype=old.dtype)
    weight[: old.shape[0]] = old
    weight[old.shape[0] :] = old.mean(dim=0, keepdim=True)
    return nn.Parameter(weight)
