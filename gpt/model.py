"""The GPT-2 architecture: one file, no training, no files, no tokenizer.

Parameter names follow GPT-2 (transformer.wte, transformer.h.N.attn.c_attn, ...) so weights map
one-to-one to OpenAI/Hugging Face checkpoints (their Conv1D weights are our Linear weights transposed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.config import ModelConfig
from gpt.losses import IGNORE_INDEX, cross_entropy, linear_cross_entropy

__all__ = ["GPT", "KVCache", "IGNORE_INDEX", "cross_entropy"]
FUSED_LOSS_MIN_LOGITS = 2**25  # "auto" fuses head + loss on CPU from this many logits a batch (128 MB in fp32)
MATMUL_ATTENTION_SCORES = (2**11, 2**24)  # CPU bf16 attention with this many scores uses matmul_attention


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


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, layer_cache=None, start_pos: int | torch.Tensor = 0, attn_mask=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4).unbind(0)
        is_causal = attn_mask is None  # q, k, v: (B, nh, T, hd)
        if layer_cache is not None:
            cache_k, cache_v = layer_cache  # (B, nh, max_len, hd)
            if isinstance(start_pos, torch.Tensor):  # one token per row, each at its own position
                rows = torch.arange(B, device=x.device)
                cache_k[rows, :, start_pos] = k[:, :, 0]
                cache_v[rows, :, start_pos] = v[:, :, 0]
                k, v = cache_k, cache_v  # attn_mask (from GPT.forward) hides each row's unused tail
            else:
                end = start_pos + T
                cache_k[:, :, start_pos:end] = k
                cache_v[:, :, start_pos:end] = v
                k, v = cache_k[:, :, :end], cache_v[:, :, :end]
                if T == 1:  # one new token sees every cached position
                    is_causal = False
                elif start_pos > 0 and attn_mask is None:
                    # is_causal would align the triangle to the top-left; queries sit at the end.
                    q_pos = torch.arange(start_pos, end, device=x.device)[:, None]
                    attn_mask = torch.arange(end, device=x.device)[None, :] <= q_pos
                    is_causal = False
        attend = matmul_attention if _matmul_attention_pays(q, k) else F.scaled_dot_product_attention
        y = attend(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0)
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

    def forward(self, x, layer_cache=None, start_pos: int | torch.Tensor = 0, attn_mask=None):
        x = x + self.attn(self.ln_1(x), layer_cache, start_pos, attn_mask)
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
            start_pos may also be a (B,) tensor with one position per row (T = 1): continuous
            batching, where each row of the cache holds a sequence of its own length. The caller
            keeps every position below the cache's max_len.
        doc_ids: (B, T) document number of each token in a packed window: positions restart and
            attention stays inside each document, so packed examples never see each other.
        reduction: "mean" over supervised tokens, "sum" (the loop normalises across micro-batches), or
            "none": the (B, T) token losses, 0 where ignored (DPO sums them per sequence).
        logits_to_keep: 0 = logits for every position, k = only the last k (cheap decoding).
        """
        B, T = idx.shape
        attn_mask = None
        if isinstance(start_pos, torch.Tensor):
            if kv_cache is None or T != 1:
                raise ValueError("per-row start positions need a KV cache and one token per row")
            pos = start_pos[:, None]
            keys = torch.arange(kv_cache.max_len, device=idx.device)
            attn_mask = (keys[None, :] <= pos)[:, None, None, :]  # (B, 1, 1, max_len): each row's own length
        else:
            end = start_pos + T
            limit = kv_cache.max_len if kv_cache is not None else self.config.block_size
            if end > self.config.block_size or end > limit:
                raise ValueError(
                    f"sequence of {end} tokens is longer than the model's block_size ({self.config.block_size}); "
                    "shorten the prompt or crop it to the last block_size tokens"
                )
            if doc_ids is not None:
                if kv_cache is not None:
                    raise ValueError("doc_ids (packed documents) cannot be combined with a KV cache")
                pos, attn_mask = _packed_positions_and_mask(doc_ids)
            else:
                pos = torch.arange(start_pos, end, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            layer_cache = (kv_cache.k[i], kv_cache.v[i]) if kv_cache is not None else None
            x = block(x, layer_cache, start_pos, attn_mask)
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


def _packed_positions_and_mask(doc_ids: torch.Tensor):
    """Positions restarting at each document and a block-diagonal causal mask (B, 1, T, T)."""
    B, T = doc_ids.shape
    t = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values
    pos = t - first
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return pos, (same_doc & causal)[:, None]
