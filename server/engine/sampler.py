"""Per-request sampling: penalties, temperature, top-k, top-p, seeded generators, logprobs.

Every request owns a `torch.Generator`; with a seed, its draws depend only on
that seed and the request's own logits, never on what else shares the batch.

A token is drawn by an exponential race: each vocabulary entry gets its own
draw E_i ~ Exp(1) from the request's generator and the token is
argmax p_i / E_i, which picks i with probability exactly p_i. The race, unlike
an inverse CDF over 50k summed probabilities, barely depends on rounding: a
float-noise change of the logits (another batch shape, KV from the prefix
cache) changes the pick only where two tokens' scores are within that noise,
where an inverse CDF moves to the neighbouring token whenever the summed
noise reaches the drawn token's own small probability (on a flat distribution,
a few percent of draws).
Logprobs are of the model's distribution (log-softmax of the raw logits),
before logit bias, grammar mask, temperature and truncation, as OpenAI and vLLM
report them.

Before a row is sampled, its `logit_bias` is added and, for a constrained
request, its grammar's token mask applied (`structured.py`): both act on a copy
of that row only, so the other rows of the step, and what they sample, are
exactly what they would be without such neighbours.
"""
from __future__ import annotations

import os

import torch

from .request import SamplingParams, TokenLogprob
from .structured import StepMasks, apply_bitmask


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    return g


