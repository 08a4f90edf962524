"""Pure-PyTorch segmented LoRA: the reference every kernel and fast path is tested against.

Shapes, for one LoRA-wrapped projection group with `L` output slices
(L == 1 for a plain projection, 3 for fused q/k/v, 2 for fused gate/up):

    x:       [T, H_in]              the layer input, flattened batch
    A[i]:    [S, R, H_in]           stacked lora_A of slice i, one row block per slot
    B[i]:    [S, N_i, R]            stacked lora_B of slice i
    scales:  [S]   fp32             alpha / r (or alpha / sqrt(r)) per slot
    ranks:   [L, S] int32           true rank of each slot in each slice; 0 = slot not active there
    buf:     [L, T, R] fp32         shrink output
    y:       [T, sum(N_i)]          base layer output, updated in place by expand

Mixed ranks: slot s only uses A[i][s, :ranks[i, s]] (rows beyond are zero
padding up to the pool's max rank and are never read here).

Written for clarity, one segment and slice at a time, accumulating in fp32.
The engine runs it for what the fast paths do not take (16-bit weights on
CPU, several slices); the CPU fast paths live in `cpu_lora.py`, the GPU
kernels in `triton_lora.py`.
"""
from __future__ import annotations

import torch

from .segments import LoraSegments


def lora_shrink_ref(
    x: torch.Tensor,
    A: list[torch.Tensor],
    seg: LoraSegments,
    scales: torch.Tensor,
    ranks: torch.Tensor,
) -> torch.Tensor:
    """buf[i, t, :r] = scale[slot(t)] * x[t] @ A[i][slot(t), :r].T, accumulated in fp32."""
    T = x.shape[0]
    R = A[0].shape[1]
    buf = torch.zeros((len(A), T, R), dtype=torch.float32, device=x.device)
    ranks_h = ranks.tolist()
    scales_h = scales.tolist()
    starts = seg.seg_starts_host
    for j, slot in enumerate(seg.seg_slots_host):
        if slot < 0:
            continue
        a, b = starts[j], starts[j + 1]
        if a == b:
            continue
        xs = x[a:b].float()
        for i, Ai in enumerate(A):
            r = ranks_h[i][slot]
            if r == 0:
                continue
            buf[i, a:b, :r] = (xs @ Ai[slot, :r].float().T) * scales_h[slot]
    return buf


def lora_expand_ref(
    y: torch.Tensor,
    buf: torch.Tensor,
    B: list[torch.Tensor],
    seg: LoraSegments,
    ranks: torch.Tensor,
    offsets: list[int],
) -> torch.Tensor:
    """y[t, off_i:off_i+N_i] += buf[i, t, :r] @ B[i][slot(t), :, :r].T, in place; returns y."""
    ranks_h = ranks.tolist()
    starts = seg.seg_starts_host
    for j, slot in enumerate(seg.seg_slots_host):
        if slot < 0:
            continue
        a, b = starts[j], starts[j + 1]
        if a == b:
            continue
        for i, Bi in enumerate(B):
            r = ranks_h[i][slot]
            if r == 0:
                continue
            n = Bi.shape[1]
            delta = buf[i, a:b, :r] @ Bi[slot, :, :r].float().T
            y[a:b, offsets[i]:offsets[i] + n] += delta.to(y.dtype)
    return y
