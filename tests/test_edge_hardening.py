"""The request edge under hostile input: bounds shared by HTTP and gRPC, an engine no request can stop, bodies that
cannot block the process, a server that records who changed what, and a process that exits when it cannot serve."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.protos.loraplex.v1 import loraplex_pb2 as pb
from loraplex.protos.loraplex.v1 import loraplex_pb2_grpc as pbg

MSG = [{"role": "user", "content": "Say something."}]
_post = lambda *a, **kw: httpx.post(*a, timeout=120, **kw)  # noqa: E731
_get = lambda *a, **kw: httpx.get(*a, timeout=120, **kw)  # noqa: E731


@pytest.fixture(scope="module")
def g(server):
    from loraplex.server.api.grpc_server import GrpcServer

    gs = GrpcServer(server.state, port=0)
    port = gs.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(ch).result(timeout=10)
    yield server, ch
    ch.close()
    gs.stop()


def _model(srv) -> str:
    return srv.state.service.model_id


def _alive(srv) -> None:
    """The engine still serves: a completion works and /health says ok."""
    r = _post(f"{srv.url}/v1/completions", json={"model": _model(srv), "prompt": "hello", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2
    assert _get(f"{srv.url}/health").status_code == 200


# --- one parameter model, the same bounds over both protocols ---------------------------------------------------

BAD_SAMPLING = [  # (field, value, extra fields): refused with the field named, over HTTP and gRPC alike
    ("seed", 2**64 - 1, {"n": 2}),  # the example: outside int64, and seed + 1 outside the generator's range
    ("seed", 2**63 - 1, {"n": 2}),  # in range itself, but choice 1 would use 2**63
    ("seed", -(2**63) - 1, {}),
    ("n", 65, {}),
    ("n", 0, {}),
    ("temperature", 2.5, {}),
    ("top_p", 0.0, {}),
    ("top_k", -2, {}),
    ("presence_penalty", 2.5, {}),
    ("frequency_penalty", -3.0, {}),
    ("logprobs", 21, {}),
    ("stop", ["x"] * 17, {}),
    ("stop", ["y" * 1025], {}),
    ("max_tokens", 2**31, {}),
]


@pytest.mark.parametrize("field,value,extra", BAD_SAMPLING, ids=lambda v: str(v)[:20])
def test_sampling_bounds_are_the_same_over_http_and_grpc(g, field, value, extra):
    srv, ch = g
    body = {"model": _model(srv), "prompt": "hi", "max_tokens": 2, **extra, field: value}
    r = _post(f"{srv.url}/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"].split(".")[0] == field and err["type"] == "invalid_request_error", err
    sampling = {"max_tokens": 2, **extra, field: value}
    try:
        msg = pb.SamplingParams(**sampling)
    except (ValueError, TypeError):  # out of the wire type's range: the client library refuses it already
        return
    with pytest.raises(grpc.RpcError) as e:
        pbg.InferenceStub(ch).Generate(pb.GenerateRequest(model=_model(srv), text="hi", sampling=msg), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert dict(e.value.trailing_metadata() or ()).get("x-loraplex-field", "").startswith(f"sampling.{field}")
    _alive(srv)


def test_nan_temperature_is_refused_on_both(g):
    srv, ch = g
    raw = ('{"model": "%s", "prompt": "hi", "max_tokens": 2, "temperature": NaN}' % _model(srv)).encode()
    r = _post(f"{srv.url}/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    with pytest.raises(grpc.RpcError) as e:
        pbg.InferenceStub(ch).Generate(
            pb.GenerateRequest(
                model=_model(srv), text="hi", sampling=pb.SamplingParams(max_tokens=2, temperature=float("nan"))
            ),
            timeout=60,
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_largest_seeds_work_and_give_the_same_tokens_over_both(g):
    srv, ch = g
    seed = 2**63 - 2  # choices use 2**63 - 2 and 2**63 - 1: the top of the range
    http = _post(
        f"{srv.url}/v1/completions",
        json={"model": _model(srv), "prompt": "hi", "max_tokens": 4, "n": 2, "seed": seed, "temperature": 1.0},
    ).json()
    rpc = pbg.InferenceStub(ch).Generate(
        pb.GenerateRequest(
            model=_model(srv), text="hi", sampling=pb.SamplingParams(max_tokens=4, n=2, seed=seed, temperature=1.0)
        ),
        timeout=60,
    )
    assert [c["text"] for c in http["choices"]] == [c.text for c in rpc.choices]
    low = _post(
        f"{srv.url}/v1/completions", json={"model": _model(srv), "prompt": "hi", "max_tokens": 2, "seed": -(2**63)}
    )
    assert low.status_code == 200


def test_null_means_the_default():
    from loraplex.server.api.generation_params import GenerationParams

    p = GenerationParams.model_validate({"temperature": None, "top_p": None, "n": None, "stop": None})
    assert (p.temperature, p.top_p, p.n, p.stop) == (1.0, 1.0, 1, [])


def test_one_error_hierarchy():
    from loraplex.adapters_store import errors as E
    from loraplex.adapters_store.base_model import BaseModelError
    from loraplex.server.api import errors as S
    from loraplex.trainer.config import JobConfigError
    from loraplex.trainer.data import DataError
    from loraplex.trainer.distributed import DistributedJobError
    from loraplex.trainer.jobs import JobError

    for cls in (
        E.AdapterNotFound,
        E.InvalidAdapter,
        E.AdapterPathForbidden,
        E.AdapterConflict,
        E.InvalidRequest,
        S.BadRequest,
        S.QueueFull,
        S.Unavailable,
        JobError,
        JobConfigError,
        DataError,
        DistributedJobError,
        BaseModelError,
    ):
        assert issubclass(cls, E.LoraplexError), cls
    assert (E.AdapterNotFound("x").http_status, E.AdapterNotFound.grpc_code) == (404, "NOT_FOUND")
    assert isinstance(E.AdapterNotFound("x"), S.NotFound)  # the store's 404 is the front ends' 404
    assert (E.InvalidAdapter.http_status, E.InvalidAdapter.grpc_code) == (422, "FAILED_PRECONDITION")
    j = JobError("no such job", 404, "job_id")
    assert (j.http_status, j.grpc_code, j.error_type, j.param) == (404, "NOT_FOUND", "not_found_error", "job_id")
    assert j.body() == {
        "error": {"message": "no such job", "type": "not_found_error", "param": "job_id", "code": None}
    }


# --- the engine loop survives any one request ---------------------------------------------------------------------


def test_a_request_that_cannot_start_fails_alone(server):
    """A seed the generator refuses, handed to the engine past the edge: that request fails, the engine serves on."""
    from loraplex.server.engine.request import OutputStream, Request, SamplingParams

    eng = server.engine
    bad = Request("bad-seed", [1, 2, 3], SamplingParams(max_tokens=2, seed=2**64), stream=OutputStream())
    eng.submit(bad)
    out = bad.stream.get(timeout=30)
    assert out.finished and out.finish_reason == "error"
    assert eng.failure is None and eng._thread.is_alive()
    _alive(server)


def test_a_dead_engine_thread_shows_at_once_and_fails_what_it_held(tiny_base, tmp_path):
    from conftest import start_server

    from loraplex.server.api.grpc_server import GrpcServer

    class Crash(BaseException):
        pass

    s = start_server(tmp_path, tiny_base)
    gs = GrpcServer(s.state, port=0, poll_interval=0.02)
    port = gs.start()
    try:
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        deadline = time.time() + 10
        while health.Check(health_pb2.HealthCheckRequest()).status != health_pb2.HealthCheckResponse.SERVING:
            assert time.time() < deadline
            time.sleep(0.02)

        def crash():
            raise Crash()

        s.engine._step = crash  # the next step kills the thread (nothing inside the loop catches a BaseException)
        r = _post(f"{s.url}/v1/completions", json={"model": _model(s), "prompt": "hi", "max_tokens": 4})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"  # the held request got an error
        assert s.engine.failed.is_set()
        s.engine._thread.join(5)
        assert not s.engine._thread.is_alive()
        h = _get(f"{s.url}/health")
        assert h.status_code == 503 and "engine" in h.json()["detail"]
        r = _post(f"{s.url}/v1/completions", json={"model": _model(s), "prompt": "hi", "max_tokens": 4})
        assert r.status_code == 503
        time.sleep(0.2)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        gs.stop(grace=0.5)
        s.stop()


def _serve(tmp_path, tiny_base, *args, prelude: str = ""):
    """`loraplex serve` in a subprocess (prelude: Python run first, to inject a fault as a test would)."""
    from conftest import free_port

    port = free_port()
    env = dict(os.environ, LORAPLEX_HOME=str(tmp_path), OMP_NUM_THREADS="1")
    code = f"{prelude}\nimport sys\nfrom loraplex.server.cli import main\nsys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            "serve",
            "--model",
            str(tiny_base),
            "--port",
            str(port),
            "--grpc-port",
            "0",
            "--log-level",
            "warning",
            *args,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, f"http://127.0.0.1:{port}"


def _wait_ready(proc, url, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become ready")


def test_serve_exits_non_zero_when_its_engine_dies(tiny_base, tmp_path):
    prelude = (
        "from loraplex.server.engine import Engine\n"
        "class Crash(BaseException): pass\n"
        "def _step(self): raise Crash()\n"
        "Engine._step = _step"
    )
    proc, url = _serve(tmp_path, tiny_base, prelude=prelude)
    try:
        _wait_ready(proc, url)
        httpx.post(f"{url}/v1/completions", json={"model": "default", "prompt": "hi", "max_tokens": 2}, timeout=30)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode != 0 and "engine loop stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_exits_non_zero_when_the_base_model_cannot_load(tmp_path):
    from conftest import free_port

    env = dict(os.environ, LORAPLEX_HOME=str(tmp_path))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "loraplex.server.cli",
            "serve",
            "--model",
            str(tmp_path / "missing"),
            "--port",
            str(free_port()),
            "--grpc-port",
            "0",
            "--log-level",
            "warning",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "startup failed" in proc.stderr and "missing" in proc.stderr


def test_sigterm_ends_within_the_drain_time_whatever_is_in_flight(tiny_base, tmp_path):
    proc, url = _serve(tmp_path, tiny_base, "--drain-timeout", "1")
    try:
        _wait_ready(proc, url)
        port = int(url.rsplit(":", 1)[1])
        # an orphan: a request whose body never completes keeps its handler waiting forever
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"mo'
        )
        time.sleep(0.5)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert time.time() - t0 < 15
        sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()


# --- bodies -----------------------------------------------------------------------------------------------------


def test_bodies_over_the_limit_are_413_naming_it(tiny_base, tmp_path):
    from conftest import start_server

    s = start_server(tmp_path, tiny_base, max_request_bytes=4096)
    try:
        big = {"model": _model(s), "prompt": "x " * 4000, "max_tokens": 1}
        r = _post(f"{s.url}/v1/completions", json=big)
        assert (
            r.status_code == 413
            and "4096" in r.json()["error"]["message"]
            and "--max-request-bytes" in r.json()["error"]["message"]
        )

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(10):
                yield b" " * 1000

        r = _post(f"{s.url}/v1/adapters", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "4096" in r.json()["error"]["message"]
        _alive(s)
    finally:
        s.stop()


def test_a_huge_prompt_neither_blocks_health_nor_is_tokenized_whole(tiny_base, tmp_path):
    from conftest import start_server

    s = start_server(tmp_path, tiny_base, max_request_bytes=64 * 2**20)
    try:
        body = json.dumps(
            {"model": _model(s), "messages": [{"role": "user", "content": "lorem ipsum dolor " * 1_200_000}]}
        )
        assert len(body) > 21_000_000
        result = {}

        def big():
            t = time.time()
            result["r"] = httpx.post(
                f"{s.url}/v1/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=300
            )
            result["t"] = time.time() - t

        th = threading.Thread(target=big)
        th.start()
        worst = 0.0
        while th.is_alive():
            t = time.time()
            assert _get(f"{s.url}/health").status_code == 200
            worst = max(worst, time.time() - t)
            time.sleep(0.05)
        th.join()
        r = result["r"]
        assert r.status_code == 400 and "context" in r.json()["error"]["message"]
        assert worst < 3.0, f"/health took {worst:.1f} s while the big prompt was handled"
        assert result["t"] < 15, f"the big prompt took {result['t']:.1f} s to refuse"
    finally:
        s.stop()


@pytest.mark.parametrize(
    "raw,what",
    [
        (b'{"model": "m", "prompt": "\xff\xfe"}', "UTF-8"),
        (b'{"model": "m", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested"),
        (b'{"model": "m", "prompt": "x", "lineage": ' + b'{"a":' * 300 + b"1" + b"}" * 300 + b"}", "nested"),
    ],
)
def test_malformed_json_is_400(server, raw, what):
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/adapters", "/v1/routes/x"):
        fn = httpx.put if path.startswith("/v1/routes") else httpx.post
        r = fn(f"{server.url}{path}", content=raw, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 400, (path, r.status_code, r.text)
        assert what in r.json()["error"]["message"]
    _alive(server)


def test_lone_surrogates_are_400(server):
    m = _model(server)
    bodies = [
        ("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800b"}]}' % m),
        (
            "/v1/chat/completions",
            '{"model": "%s", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}' % m,
        ),
        ("/v1/completions", '{"model": "%s", "prompt": "\\ud83d"}' % m),
        ("/v1/completions", '{"model": "%s", "prompt": ["ok", "\\ud83d"]}' % m),
        ("/v1/completions", '{"model": "%s", "prompt": "hi", "stop": ["\\ud800"]}' % m),
        ("/v1/completions", '{"model": "%s", "prompt": "hi", "user": "\\ud800"}' % m),
    ]
    for path, body in bodies:
        r = _post(f"{server.url}{path}", content=body.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 400, (body, r.status_code, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
    _alive(server)


def test_non_ascii_digits_are_not_versions(server):
    for model in ("alpha@²", "alpha@١"):
        r = _post(f"{server.url}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"


# --- clients that go away, queues that fill -----------------------------------------------------------------------


def test_a_non_streaming_request_stops_when_its_client_disconnects(server):
    eng = server.engine
    body = {"model": _model(server), "prompt": "hi", "max_tokens": 400, "ignore_eos": True}
    before = eng.tokens_generated
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    deadline = time.time() + 10
    while eng.state()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert eng.state()["running"] == 0
    made = eng.tokens_generated - before
    time.sleep(0.3)
    assert eng.tokens_generated - before == made and 0 < made < 400


def test_choices_refused_with_429_hold_no_queue_slot(tiny_base, tmp_path):
    from conftest import start_server

    s = start_server(tmp_path, tiny_base, max_queue=2, max_num_seqs=1)
    eng = s.engine
    release = threading.Event()
    try:
        blocker = threading.Thread(
            target=lambda: eng.call(release.wait, timeout=60)
        )  # the engine thread waits: the queue holds
        blocker.start()
        time.sleep(0.2)
        first = {}
        t = threading.Thread(
            target=lambda: first.setdefault(
                "r", _post(f"{s.url}/v1/completions", json={"model": _model(s), "prompt": "hi", "max_tokens": 2})
            )
        )
        t.start()
        deadline = time.time() + 10
        while eng.state()["waiting"] < 1 and time.time() < deadline:
            time.sleep(0.01)
        r = _post(f"{s.url}/v1/completions", json={"model": _model(s), "prompt": "hi", "max_tokens": 2, "n": 2})
        assert r.status_code == 429
        assert eng.state()["waiting"] == 1  # none of the two choices took a slot
        r = _post(f"{s.url}/v1/completions", json={"model": _model(s), "prompt": "hi", "max_tokens": 2, "n": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"  # can never fit: not a retry-later
        release.set()
        t.join(60)
        blocker.join(60)
        assert first["r"].status_code == 200
    finally:
        release.set()
        s.stop()


# --- gRPC: bad bytes are the client's fault -----------------------------------------------------------------------


def test_undecodable_grpc_messages_are_invalid_argument(g):
    srv, ch = g
    for method in (
        "/loraplex.v1.Inference/Generate",
        "/loraplex.v1.Admin/RegisterAdapter",
        "/loraplex.v1.Admin/SetRoute",
    ):
        call = ch.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        for raw in (
            b"\xff\xff\xff",
            b"\x0a\x02\xc3\x28",
            b"\x12\x05ab",
        ):  # garbage, invalid UTF-8 in a string, truncated
            with pytest.raises(grpc.RpcError) as e:
                call(raw, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, raw, e.value.details())
    stream = ch.unary_stream(
        "/loraplex.v1.Inference/GenerateStream", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    with pytest.raises(grpc.RpcError) as e:
        list(stream(b"\xff\xff", timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _alive(srv)
