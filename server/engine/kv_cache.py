"""KV caches of the running sequences under one memory budget, laid out for batched decode attention.

A sequence's cache is a row of a *class arena*: one tensor
`[layers, 2, rows, kv_heads, C, head_dim]` per capacity class C (32, 64, 128,
... tokens, capped at the model's context). A sequence starts in the
smallest class that holds it and moves to the next class when it outgrows
its row (one copy of its keys and values per doubling, so appends stay
amortised O(1)). The rows of an arena are kept packed: when a sequence
leaves, the last row moves into the hole. So for every layer the decode
steps of all sequences of one class read one strided view
`arena[layer, k|v, :rows, :, :len]`, and attention for all of them is one
call instead of one per sequence (see `ModelRunner`); a prefill chunk
attends through its own row's view.

A row is taken with room to grow: `row_length` sizes it for the tokens the
sequence may still generate (its `max_tokens`), up to about twice what it
holds now, while memory is plentiful; so most requests never move,
and the decode steps of a batch of similar requests share one arena.

An arena grows by rows (geometrically, at most `_MAX_GROW_TOKENS` at a time,
and never past the budget) and keeps the rows its sequences leave: the next
burst reuses memory the process already touched (fresh memory costs a page
fault per 4 KiB, on our 2-core machines up to 12 ms for one 6 MB row, more
than a decode step's attention). Spare rows count against `budget_tokens`
like held ones and are given back when they are needed: when a row of
another class or a cached prefix would not fit otherwise, and when the
engine has been idle for `Engine.idle_release_s`. The scheduler asks
`growth_needed` before it plans a step and preempts (recompute later) when
memory is short.
"""
from __future__ import annotations

import ctypes
import functools
import sys

import torch

from .prefix_cache import DEFAULT_BLOCK, PrefixCache

_MIN_CLASS = 32
_MAX_GROW_TOKENS = 4096  # the most one arena grows by at once (rows x C)
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


@functools.lru_cache(maxsize=1)
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        f = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return f


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Asks Linux for transparent huge pages under a CPU tensor not yet touched (where THP is `madvise`, the
    default of many distributions): its first touch then faults 2 MiB at a time instead of 4 KiB, 6x faster
    on our machines (200 MB zeroed in 13 ms instead of 80). True when the kernel took the advice."""
    f = _madvise()
    if f is None or t.device.type != "cpu":
        return False
    start = t.data_ptr()
    lo = -(-start // _HUGE_PAGE) * _HUGE_PAGE
    hi = (start + t.numel() * t.element_size()) // _HUGE_PAGE * _HUGE_PAGE
    return hi > lo and f(lo, hi - lo, _MADV_HUGEPAGE) == 0


class SeqKVCache:
    __slots__ = ("arena", "row", "length", "manager")

    def __init__(self, manager: "KVCacheManager"):
        self.manager = manager
        self.arena: _Arena | None = None
        self.row = -1
        self.length = 0

    @property
    def kv(self) -> torch.Tensor | None:
        """This sequence's keys and values: a view `[L, 2, H_kv, C, D]` of its arena (valid until the next reserve/free)."""
        return None if self.arena is None else self.arena.kv[:, :, self.row]

    @property
    def capacity(self) -> int:
        return 0 if self.arena is None else self.arena.C

    def reserve(self, total_len: int) -> None:
        if total_len <= self.capacity:
            return
        m = self.manager
        target = m.arena_for(m.class_for(total_len))
        old, old_row = self.arena, self.row
        row = target.add(self)
        if old is not None:
            if self.length:
                target.kv[:, :, row, :, : self.length] = old.kv[:, :, old_row, :, : self.length]
            old.remove(old_row)
        self.arena, self.row = target, row

    def free(self) -> None:
        if self.arena is not None:
            self.arena.remove(self.row)
            self.arena, self.row = None, -1
        self.length = 0


class _Arena:
    """The rows of one capacity class, packed at the front of one tensor."""

    def __init__(self, manager: "KVCacheManager", C: int):
        self.m = manager
        self.C = C
        self.rows: list[SeqKVCache] = []
        self.kv = self._alloc(0)

    def _alloc(self, rows: int) -> torch.Tensor:
        m = self.m
        # empty: spare rows are never read; `add` zeroes a row when a sequence takes it
        kv = torch.empty((m.num_layers, 2, rows, m.num_kv_heads, self.C, m.head_dim), dtype=m.dtype, device=m.device)
        advise_huge_pages(kv)
        return kv

    @property
    def cap_rows(self) -> int:
        return self.kv.shape[2]

    def _resize(self, rows: int) -> None:
        self.m.make_room((rows - self.cap_rows) * self.C)
        kv = self._alloc(rows)
        n = len(self.rows)
        if n:
            kv[:, :, :n] = self.kv[:, :, :n]
        self.m.used_tokens += (rows - self.cap_rows) * self.C
        self.kv = kv

    def add(self, cache: SeqKVCache) -> int:
        if len(self.rows) == self.cap_rows:
            self._resize(self.cap_rows + self.m.rows_to_add(self))
        row = len(self.rows)
        # A batched decode step reads every row in use up to the longest decoding row's length (attention.py):
        # past its own length a row must hold finite values (zeros, or an earlier occupant's keys), never garbage.
        self.kv[:, :, row].zero_()
        self.rows.append(cache)
        return row

    def remove(self, row: int) -> None:
        last = self.rows.pop()
        if row < len(self.rows):  # keep rows packed: the last row moves into the hole
            n = last.length
            if n:
                self.kv[:, :, row, :, :n] = self.kv[:, :, len(self.rows), :, :n]
            self.rows[row] = last
            last.row = row


