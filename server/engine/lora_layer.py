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
        self.ranks = torch.zeros((1, num_slots), dtype=torch.int32, device=dev)
        self.ranks_host = [0] * num_slots
        self.packed: torch.Tensor | None = None  # the base weight in oneDNN's layout (CPU fp32), see pack_base

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
        A = self.A.new_zeros((self.num_slots, width, self.in_features))
        Bt = self.Bt.new_zeros((self.num_slots, width, self.out_features))
        A[:, : self.width] = self.A
        Bt[:, : self.width] = self.Bt
        self.A, self.Bt, self.width = A, Bt, width

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
            self.scales[slot] = 0.0
            return
        a, bt, scale = prepared
        r = a.shape[0]
        self._grow(r)
        self.A[slot].zero_()
        self.Bt[slot].zero_()
        self.A[slot, :r] = a
        self.Bt[slot, :r] = bt
        self.scales[slot] = scale
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
        y = self.base(x) if self.packed is None else cpu_gemm.packed_linear(x, self.packed, self.base.bias)
        ctx = self.ctx
        if ctx.plan is None or not ctx.backend.touches(ctx.plan, self.ranks_host):
            return y
        # x: [T, in] (the runner always passes a flattened batch), y: [T, out]
        return ctx.backend.apply(ctx.plan, y, x, [self.A], [self.Bt.transpose(1, 2)], self.scales, self.ranks, [0])


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
