"""Route guards armed from the store: a guarded canary set by the CLI (another process) or by a trainer job
registering a canary rolls back by itself when it fails, exactly like one set over HTTP, and the history says why."""
from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest


@pytest.fixture(scope="module")
def srv(tiny_base, tmp_path_factory, adapter_dirs):
    from conftest import start_server

    s = start_server(tmp_path_factory.mktemp("guards"), tiny_base, max_loras=4)
    for src in ("alpha", "beta", "gamma"):
        assert httpx.post(f"{s.url}/v1/adapters", json={"name": "bot", "path": str(adapter_dirs[src])}).status_code == 201
    yield s
    s.stop()


def cli(store_dir, *args) -> subprocess.CompletedProcess:
    """`loraplex routes ...` in its own process, as an operator runs it beside the server."""
    return subprocess.run([sys.executable, "-m", "loraplex.server.cli", "routes", "--store", str(store_dir), *args],
                          capture_output=True, text=True, timeout=60)


def wait_armed(state, name: str, versions: list[int], timeout: float = 10.0) -> dict:
    """The server's guard of `name` once it watches `versions` (it sees other processes' changes by polling)."""
    deadline = time.time() + timeout
    armed = None
    while time.time() < deadline:
        armed = state.routes.guards.armed(name)
        if armed is not None and armed["versions"] == versions:
            return armed
        time.sleep(0.05)
    raise AssertionError(f"the server never armed the guard of {name!r} for {versions}: {armed}")


def fail_until_rolled_back(state, ref: str, name: str, most: int = 50) -> int:
    """Failing requests of `ref`, injected where the engine reports outcomes, until the route rolls back; -> how many."""
    from loraplex.server.telemetry import Outcome

    tel = state.telemetry
    for n in range(1, most + 1):
        o = Outcome(time.time(), False, 0.1, None, 0)
        tel.window.add(ref, o)
        for fn in tel.listeners:
            fn(ref, o)
        if state.store.route_history(name)[-1].caller == "guard":
            return n
        time.sleep(0.02)
    raise AssertionError(f"{most} failures of {ref} did not roll {name!r} back")


def test_cli_guarded_canary_is_armed_by_the_running_server_and_rolls_back(srv):
    store = srv.state.store.root
    assert cli(store, "--caller", "ops", "set", "bot", "1=100").returncode == 0
    r = cli(store, "--caller", "ops", "set", "bot", "1=90", "3=10", "--guard-max-error-rate", "0.2", "--guard-min-requests", "5")
    assert r.returncode == 0, r.stderr
    assert '"guard": {"max_error_rate": 0.2, "min_requests": 5}' in r.stdout
    assert httpx.get(f"{srv.url}/v1/routes/bot").json()["guard"] == {"max_error_rate": 0.2, "min_requests": 5}
    armed = wait_armed(srv.state, "bot", [3])
    assert armed["guard"] == {"max_error_rate": 0.2, "min_requests": 5}
    # the old version failing does not count; the canary failing does, from its 5th failure (5/5 > 20%)
    from loraplex.server.telemetry import Outcome

    for _ in range(10):
        o = Outcome(time.time(), False, 0.1, None, 0)
        srv.state.telemetry.window.add("bot@1", o)
        for fn in srv.state.telemetry.listeners:
            fn("bot@1", o)
    assert httpx.get(f"{srv.url}/v1/routes/bot").json()["versions"] == {"1": 90, "3": 10}
    assert fail_until_rolled_back(srv.state, "bot@3", "bot") == 5
    assert httpx.get(f"{srv.url}/v1/routes/bot").json()["versions"] == {"1": 100}
    last = httpx.get(f"{srv.url}/v1/routes/bot/history").json()["data"][-1]
    assert last["action"] == "rollback" and last["caller"] == "guard"
    assert "bot@3 error rate 100.0% over its last 5 requests exceeds 20.0%" in last["reason"]
    hist = cli(store, "history", "bot")
    assert hist.returncode == 0 and '"caller": "guard"' in hist.stdout.splitlines()[-1] and "error rate" in hist.stdout
    wait_disarmed = time.time() + 5  # the rollback is in the event log too; the poller keeps the guard disarmed
    while srv.state.routes.guards.armed("bot") is not None and time.time() < wait_disarmed:
        time.sleep(0.05)
    assert srv.state.routes.guards.armed("bot") is None


