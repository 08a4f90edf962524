"""LoRA kernel benchmark (GPU): Triton shrink+expand against the PyTorch reference and a per-adapter matmul loop.

Shapes: hidden 4096 with the projection widths of Llama-2-7B and Llama-3-8B,
ranks 8/16/64, 1/16/64/256 tokens, 1/8/32 distinct adapters (tokens spread
evenly, grouped by adapter). For each: time per call (shrink + expand),
achieved GB/s over the bytes a call must touch (x, y read+write, and the A/B
of the adapters present) against the GPU's peak, and the ratios.

Usage: python bench/kernels.py [--dtype bf16] [--peak-gbs 4800]   (H200: ~4800 GB/s)
Without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import sys

import torch

SHAPES = {
    "llama2-7b": {"q/o": (4096, 4096), "k/v": (4096, 4096), "gate/up": (4096, 11008), "down": (11008, 4096)},
    "llama3-8b": {"q/o": (4096, 4096), "k/v": (4096, 1024), "gate/up": (4096, 14336), "down": (14336, 4096)},
}


def timeit(fn, iters=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e-3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--peak-gbs", type=float, default=4800.0, help="GPU peak memory bandwidth (H200: 4800, H100 SXM: 3350)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA device here; the kernels are tested on CPU through Triton's interpreter "
              "(tests/test_kernels.py) but timings need a GPU.")
        return 0
    from loraplex.kernels import LoraSegments
    from loraplex.kernels.reference import lora_expand_ref, lora_shrink_ref
    from loraplex.kernels.triton_lora import lora_expand_triton, lora_shrink_triton

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    esz = torch.tensor([], dtype=dt).element_size()
    dev = "cuda"
    print(f"GPU: {torch.cuda.get_device_name()}  dtype={args.dtype}  peak={args.peak_gbs:.0f} GB/s")
    print(f"{'model':10s} {'proj':8s} {'rank':>4s} {'tok':>4s} {'adp':>3s} | {'triton us':>9s} {'GB/s':>7s} {'%peak':>6s} | {'ref/tri':>7s} {'loop/tri':>8s}")
    models = ["llama3-8b"] if args.quick else list(SHAPES)
    for model in models:
        for proj, (H, N) in SHAPES[model].items():
            for rank in (8, 16, 64):
                for T in (1, 16, 64, 256):
                    for n_ad in (1, 8, 32):
                        n_ad_eff = min(n_ad, T)
                        S = 32
                        A = [torch.randn(S, rank, H, device=dev, dtype=dt) / H**0.5]
                        Bt = torch.randn(S, rank, N, device=dev, dtype=dt) / rank**0.5
                        B = [Bt.transpose(1, 2)]
                        slots = sorted((i * n_ad_eff) // T for i in range(T))
                        seg = LoraSegments.from_token_slots(slots, dev)
                        ranks = torch.full((1, S), rank, dtype=torch.int32, device=dev)
                        scales = torch.ones(S, device=dev)
                        x = torch.randn(T, H, device=dev, dtype=dt)
                        y = torch.randn(T, N, device=dev, dtype=dt)

                        def tri():
                            lora_expand_triton(y, lora_shrink_triton(x, A, seg, scales, ranks), B, seg, ranks, [0])

                        def ref():
                            lora_expand_ref(y, lora_shrink_ref(x, A, seg, scales, ranks), B, seg, ranks, [0])

                        groups = [(s, torch.tensor([i for i, t in enumerate(slots) if t == s], device=dev)) for s in sorted(set(slots))]

                        def loop():
                            for s, idx in groups:
                                y[idx] += (x[idx] @ A[0][s].T) @ Bt[s]

                        t_tri, t_ref, t_loop = timeit(tri), timeit(ref, 10), timeit(loop)
                        bytes_ = (T * H + 2 * T * N) * esz + n_ad_eff * rank * (H + N) * esz
                        gbs = bytes_ / t_tri / 1e9
                        print(f"{model:10s} {proj:8s} {rank:4d} {T:4d} {n_ad:3d} | {t_tri * 1e6:9.1f} {gbs:7.0f} {100 * gbs / args.peak_gbs:5.1f}% | {t_ref / t_tri:7.2f} {t_loop / t_tri:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
