"""Triton kernels for segmented multi-LoRA: shrink (buf = scale · x·Aᵀ) and expand (y += buf·Bᵀ).

Same signatures and results as `reference.lora_shrink_ref` / `lora_expand_ref`
(shapes are documented there); the dispatch in `loraplex.kernels` calls them
for CUDA tensors.

Design
- A work list, not a grid over segments. Once per batch (cached on the
  `LoraSegments`, so every layer of a step reuses it) the host lists the work
  that carries an adapter: SGMV tiles (slot, first row, segment end) of
  BLOCK_M tokens cut from each adapter segment, or, for BGMV, the (row, slot)
  of each adapter token. The grid is exactly that list: tokens with no
  adapter and empty segments launch no program at all, and a skewed batch
  (one adapter with nearly every token) wastes no programs on short segments.
- Two variants behind one signature, picked per batch: SGMV (segmented,
  prefill) multiplies a tile of BLOCK_M tokens of one adapter with `tl.dot`,
  so each weight tile is loaded once per token tile; BGMV (gathered, decode)
  gives each token its own programs, which read its slot's weights with
  elementwise products and one reduction. BGMV is chosen when adapter
  segments average at most two tokens (one token per request in decode).
- Mixed ranks without padding to the largest: ranks are cut in tiles of 16
  (the engine stacks each module to a multiple of 16). Shrink puts the rank
  tile on the grid and a program whose tile starts at or past its slot's rank
  in that slice (rank 0: the slot does not use this module) returns at once;
  expand loops over rank tiles only up to the slot's rank. Weight rows past a
  slot's rank are never read.
- All slices in one launch (fused q/k/v of different widths under GQA,
  gate/up): the slice index is part of the grid and each program picks its
  slice's weight pointer, strides, width and column offset from scalar
  arguments (up to three slices per launch; more are split into groups of
  three). A layer call copies nothing from host to device; the work lists
  are copied once per batch.
- Decode parallelism: when the shrink grid is smaller than WAVES waves of
  the GPU, the hidden dimension is split (split-K) and the partial sums are
  added with fp32 atomics into the zeroed `buf`; only the order of those
  fp32 additions can vary between runs.
- Numerics: fp16 / bf16 / fp32 inputs, fp32 accumulation, `buf` is fp32,
  expand adds into y in y's dtype. Tiles are widened to fp32 before `tl.dot`:
  for 16-bit weights the dot runs in TF32, which holds fp16/bf16 values
  exactly (expand rounds `buf` to TF32 there, no coarser than the 16-bit
  output's own rounding); for fp32 weights it runs in IEEE fp32. Widening
  also keeps one code path under Triton's CPU interpreter, whose bf16
  `tl.dot` gives wrong results in triton 3.9.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .segments import LoraSegments

BLOCK_R = 16  # rank tile; the engine's stacks are multiples of it
SLICES_PER_LAUNCH = 3
SHRINK_BLOCK_K_SGMV = 128
SHRINK_BLOCK_K_BGMV = 256
EXPAND_BLOCK_N = 128
MAX_SPLIT_K = 32
WAVES = 2  # shrink grids smaller than WAVES x SM count get split-K


@triton.jit
def _pick(i, v0, v1, v2):
    # the value of slice i among three scalar kernel arguments
    if i == 0:
        v = v0
    elif i == 1:
        v = v1
    else:
        v = v2
    return v


@triton.jit
def _sgmv_shrink(x_ptr, a0, a1, a2, buf_ptr, tiles, scales, ranks,
                 H, K_PER_SPLIT, RT,
                 sxm, sxk, sas, sar, sak, sbl, sbm, sbr, srl,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                 ATOMIC: tl.constexpr, PRECISION: tl.constexpr):
    # grid: (tile, slice * RT + rank tile, K split)
    tile = tl.program_id(0)
    sl = tl.program_id(1) // RT
    r0 = (tl.program_id(1) % RT) * BLOCK_R
    slot = tl.load(tiles + tile * 3)
    rank = tl.load(ranks + sl * srl + slot)
    if r0 >= rank:
        return
    start = tl.load(tiles + tile * 3 + 1)
    end = tl.load(tiles + tile * 3 + 2)
    a_ptr = _pick(sl, a0, a1, a2) + slot.to(tl.int64) * sas
    scale = tl.load(scales + slot)
    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    rr = r0 + tl.arange(0, BLOCK_R)
    mask_r = rr < rank
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * sxm
    k_lo = tl.program_id(2) * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, H)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < k_hi
        xt = tl.load(x_rows + kk[None, :] * sxk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        at = tl.load(a_ptr + rr[None, :] * sar + kk[:, None] * sak, mask=mask_r[None, :] & mask_k[:, None], other=0.0)  # [BLOCK_K, BLOCK_R]
        acc = tl.dot(xt.to(tl.float32), at.to(tl.float32), acc, input_precision=PRECISION)
    out = buf_ptr + sl * sbl + offs_m[:, None] * sbm + rr[None, :] * sbr
    if ATOMIC:
        tl.atomic_add(out, acc * scale, mask=mask_m[:, None] & mask_r[None, :])
    else:
        tl.store(out, acc * scale, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _bgmv_shrink(x_ptr, a0, a1, a2, buf_ptr, rows, scales, ranks,
                 H, K_PER_SPLIT, RT,
                 sxm, sxk, sas, sar, sak, sbl, sbm, sbr, srl,
                 BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, ATOMIC: tl.constexpr):
    # grid: (adapter token, slice * RT + rank tile, K split)
    t = tl.load(rows + tl.program_id(0) * 2)
    slot = tl.load(rows + tl.program_id(0) * 2 + 1)
    sl = tl.program_id(1) // RT
    r0 = (tl.program_id(1) % RT) * BLOCK_R
    rank = tl.load(ranks + sl * srl + slot)
    if r0 >= rank:
        return
    a_ptr = _pick(sl, a0, a1, a2) + slot.to(tl.int64) * sas
    scale = tl.load(scales + slot)
    rr = r0 + tl.arange(0, BLOCK_R)
    mask_r = rr < rank
    offs_k = tl.arange(0, BLOCK_K)
    x_row = x_ptr + t.to(tl.int64) * sxm
    k_lo = tl.program_id(2) * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, H)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)  # reduced once after the loop
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < k_hi
        xv = tl.load(x_row + kk * sxk, mask=mask_k, other=0.0)  # [BLOCK_K]
        at = tl.load(a_ptr + rr[:, None] * sar + kk[None, :] * sak, mask=mask_r[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_R, BLOCK_K]
        acc += at.to(tl.float32) * xv.to(tl.float32)[None, :]
    out = buf_ptr + sl * sbl + t * sbm + rr * sbr
    val = tl.sum(acc, axis=1) * scale
    if ATOMIC:
        tl.atomic_add(out, val, mask=mask_r)
    else:
        tl.store(out, val, mask=mask_r)


@triton.jit
def _sgmv_expand(y_ptr, buf_ptr, b0, b1, b2, tiles, ranks,
                 n0, n1, n2, off0, off1, off2,
                 sbs0, sbn0, sbk0, sbs1, sbn1, sbk1, sbs2, sbn2, sbk2,
                 sym, syn, sbl, sbm, sbr, srl, NB,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                 PRECISION: tl.constexpr):
    # grid: (tile, slice * NB + block of outputs)
    tile = tl.program_id(0)
    sl = tl.program_id(1) // NB
    n_lo = (tl.program_id(1) % NB) * BLOCK_N
    slot = tl.load(tiles + tile * 3)
    rank = tl.load(ranks + sl * srl + slot)
    N = _pick(sl, n0, n1, n2)
    if (rank == 0) | (n_lo >= N):
        return
    start = tl.load(tiles + tile * 3 + 1)
    end = tl.load(tiles + tile * 3 + 2)
    # each slice has its own width, hence its own strides
    sbn = _pick(sl, sbn0, sbn1, sbn2)
    sbk = _pick(sl, sbk0, sbk1, sbk2)
    b_ptr = _pick(sl, b0, b1, b2) + slot.to(tl.int64) * _pick(sl, sbs0, sbs1, sbs2)
    off = _pick(sl, off0, off1, off2)
    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        rr = r0 + offs_r
        mask_r = rr < rank
        bt = tl.load(buf_ptr + sl * sbl + offs_m[:, None] * sbm + rr[None, :] * sbr, mask=mask_m[:, None] & mask_r[None, :], other=0.0)  # [BLOCK_M, BLOCK_R]
        wt = tl.load(b_ptr + offs_n[None, :] * sbn + rr[:, None] * sbk, mask=mask_n[None, :] & mask_r[:, None], other=0.0)  # [BLOCK_R, BLOCK_N]
        acc = tl.dot(bt, wt.to(tl.float32), acc, input_precision=PRECISION)
    yp = y_ptr + offs_m[:, None].to(tl.int64) * sym + (off + offs_n[None, :]) * syn
    msk = mask_m[:, None] & mask_n[None, :]
    yv = tl.load(yp, mask=msk, other=0.0)
    tl.store(yp, (yv.to(tl.float32) + acc).to(yv.dtype), mask=msk)


@triton.jit
def _bgmv_expand(y_ptr, buf_ptr, b0, b1, b2, rows, ranks,
                 n0, n1, n2, off0, off1, off2,
                 sbs0, sbn0, sbk0, sbs1, sbn1, sbk1, sbs2, sbn2, sbk2,
                 sym, syn, sbl, sbm, sbr, srl, NB,
                 BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    # grid: (adapter token, slice * NB + block of outputs)
    t = tl.load(rows + tl.program_id(0) * 2)
    slot = tl.load(rows + tl.program_id(0) * 2 + 1)
    sl = tl.program_id(1) // NB
    n_lo = (tl.program_id(1) % NB) * BLOCK_N
    rank = tl.load(ranks + sl * srl + slot)
    N = _pick(sl, n0, n1, n2)
    if (rank == 0) | (n_lo >= N):
        return
    sbn = _pick(sl, sbn0, sbn1, sbn2)
    sbk = _pick(sl, sbk0, sbk1, sbk2)
    b_ptr = _pick(sl, b0, b1, b2) + slot.to(tl.int64) * _pick(sl, sbs0, sbs1, sbs2)
    off = _pick(sl, off0, off1, off2)
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)  # reduced once after the loop
    for r0 in range(0, rank, BLOCK_R):
        rr = r0 + offs_r
        mask_r = rr < rank
        bv = tl.load(buf_ptr + sl * sbl + t * sbm + rr * sbr, mask=mask_r, other=0.0)  # [BLOCK_R]
        wt = tl.load(b_ptr + offs_n[:, None] * sbn + rr[None, :] * sbk, mask=mask_n[:, None] & mask_r[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
        acc += wt.to(tl.float32) * bv[None, :]
    yp = y_ptr + t.to(tl.int64) * sym + (off + offs_n) * syn
    yv = tl.load(yp, mask=mask_n, other=0.0)
    tl.store(yp, (yv.to(tl.float32) + tl.sum(acc, axis=1)).to(yv.dtype), mask=mask_n)


# --- host side -------------------------------------------------------------------------------


class _BatchPlan:
    """Device-side work lists of one batch, built once and shared by every LoRA layer of the step."""

    def __init__(self, seg: LoraSegments, device: torch.device):
        starts, slots = seg.seg_starts_host, seg.seg_slots_host
        spans = [(s, starts[j], starts[j + 1]) for j, s in enumerate(slots) if s >= 0 and starts[j + 1] > starts[j]]
        self.device = device
        self.spans = spans  # adapter segments: (slot, start, end)
        self.num_tokens = sum(e - a for _, a, e in spans)
        self.max_len = max((e - a for _, a, e in spans), default=0)
        self.gathered = self.num_tokens <= 2 * len(spans)
        self._tiles: dict[int, torch.Tensor] = {}
        self._rows: torch.Tensor | None = None

    def tiles(self, block_m: int) -> torch.Tensor:
        """[n_tiles, 3] int32: (slot, first row, segment end) for every BLOCK_M rows of every adapter segment."""
        t = self._tiles.get(block_m)
        if t is None:
            rows = [(s, m, e) for s, a, e in self.spans for m in range(a, e, block_m)]
            t = torch.tensor(rows, dtype=torch.int32).reshape(-1, 3).to(self.device)
            self._tiles[block_m] = t
        return t

    def rows(self) -> torch.Tensor:
        """[n, 2] int32: (row, slot) of every token that carries an adapter, in order."""
        if self._rows is None:
            rows = [(m, s) for s, a, e in self.spans for m in range(a, e)]
            self._rows = torch.tensor(rows, dtype=torch.int32).reshape(-1, 2).to(self.device)
        return self._rows

    @property
    def block_m(self) -> int:
        return 16 if self.max_len <= 16 else 32 if self.max_len <= 64 else 64


def batch_plan(seg: LoraSegments, device: torch.device) -> _BatchPlan:
    """The work lists of `seg`, cached on it (a LoraSegments describes one batch and is not changed afterwards)."""
    plans = seg.__dict__.setdefault("_triton_plans", {})
    plan = plans.get(device)
    if plan is None:
        plan = plans[device] = _BatchPlan(seg, device)
    return plan


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # Triton's CPU interpreter: keeps split-K in play on small test shapes


_INTERPRETED = type(_sgmv_shrink).__name__ == "InterpretedFunction"  # TRITON_INTERPRET=1 was set at import


def _require_runnable(t: torch.Tensor) -> None:
    if not t.is_cuda and not _INTERPRETED:
        raise RuntimeError(
            "the Triton LoRA kernels need CUDA tensors; to run them on CPU set TRITON_INTERPRET=1 "
            "before loraplex.kernels.triton_lora is imported"
        )


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _groups(n: int):
    return [range(g, min(g + SLICES_PER_LAUNCH, n)) for g in range(0, n, SLICES_PER_LAUNCH)]


def _pad3(vals: list):
    return list(vals) + [vals[0]] * (SLICES_PER_LAUNCH - len(vals))


def _split(programs: int, H: int, block_k: int, sms: int, split_k: int | None) -> tuple[int, int]:
    """(number of K splits, hidden columns per split)."""
    k_blocks = triton.cdiv(H, block_k)
    if split_k is None:
        target = WAVES * sms
        split_k = 1 if programs >= target else triton.cdiv(target, max(programs, 1))
    split_k = max(1, min(split_k, k_blocks, MAX_SPLIT_K))
    per_split = triton.cdiv(k_blocks, split_k) * block_k
    return triton.cdiv(H, per_split), per_split


class Launch(NamedTuple):
    """One kernel launch as the wrappers make it (also what `compile_check` compiles offline)."""

    kernel: object
    grid: tuple[int, ...]
    args: tuple
    meta: dict

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.meta)


def _check_shrink(x: torch.Tensor, A: list[torch.Tensor]) -> None:
    for a in A[1:]:
        if a.stride() != A[0].stride() or a.shape != A[0].shape or a.dtype != A[0].dtype:
            raise ValueError(f"all A slices must share shape, strides and dtype; got {tuple(a.shape)} {a.stride()} vs {tuple(A[0].shape)} {A[0].stride()}")
    if x.dtype != A[0].dtype:
        raise ValueError(f"x is {x.dtype} but A is {A[0].dtype}")


def _check_expand(y: torch.Tensor, buf: torch.Tensor, B: list[torch.Tensor]) -> None:
    b0 = B[0]
    for b in B:
        if b.dtype != b0.dtype or b.shape[0] != b0.shape[0] or b.shape[2] != b0.shape[2]:
            raise ValueError("all B slices must share dtype, slot count and rank width")
    if y.dtype != b0.dtype:
        raise ValueError(f"y is {y.dtype} but B is {b0.dtype}")
    if buf.dtype != torch.float32:
        raise ValueError(f"buf must be fp32, got {buf.dtype}")


def shrink_launches(x, A, seg, scales, ranks, buf, *, variant=None, split_k=None, sm_count=None) -> list[Launch]:
    """The launches that fill `buf` ([L, T, R] fp32, zeroed); inputs already checked and on x's device."""
    H = x.shape[1]
    R = A[0].shape[1]
    plan = batch_plan(seg, x.device)
    if plan.num_tokens == 0 or R == 0:
        return []
    sms = sm_count or _sm_count(x.device)
    gathered = plan.gathered if variant is None else variant == "bgmv"
    a = A[0]
    RT = triton.cdiv(R, BLOCK_R)
    strides = (x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2),
               buf.stride(0), buf.stride(1), buf.stride(2), ranks.stride(0))
    out = []
    for g in _groups(len(A)):
        ptrs = _pad3([A[i] for i in g])
        sub_buf, rk = buf[g.start:g.stop], ranks[g.start:g.stop]
        if gathered:
            rows = plan.rows()
            block_k = min(SHRINK_BLOCK_K_BGMV, max(16, triton.next_power_of_2(H)))
            n_split, per_split = _split(rows.shape[0] * len(g) * RT, H, block_k, sms, split_k)
            out.append(Launch(_bgmv_shrink, (rows.shape[0], len(g) * RT, n_split),
                              (x, *ptrs, sub_buf, rows, scales, rk, H, per_split, RT, *strides),
                              dict(BLOCK_K=block_k, BLOCK_R=BLOCK_R, ATOMIC=n_split > 1)))
        else:
            tiles = plan.tiles(plan.block_m)
            block_k = min(SHRINK_BLOCK_K_SGMV, max(16, triton.next_power_of_2(H)))
            n_split, per_split = _split(tiles.shape[0] * len(g) * RT, H, block_k, sms, split_k)
            out.append(Launch(_sgmv_shrink, (tiles.shape[0], len(g) * RT, n_split),
                              (x, *ptrs, sub_buf, tiles, scales, rk, H, per_split, RT, *strides),
                              dict(BLOCK_M=plan.block_m, BLOCK_K=block_k, BLOCK_R=BLOCK_R, ATOMIC=n_split > 1,
                                   PRECISION=_precision(a.dtype))))
    return out


