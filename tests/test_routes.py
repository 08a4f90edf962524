"""Versions, canary routes, promotion and rollback, guards, telemetry labels, restart."""
from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pytest

MSG = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def srv(tiny_base, tmp_path_factory, adapter_dirs):
    from conftest import start_server

    s = start_server(tmp_path_factory.mktemp("routes"), tiny_base, max_loras=4)
    for src in ("alpha", "beta", "gamma"):
        r = httpx.post(f"{s.url}/v1/adapters", json={"name": "bot", "path": str(adapter_dirs[src])})
        assert r.status_code == 201
    yield s
    s.stop()


def test_canary_split_statistics_on_the_store(srv):
    st = srv.state.store
    st.set_route("bot", {1: 90, 2: 10}, caller="test")
    hits = Counter(st.resolve("bot").version for _ in range(2000))
    assert set(hits) == {1, 2}
    # binomial(2000, 0.1): sd ~ 13.4; 10% tolerance of the expected share is far outside 4 sd
    assert abs(hits[2] - 200) < 60, hits


def test_canary_split_over_http_and_sticky_users(srv):
    u = srv.url
    r = httpx.put(f"{u}/v1/routes/bot", json={"versions": {"1": 50, "2": 50}, "sticky": "user"}, headers={"x-loraplex-caller": "alice"})
    assert r.status_code == 200, r.text
    assert r.json()["updated_by"] == "127.0.0.1"  # who the server saw, not what the client claims
    seen: dict[str, set] = {}
    with httpx.Client() as c:
        for i in range(60):
            user = f"user{i % 12}"
            resp = c.post(f"{u}/v1/completions", json={"model": "bot", "prompt": "x", "max_tokens": 1, "user": user})
            assert resp.status_code == 200
            seen.setdefault(user, set()).add(resp.headers["x-loraplex-adapter"])
    assert all(len(v) == 1 for v in seen.values()), seen
    assert {next(iter(v)) for v in seen.values()} == {"bot@1", "bot@2"}
    # the session header works like `user`
    hdr = {"x-loraplex-session": "s-42"}
    got = {httpx.post(f"{u}/v1/completions", json={"model": "bot", "prompt": "x", "max_tokens": 1}, headers=hdr).headers["x-loraplex-adapter"] for _ in range(8)}
    assert len(got) == 1


def test_bad_routes_are_4xx_and_change_nothing(srv):
    u = srv.url
    before = httpx.get(f"{u}/v1/routes/bot").json()
    for body, frag in [
        ({"versions": {"1": 50, "9": 50}}, "9"),
        ({"versions": {"1": 60, "2": 30}}, "sum to 100"),
        ({"versions": {"1": 100}, "sticky": "planet"}, "sticky"),
        ({"versions": "all"}, "versions"),
    ]:
        r = httpx.put(f"{u}/v1/routes/bot", json=body)
        assert r.status_code == 400, (body, r.text)
        assert frag in r.json()["error"]["message"], r.json()
    assert httpx.put(f"{u}/v1/routes/nobody", json={"versions": {"1": 100}}).status_code == 404
    assert httpx.get(f"{u}/v1/routes/bot").json() == before
    # rollback with no history
    httpx.post(f"{u}/v1/adapters", json={"name": "solo", "path": str(srv.state.store.get("bot", 1).path)})
    r = httpx.post(f"{u}/v1/routes/solo/rollback")
    assert r.status_code == 400 and "roll back" in r.json()["error"]["message"]
    assert httpx.get(f"{u}/v1/routes/solo").status_code == 404


def test_promote_rollback_history(srv):
    u = srv.url
    httpx.put(f"{u}/v1/routes/bot", json={"versions": {"1": 90, "2": 10}})
    r = httpx.post(f"{u}/v1/routes/bot/promote", json={"version": 2})
    assert r.status_code == 200 and r.json()["versions"] == {"2": 100}
    for _ in range(5):
        assert httpx.post(f"{u}/v1/completions", json={"model": "bot", "prompt": "x", "max_tokens": 1}).headers["x-loraplex-adapter"] == "bot@2"
    r = httpx.post(f"{u}/v1/routes/bot/rollback", json={"reason": "bad answers"})
    assert r.status_code == 200 and r.json()["versions"] == {"1": 90, "2": 10}
    hist = httpx.get(f"{u}/v1/routes/bot/history").json()["data"]
    assert [h["action"] for h in hist[-3:]] == ["set", "promote", "rollback"]
    assert hist[-1]["reason"] == "bad answers" and hist[-1]["at"] > 0 and hist[-1]["caller"]
    # a version that still takes traffic cannot be deleted alone
    assert httpx.delete(f"{u}/v1/adapters/bot", params={"version": 2}).status_code == 409


