"""The CPU execution of segmented LoRA: a plan made once per step, two products per module.

A serving step runs the same token -> slot mapping through every LoRA module
of the model (seven per layer). Everything that depends only on that mapping
-- which segments carry an adapter, whether their tokens and slots form plain
views, the gather/scatter indices otherwise -- is worked out once per step in
`CpuLoraPlan`; a module then costs its two products and nothing else:

- *batched* (four segments or more): `H = X_seg A_segᵀ · scale` and
  `Y_seg += H B_segᵀ` as two batched matmuls over all segments at once,
  padded to the longest segment. When the adapter segments are consecutive
  and of equal length (a decode step sorted by slot) and their slots are a
  contiguous range, X, Y and the weight stacks are views and nothing is
  copied; otherwise tokens are gathered by index (built once per step) and
  only the slots present in the step are gathered from the stacks.
- *looped* (one to three segments: a single-tenant burst, an RL rollout):
  two BLAS calls per segment, `y_seg.addmm_(x_seg A_slotᵀ, B_slotᵀ, alpha=scale)`,
  which beats the padding and batching bookkeeping there.

The threshold between the two comes from `python bench/serve_multi_lora.py`
and `python bench/train_rl.py` (many-adapter decode batches against
one-adapter rollouts). Weights past a slot's rank are zero in the engine's
stacks, so reading them whole adds nothing. fp32 only, one output slice (what
`LoraLinear` passes); anything else goes to the reference
(`kernels/reference.py`), which accumulates in fp32 for 16-bit weights.
"""
from __future__ import annotations

import torch

from .segments import LoraSegments

BATCHED_MIN_SEGMENTS = 4


class CpuLoraPlan:
    """What every module of one step shares: the adapter segments and how their tokens and slots are laid out."""

    __slots__ = ("live", "slots", "mode", "n", "lmax", "t0", "packed", "slot0", "slot_index", "tok", "keep", "rows")

    def __init__(self, seg: LoraSegments, device: torch.device | str = "cpu", mode: str | None = None):
        """`mode`: looped | batched forces a path (tests); None picks by the number of adapter segments."""
        starts = seg.seg_starts_host
        # (first token, tokens, slot) of each segment that carries an adapter
        self.live = [(starts[j], starts[j + 1] - starts[j], s) for j, s in enumerate(seg.seg_slots_host)
                     if s >= 0 and starts[j + 1] > starts[j]]
        self.slots = sorted({s for _, _, s in self.live})
        n = self.n = len(self.live)
        self.mode = "none" if n == 0 else (mode or ("looped" if n < BATCHED_MIN_SEGMENTS else "batched"))
        self.lmax = max((m for _, m, _ in self.live), default=0)
        self.t0 = self.live[0][0] if n else 0
        self.packed = self.slot0 = None
        self.slot_index = self.tok = self.keep = self.rows = None
        if self.mode != "batched":
            return
        seg_slots = [s for _, _, s in self.live]
        # consecutive segments of equal length: x and y are plain [n, lmax, H] views
        self.packed = all(m == self.lmax for _, m, _ in self.live) and all(
            a == self.t0 + k * self.lmax for k, (a, _, _) in enumerate(self.live))
        if seg_slots == list(range(seg_slots[0], seg_slots[0] + n)):
            self.slot0 = seg_slots[0]  # slots ascending and contiguous: the stacks are views too
        else:
            self.slot_index = torch.tensor(seg_slots, device=device)
        if not self.packed:
            L = self.lmax
            self.tok = torch.tensor([a + min(i, m - 1) for a, m, _ in self.live for i in range(L)], device=device)
            keep = [k * L + i for k, (_, m, _) in enumerate(self.live) for i in range(m)]  # unpadded rows
            self.keep = torch.tensor(keep, device=device)
            self.rows = torch.tensor([a + i for a, m, _ in self.live for i in range(m)], device=device)

    def touches(self, ranks_host: list[int]) -> bool:
        """Whether any slot of this step has a nonzero rank in a module (else the module is the base alone)."""
        return any(ranks_host[s] for s in self.slots)


def apply(plan: CpuLoraPlan, y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor,
          scales: torch.Tensor) -> torch.Tensor:
    """y += scale · (x Aᵀ) Bᵀ per adapter segment, in place. x: [T, in], y: [T, out] (contiguous),
    A: [S, R, in], Bt: [S, R, out] (B stored transposed), scales: [S] fp32."""
    if plan.mode == "looped":
        sc = scales.tolist()
        for a, m, s in plan.live:
            h = torch.mm(x[a : a + m], A[s].t())  # [m, R]
            y[a : a + m].addmm_(h, Bt[s], alpha=sc[s])
        return y
    if plan.mode == "none":
        return y
    n, L = plan.n, plan.lmax
    if plan.slot0 is not None:
        s0 = plan.slot0
        As, Bs, sc = A[s0 : s0 + n], Bt[s0 : s0 + n], scales[s0 : s0 + n]
    else:
        idx = plan.slot_index
        As, Bs, sc = A.index_select(0, idx), Bt.index_select(0, idx), scales.index_select(0, idx)
    if plan.packed:
        t0 = plan.t0
        h = torch.bmm(x[t0 : t0 + n * L].view(n, L, -1), As.transpose(1, 2)).mul_(sc.view(n, 1, 1))  # [n, L, R]
        y[t0 : t0 + n * L].view(n, L, -1).baddbmm_(h, Bs)  # [n, L, out] added in place
        return y
    h = torch.bmm(x.index_select(0, plan.tok).view(n, L, -1), As.transpose(1, 2)).mul_(sc.view(n, 1, 1))
    d = torch.bmm(h, Bs).view(n * L, -1)  # [n*L, out], padding rows dropped by `keep`
    y.index_add_(0, plan.rows, d.index_select(0, plan.keep))
    return y
