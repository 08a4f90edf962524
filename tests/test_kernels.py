"""Triton LoRA kernels against the PyTorch reference.

On a machine without a GPU the kernels run in Triton's interpreter
(TRITON_INTERPRET=1, set here before triton is imported), on small shapes; with
a GPU the same tests run on CUDA tensors unchanged.
"""
from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from loraplex.kernels import LoraSegments  # noqa: E402
from loraplex.kernels.reference import lora_expand_ref, lora_shrink_ref  # noqa: E402
from loraplex.kernels.triton_lora import lora_expand_triton, lora_shrink_triton  # noqa: E402

DEV = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (6e-2, 6e-2)}


def stacks(S, R, H, outs, ranks, dtype, seed):
    """A (per slice [S, R, H]) and B (per slice, transposed view of [S, R, N_i] as the engine stores it)."""
    g = torch.Generator().manual_seed(seed)
    A, B = [], []
    for i, n in enumerate(outs):
        a = torch.zeros(S, R, H)
        bt = torch.zeros(S, R, n)
        for s in range(S):
            r = int(ranks[i, s])
            a[s, :r] = torch.randn(r, H, generator=g) / H**0.5
            bt[s, :r] = torch.randn(r, n, generator=g) / max(r, 1) ** 0.5
        A.append(a.to(DEV, dtype))
        B.append(bt.to(DEV, dtype).transpose(1, 2))
    return A, B


def case(slots, S, R, H, outs, ranks_list, dtype, seed=0):
    ranks = torch.tensor(ranks_list, dtype=torch.int32)
    A, B = stacks(S, R, H, outs, ranks, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(len(slots), H, generator=g).to(DEV, dtype)
    y0 = torch.randn(len(slots), sum(outs), generator=g).to(DEV, dtype)
    scales = (torch.rand(S, generator=g) + 0.5).to(DEV)
    seg = LoraSegments.from_token_slots(slots, DEV)
    offsets = [sum(outs[:i]) for i in range(len(outs))]
    ref_buf = lora_shrink_ref(x.cpu().float(), [a.cpu().float() for a in A], LoraSegments.from_token_slots(slots), scales.cpu(), ranks)
    ref = lora_expand_ref(y0.cpu().float().clone(), ref_buf, [b.cpu().float() for b in B], LoraSegments.from_token_slots(slots), ranks, offsets)
    buf = lora_shrink_triton(x, A, seg, scales, ranks.to(DEV))
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(buf.cpu()[:, :, :R], ref_buf[:, :, :R], atol=atol, rtol=rtol)
    out = lora_expand_triton(y0.clone(), buf, B, seg, ranks.to(DEV), offsets)
    torch.testing.assert_close(out.cpu().float(), ref, atol=atol * 4, rtol=rtol * 4)
    return out


def ranks_for(S, L, rng, max_r, inactive=False):
    r = torch.randint(1, max_r + 1, (L, S), generator=rng)
    if inactive:
        r[0, 0] = 0
    return r.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("slots,S", [
    ([0] * 20 + [1] * 3 + [-1] * 2 + [2] * 7, 3),        # prefill-like segments with a no-adapter run (SGMV)
    ([0, 1, 2, 3, -1, 2, 1, 0], 4),                      # decode-like, one token per segment (BGMV)
    ([1] * 40 + [0], 2),                                 # skewed: one adapter has almost every token
    ([-1] * 5, 2),                                       # nobody has an adapter
    ([5], 8),                                            # one token, one adapter among many slots
])
def test_kernels_match_reference(dtype, slots, S):
    rng = torch.Generator().manual_seed(len(slots))
    L = 1
    case(slots, S, 16, 33, [24], ranks_for(S, L, rng, 16), dtype)


@pytest.mark.parametrize("L,outs", [(2, [24, 24]), (3, [32, 8, 8])])  # fused gate/up; fused q/k/v under GQA
@pytest.mark.parametrize("decode", [False, True])
def test_multi_slice_one_launch(L, outs, decode):
    rng = torch.Generator().manual_seed(7)
    S = 4
    slots = [0, 1, 2, 3, -1, 1] if decode else [0] * 9 + [3] * 17 + [-1] * 3 + [1] * 2
    case(slots, S, 32, 40, outs, ranks_for(S, L, rng, 32, inactive=True), torch.float32)


@pytest.mark.parametrize("rank", [1, 7, 16, 17, 64, 128])
def test_ranks_1_to_128(rank):
    S = 2
    case([0] * 5 + [1] * 4, S, max(16, -(-rank // 16) * 16), 24, [20], [[rank, max(1, rank // 3)]], torch.float32)


def test_odd_hidden_size_and_mixed_ranks_many_adapters():
    # 2049 is the odd width; 64 adapters with ranks 1..64 in one launch
    rng = torch.Generator().manual_seed(3)
    S = 64
    slots = [s for s in range(S) for _ in range(1 + s % 2)]
    ranks = [[1 + (s * 7) % 64 for s in range(S)]]
    case(slots[:80], S, 64, 2049, [9], ranks, torch.float32)
    case([s for s in range(S)], S, 64, 65, [2049], ranks, torch.float32)


def test_empty_segments_and_empty_batch():
    seg = LoraSegments.from_token_slots([])
    x = torch.zeros(0, 16, device=DEV)
    A = [torch.zeros(2, 16, 16, device=DEV)]
    buf = lora_shrink_triton(x, A, seg, torch.ones(2, device=DEV), torch.ones(1, 2, dtype=torch.int32, device=DEV))
    assert buf.shape == (1, 0, 16)
    # a segment table with a zero-length segment in the middle
    slots = [0, 0, 1, 1]
    s = LoraSegments.from_token_slots(slots, DEV)
    s.seg_starts = torch.tensor([0, 2, 2, 4], dtype=torch.int32, device=DEV)
    s.seg_slots = torch.tensor([0, 1, 1], dtype=torch.int32, device=DEV)
    s.seg_starts_host, s.seg_slots_host = [0, 2, 2, 4], [0, 1, 1]
    ranks = torch.tensor([[4, 4]], dtype=torch.int32)
    A2, B2 = stacks(2, 16, 8, [8], ranks, torch.float32, 1)
    x2 = torch.randn(4, 8, device=DEV)
    ref = lora_shrink_ref(x2.cpu(), [a.cpu() for a in A2], s, torch.ones(2), ranks)
    got = lora_shrink_triton(x2, A2, s, torch.ones(2, device=DEV), ranks.to(DEV))
    torch.testing.assert_close(got.cpu(), ref, atol=1e-4, rtol=1e-4)
