"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step has a token budget. Running sequences come first (a decode costs
one token; a prompt still being prefilled takes what is left, in chunks),
then waiting requests are admitted in arrival order while the budget, the
sequence limit, KV memory and adapter slots allow. A waiting request whose
adapter cannot get a slot right now is passed over, not allowed to block the
requests behind it. When KV memory runs out, the most recently admitted
sequence is preempted: its cache is freed and it goes back to the head of
the queue, keeping the tokens it already produced (they are recomputed).

With a prefix cache (server/engine/prefix_cache.py), an admitted sequence first
copies the longest cached prefix of its tokens under its adapter version and
computes only the rest (the step's token budget counts computed tokens);
after each step, `computed` adds the blocks the step completed to the cache.
A waiting request whose first uncached block is one that a request admitted
in the same step computes (same adapter version, same tokens up to the end
of that block; the other's prompt computed in full) waits one step, then
reuses it instead of computing it a second time (requests that arrive
together for one system prompt). Requests that part before that block's
end do not wait for each other.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .adapter_pool import AdapterPool, NoFreeSlot
from .kv_cache import KVCacheManager, SeqKVCache
from .request import Request, TokenLogprob


@dataclass
class Sequence:
    req: Request
    all_ids: list[int]
    num_prompt: int
    gen: object
    detok: object
    num_computed: int = 0
    cache: SeqKVCache | None = None
    slot: int = -1
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    sent_prompt_logprobs: bool = False
    finished: bool = False
    prefix_chain: list | None = None  # the prefix-cache blocks this sequence's tokens match (None: adds none)

    @property
    def output_ids(self) -> list[int]:
        return self.all_ids[self.num_prompt :]

    @property
    def pending(self) -> int:
        return len(self.all_ids) - self.num_computed


@dataclass
class Plan:
    items: list[tuple[Sequence, int]]  # (sequence, tokens to compute), ordered by slot
    preempted: list[Sequence]
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)  # admissions refused: fail these alone


class Scheduler:
    def __init__(self, pool: AdapterPool, kv: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 on_prefix_lookup=None):
        """`on_prefix_lookup(request, prompt_tokens, cached_tokens)`: called at a request's first admission."""
        self.pool = pool
        self.kv = kv
        self.on_prefix_lookup = on_prefix_lookup
        self.max_num_seqs = max_num_seqs
        self.max_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.prefix_chain = None
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _release(self, seq: Sequence) -> None:
        if seq.cache is not None:
            seq.cache.free()
            seq.cache = None
        if seq.slot >= 0:
            self.pool.release(seq.slot)
            seq.slot = -1

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self._release(seq)
        seq.finished = True

    def schedule(self) -> Plan:
        budget = self.max_tokens
        items: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        # 1. running sequences, oldest first; preempt the newest when KV memory is short.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.pending, budget)
            total = self._row_length(seq, seq.cache, seq.num_computed + n)
            need = self.kv.growth_needed(seq.cache, total)
            while need > self.kv.free_tokens and self.running[-1] is not seq:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
            if need > self.kv.free_tokens:
                self._preempt(seq)
                preempted.append(seq)
                break
            seq.cache.reserve(total)
            items.append((seq, n))
            budget -= n
            i += 1
        # 2. admit waiting requests in arrival order.
        skipped: list[Sequence] = []
        failed: list[tuple[Sequence, Exception]] = []
        leaders: set = set()  # `_next_block` keys of the blocks this step computes (and caches)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            if seq in preempted:  # never re-admit in the step that preempted it
                skipped.append(seq)
                continue
            ref = seq.req.adapter_ref
            if ref is not None and not self.pool.can_acquire(ref):
                skipped.append(seq)
                continue
            hit = self._cached_prefix(seq)
            lead = self._next_block(seq, len(hit))
            if lead is not None and lead in leaders:
                skipped.append(seq)  # a request admitted in this step computes the same block: reuse it next step
                continue
            cached = len(hit) * self.kv.prefix.block if hit else 0
            n = min(len(seq.all_ids) - cached, budget)
            cache = self.kv.new_cache()
            total = self._row_length(seq, cache, cached + n)
            if self.kv.growth_needed(cache, total) > self.kv.free_tokens:
                skipped.append(seq)
                break  # memory, not the adapter, is short: keep arrival order
            if ref is not None:
                try:
                    seq.slot = self.pool.acquire(ref)
                except NoFreeSlot:
                    skipped.append(seq)
                    continue
                except Exception as e:  # the adapter cannot fill a slot (the slot is unchanged): this request fails
                    failed.append((seq, e))
                    continue
            self._admit(seq, cache, hit, total)
            if lead is not None and cached + n == len(seq.all_ids):
                leaders.add(lead)  # it computes (and will cache) that block in this step
            items.append((seq, n))
            budget -= n
        for seq in reversed(skipped):
            self.waiting.appendleft(seq)
        items.sort(key=lambda it: it[0].slot)
        return Plan(items, preempted, failed)

    def _row_length(self, seq: Sequence, cache, total: int) -> int:
        """What to reserve for `seq` needing `total` tokens now: a new row gets headroom (`KVCacheManager.row_length`)."""
        return self.kv.row_length(cache, total, seq.num_prompt + seq.req.params.max_tokens)

    def _next_block(self, seq: Sequence, cached_blocks: int):
        """(adapter version, its tokens up to the end of the first block the cache lacks) for a sequence that
        would compute and cache that block, else None. Two requests with the same key compute the same block."""
        prefix = self.kv.prefix
        if prefix is None or seq.req.params.prompt_logprobs is not None:
            return None
        end = (cached_blocks + 1) * prefix.block
        if end > len(seq.all_ids) - 1:  # the cache keeps whole blocks before the last token only
            return None
        return seq.req.adapter_ref, tuple(seq.all_ids[:end])

    def _cached_prefix(self, seq: Sequence) -> list:
        """The prefix-cache blocks `seq` can start from (whole blocks, leaving at least its last token)."""
        prefix = self.kv.prefix
        if prefix is None or seq.req.params.prompt_logprobs is not None:
            return []
        return prefix.match(seq.req.adapter_ref, seq.all_ids, len(seq.all_ids) - 1)

    def _admit(self, seq: Sequence, cache, hit: list, total: int) -> None:
        prefix = self.kv.prefix
        if prefix is not None:
            prefix.protected = set(hit)  # reserving may evict cached blocks: never the ones about to be copied
        try:
            cache.reserve(total)
        finally:
            if prefix is not None:
                prefix.protected = set()
        seq.cache = cache
        seq.num_computed = prefix.load(hit, cache) if hit else 0
        seq.prefix_chain = hit if prefix is not None else None
        self.running.append(seq)
        if seq.req.admitted_at is None:
            seq.req.admitted_at = time.monotonic()
            if prefix is not None and self.on_prefix_lookup is not None:
                self.on_prefix_lookup(seq.req, len(seq.all_ids), seq.num_computed)

    def computed(self, items: list[tuple[Sequence, int]]) -> None:
        """After a step: the sequences' tokens are computed; their newly completed blocks join the prefix cache."""
        prefix = self.kv.prefix
        for seq, n in items:
            seq.num_computed += n
            if prefix is not None and seq.prefix_chain is not None:
                seq.prefix_chain = prefix.extend(seq.req.adapter_ref, seq.all_ids, seq.num_computed, seq.cache,
                                                 seq.prefix_chain)
