"""Per-sequence KV caches under one memory budget.

Each running sequence owns one tensor `[layers, 2, kv_heads, capacity, head_dim]`
that grows geometrically (so appends are amortised O(1)) and is freed the
moment the sequence finishes or is preempted. The manager accounts every
sequence's capacity against `budget_tokens`; the scheduler asks `can_grow`
before it plans a step and preempts (recompute later) when memory is short.
Contiguous per-sequence storage keeps attention a plain SDPA call over a view,
which on CPU beats gathering pages every step.
"""
from __future__ import annotations

import torch

_ALIGN = 32


def _round_up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class SeqKVCache:
    __slots__ = ("kv", "length", "manager")

    def __init__(self, manager: "KVCacheManager"):
        self.manager = manager
        self.kv: torch.Tensor | None = None  # [L, 2, H_kv, cap, D]
        self.length = 0

    @property
    def capacity(self) -> int:
        return 0 if self.kv is None else self.kv.shape[3]

    def reserve(self, total_len: int) -> None:
        if total_len <= self.capacity:
            return
        m = self.manager
        new_cap = min(max(_round_up(total_len), _round_up(self.capacity * 2)), m.max_seq_len)
        new_cap = max(new_cap, total_len)
        kv = torch.empty((m.num_layers, 2, m.num_kv_heads, new_cap, m.head_dim), dtype=m.dtype, device=m.device)
        if self.kv is not None and self.length:
            kv[:, :, :, : self.length] = self.kv[:, :, :, : self.length]
        m.used_tokens += new_cap - self.capacity
        self.kv = kv

    def free(self) -> None:
        if self.kv is not None:
            self.manager.used_tokens -= self.capacity
            self.kv = None
        self.length = 0


class KVCacheManager:
    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, dtype, device, budget_tokens: int, max_seq_len: int):
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.budget_tokens = budget_tokens
        self.max_seq_len = max_seq_len
        self.used_tokens = 0

    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.tensor([], dtype=self.dtype).element_size()

    def new_cache(self) -> SeqKVCache:
        return SeqKVCache(self)

    def growth_needed(self, cache: SeqKVCache, total_len: int) -> int:
        """Extra budget tokens `cache.reserve(total_len)` would take."""
        if total_len <= cache.capacity:
            return 0
        new_cap = min(max(_round_up(total_len), _round_up(cache.capacity * 2)), self.max_seq_len)
        return max(new_cap, total_len) - cache.capacity

    @property
    def free_tokens(self) -> int:
        return self.budget_tokens - self.used_tokens
