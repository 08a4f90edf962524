"""Constrained decoding inside the batched sampler: masks act on their own rows only, answers follow the grammar."""
from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from loraplex.server.engine.request import OutputStream, Request, SamplingParams
from loraplex.server.engine.sampler import make_generator, sample_rows
from loraplex.server.engine.structured import (GrammarCompiler, StepMasks, apply_bitmask, choice_grammar, json_schema_grammar,
                                        regex_grammar)
from schema_gen import random_schemas


def _bitmask(allowed: list[list[int]], vocab: int) -> torch.Tensor:
    bm = torch.zeros(len(allowed), (vocab + 31) // 32, dtype=torch.int64)
    for k, ids in enumerate(allowed):
        for t in ids:
            bm[k, t // 32] |= 1 << (t % 32)
    return torch.where(bm >= 2**31, bm - 2**32, bm).to(torch.int32)  # bit 31 is the int32 sign bit


def test_apply_bitmask_allows_exactly_the_set_bits():
    allowed = [[0, 31, 32, 99], [5], [63, 64, 65]]
    logits = torch.randn(3, 100)
    out = apply_bitmask(logits.clone(), _bitmask(allowed, 100))
    for k, ids in enumerate(allowed):
        assert torch.isfinite(out[k]).nonzero().flatten().tolist() == ids
        assert torch.equal(out[k, ids], logits[k, ids])


def test_masked_and_biased_rows_leave_the_other_rows_of_a_step_alone():
    g = torch.Generator().manual_seed(0)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=1, logprobs=2),
              SamplingParams(temperature=0.8, top_p=0.9, seed=2), SamplingParams(temperature=1.0, seed=3),
              SamplingParams(temperature=0.0, logit_bias={7: 100.0}), SamplingParams(temperature=1.2, seed=4)]
    constrained = {1: [3, 4, 5], 3: [10, 900], 5: [42]}
    for step in range(30):
        logits = torch.randn(len(params), 1000, generator=g) * 3
        rows = lambda: [(i, p, make_generator(100 * step + i), []) for i, p in enumerate(params)]  # noqa: E731
        alone = sample_rows(logits, rows())
        masks = StepMasks(list(constrained), _bitmask(list(constrained.values()), 1000), 0.0)
        mixed = sample_rows(logits.clone(), rows(), masks)
        for i in range(len(params)):
            if i in constrained:
                assert mixed[i][0] in constrained[i]
            elif params[i].logit_bias:
                assert mixed[i][0] == 7
            else:
                assert mixed[i] == alone[i] or (mixed[i][0] == alone[i][0] and mixed[i][1].top == alone[i][1].top)
        # logprobs stay those of the model's distribution, before the mask
        assert mixed[1][1].logprob == pytest.approx(torch.log_softmax(logits[1], -1)[mixed[1][0]].item())


@pytest.fixture(scope="module")
def state(tiny_base, adapter_dirs, tmp_path_factory):
    from loraplex.server.runtime import ServeConfig, build_state

    # prefix caching off: a prompt whose KV comes from the cache differs from a fresh prefill at float noise, which
    # would change sampled tokens between the runs this module compares for reasons that are not the masks
    cfg = ServeConfig(model=str(tiny_base), store=tmp_path_factory.mktemp("store"), max_loras=4, kv_cache_tokens=32768,
                      prefix_caching=False)
    cfg.adapters = {n: str(p) for n, p in adapter_dirs.items()}
    st = build_state(cfg)
    yield st
    st.engine.shutdown()


@pytest.fixture(scope="module")
def compiler(state):
    s = state.service
    return GrammarCompiler(s.tokenizer, state.engine.eos_ids, s.base.model.config.vocab_size)


def _run(state, items):
    """items: (adapter name | None, SamplingParams); all enqueued at once so they share steps -> (token ids, text)."""
    eng, svc = state.engine, state.service
    prompt = svc.chat_prompt_ids([{"role": "user", "content": "Answer in JSON."}])
    reqs = []
    for i, (name, p) in enumerate(items):
        adapter = None if name is None else state.store.get(name)
        if adapter is not None:
            eng.pool.pin(adapter)
        reqs.append(Request(f"r{i}", prompt, p, adapter=adapter, stream=OutputStream()))
    eng.call(lambda: [eng._enqueue(r) for r in reqs])
    out = []
    for r in reqs:
        toks, text = [], ""
        while True:
            o = r.stream.get(timeout=300)
            toks += o.token_ids
            text += o.text
            if o.finished:
                break
        out.append((toks, text, o.finish_reason))
    return out


