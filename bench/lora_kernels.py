"""LoRA kernel benchmark (GPU): Triton shrink+expand against the PyTorch reference, a per-adapter matmul loop
and the base projection alone, measured side by side in one run.

Shapes: hidden 4096 with the projections of Llama-2-7B and Llama-3-8B as the
engine would call them (fused q/k/v as one 3-slice call, o, fused gate/up as
one 2-slice call, down), ranks 8/16/64, batches of 1/16/64/256 tokens spread
evenly over 1/8/32 distinct adapters (a pool of 32 resident slots). Layout
`grouped`: the tokens of an adapter are contiguous (prefill, or a scheduler
that sorts by adapter); `interleaved`: adapters alternate token by token
(decode without sorting: one-token segments, the gathered kernels).

Columns: time per call (shrink + expand), achieved GB/s over the bytes a call
must touch (x; y read and written; A and B of the adapters present) and that
as % of the GPU's peak memory bandwidth, then time ratios: reference / triton,
per-adapter loop / triton, triton / base projection (what LoRA adds to the
layer). The last lines check the issue's goals: decode-shaped calls (one
token per request, 64+ tokens so the weights dominate) at >= 50% of peak
bandwidth, and >= 3x the loop with 32 adapters.

Usage: python bench/lora_kernels.py [--dtype bf16] [--layout grouped|interleaved] [--quick] [--peak-gbs N]
Without CUDA it says so, runs a tiny correctness pass through Triton's CPU
interpreter, and exits 0.

(Not named kernels.py: a benchmark runs with bench/ first on sys.path, and bitsandbytes imports a
package named `kernels`, which would then be this script.)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

HIDDEN = 4096
# per model: projection -> output widths of its slices (one call covers all slices)
PROJECTIONS = {
    "llama2-7b": {"qkv": [4096, 4096, 4096], "o": [4096], "gate_up": [11008, 11008], "down": [4096]},
    "llama3-8b": {"qkv": [4096, 1024, 1024], "o": [4096], "gate_up": [14336, 14336], "down": [4096]},
}
INPUT_WIDTH = {"llama2-7b": {"down": 11008}, "llama3-8b": {"down": 14336}}
RANKS = (8, 16, 64)
TOKENS = (1, 16, 64, 256)
ADAPTERS = (1, 8, 32)
SLOTS = 32
# peak HBM bandwidth in GB/s by device-name fragment (first match wins); --peak-gbs overrides
PEAK_GBS = [("H200", 4800), ("H100 PCIe", 2000), ("H100", 3350), ("GH200", 4000), ("B200", 8000), ("A100-SXM4-80GB", 2039),
            ("A100 80GB PCIe", 1935), ("A100", 1555), ("L40S", 864), ("L4", 300), ("A10", 600), ("4090", 1008), ("3090", 936)]


def peak_for(name: str) -> float | None:
    return next((gbs for frag, gbs in PEAK_GBS if frag in name), None)


def timeit(fn, iters: int) -> float:
    """Seconds per call, CUDA events around `iters` back-to-back calls after a warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e-3


def token_slots(T: int, n_adapters: int, layout: str) -> list[int]:
    n = min(n_adapters, T)
    if layout == "interleaved":
        return [i % n for i in range(T)]
    return [(i * n) // T for i in range(T)]


def bench_one(model, proj, rank, T, n_adapters, layout, dt, dev):
    from loraplex.kernels import LoraSegments
    from loraplex.kernels.reference import lora_expand_ref, lora_shrink_ref
    from loraplex.kernels.triton_lora import lora_expand_triton, lora_shrink_triton

    outs = PROJECTIONS[model][proj]
    H = INPUT_WIDTH[model].get(proj, HIDDEN)
    N = sum(outs)
    A = [torch.randn(SLOTS, rank, H, device=dev, dtype=dt) / H**0.5 for _ in outs]
    Bt = [torch.randn(SLOTS, rank, n, device=dev, dtype=dt) / rank**0.5 for n in outs]  # stored as the engine does
    B = [b.transpose(1, 2) for b in Bt]
    offsets = [sum(outs[:i]) for i in range(len(outs))]
    slots = token_slots(T, n_adapters, layout)
    seg = LoraSegments.from_token_slots(slots, dev)
    ranks = torch.full((len(outs), SLOTS), rank, dtype=torch.int32, device=dev)
    scales = torch.full((SLOTS,), 2.0, device=dev)
    x = torch.randn(T, H, device=dev, dtype=dt)
    y = torch.randn(T, N, device=dev, dtype=dt)
    W = torch.randn(N, H, device=dev, dtype=dt) / H**0.5

    def triton_call():
        lora_expand_triton(y, lora_shrink_triton(x, A, seg, scales, ranks), B, seg, ranks, offsets)

    def reference_call():
        lora_expand_ref(y, lora_shrink_ref(x, A, seg, scales, ranks), B, seg, ranks, offsets)

    groups = []
    for s in sorted(set(slots)):
        rows = [i for i, t in enumerate(slots) if t == s]
        contiguous = rows == list(range(rows[0], rows[-1] + 1))
        groups.append((s, slice(rows[0], rows[-1] + 1) if contiguous else torch.tensor(rows, device=dev)))

    def loop_call():
        for s, rows in groups:
            xs = x[rows]
            for i, off in enumerate(offsets):
                y[rows, off:off + outs[i]] += ((xs @ A[i][s].T) * 2.0) @ Bt[i][s]

    def base_call():
        torch.matmul(x, W.T)

    # the kernels must agree with the reference before their time means anything
    y0 = y.clone()
    triton_call()
    y_tri = y.clone()
    y.copy_(y0)
    reference_call()
    tol = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dt]
    agrees = torch.allclose(y_tri.float(), y.float(), atol=tol, rtol=tol)

    t_tri = timeit(triton_call, 50)
    t_ref = timeit(reference_call, 5)
    t_loop = timeit(loop_call, 10)
    t_base = timeit(base_call, 50)
    esz = x.element_size()
    present = len(set(slots))
    moved = (T * H + 2 * T * N) * esz + present * rank * (H * len(outs) + N) * esz
    return t_tri, moved / t_tri / 1e9, t_ref / t_tri, t_loop / t_tri, t_tri / t_base, agrees


