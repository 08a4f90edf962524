"""Property-based fuzzing of every HTTP body and gRPC message of the inference and admin APIs (hypothesis).

Each case goes to a running server on the tiny model and must end in a valid
success, or a 4xx in OpenAI's error shape (HTTP) / a documented status code
(gRPC) — never a 500, never INTERNAL or UNKNOWN. A refused admin call leaves
the store as it was. After every property the engine must still be alive: a
completion works and /health is 200.

Bodies are near-valid on purpose: each field is drawn either from values the
API accepts (kept cheap: few tokens, few choices) or from hostile ones
(out-of-range and wire-limit integers, NaN and infinities, lone surrogates,
long strings, wrong JSON types, deep nesting), so the fuzzer reaches past the
first check of every handler. The default run keeps the example counts small;
`make test-all` (the `slow` mark) runs the same properties much longer.
"""

from __future__ import annotations

import json
import urllib.parse

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraplex.protos.loraplex.v1 import loraplex_pb2 as pb
from loraplex.protos.loraplex.v1 import loraplex_pb2_grpc as pbg

FAST = settings(
    max_examples=25,
    deadline=None,
    database=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
DEEP = settings(FAST, max_examples=400)

ERROR_STATUSES = {400, 403, 404, 405, 409, 413, 422, 429}
GRPC_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@pytest.fixture(scope="module")
def fz(tiny_base, adapter_dirs, tmp_path_factory):
    """A server of its own (the fuzzer changes routes and deletes adapters) with HTTP and gRPC."""
    from conftest import start_server

    from loraplex.server.api.grpc_server import GrpcServer

    root = next(iter(adapter_dirs.values())).parent
    s = start_server(tmp_path_factory.mktemp("fuzz"), tiny_base, max_queue=64, allowed_adapter_roots=[root])
    for name in ("alpha", "beta"):
        assert (
            httpx.post(
                f"{s.url}/v1/adapters", json={"name": name, "path": str(adapter_dirs[name])}, timeout=60
            ).status_code
            == 201
        )
    gs = GrpcServer(s.state, port=0)
    port = gs.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(ch).result(timeout=10)
    s.adapter_paths = [str(p) for p in adapter_dirs.values()]
    yield s, ch
    ch.close()
    gs.stop()
    s.stop()


# --- value strategies ------------------------------------------------------------------------------------------

WIRE_INTS = [2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**30, -1, 0]
hostile_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        ["\ud800", "a\udfffb", "\x00", "x" * 600, "../../etc/passwd", "\u202e", "²", "١", "%00", "{{7*7}}"]
    ),
)
hostile_number = st.one_of(st.sampled_from(WIRE_INTS), st.floats(), st.integers(-10, 10))
json_leaf = st.one_of(st.none(), st.booleans(), hostile_number, hostile_text)
any_json = st.recursive(
    json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8
)
deep_json = st.integers(1, 3000).map(
    lambda d: json.loads("[" * min(d, 900) + "]" * min(d, 900)) if d < 900 else {"deep": d}
)


def either(good):
    """A field value: mostly one the API takes, otherwise anything."""
    return st.one_of(good, good, good, any_json, hostile_number, hostile_text)


def maybe_fields(**fields):
    """A dict with any subset of `fields` (each a strategy), so absent, valid and hostile values all occur."""
    return st.fixed_dictionaries({}, optional=fields)


def model_names(base: str):
    return (
        st.sampled_from(
            [
                base,
                "default",
                "alpha",
                "beta",
                "alpha@1",
                "beta@1",
                "alpha@999",
                "alpha@x",
                "alpha@²",
                "nope",
                "",
                "a" * 600,
                "alpha@-1",
                "@1",
                "alpha@1@2",
            ]
        )
        | hostile_text
    )


SAMPLING = dict(
    n=either(st.integers(1, 3)),
    max_tokens=either(st.integers(1, 4)),
    temperature=either(st.floats(0, 2)),
    top_p=either(st.floats(0.01, 1)),
    top_k=either(st.integers(-1, 50)),
    seed=either(st.integers(-(2**63), 2**63 - 4)),
    stop=either(st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=4))),
    presence_penalty=either(st.floats(-2, 2)),
    frequency_penalty=either(st.floats(-2, 2)),
    user=either(st.text(max_size=20)),
    ignore_eos=either(st.booleans()),
    stream=either(st.booleans()),
    stream_options=either(st.fixed_dictionaries({"include_usage": st.booleans()})),
)
message = st.fixed_dictionaries(
    {
        "role": either(st.sampled_from(["system", "developer", "user", "assistant", "tool"])),
        "content": either(
            st.one_of(
                st.text(max_size=40),
                hostile_text,
                st.lists(
                    st.fixed_dictionaries({"type": either(st.just("text")), "text": either(st.text(max_size=20))}),
                    max_size=2,
                ),
            )
        ),
    }
)


