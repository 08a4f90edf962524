"""LoRA ops for the engine: one backend chosen once, a plan per step, a product per module.

`select_backend(device)` is called once, when the model runner is built, and
returns the backend every LoRA module of that runner uses:

- `TorchBackend` (CPU tensors): the fast paths of `cpu_lora.py` for fp32
  (a lone `LoraLinear`, or a fused `LoraGroup`: one shrink for q/k/v, one
  for gate/up), the reference of `reference.py` for the rest;
- `TritonBackend` (CUDA tensors): the kernels of `triton_lora.py`, whose
  variant (segmented SGMV for prefill-shaped batches, gathered BGMV for
  decode-shaped ones) follows from the step's segments.

`LORAPLEX_KERNELS=torch|triton|auto` (read at selection, never per call)
forces a backend; `triton` on CPU tensors needs Triton's interpreter
(`TRITON_INTERPRET=1`), which is how the tests run the kernels without a GPU.

Per step the runner calls `backend.plan(seg)` once; every module then calls
`backend.apply_module(plan, ...)` (a fused group `apply_group`), so nothing
that depends only on the token -> slot mapping is recomputed per module.
`backend.apply(plan, y, x, A, B, ...)` is the multi-slice form the kernel
tests drive.
"""
from __future__ import annotations

import os

import torch

from . import cpu_gemm, cpu_lora
from .reference import lora_expand_ref, lora_shrink_ref
from .segments import LoraSegments

__all__ = ["LoraSegments", "TorchBackend", "TritonBackend", "cpu_gemm", "select_backend", "BACKENDS"]

BACKENDS = ("torch", "triton")


class TorchBackend:
    """CPU: fast paths for fp32 products (a lone module or a fused group), the reference otherwise."""

    name = "torch"
    fuses_groups = True  # runs a LoraGroup's adapters as one shrink (apply_group)

    def plan(self, seg: LoraSegments) -> tuple[LoraSegments, cpu_lora.CpuLoraPlan]:
        return seg, cpu_lora.CpuLoraPlan(seg, seg.seg_starts.device)

    @staticmethod
    def touches(plan, ranks_host: list[int]) -> bool:
        return plan[1].touches(ranks_host)

    def apply(self, plan, y, x, A: list, B: list, scales, ranks, offsets) -> torch.Tensor:
        """y += LoRA(x) per adapter segment, in place; shapes as in `reference.py` (B[i]: [S, N_i, R])."""
        return lora_expand_ref(y, lora_shrink_ref(x, A, plan[0], scales, ranks), B, plan[0], ranks, offsets)

    def apply_module(self, plan, m, y, x) -> torch.Tensor:
        """One LoraLinear's adapters added to its base output y (the fast path for fp32, else the reference)."""
        if y.dtype == x.dtype == m.A.dtype == torch.float32 and y.is_contiguous():
            cpu_lora.apply(plan[1], x, m.A, m.scale_cols, [(y, m.Bt, 0, m.width, m.scales_host)])
            return y
        return self.apply(plan, y, x, [m.A], [m.Bt.transpose(1, 2)], m.scales, m.ranks, [0])

    def apply_group(self, plan, group, outs, x) -> None:
        """A fused LoraGroup (fp32, CPU): one shrink over the group's A stack, an expand per member in `outs`
        ([(its column block of the group's output, member)])."""
        cpu_lora.apply(plan[1], x, group.A, group.scale_cols,
                       [(y, m.Bt, m.col0, m.width, m.scales_host) for y, m in outs])


class TritonBackend:
    """CUDA (or Triton's interpreter): shrink and expand kernels, every slice in one launch."""

    name = "triton"
    fuses_groups = False  # each projection launches its own kernels

    def __init__(self) -> None:
        from . import triton_lora

        self._tl = triton_lora

    def plan(self, seg: LoraSegments):
        self._tl.batch_plan(seg, seg.seg_starts.device)  # the work lists, cached on `seg` for every module
        return seg

    @staticmethod
    def touches(seg: LoraSegments, ranks_host: list[int]) -> bool:
        return any(ranks_host[s] for s in seg.seg_slots_host if s >= 0)

    def apply(self, seg, y, x, A: list, B: list, scales, ranks, offsets) -> torch.Tensor:
        buf = self._tl.lora_shrink_triton(x, A, seg, scales, ranks)
        return self._tl.lora_expand_triton(y, buf, B, seg, ranks, offsets)

    def apply_module(self, seg, m, y, x) -> torch.Tensor:
        return self.apply(seg, y, x, [m.A], [m.Bt.transpose(1, 2)], m.scales, m.ranks, [0])


def select_backend(device: torch.device | str, choice: str | None = None):
    """The LoRA backend for tensors on `device`: `choice`, else `LORAPLEX_KERNELS`, else by device type."""
    forced = (choice if choice is not None else os.environ.get("LORAPLEX_KERNELS", "")).strip().lower()
    if forced and forced != "auto" and forced not in BACKENDS:
        raise ValueError(f"LORAPLEX_KERNELS={forced!r}: expected one of {', '.join(BACKENDS)} or auto")
    name = forced if forced in BACKENDS else ("triton" if torch.device(device).type == "cuda" else "torch")
    return TritonBackend() if name == "triton" else TorchBackend()
