"""The engine's CPU GEMM for frozen base weights: oneDNN with the weight packed once at load.

`F.linear` on CPU goes to MKL's sgemm. On the AMD EPYC machines we build on,
MKL takes a generic code path, and the decode-shaped products of a serving
step (a few to a few dozen rows against a large weight) reach 3 to 10 GB/s of
weight reads where the memory gives 25 to 30. oneDNN, the library torch
already ships for its own CPU inference paths, JIT-compiles AVX-512 kernels
for whatever CPU it finds and takes a weight reordered once into its blocked
layout. Measured on 2 cores (SmolLM2-135M shapes, weights out of cache):

    576 -> 1536, 8 rows:     MKL 683 us,   oneDNN 233 us
    576 -> 49152, 32 rows:   MKL 34.7 ms,  oneDNN 12.4 ms   (the lm_head)
    576 -> 1536, 2048 rows:  MKL 27.8 ms,  oneDNN 17.5 ms   (a prefill chunk)

Same fp32 arithmetic (results agree to ~1e-6 relative, the summation order
differs). Only the engine's frozen weights are packed: the packed copy is an
opaque oneDNN tensor that autograd cannot use, so training keeps `F.linear`.

`LORAPLEX_CPU_GEMM=torch` switches packing off (`onednn` or `auto`, the
default, keeps it on where `available()` says it works).
"""
from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger("loraplex.kernels")

CHOICES = ("auto", "onednn", "torch")


def _choice() -> str:
    v = os.environ.get("LORAPLEX_CPU_GEMM", "auto").strip().lower() or "auto"
    if v not in CHOICES:
        raise ValueError(f"LORAPLEX_CPU_GEMM={v!r}: expected one of {', '.join(CHOICES)}")
    return v


@functools.lru_cache(maxsize=None)
def _self_check() -> str | None:
    """None when the packed oneDNN linear runs here and matches F.linear; else the reason it cannot be used."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN"
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(48, 40, generator=g)
        b = torch.randn(48, generator=g)
        x = torch.randn(5, 40, generator=g)
        got = packed_linear(x, pack(w), b)
        ref = F.linear(x, w, b)
    except Exception as e:  # an op missing or refusing in this build or on this CPU
        return f"oneDNN linear failed: {type(e).__name__}: {e}"
    err = float((got - ref).abs().max())
    if not err <= 1e-4 * float(ref.abs().max()):
        return f"oneDNN linear disagrees with F.linear (max error {err:.3g})"
    return None


def available(weight: torch.Tensor) -> bool:
    """Whether the engine should pack `weight` (fp32 on CPU, not switched off, and the self-check passed)."""
    choice = _choice()
    if choice == "torch" or weight.device.type != "cpu" or weight.dtype != torch.float32:
        return False
    reason = _self_check()
    if reason is not None:
        if choice == "onednn":
            raise RuntimeError(f"LORAPLEX_CPU_GEMM=onednn, but {reason}")
        log.warning("CPU GEMM: using torch's default (%s)", reason)
        return False
    return True


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A [out, in] fp32 weight reordered for oneDNN (an opaque tensor: only `packed_linear` reads it)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T + b for a weight from `pack`; x is [..., in], the result an ordinary strided tensor."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
