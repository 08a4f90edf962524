"""Two `loraplex serve` processes on one PostgreSQL registry and one store directory agree: a version registered
on A is served by B within a second with the same greedy output, a route changed on B is followed by A, sticky
users get the same version from both, and a version deleted on A stops being served on both while a request
already running on it finishes."""
from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pytest

from helpers import ServeProcess, started_pair

PROMPT = "The capital of France is"


class Replica(ServeProcess):
    def __init__(self, tmp, model, store, registry, name):
        super().__init__(tmp, model, store, registry, name,
                         ["--jobs-dir", str(tmp / f"jobs-{name}"), "--max-loras", "4", "--kv-cache-tokens", "8192"])

    def complete(self, model, *, user=None, max_tokens=8, client=None):
        body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
        if user is not None:
            body["user"] = user
        return (client or httpx).post(f"{self.url}/v1/completions", json=body, timeout=60)


@pytest.fixture
def replicas(tmp_path, tiny_base, postgres_url):
    with started_pair(Replica, tmp_path, tiny_base, postgres_url) as pair:
        yield pair


def _until(fn, timeout):
    """Seconds until fn() is true, polling fast; AssertionError after `timeout`."""
    t0 = time.monotonic()
    while not fn():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.01)
    return time.monotonic() - t0


def test_two_replicas_on_one_postgres_registry_agree(replicas, adapter_dirs):
    a, b = replicas
    # register on A: B serves it within a second, with the same greedy output
    r = httpx.post(f"{a.url}/v1/adapters", json={"name": "bot", "path": str(adapter_dirs["alpha"])}, timeout=60)
    assert r.status_code == 201, r.text
    waited = _until(lambda: b.complete("bot@1", max_tokens=1).status_code == 200, 1.0)
    assert waited < 1.0
    out_a, out_b = a.complete("bot@1").json(), b.complete("bot@1").json()
    assert out_a["choices"][0]["text"] == out_b["choices"][0]["text"]
    assert httpx.post(f"{b.url}/v1/adapters", json={"name": "bot", "path": str(adapter_dirs["beta"])},
                      timeout=60).status_code == 201
    _until(lambda: a.complete("bot@2", max_tokens=1).status_code == 200, 1.0)
    assert a.complete("bot@2").json()["choices"][0]["text"] == b.complete("bot@2").json()["choices"][0]["text"]

    # change a route on B: A follows within a second
    r = httpx.put(f"{b.url}/v1/routes/bot", json={"versions": {"1": 50, "2": 50}, "sticky": "user"}, timeout=60)
    assert r.status_code == 200, r.text
    _until(lambda: httpx.get(f"{a.url}/v1/routes/bot").json().get("versions") == {"1": 50, "2": 50}, 1.0)

    # sticky users get the same version whichever replica answers (1,000 requests)
    served = {}
    with httpx.Client(timeout=60) as ca, httpx.Client(timeout=60) as cb:
        for i in range(500):
            user = f"user-{i}"
            ra = a.complete("bot", user=user, max_tokens=1, client=ca)
            rb = b.complete("bot", user=user, max_tokens=1, client=cb)
            assert ra.status_code == rb.status_code == 200
            served[user] = (ra.headers["x-loraplex-adapter"], rb.headers["x-loraplex-adapter"])
    assert all(x == y for x, y in served.values())
    split = Counter(x for x, _ in served.values())
    assert set(split) == {"bot@1", "bot@2"} and min(split.values()) > 150

    # delete on A drains on both: a request already running on B finishes; new ones are refused on both
    assert httpx.put(f"{a.url}/v1/routes/bot", json={"versions": {"2": 100}}, timeout=60).status_code == 200
    _until(lambda: httpx.get(f"{b.url}/v1/routes/bot").json().get("versions") == {"2": 100}, 1.0)
    running = {}

    def long_request():
        running["resp"] = b.complete("bot@1", max_tokens=48)

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(0.3)
    r = httpx.delete(f"{a.url}/v1/adapters/bot", params={"version": "1"}, timeout=60)
    assert r.status_code == 200 and r.json()["deleted"] == ["bot@1"], r.text
    _until(lambda: b.complete("bot@1", max_tokens=1).status_code == 404, 1.0)
    assert a.complete("bot@1", max_tokens=1).status_code == 404
    t.join(60)
    assert running["resp"].status_code == 200
    assert running["resp"].json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert all(x["id"] != "bot@1" for x in httpx.get(f"{b.url}/v1/adapters").json()["data"])
    assert b.complete("bot", user="user-1", max_tokens=1).headers["x-loraplex-adapter"] == "bot@2"
