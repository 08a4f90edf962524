"""One contract for every registry backend: the same store behaviour on SQLite (the embedded default) and on
PostgreSQL (a fresh database per test, dropped afterwards). Two `AdapterStore` handles on one registry and one
store directory stand for two replicas."""
from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from loraplex.adapters_store import AdapterConflict, AdapterNotFound, AdapterStore, InvalidRequest
from loraplex.adapters_store import store as store_mod
from loraplex.adapters_store.registry import PostgresRegistry, SQLiteRegistry, open_registry


@pytest.fixture(scope="module")
def spec(tiny_base):
    from helpers import base_spec_for

    return base_spec_for(tiny_base, model_id="tiny-llama")


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path):
    """(registry argument, store directory) for each backend."""
    if request.param == "sqlite":
        return None, tmp_path / "store"
    return request.getfixturevalue("postgres_url"), tmp_path / "store"


@pytest.fixture
def pair(backend, spec):
    """Two replicas' handles on one registry and one store directory."""
    url, root = backend
    a = AdapterStore(root, base=spec, registry=url)
    b = AdapterStore(root, base=spec, registry=url)
    yield a, b
    a.close()
    b.close()


def test_backend_is_the_one_asked_for(backend, spec):
    url, root = backend
    st = AdapterStore(root, base=spec, registry=url)
    try:
        assert isinstance(st.registry, PostgresRegistry if url else SQLiteRegistry)
        if url:
            assert not (root / "registry.sqlite3").exists()
            assert "***" in repr(st.registry) or "@" not in url.split("//", 1)[1].split("/")[0]
    finally:
        st.close()


def test_register_on_one_replica_is_read_on_the_other(pair, adapter_dirs):
    a, b = pair
    v1 = a.register("bot", adapter_dirs["alpha"], lineage={"seed": 3, "lr": 1e-4})
    got = b.get("bot")
    assert (got.ref, got.sha256, got.lineage) == ("bot@1", v1.sha256, {"seed": 3, "lr": 1e-4})
    assert got.created_at == v1.created_at  # a double round-trips exactly on both backends
    assert got.manifest == v1.manifest
    v2 = b.register("bot", adapter_dirs["beta"])
    assert v2.version == 2 and [v.ref for v in a.versions("bot")] == ["bot@1", "bot@2"]
    assert [v.ref for v in a.list()] == [v.ref for v in b.list()] == ["bot@1", "bot@2"]


def test_concurrent_registrations_across_replicas_get_distinct_versions(pair, adapter_dirs):
    a, b = pair
    out, errors = [], []

    def reg(st, src):
        try:
            out.append(st.register("bot", src).version)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=reg, args=(st, adapter_dirs[k]))
          for st in (a, b) for k in ("alpha", "beta", "delta")]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == [] and sorted(out) == [1, 2, 3, 4, 5, 6]
    assert [v.version for v in b.versions("bot")] == [1, 2, 3, 4, 5, 6]


def test_routes_history_rollback_and_sticky_agree_across_replicas(pair, adapter_dirs):
    a, b = pair
    for k in ("alpha", "beta"):
        a.register("bot", adapter_dirs[k])
    r = b.set_route("bot", {"1": 70, "2": 30}, sticky="user", guard={"max_error_rate": 0.5}, caller="ops")
    assert a.get_route("bot") == r and r.guard == {"max_error_rate": 0.5, "min_requests": 20}
    picks_a = [a.resolve("bot", sticky_key=f"user-{i}").version for i in range(1000)]
    picks_b = [b.resolve("bot", sticky_key=f"user-{i}").version for i in range(1000)]
    assert picks_a == picks_b and 550 < Counter(picks_a)[1] < 850
    a.promote("bot", 2, caller="ops")
    assert b.get_route("bot").versions == {2: 100}
    back = b.rollback("bot", caller="ops", reason="bad canary")
    assert a.get_route("bot").versions == {1: 70, 2: 30} and back.sticky == "user"
    assert [c.action for c in a.route_history("bot")] == ["set", "promote", "rollback"]
    assert a.route_history("bot")[-1].reason == "bad canary"
    with pytest.raises(AdapterConflict):
        a.delete("bot", 1)  # still routed
    with pytest.raises(InvalidRequest):
        b.set_route("bot", {"1": 50, "3": 50})


def test_a_guarded_rollback_happens_once_when_replicas_trip_together(pair, adapter_dirs):
    a, b = pair
    for k in ("alpha", "beta"):
        a.register("bot", adapter_dirs[k])
    a.set_route("bot", {"1": 100})
    armed = a.set_route("bot", {"1": 90, "2": 10}, guard={"max_error_rate": 0.1})
    assert a.route_history("bot")[-1].at == armed.updated_at  # the change's time keys the guard's shared counts
    first = a.rollback("bot", caller="guard", if_updated_at=armed.updated_at)
    second = b.rollback("bot", caller="guard", if_updated_at=armed.updated_at)
    assert first.versions == second.versions == {1: 100}
    assert [c.action for c in b.route_history("bot")] == ["set", "set", "rollback"]


