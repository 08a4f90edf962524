"""Triton LoRA kernels against the PyTorch reference.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set
here before triton is imported) on small shapes; with a GPU the same tests run
on CUDA tensors unchanged. Every case runs both kernel variants (SGMV and
BGMV) on the same data.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

import loraplex.kernels as K  # noqa: E402
from loraplex.kernels import LoraSegments  # noqa: E402
from loraplex.kernels import triton_lora as TL  # noqa: E402
from loraplex.kernels.reference import lora_expand_ref, lora_shrink_ref  # noqa: E402
from lora_batches import PATTERNS, pattern_batch  # noqa: E402

DEV = "cuda" if HAS_CUDA else "cpu"
VARIANTS = ["sgmv", "bgmv"]
# buf: the kernels see the same 16-bit values as the reference and accumulate in fp32, so it is tight for
# every dtype; y: one rounding to the output dtype (and TF32 rounding of buf on a GPU) apart
BUF_TOL = dict(atol=1e-4, rtol=1e-4)
Y_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=1.5e-2, rtol=1.6e-2)}


def stacks(S, R, H, outs, ranks, dtype, seed):
    """A per slice [S, R, H] and B per slice as the engine passes it: the [S, N_i, R] view of a [S, R, N_i] stack.
    Rows past a slot's rank are zero, as in the engine's pool."""
    g = torch.Generator().manual_seed(seed)
    A, B = [], []
    for i, n in enumerate(outs):
        a = torch.zeros(S, R, H)
        bt = torch.zeros(S, R, n)
        for s in range(S):
            r = int(ranks[i][s])
            a[s, :r] = torch.randn(r, H, generator=g) / H**0.5
            bt[s, :r] = torch.randn(r, n, generator=g) / max(r, 1) ** 0.5
        A.append(a.to(DEV, dtype))
        B.append(bt.to(DEV, dtype).transpose(1, 2))
    return A, B


def check(slots, S, R, H, outs, ranks, dtype=torch.float32, seed=0, variants=VARIANTS, split_k=None, seg=None):
    """Runs shrink then expand with each variant and compares buf and y with the reference."""
    ranks = torch.tensor(ranks, dtype=torch.int32)
    A, B = stacks(S, R, H, outs, ranks, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(len(slots), H, generator=g).to(DEV, dtype)
    y0 = torch.randn(len(slots), sum(outs), generator=g).to(DEV, dtype)
    scales = (torch.rand(S, generator=g) + 0.5).to(DEV)
    offsets = [sum(outs[:i]) for i in range(len(outs))]
    seg_cpu = seg or LoraSegments.from_token_slots(slots)
    ref_buf = lora_shrink_ref(x.cpu().float(), [a.cpu().float() for a in A], seg_cpu, scales.cpu(), ranks)
    ref_y = lora_expand_ref(y0.cpu().float().clone(), ref_buf, [b.cpu().float() for b in B], seg_cpu, ranks, offsets)
    untouched = torch.tensor([s < 0 for s in slots], dtype=torch.bool)
    for variant in variants:
        seg_dev = seg or LoraSegments.from_token_slots(slots, DEV)
        buf = TL.lora_shrink_triton(x, A, seg_dev, scales, ranks.to(DEV), variant=variant, split_k=split_k)
        assert buf.shape == ref_buf.shape and buf.dtype == torch.float32
        torch.testing.assert_close(buf.cpu(), ref_buf, **BUF_TOL, msg=lambda m: f"{variant} shrink: {m}")
        y = TL.lora_expand_triton(y0.clone(), buf, B, seg_dev, ranks.to(DEV), offsets, variant=variant)
        assert y.dtype == dtype
        torch.testing.assert_close(y.cpu().float(), ref_y.to(dtype).float(), **Y_TOL[dtype], msg=lambda m: f"{variant} expand: {m}")
        # tokens without an adapter keep the base output bit for bit
        assert torch.equal(y.cpu()[untouched], y0.cpu()[untouched])


def random_ranks(L, S, max_r, seed, inactive=()):
    r = torch.randint(1, max_r + 1, (L, S), generator=torch.Generator().manual_seed(seed))
    for i, s in inactive:
        r[i, s] = 0  # slot s does not target slice i
    return r.tolist()


BATCHES = {
    "prefill+no-adapter-run": ([0] * 20 + [1] * 3 + [-1] * 2 + [2] * 7, 3),
    "decode-one-token-each": ([0, 1, 2, 3, -1, 2, 1, 0], 4),
    "skewed": ([1] * 40 + [0], 2),
    "prefill-and-decode": ([2] * 18 + [0, 1, -1, 3, 1], 4),
    "no-adapter-at-all": ([-1] * 5, 2),
    "one-token-of-many-slots": ([5], 8),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("batch", list(BATCHES), ids=list(BATCHES))
def test_batches_and_dtypes_match_reference(dtype, batch):
    slots, S = BATCHES[batch]
    check(slots, S, 32, 40, [24], random_ranks(1, S, 32, seed=len(slots)), dtype)


@pytest.mark.parametrize("outs,dtype", [
    ([24], torch.float32),
    ([24, 24], torch.float16),           # fused gate/up
    ([32, 8, 8], torch.bfloat16),        # fused q/k/v under grouped-query attention
    ([16, 8, 8, 20], torch.float32),     # more slices than one launch takes
])
def test_slices_in_one_call(outs, dtype):
    L, S = len(outs), 4
    slots = [0] * 9 + [3] * 17 + [-1] * 3 + [1] * 2 + [2, 0, 3]
    # slot 1 does not target slice 0, slot 2 not the last one: their tokens keep the base output there
    check(slots, S, 32, 40, outs, random_ranks(L, S, 32, seed=L, inactive=[(0, 1), (L - 1, 2)]), dtype)


@pytest.mark.parametrize("rank", [1, 7, 16, 17, 64, 128])
def test_ranks_1_to_128(rank):
    width = -(-rank // 16) * 16
    # a second slot of smaller rank in the same stack: tiles past each slot's rank are skipped, not read
    check([0] * 5 + [1] * 4 + [0], 2, width, 24, [20], [[rank, max(1, rank // 3)]], torch.bfloat16)


def test_odd_hidden_size_2049():
    # shrink over an odd input width, expand over an odd output width, through split-K and without it
    check([0] * 6 + [-1] + [1] * 3 + [2], 3, 32, 2049, [9], [[5, 32, 17]], torch.float16, variants=["sgmv"], split_k=1)
    check([0] * 6 + [-1] + [1] * 3 + [2], 3, 32, 2049, [9], [[5, 32, 17]], torch.float16, variants=["bgmv"], split_k=5)
    check([1, 0, 2], 3, 16, 24, [2049], [[16, 3, 9]], torch.bfloat16)


def test_64_adapters_with_mixed_ranks():
    S = 64
    slots = list(range(S)) + [9] * 3 + [63] * 2  # every slot has a segment; two of them longer ones
    check(slots, S, 64, 40, [12], [[1 + (s * 7) % 64 for s in range(S)]], torch.float32)


@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_split_k_sums_partials(split_k):
    # 300 = three blocks of 128 with a ragged tail; partials of each split are added with atomics
    check([0] * 12 + [1] * 2 + [-1] * 2 + [0], 2, 32, 300, [16], [[32, 20]], torch.float32, split_k=split_k)


def test_empty_segments_and_empty_batch():
    seg = LoraSegments.from_token_slots([], DEV)
    x = torch.zeros(0, 16, device=DEV)
    buf = TL.lora_shrink_triton(x, [torch.zeros(2, 16, 16, device=DEV)], seg, torch.ones(2, device=DEV), torch.ones(1, 2, dtype=torch.int32, device=DEV))
    assert buf.shape == (1, 0, 16)
    # a segment table with zero-length segments (one in the middle, one of a no-adapter run at the end)
    s = LoraSegments(
        seg_starts=torch.tensor([0, 2, 2, 4, 4], dtype=torch.int32, device=DEV),
        seg_slots=torch.tensor([0, 1, 1, -1], dtype=torch.int32, device=DEV),
        token_slots=torch.tensor([0, 0, 1, 1], dtype=torch.int32, device=DEV),
        seg_starts_host=[0, 2, 2, 4, 4], seg_slots_host=[0, 1, 1, -1], max_seg_len=2, num_tokens=4,
    )
    check([0, 0, 1, 1], 2, 16, 8, [8], [[4, 4]], seg=s)


def test_no_programs_for_tokens_without_adapter():
    seg = LoraSegments.from_token_slots([-1] * 50 + [3] * 40 + [-1] * 7 + [1, 2], DEV)
    plan = TL.batch_plan(seg, torch.device(DEV))
    assert plan.block_m == 32
    tiles = [tuple(t) for t in plan.tiles(plan.block_m).cpu().tolist()]
    assert tiles == [(3, 50, 90), (3, 82, 90), (1, 97, 98), (2, 98, 99)]
    assert [tuple(r) for r in plan.rows().cpu().tolist()] == [(m, 3) for m in range(50, 90)] + [(97, 1), (98, 2)]


def test_backend_chosen_once_runs_triton_when_forced(monkeypatch):
    """select_backend (once per runner) reaches the kernels under LORAPLEX_KERNELS=triton and agrees with torch."""
    slots, S, outs = [0] * 6 + [-1] * 2 + [1, 2, 1], 3, [16, 8, 8]
    ranks = torch.tensor(random_ranks(3, S, 16, seed=5), dtype=torch.int32)
    A, B = stacks(S, 16, 24, outs, ranks, torch.float32, 5)
    x = torch.randn(len(slots), 24).to(DEV)
    y0 = torch.randn(len(slots), sum(outs)).to(DEV)
    scales = torch.full((S,), 0.75, device=DEV)
    seg = LoraSegments.from_token_slots(slots, DEV)

    def run(backend):
        return backend.apply(backend.plan(seg), y0.clone(), x, A, B, scales, ranks.to(DEV), [0, 16, 24])

    monkeypatch.setenv("LORAPLEX_KERNELS", "torch")
    torch_backend = K.select_backend(DEV)
    assert torch_backend.name == "torch"
    ref = run(torch_backend)
    calls = []
    for name in ("lora_shrink_triton", "lora_expand_triton"):
        real = getattr(TL, name)
        monkeypatch.setattr(TL, name, lambda *a, _real=real, _n=name: calls.append(_n) or _real(*a))
    monkeypatch.setenv("LORAPLEX_KERNELS", "triton")
    triton_backend = K.select_backend(DEV)
    monkeypatch.setenv("LORAPLEX_KERNELS", "torch")  # read once, at selection: a later change does not matter
    got = run(triton_backend)
    assert calls == ["lora_shrink_triton", "lora_expand_triton"]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    monkeypatch.setenv("LORAPLEX_KERNELS", "tritton")
    with pytest.raises(ValueError, match="LORAPLEX_KERNELS"):
        K.select_backend(DEV)


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the other tests compile and run the kernels for real")
@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None, reason="this triton has no CUDA backend")
def test_kernels_compile_for_the_gpu():
    """The interpreter does not check GPU constraints (tl.dot tile sizes, pointer types, shared memory): compile
    every configuration the wrappers launch for an H100/H200 (sm_90) with Triton's ptxas, no GPU needed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-m", "loraplex.kernels.compile_check", "--arch", "90"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for kernel in ("_sgmv_shrink", "_bgmv_shrink", "_sgmv_expand", "_bgmv_expand"):
        assert kernel in run.stdout
    assert "0 over the shared-memory limit" in run.stdout


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("shape", ["decode", "prefill"])
def test_popularity_patterns_match_reference(pattern, shape):
    lengths = [1] if shape == "decode" else [5, 2, 7, 3]
    slots = pattern_batch(pattern, 12, 6, lengths)
    check(slots, 6, 16, 40, [24], random_ranks(1, 6, 16, seed=3), torch.float32)