def test_promotion_under_streaming_load(srv):
    """Continuous streaming load while the route flips: zero failures, every response's version is one the
    route held while the request was admitted, and in-flight streams finish on their version."""
    u = srv.url
    st = srv.state.store
    httpx.put(f"{u}/v1/routes/bot", json={"versions": {"1": 100}})
    log: list = []
    failures: list = []
    stop = threading.Event()
    lock = threading.Lock()
    epochs: list = [(time.monotonic(), {1})]  # (time the route changed, versions it allowed)

    def worker():
        with httpx.Client(timeout=180) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    with c.stream("POST", f"{u}/v1/chat/completions", json={"model": "bot", "messages": MSG, "max_tokens": 12, "stream": True, "ignore_eos": True}) as r:
                        if r.status_code != 200:
                            failures.append(r.status_code)
                            continue
                        served = r.headers["x-loraplex-adapter"]
                        text_chunks = [l for l in r.iter_lines() if l.startswith("data:")]
                        if text_chunks[-1] != "data: [DONE]":
                            failures.append("no DONE")
                except Exception as e:  # noqa: BLE001
                    failures.append(repr(e))
                    continue
                with lock:
                    log.append((t0, time.monotonic(), served))

    ts = [threading.Thread(target=worker) for _ in range(4)]
    for t in ts:
        t.start()
    time.sleep(1.0)
    for versions, action in [({1: 80, 2: 20}, "set"), ({2: 100}, "promote"), (None, "rollback"), ({3: 100}, "promote")]:
        if action == "set":
            httpx.put(f"{u}/v1/routes/bot", json={"versions": {str(k): v for k, v in versions.items()}})
        elif action == "promote":
            httpx.post(f"{u}/v1/routes/bot/promote", json={"version": next(iter(versions))})
        else:
            httpx.post(f"{u}/v1/routes/bot/rollback")
        route = st.get_route("bot")
        epochs.append((time.monotonic(), {v for v, w in route.versions.items() if w > 0}))
        time.sleep(0.8)
    stop.set()
    for t in ts:
        t.join()
    assert failures == []
    assert len(log) > 4  # enough requests spanning the route changes (fewer complete on a loaded machine)
    for t0, t1, served in log:
        v = int(served.split("@")[1])
        # versions allowed by any route in force between the request's start and end
        allowed = set()
        for i, (at, vs) in enumerate(epochs):
            nxt = epochs[i + 1][0] if i + 1 < len(epochs) else float("inf")
            if at <= t1 and nxt >= t0:
                allowed |= vs
        assert v in allowed, (served, t0, t1, epochs)


def test_guard_rolls_back_a_failing_canary(srv):
    from loraplex.server.telemetry import Outcome

    u = srv.url
    httpx.post(f"{u}/v1/routes/bot/promote", json={"version": 1})
    r = httpx.put(f"{u}/v1/routes/bot", json={"versions": {"1": 90, "3": 10}, "guard": {"max_error_rate": 0.2, "min_requests": 5}})
    assert r.status_code == 200
    tel = srv.state.telemetry
    # the canary fails (errors are what the engine reports for a version; inject them at the telemetry edge)
    for _ in range(5):
        o = Outcome(time.time(), False, 0.1, None, 0)
        tel.window.add("bot@3", o)
        for fn in tel.listeners:
            fn("bot@3", o)
    route = httpx.get(f"{u}/v1/routes/bot").json()
    assert route["versions"] == {"1": 100}
    last = httpx.get(f"{u}/v1/routes/bot/history").json()["data"][-1]
    assert last["action"] == "rollback" and last["caller"] == "guard" and "error rate" in last["reason"]


def test_metrics_compare_and_version_labels(srv):
    u = srv.url
    httpx.put(f"{u}/v1/routes/bot", json={"versions": {"1": 50, "2": 50}})
    for i in range(20):
        httpx.post(f"{u}/v1/completions", json={"model": "bot", "prompt": "x", "max_tokens": 3, "user": f"u{i}"})
    m = httpx.get(f"{u}/metrics")
    assert m.status_code == 200
    text = m.text
    assert 'loraplex_requests_total{adapter="bot",finish_reason="length",version="1"}' in text
    assert 'loraplex_requests_total{adapter="bot",finish_reason="length",version="2"}' in text
    assert 'loraplex_completion_tokens_total{adapter="bot",version="2"}' in text
    assert "loraplex_time_to_first_token_seconds_bucket" in text and "loraplex_queue_depth" in text
    assert 'loraplex_resident_adapters{tier="cpu"}' in text
    cmp_ = httpx.get(f"{u}/v1/routes/bot/compare", params={"window": 600}).json()
    by_v = {d["version"]: d for d in cmp_["versions"]}
    assert by_v[1]["requests"] > 0 and by_v[2]["requests"] > 0
    assert by_v[1]["p50_latency_s"] is not None and 1 <= by_v[2]["mean_output_tokens"] <= 12
    assert httpx.get(f"{u}/v1/routes/bot/compare", params={"window": "soon"}).status_code == 400


