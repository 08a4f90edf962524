"""Dense-over-slots LoRA in PyTorch: the fast CPU path when slots x rank is small.

Instead of one matmul per segment, shrink multiplies the whole batch by
every slot's A at once (`x @ A.view(S*R, H_in)^T`, a free view of the stacked
weights), keeps each token's own slot block (a mask, which also drops
no-adapter tokens and zero-padded ranks), and expand multiplies by every
slot's B at once. The work grows with S*R, so the dispatch uses it only when
the stacks are narrow (decode-heavy batches of many small adapters, where the
per-segment loop is dominated by call overhead) and the segmented reference
otherwise. Measured on 2 CPU cores (T=32 tokens, 8 slots of rank 16,
576 -> 1536): 275 us against 376 us per projection for the shrink/expand
reference loop; the fused segmented loop (`reference.apply_lora_segmented`)
takes 40 / 108 / 189 us for 1 / 4 / 8 segments against a flat ~220 us here,
hence the dispatch's threshold of ten segments.

Requires B's transposed view `B.transpose(1, 2)` ([S, R, N]) to be contiguous,
i.e. B stored as [S, R, N] and passed as its transposed view; the engine's
LoRA layer stores it that way. Same signature and semantics as
`reference.lora_shrink_ref` / `lora_expand_ref`.
"""
from __future__ import annotations

import torch

from .segments import LoraSegments

MAX_DENSE_WIDTH = 512  # S * R above which the segmented loop wins


def dense_ok(A: list[torch.Tensor], B: list[torch.Tensor]) -> bool:
    S, R = A[0].shape[0], A[0].shape[1]
    return S * R <= MAX_DENSE_WIDTH and all(a.is_contiguous() for a in A) and all(b.transpose(1, 2).is_contiguous() for b in B)


def _onehot(seg: LoraSegments, S: int, device) -> torch.Tensor:
    # [T, S] fp32, 1 where the token belongs to the slot; built once per batch and shared by every layer
    cache = seg.__dict__.setdefault("_dense_onehot", {})
    oh = cache.get(S)
    if oh is None:
        t = seg.token_slots.to(device=device, dtype=torch.long)
        oh = torch.zeros((t.shape[0], S + 1), dtype=torch.float32, device=device)
        oh[torch.arange(t.shape[0], device=device), torch.where(t >= 0, t, S)] = 1.0
        oh = oh[:, :S].contiguous()
        cache[S] = oh
    return oh


def _token_mask(seg: LoraSegments, ranks: torch.Tensor, S: int, scales: torch.Tensor, i: int, device) -> torch.Tensor:
    # [T, S, 1]: the scale of the token's slot where that slot is active in slice i, else 0
    per_slot = scales.to(device) * (ranks[i].to(device) > 0).float()  # [S]
    return (_onehot(seg, S, device) * per_slot).unsqueeze(-1)


def lora_shrink_dense(x, A, seg, scales, ranks) -> torch.Tensor:
    T = x.shape[0]
    S, R = A[0].shape[0], A[0].shape[1]
    buf = torch.empty((len(A), T, S * R), dtype=torch.float32, device=x.device)
    xf = x.float()
    for i, Ai in enumerate(A):
        h = (xf @ Ai.reshape(S * R, -1).float().T).view(T, S, R)
        buf[i] = (h * _token_mask(seg, ranks, S, scales, i, x.device)).view(T, S * R)
    return buf  # [L, T, S*R]: each token's block sits at its slot, the rest is zero


def lora_expand_dense(y, buf, B, seg, ranks, offsets) -> torch.Tensor:
    for i, Bi in enumerate(B):
        S, N, R = Bi.shape
        delta = buf[i] @ Bi.transpose(1, 2).reshape(S * R, N).float()
        y[:, offsets[i] : offsets[i] + N] += delta.to(y.dtype)
    return y


def apply_lora_dense(y, x, A, B, seg, scales, ranks, offsets):
    return lora_expand_dense(y, lora_shrink_dense(x, A, seg, scales, ranks), B, seg, ranks, offsets)
