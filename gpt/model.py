"""The GPT-2 architecture: one file, no training, no files, no tokenizer.

Parameter names follow GPT-2 (transformer.wte, transformer.h.N.attn.c_attn, ...) so weights map
one-to-one to OpenAI/Hugging Face checkpoints (their Conv1D weights are our Linear weights transposed).

Positions and masks. GPT.forward turns its arguments into one `Positions`, once per call, and every
layer reads it: `pos`, the position of each token, a (B, T) tensor, or (1, T) when every row shares it
(it indexes wpe; a rotary embedding would index by it too), and `mask`, the answer of the one mask
builder, `attention_mask`: CAUSAL (SDPA's is_causal, the fast path), None (every key) or a boolean
(B or 1, 1, T, keys) tensor, True where a query may attend. A query sees the keys at its own position
and before, inside its own document. So a new position scheme is one more read of `pos` (a rotary
embedding would rotate q and k by it in CausalSelfAttention.forward), a sliding window one more term
in attention_mask, and neither needs to know which of the cases below it is in.

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

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.config import ModelConfig
from gpt.losses import IGNORE_INDEX, cross_entropy, linear_cross_entropy

__all__ = ["GPT", "KVCache", "Positions", "attention_mask", "CAUSAL", "IGNORE_INDEX", "cross_entropy"]
FUSED_LOSS_MIN_LOGITS = 2**25  # "auto" fuses head + loss on CPU from this many logits a batch (128 MB in fp32)
MATMUL_ATTENTION_SCORES = (2**11, 2**24)  # CPU bf16 attention with this many scores uses matmul_attention
CAUSAL = "causal"  # attention_mask's answer when plain causal attention applies (SDPA's is_causal=True)


@dataclass
class KVCache:
    """Pre-allocated keys and values for every layer: (n_layer, B, n_head, max_len, head_dim)."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype) -> "KVCache":
        shape = (cfg.n_layer, batch_size, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


@dataclass(frozen=True)
class Positions:
    """Where one forward call's tokens sit and what they attend to; built once, read by every layer.

    pos: (B, T) position of each token, or (1, T) when all rows share them. In a KV cache a token's
        keys and values live at its position.
    mask: attention_mask's answer for these queries: CAUSAL, None (every key) or a boolean tensor.
    start: the first position when every row's tokens sit at start, start+1, ... (an int start_pos):
        the cache is written as one slice and attention sees its first start + T slots. None: each
        row at its own positions, written row by row; attention sees the whole cache view.
    """

    pos: torch.Tensor
    mask: torch.Tensor | str | None
    start: int | None


def attention_mask(q_pos: torch.Tensor, cache_len: int | None = None, docs: torch.Tensor | None = None, *,
                   shared: bool = False) -> torch.Tensor | str | None:
    """The one mask builder: which keys each query may attend to (see the table in the module docstring).

    q_pos: (B or 1, T) query positions. cache_len: keys are cache slots 0..cache_len-1, each at its own
    position; None: the keys are the queries themselves. docs: (B, T) document of each token (packed
    rows, keys = queries). shared: every row's queries sit at the same consecutive positions, the last T
    keys (an int start_pos), so the answer needs no tensor: CAUSAL when the queries are all the keys,
    None for one query. Otherwise a boolean (B or 1, 1, T, keys) mask, True = attend: a query sees the
    keys at its position and before, in its own document.
    """
    T = q_pos.shape[-1]
    if shared and docs is None:
        if cache_len is None or cache_len == T:
            return CAUSAL  # SDPA's triangle is aligned to the top left: right when queries = keys
        if T == 1:
            return None  # one new token sees every key before it
    k_pos = q_pos if cache_len is None else torch.arange(cache_len, device=q_pos.device)[None]
    visible = k_pos[:, None, :] <= q_pos[:, :, None]  # (B or 1, T, keys)
    if docs is not None:
        visible = visible & (docs[:, None, :] == docs[:, :, None])
    return visible[:, None]


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


def _write_cache(layer_cache, k: torch.Tensor, v: torch.Tensor, at: Positions):
    """Store this call's keys/values (B, nh, T, hd) at their positions; return the keys/values attended."""
    cache_k, cache_v = layer_cache  # (B, nh, max_len, hd)
    if at.start is None:  # each row at its own positions
        index = at.pos[:, None, :, None].expand(k.shape)
        cache_k.scatter_(2, index, k.to(cache_k.dtype))
        cache_v.scatter_(2, index, v.to(cache_v.dtype))
        return cache_k, cache_v  # the mask hides each row's unused tail
    end = at.start + k.shape[2]
    cache_k[:, :, at.start : end] = k
    cache_v[:, :, at.start : end] = v
    return cache_k[:, :, :end], cache_v[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, at: Positions, layer_cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4).unbind(0)
        if layer_cache is not None:  # q, k, v: (B, nh, T, hd)
            k, v = _write_cache(layer_cache, k, v, at)
        causal = at.mask is CAUSAL
        attend = matmul_attention if _matmul_attention_pays(q, k) else F.scaled_dot_product_attention
        y = attend(q, k, v, attn_mask=None if causal else at.mask, is_causal=causal,
                   dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def matmul_attention(q, k, v, attn_mask=None, is_causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """F.scaled_dot_product_attention as two batched matmuls around a softmax: the same function
    (boolean masks keep True; is_causal aligns the triangle to the top left), holding every score."""
    q = q * q.size(-1) ** -0.5
    if q.size(-2) == 1:  # decoding: k @ q^T reads a cache view as it lies (q @ k^T copied it transposed, 5x slower)
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
    return F.dropout(torch.softmax(scores, -1), dropout_p) @ v


def _matmul_attention_pays(q: torch.Tensor, k: torch.Tensor) -> bool:
    # SDPA's CPU kernels are slow in bf16: training 4 x 12 heads x 256 x 64, fwd + bwd, 16.3 vs 7.7 ms;
    # decoding 8 rows against 512 cached positions, 1.97 vs 0.41 ms a layer. Below ~2k scores (one row
    # against 128 positions) SDPA's single call wins on overhead; above the upper bound the scores get big.
    low, high = MATMUL_ATTENTION_SCORES
    scores = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and low <= scores <= high


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        # GPT-2's tanh GELU by default (exact GELU breaks weight parity); "exact" trains as well, faster on CPU
        self.gelu = nn.GELU(approximate="tanh" if cfg.gelu == "tanh" else "none")
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, at: Positions, layer_cache=None):
        x = x + self.attn(self.ln_1(x), at, layer_cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size must be set (>= 1) before building the model")
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"model.n_embd ({cfg.n_embd}) must be divisible by model.n_head ({cfg.n_head})")
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
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
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(at.pos))
        for i, block in enumerate(self.transformer.h):
            layer_cache = (kv_cache.k[i], kv_cache.v[i]) if kv_cache is not None else None
            x = block(x, at, layer_cache)
        x = self.transformer.ln_f(x)

        if targets is None:
            if logits_to_keep:
                x = x[:, -logits_to_keep:]
            return self.lm_head(x), None
        if self.fuses_loss(idx.numel()) and reduction != "none":  # no (B*T, vocab) logits built: none returned
            return None, linear_cross_entropy(x, self.lm_head.weight, targets, reduction)
        logits = self.lm_head(x)
        return logits, cross_entropy(logits, targets, reduction)

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
            return Positions(pos, attention_mask(pos, kv_cache.max_len), None)
        end = start_pos + T
        limit = kv_cache.max_len if kv_cache is not None else self.config.block_size
        if end > self.config.block_size or end > limit:
            raise ValueError(
                f"sequence of {end} tokens is longer than the model's block_size ({self.config.block_size}); "
                "shorten the prompt or crop it to the last block_size tokens"
            )
        if doc_ids is not None:
            pos, docs = _document_positions(doc_ids)
            return Positions(pos, attention_mask(pos, docs=docs), None)
        pos = torch.arange(start_pos, end, device=idx.device)[None]
        return Positions(pos, attention_mask(pos, None if kv_cache is None else end, shared=True), start_pos)

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
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs per token (PaLM appendix B): 6N + 12 L H Q T for training, a third for inference."""
        cfg = self.config
        T = seq_len or cfg.block_size
        fwd_bwd = 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * T
        return fwd_bwd if training else fwd_bwd / 3

    @torch.no_grad()
    def resize_vocab(self, new_size: int) -> None:
        """Grow the tied embedding/LM head; new rows start at the mean embedding (a neutral token)."""
        old = self.lm_head.weight
        if new_size <= old.shape[0]:
            return
        weight = torch.empty(new_size, old.shape[1], device=old.device, dtype=old.dtype)
        weight[: old.shape[0]] = old
        weight[old.shape[0] :] = old.mean(dim=0, keepdim=True)
        self.lm_head = nn.Linear(old.shape[1], new_size, bias=False, device=old.device, dtype=old.dtype)
        self.lm_head.weight = nn.Parameter(weight)
        self.transformer.wte = nn.Embedding(new_size, old.shape[1], device=old.device, dtype=old.dtype)
        self.transformer.wte.weight = self.lm_head.weight
        self.config.vocab_size = new_size
