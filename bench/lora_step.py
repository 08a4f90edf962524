"""What LoRA adds to one decode step, measured in CPU time so that a shared machine's load does not decide it.

Builds the engine as `bench/serve_multi_lora.py` does (embedded model, 8 rank-16 adapters on all 7 projections,
32 requests, 4 per adapter), runs the first steps (prefill chunks, then decodes), captures the first prefill
chunk's batch and the last decode step's, and replays each forward pass with the 8-adapter segments and without
them, alternating. Times are the engine
thread's CPU time (`time.thread_time`) with one intra-op thread, minimum over `--reps`; the ratio
no-adapter / 8 adapters is the forward-pass share of `serve_multi_lora.py`'s LoRA / no-adapter ratio.

It also prints the bytes of the adapters' stacks that a decode step reads, against the base model's weights,
and the time of one pass that only reads those stacks (a sum over every stack, same thread, cache evicted
first): what LoRA adds to a decode step can get near that floor, not below it.

Usage: python bench/lora_step.py [--reps 8]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import off_thread  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=8)
    args = ap.parse_args()
    from serve_multi_lora import build_adapters, prompts_for

    from loraplex.adapters_store.base_model import resolve_base_model
    from loraplex.server.engine.request import OutputStream, Request, SamplingParams
    from loraplex.server.runtime import ServeConfig, build_state

    base_dir = resolve_base_model("default")
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-bench-step-"))
    built: dict = {}

    def setup() -> None:
        dirs = build_adapters(base_dir, tmp / "adapters", 8, 16)
        cfg = ServeConfig(model=None, store=tmp / "store", max_loras=8, max_num_seqs=64, kv_cache_tokens=65536)
        cfg.adapters = {f"a{i}": str(d) for i, d in enumerate(dirs)}
        built["state"] = build_state(cfg)

    off_thread(setup)
    state = built["state"]
    eng = state.engine
    eng.shutdown()
    eng._thread = None  # drive the steps on this thread
    for i, p in enumerate(prompts_for(state.service.tokenizer, 32)):
        v = state.store.get(f"a{i % 8}")
        eng.pool.pin(v)
        eng._enqueue(Request(f"r{i}", p, SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True), adapter=v,
                             stream=OutputStream()))
    runner, captured = eng.runner, []
    real = runner.forward

    def capture(batch):
        captured.append(batch)
        return real(batch)

    runner.forward = capture
    for _ in range(8):
        eng._step()
    runner.forward = real
    assert captured[-1].input_ids.shape[0] == 32, "the prompts should be prefilled within 7 steps"
    torch.set_num_threads(1)
    print(f"\n32 sequences over 8 adapters, one thread, CPU time (minimum of {args.reps})")
    print(f"{'step':46s} {'8 adapters ms':>14s} {'no adapter ms':>14s} {'ratio':>7s}")
    for label, lora in (("first prefill chunk", captured[0]), ("decode", captured[-1])):
        base = dataclasses.replace(lora, seg=None)
        times: dict[str, list[float]] = {"lora": [], "base": []}
        for _ in range(args.reps):
            for name, batch in (("lora", lora), ("base", base)):
                t0 = time.thread_time()
                runner.forward(batch)  # rewrites the same KV positions with the same values
                times[name].append(time.thread_time() - t0)
        lo, ba = min(times["lora"]), min(times["base"])
        what = f"{label} ({lora.input_ids.shape[0]} tokens, {lora.seg.num_segments} segments)"
        print(f"{what:46s} {lo * 1e3:14.1f} {ba * 1e3:14.1f} {ba / lo:7.3f}")
    print("ratio: no adapter / 8 adapters, the forward pass's share of serve_multi_lora.py's LoRA / no-adapter ratio")
    read_floor(runner, args.reps)


def read_floor(runner, reps: int) -> None:
    """The LoRA stacks' bytes against the base weights', and the CPU time of one pass that reads every stack."""
    stacks = {}  # a fused group's members' A are views of the group's stack: each tensor counted once
    for m in runner.lora_modules.values():
        for t in (m.A if m.group is None or m.group.A is None else m.group.A, m.Bt):
            stacks[id(t)] = t
    lora_bytes = sum(t.numel() * t.element_size() for t in stacks.values())
    # what a decode step reads of the base: every projection (packed or not) and the LM head
    base_weights = sum(i * o for i, o in runner.module_shapes().values()) + runner.lm_head.weight.numel()
    base_bytes = runner.dtype.itemsize * base_weights
    evict = torch.zeros(512 << 18)  # 512 MiB, written before each pass so the stacks come from memory
    times = []
    for _ in range(reps):
        evict.add_(1.0)
        t0 = time.thread_time()
        for t in stacks.values():
            t.sum()
        times.append(time.thread_time() - t0)
    print(f"\nLoRA stacks read per decode step: {lora_bytes / 1e6:.0f} MB ({lora_bytes / base_bytes:.0%} of the "
          f"base's {base_bytes / 1e6:.0f} MB of weights); one pass reading them: {min(times) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