def chat_bodies(base):
    return st.one_of(
        maybe_fields(
            model=either(model_names(base)),
            messages=either(st.lists(message, min_size=1, max_size=3)),
            max_completion_tokens=either(st.integers(1, 4)),
            logprobs=either(st.booleans()),
            top_logprobs=either(st.integers(0, 20)),
            **SAMPLING,
        ),
        st.dictionaries(st.text(max_size=8), any_json, max_size=4),
    )


def completion_bodies(base):
    prompt = st.one_of(
        st.text(max_size=40),
        hostile_text,
        st.lists(st.text(max_size=10), min_size=1, max_size=3),
        st.lists(st.integers(-5, 60000), min_size=1, max_size=8),
        st.lists(st.lists(st.integers(0, 100), max_size=4), max_size=3),
        st.sampled_from([[2**63], [10**30], [-1], [[]], [1, "a"], []]),
    )
    return st.one_of(
        maybe_fields(
            model=either(model_names(base)),
            prompt=either(prompt),
            echo=either(st.booleans()),
            logprobs=either(st.integers(0, 5)),
            suffix=either(st.text(max_size=3)),
            **SAMPLING,
        ),
        st.dictionaries(st.text(max_size=8), any_json, max_size=4),
    )


# --- HTTP --------------------------------------------------------------------------------------------------------


def _send(s, method: str, path: str, body) -> httpx.Response:
    """`body` serialized as the hostile client would: NaN allowed, surrogates as \\u escapes; raw bytes as they are."""
    content = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode()
    return httpx.request(
        method, f"{s.url}{path}", content=content, headers={"content-type": "application/json"}, timeout=120
    )


def _check_http(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        assert r.status_code in ERROR_STATUSES, (r.status_code, r.text[:500])
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), err
        assert set(err) >= {"message", "type", "param", "code"}
        assert "Traceback" not in err["message"]
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
        assert events and events[-1] == "[DONE]", r.text[-300:]
        for e in events[:-1]:
            assert "error" not in json.loads(e), e
    else:
        r.json()


