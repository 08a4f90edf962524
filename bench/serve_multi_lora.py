"""Multi-LoRA serving throughput on the embedded default model (CPU), side by side in one run.

Workload: 32 requests, 8 distinct rank-16 adapters over all 7 projection
modules (4 requests each), 64 new tokens each (greedy, EOS ignored so every
system produces exactly the same number of tokens).

Rows:
  ours (8 adapters)          our engine, all 32 requests submitted at once
  ours (no adapter)          the same requests on the base model alone
  PEFT mixed batch           one padded generate() with adapter_names=[...]
  PEFT per adapter           set_adapter + generate per group of 4
  HF generate (base)         transformers generate on the same padded batch

Usage: python bench/serve_multi_lora.py [--requests 32] [--adapters 8] [--new-tokens 64] [--rank 16]
                                        [--device cpu|cuda]
Every system runs on the same device (default: CUDA when present), fp32 on CPU and bf16 on a GPU.
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
from common import drain, off_thread  # noqa: E402

TOPICS = ["the ocean", "a cat", "mountains", "coffee", "the moon", "trains", "a library", "rain", "music", "robots", "winter", "a garden"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_adapters(base_dir: Path, root: Path, n: int, rank: int) -> list[Path]:
    from helpers import make_peft_adapter

    return [make_peft_adapter(base_dir, root / f"a{i}", r=rank, alpha=2 * rank, target_modules=TARGETS, seed=100 + i, init_std=0.01) for i in range(n)]


def prompts_for(tok, n: int, ask: str = "Write a short paragraph about") -> list[list[int]]:
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"{ask} {TOPICS[i % len(TOPICS)]}, number {i}."}]
        out.append(tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), add_special_tokens=False))
    return out


def run_ours(state, prompts, adapters, new_tokens) -> float:
    from loraplex.server.engine.request import SamplingParams

    svc = state.service
    t0 = time.perf_counter()
    reqs = [svc.submit(p, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True), a) for p, a in zip(prompts, adapters)]
    n = drain(reqs)
    dt = time.perf_counter() - t0
    assert n == len(prompts) * new_tokens, n
    return n / dt


def left_pad(prompts, pad_id):
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    return ids, mask


def hf_generate(model, prompts, new_tokens, pad_id, **kw) -> float:
    ids, mask = (t.to(model.device) for t in left_pad(prompts, pad_id))
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id, **kw)
    dt = time.perf_counter() - t0
    assert out.shape[1] - ids.shape[1] == new_tokens
    return len(prompts) * new_tokens / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraplex.adapters_store.base_model import resolve_base_model
    from loraplex.server.runtime import ServeConfig, build_state

    base_dir = resolve_base_model("default")
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    built: dict = {}

    def setup() -> None:
        built["dirs"] = build_adapters(base_dir, tmp / "adapters", args.adapters, args.rank)
        cfg = ServeConfig(model=None, store=tmp / "store", max_loras=args.adapters, max_num_seqs=max(64, args.requests),
                          kv_cache_tokens=65536, device=args.device, dtype=str(dtype).removeprefix("torch."))
        cfg.adapters = {f"a{i}": str(d) for i, d in enumerate(built["dirs"])}
        built["state"] = build_state(cfg)

    # As `loraplex serve` does: the heavy torch work of start-up runs on a thread that ends before
    # serving, so the engine thread's OpenMP team is the only one while we measure (see
    # adapters_store.peft_format.one_intra_op_thread for what a second team costs).
    off_thread(setup)
    dirs, state = built["dirs"], built["state"]
    tok = state.service.tokenizer
    prompts = prompts_for(tok, args.requests)
    names = [f"a{i % args.adapters}" for i in range(args.requests)]
    versions = [state.store.get(n) for n in names]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # warm-up: the same workload once, untimed: every adapter is in a slot and the engine's memory has been
    # touched, as in a running server (PEFT's adapters are loaded before its timing, and it runs after ours in a
    # process we warmed). Its prompts part from the timed ones right after the chat template, so the prefix
    # cache holds no more of the timed prompts than that template.
    run_ours(state, prompts_for(tok, args.requests, ask="Tell me something about"), versions, args.new_tokens)
    rows = {}
    rows["ours (8 adapters)"] = run_ours(state, prompts, versions, args.new_tokens)
    rows["ours (no adapter)"] = run_ours(state, prompts, [None] * len(prompts), args.new_tokens)
    state.engine.shutdown()

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(args.device).eval()
    rows["HF generate (base)"] = hf_generate(base, prompts, args.new_tokens, pad)
    peft = PeftModel.from_pretrained(base, dirs[0], adapter_name="a0")
    for i, d in enumerate(dirs[1:], 1):
        peft.load_adapter(d, adapter_name=f"a{i}")
    peft.eval()
    rows["PEFT mixed batch"] = hf_generate(peft, prompts, args.new_tokens, pad, adapter_names=names)
    t0 = time.perf_counter()
    for i in range(args.adapters):
        idx = [j for j, n in enumerate(names) if n == f"a{i}"]
        peft.set_adapter(f"a{i}")
        hf_generate(peft, [prompts[j] for j in idx], args.new_tokens, pad)
    rows["PEFT per adapter"] = args.requests * args.new_tokens / (time.perf_counter() - t0)

    ours = rows["ours (8 adapters)"]
    print(f"\n{args.requests} requests, {args.adapters} adapters (rank {args.rank}, 7 modules), "
          f"{args.new_tokens} new tokens, "
          f"{args.device}, {torch.get_num_threads()} threads")
    print(f"{'system':28s} {'tokens/s':>10s}")
    for k, v in rows.items():
        print(f"{k:28s} {v:10.1f}")
    print()
    print(f"ours / PEFT mixed batch        {ours / rows['PEFT mixed batch']:.2f}x   (target >= 3)")
    print(f"ours / PEFT per adapter        {ours / rows['PEFT per adapter']:.2f}x   (target >= 2.0)")
    print(f"ours LoRA / ours no adapter    {ours / rows['ours (no adapter)']:.2f}    (target >= 0.85)")
    base_ratio = rows["ours (no adapter)"] / rows["HF generate (base)"]
    print(f"ours base / HF generate base   {base_ratio:.2f}x   (target >= 1.5)")


if __name__ == "__main__":
    main()