def expand_launches(y, buf, B, seg, ranks, offsets, *, variant=None) -> list[Launch]:
    """The launches that add buf·Bᵀ into y; inputs already checked and on y's device."""
    plan = batch_plan(seg, y.device)
    if plan.num_tokens == 0:
        return []
    gathered = plan.gathered if variant is None else variant == "bgmv"
    out = []
    for g in _groups(len(B)):
        Bs = [B[i] for i in g]
        widths = [b.shape[1] for b in Bs]
        block_n = min(EXPAND_BLOCK_N, max(16, triton.next_power_of_2(max(widths))))
        NB = triton.cdiv(max(widths), block_n)
        strides = [s for b in _pad3(Bs) for s in b.stride()]
        scalars = (*_pad3(widths), *_pad3([int(offsets[i]) for i in g]), *strides,
                   y.stride(0), y.stride(1), buf.stride(0), buf.stride(1), buf.stride(2), ranks.stride(0), NB)
        sub_buf, rk = buf[g.start:g.stop], ranks[g.start:g.stop]
        if gathered:
            rows = plan.rows()
            out.append(Launch(_bgmv_expand, (rows.shape[0], len(g) * NB),
                              (y, sub_buf, *_pad3(Bs), rows, rk, *scalars),
                              dict(BLOCK_N=block_n, BLOCK_R=BLOCK_R)))
        else:
            tiles = plan.tiles(plan.block_m)
            out.append(Launch(_sgmv_expand, (tiles.shape[0], len(g) * NB),
                              (y, sub_buf, *_pad3(Bs), tiles, rk, *scalars),
                              dict(BLOCK_M=plan.block_m, BLOCK_N=block_n, BLOCK_R=BLOCK_R, PRECISION=_precision(B[0].dtype))))
    return out


