"""KV arenas (server/engine/kv_cache.py) and the batched decode attention that reads them (server/engine/attention.py)."""
from __future__ import annotations

import random

import pytest
import torch

from loraplex.server.engine.kv_cache import KVCacheManager


def _manager(budget=100000, max_seq_len=300):
    return KVCacheManager(num_layers=2, num_kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu",
                          budget_tokens=budget, max_seq_len=max_seq_len)


def test_sequences_keep_their_keys_through_growth_moves_and_frees(monkeypatch):
    m = _manager()
    # arena memory is allocated uninitialised: make it NaN, the worst garbage a batched decode could read
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    rng = random.Random(0)
    live: dict = {}  # cache -> what it must hold
    for step in range(2000):
        op = rng.random()
        if op < 0.2 or not live:
            c, n = m.new_cache(), rng.randint(1, 40)
            c.reserve(n)
            live[c] = torch.randn(2, 2, 1, n, 2)
            c.kv[:, :, :, :n] = live[c]
            c.length = n
        elif op < 0.35:
            c = rng.choice(list(live))
            c.free()
            del live[c]
        else:
            c = rng.choice(list(live))
            n, old = rng.randint(1, 5), c.length
            if old + n > 300:
                continue
            c.reserve(old + n)  # may move it to the next class and compact the one it left
            new = torch.randn(2, 2, 1, n, 2)
            c.kv[:, :, :, old : old + n] = new
            c.length = old + n
            live[c] = torch.cat([live[c], new], dim=3)
        for c, want in live.items():
            assert torch.equal(c.kv[:, :, :, : c.length], want), step
            assert c.arena.rows[c.row] is c
        for a in m.arenas.values():  # rows stay packed, and every row in use is finite to its capacity
            assert all(r.arena is a for r in a.rows) and a.cap_rows >= len(a.rows)
            assert torch.isfinite(a.kv[:, :, : len(a.rows)]).all(), step
        assert m.used_tokens == sum(a.cap_rows * a.C for a in m.arenas.values()) <= m.budget_tokens
    for c in list(live):
        c.free()
    assert m.held_tokens == 0  # the rows stay allocated for the next burst until they are given back
    m.release_spare_rows()
    assert m.used_tokens == 0 and not m.arenas


def test_a_short_budget_takes_back_spare_rows_before_anyone_is_preempted():
    m = _manager(budget=160)
    a, b = m.new_cache(), m.new_cache()
    a.reserve(10)
    b.reserve(10)  # the 32-token arena grows by spare rows while the budget allows
    assert m.arenas[32].cap_rows > 2
    need = m.growth_needed(a, 40)  # a moves to the 64-token class
    assert need == 64 and need <= m.free_tokens
    assert m.arenas[32].cap_rows == 2
    a.reserve(40)
    assert a.capacity == 64 and m.used_tokens <= 160


def _tiny(arch: str):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    kw = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    if arch == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=6, **kw))
    else:
        model = LlamaForCausalLM(LlamaConfig(**kw))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    return model.eval()


def _run(arch: str, batched: bool, monkeypatch) -> tuple[list[torch.Tensor], int, int]:
    """Four sequences of one arena: prefills, then decode steps while a fifth sequence prefills beside them."""
    from loraplex.server.engine.attention import AttentionPlan
    from loraplex.server.engine.model_runner import ModelRunner, SeqChunk, StepBatch

    runner = ModelRunner(_tiny(arch), max_loras=1, kv_budget_tokens=4096)
    runner.batched_decode = batched
    grouped = whole = 0
    real = AttentionPlan._decode_groups

    def spy(self, chunks):
        nonlocal grouped, whole
        groups, single = real(self, chunks)
        grouped += sum(len(g.out_rows) for g in groups)
        whole += sum(g.whole for g in groups)  # the step is that group alone: its output is returned as is
        return groups, single

    monkeypatch.setattr(AttentionPlan, "_decode_groups", spy)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (3, 9, 14, 5, 12)]
    seqs = [{"ids": p, "cache": runner.kv.new_cache(), "done": 0} for p in prompts]

    def step(work):  # work: [(seq, n tokens)]
        ids, pos, chunks, last = [], [], [], []
        for s, n in work:
            s["cache"].reserve(s["done"] + n)
            chunks.append(SeqChunk(s["cache"], len(ids), n, s["done"]))
            ids += s["ids"][s["done"] : s["done"] + n]
            pos += range(s["done"], s["done"] + n)
            last.append(len(ids) - 1)
        logits, _ = runner.forward(StepBatch(torch.tensor(ids), torch.tensor(pos), chunks, None, torch.tensor(last)))
        for (s, n), row in zip(work, logits):
            s["done"] += n
            if s["done"] == len(s["ids"]):
                s["ids"].append(int(row.argmax()))
        return logits

    out = [step([(s, len(s["ids"])) for s in seqs[:4]])]
    late = seqs[4]
    for i in range(12):  # 4 decoding rows; the fifth prefills in chunks of 4 during the first steps, then decodes too
        work = [(s, 1) for s in seqs[:4]]
        if late["done"] < len(late["ids"]) - 1 or i == 0:
            work.append((late, min(4, len(late["ids"]) - late["done"])))
        elif late["done"] == len(late["ids"]) - 1:
            work.append((late, 1))
        out.append(step(work))
    return out, grouped, whole


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_batched_decode_attention_equals_one_call_per_sequence(arch, monkeypatch):
    # mistral: a sliding window of 6, shorter than every sequence here, so the window masks are exercised
    ref, none, _ = _run(arch, False, monkeypatch)
    got, grouped, whole = _run(arch, True, monkeypatch)
    assert none == 0 and grouped >= 4 * 12  # the batched path really ran, for every decoding row
    assert whole > 0  # and so did a step that is one whole group
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_arena_memory_asks_for_huge_pages_where_linux_offers_them():
    from pathlib import Path

    from loraplex.server.engine.kv_cache import advise_huge_pages

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("no transparent huge pages on this machine")
    big = torch.empty(8 << 20)  # 32 MiB, untouched
    assert advise_huge_pages(big)
    assert not advise_huge_pages(torch.empty(16))  # smaller than one huge page: nothing to ask for
    big.zero_()
    assert float(big.abs().sum()) == 0.0  # the memory works as before
