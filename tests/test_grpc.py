"""The gRPC API with a real grpc client against a server started in-process on the tiny model."""
from __future__ import annotations

import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loraplex.protos.loraplex.v1 import loraplex_pb2 as pb
from loraplex.protos.loraplex.v1 import loraplex_pb2_grpc as pbg

MSGS = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def g(server, adapter_dirs):
    from loraplex.server.grpc_server import GrpcServer

    for name in ("alpha", "beta"):
        httpx.post(f"{server.url}/v1/adapters", json={"name": name, "path": str(adapter_dirs[name])})
    gs = GrpcServer(server.state, port=0)
    port = gs.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(ch).result(timeout=10)
    yield server, ch, gs
    ch.close()
    gs.stop()


def chat_req(model, **sampling):
    return pb.GenerateRequest(model=model, chat=pb.ChatPrompt(messages=[pb.ChatMessage(**m) for m in MSGS]),
                              sampling=pb.SamplingParams(**sampling))


def test_unary_and_stream_equal_http(g):
    srv, ch, _ = g
    stub = pbg.InferenceStub(ch)
    for model in ("alpha", "beta", srv.state.service.model_id):
        http = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": model, "messages": MSGS, "max_tokens": 10, "temperature": 0.9, "seed": 11, "logprobs": True, "top_logprobs": 2}).json()
        want = http["choices"][0]["message"]["content"]
        r = stub.Generate(chat_req(model, max_tokens=10, temperature=0.9, seed=11, logprobs=2))
        assert r.text == want
        assert r.finish_reason == http["choices"][0]["finish_reason"]
        assert r.usage.completion_tokens == http["usage"]["completion_tokens"]
        assert r.usage.prompt_tokens == http["usage"]["prompt_tokens"]
        assert r.served_by == http["system_fingerprint"]
        lps = [e["logprob"] for e in http["choices"][0]["logprobs"]["content"]]
        assert [round(e.logprob, 4) for e in r.logprobs] == [round(x, 4) for x in lps]
        assert all(len(e.top) == 2 for e in r.logprobs)
        chunks = list(stub.GenerateStream(chat_req(model, max_tokens=10, temperature=0.9, seed=11)))
        assert "".join(c.text for c in chunks) == want
        assert [c.finish_reason for c in chunks if c.finish_reason] == [r.finish_reason]
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
        assert sum(len(c.token_ids) for c in chunks) == r.usage.completion_tokens
    # text prompts equal /v1/completions
    http = httpx.post(f"{srv.url}/v1/completions", json={"model": "alpha@1", "prompt": "Hello", "max_tokens": 6, "temperature": 0}).json()
    r = stub.Generate(pb.GenerateRequest(model="alpha@1", text="Hello", sampling=pb.SamplingParams(max_tokens=6, temperature=0)))
    assert r.text == http["choices"][0]["text"] and r.adapter == "alpha" and r.adapter_version == 1
    ids = srv.state.service.text_prompt_ids("Hello")
    r2 = stub.Generate(pb.GenerateRequest(model="alpha@1", token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(max_tokens=6, temperature=0)))
    assert r2.text == r.text


