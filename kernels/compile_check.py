"""Compiles every Triton LoRA kernel configuration for a GPU architecture, on a machine without a GPU.

Triton's CPU interpreter runs the kernels' arithmetic but not the GPU
compiler, so constraints such as `tl.dot` tile sizes or pointer types only
show up on a GPU. This builds the launches the wrappers make for 7B-like
shapes (both variants, split-K or not, one and three slices, each dtype) and
compiles them to a cubin with the ptxas that ships with Triton.

    python -m loraplex.kernels.compile_check [--arch 90]

It needs the real (not interpreted) Triton JIT: run it without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64"}
SHARED_MEMORY_LIMIT = 227 * 1024  # per block on sm_90


def representative_launches(sm_count: int = 132):
    from . import LoraSegments
    from . import triton_lora as TL

    launches = []
    # long prefill (no split-K), short prefill (split-K), decode (BGMV), short segments (SGMV, BLOCK_M 16)
    batches = ([0] * 1024 + [1] * 1024, [0] * 100 + [1] * 5 + [-1] * 3, [0, 1, 2, 1, -1], [0] * 4 + [2] * 4)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for outs in ([4096, 1024, 1024], [14336]):
            H, S, R = 4096, 3, 64
            A = [torch.empty(S, R, H, dtype=dtype)] * len(outs)
            B = [torch.empty(S, R, n, dtype=dtype).transpose(1, 2) for n in outs]
            ranks = torch.full((len(outs), S), R, dtype=torch.int32)
            scales = torch.ones(S)
            offsets = [sum(outs[:i]) for i in range(len(outs))]
            for slots in batches:
                seg = LoraSegments.from_token_slots(slots)
                x = torch.empty(len(slots), H, dtype=dtype)
                y = torch.empty(len(slots), sum(outs), dtype=dtype)
                buf = torch.zeros(len(outs), len(slots), R)
                launches += TL.shrink_launches(x, A, seg, scales, ranks, buf, sm_count=sm_count)
                launches += TL.expand_launches(y, buf, B, seg, ranks, offsets)
    return launches


def _signature(fn, args, meta) -> dict[str, str]:
    sig = {}
    for name, v in zip(fn.arg_names, args):
        if isinstance(v, torch.Tensor):
            sig[name] = "*" + DTYPES[v.dtype]
        else:
            sig[name] = "i32" if -(2**31) <= int(v) < 2**31 else "i64"
    sig.update({name: "constexpr" for name in meta})
    return sig


def compile_all(arch: int = 90) -> list[tuple[str, dict, int]]:
    """Compiles each distinct launch configuration; returns (kernel, meta, shared memory bytes) per compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    seen, out = set(), []
    for launch in representative_launches():
        fn = launch.kernel
        sig = _signature(fn, launch.args, launch.meta)
        key = (fn.__name__, tuple(sig.items()), tuple(launch.meta.items()))
        if key in seen:
            continue
        seen.add(key)
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=launch.meta), target=GPUTarget("cuda", arch, 32))
        out.append((fn.__name__, dict(launch.meta, dtype=sig[fn.arg_names[0]]), compiled.metadata.shared))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an integer (90: H100/H200)")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET; the interpreter does not compile", file=sys.stderr)
        return 2
    results = compile_all(args.arch)
    bad = 0
    for name, meta, shared in results:
        ok = shared <= SHARED_MEMORY_LIMIT
        bad += not ok
        print(f"{'ok ' if ok else 'BIG'} sm_{args.arch} {name:14s} shared={shared:6d}  {meta}")
    print(f"compiled {len(results)} kernel configurations for sm_{args.arch}; {bad} over the shared-memory limit")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
