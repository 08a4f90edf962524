"""Attention over the KV arenas for one flattened step, planned once and run per layer.

A step mixes prefill chunks and decode tokens of many sequences. Everything
about how they attend that does not depend on the layer is decided once, in
`AttentionPlan` (built by the model runner before the layer loop):

- where this step's keys and values go in the KV arenas
  (`server/engine/kv_cache.py`): the decode tokens of one arena in one
  indexed write per layer, a prefill chunk through its row's view;
- which decode tokens attend together: the decode steps of one arena's
  sequences form a *decode group*, attended with two batched matmuls per
  layer over the arena's rows (GQA as `[R, kv_heads, group, D]`), when at
  least two of them decode and they are at least half of the arena's rows
  (the call reads every row up to the longest, and rows not decoding attend
  to key 0 only, their output thrown away);
- everything else (prefill chunks, lone decodes) attends through its own
  row with `scaled_dot_product_attention`, its causal / sliding-window mask
  built once per window size; a step that is one sequence alone is one call
  over the whole batch.

`attend(layer, q, k, v)` then stores k/v and returns the attention output for
the whole step. The visibility rule (causal, within the window if the layer
has one) is `visible`, used for every mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def visible(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which keys each query sees: causal, and within the sliding window if the layer has one."""
    allowed = kpos <= qpos
    if window is not None:
        allowed &= kpos > qpos - window
    return allowed


@dataclass
class _DecodeGroup:
    """The decode steps of one KV arena's sequences, attended in one call per layer."""

    arena: object  # kv_cache._Arena
    rows: int  # the arena's rows in use (all read)
    width: int  # keys read per row: the longest decoding row's length
    masks: dict  # window -> [R, 1, 1, width] additive bias (0 or -inf)
    q_index: torch.Tensor  # [R] flat token index of each row's query (any index for rows not decoding)
    out_rows: torch.Tensor  # [k] rows decoding in this step
    out_flat: torch.Tensor  # [k] their flat token index
    whole: bool  # the step is this group alone, row i decoding flat token i: its output is the step's output


