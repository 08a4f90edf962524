"""The LoRA layer the engine wraps around every target projection of the base model.

`LoraLinear` keeps the frozen base `nn.Linear` and, per adapter slot, the
adapter's A and B stacked along a slot dimension. A forward pass reads the
step's LoRA plan (made once per step from the token -> slot mapping) and the
backend (chosen once when the runner was built, `loraplex.kernels.select_backend`)
from the shared `LoraContext`, and adds `scale * (x A^T) B^T` to the tokens
of each slot.

Mixed ranks: the stacks are as wide as the largest rank loaded so far
(rounded up to 16) and grow when a wider adapter arrives; each slot's true
rank is recorded per module, so kernels never multiply the zero padding.
A slot whose adapter does not target this module has rank 0 here and its
tokens pass through the base layer only.

`LoraGroup`: projections that read the same input (q/k/v, gate/up). On the
CPU fast path (fp32, base weights packed for oneDNN) a group runs its base
weights as one packed GEMM and its adapters' shrink as one product: the
members' A stacks live side by side in the group's `[S, k*W, in]` stack
(each member's `A` is a view of its block), and each member then adds its
own expand into its column block of the group's output. Elsewhere (CUDA,
16-bit weights) each member runs alone.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from loraplex.kernels import LoraSegments, cpu_gemm, select_backend

RANK_ALIGN = 16


class LoraContext:
    """Shared by every LoraLinear of one model: the backend (fixed) and the current step's plan (None = no LoRA)."""

    def __init__(self, backend=None) -> None:
        self.backend = backend if backend is not None else select_backend("cpu")
        self.plan = None

    def begin_step(self, seg: LoraSegments | None) -> None:
        self.plan = None if seg is None or not seg.has_lora else self.backend.plan(seg)


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, ctx: LoraContext, num_slots: int):
        super().__init__()
        self.base = base
        self.ctx = ctx
        self.num_slots = num_slots
        self.in_features = base.in_features
        self.out_features = base.out_features
        dev, dt = base.weight.device, base.weight.dtype
        self.width = 0  # current stacked rank capacity
        # A: [S, R, in]; B is kept as Bt: [S, R, out] and handed to the kernels as its
        # transposed view [S, out, R]: the CPU expand then reads each slot's rows contiguously.
        self.A = torch.zeros((num_slots, 0, self.in_features), device=dev, dtype=dt)
        self.Bt = torch.zeros((num_slots, 0, self.out_features), device=dev, dtype=dt)
        self.scales = torch.zeros(num_slots, dtype=torch.float32, device=dev)
        self.scale_cols = self.scales[:, None]  # [S, 1]: every column of a slot's shrink takes its scale
        self.scales_host = [0.0] * num_slots
        self.ranks = torch.zeros((1, num_slots), dtype=torch.int32, device=dev)
        self.ranks_host = [0] * num_slots
        self.packed: torch.Tensor | None = None  # the base weight in oneDNN's layout (CPU fp32), see pack_base
        self.group: LoraGroup | None = None  # set when a fused group runs this module (its A is a view there)
        self.col0 = 0  # this module's first column in its group's A stack

    @property
    def weight(self) -> torch.Tensor:  # some HF code peeks at .weight (dtype/device checks)
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def _grow(self, rank: int) -> None:
        width = -(-rank // RANK_ALIGN) * RANK_ALIGN
        if width <= self.width:
            return
        if self.group is not None:
            self.group.widen(width)
            return
        A = self.A.new_zeros((self.num_slots, width, self.in_features))
        A[:, : self.width] = self.A
        self.A = A
        self._widen_bt(width)

    def _widen_bt(self, width: int) -> None:
        Bt = self.Bt.new_zeros((self.num_slots, width, self.out_features))
        Bt[:, : self.width] = self.Bt
        self.Bt, self.width = Bt, width

    def _set_scale(self, slot: int, scale: float) -> None:
        self.scales[slot] = scale
        self.scales_host[slot] = scale
        if self.group is not None:
            self.group.scale_cols[slot, self.col0 : self.col0 + self.width] = scale

    def prepare_slot(self, A: torch.Tensor | None, B: torch.Tensor | None, scale: float):
        """One adapter's weights for this module, converted to the stacks' dtype and checked, nothing written:
        (A [r, in], Bt [r, out], scale), or None for "not targeted". ValueError when a shape does not fit or
        a value is not finite in this layer's dtype (a 1e308 scale, an F64 weight past fp16's range), so a
        slot is never left half-written by a conversion that fails or overflows."""
        if A is None:
            return None
        r = A.shape[0]
        fits = A.dim() == 2 and B.dim() == 2 and r >= 1 and A.shape[1] == self.in_features
        if not fits or tuple(B.shape) != (self.out_features, r):
            raise ValueError(f"LoRA weights A {list(A.shape)} / B {list(B.shape)} do not fit a "
                             f"{self.in_features}->{self.out_features} layer")
        scale = float(scale)
        if not math.isfinite(scale) or abs(scale) > min(torch.finfo(torch.float32).max, torch.finfo(self.A.dtype).max):
            raise ValueError(f"LoRA scale {scale:g} is not finite in {self.A.dtype}")
        a = A.to(self.A.dtype)  # on the weights' own device (the CPU tier): the stacks are written in commit_slot
        bt = B.t().to(self.Bt.dtype)
        if not (torch.isfinite(a).all() and torch.isfinite(bt).all()):
            raise ValueError(f"LoRA weights are not finite in {self.A.dtype}")
        return a, bt, scale

    def reserve(self, prepared) -> None:
        """Widens the stacks for `prepared` ahead of commit_slot (padding only: what the slots hold is unchanged)."""
        if prepared is not None:
            self._grow(prepared[0].shape[0])

    def commit_slot(self, slot: int, prepared) -> None:
        """Writes what prepare_slot returned into `slot` (None clears the slot for this module)."""
        if prepared is None:
            self.ranks_host[slot] = 0
            self.ranks[0, slot] = 0
            self._set_scale(slot, 0.0)
            return
        a, bt, scale = prepared
        r = a.shape[0]
        self._grow(r)
        self.A[slot].zero_()
        self.Bt[slot].zero_()
        self.A[slot, :r] = a
        self.Bt[slot, :r] = bt
        self._set_scale(slot, scale)
        self.ranks[0, slot] = r
        self.ranks_host[slot] = r

    def set_slot(self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None, scale: float) -> None:
        """Loads one adapter's (A [r, in], B [out, r]) into `slot`; None clears the slot for this module.
        All or nothing: a refused adapter (ValueError) leaves the slot as it was."""
        self.commit_slot(slot, self.prepare_slot(A, B, scale))

    def pack_base(self, release: bool = False) -> None:
        """Runs the base product through `cpu_gemm` from now on; `release` drops the unpacked weight.

        Release only when nothing else reads the base module's weight (the
        server owns its model; the trainer's rollout engine shares it with the
        policy being trained and keeps it). `.weight` then stays a 0-element
        tensor of the right dtype and device for code that only peeks at those.
        """
        self.packed = cpu_gemm.pack(self.base.weight)
        if release:
            self.base.weight = nn.Parameter(self.base.weight.new_empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None and self.group.packed is not None:
            return self.group(x)[self.group.members.index(self)]  # its weight is packed with its siblings'
        y = self.base(x) if self.packed is None else cpu_gemm.packed_linear(x, self.packed, self.base.bias)
        ctx = self.ctx
        if ctx.plan is None or not ctx.backend.touches(ctx.plan, self.ranks_host):
            return y
        # x: [T, in] (the runner always passes a flattened batch), y: [T, out]
        return ctx.backend.apply_module(ctx.plan, self, y, x)


class LoraGroup:
    """Projections of one layer that read the same input; `group(x)` -> their outputs, in member order."""

    def __init__(self, members: list[LoraLinear], ctx: LoraContext):
        if len({m.in_features for m in members}) != 1:
            raise ValueError("a LoRA group's projections must read the same input")
        self.members = members
        self.ctx = ctx
        offs = [0]
        for m in members:
            offs.append(offs[-1] + m.out_features)
        self.cols = list(zip(offs[:-1], offs[1:]))  # each member's columns of the group's output
        self.packed: torch.Tensor | None = None  # the members' base weights stacked, in oneDNN's layout
        self.bias: torch.Tensor | None = None
        self.A: torch.Tensor | None = None  # [S, k*W, in]: member i's A is the view [:, i*W:(i+1)*W]
        self.scale_cols: torch.Tensor | None = None  # [S, k*W]: each column's slot scale

    def fuse(self, release: bool = False) -> None:
        """One packed GEMM for the members' base weights and one stack for their A (CPU fp32);
        `release` as in `LoraLinear.pack_base`."""
        ms = self.members
        self.packed = cpu_gemm.pack(torch.cat([m.base.weight for m in ms]))
        if any(m.base.bias is not None for m in ms):
            self.bias = torch.cat([m.base.bias if m.base.bias is not None else m.base.weight.new_zeros(m.out_features)
                                   for m in ms])
        for m in ms:
            m.packed, m.group = None, self
            if release:
                m.base.weight = nn.Parameter(m.base.weight.new_empty(0), requires_grad=False)
        self.widen(max(RANK_ALIGN, max(m.width for m in ms)))

    def widen(self, width: int) -> None:
        """Every member's stacks `width` wide (what the slots hold is unchanged)."""
        ms = self.members
        m0 = ms[0]
        A = m0.A.new_zeros((m0.num_slots, len(ms) * width, m0.in_features))
        sc = m0.scales.new_zeros((m0.num_slots, len(ms) * width))
        for i, m in enumerate(ms):
            c = i * width
            A[:, c : c + m.width] = m.A
            sc[:, c : c + width] = m.scales[:, None]
            m._widen_bt(width)
            m.A, m.col0 = A[:, c : c + width], c
        self.A, self.scale_cols = A, sc

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.packed is None:
            return [m(x) for m in self.members]
        y = self.fused(x)
        return [y[:, a:b] for a, b in self.cols]

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        """The members' outputs side by side, `[T, sum of out_features]` (a fused group only)."""
        y = cpu_gemm.packed_linear(x, self.packed, self.bias)
        ctx = self.ctx
        if ctx.plan is not None:
            # slices, not split(): the LoRA expands add into them in place
            outs = [(y[:, a:b], m) for (a, b), m in zip(self.cols, self.members) if ctx.backend.touches(ctx.plan, m.ranks_host)]
            if outs:
                ctx.backend.apply_group(ctx.plan, self, outs, x)
        return y


def wrap_lora_modules(model: nn.Module, ctx: LoraContext, num_slots: int, layers: nn.ModuleList) -> dict[str, LoraLinear]:
    """Replaces every nn.Linear inside the decoder layers with a LoraLinear; returns them by full module path."""
    wrapped: dict[str, LoraLinear] = {}
    prefix = {id(m): n for n, m in model.named_modules()}
    for layer in layers:
        layer_name = prefix[id(layer)]
        for name, child in list(layer.named_modules()):
            for cname, sub in list(child.named_children()):
                if isinstance(sub, nn.Linear) and not isinstance(sub, LoraLinear):
                    lora = LoraLinear(sub, ctx, num_slots)
                    setattr(child, cname, lora)
                    full = ".".join(p for p in (layer_name, name, cname) if p)
                    wrapped[full] = lora
    return wrapped
