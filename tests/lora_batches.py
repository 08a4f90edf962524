"""Batches shaped like real traffic for the LoRA kernel and fast-path tests."""
from __future__ import annotations

import torch


def popularity(pattern: str, requests: int, slots: int, seed: int = 0) -> list[int]:
    """The slot of each request under Punica's popularity patterns (tests/test_sgmv.py there)."""
    g = torch.Generator().manual_seed(seed)
    if pattern == "identical":  # every request on one adapter
        return [0] * requests
    if pattern == "distinct":  # every request its own adapter
        return [i % slots for i in range(requests)]
    if pattern == "uniform":  # adapters drawn uniformly
        return torch.randint(0, slots, (requests,), generator=g).tolist()
    if pattern == "zipf":  # popularity ~ 1 / rank^1.5
        w = torch.tensor([1.0 / (k + 1) ** 1.5 for k in range(slots)])
        return torch.multinomial(w, requests, replacement=True, generator=g).tolist()
    if pattern == "skewed":  # one adapter takes nearly all, the rest get one request each
        return [0] * (requests - slots + 1) + list(range(1, slots))
    raise ValueError(pattern)


PATTERNS = ["identical", "distinct", "uniform", "zipf", "skewed"]


def pattern_batch(pattern: str, requests: int, slots: int, lengths) -> list[int]:
    """Token slots of a step: requests sorted by slot (as the scheduler orders them), each `lengths[i]` tokens."""
    per_req = sorted(popularity(pattern, requests, slots))
    return [s for i, s in enumerate(per_req) for _ in range(lengths[i % len(lengths)])]
