"""Prefix caching on the real engine (tiny Llama, real adapters): greedy outputs are the same with the cache on
and off, for mixed adapters in one batch, prefixes that end inside a block, after evictions and across a
promotion, and the per-version hit rate shows on /metrics."""
from __future__ import annotations

import random

import pytest

from loraplex.server.engine.request import OutputStream, Request, SamplingParams

NEW = 8


def build(tiny_base, adapter_dirs, tmp, *, prefix_caching: bool, kv_cache_tokens: int = 8192):
    from loraplex.server.runtime import ServeConfig, build_state

    cfg = ServeConfig(model=str(tiny_base), store=tmp / ("on" if prefix_caching else "off"), max_loras=4,
                      kv_cache_tokens=kv_cache_tokens, prefix_caching=prefix_caching)
    cfg.adapters = {n: str(p) for n, p in adapter_dirs.items()}
    return build_state(cfg)


def wave(state, items):
    """Runs [(adapter name | None | (name, version), prompt ids)] in one batch; -> generated tokens per item."""
    eng = state.engine
    reqs = []
    for i, (name, ids) in enumerate(items):
        v = None if name is None else (state.store.get(*name) if isinstance(name, tuple) else state.store.get(name))
        if v is not None:
            eng.pool.pin(v)
        reqs.append(Request(f"w{i}", list(ids), SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True),
                            adapter=v, stream=OutputStream()))
    eng.call(lambda: [eng._enqueue(r) for r in reqs])  # all in the same first step
    out = []
    for r in reqs:
        toks = []
        while True:
            o = r.stream.get(timeout=120)
            toks += o.token_ids
            if o.finished:
                assert o.finish_reason == "length", o.error
                break
        out.append(toks)
    return out


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(n)]


@pytest.fixture(scope="module")
def states(tiny_base, adapter_dirs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prefix")
    on = build(tiny_base, adapter_dirs, tmp, prefix_caching=True)
    off = build(tiny_base, adapter_dirs, tmp, prefix_caching=False)
    yield on, off
    on.engine.shutdown()
    off.engine.shutdown()


def test_same_greedy_outputs_with_mixed_adapters_and_prefixes_ending_inside_a_block(states):
    on, off = states
    sys_a, sys_b, sys_base = ids(45, 1), ids(70, 2), ids(37, 3)  # none a multiple of the 16-token block
    first = [("alpha", sys_a + ids(5, 10)), ("beta", sys_b + ids(3, 11)), (None, sys_base + ids(4, 12))]
    second = [("alpha", sys_a + ids(6, 20)), ("beta", sys_b + ids(2, 21)), (None, sys_base + ids(9, 22)),
              ("gamma", sys_a + ids(6, 20)), ("alpha", sys_a[:40] + ids(3, 23))]
    hits0 = on.engine.prefix_hits
    for items in (first, second):
        assert wave(on, items) == wave(off, items)
    # second wave: alpha 2 blocks, beta 4, base 2, gamma none (another adapter's entries), the cut prefix 2
    assert on.engine.prefix_hits - hits0 == 16 * (2 + 4 + 2 + 0 + 2)
    assert off.engine.prefix_hits == 0 and off.engine.runner.kv.prefix is None


def test_promotion_new_version_never_hits_the_old_versions_entries(states, adapter_dirs):
    on, off = states
    for st in (on, off):  # the same adapter files and then others, as versions 1 and 2 of one name
        st.store.register("promo", adapter_dirs["beta"])
        st.store.register("promo", adapter_dirs["alpha"])
    system = ids(50, 5)
    v1 = [(("promo", 1), system + ids(4, 30))]
    v2 = [(("promo", 2), system + ids(4, 30))]
    assert wave(on, v1) == wave(off, v1)
    hits = on.engine.prefix_hits
    assert wave(on, v2) == wave(off, v2)
    assert on.engine.prefix_hits == hits  # same tokens, new version: nothing reused
    assert wave(on, v2) == wave(off, v2)
    assert on.engine.prefix_hits == hits + 48  # its own entries, from its own first request
    metrics = on.engine.telemetry.render().decode()
    assert 'loraplex_prefix_cache_hit_rate{adapter="promo",version="2"} 0.44' in metrics  # 48 of 108 tokens
    assert 'loraplex_prefix_cache_hit_tokens_total{adapter="promo",version="1"} 0.0' in metrics


def test_same_outputs_after_evictions(tiny_base, adapter_dirs, tmp_path):
    # a budget that holds the running batch and little more: entries are evicted all the time
    on = build(tiny_base, adapter_dirs, tmp_path, prefix_caching=True, kv_cache_tokens=512)
    off = build(tiny_base, adapter_dirs, tmp_path, prefix_caching=False, kv_cache_tokens=512)
    try:
        systems = {n: ids(40, 40 + i) for i, n in enumerate(["alpha", "beta", "delta", None])}
        for rnd in range(4):
            items = [(n, s + ids(3, 100 * rnd + i)) for i, (n, s) in enumerate(systems.items())]
            assert wave(on, items) == wave(off, items), rnd
        kv = on.engine.runner.kv
        assert kv.prefix.evictions > 0 and on.engine.prefix_hits > 0
        assert on.engine.scheduler.preemptions == off.engine.scheduler.preemptions
        assert kv.held_tokens == 0 and kv.cached_tokens <= kv.budget_tokens
    finally:
        on.engine.shutdown()
        off.engine.shutdown()