def race_draws(gen: torch.Generator, n: int) -> torch.Tensor:
    """n exponential draws, one per vocabulary entry, from the request's generator: -log(u) with u in [0, 1), so
    every draw is positive (u = 0 gives +inf: that entry cannot win) and a zero-probability entry scores 0, never NaN."""
    return torch.rand(n, generator=gen).log_().neg_()


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's largest entry, the first one on a tie (what `torch.argmax(x, -1)` gives, NaN included).
    `max(dim).indices` gives the same indices 2.5x faster on CPU: 0.45 against 1.16 ms for [32, 49152], 2 threads."""
    return torch.max(x, dim=-1).indices


def _top(lp: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    v, i = torch.topk(lp, k)
    return list(zip(i.tolist(), v.tolist()))


def token_logprob(lp_row: torch.Tensor, token: int, k: int) -> TokenLogprob:
    return TokenLogprob(token, float(lp_row[token]), _top(lp_row, k))


def sample(
    logits: torch.Tensor, params: SamplingParams, gen: torch.Generator, output_ids: list[int],
    raw: torch.Tensor | None = None,
) -> tuple[int, TokenLogprob | None]:
    """logits: [V] fp32 of one sequence (after bias and mask; `raw`: before them) -> (next token, logprob entry)."""
    raw = logits if raw is None else raw
    if params.presence_penalty or params.frequency_penalty:
        if output_ids:
            ids = torch.tensor(output_ids, dtype=torch.long)
            counts = torch.zeros_like(logits).index_add_(0, ids, torch.ones(len(output_ids)))
            logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
    if params.temperature <= 1e-5 or params.top_k == 1:
        token = int(first_argmax(logits))
    else:
        x = logits / params.temperature
        if params.top_k and params.top_k > 0:
            kth = torch.topk(x, min(params.top_k, x.shape[0])).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        if params.top_p < 1.0:
            sp, si = torch.sort(probs, descending=True)
            cum = torch.cumsum(sp, dim=-1)
            drop = cum - sp > params.top_p  # keep the smallest prefix whose mass reaches top_p
            sp = sp.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, si, sp)
        token = int(first_argmax(probs / race_draws(gen, probs.shape[0])))
    entry = None
    if params.logprobs is not None:
        entry = token_logprob(torch.log_softmax(raw, dim=-1), token, params.logprobs)
    return token, entry


def _plain(p: SamplingParams) -> bool:
    return not (p.presence_penalty or p.frequency_penalty) and (not p.top_k or p.top_k <= 1) and p.top_p >= 1.0


def _adjusted_rows(logits: torch.Tensor, rows: list, masks: StepMasks | None) -> dict[int, torch.Tensor]:
    """Rows whose logits change before sampling (logit bias, grammar mask) -> their own [V] copies, by row index."""
    mask_of = {} if masks is None else {i: k for k, i in enumerate(masks.rows)}
    idx = sorted({i for i, r in enumerate(rows) if r[1].logit_bias} | set(mask_of))
    if not idx:
        return {}
    sub = logits.index_select(0, torch.tensor([rows[i][0] for i in idx]))  # [n, V], a copy
    for k, i in enumerate(idx):
        bias = rows[i][1].logit_bias
        if bias:
            ids, vals = torch.tensor(list(bias), dtype=torch.long), torch.tensor(list(bias.values()), dtype=sub.dtype)
            sub[k].index_add_(0, ids, vals)
    if mask_of:
        ks = [k for k, i in enumerate(idx) if i in mask_of]
        bm = masks.bitmask[torch.tensor([mask_of[idx[k]] for k in ks])]
        sub[ks] = apply_bitmask(sub[ks], bm)
    return {i: sub[k] for k, i in enumerate(idx)}


def _gather(logits: torch.Tensor, rows: list, which: list[int], adjusted: dict[int, torch.Tensor]) -> torch.Tensor:
    """[len(which), V]: the logits rows of `which`, adjusted where they are (a view of `logits` when they are
    consecutive rows left as they are: a decode step's 32 rows of 49k logits are not copied)."""
    if not any(i in adjusted for i in which):
        r = [rows[i][0] for i in which]
        if r == list(range(r[0], r[0] + len(r))):
            return logits[r[0] : r[0] + len(r)]
        return logits.index_select(0, torch.tensor(r))
    return torch.stack([adjusted[i] if i in adjusted else logits[rows[i][0]] for i in which])


def sample_rows(
    logits: torch.Tensor, rows: list[tuple[int, SamplingParams, torch.Generator, list[int]]],
    masks: StepMasks | None = None,
) -> list[tuple[int, TokenLogprob | None]]:
    """`sample` for many sequences of one step: rows (row of `logits` [K, V], params, generator, output ids).

    Greedy rows and plain temperature rows (no penalty, top-k or top-p) share
    one batched op per stage, and so do the log-softmaxes of rows that want
    logprobs. Each row still draws its race from its own generator, and a
    row-wise softmax gives the same values for a row alone as in a batch, so a
    seeded request samples what `sample` would, whatever else is in the step.
    Other rows go through `sample` one by one.

    `masks`: the grammar masks of the step's constrained rows (`structured.step_bitmask`).
    """
    out: list = [None] * len(rows)
    adjusted = _adjusted_rows(logits, rows, masks)
    greedy, temp = [], []
    for i, (r, p, g, ids) in enumerate(rows):
        if _plain(p):
            (greedy if p.temperature <= 1e-5 or p.top_k == 1 else temp).append(i)
        else:
            out[i] = sample(adjusted.get(i, logits[r]), p, g, ids, raw=logits[r])
    tokens: dict[int, int] = {}
    if greedy:
        for i, t in zip(greedy, first_argmax(_gather(logits, rows, greedy, adjusted)).tolist()):
            tokens[i] = t
    if temp:
        temps = torch.tensor([rows[i][1].temperature for i in temp], dtype=logits.dtype)
        probs = torch.softmax(_gather(logits, rows, temp, adjusted) / temps[:, None], dim=-1)
        draws = torch.stack([race_draws(rows[i][2], probs.shape[1]) for i in temp])
        for i, t in zip(temp, first_argmax(probs / draws).tolist()):
            tokens[i] = t
    want = [i for i in tokens if rows[i][1].logprobs is not None]
    lps = torch.log_softmax(logits.index_select(0, torch.tensor([rows[i][0] for i in want])), dim=-1) if want else None
    for i, t in tokens.items():
        out[i] = (t, None)
    for k, i in enumerate(want):
        out[i] = (tokens[i], token_logprob(lps[k], tokens[i], rows[i][1].logprobs))
    return out
