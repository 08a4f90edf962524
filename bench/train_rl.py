"""RL rollouts: our engine against `model.generate` on the PEFT model, same prompts and adapter, in one run;
and the rollout share of a PPO step's wall time.

Model: the embedded SmolLM2-135M-Instruct with a rank-16 all-linear LoRA
(non-zero, as mid-training). Our side pushes the adapter from the live PEFT
model into the trainer's rollout engine (no files, no merge) and submits all
prompts at once; the baseline calls `generate` on the PEFT model with the same
prompts as one left-padded batch (what TRL does per generation batch).

Two workloads, both sampled at temperature 1:

- `eos`: a rollout as RL runs it. A prompt set with realistic variety (short
  factual questions, one-line tasks, open-ended writing), each response ends
  at EOS or at `--max-new-tokens`. Throughput counts the tokens each system
  actually produced up to and including EOS. `generate` keeps computing a
  padded batch until its longest response ends; continuous batching retires a
  sequence at its EOS, and that is where most of the difference comes from.
- `fixed`: EOS ignored, every prompt samples exactly `--fixed-tokens` tokens,
  so both systems do the same work; this isolates the engine's own efficiency.

Then a few PPO steps (rule reward) report rollout seconds against step seconds.

Usage: python bench/train_rl.py [--prompts 32] [--max-new-tokens 128] [--fixed-tokens 64] [--repeats 2] [--ppo-steps 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

TOPICS = ["the sea", "a city at night", "cats", "jazz", "winter", "trains", "coffee", "the stars"]


def prompt_set(n: int) -> list[str]:
    kinds = [
        lambda i: f"What is {i + 3} plus {2 * i + 1}? Reply with the number only.",
        lambda i: f"Name one colour. ({i})",
        lambda i: f"Write a one-sentence slogan for a shop that sells {TOPICS[i % 8]}.",
        lambda i: f"Write a short paragraph about {TOPICS[i % 8]}.",
    ]
    return [kinds[i % len(kinds)](i) for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--fixed-tokens", type=int, default=64)
    ap.add_argument("--ppo-steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="rounds per workload, alternating the two systems")
    args = ap.parse_args()
    from loraplex.server.engine.request import OutputStream, Request, SamplingParams
    from loraplex.trainer.config import parse_config
    from loraplex.trainer.rollout import RolloutEngine
    from loraplex.trainer.core import load_base_and_tokenizer, lora_model

    tmp = Path(tempfile.mkdtemp(prefix="loraplex-bench-rl-"))
    texts = prompt_set(args.prompts)
    data = tmp / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": t}]}) + "\n" for t in texts))
    cfg = parse_config({"base_model": "default", "adapter": {"name": "rl-bench", "r": 16, "alpha": 32}, "method": "ppo",
                        "datasets": [str(data)], "reward": {"regex": "the"}, "num_rollouts": args.prompts,
                        "response_length": args.fixed_tokens, "max_steps": args.ppo_steps, "mini_batch_size": 8,
                        "ppo_epochs": 1, "save_steps": 1000})
    base, tok, _ = load_base_and_tokenizer(cfg, torch.device("cpu"))
    model = lora_model(base, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.002)
    model.eval()
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"] for t in texts]

    ro = RolloutEngine(model, tok, {eos})

    def ours(max_tokens: int, ignore_eos: bool, rep: int = 0) -> tuple[float, list[int]]:
        reqs = [Request(f"b{i}", p, SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=1000 * rep + i, ignore_eos=ignore_eos, logprobs=0),
                        adapter=ro.policy, stream=OutputStream()) for i, p in enumerate(prompts)]
        t0 = time.perf_counter()
        for r in reqs:
            ro.engine.submit(r)
        ro.engine.run_until_idle()  # as the trainer does: the engine runs on the caller's thread
        lens = []
        for r in reqs:
            n = 0
            while True:
                o = r.stream.get_nowait()
                n += len(o.token_ids)
                if o.finished:
                    break
            lens.append(n)
        return time.perf_counter() - t0, lens

    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1

    def hf(max_tokens: int, ignore_eos: bool, rep: int = 0) -> tuple[float, list[int]]:
        kw = {"min_new_tokens": max_tokens} if ignore_eos else {}
        torch.manual_seed(rep)
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, pad_token_id=pad, eos_token_id=eos, **kw)
            dt = time.perf_counter() - t0
        lens = []
        for row in out[:, L:].tolist():
            n = len(row) if ignore_eos or eos not in row else row.index(eos) + 1
            lens.append(n)
        return dt, lens

    try:
        ro.push_policy(model)
        ours(8, True)  # warm-up: slot fill, allocator
        hf(8, True)
        results = {}
        for name, max_tokens, ignore in (("eos", args.max_new_tokens, False), ("fixed", args.fixed_tokens, True)):
            o_dt = h_dt = 0.0
            o_lens, h_lens = [], []
            for rep in range(args.repeats):  # alternate, so drift in machine load hits both alike
                dt, lens = ours(max_tokens, ignore, rep)
                o_dt, o_lens = o_dt + dt, o_lens + lens
                dt, lens = hf(max_tokens, ignore, rep)
                h_dt, h_lens = h_dt + dt, h_lens + lens
            results[name] = (sum(o_lens) / o_dt, o_lens, sum(h_lens) / h_dt, h_lens)
    finally:
        ro.close()

    from loraplex.trainer.rl import train_rl

    events = []
    train_rl(cfg, tmp / "run", on_event=events.append)
    steps = [e for e in events if e.get("type") == "metrics"]
    share = sum(e["rollout_seconds"] for e in steps) / sum(e["step_seconds"] for e in steps)

    print(f"\nrollouts of {args.prompts} prompts x {args.repeats} rounds per system, SmolLM2-135M-Instruct + LoRA r=16 all-linear, CPU, {torch.get_num_threads()} threads")
    print(f"{'workload':10s} {'system':36s} {'tokens/s':>9s} {'mean len':>9s} {'max len':>8s}")
    for name, (o_tps, o_lens, h_tps, h_lens) in results.items():
        print(f"{name:10s} {'ours (rollout engine, live LoRA)':36s} {o_tps:9.1f} {statistics.mean(o_lens):9.1f} {max(o_lens):8d}")
        print(f"{name:10s} {'PEFT model.generate (padded batch)':36s} {h_tps:9.1f} {statistics.mean(h_lens):9.1f} {max(h_lens):8d}")
    for name, (o_tps, _, h_tps, _) in results.items():
        print(f"{name}: ours / generate {o_tps / h_tps:.2f}x" + (" (target >= 2)" if name == "eos" else " (same work, engine efficiency)"))
    print(f"PPO ({args.ppo_steps} steps, response {args.fixed_tokens}, {args.prompts} rollouts): rollout share of step wall time {share:.0%}")


if __name__ == "__main__":
    main()