def test_guard_counts_are_shared_per_route_change(pair):
    a, b = pair
    a.publish_guard_counts("replica-a", {("bot", 2, 10.5): (12, 3)})
    b.publish_guard_counts("replica-b", {("bot", 2, 10.5): (9, 1), ("bot", 2, 99.0): (50, 50)})
    b.publish_guard_counts("replica-b", {("bot", 2, 10.5): (11, 2)})  # a replica's latest counts replace its earlier
    assert a.guard_counts("bot", 2, 10.5) == {"replica-a": (12, 3), "replica-b": (11, 2)}
    assert b.guard_counts("bot", 2, 99.0) == {"replica-b": (50, 50)}
    assert a.guard_counts("bot", 1, 10.5) == {}


def test_delete_and_events_reach_the_other_replica(pair, adapter_dirs):
    a, b = pair
    a.register("bot", adapter_dirs["alpha"])
    a.register("bot", adapter_dirs["beta"])
    seq = b.last_event_seq()
    a.set_route("bot", {"2": 100})
    a.delete("bot", 1)
    evs = b.wait_events(seq, 2.0)
    assert [(e.kind, e.version) for e in evs] == [("route_changed", None), ("deleted", 1)]
    assert [v.ref for v in b.versions("bot")] == ["bot@2"]
    with pytest.raises(AdapterNotFound):
        b.resolve("bot", 1)
    a.delete("bot")
    assert b.names() == [] and b.get_route("bot") is None
    with pytest.raises(AdapterNotFound):
        b.get("bot")
    assert a.register("bot", adapter_dirs["alpha"]).version == 3  # numbers are never reused


def test_wait_events_returns_as_soon_as_another_replica_writes(pair, adapter_dirs):
    a, b = pair
    a.register("bot", adapter_dirs["alpha"])
    seq = b.last_event_seq()
    assert b.wait_events(seq, 0.3) == []  # nothing happened: waits the timeout
    t0 = [0.0]

    def later():
        time.sleep(0.3)
        t0[0] = time.monotonic()
        a.set_route("bot", {"1": 100})

    threading.Thread(target=later).start()
    evs = b.wait_events(seq, 5.0)
    assert [e.kind for e in evs] == ["route_changed"] and time.monotonic() - t0[0] < 0.5


def test_the_event_log_is_compacted(pair, adapter_dirs, monkeypatch):
    a, b = pair
    monkeypatch.setattr(store_mod, "COMPACT_EVERY", 8)
    monkeypatch.setattr(store_mod, "EVENT_KEEP", 5)
    monkeypatch.setattr(store_mod, "EVENT_RETENTION_S", 0.0)
    a.register("bot", adapter_dirs["alpha"])
    a.register("bot", adapter_dirs["beta"])
    for i in range(30):
        (a if i % 2 else b).set_route("bot", {"1": 100 - i, "2": i})
    rows = a._query("SELECT COUNT(*), MIN(seq), MAX(seq) FROM events")[0]
    assert rows[0] < 15 and rows[2] == a.last_event_seq() == 32
    fresh = AdapterStore(a.root, registry=a.registry)  # a replica starting now loads the registry whole
    assert fresh.get_route("bot").versions == {1: 71, 2: 29} and [v.version for v in fresh.versions("bot")] == [1, 2]


def test_unsupported_registry_urls_are_refused(tmp_path):
    with pytest.raises(InvalidRequest, match="unsupported registry URL scheme"):
        open_registry("mysql://db/x", tmp_path)
    assert isinstance(open_registry(None, tmp_path), SQLiteRegistry)


def test_a_guard_decides_on_the_errors_of_every_replica(pair, adapter_dirs):
    """Each replica alone saw too few requests to judge the canary; together they saw enough: the route rolls
    back, once."""
    from loraplex.server.api.routes_api import RouteGuards
    from loraplex.server.telemetry import Outcome, Telemetry

    a, b = pair
    for k in ("alpha", "beta"):
        a.register("bot", adapter_dirs[k])
    a.set_route("bot", {"1": 100})
    armed = a.set_route("bot", {"1": 50, "2": 50}, guard={"max_error_rate": 0.2, "min_requests": 20})
    guards = []
    for name, st in (("replica-a", a), ("replica-b", b)):
        g = RouteGuards(st, Telemetry("tiny"), replica=name)
        g.close()  # shared by hand below, not by the background thread
        g.sync("bot")
        assert g.armed("bot")["since"] == armed.updated_at
        guards.append(g)
    for g in guards:  # 12 requests on each replica, 4 failed on each: 24 requests, 33% errors
        for i in range(12):
            o = Outcome(time.time(), i % 3 != 0, 0.1, None, 1)
            g.telemetry.window.add("bot@2", o)
            g.observe("bot@2", o)
    assert a.get_route("bot").versions == {1: 50, 2: 50}  # neither saw min_requests alone
    guards[0].share()  # A publishes its counts; B's are not in the registry yet
    assert a.get_route("bot").versions == {1: 50, 2: 50}
    guards[1].share()  # B publishes, reads A's, decides on 24 requests
    assert b.get_route("bot").versions == {1: 100}
    guards[0].share()
    hist = a.route_history("bot")
    assert [(c.action, c.caller) for c in hist] == [("set", "api"), ("set", "api"), ("rollback", "guard")]
    assert "24 requests" in hist[-1].reason
