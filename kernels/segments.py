"""The token -> adapter-slot mapping of one flattened batch, as the LoRA kernels consume it.

The model runner orders the sequences of a step so that tokens of the same
adapter slot are contiguous; a *segment* is a maximal run of tokens that share
a slot. Tokens with no adapter form segments with slot -1, which every kernel
skips.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoraSegments:
    seg_starts: torch.Tensor  # [N+1] int32, token offsets, seg_starts[0] == 0, seg_starts[-1] == T
    seg_slots: torch.Tensor  # [N] int32, slot of each segment, -1 = no adapter
    token_slots: torch.Tensor  # [T] int32, slot of each token, -1 = no adapter (for gathered kernels)
    seg_starts_host: list[int]
    seg_slots_host: list[int]
    max_seg_len: int
    num_tokens: int

    @property
    def num_segments(self) -> int:
        return len(self.seg_slots_host)

    @property
    def has_lora(self) -> bool:
        return any(s >= 0 for s in self.seg_slots_host)

    @classmethod
    def from_token_slots(cls, token_slots: list[int], device: torch.device | str = "cpu") -> "LoraSegments":
        """Builds segments from the per-token slot list (runs of equal slots)."""
        starts: list[int] = [0]
        slots: list[int] = []
        for i, s in enumerate(token_slots):
            if i == 0 or s != token_slots[i - 1]:
                if i > 0:
                    starts.append(i)
                slots.append(s)
        starts.append(len(token_slots))
        if not token_slots:
            starts = [0]
        lens = [b - a for a, b in zip(starts[:-1], starts[1:])]
        return cls(
            seg_starts=torch.tensor(starts, dtype=torch.int32, device=device),
            seg_slots=torch.tensor(slots, dtype=torch.int32, device=device),
            token_slots=torch.tensor(token_slots, dtype=torch.int32, device=device),
            seg_starts_host=starts,
            seg_slots_host=slots,
            max_seg_len=max(lens, default=0),
            num_tokens=len(token_slots),
        )