class KVCacheManager:
    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, dtype, device, budget_tokens: int, max_seq_len: int):
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.budget_tokens = budget_tokens
        self.max_seq_len = max_seq_len
        self.used_tokens = 0  # allocated to arena rows, spare ones included
        self.arenas: dict[int, _Arena] = {}
        self.prefix: PrefixCache | None = None

    def enable_prefix_caching(self, block: int = DEFAULT_BLOCK) -> None:
        self.prefix = PrefixCache(block=block, room=self._room_for_cache)

    @property
    def cached_tokens(self) -> int:
        return 0 if self.prefix is None else self.prefix.tokens

    def make_room(self, tokens: int) -> None:
        """Before rows take `tokens` more: evicts cached prefix blocks (LRU) until rows and cache fit the budget."""
        if self.prefix is None:
            return
        while self.used_tokens + self.prefix.tokens + tokens > self.budget_tokens and self.prefix.evict_one():
            pass

    def _room_for_cache(self, tokens: int) -> bool:
        """The cache may grow by `tokens` into memory no row holds, evicting its own older blocks for it."""
        if tokens > self.budget_tokens - self.used_tokens:
            self.release_spare_rows()  # rows held in reserve matter less than prefixes already computed
            if tokens > self.budget_tokens - self.used_tokens:
                return False
        self.make_room(tokens)
        return self.used_tokens + self.prefix.tokens + tokens <= self.budget_tokens

    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.tensor([], dtype=self.dtype).element_size()

    def new_cache(self) -> SeqKVCache:
        return SeqKVCache(self)

    def class_for(self, total_len: int) -> int:
        c = _MIN_CLASS
        while c < total_len:
            c *= 2
        return max(min(c, self.max_seq_len), total_len)

    def arena_for(self, C: int) -> _Arena:
        a = self.arenas.get(C)
        if a is None:
            a = self.arenas[C] = _Arena(self, C)
        return a

    def drop(self, arena: _Arena) -> None:
        self.used_tokens -= arena.cap_rows * arena.C
        del self.arenas[arena.C]

    def rows_to_add(self, arena: _Arena) -> int:
        """Geometric row growth, at most _MAX_GROW_TOKENS at once and within the free budget (at least one row).
        Spare rows only take memory nothing holds: the one row needed now may evict cached prefixes, spares do not."""
        want = max(1, min(max(arena.cap_rows, 4), _MAX_GROW_TOKENS // arena.C))
        return max(1, min(want, (self.free_tokens - self.cached_tokens) // arena.C))

    def row_length(self, cache: SeqKVCache, total_len: int, final_len: int) -> int:
        """What to `reserve` for a sequence that needs `total_len` tokens now and may reach `final_len`.

        `total_len` when its row holds that already. Otherwise a new row is
        taken anyway, and it is sized for min(final_len, max(2 * total_len,
        total_len + 32)) when a row of that class is free, or takes at most a
        quarter of the memory that neither rows nor cached prefixes hold:
        headroom never evicts a prefix, preempts a sequence, or keeps a
        request out when memory is short.
        """
        if total_len <= cache.capacity:
            return total_len
        want = min(final_len, max(2 * total_len, total_len + _MIN_CLASS), self.max_seq_len)
        if want <= total_len:
            return total_len
        C = self.class_for(want)
        if C == self.class_for(total_len):
            return want
        if self._spare_row(C) or 4 * C <= self.free_tokens - self.cached_tokens:
            return want
        return total_len

    def growth_needed(self, cache: SeqKVCache, total_len: int) -> int:
        """Extra budget tokens `cache.reserve(total_len)` takes at least (one row of the class it moves to)."""
        if total_len <= cache.capacity:
            return 0
        C = self.class_for(total_len)
        if self._spare_row(C):
            return 0
        if C > self.free_tokens:  # short of memory: first give back the rows arenas hold in reserve
            self.release_spare_rows()
        return C

    def _spare_row(self, C: int) -> bool:
        """Whether the arena of class C has a row allocated that no sequence holds."""
        a = self.arenas.get(C)
        return a is not None and len(a.rows) < a.cap_rows

    def release_spare_rows(self) -> None:
        """Gives back the memory of every row no sequence holds (an arena left with none goes)."""
        for arena in list(self.arenas.values()):
            if not arena.rows:
                self.drop(arena)
            elif arena.cap_rows > len(arena.rows):
                arena._resize(len(arena.rows))

    @property
    def held_tokens(self) -> int:
        """Tokens of the rows sequences hold (what `used_tokens` counts, less the spare rows)."""
        return sum(len(a.rows) * a.C for a in self.arenas.values())

    @property
    def free_tokens(self) -> int:
        """Budget no row holds (cached prefixes in it are given up on demand)."""
        return self.budget_tokens - self.used_tokens
