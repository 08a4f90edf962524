"""SFT records with `tools` and assistant `tool_calls`: rendered as the server renders them, trained on the calls only,
refused clearly when malformed; and an adapter trained on them is served with parsed `tool_calls`."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import httpx
import pytest

from loraplex.trainer.data import IGNORE, DataError, Tokenizing, load_examples

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def call(cid: str, name: str, args) -> dict:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


def round_trip(city: str, args_as_object: bool = False) -> dict:
    args = {"city": city} if args_as_object else json.dumps({"city": city})
    return {"tools": copy.deepcopy([WEATHER, TIME]), "messages": [
        {"role": "system", "content": "You are a weather assistant."},
        {"role": "user", "content": f"What is the weather in {city}?"},
        {"role": "assistant", "content": None, "tool_calls": [call("call_a", "get_weather", args)]},
        {"role": "tool", "tool_call_id": "call_a", "content": '{"celsius": 18}'},
        {"role": "assistant", "content": f"It is 18 degrees in {city}."}]}


def write_jsonl(path: Path, recs) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs))
    return path


@pytest.fixture(scope="module")
def tool_base(tmp_path_factory):
    from helpers import make_tiny_tool_llama

    return make_tiny_tool_llama(tmp_path_factory.mktemp("tool-train-base"), seed=0)


@pytest.fixture(scope="module")
def tok(tool_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tool_base)


@pytest.fixture(scope="module")
def srv(tool_base, tmp_path_factory):
    from conftest import start_server

    s = start_server(tmp_path_factory.mktemp("srv-tool-train"), tool_base, max_loras=2, kv_cache_tokens=8192)
    yield s
    s.stop()


def _trained_runs(ex) -> list[tuple[int, int]]:
    """[start, end) token ranges of the example that carry loss."""
    runs, start = [], None
    for i, lab in enumerate(ex.labels + [IGNORE]):
        if lab != IGNORE and start is None:
            start = i
        elif lab == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_training_text_is_the_served_prompt_and_loss_is_on_the_assistant_turns_only(tmp_path, tok, srv):
    from loraplex.server.api.tools import check_tool_support, parse_tool_calls, resolve_tool_choice, template_messages

    rec = round_trip("Paris")
    ex = load_examples(write_jsonl(tmp_path / "t.jsonl", [rec]), "auto", Tokenizing(tok, 1024))[0]
    service = srv.state.service
    runs = _trained_runs(ex)
    assert len(runs) == 2  # the tool call turn and the final answer, nothing of the prompt or the tool result
    for (start, end), k in zip(runs, (2, 4)):
        # what the server feeds the model when the conversation so far arrives as an OpenAI chat request
        served = service.chat_prompt_ids(template_messages(copy.deepcopy(rec["messages"][:k])), rec["tools"])
        assert ex.input_ids[:start] == served
    assert all(lab == IGNORE for lab in ex.labels[: runs[0][0]])
    first = tok.decode(ex.input_ids[runs[0][0]:runs[0][1]])
    assert first.rstrip("\n").endswith(tok.eos_token)  # the model learns to stop after its call
    # the server's parser reads the trained call text back as the record's call
    choice = resolve_tool_choice(rec["tools"], "auto", None)
    choice.fmt = check_tool_support(tok)
    assert choice.fmt.name == "hermes"
    content, calls = parse_tool_calls(first.split(tok.eos_token)[0], choice)
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    last = tok.decode(ex.input_ids[runs[1][0]:runs[1][1]])
    assert last.startswith("It is 18 degrees in Paris.") and "celsius" not in last


def test_arguments_as_object_render_as_a_json_string_does(tok):
    tk = Tokenizing(tok, 1024)
    a, b = tk.record(round_trip("Oslo"), "chat"), tk.record(round_trip("Oslo", args_as_object=True), "chat")
    assert a.input_ids == b.input_ids and a.labels == b.labels


def test_weight_zero_leaves_an_assistant_turn_untrained(tok):
    rec = round_trip("Rome")
    rec["messages"][2]["weight"] = 0
    ex = Tokenizing(tok, 1024).record(rec, "chat")
    trained = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])
    assert "<tool_call>" not in trained and trained.startswith("It is 18 degrees in Rome.")


def _broken(path: str, value):
    rec = round_trip("Lima")
    keys = path.split(".")
    node = rec
    for k in keys[:-1]:
        node = node[int(k) if k.isdigit() else k]
    if value is _DROP:
        del node[int(keys[-1]) if keys[-1].isdigit() else keys[-1]]
    else:
        node[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = value
    return rec


_DROP = object()


@pytest.mark.parametrize("path,value,field", [
    ("messages.2.tool_calls.0.function.name", _DROP, "messages.2.tool_calls.0.function.name"),
    ("messages.2.tool_calls.0.function.arguments", "{city: Lima", "messages.2.tool_calls.0.function.arguments"),
    ("messages.2.tool_calls.0.function.arguments", 42, "messages.2.tool_calls.0.function.arguments"),
    ("messages.2.tool_calls.0.function.arguments", '["Lima"]', "messages.2.tool_calls.0.function.arguments"),
    ("messages.3.tool_call_id", _DROP, "messages.3.tool_call_id"),
    ("messages.3.tool_call_id", "call_zzz", "messages.3.tool_call_id"),
    ("messages.2.tool_calls.0.function.name", "get_forecast", "messages.2.tool_calls.0.function.name"),
    ("tools.1.function.name", _DROP, "tools.1.function.name"),
    ("tools", _DROP, "messages.2.tool_calls.0.function.name"),  # a call of a tool the record does not define
    ("messages.4.weight", 0.5, "messages.4.weight"),
])
def test_malformed_tool_records_name_the_line_and_field(tmp_path, tok, path, value, field):
    good = round_trip("Quito")
    f = write_jsonl(tmp_path / "bad.jsonl", [good, _broken(path, value)])
    with pytest.raises(DataError) as e:
        load_examples(f, "auto", Tokenizing(tok, 1024))
    assert f"{f}:2:" in str(e.value) and field in str(e.value)


def test_tool_records_on_a_template_without_tool_support_are_refused(tmp_path, tiny_base):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny_base)  # the embedded SmolLM2 template renders no tools
    f = write_jsonl(tmp_path / "t.jsonl", [round_trip("Cairo")])
    with pytest.raises(DataError, match=r"t.jsonl:1: the record has tools, but .*no tool support"):
        load_examples(f, "auto", Tokenizing(plain, 1024))


CITIES = ["Paris", "Berlin", "Madrid", "Rome"]
ASK = {"get_weather": ["What is the weather in {}?", "Weather for {} please.", "How warm is it in {}?",
                       "Is it raining in {} today?"],
       "get_time": ["What time is it in {}?", "Tell me the time in {}.", "Clock check for {}.",
                    "What hour is it now in {}?"]}


@pytest.mark.slow
def test_an_adapter_fine_tuned_on_tool_calls_is_served_with_parsed_tool_calls(tmp_path, tool_base, srv):
    import openai

    from loraplex.trainer.cli import run_job
    from loraplex.trainer.config import parse_config

    recs = [{"tools": [WEATHER, TIME], "messages": [
        {"role": "user", "content": q.format(city)},
        {"role": "assistant", "tool_calls": [call("call_b", fn, {"city": city})]}]}
        for fn, qs in ASK.items() for q in qs[:-1] for city in CITIES]  # the last phrasing is held out
    data = write_jsonl(tmp_path / "tools.jsonl", recs)
    cfg = parse_config({"base_model": str(tool_base), "adapter": {"name": "weather-tools", "r": 16, "alpha": 32},
                        "datasets": [str(data)], "sequence_len": 512, "epochs": 60, "learning_rate": 1e-2,
                        "micro_batch_size": 8, "seed": 3, "save_steps": 10000, "gradient_checkpointing": False})
    v, _ = run_job(cfg, tmp_path / "run", tmp_path / "store", resume=False, caller="test")
    r = httpx.post(f"{srv.url}/v1/adapters", json={"name": "weather-tools", "path": str(v.path)})
    assert r.status_code == 201, r.text
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=300)
    for qs in ASK.values():
        kw = dict(messages=[{"role": "user", "content": qs[-1].format("Rome")}], tools=[WEATHER, TIME],
                  tool_choice="auto", temperature=0, max_tokens=48)
        base = client.chat.completions.create(model=srv.state.service.model_id, **kw).choices[0]
        assert not base.message.tool_calls  # the random base writes no call of its own accord
        ch = client.chat.completions.create(model="weather-tools", **kw).choices[0]
        assert ch.finish_reason == "tool_calls", ch
        [c] = ch.message.tool_calls
        # a 2-layer, 64-wide random model learns the call's form, not which tool a phrasing asks for
        assert c.function.name in ASK and isinstance(json.loads(c.function.arguments).get("city"), str), c
