"""Registering and deleting adapters on a running server: validation, no partial state, no disturbed requests."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time

import httpx
import pytest

MSG = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def srv(tiny_base, tmp_path_factory, adapter_dirs):
    from conftest import start_server

    root = adapter_dirs["alpha"].parent
    s = start_server(tmp_path_factory.mktemp("adm"), tiny_base, max_loras=2, allowed_adapter_roots=[root])
    yield s
    s.stop()


def store_snapshot(srv):
    st = srv.state.store
    files = sorted(str(p.relative_to(st.root)) for p in (st.root / "adapters").rglob("*")) if (st.root / "adapters").exists() else []
    return [v.ref for v in st.list()], files


def test_register_list_get_delete(srv, adapter_dirs):
    u = srv.url
    r = httpx.post(f"{u}/v1/adapters", json={"name": "support-bot", "path": str(adapter_dirs["alpha"])})
    assert r.status_code == 201 and r.json()["version"] == 1
    r = httpx.post(f"{u}/v1/adapters", json={"name": "support-bot", "path": str(adapter_dirs["gamma"])})
    assert r.json()["version"] == 2
    assert {a["id"] for a in httpx.get(f"{u}/v1/adapters").json()["data"]} >= {"support-bot@1", "support-bot@2"}
    g = httpx.get(f"{u}/v1/adapters/support-bot").json()
    assert g["latest"] == 2 and [v["version"] for v in g["versions"]] == [1, 2]
    # the bare name serves the latest version
    r = httpx.post(f"{u}/v1/chat/completions", json={"model": "support-bot", "messages": MSG, "max_tokens": 2})
    assert r.headers["x-loraplex-adapter"] == "support-bot@2"
    assert httpx.delete(f"{u}/v1/adapters/support-bot").status_code == 200
    assert httpx.get(f"{u}/v1/adapters/support-bot").status_code == 404
    r = httpx.post(f"{u}/v1/chat/completions", json={"model": "support-bot", "messages": MSG, "max_tokens": 2})
    assert r.status_code == 404


def test_vllm_compatible_endpoints(srv, adapter_dirs):
    u = srv.url
    r = httpx.post(f"{u}/v1/load_lora_adapter", json={"lora_name": "vl", "lora_path": str(adapter_dirs["beta"])})
    assert r.status_code == 200, r.text
    r = httpx.post(f"{u}/v1/completions", json={"model": "vl", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200
    assert httpx.post(f"{u}/v1/unload_lora_adapter", json={"lora_name": "vl"}).status_code == 200
    assert httpx.post(f"{u}/v1/completions", json={"model": "vl", "prompt": "x", "max_tokens": 2}).status_code == 404


def _broken(src, dst, how):
    shutil.copytree(src, dst)
    if how == "missing-weights":
        os.remove(dst / "adapter_model.safetensors")
    elif how == "missing-config":
        os.remove(dst / "adapter_config.json")
    elif how == "pickle":
        import torch

        torch.save({"x": 1}, dst / "adapter_model.bin")
    return dst


@pytest.mark.parametrize("how", ["missing-weights", "missing-config", "pickle"])
def test_bad_adapter_dirs_are_422_and_change_nothing(srv, adapter_dirs, how):
    bad = _broken(adapter_dirs["alpha"], adapter_dirs["alpha"].parent / f"bad-{how}", how)
    before = store_snapshot(srv)
    r = httpx.post(f"{srv.url}/v1/adapters", json={"name": "broken", "path": str(bad)})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"]
    assert store_snapshot(srv) == before


def test_wrong_shapes_and_unknown_modules_are_422(srv, tmp_path_factory, adapter_dirs):
    from helpers import make_peft_adapter, make_tiny_llama

    root = adapter_dirs["alpha"].parent
    other = make_tiny_llama(tmp_path_factory.mktemp("other"), hidden_size=32, intermediate_size=64)
    wrong = make_peft_adapter(other, root / "wrong-shape", r=4, target_modules=["q_proj"])
    before = store_snapshot(srv)
    r = httpx.post(f"{srv.url}/v1/adapters", json={"name": "wrong", "path": str(wrong)})
    assert r.status_code == 422 and "q_proj" in r.json()["error"]["message"]
    # an adapter that targets a module this base lacks
    ghost = root / "ghost"
    shutil.copytree(adapter_dirs["alpha"], ghost)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(ghost / "adapter_model.safetensors"))
    sd = {k.replace("layers.0.self_attn.q_proj", "layers.7.self_attn.q_proj"): v for k, v in sd.items()}
    save_file(sd, str(ghost / "adapter_model.safetensors"))
    r = httpx.post(f"{srv.url}/v1/adapters", json={"name": "ghost", "path": str(ghost)})
    assert r.status_code == 422 and "layers.7" in r.json()["error"]["message"]
    assert store_snapshot(srv) == before


def test_path_outside_allowed_roots_is_403(srv, tmp_path, adapter_dirs):
    outside = shutil.copytree(adapter_dirs["alpha"], tmp_path / "elsewhere")
    before = store_snapshot(srv)
    r = httpx.post(f"{srv.url}/v1/adapters", json={"name": "sneaky", "path": str(outside)})
    assert r.status_code == 403
    r = httpx.post(f"{srv.url}/v1/adapters", json={"name": "sneaky", "path": str(adapter_dirs["alpha"].parent / ".." / outside.parent.name / "elsewhere")})
    assert r.status_code in (403, 422)
    assert store_snapshot(srv) == before


def test_bad_register_bodies_are_400(srv, adapter_dirs):
    u = srv.url
    assert httpx.post(f"{u}/v1/adapters", json={"name": "x"}).status_code == 400
    r = httpx.post(f"{u}/v1/adapters", json={"name": "bad/name", "path": str(adapter_dirs["alpha"])})
    assert r.status_code == 400
    r = httpx.post(f"{u}/v1/adapters", json={"name": "x", "path": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "path"


def test_register_and_delete_under_load_never_misroutes(srv, adapter_dirs):
    """A stream of requests on two adapters while others are registered and deleted: no failure,
    every answer comes from the adapter it asked for (checked against that adapter's greedy output)."""
    u = srv.url
    for name in ("steady-a", "steady-b"):
        assert httpx.post(f"{u}/v1/adapters", json={"name": name, "path": str(adapter_dirs["alpha" if name == "steady-a" else "delta"])}).status_code == 201
    body = lambda m: {"model": m, "messages": MSG, "max_tokens": 6, "temperature": 0}
    expected = {m: httpx.post(f"{u}/v1/chat/completions", json=body(m)).json()["choices"][0]["message"]["content"] for m in ("steady-a", "steady-b")}
    assert expected["steady-a"] != expected["steady-b"]
    failures, done = [], threading.Event()

    def load(model):
        with httpx.Client(timeout=60) as c:
            while not done.is_set():
                r = c.post(f"{u}/v1/chat/completions", json=body(model))
                if r.status_code != 200:
                    failures.append((model, r.status_code, r.text))
                elif r.json()["choices"][0]["message"]["content"] != expected[model] or r.headers["x-loraplex-adapter"] != f"{model}@1":
                    failures.append((model, "wrong answer", r.text))

    ts = [threading.Thread(target=load, args=(m,)) for m in ("steady-a", "steady-b", "steady-a")]
    for t in ts:
        t.start()
    try:
        for i in range(4):
            n = f"churn{i}"
            assert httpx.post(f"{u}/v1/adapters", json={"name": n, "path": str(adapter_dirs["beta"])}).status_code == 201
            assert httpx.post(f"{u}/v1/chat/completions", json=body(n)).status_code == 200
            assert httpx.delete(f"{u}/v1/adapters/{n}").status_code == 200
    finally:
        done.set()
        for t in ts:
            t.join()
    assert failures == []


def test_delete_drains_in_flight_requests(srv, adapter_dirs):
    u = srv.url
    assert httpx.post(f"{u}/v1/adapters", json={"name": "drainme", "path": str(adapter_dirs["gamma"])}).status_code == 201
    result = {}

    def long_request():
        r = httpx.post(f"{u}/v1/chat/completions", json={"model": "drainme", "messages": MSG, "max_tokens": 150, "ignore_eos": True}, timeout=120)
        result["r"] = r

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.time() + 20
    while srv.engine.pool.pinned("drainme@1") == 0 and time.time() < deadline:
        time.sleep(0.01)
    d = httpx.delete(f"{u}/v1/adapters/drainme")
    assert d.status_code == 200 and d.json()["draining"] == ["drainme@1"]
    assert httpx.post(f"{u}/v1/chat/completions", json={"model": "drainme", "messages": MSG, "max_tokens": 2}).status_code == 404
    t.join()
    r = result["r"]
    assert r.status_code == 200 and r.headers["x-loraplex-adapter"] == "drainme@1"
    assert r.json()["usage"]["completion_tokens"] == 150
    assert srv.engine.pool.slot_of("drainme@1") is None
