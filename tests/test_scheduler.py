"""Scheduling, chunked prefill, preemption, slot eviction and prefix caching with the real engine around a fake
model (tests/fake_runner.py): every test runs in milliseconds, and outputs are exact only if every key each
sequence attends to is in the right place."""
from __future__ import annotations

import random

from fake_runner import adapter, expected, make_engine, outputs, submit


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(90) for _ in range(n)]


def test_one_step_runs_every_request_and_outputs_follow_the_model():
    engine, runner = make_engine(max_loras=2)
    a, b = adapter(engine, "a@1"), adapter(engine, "b@1")
    reqs = [submit(engine, prompt(5 + i, i), 6, v) for i, v in enumerate([a, None, b, a])]
    engine.run_until_idle()
    for i, r in enumerate(reqs):
        assert outputs(r) == expected(prompt(5 + i, i), 6)
    first = runner.steps[0]
    assert sorted(c.request_id for c in first) == sorted(r.request_id for r in reqs)
    assert [c.slot for c in first] == sorted(c.slot for c in first)  # grouped by slot for the LoRA segments
    assert len(runner.steps) == 6  # one prefill step, then one decode step per further token
    assert all(c.adapter == (r.adapter_ref) for step in runner.steps for c in step
               for r in reqs if r.request_id == c.request_id)


def test_chunked_prefill_keeps_the_token_budget_and_lets_decodes_through():
    engine, runner = make_engine(max_num_batched_tokens=16)
    short = submit(engine, prompt(4, 1), 8)
    long = submit(engine, prompt(40, 2), 3)
    engine.run_until_idle()
    assert outputs(short) == expected(prompt(4, 1), 8)
    assert outputs(long) == expected(prompt(40, 2), 3)
    assert all(sum(c.n for c in step) <= 16 for step in runner.steps)
    chunks = [(c.past, c.n) for step in runner.steps for c in step if c.request_id == long.request_id]
    assert chunks[:3] == [(0, 12), (12, 15), (27, 13)]  # what the budget leaves beside the short request
    assert any(len(step) == 2 and {c.n for c in step} == {1, 15} for step in runner.steps)  # decode beside a chunk


def test_preemption_recomputes_and_stays_exact():
    # 3 sequences that grow past 32 tokens in a 96-token budget: someone must be preempted and recomputed
    engine, runner = make_engine(kv_budget_tokens=96)
    reqs = [submit(engine, prompt(20, i), 24) for i in range(3)]
    engine.run_until_idle()
    for i, r in enumerate(reqs):
        assert outputs(r) == expected(prompt(20, i), 24)
    assert engine.scheduler.preemptions >= 1
    restarted = [c for step in runner.steps[1:] for c in step if c.past == 0]
    assert restarted and all(c.n > 20 for c in restarted)  # recomputed with the tokens it had produced
    assert engine.runner.kv.held_tokens == 0


def test_slot_eviction_waits_for_a_free_slot_and_never_mixes_adapters_in_one_slot():
    engine, runner = make_engine(max_loras=1)
    a, b = adapter(engine, "a@1"), adapter(engine, "b@1")
    ra = [submit(engine, prompt(6, i), 4, a) for i in range(2)]
    rb = [submit(engine, prompt(6, 10 + i), 4, b) for i in range(2)]
    engine.run_until_idle()
    for i, r in enumerate(ra):
        assert outputs(r) == expected(prompt(6, i), 4)
    for i, r in enumerate(rb):
        assert outputs(r) == expected(prompt(6, 10 + i), 4)
    ids_b = {r.request_id for r in rb}
    for step in runner.steps:
        refs = {c.adapter for c in step}
        assert len(refs) == 1  # one slot: one adapter per step
        for c in step:
            assert c.adapter == ("b@1" if c.request_id in ids_b else "a@1")
    assert engine.pool.evictions == 1


def test_prefix_cache_reuses_whole_blocks_and_outputs_stay_exact():
    engine, runner = make_engine(prefix_caching=True)
    a = adapter(engine, "a@1")
    shared = prompt(45, 7)  # two full blocks of 16 and 13 tokens into the third
    first = submit(engine, shared + [1, 2, 3], 5, a)
    engine.run_until_idle()
    second = submit(engine, shared + [4, 5], 5, a)
    base = submit(engine, shared + [4, 5], 5)  # the base model never sees the adapter's entries
    engine.run_until_idle()
    assert outputs(first) == expected(shared + [1, 2, 3], 5)
    assert outputs(second) == expected(shared + [4, 5], 5)
    assert outputs(base) == expected(shared + [4, 5], 5)
    by_id = {c.request_id: c for step in runner.steps for c in step if c.past == 0 or c.n > 1}
    assert (by_id[second.request_id].past, by_id[second.request_id].n) == (32, 15)  # 2 cached blocks, 15 computed
    assert (by_id[base.request_id].past, by_id[base.request_id].n) == (0, 47)
    assert engine.prefix_hits == 32