def cpu_sanity() -> int:
    """No GPU: a tiny mixed-adapter batch through the kernels in Triton's interpreter, against the reference."""
    os.environ["TRITON_INTERPRET"] = "1"  # before triton_lora is imported
    from loraplex.kernels import LoraSegments
    from loraplex.kernels.reference import lora_expand_ref, lora_shrink_ref
    from loraplex.kernels.triton_lora import lora_expand_triton, lora_shrink_triton

    torch.manual_seed(0)
    S, R, H, outs = 4, 32, 96, [64, 16, 16]
    slots = [0] * 9 + [-1] * 2 + [3] * 5 + [1, 2, 1]
    A = [torch.randn(S, R, H) / H**0.5 for _ in outs]
    B = [torch.randn(S, R, n).transpose(1, 2) / R**0.5 for n in outs]
    ranks = torch.tensor([[8, 32, 16, 5]] * 3, dtype=torch.int32)
    scales = torch.rand(S) + 0.5
    x, y = torch.randn(len(slots), H), torch.randn(len(slots), sum(outs))
    seg = LoraSegments.from_token_slots(slots)
    offsets = [0, 64, 80]
    ref = lora_expand_ref(y.clone(), lora_shrink_ref(x, A, seg, scales, ranks), B, seg, ranks, offsets)
    got = lora_expand_triton(y.clone(), lora_shrink_triton(x, A, seg, scales, ranks), B, seg, ranks, offsets)
    err = (got - ref).abs().max().item()
    print(f"CPU sanity pass (Triton interpreter, {len(slots)} tokens, 4 adapters, 3 slices): max |triton - reference| = {err:.2e}")
    return 0 if err < 1e-4 else 1


def main() -> int:
    ap = argparse.ArgumentParser(description="Triton LoRA kernels vs reference / per-adapter loop / base projection")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--layout", default="grouped", choices=["grouped", "interleaved"])
    ap.add_argument("--peak-gbs", type=float, default=None, help="GPU peak memory bandwidth in GB/s (default: by device name)")
    ap.add_argument("--quick", action="store_true", help="llama3-8b only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/lora_kernels.py: no CUDA device on this machine, so no timings (they need a GPU).")
        return cpu_sanity()

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    name = torch.cuda.get_device_name()
    peak = args.peak_gbs or peak_for(name)
    print(f"GPU: {name}  torch {torch.__version__}  dtype={args.dtype}  layout={args.layout}  "
          f"peak={'%.0f GB/s' % peak if peak else 'unknown (pass --peak-gbs)'}  pool={SLOTS} slots")
    print(f"{'model':10s} {'proj':8s} {'rank':>4s} {'tok':>4s} {'adp':>3s} | {'triton us':>9s} {'GB/s':>7s} {'%peak':>6s} | "
          f"{'ref/tri':>7s} {'loop/tri':>8s} {'tri/base':>8s}  check")
    decode_pct, loop32, mismatches = [], [], 0
    models = ["llama3-8b"] if args.quick else list(PROJECTIONS)
    for model in models:
        for proj in PROJECTIONS[model]:
            for rank in RANKS:
                for T in TOKENS:
                    for n_ad in ADAPTERS:
                        t, gbs, r_ref, r_loop, r_base, agrees = bench_one(model, proj, rank, T, n_ad, args.layout, dt, "cuda")
                        pct = 100 * gbs / peak if peak else float("nan")
                        print(f"{model:10s} {proj:8s} {rank:4d} {T:4d} {n_ad:3d} | {t * 1e6:9.1f} {gbs:7.0f} {pct:5.1f}% | "
                              f"{r_ref:7.2f} {r_loop:8.2f} {r_base:8.2f}  {'ok' if agrees else 'MISMATCH'}", flush=True)
                        mismatches += not agrees
                        if T >= 64 and n_ad > 1:
                            decode_pct.append(pct)
                        if n_ad == 32 and T >= 32:
                            loop32.append(r_loop)
    if peak and decode_pct:
        print(f"decode-shaped calls (64+ tokens over 8-32 adapters): median {statistics.median(decode_pct):.1f}% of peak "
              f"bandwidth, min {min(decode_pct):.1f}% (goal: >= 50%)")
    if loop32:
        print(f"32 adapters: median {statistics.median(loop32):.2f}x the per-adapter loop, min {min(loop32):.2f}x (goal: >= 3x)")
    if mismatches:
        print(f"{mismatches} configurations where the kernels disagree with the reference")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
