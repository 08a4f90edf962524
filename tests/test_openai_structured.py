"""Structured output, tool calls and logit_bias through the official `openai` client and LangChain."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from schema_gen import random_schemas

ADAPTERS = ["alpha", "beta", "gamma", "delta"]
MSG = [{"role": "user", "content": "Answer in JSON."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Adds two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                    "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                   "required": ["a", "b"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def tool_base(tmp_path_factory):
    from helpers import make_tiny_tool_llama

    return make_tiny_tool_llama(tmp_path_factory.mktemp("tiny-tool-base"), seed=0)


@pytest.fixture(scope="module")
def srv(tool_base, tmp_path_factory):
    from conftest import start_server
    from helpers import make_peft_adapter

    s = start_server(tmp_path_factory.mktemp("srv-structured"), tool_base, max_loras=4, kv_cache_tokens=32768,
                     max_queue=128)
    root = tmp_path_factory.mktemp("adapters-structured")
    for i, name in enumerate(ADAPTERS):
        d = make_peft_adapter(tool_base, root / name, r=4 + 4 * i, alpha=16, target_modules=["q_proj", "v_proj"],
                              seed=i + 1)
        r = httpx.post(f"{s.url}/v1/adapters", json={"name": name, "path": str(d)})
        assert r.status_code == 201, r.text
    yield s
    s.stop()


@pytest.fixture()
def client(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=300)


def test_generated_schemas_on_different_adapters_in_one_batch_all_validate(srv, client):
    schemas = random_schemas(30, seed=3)

    def ask(i):
        s = schemas[i]
        return client.chat.completions.create(
            model=ADAPTERS[i % 4] if i % 5 else srv.state.service.model_id, messages=MSG, max_tokens=400, seed=i,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": s, "strict": True}})

    with ThreadPoolExecutor(30) as ex:
        answers = list(ex.map(ask, range(len(schemas))))
    for r, s in zip(answers, schemas):
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), s)
    assert srv.engine.masked_steps > 0


def test_json_object_and_pydantic_parse(client):
    r = client.chat.completions.create(model="beta", messages=MSG, max_tokens=300, seed=1,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)

    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        city: str = Field(max_length=10)
        celsius: int = Field(ge=-40, le=50)
        sunny: bool

    parsed = client.chat.completions.parse(model="alpha", messages=MSG, max_tokens=200, seed=2,
                                           response_format=Weather)
    w = parsed.choices[0].message.parsed
    assert isinstance(w, Weather) and -40 <= w.celsius <= 50


def test_completions_take_response_format_and_vllm_extensions(srv):
    base = f"{srv.url}/v1/completions"
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["n"],
              "additionalProperties": False}
    r = httpx.post(base, json={"model": "gamma", "prompt": "JSON:", "max_tokens": 50, "seed": 3,
                               "response_format": {"type": "json_schema",
                                                   "json_schema": {"name": "n", "schema": schema}}},
                   timeout=120)
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), schema)
    # [0-9], not \d: in llguidance's regex syntax (Rust's) \d is every Unicode digit, newer ones included that
    # Python's re does not know (a sampled U+10D45, a Garay digit, once failed this check)
    r = httpx.post(base, json={"model": "alpha", "prompt": "Code:", "max_tokens": 20, "seed": 5,
                               "guided_regex": r"[A-Z]{3}-[0-9]{2}"},
                   timeout=120)
    import re

    assert re.fullmatch(r"[A-Z]{3}-[0-9]{2}", r.json()["choices"][0]["text"]), r.text
    r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": "delta", "messages": MSG, "max_tokens": 20,
                                                           "structured_outputs": {"choice": ["red", "green", "blue"]}},
                   timeout=120)
    assert r.json()["choices"][0]["message"]["content"] in ("red", "green", "blue"), r.text


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?=a)"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
    ({"logit_bias": {"999999": 5}}, "logit_bias"),
    ({"logit_bias": {"12": 500}}, "logit_bias"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_structured_fields_are_400_naming_the_field_and_nothing_is_queued(srv, body, param):
    steps = srv.engine.steps
    r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": "alpha", "messages": MSG, "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
    assert srv.engine.steps == steps  # nothing was queued
    ok = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": "alpha", "messages": MSG, "max_tokens": 3})
    assert ok.status_code == 200  # the engine keeps serving


def test_tool_message_without_tool_call_id_is_400(srv):
    msgs = MSG + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "content": "3"}]
    r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": "alpha", "messages": msgs, "tools": [ADD]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.2.tool_call_id", r.text


def test_logit_bias_on_both_endpoints(srv, client):
    tok = srv.state.service.tokenizer
    target = tok.encode(" banana", add_special_tokens=False)[0]
    r = client.chat.completions.create(model="alpha", messages=MSG, max_tokens=4, temperature=0,
                                       logit_bias={str(target): 100})
    assert r.choices[0].message.content == tok.decode([target] * 4)
    free = client.completions.create(model="beta", prompt="Hello", max_tokens=6, temperature=0)
    first = tok.encode(free.choices[0].text, add_special_tokens=False)[0]
    banned = client.completions.create(model="beta", prompt="Hello", max_tokens=6, temperature=0,
                                       logit_bias={str(first): -100})
    assert tok.encode(banned.choices[0].text, add_special_tokens=False)[0] != first
    forced = client.completions.create(model="beta", prompt="Hello", max_tokens=3, temperature=0,
                                       logit_bias={str(target): 100})
    assert forced.choices[0].text == tok.decode([target] * 3)


def _call_args(call) -> dict:
    return json.loads(call.function.arguments)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_calls_match_the_function_schema(client, choice):
    r = client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "Add 2 and 3."}],
                                       tools=[WEATHER, ADD], tool_choice=choice, max_tokens=200, seed=4,
                                       parallel_tool_calls=False)  # a random model would go on calling
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls, c
    for call in c.message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        fn = {"get_weather": WEATHER, "add": ADD}[call.function.name]
        jsonschema.validate(_call_args(call), fn["function"]["parameters"])
    if isinstance(choice, dict):
        assert [t.function.name for t in c.message.tool_calls] == ["add"]


def test_tool_choice_none_and_auto_answer_with_text_when_the_model_writes_text(client):
    for choice in ("none", "auto"):
        r = client.chat.completions.create(model="beta", messages=MSG, tools=[ADD], tool_choice=choice, max_tokens=8,
                                           temperature=0)
        assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
        assert r.choices[0].message.content


def test_streamed_tool_call_deltas_reassemble_to_the_same_calls(client):
    kw = dict(model="delta", messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER, ADD],
              tool_choice="required", parallel_tool_calls=False, max_tokens=150, seed=9)
    full = client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            for d in ch.delta.tool_calls or []:
                c = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                c["id"] = d.id or c["id"]
                c["name"] += (d.function.name or "") if d.function else ""
                c["arguments"] += (d.function.arguments or "") if d.function else ""
    assert finish == "tool_calls"
    got = [calls[k] for k in sorted(calls)]
    assert [(c["name"], json.loads(c["arguments"])) for c in got] == \
        [(t.function.name, _call_args(t)) for t in full.message.tool_calls]
    assert all(c["id"].startswith("call_") for c in got)


def test_tool_round_trip_call_result_answer(client):
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    r = client.chat.completions.create(model="alpha", messages=msgs, tools=[ADD], tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=100, seed=5)
    m = r.choices[0].message
    assert len(m.tool_calls) == 1
    args = _call_args(m.tool_calls[0])
    msgs += [m.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": m.tool_calls[0].id, "content": str(args["a"] + args["b"])}]
    final = client.chat.completions.create(model="alpha", messages=msgs, tools=[ADD], max_tokens=10, temperature=0)
    assert final.choices[0].finish_reason in ("stop", "length") and final.choices[0].message.content


def test_langchain_bind_tools_round_trip(srv):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def multiply(a: int, b: int) -> int:
        """Multiplies two integers."""
        return a * b

    llm = ChatOpenAI(model="beta", base_url=f"{srv.url}/v1", api_key="none", max_tokens=120, seed=3, max_retries=0)
    bound = llm.bind_tools([multiply], tool_choice="required", strict=True)  # strict: no extra argument keys
    msgs = [HumanMessage("What is 6 times 7?")]
    ai = bound.invoke(msgs)
    assert ai.tool_calls and ai.tool_calls[0]["name"] == "multiply"
    args = ai.tool_calls[0]["args"]
    assert set(args) == {"a", "b"} and all(isinstance(v, int) for v in args.values())
    streamed = None
    for part in bound.stream(msgs):
        streamed = part if streamed is None else streamed + part
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [(c["name"], c["args"]) for c in ai.tool_calls]
    result = multiply.invoke(ai.tool_calls[0]["args"])
    reply = ToolMessage(str(result), tool_call_id=ai.tool_calls[0]["id"])
    answer = llm.bind_tools([multiply]).invoke(msgs + [ai, reply])
    assert isinstance(answer.content, str)


def test_a_template_without_tool_support_is_a_clear_400(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": server.state.service.model_id, "messages": MSG,
                                                              "tools": [ADD]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text
    assert "tool support" in r.json()["error"]["message"]


# One value per field of the README's "Request fields" table, for the test that walks it.
SAMPLES = {
    "model": None, "stream": False, "stream_options.include_usage": None, "messages": None, "prompt": None,
    "echo": True, "max_tokens": 2, "n": 1, "seed": 1, "stop": ["zz"], "temperature": 0.5, "top_p": 0.9,
    "presence_penalty": 0.1, "frequency_penalty": 0.1, "max_completion_tokens": 2, "top_logprobs": 2,
    "logprobs": None, "logit_bias": {"5": 1.0}, "response_format": {"type": "json_object"}, "tools": [ADD],
    "tool_choice": "none", "parallel_tool_calls": False, "user": "u1", "top_k": 5, "ignore_eos": True,
    "guided_json": {"type": "object"}, "guided_regex": "a+", "guided_choice": ["x", "y"],
    "guided_grammar": 'start: "ok"',
    "structured_outputs": {"regex": "b+"}, "best_of": 2, "suffix": "end", "audio": {"voice": "alloy", "format": "wav"},
    "functions": [ADD["function"]], "function_call": "auto", "prediction": {"type": "content", "content": "x"},
    "reasoning_effort": "low", "verbosity": "low", "web_search_options": {}, "modalities": ["audio"],
    "store": True, "metadata": {"k": "v"}, "service_tier": "auto", "prompt_cache_key": "k",
    "prompt_cache_retention": "24h", "safety_identifier": "s", "stream_options.include_obfuscation": False,
}


def _readme_fields() -> list[tuple[str, list[str], str]]:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = text.split("### Request fields", 1)[1].split("\n\n", 2)[2].split("\n\n", 1)[0]
    rows = []
    for line in table.splitlines()[2:]:
        fields_cell, endpoints, status = [c.strip() for c in line.strip("|").split("|")]
        fields = re.findall(r"^`([^`]+)`|, `([^`]+)`", fields_cell)
        names = [a or b for a, b in fields]
        eps = [e for e in ("chat", "completions") if e in endpoints.split("(")[0]]
        rows += [(n, eps, status) for n in names]
    return rows


def _body(field: str, endpoint: str) -> dict:
    body = {"model": "alpha", "max_tokens": 3}
    body.update({"messages": MSG} if endpoint == "chat" else {"prompt": "Hi"})
    if field.startswith("stream_options."):
        body["stream_options"] = {field.split(".", 1)[1]: SAMPLES[field] if SAMPLES[field] is not None else True}
    elif field == "logprobs":
        body["logprobs"] = True if endpoint == "chat" else 2
    elif field == "top_logprobs":
        body.update(logprobs=True, top_logprobs=2)
    elif SAMPLES[field] is not None:
        body[field] = SAMPLES[field]
    if field in ("tool_choice", "parallel_tool_calls"):
        body["tools"] = [ADD]
    return body


def test_every_field_of_the_readme_table_behaves_as_it_says(srv):
    rows = _readme_fields()
    assert {n for n, _, _ in rows} == set(SAMPLES), "the README's table and this test's samples disagree"
    for field, endpoints, status in rows:
        for ep in endpoints:
            url = f"{srv.url}/v1/{'chat/completions' if ep == 'chat' else 'completions'}"
            r = httpx.post(url, json=_body(field, ep), timeout=120)
            if status.startswith("refused") or (field == "modalities"):
                assert r.status_code == 400, (field, ep, r.text)
                assert r.json()["error"]["param"] == field, (field, r.text)
            else:
                assert r.status_code == 200, (field, ep, r.text)
    from loraplex.server.api.openai_api import ChatCompletionRequest, CompletionRequest

    declared = set(ChatCompletionRequest.model_fields) | set(CompletionRequest.model_fields)
    fields = {**CompletionRequest.model_fields, **ChatCompletionRequest.model_fields}
    declared = {fields[f].alias or f for f in declared}
    assert declared - {n for n, _, _ in rows} - {"stream_options"} == set()  # every accepted field is in the table
    r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": "alpha", "messages": MSG, "frobnicate": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "frobnicate", r.text
