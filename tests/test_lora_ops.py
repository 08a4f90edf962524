"""The CPU LoRA paths (the reference, and the looped and batched fast paths of kernels/cpu_lora.py, through the
backend the runner selects) equal a plain per-token loop."""
from __future__ import annotations

import pytest
import torch

from loraplex.kernels import LoraSegments, TorchBackend, cpu_lora, select_backend
from loraplex.kernels.reference import lora_expand_ref, lora_shrink_ref
from lora_batches import PATTERNS, pattern_batch


def fast_path(y, x, A, Bt, seg, scales, mode):
    plan = cpu_lora.CpuLoraPlan(seg, mode=mode)  # the path under test, whatever the number of segments
    return cpu_lora.apply(plan, y, x, A, Bt, scales)


def make(S, R, IN, OUT, ranks, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.zeros(S, R, IN)
    Bt = torch.zeros(S, R, OUT)
    for s, r in enumerate(ranks):
        A[s, :r] = torch.randn(r, IN, generator=g)
        Bt[s, :r] = torch.randn(r, OUT, generator=g)
    scales = torch.rand(S, generator=g) + 0.5
    return A, Bt, scales, torch.tensor([ranks], dtype=torch.int32)


def naive(y, x, A, Bt, scales, ranks, token_slots):
    y = y.clone()
    for t, s in enumerate(token_slots):
        r = int(ranks[0, s]) if s >= 0 else 0
        if r:
            y[t] += scales[s] * (x[t] @ A[s, :r].T) @ Bt[s, :r]
    return y


@pytest.mark.parametrize("slots", [
    [0, 0, 1, 1, 1, 2, -1, -1, 3],            # mixed, with no-adapter tokens
    [2] * 7,                                  # one adapter
    [-1, -1, -1],                             # nobody
    [0, 1, 2, 3, 0, 1, 2, 3],                 # decode-like: one token per segment, slots repeat
    [1] * 30 + [0],                           # skewed
    [0, 0, 1, 1, 2, 2, 3, 3],                 # equal segments over contiguous slots (the view fast path)
    [1, 1, 3, 3, 3, -1, 0],                   # unequal segments, slots not a range (the gathered path)
])
@pytest.mark.parametrize("ranks", [[4, 16, 1, 8], [16, 16, 16, 16], [8, 0, 3, 5]])  # 0 = slot inactive in this module
def test_reference_and_fast_paths_match_naive(slots, ranks):
    S, R, IN, OUT = 4, 16, 37, 29
    A, Bt, scales, rk = make(S, R, IN, OUT, ranks)
    x = torch.randn(len(slots), IN)
    y0 = torch.randn(len(slots), OUT)
    seg = LoraSegments.from_token_slots(slots)
    want = naive(y0, x, A, Bt, scales, rk, slots)
    ref = lora_expand_ref(y0.clone(), lora_shrink_ref(x, [A], seg, scales, rk), [Bt.transpose(1, 2)], seg, rk, [0])
    assert torch.allclose(ref, want, atol=1e-4, rtol=1e-4)
    for mode in ("looped", "batched"):
        got = fast_path(y0.clone(), x, A, Bt, seg, scales, mode)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), mode
    backend = select_backend("cpu")
    assert isinstance(backend, TorchBackend)
    via_backend = backend.apply(backend.plan(seg), y0.clone(), x, [A], [Bt.transpose(1, 2)], scales, rk, [0])
    assert torch.allclose(via_backend, want, atol=1e-4, rtol=1e-4)


def test_multi_slice_offsets():
    S, R, IN = 3, 8, 20
    outs = [12, 6, 6]
    g = torch.Generator().manual_seed(1)
    A = [torch.randn(S, R, IN, generator=g) for _ in outs]
    Bt = [torch.randn(S, R, n, generator=g) for n in outs]
    ranks = torch.tensor([[8, 4, 2], [8, 0, 2], [1, 4, 8]], dtype=torch.int32)
    for i in range(3):
        for s in range(S):
            A[i][s, ranks[i, s]:] = 0
            Bt[i][s, ranks[i, s]:] = 0
    scales = torch.tensor([1.0, 0.5, 2.0])
    slots = [0, 0, 1, 2, 2, -1]
    seg = LoraSegments.from_token_slots(slots)
    x = torch.randn(len(slots), IN)
    y0 = torch.zeros(len(slots), sum(outs))
    want = y0.clone()
    off = 0
    for i, n in enumerate(outs):
        want[:, off:off + n] = naive(torch.zeros(len(slots), n), x, A[i], Bt[i], scales, ranks[i:i + 1], slots)
        off += n
    B = [b.transpose(1, 2) for b in Bt]
    ref = lora_expand_ref(y0.clone(), lora_shrink_ref(x, A, seg, scales, ranks), B, seg, ranks, [0, 12, 18])
    backend = select_backend("cpu")  # several slices: the backend runs the reference
    got = backend.apply(backend.plan(seg), y0.clone(), x, A, B, scales, ranks, [0, 12, 18])
    assert torch.allclose(ref, want, atol=1e-4) and torch.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("lengths", [[1], [5, 2, 7, 3]], ids=["decode", "prefill"])
@pytest.mark.parametrize("R", [16, 256])  # 256: the server's default maximum rank
def test_fast_paths_under_popularity_patterns(pattern, lengths, R):
    S, IN, OUT = 6, 40, 24
    slots = pattern_batch(pattern, 12, S, lengths)
    A, Bt, scales, rk = make(S, R, IN, OUT, [R, R // 2, 3, R, 1, R // 4])
    x = torch.randn(len(slots), IN)
    y0 = torch.randn(len(slots), OUT)
    seg = LoraSegments.from_token_slots(slots)
    want = naive(y0, x, A, Bt, scales, rk, slots)
    for mode in ("looped", "batched"):
        torch.testing.assert_close(fast_path(y0.clone(), x, A, Bt, seg, scales, mode), want, atol=1e-3, rtol=1e-4)
