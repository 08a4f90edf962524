"""RL rollouts: our engine against `model.generate` on the PEFT model, same prompts and adapter, in one run;
and the rollout share of a PPO step's wall time.

Workload: the embedded SmolLM2-135M-Instruct with a rank-16 all-linear LoRA
(non-zero, as mid-training), 32 chat prompts, 64 sampled tokens each
(temperature 1, EOS ignored so both produce the same number of tokens).
Our side pushes the adapter from the live PEFT model into the trainer's
rollout engine (no files, no merge) and generates all 32 at once; the
baseline calls `generate` on the PEFT model with the same padded batch.
Then a few PPO steps (rule reward) report rollout seconds against step seconds.

Usage: python bench/train_rl.py [--prompts 32] [--new-tokens 64]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ppo-steps", type=int, default=2)
    args = ap.parse_args()
    from loraplex.trainer.config import parse_config
    from loraplex.trainer.rollout import RolloutEngine
    from loraplex.trainer.sft import load_base_and_tokenizer, lora_model

    tmp = Path(tempfile.mkdtemp(prefix="loraplex-bench-rl-"))
    topics = ["the sea", "a city", "cats", "music", "winter", "trains", "coffee", "stars"]
    data = tmp / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"Write about {topics[i % 8]} ({i})."}]}) + "\n" for i in range(args.prompts)))
    cfg = parse_config({"base_model": "default", "adapter": {"name": "rl-bench", "r": 16, "alpha": 32}, "method": "ppo",
                        "datasets": [str(data)], "reward": {"regex": "the"}, "num_rollouts": args.prompts, "response_length": args.new_tokens,
                        "max_steps": args.ppo_steps, "mini_batch_size": 8, "ppo_epochs": 1, "save_steps": 1000})
    base, tok, _ = load_base_and_tokenizer(cfg, torch.device("cpu"))
    model = lora_model(base, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    model.eval()
    prompts = []
    for line in data.read_text().splitlines():
        text = tok.apply_chat_template(json.loads(line)["prompt"], tokenize=False, add_generation_prompt=True)
        prompts.append(tok(text, add_special_tokens=False)["input_ids"])
    ro = RolloutEngine(model, tok, {tok.eos_token_id})
    try:
        ro.push_policy(model)
        ro.engine.call(lambda: None)
        from loraplex.server.request import OutputStream, Request, SamplingParams

        def ours():
            reqs = [Request(f"b{i}", p, SamplingParams(max_tokens=args.new_tokens, temperature=1.0, seed=i, ignore_eos=True, logprobs=0),
                            adapter=ro.policy, stream=OutputStream()) for i, p in enumerate(prompts)]
            t0 = time.perf_counter()
            for r in reqs:
                ro.engine.submit(r)
            n = 0
            for r in reqs:
                while True:
                    o = r.stream.get(timeout=600)
                    n += len(o.token_ids)
                    if o.finished:
                        break
            return n / (time.perf_counter() - t0)

        ours_warm = ours()  # warm-up (slot fill, allocator)
        ours_tps = ours()
    finally:
        ro.close()
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), tok.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                             do_sample=True, temperature=1.0, top_k=0, pad_token_id=tok.pad_token_id or 0)
        hf_tps = (out.shape[1] - L) * len(prompts) / (time.perf_counter() - t0)
    # rollout share of a PPO step
    from loraplex.trainer.rl import train_rl

    events = []
    train_rl(cfg, tmp / "run", on_event=events.append)
    steps = [e for e in events if e.get("type") == "metrics"]
    share = sum(e["rollout_seconds"] for e in steps) / sum(e["step_seconds"] for e in steps)
    print(f"\nrollouts: {args.prompts} prompts x {args.new_tokens} sampled tokens, SmolLM2-135M + LoRA r=16 all-linear, CPU, {torch.get_num_threads()} threads")
    print(f"{'system':34s} {'tokens/s':>9s}")
    print(f"{'ours (rollout engine, live LoRA)':34s} {ours_tps:9.1f}")
    print(f"{'PEFT model.generate (padded batch)':34s} {hf_tps:9.1f}")
    print(f"\nours / generate: {ours_tps / hf_tps:.2f}x (target >= 2)")
    print(f"PPO step ({args.ppo_steps} steps, response {args.new_tokens}): rollout share of wall time {share:.0%}")


if __name__ == "__main__":
    main()
