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
    cpu_lora.apply(plan, x, A, scales[:, None], [(y, Bt, 0, A.shape[1], scales.tolist())])
    return y


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


@pytest.mark.parametrize("slots", [
    [0, 0, 1, 1, 2, 2, 3, 3],                 # equal segments over contiguous slots (views)
    [1, 1, 3, 3, 3, -1, 0],                   # unequal, slots not a range (gathered)
    [2] * 9,                                  # one adapter (looped)
    [0] * 70 + [1] * 65 + [2] * 80 + [3] * 66,  # long unequal segments, as in a prefill (looped by default)
])
@pytest.mark.parametrize("mode", [None, "looped", "batched"])
def test_a_fused_group_equals_its_members_run_alone(slots, mode):
    """q/k/v fused (one packed GEMM, one shrink over the stacked A) equals each projection with its own adapter
    weights, whatever the ranks (a module an adapter does not target has rank 0) and after the stacks widen."""
    from loraplex.kernels import cpu_gemm
    from loraplex.server.engine.lora_layer import LoraContext, LoraGroup, LoraLinear

    if cpu_gemm._self_check() is not None:
        pytest.skip("no working oneDNN linear in this build")
    g = torch.Generator().manual_seed(3)
    IN, outs, S = 24, [24, 8, 8], 4
    bases = [torch.nn.Linear(IN, n, bias=i != 1) for i, n in enumerate(outs)]  # k without bias, as some models
    alone_ctx, fused_ctx = LoraContext(), LoraContext()
    alone = [LoraLinear(b, alone_ctx, S) for b in bases]
    fused = [LoraLinear(b, fused_ctx, S) for b in bases]
    group = LoraGroup(fused, fused_ctx)
    group.fuse()
    weights = {}  # (member, slot) -> (A, B, scale); ranks differ per module, k untouched by slot 2
    for i, n in enumerate(outs):
        for s, r in enumerate([4, 16, 0 if i == 1 else 8, 40]):  # rank 40 widens the group's stacks past 16
            if r:
                weights[i, s] = (torch.randn(r, IN, generator=g), torch.randn(n, r, generator=g), 0.5 + s)
    for (i, s), (A, B, sc) in weights.items():
        alone[i].set_slot(s, A, B, sc)
        fused[i].set_slot(s, A, B, sc)
    assert group.A.shape[1] == 3 * 48 and all(m.A.data_ptr() == group.A[:, m.col0].data_ptr() for m in fused)
    x = torch.randn(len(slots), IN, generator=g)
    seg = LoraSegments.from_token_slots(slots)
    for ctx in (alone_ctx, fused_ctx):
        ctx.begin_step(seg)
        ctx.plan = (seg, cpu_lora.CpuLoraPlan(seg, mode=mode))
    got = group(x)
    for i, m in enumerate(alone):
        want = naive(bases[i](x), x, m.A, m.Bt, m.scales, m.ranks, slots)
        torch.testing.assert_close(got[i], want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(m(x), want, atol=1e-4, rtol=1e-4)
    fused_ctx.begin_step(None)
    for i in range(3):  # no LoRA in the step: the base products alone
        torch.testing.assert_close(group(x)[i], bases[i](x), atol=1e-5, rtol=1e-5)
