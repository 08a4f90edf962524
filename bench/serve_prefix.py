"""Prefix caching on SaaS-shaped traffic (embedded model, CPU): time to first token with the cache on and off.

Workload: 32 chat requests over 4 rank-16 adapters (all 7 projections); every adapter has its own ~400-token
system prompt and each request adds a short user turn; 16 new tokens each (greedy, EOS ignored). All requests
arrive at once on a cold cache, so the first request of each adapter computes its system prompt and the
ones admitted after it reuse it. Both engines are built the same way (`ServeConfig`, as `loraplex serve`
does) except `prefix_caching`, and run the same requests, alternating, `--rounds` times each.

Usage: python bench/serve_prefix.py [--requests 32] [--adapters 4] [--new-tokens 16] [--rounds 2] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import drain, off_thread  # noqa: E402

PRODUCTS = ["a billing platform", "a travel agency", "a hospital's patient portal", "an online bookstore"]
RULES = [
    "Always greet the customer politely and use their name when it is known.",
    "Never reveal internal tooling, prices that are not public, or other customers' data.",
    "When a request is ambiguous, ask exactly one clarifying question before answering.",
    "Answer in at most three short paragraphs, and end with a concrete next step.",
    "If the customer is upset, acknowledge the problem before proposing a solution.",
    "Refer legal, medical or safety questions to a human agent and say so plainly.",
    "Quote order numbers, dates and amounts exactly as they appear in the conversation.",
    "Do not promise refunds, discounts or delivery dates that policy does not allow.",
]
QUESTIONS = ["Where is my order?", "Can I change my booking to Friday?", "How do I reset my password?",
             "Why was I charged twice?", "Do you ship to Canada?", "What is your refund policy?",
             "I need to talk to a person.", "Can you explain this invoice line?"]


def system_prompt(tok, i: int, target: int = 400) -> str:
    text = f"You are the support assistant of {PRODUCTS[i % len(PRODUCTS)]} (team {i}). Follow these rules.\n"
    k = 0
    while len(tok.encode(text, add_special_tokens=False)) < target:
        text += f"Rule {k + 1}: {RULES[(k + i) % len(RULES)]}\n"
        k += 1
    return text


def requests_for(tok, n: int, adapters: int) -> list[tuple[str, list[int]]]:
    systems = [system_prompt(tok, i) for i in range(adapters)]
    out = []
    for j in range(n):
        a = j % adapters
        msgs = [{"role": "system", "content": systems[a]}, {"role": "user", "content": f"{QUESTIONS[j % len(QUESTIONS)]} (ticket {j})"}]
        ids = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
        out.append((f"a{a}", ids))
    return out


def run(state, reqs, new_tokens) -> dict:
    from loraplex.server.engine.request import SamplingParams

    svc = state.service
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    eng = state.engine
    q0, h0 = eng.prefix_queried, eng.prefix_hits
    t0 = time.perf_counter()
    submitted = [svc.submit(ids, params, state.store.get(name)) for name, ids in reqs]
    n = drain(submitted, timeout=1200)
    wall = time.perf_counter() - t0
    assert n == len(reqs) * new_tokens, n
    ttft = sorted(r.first_token_at - r.arrival for r in submitted)
    q, h = eng.prefix_queried - q0, eng.prefix_hits - h0
    return {"ttft_p50": statistics.median(ttft), "ttft_p90": ttft[int(0.9 * (len(ttft) - 1))],
            "tokens_per_s": n / wall, "wall": wall, "hit_rate": h / q if q else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    from serve_multi_lora import build_adapters

    from loraplex.adapters_store.base_model import resolve_base_model
    from loraplex.server.runtime import ServeConfig, build_state

    base_dir = resolve_base_model("default")
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-bench-prefix-"))
    states: dict = {}

    def setup() -> None:  # on a thread that ends before measuring, as `loraplex serve` loads (see serve_multi_lora.py)
        dirs = build_adapters(base_dir, tmp / "adapters", args.adapters, 16)
        for on in (True, False):
            cfg = ServeConfig(model=None, store=tmp / f"store-{on}", max_loras=args.adapters, max_num_seqs=64,
                              kv_cache_tokens=65536, prefix_caching=on, device=args.device)
            cfg.adapters = {f"a{i}": str(d) for i, d in enumerate(dirs)}
            states[on] = build_state(cfg)

    off_thread(setup)
    tok = states[True].service.tokenizer
    reqs = requests_for(tok, args.requests, args.adapters)
    prompt_len = statistics.mean(len(ids) for _, ids in reqs)
    for on in (True, False):  # warm-up on other text: nothing of the measured prompts gets cached
        run(states[on], [(name, ids[-12:]) for name, ids in reqs[: args.adapters]], 2)
    results: dict[bool, list[dict]] = {True: [], False: []}
    for rnd in range(args.rounds):
        for on in (False, True) if rnd % 2 == 0 else (True, False):
            if on:
                states[on].engine.call(lambda s=states[on]: s.engine.runner.kv.enable_prefix_caching())  # cold cache
            results[on].append(run(states[on], reqs, args.new_tokens))
    for s in states.values():
        s.engine.shutdown()

    def med(on, key):
        return statistics.median(r[key] for r in results[on])

    print(f"\n{args.requests} requests over {args.adapters} adapters, prompts {prompt_len:.0f} tokens on average "
          f"(system prompt ~400 per adapter), {args.new_tokens} new tokens, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds")
    print(f"{'prefix cache':14s} {'TTFT p50 s':>11s} {'TTFT p90 s':>11s} {'tokens/s':>9s} {'hit rate':>9s}")
    for on in (True, False):
        print(f"{'on' if on else 'off':14s} {med(on, 'ttft_p50'):11.3f} {med(on, 'ttft_p90'):11.3f} "
              f"{med(on, 'tokens_per_s'):9.1f} {med(on, 'hit_rate'):9.2f}")
    print()
    print(f"TTFT p50 on / off       {med(True, 'ttft_p50') / med(False, 'ttft_p50'):.2f}   (target <= 0.35)")
    print(f"throughput on / off     {med(True, 'tokens_per_s') / med(False, 'tokens_per_s'):.2f}x")


if __name__ == "__main__":
    main()
