"""Constrained decoding's cost in a shared batch, on the embedded default model, side by side in one run.

Workload: 32 chat requests on 4 rank-16 adapters (all 7 projections), 64 new
tokens each. In the mixed run, half of them carry a JSON schema (extraction
tasks: a list of at least 40 records, so no answer can end before 64 tokens
and both runs do exactly the same number of tokens); the other half are free.
The baseline run is the same 32 requests all free. Both run greedily through
our engine, all requests submitted at once. Reports tokens/s, milliseconds per
engine step, and what the grammar masks themselves cost per step (llguidance's
fill of every constrained row, measured inside the engine), and checks that
the free half sampled the same tokens in both runs.

Usage: python bench/serve_structured.py [--requests 32] [--adapters 4] [--new-tokens 64]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, also under PYTHONSAFEPATH=1 (the Makefile sets it)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import off_thread  # noqa: E402

from serve_multi_lora import TOPICS, build_adapters  # noqa: E402


def _records(item: dict) -> dict:
    return {"type": "object", "properties": {"records": {"type": "array", "minItems": 40, "items": item}},
            "required": ["records"], "additionalProperties": False}


SCHEMAS = [
    _records({"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}),
    _records({"type": "object", "properties": {"sku": {"type": "string", "maxLength": 12},
                                               "qty": {"type": "integer", "minimum": 1},
                                               "status": {"enum": ["pending", "shipped", "delivered"]}},
              "required": ["sku", "qty", "status"], "additionalProperties": False}),
    _records({"type": "object", "properties": {"label": {"enum": ["positive", "negative", "neutral"]},
                                               "score": {"type": "number", "minimum": 0, "maximum": 1}},
              "required": ["label", "score"], "additionalProperties": False}),
    _records({"type": "string", "maxLength": 40}),
]


def prompts_for(tok, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"List facts about {TOPICS[i % len(TOPICS)]} as JSON records, {i}."}]
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        out.append(tok.encode(text, add_special_tokens=False))
    return out


def run(state, prompts, adapters, constraints, new_tokens) -> dict:
    from loraplex.server.engine.request import SamplingParams

    eng, svc = state.engine, state.service
    steps0, mask0, masked0 = eng.steps, eng.mask_seconds, eng.masked_steps
    t0 = time.perf_counter()
    reqs = [svc.submit(p, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, constraint=c), a)
            for p, a, c in zip(prompts, adapters, constraints)]
    toks = []
    for r in reqs:
        ids = []
        while True:
            o = r.stream.get(timeout=900)
            ids += o.token_ids
            if o.finished:
                break
        toks.append(ids)
    dt = time.perf_counter() - t0
    n = sum(len(t) for t in toks)
    assert n == len(prompts) * new_tokens, n
    steps, masked = eng.steps - steps0, eng.masked_steps - masked0
    return {"tokens_s": n / dt, "step_ms": 1e3 * dt / steps, "steps": steps, "masked_steps": masked,
            "mask_ms": 1e3 * (eng.mask_seconds - mask0) / max(1, masked), "tokens": toks}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    from loraplex.adapters_store.base_model import resolve_base_model
    from loraplex.server.runtime import ServeConfig, build_state
    from loraplex.server.engine.structured import GrammarCompiler, json_schema_grammar

    base_dir = resolve_base_model("default")
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    built: dict = {}

    def setup() -> None:  # start-up off the engine thread's OpenMP team, as `loraplex serve` does
        dirs = build_adapters(base_dir, tmp / "adapters", args.adapters, args.rank)
        cfg = ServeConfig(model=None, store=tmp / "store", max_loras=args.adapters,
                          max_num_seqs=max(64, args.requests), kv_cache_tokens=65536,
                          prefix_caching=False)  # the second run must not reuse the first's prompts
        cfg.adapters = {f"a{i}": str(d) for i, d in enumerate(dirs)}
        built["state"] = build_state(cfg)

    off_thread(setup)
    state = built["state"]
    svc = state.service
    comp = GrammarCompiler(svc.tokenizer, state.engine.eos_ids, svc.base.model.config.vocab_size)
    t0 = time.perf_counter()
    comp.warm()
    warm_s = time.perf_counter() - t0
    prompts = prompts_for(svc.tokenizer, args.requests)
    versions = [state.store.get(f"a{i % args.adapters}") for i in range(args.requests)]
    constrained = [i % 2 == 0 for i in range(args.requests)]

    def constraints():  # fresh grammar states for each run, compiled as the front end does (timed)
        out, t0 = [], time.perf_counter()
        for i, c in enumerate(constrained):
            out.append(comp.compile(json_schema_grammar(SCHEMAS[(i // 2) % len(SCHEMAS)], "x"), "x") if c else None)
        return out, (time.perf_counter() - t0) / max(1, sum(constrained))

    run(state, prompts[:4], versions[:4], constraints()[0][:4], 4)  # warm-up
    free = run(state, prompts, versions, [None] * args.requests, args.new_tokens)
    cons, compile_s = constraints()
    mixed = run(state, prompts, versions, cons, args.new_tokens)
    state.engine.shutdown()
    same = all(mixed["tokens"][i] == free["tokens"][i] for i in range(args.requests) if not constrained[i])

    print(f"\n{args.requests} requests ({sum(constrained)} with a JSON schema), {args.adapters} adapters "
          f"(rank {args.rank}), {args.new_tokens} new tokens, greedy, {torch.get_num_threads()} threads")
    print(f"{'run':34s} {'tokens/s':>9s} {'ms/step':>8s} {'steps':>6s} {'mask ms/step':>13s}")
    for name, r in (("all free", free), ("half JSON schema, half free", mixed)):
        mask = f"{r['mask_ms']:.3f}" if r["masked_steps"] else "-"
        print(f"{name:34s} {r['tokens_s']:9.1f} {r['step_ms']:8.1f} {r['steps']:6d} {mask:>13s}")
    print()
    print(f"throughput mixed / all free      {mixed['tokens_s'] / free['tokens_s']:.3f}x  (target >= 0.9)")
    print(f"time per step mixed / all free   {mixed['step_ms'] / free['step_ms']:.3f}x")
    print(f"mask cost per step               {mixed['mask_ms']:.3f} ms for {sum(constrained)} constrained rows "
          f"({100 * mixed['mask_ms'] / mixed['step_ms']:.1f}% of a step)")
    print(f"grammar compile per request      {1e3 * compile_s:.2f} ms (vocabulary view built once: {warm_s:.2f} s)")
    print(f"free requests unchanged by constrained neighbours: {same}")


if __name__ == "__main__":
    main()
