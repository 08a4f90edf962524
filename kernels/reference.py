"""Pure-PyTorch segmented LoRA (the reference every kernel is tested against, and the CPU path).

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


def apply_lora_segmented(
    y: torch.Tensor,
    x: torch.Tensor,
    A: list[torch.Tensor],
    B: list[torch.Tensor],
    seg: LoraSegments,
    scales: torch.Tensor,
    ranks: torch.Tensor,
    offsets: list[int],
) -> torch.Tensor:
    """shrink + expand fused per segment, for fp32 CPU tensors: the engine's CPU execution path.

    Same result as `lora_expand_ref(y, lora_shrink_ref(...))`, with two BLAS
    calls per (segment, slice) and no intermediate buffer: `y_seg.addmm_(x_seg
    A_slot^T, B_slot^T, alpha=scale)`. For a batch of one adapter (an RL
    rollout, a single-tenant burst) that is the whole cost, where the
    shrink/expand pair spends most of its time on bookkeeping.
    """
    ranks_h = ranks.tolist()
    scales_h = scales.tolist()
    starts = seg.seg_starts_host
    for j, slot in enumerate(seg.seg_slots_host):
        a, b = starts[j], starts[j + 1]
        if slot < 0 or a == b:
            continue
        xs = x[a:b]
        for i, (Ai, Bi) in enumerate(zip(A, B)):
            r = ranks_h[i][slot]
            if r == 0:
                continue
            n = Bi.shape[1]
            h = torch.mm(xs, Ai[slot, :r].t())
            y[a:b, offsets[i] : offsets[i] + n].addmm_(h, Bi[slot, :, :r].t(), alpha=scales_h[slot])
    return y


def apply_lora_batched(
    y: torch.Tensor,
    x: torch.Tensor,
    A: list[torch.Tensor],
    B: list[torch.Tensor],
    seg: LoraSegments,
    scales: torch.Tensor,
    ranks: torch.Tensor,
    offsets: list[int],
) -> torch.Tensor:
    """The segmented product as two batched matmuls over all segments at once (fp32 CPU, one output slice).

    Segments are padded to the longest one: `H = X_pad A_segᵀ` then
    `Y_pad = H B_segᵀ`, added back into `y` token by token. A and B are read
    whole (zero rows past a slot's rank add nothing), so the cost is a
    handful of ops whatever the number of adapters in the batch, where the
    per-segment loop pays two BLAS calls per segment. Used for many-adapter
    decode batches; the loop stays faster for one or two segments.
    """
    starts = seg.seg_starts_host
    live = [(j, s) for j, s in enumerate(seg.seg_slots_host) if s >= 0 and starts[j + 1] > starts[j]]
    if not live:
        return y
    slots = [s for _, s in live]
    lens = [starts[j + 1] - starts[j] for j, _ in live]
    n, lmax = len(live), max(lens)
    A0, B0 = A[0], B[0]  # [S, R, in], [S, out, R]
    if slots == list(range(slots[0], slots[0] + n)):  # slots ascending and contiguous: views, no gather
        As, Bs = A0[slots[0] : slots[0] + n], B0[slots[0] : slots[0] + n]
        sc = scales[slots[0] : slots[0] + n]
    else:
        idx = torch.tensor(slots, device=x.device)
        As, Bs, sc = A0.index_select(0, idx), B0.index_select(0, idx), scales.index_select(0, idx)
    # consecutive segments (no no-adapter one in between) of equal length: x and y are plain views
    packed = live[-1][0] - live[0][0] == n - 1 and all(m == lmax for m in lens)
    t0 = starts[live[0][0]]
    if packed:
        xp = x[t0 : t0 + n * lmax].view(n, lmax, -1)
    else:
        tok = torch.tensor([starts[j] + min(i, m - 1) for (j, _), m in zip(live, lens) for i in range(lmax)], device=x.device)
        xp = x.index_select(0, tok).view(n, lmax, -1)
    h = torch.bmm(xp, As.transpose(1, 2)).mul_(sc.view(n, 1, 1))  # [n, lmax, R]
    d = torch.bmm(h, Bs.transpose(1, 2))  # [n, lmax, out]
    out = y[:, offsets[0] : offsets[0] + d.shape[-1]]
    if packed:
        out[t0 : t0 + n * lmax] += d.view(n * lmax, -1)
    else:
        keep = [k * lmax + i for k, m in enumerate(lens) for i in range(m)]
        rows = [starts[j] + i for (j, _), m in zip(live, lens) for i in range(m)]
        out.index_add_(0, torch.tensor(rows, device=x.device), d.view(n * lmax, -1).index_select(0, torch.tensor(keep, device=x.device)))
    return y
