"""LoRA ops for the engine: one entry point, a reference and a Triton implementation behind it.

`apply_lora` is what the model code calls. The dispatch picks the Triton
kernels for CUDA tensors and the PyTorch reference everywhere else;
`LORAPLEX_KERNELS=torch` forces the reference and `LORAPLEX_KERNELS=triton`
the kernels (on CPU tensors that needs Triton's interpreter,
`TRITON_INTERPRET=1`, which is how the tests run them without a GPU). Within
the Triton backend the kernel variant (segmented SGMV for prefill-shaped
batches, gathered BGMV for decode-shaped ones) is chosen per batch by
`triton_lora.batch_plan`.
"""
from __future__ import annotations

import os

import torch

from . import cpu_gemm
from .dense import apply_lora_dense, dense_ok
from .reference import apply_lora_batched, apply_lora_segmented, lora_expand_ref, lora_shrink_ref
from .segments import LoraSegments

DENSE_MIN_SEGMENTS = 10  # measured break-even against the fused segmented loop (T=32, 8 slots of r=16)
# fp32, one output slice (every LoraLinear): from this many segments (no-adapter ones included) the
# batched form wins; 8 adapters x 4 decode tokens, 576->1536: 241 us looped, 68 us batched (2 cores)
BATCHED_MIN_SEGMENTS = 4

__all__ = ["LoraSegments", "apply_lora", "cpu_gemm", "lora_shrink", "lora_expand", "backend_for"]


BACKENDS = ("torch", "triton")


def backend_for(t: torch.Tensor) -> str:
    forced = os.environ.get("LORAPLEX_KERNELS", "").strip().lower()
    if forced in BACKENDS:
        return forced
    if forced and forced != "auto":
        raise ValueError(f"LORAPLEX_KERNELS={forced!r}: expected one of {', '.join(BACKENDS)} or auto")
    return "triton" if t.is_cuda else "torch"


def lora_shrink(x, A, seg, scales, ranks):
    if backend_for(x) == "triton":
        from .triton_lora import lora_shrink_triton

        return lora_shrink_triton(x, A, seg, scales, ranks)
    return lora_shrink_ref(x, A, seg, scales, ranks)


def lora_expand(y, buf, B, seg, ranks, offsets):
    if backend_for(y) == "triton":
        from .triton_lora import lora_expand_triton

        return lora_expand_triton(y, buf, B, seg, ranks, offsets)
    return lora_expand_ref(y, buf, B, seg, ranks, offsets)


def apply_lora(y, x, A, B, seg: LoraSegments, scales, ranks, offsets):
    """y += LoRA(x) for every token with an adapter slot; y is updated in place and returned."""
    if not seg.has_lora:
        return y
    backend = backend_for(y)
    fp32 = y.dtype == x.dtype == torch.float32 and all(t.dtype == torch.float32 for t in (*A, *B))
    if backend == "torch" and fp32 and len(A) == 1 and seg.num_segments >= BATCHED_MIN_SEGMENTS:
        # several adapters in the batch: two batched matmuls over all segments beat two BLAS calls per segment
        return apply_lora_batched(y, x, A, B, seg, scales, ranks, offsets)
    if backend == "torch" and seg.num_segments >= DENSE_MIN_SEGMENTS and dense_ok(A, B):
        # many short segments over narrow stacks: one matmul over all slots beats a loop of tiny ones
        return apply_lora_dense(y, x, A, B, seg, scales, ranks, offsets)
    if backend == "torch" and fp32:
        return apply_lora_segmented(y, x, A, B, seg, scales, ranks, offsets)
    buf = lora_shrink(x, A, seg, scales, ranks)
    return lora_expand(y, buf, B, seg, ranks, offsets)
