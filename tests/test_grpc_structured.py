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
def stub(server):
    from loraplex.server.grpc_server import GrpcServer

    gs = GrpcServer(server.state, port=0)
    port = gs.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(ch).result(timeout=10)
    yield pbg.InferenceStub(ch)
    ch.close()
    gs.stop()


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