def test_cli_route_changes_disarm_and_bad_guards_are_refused(srv):
    store = srv.state.store.root
    assert cli(store, "set", "bot", "1=100").returncode == 0
    assert cli(store, "set", "bot", "1=80", "2=20", "--guard-max-error-rate", "0.5").returncode == 0
    assert wait_armed(srv.state, "bot", [2])["guard"] == {"max_error_rate": 0.5, "min_requests": 20}  # the API's default
    assert cli(store, "promote", "bot", "2").returncode == 0
    deadline = time.time() + 10
    while srv.state.routes.guards.armed("bot") is not None and time.time() < deadline:
        time.sleep(0.05)
    assert srv.state.routes.guards.armed("bot") is None  # promoted: nothing left to roll back to
    before = httpx.get(f"{srv.url}/v1/routes/bot").json()
    for args, frag in [(["--guard-max-error-rate", "1.5"], "--guard-max-error-rate"),
                       (["--guard-min-requests", "5"], "needs --guard-max-error-rate"),
                       (["--guard-max-error-rate", "0.1", "--guard-min-requests", "0"], "--guard-min-requests")]:
        r = cli(store, "set", "bot", "1=50", "2=50", *args)
        assert r.returncode == 2 and frag in r.stderr, (args, r.stderr)
    assert httpx.get(f"{srv.url}/v1/routes/bot").json() == before


def test_trainer_canary_keeps_the_routes_guard_and_rolls_back(srv, tiny_base, adapter_dirs, tmp_path):
    """A job registering its adapter as a canary (another process, through the store) into a guarded route."""
    from loraplex.adapters_store import AdapterStore
    from loraplex.trainer.config import parse_config
    from loraplex.trainer.register import register_result

    store_dir = srv.state.store.root
    other = AdapterStore(store_dir)  # the trainer's own handle on the store
    other.register("tuned", adapter_dirs["alpha"], caller="train:first")
    other.register("tuned", adapter_dirs["beta"], caller="train:second")
    other.set_route("tuned", {1: 100}, caller="ops")
    other.set_route("tuned", {1: 90, 2: 10}, guard={"max_error_rate": 0.1, "min_requests": 4}, caller="ops")
    other.promote("tuned", 2, caller="ops")  # promotion drops the guard ...
    other.set_route("tuned", {2: 100}, guard={"max_error_rate": 0.1, "min_requests": 4}, caller="ops")  # ... ops guard the route again
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    cfg = parse_config({"base_model": str(tiny_base), "adapter": {"name": "tuned", "r": 4}, "datasets": [str(data)], "canary": 25})
    v, route = register_result(cfg, adapter_dirs["gamma"], {}, store_dir, caller="train:canary")
    assert v.version == 3 and route.versions == {2: 75, 3: 25}
    assert route.guard == {"max_error_rate": 0.1, "min_requests": 4}
    wait_armed(srv.state, "tuned", [3])
    assert fail_until_rolled_back(srv.state, "tuned@3", "tuned") == 4
    assert srv.state.store.get_route("tuned").versions == {2: 100}
    last = srv.state.store.route_history("tuned")[-1]
    assert last.action == "rollback" and last.caller == "guard" and "tuned@3 error rate" in last.reason


def test_guard_set_while_the_server_was_down_is_armed_at_start(tiny_base, adapter_dirs, tmp_path):
    from conftest import start_server

    s = start_server(tmp_path, tiny_base)
    try:
        for src in ("alpha", "beta"):
            assert httpx.post(f"{s.url}/v1/adapters", json={"name": "late", "path": str(adapter_dirs[src])}).status_code == 201
        assert httpx.put(f"{s.url}/v1/routes/late", json={"versions": {"1": 100}}).status_code == 200
    finally:
        s.stop()
    r = cli(tmp_path / "store", "set", "late", "1=50", "2=50", "--guard-max-error-rate", "0.3", "--guard-min-requests", "3")
    assert r.returncode == 0, r.stderr
    s2 = start_server(tmp_path, tiny_base)
    try:
        armed = s2.state.routes.guards.armed("late")
        assert armed is not None and armed["versions"] == [2]
        assert fail_until_rolled_back(s2.state, "late@2", "late") == 3
        assert httpx.get(f"{s2.url}/v1/routes/late").json()["versions"] == {"1": 100}
    finally:
        s2.stop()
