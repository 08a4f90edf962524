"""The OpenAI-compatible HTTP API, driven by the official `openai` client and raw httpx."""
from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

MSG = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def srv(server, adapter_dirs):
    for name in ("alpha", "beta"):
        r = httpx.post(f"{server.url}/v1/adapters", json={"name": name, "path": str(adapter_dirs[name])})
        assert r.status_code == 201, r.text
    return server


@pytest.fixture()
def client(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)


def base_id(srv):
    return srv.state.service.model_id


def test_health_and_models(srv, client):
    assert httpx.get(f"{srv.url}/health").status_code == 200
    models = {m.id: m for m in client.models.list().data}
    assert base_id(srv) in models
    for name in ("alpha", "beta", "alpha@1"):
        assert name in models
        assert models[name].model_extra["parent"] == base_id(srv)


def test_chat_adapter_base_and_pinned_version(srv, client):
    outs = {}
    for model in ("alpha", "beta", base_id(srv), "alpha@1"):
        raw = client.chat.completions.with_raw_response.create(model=model, messages=MSG, max_tokens=8, temperature=0)
        r = raw.parse()
        outs[model] = r.choices[0].message.content
        assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 5
        expected = base_id(srv) if model == base_id(srv) else (model if "@" in model else f"{model}@1")
        assert r.system_fingerprint == expected
        assert raw.headers["x-loraplex-adapter"] == expected
    assert outs["alpha"] == outs["alpha@1"]
    assert len({outs["alpha"], outs["beta"], outs[base_id(srv)]}) == 3


def test_served_by_header(srv):
    r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": "beta", "messages": MSG, "max_tokens": 2})
    assert r.status_code == 200
    assert r.headers["x-loraplex-adapter"] == "beta@1"


def test_stream_matches_non_stream_and_usage(srv, client):
    kw = dict(model="alpha", messages=MSG, max_tokens=12, temperature=0.8, seed=7)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].choices == []


def test_seed_n_and_sampling(srv, client):
    kw = dict(model="beta", messages=MSG, max_tokens=10, temperature=1.0, top_p=0.95)
    a = client.chat.completions.create(seed=3, n=3, **kw)
    b = client.chat.completions.create(seed=3, n=3, **kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1  # choices use different draws
    single = client.chat.completions.create(seed=3, **kw)
    assert single.choices[0].message.content == a.choices[0].message.content


def test_stop_and_max_completion_tokens(srv, client):
    r = client.chat.completions.create(model="alpha", messages=MSG, max_completion_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    long = client.chat.completions.create(model="alpha", messages=MSG, max_tokens=20, temperature=0).choices[0].message.content
    assert len(long) > 4
    stop = long[2:5]
    r = client.chat.completions.create(model="alpha", messages=MSG, max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == long[: long.index(stop)]


def test_chat_logprobs(srv, client):
    r = client.chat.completions.create(model="alpha", messages=MSG, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 3
        assert e.logprob <= 0
        # greedy: the chosen token is the most likely one
        assert abs(e.top_logprobs[0].logprob - e.logprob) < 1e-5
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob


def test_completions_inputs_echo_logprobs(srv, client):
    tok = srv.state.service.tokenizer
    r = client.completions.create(model="alpha", prompt="Hello world", max_tokens=4, temperature=0)
    text = r.choices[0].text
    ids = tok.encode("Hello world")
    r2 = client.completions.create(model="alpha", prompt=ids, max_tokens=4, temperature=0)
    assert r2.choices[0].text == text
    r3 = client.completions.create(model="alpha", prompt=["Hello world", "Another"], max_tokens=4, temperature=0)
    assert [c.index for c in r3.choices] == [0, 1] and r3.choices[0].text == text
    r4 = client.completions.create(model="alpha", prompt=[ids, ids], max_tokens=4, temperature=0)
    assert r4.choices[1].text == text
    e = client.completions.create(model="alpha", prompt="Hello world", max_tokens=4, temperature=0, echo=True, logprobs=2)
    c = e.choices[0]
    assert c.text == tok.decode(ids) + text
    n_prompt = len(ids)
    assert len(c.logprobs.tokens) == n_prompt + 4
    assert c.logprobs.token_logprobs[0] is None and all(x is not None for x in c.logprobs.token_logprobs[1:])
    # "up to logprobs + 1": the top 2, plus the token itself when it is not among them
    assert all(len(t) in (2, 3) and tok_ in t for tok_, t in zip(c.logprobs.tokens[1:], c.logprobs.top_logprobs[1:]))
    assert any(len(t) == 3 for t in c.logprobs.top_logprobs[1:])  # prompt tokens of a random model often are not
    assert c.logprobs.text_offset == sorted(c.logprobs.text_offset)


def test_errors_are_typed_and_name_the_field(srv):
    u = srv.url
    r = httpx.post(f"{u}/v1/chat/completions", json={"model": "nope", "messages": MSG})
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
    r = httpx.post(f"{u}/v1/chat/completions", json={"model": "alpha@9", "messages": MSG})
    assert r.status_code == 404
    r = httpx.post(f"{u}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{u}/v1/chat/completions", json={"model": "alpha", "messages": MSG, "max_tokens": "many"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(f"{u}/v1/chat/completions", json={"model": "alpha", "messages": MSG, "temperature": 5})
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    r = httpx.post(f"{u}/v1/chat/completions", json={"model": "alpha", "messages": MSG, "max_tokens": 100000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(f"{u}/v1/completions", json={"model": "alpha", "prompt": [10**9]})
    assert r.status_code == 400
    r = httpx.post(f"{u}/v1/chat/completions", json={"model": "alpha", "messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]


def test_disconnect_mid_stream_frees_the_slot(srv):
    eng = srv.engine
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions",
                      json={"model": "alpha", "messages": MSG, "max_tokens": 400, "stream": True, "ignore_eos": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"content": ""' not in line and '"content"' in line:
                break  # a generated token (the first chunk, the role, is sent before admission)
        assert eng.state()["running"] >= 1
    deadline = time.time() + 10
    while eng.state()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert eng.state()["running"] == 0
    assert eng.state()["kv_used_tokens"] == 0


def test_queue_full_is_429(tiny_base, tmp_path):
    from conftest import start_server

    s = start_server(tmp_path, tiny_base, max_queue=1, max_num_seqs=1)
    try:
        body = {"model": s.state.service.model_id, "messages": MSG, "max_tokens": 300, "ignore_eos": True}
        codes = []

        def go():
            codes.append(httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=120).status_code)

        ts = [threading.Thread(target=go) for _ in range(5)]
        for t in ts:
            t.start()
            time.sleep(0.05)
        for t in ts:
            t.join()
        assert 429 in codes and 200 in codes
    finally:
        s.stop()