def lora_shrink_triton(x: torch.Tensor, A: list[torch.Tensor], seg: LoraSegments, scales: torch.Tensor,
                       ranks: torch.Tensor, *, variant: str | None = None, split_k: int | None = None) -> torch.Tensor:
    """buf[i, t, :r] = scale[slot(t)] * x[t] @ A[i][slot(t), :r].T in fp32; `variant` ("sgmv" / "bgmv") and
    `split_k` override the per-batch choices (tests)."""
    _check_shrink(x, A)
    buf = torch.zeros((len(A), x.shape[0], A[0].shape[1]), dtype=torch.float32, device=x.device)
    ranks = ranks.to(device=x.device, dtype=torch.int32).contiguous()
    scales = scales.to(device=x.device, dtype=torch.float32).contiguous()
    launches = shrink_launches(x, A, seg, scales, ranks, buf, variant=variant, split_k=split_k)
    if launches:
        _require_runnable(x)
    for launch in launches:
        launch()
    return buf


def lora_expand_triton(y: torch.Tensor, buf: torch.Tensor, B: list[torch.Tensor], seg: LoraSegments,
                       ranks: torch.Tensor, offsets: list[int], *, variant: str | None = None) -> torch.Tensor:
    """y[t, off_i:off_i+N_i] += buf[i, t, :r] @ B[i][slot(t), :, :r].T in place; returns y."""
    _check_expand(y, buf, B)
    ranks = ranks.to(device=y.device, dtype=torch.int32).contiguous()
    launches = expand_launches(y, buf, B, seg, ranks, offsets, variant=variant)
    if launches:
        _require_runnable(y)
    for launch in launches:
        launch()
    return y
