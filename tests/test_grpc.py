"""The gRPC API with a real grpc client against a server started in-process on the tiny model.

The gRPC server runs on the same ServerState (engine, store, routes) as the
HTTP app started by `start_server`, as `loraplex serve` wires them.
"""
from __future__ import annotations

import functools
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
# generous: on a loaded 2-core machine a CPU request can take longer than httpx's 5 s default
_post = functools.partial(httpx.post, timeout=60)
_get = functools.partial(httpx.get, timeout=60)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def g(server, adapter_dirs):
    from loraplex.server.api.grpc_server import GrpcServer

    for name in ("alpha", "beta"):
        assert _post(f"{server.url}/v1/adapters", json={"name": name, "path": str(adapter_dirs[name])}).status_code == 201
    gs = GrpcServer(server.state, port=0)
    port = gs.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(ch).result(timeout=10)
    yield server, ch, gs
    ch.close()
    gs.stop()


def chat_req(model, request_id="", **sampling):
    return pb.GenerateRequest(model=model, chat=pb.ChatPrompt(messages=[pb.ChatMessage(**m) for m in MSGS]),
                              sampling=pb.SamplingParams(**sampling), request_id=request_id)


def rpc_error(fn, *a, with_field=False, **kw):
    """(code, details[, the x-loraplex-field trailing metadata]) of a call that must fail."""
    with pytest.raises(grpc.RpcError) as e:
        r = fn(*a, **kw)
        if not hasattr(r, "usage"):  # a stream: errors arrive while reading it
            list(r)
    if with_field:
        return e.value.code(), e.value.details(), dict(e.value.trailing_metadata() or ()).get("x-loraplex-field")
    return e.value.code(), e.value.details()


def test_unary_and_stream_equal_http(g):
    srv, ch, _ = g
    stub = pbg.InferenceStub(ch)
    for model in ("alpha", "beta", srv.state.service.model_id):
        http = _post(f"{srv.url}/v1/chat/completions", json={"model": model, "messages": MSGS, "max_tokens": 10, "temperature": 0.9,
                                                                    "seed": 11, "logprobs": True, "top_logprobs": 2}).json()
        want = http["choices"][0]["message"]["content"]
        r = stub.Generate(chat_req(model, max_tokens=10, temperature=0.9, seed=11, logprobs=2))
        assert r.text == want
        assert r.finish_reason == http["choices"][0]["finish_reason"]
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (http["usage"]["prompt_tokens"], http["usage"]["completion_tokens"])
        assert r.usage.total_tokens == http["usage"]["total_tokens"]
        assert r.served_by == http["system_fingerprint"]
        assert len(r.token_ids) == r.usage.completion_tokens
        content = http["choices"][0]["logprobs"]["content"]
        assert [e.token for e in r.logprobs] == [e["token"] for e in content]
        assert [e.logprob for e in r.logprobs] == pytest.approx([e["logprob"] for e in content], abs=1e-5)
        assert [[t.token for t in e.top] for e in r.logprobs] == [[t["token"] for t in e["top_logprobs"]] for e in content]
        assert all(len(e.top) == 2 for e in r.logprobs)
        chunks = list(stub.GenerateStream(chat_req(model, max_tokens=10, temperature=0.9, seed=11)))
        assert len(chunks) > 1
        assert "".join(c.text for c in chunks) == want
        assert [t for c in chunks for t in c.token_ids] == list(r.token_ids)
        assert [c.finish_reason for c in chunks if c.finish_reason] == [r.finish_reason] and chunks[-1].finish_reason
        assert [c.HasField("usage") for c in chunks] == [False] * (len(chunks) - 1) + [True]
        assert chunks[-1].usage == r.usage
        assert {c.served_by for c in chunks} == {http["system_fingerprint"]}
    # text prompts equal /v1/completions, with its default of 16 new tokens
    http = _post(f"{srv.url}/v1/completions", json={"model": "alpha@1", "prompt": "Hello", "seed": 3}).json()
    r = stub.Generate(pb.GenerateRequest(model="alpha@1", text="Hello", sampling=pb.SamplingParams(seed=3)))
    assert r.text == http["choices"][0]["text"] and r.usage.completion_tokens == http["usage"]["completion_tokens"]
    assert (r.adapter, r.adapter_version, r.served_by) == ("alpha", 1, "alpha@1")
    ids = srv.state.service.text_prompt_ids("Hello")
    r2 = stub.Generate(pb.GenerateRequest(model="alpha@1", token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(seed=3)))
    assert r2.text == r.text