def _alive(s) -> None:
    r = httpx.post(
        f"{s.url}/v1/completions",
        json={"model": s.state.service.model_id, "prompt": "hi", "max_tokens": 2},
        timeout=120,
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    assert httpx.get(f"{s.url}/health", timeout=30).status_code == 200
    assert s.engine.failure is None


def _q(text: str) -> str:
    """A path or query component, lone surrogates included (as the bytes a hostile client would send)."""
    return urllib.parse.quote(text.encode("utf-8", "surrogatepass"), safe="")


def _refs(s):
    return sorted(v.ref for v in s.state.store.list())


def _inference_property(fz, examples: settings):
    s, _ = fz
    base = s.state.service.model_id

    @examples
    @given(
        path_body=st.one_of(
            st.tuples(st.just("/v1/chat/completions"), chat_bodies(base)),
            st.tuples(st.just("/v1/completions"), completion_bodies(base)),
            st.tuples(
                st.just("/v1/rewards"),
                maybe_fields(model=either(model_names(base)), messages=either(st.lists(message, max_size=2))),
            ),
            st.tuples(
                st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
                st.one_of(deep_json, st.binary(max_size=40)),
            ),
        )
    )
    def prop(path_body):
        path, body = path_body
        _check_http(_send(s, "POST", path, body))

    prop()
    _alive(s)


def _admin_property(fz, examples: settings):
    s, _ = fz
    names = st.sampled_from(["alpha", "beta", "nope", "x" * 300, "a/b", "..", "alpha@1", ""]) | hostile_text
    paths = (
        st.sampled_from(s.adapter_paths + ["/", "/etc", "/nonexistent", "", "\x00", "/" + "a" * 5000]) | hostile_text
    )
    versions = either(
        st.dictionaries(st.sampled_from(["1", "2", "3", "x", "-1", "²"]), st.integers(-10, 110), max_size=3)
    )
    route_body = maybe_fields(
        versions=versions,
        sticky=either(st.sampled_from(["user", "session", None])),
        guard=either(maybe_fields(max_error_rate=either(st.floats(0, 1)), min_requests=either(st.integers(1, 50)))),
    )
    calls = st.one_of(
        st.tuples(
            st.just("POST"),
            st.just("/v1/adapters"),
            maybe_fields(name=either(names), path=either(paths), lineage=either(any_json)),
        ),
        st.tuples(
            st.just("POST"),
            st.just("/v1/load_lora_adapter"),
            maybe_fields(lora_name=either(names), lora_path=either(paths)),
        ),
        st.tuples(st.just("POST"), st.just("/v1/unload_lora_adapter"), maybe_fields(lora_name=either(names))),
        st.tuples(st.just("PUT"), names.map(lambda n: f"/v1/routes/{_q(n)}"), route_body),
        st.tuples(
            st.just("POST"),
            names.map(lambda n: f"/v1/routes/{_q(n)}/promote"),
            maybe_fields(version=either(st.integers(1, 3))),
        ),
        st.tuples(
            st.just("POST"),
            names.map(lambda n: f"/v1/routes/{_q(n)}/rollback"),
            maybe_fields(reason=either(st.text(max_size=10))),
        ),
        st.tuples(
            st.just("GET"),
            st.tuples(names, hostile_text).map(lambda t: f"/v1/routes/{_q(t[0])}/compare?window={_q(t[1])}"),
            st.just(b""),
        ),
        st.tuples(
            st.sampled_from(["GET", "DELETE"]),
            st.tuples(names, hostile_text).map(lambda t: f"/v1/adapters/{_q(t[0])}?version={_q(t[1])}"),
            st.just(b""),
        ),
        st.tuples(
            st.sampled_from(["POST", "PUT"]),
            st.sampled_from(["/v1/adapters", "/v1/routes/alpha", "/v1/load_lora_adapter"]),
            st.one_of(deep_json, st.binary(max_size=40), any_json),
        ),
    )

    @examples
    @given(call=calls)
    def prop(call):
        method, path, body = call
        before = _refs(s)
        r = _send(s, method, path, body)
        _check_http(r)
        if r.status_code >= 400:
            assert _refs(s) == before, (method, path, body)

    prop()
    _alive(s)


def test_fuzz_http_inference(fz):
    _inference_property(fz, FAST)


def test_fuzz_http_admin(fz):
    _admin_property(fz, FAST)


@pytest.mark.slow
def test_fuzz_http_deep(fz):
    _inference_property(fz, DEEP)
    _admin_property(fz, DEEP)


def test_unknown_routes_and_methods_answer_in_openai_shape(fz):
    s, _ = fz
    for method, path in (("GET", "/v1/nothing"), ("DELETE", "/v1/chat/completions"), ("POST", "/v1/adapters/a/b/c")):
        r = httpx.request(method, f"{s.url}{path}", timeout=30)
        assert r.status_code in (404, 405) and r.json()["error"]["type"] in (
            "not_found_error",
            "invalid_request_error",
        )


# --- gRPC --------------------------------------------------------------------------------------------------------


def _u32(good):
    return st.one_of(good, st.sampled_from([0, 2**31, 2**32 - 1]))


def _i64(good):
    return st.one_of(good, st.sampled_from([2**63 - 1, -(2**63), 2**63 - 2, -1]))


f32 = st.one_of(st.floats(0, 2, width=32), st.floats(width=32))
sampling_msg = st.builds(
    lambda d: pb.SamplingParams(**d),
    maybe_fields(
        max_tokens=_u32(st.integers(1, 4)),
        temperature=f32,
        top_p=f32,
        top_k=st.one_of(st.integers(-1, 50), st.sampled_from([-(2**31), 2**31 - 1])),
        seed=_i64(st.integers(0, 1000)),
        stop=st.lists(st.text(max_size=5), max_size=18),
        logprobs=_u32(st.integers(0, 5)),
        presence_penalty=f32,
        frequency_penalty=f32,
        ignore_eos=st.booleans(),
        n=_u32(st.integers(1, 3)),
    ),
)
grpc_text = st.one_of(st.text(max_size=40), st.sampled_from(["x" * 600, "\x00", "²"]))


def _no_surrogates(s: str) -> str:
    return s.encode("utf-8", "replace").decode("utf-8")


def generate_msgs(base):
    names = st.sampled_from(
        [base, "default", "alpha", "alpha@1", "alpha@999", "alpha@x", "nope", "", "a" * 600, "alpha@²"]
    )
    chat = st.builds(
        lambda ms: pb.ChatPrompt(messages=ms),
        st.lists(
            st.builds(
                lambda r, c: pb.ChatMessage(role=r, content=c),
                st.sampled_from(["user", "system", "assistant", "robot", ""]),
                grpc_text.map(_no_surrogates),
            ),
            max_size=3,
        ),
    )
    prompt = st.one_of(
        st.fixed_dictionaries({"text": grpc_text.map(_no_surrogates)}),
        st.fixed_dictionaries({"chat": chat}),
        st.fixed_dictionaries(
            {
                "token_ids": st.builds(
                    lambda ids: pb.TokenIds(ids=ids),
                    st.lists(st.one_of(st.integers(0, 60000), st.sampled_from([-1, 2**31 - 1, -(2**31)])), max_size=8),
                )
            }
        ),
        st.just({}),
    )
    return st.builds(
        lambda m, p, sp, sess, rid: pb.GenerateRequest(model=m, sampling=sp, session=sess, request_id=rid, **p),
        names,
        prompt,
        sampling_msg,
        st.text(max_size=10).map(_no_surrogates),
        st.one_of(st.just(""), st.text(max_size=10).map(_no_surrogates), st.just("r" * 600)),
    )


U32 = st.one_of(st.integers(0, 120), st.sampled_from([2**31, 2**32 - 1]))


def admin_msgs(paths):
    names = st.sampled_from(["alpha", "beta", "nope", "", "x" * 300, "a/b", "alpha@1", "²"])
    return st.one_of(
        st.tuples(
            st.just("RegisterAdapter"),
            st.builds(
                lambda n, p, lj: pb.RegisterAdapterRequest(name=n, path=p, lineage_json=lj),
                names,
                st.sampled_from(paths + ["/", "/nonexistent", "", "/etc"]),
                st.sampled_from(["", "{}", "[1]", "{nope", '{"a": NaN}', "[" * 3000, "null"]),
            ),
        ),
        st.tuples(st.just("GetAdapter"), st.builds(lambda n: pb.GetAdapterRequest(name=n), names)),
        st.tuples(st.just("ListAdapters"), st.just(pb.ListAdaptersRequest())),
        st.tuples(
            st.just("DeleteAdapter"),
            st.builds(lambda n, v: pb.DeleteAdapterRequest(name=n, **v), names, maybe_fields(version=U32)),
        ),
        st.tuples(
            st.just("SetRoute"),
            st.builds(
                lambda n, w, s, gd: pb.SetRouteRequest(name=n, weights=w, sticky=s, **gd),
                names,
                st.dictionaries(U32, U32, max_size=3),
                st.sampled_from(["", "user", "session", "cookie"]),
                maybe_fields(guard=st.builds(lambda r, m: pb.RouteGuard(max_error_rate=r, min_requests=m), f32, U32)),
            ),
        ),
        st.tuples(st.just("GetRoute"), st.builds(lambda n: pb.GetRouteRequest(name=n), names)),
        st.tuples(
            st.just("PromoteRoute"), st.builds(lambda n, v: pb.PromoteRouteRequest(name=n, version=v), names, U32)
        ),
        st.tuples(
            st.just("RollbackRoute"),
            st.builds(
                lambda n, r: pb.RollbackRouteRequest(name=n, reason=r), names, st.text(max_size=10).map(_no_surrogates)
            ),
        ),
    )


def _check_grpc(fn, msg, stream=False) -> None:
    try:
        r = fn(msg, timeout=120)
        if stream:
            chunks = list(r)
            assert chunks and chunks[-1].HasField("usage")
    except grpc.RpcError as e:
        assert e.code() in GRPC_CODES, (e.code(), e.details(), msg)
        assert "Traceback" not in (e.details() or "")


def _grpc_property(fz, examples: settings):
    s, ch = fz
    inf, adm = pbg.InferenceStub(ch), pbg.AdminStub(ch)
    raw = {
        m: ch.unary_unary(f"/loraplex.v1.{svc}/{m}", request_serializer=lambda b: b, response_deserializer=lambda b: b)
        for svc, ms in (
            ("Inference", ("Generate", "ListModels")),
            ("Admin", ("RegisterAdapter", "SetRoute", "DeleteAdapter")),
        )
        for m in ms
    }

    @examples
    @given(msg=generate_msgs(s.state.service.model_id), streamed=st.booleans())
    def generate(msg, streamed):
        _check_grpc(inf.GenerateStream if streamed else inf.Generate, msg, stream=streamed)

    @examples
    @given(call=admin_msgs(s.adapter_paths))
    def admin(call):
        name, msg = call
        before = _refs(s)
        try:
            getattr(adm, name)(msg, timeout=120)
        except grpc.RpcError as e:
            assert e.code() in GRPC_CODES, (name, e.code(), e.details(), msg)
            assert _refs(s) == before, (name, msg)

    @examples
    @given(method=st.sampled_from(sorted(raw)), data=st.binary(max_size=64))
    def garbage(method, data):
        _check_grpc(raw[method], data)

    generate()
    admin()
    garbage()
    _alive(s)


def test_fuzz_grpc(fz):
    _grpc_property(fz, FAST)


@pytest.mark.slow
def test_fuzz_grpc_deep(fz):
    _grpc_property(fz, DEEP)