class AttentionPlan:
    def __init__(self, chunks: list, windows: list[int | None], *, num_heads: int, num_kv_heads: int, head_dim: int,
                 scaling: float, dtype: torch.dtype, device, allow_groups: bool = True):
        """`chunks`: the step's `SeqChunk`s in flat order; `windows[layer]`: that layer's sliding window or None."""
        self.T = sum(c.n for c in chunks)
        self.windows = windows
        self.nH, self.nKV, self.D = num_heads, num_kv_heads, head_dim
        self.scaling = scaling
        self.gqa = num_heads != num_kv_heads
        self.dtype, self.device = dtype, device
        # where each layer's new keys and values go: the decode tokens of one arena in one indexed write
        # (arena, rows, positions, their flat indices or None for all of them in order), a prefill chunk
        # through its row's view (first token, tokens, [layer] -> [2, nKV, n, D])
        decode: dict[int, tuple] = {}
        self.chunk_dst = []
        for c in chunks:
            if c.n == 1:
                d = decode.setdefault(id(c.cache.arena), (c.cache.arena, [], [], []))
                d[1].append(c.cache.row)
                d[2].append(c.past)
                d[3].append(c.start)
            else:
                self.chunk_dst.append((c.start, c.n, c.cache.kv[:, :, :, c.past : c.past + c.n].unbind(0)))
        self.decode_dst = [(arena, torch.tensor(rows, device=device), torch.tensor(pos, device=device),
                            None if toks == list(range(self.T)) else torch.tensor(toks, device=device))
                           for arena, rows, pos, toks in decode.values()]
        self.groups, single = self._decode_groups(chunks) if allow_groups else ([], list(chunks))
        self.alone = not self.groups and len(single) == 1  # one sequence: one call over the whole batch
        self.whole = len(self.groups) == 1 and self.groups[0].whole  # the step is one group: its output as is
        # window -> [(chunk, K [layer] -> [1, nKV, len, D], V likewise, mask)] for the sequences attended one by one
        self.single: dict[int | None, list] = {}
        for window in set(windows):
            per_seq = []
            for c in single:
                lo = 0 if window is None else max(0, c.past - window + 1)
                kv = c.cache.kv[:, :, None, :, lo : c.past + c.n]  # [L, 2, 1, nKV, len, D]
                per_seq.append((c, kv[:, 0].unbind(0), kv[:, 1].unbind(0), self._mask(c, window, lo)))
            self.single[window] = per_seq

    def attend(self, li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, nH, D], k/v: [T, nKV, D] of layer `li` (rotary applied) -> attention output [T, nH, D]."""
        kv_new = torch.stack((k, v), 1)  # [T, 2, nKV, D]
        for arena, rows, pos, toks in self.decode_dst:
            arena.kv[li][:, rows, :, pos] = kv_new if toks is None else kv_new.index_select(0, toks)
        for start, n, dst in self.chunk_dst:
            dst[li].copy_(kv_new[start : start + n].permute(1, 2, 0, 3))
        window = self.windows[li]
        if self.alone:
            _, K, V, mask = self.single[window][0]
            return self._sdpa(q.transpose(0, 1)[None], K[li], V[li], mask)[0].transpose(0, 1)
        out = None if self.whole else q.new_empty((self.T, self.nH, self.D))
        for c, K, V, mask in self.single[window]:
            qi = q[c.start : c.start + c.n].transpose(0, 1)[None]  # [1, nH, n, D]
            out[c.start : c.start + c.n] = self._sdpa(qi, K[li], V[li], mask)[0].transpose(0, 1)
        nKV, D = self.nKV, self.D
        for g in self.groups:
            kv = g.arena.kv[li, :, : g.rows, :, : g.width]  # [2, R, nKV, width, D]: every row of the class
            # one query per row: plain batched matmuls beat SDPA's kernel for this shape
            qg = q.index_select(0, g.q_index).view(g.rows, nKV, self.nH // nKV, D)
            scores = torch.matmul(qg, kv[0].transpose(-1, -2)).mul_(self.scaling).add_(g.masks[window])
            o = torch.matmul(torch.softmax(scores, dim=-1), kv[1]).view(g.rows, self.nH, D)
            if self.whole:
                return o
            out.index_copy_(0, g.out_flat, o.index_select(0, g.out_rows))
        return out

    def _sdpa(self, q, K, V, mask):
        return F.scaled_dot_product_attention(q, K, V, attn_mask=mask, scale=self.scaling, enable_gqa=self.gqa)

    def _decode_groups(self, chunks: list) -> tuple[list[_DecodeGroup], list]:
        """Splits the chunks into batched decode groups (one per KV arena) and chunks attended alone."""
        by_arena: dict[int, list] = {}
        single = []
        for c in chunks:
            if c.n == 1:
                by_arena.setdefault(id(c.cache.arena), []).append(c)
            else:
                single.append(c)
        groups = []
        dev = self.device
        for cs in by_arena.values():
            arena = cs[0].cache.arena
            rows = len(arena.rows)
            if len(cs) < 2 or 2 * len(cs) < rows:
                single.extend(cs)
                continue
            past = [0] * rows  # a row not decoding now sees key 0 only
            q_index = [cs[0].start] * rows
            for c in cs:
                past[c.cache.row] = c.past
                q_index[c.cache.row] = c.start
            width = max(past) + 1
            qpos = torch.tensor(past, device=dev)[:, None]
            kpos = torch.arange(width, device=dev)[None, :]
            masks = {}
            for window in set(self.windows):
                m = visible(qpos, kpos, window)
                bias = torch.zeros(m.shape, dtype=self.dtype, device=dev).masked_fill_(~m, float("-inf"))
                masks[window] = bias[:, None, None, :]  # [R, 1, 1, width], added to the scores
            out_rows = [c.cache.row for c in cs]
            groups.append(_DecodeGroup(
                arena=arena, rows=rows, width=width, masks=masks,
                q_index=torch.tensor(q_index, device=dev),
                out_rows=torch.tensor(out_rows, device=dev),
                out_flat=torch.tensor([c.start for c in cs], device=dev),
                whole=len(cs) == rows == self.T and q_index == out_rows == list(range(rows)),
            ))
        return groups, single

    def _mask(self, c, window: int | None, lo: int) -> torch.Tensor | None:
        # Query i (position past+i) sees keys lo..past+i (and within the window).
        if c.n == 1:
            return None  # one query at the newest position sees every key from lo on
        qpos = torch.arange(c.past, c.past + c.n, device=self.device)[:, None]
        kpos = torch.arange(lo, c.past + c.n, device=self.device)[None, :]
        return visible(qpos, kpos, window)[None, None]
