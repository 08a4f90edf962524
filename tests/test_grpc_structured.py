"""gRPC's output_format and logit_bias: the same constraints as HTTP's response_format, named as gRPC spells them."""
from __future__ import annotations

import json

import grpc
import jsonschema
import pytest

from loraplex.protos.loraplex.v1 import loraplex_pb2 as pb
from loraplex.protos.loraplex.v1 import loraplex_pb2_grpc as pbg

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                           "rank": {"type": "integer", "minimum": 1, "maximum": 5}},
          "required": ["city", "rank"], "additionalProperties": False}


@pytest.fixture(scope="module")
def channel(server):
    from loraplex.server.api.grpc_server import GrpcServer

    gs = GrpcServer(server.state, port=0)
    port = gs.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(ch).result(timeout=10)
    yield ch
    ch.close()
    gs.stop()


@pytest.fixture(scope="module")
def stub(channel):
    return pbg.InferenceStub(channel)


def _req(server, **kw):
    return pb.GenerateRequest(model=server.state.service.model_id,
                              chat=pb.ChatPrompt(messages=[pb.ChatMessage(role="user", content="JSON please")]),
                              sampling=pb.SamplingParams(max_tokens=120, seed=1, n=2), **kw)


def test_json_schema_choice_and_logit_bias(server, stub):
    r = stub.Generate(_req(server, output_format=pb.OutputFormat(json_schema=json.dumps(SCHEMA))), timeout=120)
    for c in r.choices:
        jsonschema.validate(json.loads(c.text), SCHEMA)
    choice = pb.OutputFormat(choice=pb.Choices(values=["up", "down"]))
    r = stub.Generate(_req(server, output_format=choice), timeout=120)
    assert {c.text for c in r.choices} <= {"up", "down"}
    tok = server.state.service.tokenizer
    t = tok.encode(" yes", add_special_tokens=False)[0]
    r = stub.Generate(pb.GenerateRequest(model=server.state.service.model_id, text="Hi", logit_bias={t: 100.0},
                                         sampling=pb.SamplingParams(max_tokens=3, temperature=0)), timeout=120)
    assert r.text == tok.decode([t] * 3)


@pytest.mark.parametrize("kw,field", [
    ({"output_format": pb.OutputFormat(json_schema='{"type": "nonsense"}')}, "output_format.json_schema"),
    ({"output_format": pb.OutputFormat(json_schema="{not json")}, "output_format.json_schema"),
    ({"output_format": pb.OutputFormat(regex="[a-")}, "output_format.regex"),
    ({"logit_bias": {10**8: 1.0}}, "logit_bias"),
    ({"logit_bias": {5: 1000.0}}, "logit_bias"),
])
def test_bad_output_format_is_invalid_argument_naming_the_field(server, stub, kw, field):
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(_req(server, **kw), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(e.value.trailing_metadata() or ()).get("x-loraplex-field") == field, e.value.details()


def test_health_list_answers_every_service(server, channel):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from loraplex.server.api.grpc_server import INFERENCE

    r = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=10)
    assert r.statuses[INFERENCE].status == health_pb2.HealthCheckResponse.SERVING


def test_rejected_requests_are_counted_by_reason(server, stub):
    import httpx

    before = httpx.get(f"{server.url}/metrics").text
    with pytest.raises(grpc.RpcError):
        stub.Generate(_req(server, output_format=pb.OutputFormat(regex="[a-")), timeout=60)
    httpx.post(f"{server.url}/v1/chat/completions", json={"model": "nope", "messages": []})
    after = httpx.get(f"{server.url}/metrics").text

    def count(text, needle):
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("loraplex_rejected_requests_total") and needle in line)

    assert count(after, 'protocol="grpc",reason="invalid_request_error",status="INVALID_ARGUMENT"') == \
        count(before, 'protocol="grpc",reason="invalid_request_error",status="INVALID_ARGUMENT"') + 1
    assert count(after, 'protocol="http"') >= count(before, 'protocol="http"') + 1


def test_http_extras_models_by_id_unknown_routes_and_tokenizer_endpoints(server):
    import httpx

    u, base = server.url, server.state.service.model_id
    r = httpx.get(f"{u}/v1/models/{base}")
    assert r.status_code == 200 and r.json()["id"] == base
    r = httpx.get(f"{u}/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = httpx.get(f"{u}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.delete(f"{u}/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    tok = server.state.service.tokenizer
    r = httpx.post(f"{u}/tokenize", json={"model": base, "prompt": "Hello world"})
    assert r.status_code == 200 and r.json()["tokens"] == tok.encode("Hello world")
    assert r.json()["count"] == len(r.json()["tokens"])
    chat = httpx.post(f"{u}/tokenize", json={"model": base, "messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["tokens"] == server.state.service.chat_prompt_ids([{"role": "user", "content": "Hi"}])
    r = httpx.post(f"{u}/detokenize", json={"model": base, "tokens": r.json()["tokens"]})
    assert r.status_code == 200 and r.json()["prompt"] == tok.decode(tok.encode("Hello world"))
    assert httpx.post(f"{u}/detokenize", json={"tokens": [10**9]}).status_code == 400
    info = httpx.get(f"{u}/tokenizer_info").json()
    assert info["vocab_size"] == len(tok) and info["eos_token"] == tok.eos_token