def test_n_choices_stop_and_top_k_equal_http(g):
    srv, ch, _ = g
    stub = pbg.InferenceStub(ch)
    body = {"model": "beta", "messages": MSGS, "max_tokens": 8, "temperature": 1.0, "top_k": 20, "seed": 5, "n": 3}
    http = _post(f"{srv.url}/v1/chat/completions", json=body).json()
    want = [c["message"]["content"] for c in http["choices"]]
    assert len(set(want)) > 1  # seeds 5, 6, 7: different samples
    r = stub.Generate(chat_req("beta", max_tokens=8, temperature=1.0, top_k=20, seed=5, n=3, request_id="n3"))
    assert [c.text for c in r.choices] == want and [c.index for c in r.choices] == [0, 1, 2]
    assert r.text == want[0] and r.request_id == "n3"
    assert r.usage.completion_tokens == http["usage"]["completion_tokens"] == sum(c.completion_tokens for c in r.choices)
    got = {0: "", 1: "", 2: ""}
    chunks = list(stub.GenerateStream(chat_req("beta", max_tokens=8, temperature=1.0, top_k=20, seed=5, n=3)))
    for c in chunks:
        got[c.index] += c.text
    assert [got[i] for i in range(3)] == want
    assert sorted(c.index for c in chunks if c.finish_reason) == [0, 1, 2]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # a stop string cuts the text the same way on both
    greedy = stub.Generate(chat_req("alpha", max_tokens=12, temperature=0, ignore_eos=True)).text
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 2]
    http = _post(f"{srv.url}/v1/chat/completions", json={"model": "alpha", "messages": MSGS, "max_tokens": 12, "temperature": 0,
                                                                "ignore_eos": True, "stop": [stop]}).json()
    r = stub.Generate(chat_req("alpha", max_tokens=12, temperature=0, ignore_eos=True, stop=[stop]))
    assert r.finish_reason == http["choices"][0]["finish_reason"] == "stop"
    assert r.text == http["choices"][0]["message"]["content"] and stop not in r.text and len(r.text) < len(greedy)