def test_request_spans_carry_adapter_and_version(srv):
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exp = InMemorySpanExporter()
    srv.state.telemetry.provider.add_span_processor(SimpleSpanProcessor(exp))
    httpx.post(f"{srv.url}/v1/completions", json={"model": "bot@2", "prompt": "x", "max_tokens": 2})
    import time as _t

    deadline = _t.time() + 5  # the span is recorded just after the client gets its last token
    while not [s for s in exp.get_finished_spans() if s.name == "loraplex.request"] and _t.time() < deadline:
        _t.sleep(0.02)
    spans = [s for s in exp.get_finished_spans() if s.name == "loraplex.request"]
    assert spans
    a = spans[-1].attributes
    assert a["loraplex.adapter"] == "bot" and a["loraplex.adapter_version"] == "2"
    assert a["loraplex.completion_tokens"] == 2 and a["loraplex.prompt_tokens"] >= 1
    assert "loraplex.time_to_first_token_s" in a and "loraplex.queue_time_s" in a


def test_restart_keeps_versions_routes_and_history(tiny_base, adapter_dirs, tmp_path):
    from conftest import start_server

    s = start_server(tmp_path, tiny_base)
    for src in ("alpha", "beta"):
        httpx.post(f"{s.url}/v1/adapters", json={"name": "keep", "path": str(adapter_dirs[src])})
    httpx.put(f"{s.url}/v1/routes/keep", json={"versions": {"1": 70, "2": 30}, "sticky": "user"})
    s.stop()
    s2 = start_server(tmp_path, tiny_base)
    try:
        route = httpx.get(f"{s2.url}/v1/routes/keep").json()
        assert route["versions"] == {"1": 70, "2": 30} and route["sticky"] == "user"
        assert [v["version"] for v in httpx.get(f"{s2.url}/v1/adapters/keep").json()["versions"]] == [1, 2]
        assert len(httpx.get(f"{s2.url}/v1/routes/keep/history").json()["data"]) == 1
        r = httpx.post(f"{s2.url}/v1/completions", json={"model": "keep@2", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200 and r.headers["x-loraplex-adapter"] == "keep@2"
    finally:
        s2.stop()


def test_cli_sets_routes_seen_by_the_running_server(srv):
    from loraplex.server.cli import main

    store_dir = str(srv.state.store.root)
    assert main(["routes", "--store", store_dir, "--caller", "ops", "set", "bot", "1=30", "2=70"]) == 0
    r = httpx.get(f"{srv.url}/v1/routes/bot").json()
    assert r["versions"] == {"1": 30, "2": 70} and r["updated_by"] == "ops"
    assert main(["routes", "--store", store_dir, "set", "bot", "1=30", "2=30"]) == 1  # does not sum to 100
    assert httpx.get(f"{srv.url}/v1/routes/bot").json()["versions"] == {"1": 30, "2": 70}
    assert main(["routes", "--store", store_dir, "promote", "bot", "2"]) == 0
    assert httpx.post(f"{srv.url}/v1/completions", json={"model": "bot", "prompt": "x", "max_tokens": 1}).headers["x-loraplex-adapter"] == "bot@2"
    assert main(["routes", "--store", store_dir, "rollback", "bot"]) == 0
    assert httpx.get(f"{srv.url}/v1/routes/bot").json()["versions"] == {"1": 30, "2": 70}


def test_cli_with_server_warms_the_version_before_it_takes_traffic(srv, adapter_dirs):
    from loraplex.server.cli import main

    # a new version registered behind the server's back (as another process would); once the
    # server's store polling has seen (and preloaded) it, drop it again so the route change must load it
    v = srv.state.store.register("bot", adapter_dirs["alpha"], caller="test").version
    pool = srv.state.engine.pool
    deadline = time.time() + 30
    while f"bot@{v}" not in pool._cpu and time.time() < deadline:
        time.sleep(0.1)
    srv.state.engine.call(lambda: pool.forget(f"bot@{v}"))
    assert f"bot@{v}" not in pool._cpu
    assert main(["routes", "--server", srv.url, "--caller", "ops", "set", "bot", f"{v}=100"]) == 0
    assert f"bot@{v}" in pool._cpu  # loaded when the CLI returned, before any request asked for it
    r = httpx.get(f"{srv.url}/v1/routes/bot").json()
    assert r["versions"] == {str(v): 100} and r["updated_by"] == "127.0.0.1"  # the server records who it saw
    assert main(["routes", "--server", srv.url, "set", "bot", f"{v}=60", "1=30"]) == 1  # the server's 400, nothing changed
    assert httpx.get(f"{srv.url}/v1/routes/bot").json()["versions"] == {str(v): 100}
    assert main(["routes", "--server", srv.url, "rollback", "bot", "--reason", "cli test"]) == 0
    hist = httpx.get(f"{srv.url}/v1/routes/bot/history").json()["data"]
    assert hist[-1]["action"] == "rollback" and hist[-1]["reason"] == "cli test"
    assert main(["routes", "--server", "http://127.0.0.1:9", "show", "bot"]) == 1  # nobody there: a clear error