def test_rank_256_the_servers_default_maximum():
    # two slots at rank 256 and a smaller one: 16 rank tiles, all but the first skipped for the small slot
    check([0] * 3 + [1] * 2 + [2] * 4, 3, 256, 24, [20], [[256, 256, 40]], torch.float32)


# (name, hidden, [q, k, v] widths, [gate, up] width) of models people serve
REAL_WIDTHS = [("llama-3-8b", 4096, [4096, 1024, 1024], 14336), ("qwen2.5-7b", 3584, [3584, 512, 512], 18944)]


@pytest.mark.parametrize("model,H,qkv,ffn", REAL_WIDTHS, ids=[w[0] for w in REAL_WIDTHS])
@pytest.mark.parametrize("pattern", ["distinct", "zipf", "skewed"])
@pytest.mark.parametrize("rank", [16, 64])
@pytest.mark.parametrize("shape", ["decode", "prefill"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_real_model_widths_on_the_gpu(model, H, qkv, ffn, pattern, rank, shape):
    S = 8
    slots = pattern_batch(pattern, 32, S, [1] if shape == "decode" else [37, 120, 5, 64])
    ranks = random_ranks(3, S, rank, seed=rank)
    check(slots, S, rank, H, qkv, ranks, torch.bfloat16)  # fused q/k/v
    check(slots, S, rank, H, [ffn, ffn], ranks[:2], torch.bfloat16)  # fused gate/up
    check(slots, S, rank, ffn, [H], ranks[:1], torch.bfloat16)  # down_proj