def test_concurrent_streams_for_different_adapters(g):
    srv, ch, _ = g
    stub = pbg.InferenceStub(ch)
    models = ["alpha", "beta", srv.state.service.model_id] * 3
    want = {m: stub.Generate(chat_req(m, max_tokens=12, temperature=0)).text for m in set(models)}
    assert len(set(want.values())) == 3  # each adapter changes the output
    got, errs, peak = {}, [], []
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak.append(srv.engine.state()["running"])
            time.sleep(0.005)

    def run(i, m):
        try:
            chunks = list(stub.GenerateStream(chat_req(m, max_tokens=12, temperature=0)))
            got[i] = ("".join(c.text for c in chunks), chunks[-1].served_by)
        except Exception as e:  # noqa: BLE001
            errs.append(e)

    w = threading.Thread(target=watch)
    w.start()
    ts = [threading.Thread(target=run, args=(i, m)) for i, m in enumerate(models)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    done.set()
    w.join()
    assert errs == []
    assert [got[i][0] for i in range(len(models))] == [want[m] for m in models]
    assert [got[i][1] for i in range(len(models))] == [m if m == srv.state.service.model_id else f"{m}@1" for m in models]
    assert max(peak) >= 2  # they shared the batch


def _gone(engine, rid, timeout=5.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = engine.state()
        if rid not in st["running_ids"] and st["running"] == 0:
            return True
        time.sleep(0.01)
    return False


def _running(engine, rid, timeout=5.0) -> bool:
    deadline = time.time() + timeout
    while rid not in engine.state()["running_ids"]:
        if time.time() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_cancelled_stream_and_deadlines_free_the_slot(g):
    """Each request asks for the rest of the context (~470 tokens); leaving early must stop it at the next step."""
    srv, ch, _ = g
    stub = pbg.InferenceStub(ch)
    eng = srv.engine
    cases = 0
    for how in ("cancel", "unary deadline", "stream deadline"):
        rid = f"leave-{how.replace(' ', '-')}"
        before = eng.tokens_generated
        req = chat_req("alpha", request_id=rid, ignore_eos=True)
        if how == "cancel":
            it = stub.GenerateStream(req)
            next(it)
            assert rid in eng.state()["running_ids"]
            it.cancel()
            with pytest.raises(grpc.RpcError) as e:
                list(it)
            assert e.value.code() == grpc.StatusCode.CANCELLED
        elif how == "unary deadline":
            fut = stub.Generate.future(req, timeout=0.4)
            assert _running(eng, rid)
            assert fut.exception(timeout=10).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            it = stub.GenerateStream(req, timeout=0.4)
            with pytest.raises(grpc.RpcError) as e:
                for _ in it:
                    pass
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert _gone(eng, rid, timeout=2.0), f"{how}: request still in the batch"
        st = eng.state()
        assert st["kv_used_tokens"] == 0
        made = eng.tokens_generated - before
        time.sleep(0.2)
        assert eng.tokens_generated - before == made, f"{how}: an orphan keeps generating"
        assert 0 < made < 400, f"{how}: generated {made} tokens, not stopped early"
        cases += 1
    assert cases == 3


def test_error_codes(g, tmp_path, monkeypatch):
    srv, ch, _ = g
    stub, admin = pbg.InferenceStub(ch), pbg.AdminStub(ch)
    NF, IA = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT

    for model in ("nope", "alpha@7"):
        for fn in (stub.Generate, stub.GenerateStream):
            c, d = rpc_error(fn, chat_req(model, max_tokens=2))
            assert c == NF and model in d
    # bad arguments name their field
    bad = [
        (chat_req("alpha", max_tokens=2, temperature=7), "sampling.temperature"),
        (chat_req("alpha", max_tokens=2, top_p=0), "sampling.top_p"),
        (chat_req("alpha", max_tokens=2, top_k=-5), "sampling.top_k"),
        (chat_req("alpha", max_tokens=2, logprobs=21), "sampling.logprobs"),
        (chat_req("alpha", max_tokens=2, n=65), "sampling.n"),
        (chat_req("alpha", max_tokens=2, stop=["x"] * 17), "sampling.stop"),
        (chat_req("alpha", max_tokens=2, presence_penalty=3), "sampling.presence_penalty"),
        (chat_req("alpha", max_tokens=100000), "sampling.max_tokens"),
        (pb.GenerateRequest(model="alpha"), "prompt"),
        (pb.GenerateRequest(text="hi"), "model"),
        (pb.GenerateRequest(model="alpha@x", text="hi"), "model"),
        (pb.GenerateRequest(model="alpha", token_ids=pb.TokenIds(ids=[1, 10**9])), "token_ids"),
        (pb.GenerateRequest(model="alpha", chat=pb.ChatPrompt(messages=[pb.ChatMessage(role="robot", content="x")])), "chat.messages[0].role"),
        (pb.GenerateRequest(model="alpha", chat=pb.ChatPrompt()), "chat.messages"),
    ]
    for req, field in bad:
        for fn in (stub.Generate, stub.GenerateStream):
            c, d, f = rpc_error(fn, req, with_field=True)
            assert c == IA and field in d and f == field, (field, c, d, f)
    c, d = rpc_error(admin.SetRoute, pb.SetRouteRequest(name="alpha", weights={1: 50}))
    assert c == IA and "100" in d
    c, d = rpc_error(admin.SetRoute, pb.SetRouteRequest(name="alpha", weights={1: 100}, sticky="cookie"))
    assert c == IA and "sticky" in d
    c, d = rpc_error(admin.RegisterAdapter, pb.RegisterAdapterRequest(name="x", path="/tmp", lineage_json="{nope"))
    assert c == IA and "lineage_json" in d
    for fn, req in [(admin.GetAdapter, pb.GetAdapterRequest(name="ghost")), (admin.GetRoute, pb.GetRouteRequest(name="ghost")),
                    (admin.DeleteAdapter, pb.DeleteAdapterRequest(name="ghost")), (admin.PromoteRoute, pb.PromoteRouteRequest(name="ghost", version=1)),
                    (admin.DeleteAdapter, pb.DeleteAdapterRequest(name="alpha", version=9))]:
        assert rpc_error(fn, req)[0] == NF, req
    c, d = rpc_error(admin.PromoteRoute, pb.PromoteRouteRequest(name="alpha", version=9))  # as over HTTP (400): a route to a missing version
    assert c == IA and "[9]" in d
    # an adapter for another base: FAILED_PRECONDITION, nothing registered
    from helpers import make_peft_adapter, make_tiny_llama

    other = make_tiny_llama(tmp_path / "other", hidden_size=32, intermediate_size=64, copy_tokenizer=False)
    wrong = make_peft_adapter(other, tmp_path / "wrong", r=4)
    before = [v.ref for v in srv.state.store.list()]
    c, d = rpc_error(admin.RegisterAdapter, pb.RegisterAdapterRequest(name="wrong", path=str(wrong)))
    assert c == grpc.StatusCode.FAILED_PRECONDITION and "q_proj" in d
    assert [v.ref for v in srv.state.store.list()] == before
    # a bug below the edge: INTERNAL with a generic message, never UNKNOWN or the exception's text
    def boom(*a, **kw):
        raise RuntimeError("secret detail /home/x")

    monkeypatch.setattr(srv.state.service, "chat_prompt_ids", boom)
    for fn in (stub.Generate, stub.GenerateStream):
        c, d = rpc_error(fn, chat_req("alpha", max_tokens=2))
        assert c == grpc.StatusCode.INTERNAL and d == "internal server error"
    monkeypatch.setattr(srv.state.store, "list", boom)
    c, d = rpc_error(admin.ListAdapters, pb.ListAdaptersRequest())
    assert c == grpc.StatusCode.INTERNAL and d == "internal server error"


def test_queue_full_is_resource_exhausted(tiny_base, tmp_path):
    from conftest import start_server

    from loraplex.server.api.grpc_server import GrpcServer

    s = start_server(tmp_path, tiny_base, max_queue=1, max_num_seqs=1)
    gs = GrpcServer(s.state, port=0)
    port = gs.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pbg.InferenceStub(ch)
            model = s.state.service.model_id
            first = stub.GenerateStream(chat_req(model, max_tokens=300, ignore_eos=True))
            next(first)  # running: the one batch slot is taken
            second = stub.Generate.future(chat_req(model, max_tokens=4))  # waits: the queue (1) is full
            deadline = time.time() + 5
            while s.engine.state()["waiting"] < 1 and time.time() < deadline:
                time.sleep(0.01)
            c, d = rpc_error(stub.Generate, chat_req(model, max_tokens=4))
            assert c == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue" in d
            first.cancel()
            assert second.result(timeout=30).usage.completion_tokens >= 1
    finally:
        gs.stop()
        s.stop()


def test_admin_rpcs_share_the_store_with_http(g, adapter_dirs):
    srv, ch, _ = g
    admin, stub = pbg.AdminStub(ch), pbg.InferenceStub(ch)
    md = (("x-loraplex-caller", "guard"),)  # a forged identity: the server records the caller's address instead
    v1 = admin.RegisterAdapter(pb.RegisterAdapterRequest(name="grpc-bot", path=str(adapter_dirs["gamma"]), lineage_json='{"from": "test"}'), metadata=md)
    v2 = admin.RegisterAdapter(pb.RegisterAdapterRequest(name="grpc-bot", path=str(adapter_dirs["delta"])))
    assert (v1.version, v2.version) == (1, 2) and (v1.r, v2.r) == (16, 2) and v1.use_rslora and v1.id == "grpc-bot@1"
    assert '"from": "test"' in v1.lineage_json and v1.sha256 and v1.base_fingerprint
    assert _get(f"{srv.url}/v1/adapters/grpc-bot").json()["latest"] == 2  # HTTP sees what gRPC registered
    a = admin.GetAdapter(pb.GetAdapterRequest(name="grpc-bot"))
    assert a.latest == 2 and [v.version for v in a.versions] == [1, 2] and not a.HasField("route")
    r = admin.SetRoute(pb.SetRouteRequest(name="grpc-bot", weights={1: 50, 2: 50}, sticky="session",
                                          guard=pb.RouteGuard(max_error_rate=0.5)), metadata=md)
    assert dict(r.weights) == {1: 50, 2: 50} and r.sticky == "session" and r.updated_by == "127.0.0.1"
    assert r.guard.max_error_rate == 0.5 and r.guard.min_requests == 20
    assert _get(f"{srv.url}/v1/routes/grpc-bot").json()["versions"] == {"1": 50, "2": 50}
    assert admin.GetRoute(pb.GetRouteRequest(name="grpc-bot")) == r
    # sticky sessions: the same session goes to the same version over gRPC (field or metadata) and HTTP
    seen = set()
    for k in range(8):
        sess = f"user-{k}"
        http = _post(f"{srv.url}/v1/completions", json={"model": "grpc-bot", "prompt": "hi", "max_tokens": 1, "user": sess})
        by_field = stub.Generate(pb.GenerateRequest(model="grpc-bot", text="hi", session=sess, sampling=pb.SamplingParams(max_tokens=1)))
        by_md = stub.Generate(pb.GenerateRequest(model="grpc-bot", text="hi", sampling=pb.SamplingParams(max_tokens=1)),
                              metadata=(("x-loraplex-session", sess),))
        assert by_field.served_by == by_md.served_by == http.headers["x-loraplex-adapter"]
        seen.add(by_field.adapter_version)
    assert seen == {1, 2}
    assert dict(admin.PromoteRoute(pb.PromoteRouteRequest(name="grpc-bot", version=2)).weights) == {2: 100}
    assert dict(admin.RollbackRoute(pb.RollbackRouteRequest(name="grpc-bot", reason="test")).weights) == {1: 50, 2: 50}
    ids = {m.id for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert {"grpc-bot", "grpc-bot@1", "grpc-bot@2", srv.state.service.model_id} <= ids
    assert ids == {m["id"] for m in _get(f"{srv.url}/v1/models").json()["data"]}
    assert {"grpc-bot@1", "grpc-bot@2"} <= {v.id for v in admin.ListAdapters(pb.ListAdaptersRequest()).versions}
    d = admin.DeleteAdapter(pb.DeleteAdapterRequest(name="grpc-bot"))
    assert sorted(d.deleted) == ["grpc-bot@1", "grpc-bot@2"]
    assert rpc_error(stub.Generate, chat_req("grpc-bot", max_tokens=1))[0] == grpc.StatusCode.NOT_FOUND
    assert _get(f"{srv.url}/v1/adapters/grpc-bot").status_code == 404


def test_reflection_lists_and_describes_the_services(g):
    from google.protobuf import descriptor_pb2

    _, ch, _ = g
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    reqs = [reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="loraplex.v1.Inference")]
    listed, described = list(stub.ServerReflectionInfo(iter(reqs)))
    names = {s.name for s in listed.list_services_response.service}
    assert {"loraplex.v1.Inference", "loraplex.v1.Admin", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    files = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in described.file_descriptor_response.file_descriptor_proto]
    ours = next(f for f in files if f.package == "loraplex.v1")
    assert {m.name for s in ours.service for m in s.method} >= {"Generate", "GenerateStream", "ListModels", "RegisterAdapter", "SetRoute"}


def test_health_transitions(server):
    from loraplex.server.app import ServerState
    from loraplex.server.api.grpc_server import GrpcServer

    state = ServerState()  # nothing loaded yet
    gs = GrpcServer(state, port=0, poll_interval=0.02)
    port = gs.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        h = health_pb2_grpc.HealthStub(ch)
        check = lambda svc="": h.Check(health_pb2.HealthCheckRequest(service=svc)).status  # noqa: E731
        assert check() == check("loraplex.v1.Inference") == check("loraplex.v1.Admin") == NOT_SERVING
        assert rpc_error(pbg.InferenceStub(ch).Generate, chat_req("x", max_tokens=1))[0] == grpc.StatusCode.UNAVAILABLE
        watch = h.Watch(health_pb2.HealthCheckRequest(service="loraplex.v1.Inference"))
        assert next(watch).status == NOT_SERVING
        # the model finishes loading (what build_state does: the service is set last)
        for k in ("store", "engine", "manager", "telemetry", "routes", "gate"):
            setattr(state, k, getattr(server.state, k))
        state.service = server.state.service
        assert next(watch).status == SERVING
        assert check() == SERVING
        assert pbg.InferenceStub(ch).Generate(chat_req(state.service.model_id, max_tokens=2)).usage.completion_tokens == 2
        # graceful shutdown begins (the CLI sets draining on SIGTERM): NOT_SERVING, new calls UNAVAILABLE
        state.draining = True
        assert next(watch).status == NOT_SERVING
        c, d = rpc_error(pbg.InferenceStub(ch).Generate, chat_req(state.service.model_id, max_tokens=1))
        assert c == grpc.StatusCode.UNAVAILABLE and "shutting down" in d
        watch.cancel()
    # stop(): NOT_SERVING pushed to watchers while in-flight calls get their grace period, then the port closes
    state.draining = False
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        h = health_pb2_grpc.HealthStub(ch)
        deadline = time.time() + 5
        while h.Check(health_pb2.HealthCheckRequest()).status != SERVING and time.time() < deadline:
            time.sleep(0.02)
        watch = h.Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == SERVING
        stopper = threading.Thread(target=gs.stop, kwargs={"grace": 1.0})
        stopper.start()
        assert next(watch).status == NOT_SERVING
        stopper.join()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
        assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_serve_starts_grpc_beside_http_and_drains_on_sigterm(tiny_base, tmp_path):
    """`loraplex serve --grpc-port`: SERVING once loaded; on SIGTERM NOT_SERVING at once, the in-flight stream finishes."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import free_port

    hp, gp = free_port(), free_port()
    env = dict(os.environ, LORAPLEX_HOME=str(tmp_path), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "loraplex.server.cli", "serve", "--model", str(tiny_base), "--port", str(hp),
                             "--grpc-port", str(gp), "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{gp}") as ch:
            grpc.channel_ready_future(ch).result(timeout=60)
            h = health_pb2_grpc.HealthStub(ch)
            watch = h.Watch(health_pb2.HealthCheckRequest(service=""))
            statuses = [next(watch).status]
            while statuses[-1] != SERVING:
                statuses.append(next(watch).status)
            model = _get(f"http://127.0.0.1:{hp}/v1/models").json()["data"][0]["id"]  # HTTP is up too
            stream = pbg.InferenceStub(ch).GenerateStream(chat_req(model, max_tokens=150, ignore_eos=True))
            first = next(stream)
            proc.send_signal(signal.SIGTERM)
            assert next(watch).status == NOT_SERVING
            rest = list(stream)
            assert rest[-1].finish_reason == "length" and rest[-1].usage.completion_tokens == 150
            assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 150
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