ADAPTERS = ["alpha", "beta", "gamma", "delta", None]


def _free(i: int) -> SamplingParams:
    return SamplingParams(max_tokens=12, temperature=0.0 if i % 3 == 0 else 0.9, seed=50 + i,
                          top_p=1.0 if i % 2 else 0.9)


def _json(compiler, schema):
    return compiler.compile(json_schema_grammar(schema, "x"), "x")


def test_free_requests_with_constrained_neighbours_sample_what_they_sample_alone(state, compiler):
    schemas = random_schemas(12, seed=7)
    free = [(ADAPTERS[i % 5], _free(i)) for i in range(12)]
    alone = _run(state, free)
    constrained = [(ADAPTERS[(i + 2) % 5], SamplingParams(max_tokens=300, temperature=1.0, seed=i,
                                                          constraint=_json(compiler, s)))
                   for i, s in enumerate(schemas)]
    mixed = [None] * 24
    mixed[0::2], mixed[1::2] = free, constrained
    before = state.engine.masked_steps
    got = _run(state, mixed)
    assert state.engine.masked_steps > before
    assert [g[0] for g in got[0::2]] == [a[0] for a in alone]
    for (toks, text, reason), schema in zip(got[1::2], schemas):
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), schema)


def test_dozens_of_schemas_on_different_adapters_in_one_batch_all_validate(state, compiler):
    schemas = random_schemas(32, seed=11)
    items = [(ADAPTERS[i % 5], SamplingParams(max_tokens=400, temperature=1.0, seed=100 + i,
                                              constraint=compiler.compile(json_schema_grammar(s, "x"), "x")))
             for i, s in enumerate(schemas)]
    for (toks, text, reason), schema in zip(_run(state, items), schemas):
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), schema)


def test_regex_and_choice_constraints(state, compiler):
    pat = r"[A-Z]{2}-[0-9]{3}"  # (\d: any Unicode digit, of a newer Unicode than Python 3.11 knows)
    items = [(None, SamplingParams(max_tokens=20, temperature=1.0, seed=1,
                                   constraint=compiler.compile(regex_grammar(pat), "x"))),
             ("beta", SamplingParams(max_tokens=20, temperature=1.0, seed=2,
                                     constraint=compiler.compile(choice_grammar(["yes", "no", "it depends"]), "x")))]
    (_, a, ra), (_, b, rb) = _run(state, items)
    import re

    assert re.fullmatch(pat, a) and ra == "stop"
    assert b in ("yes", "no", "it depends") and rb == "stop"


@pytest.mark.parametrize("schema", [{"type": "foo"}, {"type": "string", "pattern": "(?<=a)b"}, {"$ref": "#/nope"}])
def test_schemas_the_library_cannot_enforce_are_refused_naming_the_field(compiler, schema):
    from loraplex.server.api.errors import BadRequest

    with pytest.raises(BadRequest) as e:
        p = "response_format.json_schema.schema"
        compiler.compile(json_schema_grammar(schema, p), p)
    assert e.value.param == "response_format.json_schema.schema"


def test_forced_tool_call_grammar_allows_parallel_calls_only_when_asked(compiler):
    from loraplex.server.api.tools import forced_call_grammar, parse_tool_calls, resolve_tool_choice

    tools = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
        "additionalProperties": False}}}]
    one = '<tool_call>\n{"name": "add", "arguments": {"a": %d}}\n</tool_call>'
    two = one % 1 + "\n" + one % 2
    ids = compiler.hf_tokenizer.encode(two, add_special_tokens=False)
    for parallel, accepted in ((True, True), (False, False)):
        choice = resolve_tool_choice(tools, "required", parallel)
        c = compiler.compile(forced_call_grammar(choice), "tool_choice")
        assert all(c.matcher.consume_token(t) for t in ids) == accepted
        content, calls = parse_tool_calls(two, choice)
        assert [json.loads(k.arguments) for k in calls] == ([{"a": 1}, {"a": 2}] if parallel else [{"a": 1}])
        assert content is None
    bad = compiler.compile(forced_call_grammar(resolve_tool_choice(tools, "required", True)), "tool_choice")
    wrong = compiler.hf_tokenizer.encode('<tool_call>\n{"name": "add", "arguments": {"a": "x"}}',
                                         add_special_tokens=False)
    assert not all(bad.matcher.consume_token(t) for t in wrong)
