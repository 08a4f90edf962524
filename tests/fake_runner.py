"""A model runner without a model: the engine's real scheduler, KV manager, adapter pool and sampler around
a forward pass that costs microseconds, so scheduling can be tested in milliseconds.

The "model" keeps one number per token in the KV cache (the token id) and its next token is a fixed function
of the cached values at positions 0..p and of p, read back from the cache: a sequence's outputs are right
only if every key it attends to is where it should be (chunked prefill, preemption and recompute, the prefix
cache's copies). Logits are one-hot on that token. Every step's batch is recorded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.server.engine import Engine, EngineConfig
from loraplex.server.engine.kv_cache import KVCacheManager
from loraplex.server.engine.model_runner import build_step_batch
from loraplex.server.engine.request import OutputStream, Request, SamplingParams

VOCAB = 97


def next_token(history: list[int]) -> int:
    """What the fake model produces after `history` (a pure function of the tokens and their positions)."""
    p = len(history) - 1
    return (sum(history) * 31 + p * 7 + 3) % VOCAB


@dataclass
class Chunk:
    request_id: str
    past: int
    n: int
    slot: int
    adapter: str | None  # the ref the slot held when the chunk ran


class FakeTokenizer:
    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


class FakeRunner:
    def __init__(self, *, kv_budget_tokens: int, max_model_len: int = 1024):
        self.device = torch.device("cpu")
        self.max_model_len = max_model_len
        self.lora_modules: dict = {}
        self.kv = KVCacheManager(num_layers=1, num_kv_heads=1, head_dim=1, dtype=torch.float64, device="cpu",
                                 budget_tokens=kv_budget_tokens, max_seq_len=max_model_len)
        self.steps: list[list[Chunk]] = []
        self.pool = None  # set by `make_engine`, to record which adapter each slot held

    def prepare(self, items):
        return build_step_batch(items, self.device)

    def forward(self, batch):
        ids = batch.input_ids.tolist()
        wanted = set(batch.logits_indices.tolist())
        nxt: dict[int, int] = {}  # flat index -> the token the model predicts after it
        record = []
        for c, (seq, _) in zip(batch.chunks, batch.items):
            row = c.cache.kv[0, 0, 0, :, 0]  # [C]: this sequence's cached token ids
            row[c.past : c.past + c.n] = torch.tensor(ids[c.start : c.start + c.n], dtype=row.dtype)
            c.cache.length = max(c.cache.length, c.past + c.n)
            for i in range(c.n):
                if c.start + i in wanted:
                    nxt[c.start + i] = next_token([int(v) for v in row[: c.past + i + 1].tolist()])
            ref = self.pool.slots[seq.slot].ref if seq.slot >= 0 else None
            record.append(Chunk(seq.req.request_id, c.past, c.n, seq.slot, ref))
        self.steps.append(record)
        logits = torch.full((len(wanted), VOCAB), -1e9)
        for k, flat in enumerate(batch.logits_indices.tolist()):
            logits[k, nxt[flat]] = 0.0
        return logits, torch.zeros(len(wanted), 1)


def make_engine(*, kv_budget_tokens=4096, max_loras=2, prefix_caching=False, **cfg):
    runner = FakeRunner(kv_budget_tokens=kv_budget_tokens)
    config = EngineConfig(max_loras=max_loras, kv_cache_tokens=kv_budget_tokens, prefix_caching=prefix_caching, **cfg)
    engine = Engine(runner, FakeTokenizer(), config, eos_token_ids={VOCAB + 1})
    runner.pool = engine.pool
    return engine, runner


@dataclass
class FakeVersion:
    """What the pool needs of a store version: a ref, and the engine installs its (empty) weights with `put`."""

    ref: str


def adapter(engine: Engine, ref: str) -> FakeVersion:
    engine.pool.put(ref, {}, {})
    return FakeVersion(ref)


def submit(engine: Engine, prompt: list[int], max_tokens: int, version=None, rid: str | None = None) -> Request:
    req = Request(rid or engine.new_request_id(), list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0,
                  ignore_eos=True), adapter=version, stream=OutputStream())
    return engine.submit(req)


def outputs(req: Request) -> list[int]:
    toks = []
    while True:
        o = req.stream.get_nowait()
        toks += o.token_ids
        if o.finished:
            return toks


def expected(prompt: list[int], n: int) -> list[int]:
    hist = list(prompt)
    for _ in range(n):
        hist.append(next_token(hist))
    return hist[len(prompt):]