def test_concurrent_streams_for_different_adapters(g):
    srv, ch, _ = g
    stub = pbg.InferenceStub(ch)
    models = ["alpha", "beta", srv.state.service.model_id] * 3
    want = {m: stub.Generate(chat_req(m, max_tokens=8, temperature=0)).text for m in set(models)}
    got, errs = {}, []

    def run(i, m):
        try:
            got[i] = "".join(c.text for c in stub.GenerateStream(chat_req(m, max_tokens=8, temperature=0)))
        except Exception as e:  # noqa: BLE001
            errs.append(e)

    ts = [threading.Thread(target=run, args=(i, m)) for i, m in enumerate(models)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errs == []
    assert all(got[i] == want[m] for i, m in enumerate(models))


def _wait_idle(engine, timeout=10):
    deadline = time.time() + timeout
    while engine.state()["running"] and time.time() < deadline:
        time.sleep(0.02)
    return engine.state()


def test_cancelled_stream_and_deadline_free_the_slot(g):
    srv, ch, _ = g
    stub = pbg.InferenceStub(ch)
    eng = srv.engine
    it = stub.GenerateStream(chat_req("alpha", max_tokens=400, ignore_eos=True))
    next(it)
    assert eng.state()["running"] >= 1
    it.cancel()
    st = _wait_idle(eng)
    assert st["running"] == 0 and st["kv_used_tokens"] == 0
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(chat_req("beta", max_tokens=400, ignore_eos=True), timeout=0.3)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    st = _wait_idle(eng)
    assert st["running"] == 0 and st["kv_used_tokens"] == 0


def test_error_codes(g, adapter_dirs, tmp_path):
    srv, ch, _ = g
    stub, admin = pbg.InferenceStub(ch), pbg.AdminStub(ch)

    def code(fn, *a, **kw):
        with pytest.raises(grpc.RpcError) as e:
            fn(*a, **kw)
        return e.value.code(), e.value.details()

    c, d = code(stub.Generate, chat_req("nope", max_tokens=2))
    assert c == grpc.StatusCode.NOT_FOUND and "nope" in d
    c, d = code(stub.Generate, chat_req("alpha", max_tokens=2, temperature=7))
    assert c == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in d
    c, d = code(stub.Generate, chat_req("alpha", max_tokens=100000))
    assert c == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in d
    c, d = code(stub.Generate, pb.GenerateRequest(model="alpha"))
    assert c == grpc.StatusCode.INVALID_ARGUMENT and "text" in d
    c, d = code(list, stub.GenerateStream(chat_req("alpha@7", max_tokens=2)))
    assert c == grpc.StatusCode.NOT_FOUND
    # an adapter for another base: FAILED_PRECONDITION, nothing registered
    from helpers import make_peft_adapter, make_tiny_llama

    other = make_tiny_llama(tmp_path / "other", hidden_size=32, intermediate_size=64)
    wrong = make_peft_adapter(other, tmp_path / "wrong", r=4)
    before = [v.ref for v in srv.state.store.list()]
    c, d = code(admin.RegisterAdapter, pb.RegisterAdapterRequest(name="wrong", path=str(wrong)))
    assert c == grpc.StatusCode.FAILED_PRECONDITION and "q_proj" in d
    assert [v.ref for v in srv.state.store.list()] == before
    c, _ = code(admin.SetRoute, pb.SetRouteRequest(name="alpha", weights={1: 50}))
    assert c == grpc.StatusCode.INVALID_ARGUMENT
    c, _ = code(admin.GetAdapter, pb.GetAdapterRequest(name="ghost"))
    assert c == grpc.StatusCode.NOT_FOUND


def test_queue_full_is_resource_exhausted(tiny_base, tmp_path):
    from conftest import start_server

    from loraplex.server.grpc_server import GrpcServer

    s = start_server(tmp_path, tiny_base, max_queue=1, max_num_seqs=1)
    gs = GrpcServer(s.state, port=0)
    port = gs.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pbg.InferenceStub(ch)
            model = s.state.service.model_id
            codes = []

            def go():
                try:
                    stub.Generate(chat_req(model, max_tokens=300, ignore_eos=True))
                    codes.append("OK")
                except grpc.RpcError as e:
                    codes.append(e.code())

            ts = [threading.Thread(target=go) for _ in range(5)]
            for t in ts:
                t.start()
                time.sleep(0.05)
            for t in ts:
                t.join()
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and "OK" in codes
    finally:
        gs.stop()
        s.stop()


def test_admin_rpcs(g, adapter_dirs):
    srv, ch, _ = g
    admin = pbg.AdminStub(ch)
    v1 = admin.RegisterAdapter(pb.RegisterAdapterRequest(name="grpc-bot", path=str(adapter_dirs["gamma"]), lineage_json='{"from": "test"}'))
    v2 = admin.RegisterAdapter(pb.RegisterAdapterRequest(name="grpc-bot", path=str(adapter_dirs["delta"])))
    assert (v1.version, v2.version) == (1, 2) and v1.r == 16
    a = admin.GetAdapter(pb.GetAdapterRequest(name="grpc-bot"))
    assert a.latest == 2 and [v.version for v in a.versions] == [1, 2]
    r = admin.SetRoute(pb.SetRouteRequest(name="grpc-bot", weights={1: 80, 2: 20}, sticky="user"))
    assert dict(r.weights) == {1: 80, 2: 20} and r.sticky == "user"
    assert dict(admin.PromoteRoute(pb.PromoteRouteRequest(name="grpc-bot", version=2)).weights) == {2: 100}
    assert dict(admin.RollbackRoute(pb.RollbackRouteRequest(name="grpc-bot")).weights) == {1: 80, 2: 20}
    ids = {m.id for m in pbg.InferenceStub(ch).ListModels(pb.ListModelsRequest()).models}
    assert {"grpc-bot", "grpc-bot@1", "grpc-bot@2", srv.state.service.model_id} <= ids
    assert "grpc-bot@1" in {v.id for v in admin.ListAdapters(pb.ListAdaptersRequest()).versions}
    d = admin.DeleteAdapter(pb.DeleteAdapterRequest(name="grpc-bot"))
    assert sorted(d.deleted) == ["grpc-bot@1", "grpc-bot@2"]


def test_reflection_lists_services(g):
    _, ch, _ = g
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"loraplex.v1.Inference", "loraplex.v1.Admin", "grpc.health.v1.Health"} <= names


def test_health_transitions(server):
    from loraplex.server.app import ServerState
    from loraplex.server.grpc_server import GrpcServer

    state = ServerState()  # nothing loaded yet
    gs = GrpcServer(state, port=0)
    port = gs.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        h = health_pb2_grpc.HealthStub(ch)
        check = lambda svc="": h.Check(health_pb2.HealthCheckRequest(service=svc)).status
        assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            pbg.InferenceStub(ch).Generate(chat_req("x", max_tokens=1))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        watch = h.Watch(health_pb2.HealthCheckRequest(service="loraplex.v1.Inference"))
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        # the model finishes loading
        for k in ("store", "engine", "manager", "telemetry", "routes"):
            setattr(state, k, getattr(server.state, k))
        state.service = server.state.service
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        assert check() == health_pb2.HealthCheckResponse.SERVING
        # graceful shutdown
        state.draining = True
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
    gs.stop()


def test_protos_are_fresh():
    from loraplex.protos.generate import main

    assert main(["--check"]) == 0