def test_a_new_version_never_hits_an_old_versions_entries():
    engine, runner = make_engine(prefix_caching=True)
    v1, v2 = adapter(engine, "a@1"), adapter(engine, "a@2")
    p = prompt(40, 3)
    submit(engine, p, 2, v1)
    engine.run_until_idle()
    r2 = submit(engine, p, 2, v2)
    engine.run_until_idle()
    assert [(c.past, c.n) for step in runner.steps for c in step if c.request_id == r2.request_id][0] == (0, 40)
    r3 = submit(engine, p, 2, v2)
    engine.run_until_idle()
    assert [(c.past, c.n) for step in runner.steps for c in step if c.request_id == r3.request_id][0] == (32, 8)
    assert outputs(r3) == expected(p, 2)


def test_cached_prefixes_give_way_to_running_sequences():
    # the budget fits the running sequences only if the cache gives its blocks back: nobody is preempted
    engine, runner = make_engine(kv_budget_tokens=128, prefix_caching=True)
    for i in range(4):
        submit(engine, prompt(30, 100 + i), 1)
        engine.run_until_idle()
    assert engine.runner.kv.cached_tokens > 0
    reqs = [submit(engine, prompt(30, 200 + i), 2) for i in range(4)]
    engine.run_until_idle()
    for i, r in enumerate(reqs):
        assert outputs(r) == expected(prompt(30, 200 + i), 2)
    kv = engine.runner.kv
    assert engine.scheduler.preemptions == 0 and kv.prefix.evictions > 0
    assert kv.held_tokens == 0 and kv.cached_tokens <= kv.budget_tokens


def test_requests_arriving_together_compute_a_shared_system_prompt_once():
    engine, runner = make_engine(prefix_caching=True)
    a = adapter(engine, "a@1")
    system = prompt(40, 9)
    reqs = [submit(engine, system + [i, i + 1], 3, a) for i in range(3)] + [submit(engine, system + [7], 3)]
    engine.run_until_idle()
    for i, r in enumerate(reqs[:3]):
        assert outputs(r) == expected(system + [i, i + 1], 3)
    assert outputs(reqs[3]) == expected(system + [7], 3)
    first = {c.request_id: (c.past, c.n) for c in runner.steps[0]}
    # the base request has another root: it runs at once; the other two of adapter a wait one step
    assert first == {reqs[0].request_id: (0, 42), reqs[3].request_id: (0, 41)}
    second = {c.request_id: (c.past, c.n) for c in runner.steps[1]}
    assert second[reqs[1].request_id] == second[reqs[2].request_id] == (32, 10)


def test_a_new_row_has_room_for_the_answer_so_a_short_request_never_moves():
    engine, runner = make_engine(kv_budget_tokens=4096)
    r = submit(engine, prompt(20, 7), 24)  # 44 tokens in all: a 64-token row from the start, not 32 then 64
    engine.run_until_idle()
    assert outputs(r) == expected(prompt(20, 7), 24)
    assert sorted(runner.kv.arenas) == [64]


def test_the_next_burst_reuses_the_rows_a_burst_left_and_an_idle_engine_gives_them_back():
    import time

    engine, runner = make_engine(kv_budget_tokens=4096)
    first = [submit(engine, prompt(10, i), 5) for i in range(6)]
    engine.run_until_idle()
    kv = runner.kv
    assert kv.held_tokens == 0 and kv.used_tokens > 0  # spare rows kept
    buffers = {C: a.kv.data_ptr() for C, a in kv.arenas.items()}
    second = [submit(engine, prompt(10, 10 + i), 5) for i in range(6)]
    engine.run_until_idle()
    assert {C: a.kv.data_ptr() for C, a in kv.arenas.items()} == buffers  # no new allocation, no copy
    for i, r in enumerate(first + second):  # the second burst's prompts are seeds 10..15
        assert outputs(r) == expected(prompt(10, i if i < 6 else 4 + i), 5)
    assert engine.state()["kv_used_tokens"] == 0 and engine.state()["kv_allocated_tokens"] == kv.used_tokens
    engine.idle_release_s = 0.05
    engine.start()
    try:
        deadline = time.monotonic() + 5
        while kv.used_tokens and time.monotonic() < deadline:
            time.sleep(0.02)
        assert kv.used_tokens == 0 and not kv.arenas
    finally:
        engine.shutdown()


def test_requests_that_part_before_the_first_uncached_block_do_not_wait_for_each_other():
    engine, runner = make_engine(prefix_caching=True)
    B = runner.kv.prefix.block
    system = prompt(2 * B, 99)
    same = [submit(engine, system + prompt(B + 3, i), 2) for i in range(4)]  # one system prompt, then each its own
    engine.run_until_idle()
    admitted = [sorted(c.request_id for c in step if c.past == 0 or c.n > 1) for step in runner.steps[:2]]
    assert len(admitted[0]) == 1 and len(admitted[1]) == 3  # the others reuse the first one's system prompt
    engine2, runner2 = make_engine(prefix_caching=True)
    apart = [submit(engine2, prompt(3 * B + 3, 50 + i), 2) for i in range(4)]  # nothing shared: no one waits
    engine2.run_until_idle()
    assert len(runner2.steps[0]) == 4
    for i, r in enumerate(same):
        assert outputs(r) == expected(system + prompt(B + 3, i), 2)
    for i, r in enumerate(apart):
        assert outputs(r) == expected(prompt(3 * B + 3, 50 + i), 2)
