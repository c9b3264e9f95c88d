"""Prefix caching: the keys and values of prompt prefixes already seen, reused instead of recomputed.

Requests that begin alike (a system prompt, tool definitions, the earlier turns of a chat) compute
the same keys and values for those tokens: a token's keys and values depend only on the tokens
before it and on its position, and the engine always fills a row of its KV cache from position 0 of
the window (gpt/infer/engine.py). So the engine asks this cache for the longest prefix of a row's
window it holds, copies those keys and values into the row, and prefills only the rest with the
model's own forward pass at start_pos = the cached length (chunked prefill; one forward pass, no
second copy of the computation). The window's last token is never part of the prefill (the engine's
decode step computes it with every other row), so at least one prompt token is always computed and
the first token's logits always exist.

The vLLM way, on our layout. The window is cut into blocks of `block_tokens` tokens (16, vLLM's
default); a block's key is (the id of the block before it, its own token ids), so a block is found
only behind the exact same tokens: a lookup walks the window's blocks from the start while they are
cached and returns the longest cached block-aligned prefix. Keys are compared whole (a dict of
tuples, not a hash of them), so no two different prefixes can ever share an entry. Our KV cache is
one contiguous row per sequence, not vLLM's paged blocks that rows point into, so a hit is a copy
into the row (one `torch.cat` + one copy per tensor) and storing a prefix is a copy out of it; in
exchange blocks shared by many prompts are stored once, and a prompt that shares only its first
1,024 tokens with an earlier one still reuses those.

Memory is bounded in MiB of keys and values (`max_mib`; the tensors' bytes, the few Python objects
per block aside): 2 x n_layer x n_kv_head x head_dim x block_tokens x dtype size per block, on the
model's device and in its dtype. At the limit the least recently used leaf goes first (a block no
cached block follows), so eviction never strands a block that can no longer be reached and a shared
system prompt outlives the many prompts that continue it. A lookup or a store touches a prefix's
blocks from its last to its first, so the least recently used block is normally a leaf already.
Blocks are copies, filled only after a prefill's forward pass has returned, so a request cancelled
or failed later cannot change what the cache holds. One cache belongs to one engine, hence one model.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import count
from typing import Sequence

import torch

from gpt.config import ModelConfig

BLOCK_TOKENS = 16  # tokens per cached block (vLLM's default block size)
DEFAULT_PREFIX_CACHE_MB = 1024  # the server's size (serve.py --prefix-cache-mb): ~14k tokens of the 124M in fp32
MiB = 1 << 20


@dataclass(eq=False)
class _Block:
    """The keys and values of one block of tokens: (n_layer, n_kv_head, block_tokens, head_dim) each."""

    id: int
    parent: "_Block | None"  # the block before it (None: the window's first block)
    key: tuple  # (the parent's id or 0, this block's token ids)
    k: torch.Tensor
    v: torch.Tensor
    children: set[int] = field(default_factory=set)  # ids of the cached blocks that follow this one


class PrefixCache:
    """Block-aligned prompt prefixes and their keys and values, least recently used evicted at max_mib."""

    def __init__(self, cfg: ModelConfig, max_mib: float, device, dtype: torch.dtype,
                 block_tokens: int = BLOCK_TOKENS):
        if block_tokens < 1 or not max_mib > 0:
            raise ValueError(f"a prefix cache needs max_mib > 0 and block_tokens >= 1, got {max_mib}, {block_tokens}")
        self.block_tokens, self.device, self.dtype = block_tokens, device, dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.block_bytes = 2 * cfg.n_layer * cfg.kv_heads * cfg.head_size * block_tokens * itemsize
        self.capacity = int(max_mib * MiB // self.block_bytes)  # blocks it may hold (0: a block is over the limit)
        self._blocks: OrderedDict[tuple, _Block] = OrderedDict()  # least recently used first
        self._ids = count(1)
        self.hit_tokens = 0  # prompt tokens served from the cache so far
        self.lookups = 0

    @property
    def tokens(self) -> int:
        """Tokens held (blocks x block_tokens)."""
        return len(self._blocks) * self.block_tokens

    @property
    def bytes(self) -> int:
        return len(self._blocks) * self.block_bytes

    def clear(self) -> None:
        self._blocks.clear()

    def load(self, tokens: Sequence[int], k_row: torch.Tensor, v_row: torch.Tensor) -> int:
        """Copy the keys and values of the longest cached block-aligned prefix of `tokens` into the row
        (k_row, v_row: (n_layer, n_kv_head, length, head_dim) views of a KV cache row, position 0 first);
        the number of tokens copied."""
        self.lookups += 1
        chain = self._chain(tokens)
        if not chain:
            return 0
        self._touch(chain)
        n = len(chain) * self.block_tokens
        k_row[:, :, :n] = torch.cat([b.k for b in chain], dim=2)
        v_row[:, :, :n] = torch.cat([b.v for b in chain], dim=2)
        self.hit_tokens += n
        return n

    def store(self, tokens: Sequence[int], k_row: torch.Tensor, v_row: torch.Tensor) -> None:
        """Keep the keys and values of every whole block of `tokens` (already computed in the row, position 0
        first) that is not cached yet, evicting least recently used blocks to stay within max_mib."""
        n_blocks = min(len(tokens) // self.block_tokens, self.capacity)
        chain = self._chain(tokens[: n_blocks * self.block_tokens])
        self._evict(n_blocks - len(chain), keep=chain)
        for i in range(len(chain), n_blocks):
            s, e = i * self.block_tokens, (i + 1) * self.block_tokens
            parent = chain[-1] if chain else None
            block = _Block(next(self._ids), parent, (parent.id if parent else 0, tuple(tokens[s:e])),
                           k_row[:, :, s:e].clone(), v_row[:, :, s:e].clone())
            self._blocks[block.key] = block
            if parent is not None:
                parent.children.add(block.id)
            chain.append(block)
        self._touch(chain)

    # ------------------------------------------------------------------ internals

    def _chain(self, tokens: Sequence[int]) -> list[_Block]:
        """The cached blocks of the longest block-aligned prefix of tokens, first block first."""
        chain, parent, b = [], 0, self.block_tokens
        for s in range(0, len(tokens) - b + 1, b):
            block = self._blocks.get((parent, tuple(tokens[s : s + b])))
            if block is None:
                break
            chain.append(block)
            parent = block.id
        return chain

    def _touch(self, chain: list[_Block]) -> None:
        """Most recently used, the first block most of all (a block stays more recent than those after it)."""
        for block in reversed(chain):
            self._blocks.move_to_end(block.key)

    def _evict(self, needed: int, keep: list[_Block]) -> None:
        """Free room for `needed` more blocks: least recently used leaves first, never a block of `keep`."""
        kept = {b.id for b in keep}
        while needed > 0 and len(self._blocks) + needed > self.capacity:
            victim = next(b for b in self._blocks.values() if not b.children and b.id not in kept)
            del self._blocks[victim.key]
            if victim.parent is not None:
                victim.parent.children.discard(victim.id)
