"""Triton kernels for segmented LoRA: shrink (x -> x·Aᵀ·scale) and expand (y += buf·Bᵀ).

Design
- Two families behind one signature. SGMV (segmented): one program per
  (segment, block of BLOCK_M tokens, slice [, block of outputs]); the tokens
  of a segment share one adapter, so its weight tiles are loaded once per
  block and reused with `tl.dot` (prefill: long segments). BGMV (gathered):
  one program per (token, slice [, block of outputs]) reading the token's
  own slot (decode: one token per request). The dispatch picks BGMV when the
  average segment is at most 2 tokens long.
- Several output slices in one launch (fused q/k/v under GQA, gate/up): the
  slices' weights are passed as a device table of base pointers, with their
  widths and column offsets, so one grid covers all of them.
- Mixed ranks without padding to the largest: weights are stacked per slot
  with a width rounded up to 16, each (slice, slot) has its true rank and the
  rank loop stops there (`for r0 in range(0, rank, BLOCK_R)`); a rank of 0
  (slot not active in this module) or slot -1 (no adapter) returns at once,
  so tokens without an adapter cost one load.
- fp16 / bf16 / fp32 inputs; products accumulate in fp32; `buf` is fp32;
  expand adds into y in y's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .segments import LoraSegments

BLOCK_R = 16


def _ptr_table(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64, device=ts[0].device)


@triton.jit
def _sgmv_shrink(x_ptr, a_tab, buf_ptr, seg_starts, seg_slots, scales, ranks,
                 S, H, R_buf, T,
                 sxm, sxk, sas, sar, sak, sbl, sbm, sbr, srl,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    sl = tl.program_id(2)
    slot = tl.load(seg_slots + seg)
    if slot < 0:
        return
    rank = tl.load(ranks + sl * srl + slot)
    if rank == 0:
        return
    start = tl.load(seg_starts + seg)
    end = tl.load(seg_starts + seg + 1)
    m0 = start + pid_m * BLOCK_M
    if m0 >= end:
        return
    a_ptr = tl.load(a_tab + sl).to(tl.pointer_type(x_ptr.dtype.element_ty))
    scale = tl.load(scales + slot)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, rank, BLOCK_R):
        rr = r0 + offs_r
        mask_r = rr < rank
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < H
            xt = tl.load(x_ptr + offs_m[:, None] * sxm + kk[None, :] * sxk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            at = tl.load(a_ptr + slot * sas + rr[None, :] * sar + kk[:, None] * sak, mask=mask_r[None, :] & mask_k[:, None], other=0.0)
            acc += tl.dot(xt.to(tl.float32), at.to(tl.float32))
        tl.store(buf_ptr + sl * sbl + offs_m[:, None] * sbm + rr[None, :] * sbr, acc * scale, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _bgmv_shrink(x_ptr, a_tab, buf_ptr, token_slots, scales, ranks,
                 H, sxm, sxk, sas, sar, sak, sbl, sbm, sbr, srl,
                 BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0)
    sl = tl.program_id(1)
    slot = tl.load(token_slots + t)
    if slot < 0:
        return
    rank = tl.load(ranks + sl * srl + slot)
    if rank == 0:
        return
    a_ptr = tl.load(a_tab + sl).to(tl.pointer_type(x_ptr.dtype.element_ty))
    scale = tl.load(scales + slot)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, rank, BLOCK_R):
        rr = r0 + offs_r
        mask_r = rr < rank
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < H
            xv = tl.load(x_ptr + t * sxm + kk * sxk, mask=mask_k, other=0.0).to(tl.float32)
            at = tl.load(a_ptr + slot * sas + rr[:, None] * sar + kk[None, :] * sak, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            acc += tl.sum(at.to(tl.float32) * xv[None, :], axis=1)
        tl.store(buf_ptr + sl * sbl + t * sbm + rr * sbr, acc * scale, mask=mask_r)


@triton.jit
def _sgmv_expand(y_ptr, buf_ptr, b_tab, b_strides, seg_starts, seg_slots, ranks, widths, offsets,
                 sym, syn, sbl, sbm, sbr, srl, NB,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    pid = tl.program_id(2)  # (slice, block of outputs) flattened: pid = slice * NB + block
    sl = pid // NB
    nb = pid % NB
    slot = tl.load(seg_slots + seg)
    if slot < 0:
        return
    rank = tl.load(ranks + sl * srl + slot)
    if rank == 0:
        return
    N = tl.load(widths + sl)
    n0 = nb * BLOCK_N
    if n0 >= N:
        return
    start = tl.load(seg_starts + seg)
    end = tl.load(seg_starts + seg + 1)
    m0 = start + pid_m * BLOCK_M
    if m0 >= end:
        return
    b_ptr = tl.load(b_tab + sl).to(tl.pointer_type(y_ptr.dtype.element_ty))
    sbs = tl.load(b_strides + sl * 3)  # each slice has its own width, hence its own strides
    sbn = tl.load(b_strides + sl * 3 + 1)
    sbk = tl.load(b_strides + sl * 3 + 2)
    off = tl.load(offsets + sl)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        rr = r0 + offs_r
        mask_r = rr < rank
        bt = tl.load(buf_ptr + sl * sbl + offs_m[:, None] * sbm + rr[None, :] * sbr, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        wt = tl.load(b_ptr + slot * sbs + offs_n[None, :] * sbn + rr[:, None] * sbk, mask=mask_n[None, :] & mask_r[:, None], other=0.0)
        acc += tl.dot(bt, wt.to(tl.float32))
    yp = y_ptr + offs_m[:, None] * sym + (off + offs_n[None, :]) * syn
    msk = mask_m[:, None] & mask_n[None, :]
    yv = tl.load(yp, mask=msk, other=0.0)
    tl.store(yp, (yv.to(tl.float32) + acc).to(yv.dtype), mask=msk)


@triton.jit
def _bgmv_expand(y_ptr, buf_ptr, b_tab, b_strides, token_slots, ranks, widths, offsets,
                 sym, syn, sbl, sbm, sbr, srl, NB,
                 BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0)
    pid = tl.program_id(1)
    sl = pid // NB
    nb = pid % NB
    slot = tl.load(token_slots + t)
    if slot < 0:
        return
    rank = tl.load(ranks + sl * srl + slot)
    if rank == 0:
        return
    N = tl.load(widths + sl)
    n0 = nb * BLOCK_N
    if n0 >= N:
        return
    b_ptr = tl.load(b_tab + sl).to(tl.pointer_type(y_ptr.dtype.element_ty))
    sbs = tl.load(b_strides + sl * 3)  # each slice has its own width, hence its own strides
    sbn = tl.load(b_strides + sl * 3 + 1)
    sbk = tl.load(b_strides + sl * 3 + 2)
    off = tl.load(offsets + sl)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        rr = r0 + offs_r
        mask_r = rr < rank
        bv = tl.load(buf_ptr + sl * sbl + t * sbm + rr * sbr, mask=mask_r, other=0.0)
        wt = tl.load(b_ptr + slot * sbs + offs_n[:, None] * sbn + rr[None, :] * sbk, mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        acc += tl.sum(wt.to(tl.float32) * bv[None, :], axis=1)
    yp = y_ptr + t * sym + (off + offs_n) * syn
    yv = tl.load(yp, mask=mask_n, other=0.0)
    tl.store(yp, (yv.to(tl.float32) + acc).to(yv.dtype), mask=mask_n)


def _use_gathered(seg: LoraSegments) -> bool:
    return seg.num_tokens <= 2 * max(1, seg.num_segments)


def _check_same_layout(ts: list[torch.Tensor], what: str) -> None:
    # one pointer table addresses every slice with slice 0's strides
    for t in ts[1:]:
        if t.stride() != ts[0].stride() or t.dtype != ts[0].dtype or t.shape[0] != ts[0].shape[0]:
            raise ValueError(f"all {what} slices must share dtype, strides and slot count; got {tuple(t.shape)} {t.stride()} vs {tuple(ts[0].shape)} {ts[0].stride()}")


def lora_shrink_triton(x: torch.Tensor, A: list[torch.Tensor], seg: LoraSegments, scales: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    T, H = x.shape
    L = len(A)
    S, R, _ = A[0].shape
    _check_same_layout(A, "A")
    if x.dtype != A[0].dtype:
        raise ValueError(f"x is {x.dtype} but A is {A[0].dtype}")
    buf = torch.zeros((L, T, R), dtype=torch.float32, device=x.device)
    if T == 0 or seg.num_segments == 0:
        return buf
    a_tab = _ptr_table(A)
    ranks = ranks.to(device=x.device, dtype=torch.int32).contiguous()
    scales = scales.to(device=x.device, dtype=torch.float32).contiguous()
    BLOCK_K = min(128, triton.next_power_of_2(H))
    a = A[0]
    if _use_gathered(seg):
        _bgmv_shrink[(T, L)](x, a_tab, buf, seg.token_slots, scales, ranks, H,
                             x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2),
                             buf.stride(0), buf.stride(1), buf.stride(2), ranks.stride(0),
                             BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R)
    else:
        BLOCK_M = 16 if seg.max_seg_len <= 16 else 32
        grid = (triton.cdiv(seg.max_seg_len, BLOCK_M), seg.num_segments, L)
        _sgmv_shrink[grid](x, a_tab, buf, seg.seg_starts, seg.seg_slots, scales, ranks, S, H, R, T,
                           x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2),
                           buf.stride(0), buf.stride(1), buf.stride(2), ranks.stride(0),
                           BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R)
    return buf


def lora_expand_triton(y: torch.Tensor, buf: torch.Tensor, B: list[torch.Tensor], seg: LoraSegments, ranks: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    T = y.shape[0]
    L = len(B)
    if T == 0 or seg.num_segments == 0:
        return y
    b0 = B[0]
    for b in B[1:]:
        if b.dtype != b0.dtype or b.shape[0] != b0.shape[0] or b.shape[2] != b0.shape[2]:
            raise ValueError("all B slices must share dtype, slot count and rank width")
    b_strides = torch.tensor([list(b.stride()) for b in B], dtype=torch.int64, device=y.device)
    if y.dtype != b0.dtype:
        raise ValueError(f"y is {y.dtype} but B is {b0.dtype}")
    b_tab = _ptr_table(B)
    widths = torch.tensor([b.shape[1] for b in B], dtype=torch.int32, device=y.device)
    offs = torch.tensor(list(offsets), dtype=torch.int32, device=y.device)
    ranks = ranks.to(device=y.device, dtype=torch.int32).contiguous()
    N_max = max(b.shape[1] for b in B)
    BLOCK_N = min(128, triton.next_power_of_2(N_max))
    NB = triton.cdiv(N_max, BLOCK_N)
    if _use_gathered(seg):
        _bgmv_expand[(T, L * NB)](y, buf, b_tab, b_strides, seg.token_slots, ranks, widths, offs,
                                  y.stride(0), y.stride(1), buf.stride(0), buf.stride(1), buf.stride(2), ranks.stride(0), NB,
                                  BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R)
    else:
        BLOCK_M = 16 if seg.max_seg_len <= 16 else 32
        grid = (triton.cdiv(seg.max_seg_len, BLOCK_M), seg.num_segments, L * NB)
        _sgmv_expand[grid](y, buf, b_tab, b_strides, seg.seg_starts, seg.seg_slots, ranks, widths, offs,
                           y.stride(0), y.stride(1), buf.stride(0), buf.stride(1), buf.stride(2), ranks.stride(0), NB,
                           BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R)
    return y
