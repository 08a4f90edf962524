"""The CPU execution of segmented LoRA: a plan made once per step, one shrink and an expand per output.

A serving step runs the same token -> slot mapping through every LoRA module
of the model (seven per layer). Everything that depends only on that mapping
-- which segments carry an adapter, whether their tokens and slots form plain
views, the gather/scatter indices otherwise -- is worked out once per step in
`CpuLoraPlan`; a module then costs its products and nothing else. `apply`
takes a projection *group* (q/k/v or gate/up, which read the same input; a
lone projection is a group of one): one shrink against the members' A stacks
laid side by side, then each member's expand into its own output.

- *batched* (four segments or more, decode-shaped): `H = X_seg A_segᵀ · scale`
  and `Y_seg += H B_segᵀ` as batched matmuls over all segments at once,
  padded to the longest segment. When the adapter segments are consecutive
  and of equal length (a decode step sorted by slot) and their slots are a
  contiguous range, X, Y and the weight stacks are views and nothing is
  copied; otherwise tokens are gathered by index (built once per step) and
  only the slots present in the step are gathered from the stacks.
- *looped* (one to three segments, or unequal segments of 16 tokens or more on
  average: a single-tenant burst, an RL rollout, a prefill):
  one shrink per segment and `y_seg.addmm_(h_seg, B_slotᵀ, alpha=scale)` per
  output, which beats padding and gathering there.

The thresholds come from `python bench/serve_multi_lora.py`, `python
bench/train_rl.py` and the replayed prefill and decode steps of
`python bench/lora_step.py`. Weights past a slot's rank are zero in the
engine's stacks, so reading them whole adds nothing. fp32 only (what the
engine's fast path passes); anything else goes to the reference
(`kernels/reference.py`), which accumulates in fp32 for 16-bit weights.
"""
from __future__ import annotations

import torch

from .segments import LoraSegments

BATCHED_MIN_SEGMENTS = 4
LOOPED_MIN_MEAN_TOKENS = 16


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
        self.lmax = max((m for _, m, _ in self.live), default=0)
        self.t0 = self.live[0][0] if n else 0
        # consecutive segments of equal length: x and y are plain [n, lmax, H] views
        self.packed = all(m == self.lmax for _, m, _ in self.live) and all(
            a == self.t0 + k * self.lmax for k, (a, _, _) in enumerate(self.live))
        if mode is None:
            # long unequal segments (a prefill): each product is big enough alone, and gathering them into a
            # padded batch copies more than the calls it saves
            long = not self.packed and sum(m for _, m, _ in self.live) >= LOOPED_MIN_MEAN_TOKENS * n
            mode = "looped" if n < BATCHED_MIN_SEGMENTS or long else "batched"
        self.mode = "none" if n == 0 else mode
        self.slot0 = None
        self.slot_index = self.tok = self.keep = self.rows = None
        if self.mode != "batched":
            return
        seg_slots = [s for _, _, s in self.live]
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


def apply(plan: CpuLoraPlan, x: torch.Tensor, A: torch.Tensor, scale_cols: torch.Tensor, outs: list) -> None:
    """y_i += scale_i · (x A_iᵀ) B_iᵀ per adapter segment, in place, for the slices of one projection group.

    x: [T, in]; A: [S, W, in], the slices' A stacks side by side along W (one slice: its own stack);
    scale_cols: [S, W] or [S, 1], each column's scale (the scale of the slice it belongs to);
    outs: [(y_i [T, N_i] (rows contiguous, a column block of the group's output is fine),
    Bt_i [S, R_i, N_i], first column of slice i in A, its width R_i, scales_i as a host list)].
    One shrink serves every slice; each slice then adds its own expand.
    """
    if plan.mode == "looped":
        for a, m, s in plan.live:
            h = torch.mm(x[a : a + m], A[s].t())  # [m, W]
            for y, Bt, c, w, sc in outs:
                y[a : a + m].addmm_(h[:, c : c + w], Bt[s], alpha=sc[s])
        return
    if plan.mode == "none":
        return
    n, L = plan.n, plan.lmax
    if plan.slot0 is not None:
        s0 = plan.slot0
        As, sc = A[s0 : s0 + n], scale_cols[s0 : s0 + n]
        pick = lambda Bt: Bt[s0 : s0 + n]  # noqa: E731
    else:
        idx = plan.slot_index
        As, sc = A.index_select(0, idx), scale_cols.index_select(0, idx)
        pick = lambda Bt: Bt.index_select(0, idx)  # noqa: E731
    if plan.packed:
        t0 = plan.t0
        h = torch.bmm(x[t0 : t0 + n * L].view(n, L, -1), As.transpose(1, 2)).mul_(sc.view(n, 1, -1))  # [n, L, W]
        for y, Bt, c, w, _ in outs:  # [n, L, N_i] added in place
            y3 = y[t0 : t0 + n * L].view(n, L, -1)
            if y.is_contiguous():
                y3.baddbmm_(h[:, :, c : c + w], pick(Bt))
            else:  # a column block of a group's output: baddbmm_ would run one product per segment there
                y3.add_(torch.bmm(h[:, :, c : c + w], pick(Bt)))
        return
    h = torch.bmm(x.index_select(0, plan.tok).view(n, L, -1), As.transpose(1, 2)).mul_(sc.view(n, 1, -1))
    for y, Bt, c, w, _ in outs:
        d = torch.bmm(h[:, :, c : c + w], pick(Bt)).view(n * L, -1)  # [n*L, N_i], padding rows dropped by `keep`
        y.index_add_(0, plan.rows, d.index_select(0, plan.keep))
