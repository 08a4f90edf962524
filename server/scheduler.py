"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step has a token budget. Running sequences come first (a decode costs
one token; a prompt still being prefilled takes what is left, in chunks),
then waiting requests are admitted in arrival order while the budget, the
sequence limit, KV memory and adapter slots allow. A waiting request whose
adapter cannot get a slot right now is passed over, not allowed to block the
requests behind it. When KV memory runs out, the most recently admitted
sequence is preempted: its cache is freed and it goes back to the head of
the queue, keeping the tokens it already produced (they are recomputed).
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
    def __init__(self, pool: AdapterPool, kv: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int):
        self.pool = pool
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
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
            need = self.kv.growth_needed(seq.cache, seq.num_computed + n)
            while need > self.kv.free_tokens and self.running[-1] is not seq:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
            if need > self.kv.free_tokens:
                self._preempt(seq)
                preempted.append(seq)
                break
            seq.cache.reserve(seq.num_computed + n)
            items.append((seq, n))
            budget -= n
            i += 1
        # 2. admit waiting requests in arrival order.
        skipped: list[Sequence] = []
        failed: list[tuple[Sequence, Exception]] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            if seq in preempted:  # never re-admit in the step that preempted it
                skipped.append(seq)
                continue
            ref = seq.req.adapter_ref
            if ref is not None and not self.pool.can_acquire(ref):
                skipped.append(seq)
                continue
            n = min(seq.pending, budget)
            cache = self.kv.new_cache()
            if self.kv.growth_needed(cache, n) > self.kv.free_tokens:
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
            cache.reserve(n)
            seq.cache = cache
            self.running.append(seq)
            seq.req.admitted_at = seq.req.admitted_at or time.monotonic()
            items.append((seq, n))
            budget -= n
        for seq in reversed(skipped):
            self.waiting.appendleft(seq)
        items.sort(key=lambda it: it[0].slot)
        return Plan(items, preempted, failed)
