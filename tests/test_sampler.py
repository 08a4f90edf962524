"""Batched sampling of a step (`sample_rows`) draws exactly what per-row `sample` draws."""
from __future__ import annotations

import torch

from loraplex.server.engine.request import SamplingParams
from loraplex.server.engine.sampler import first_argmax, make_generator, sample, sample_rows

PARAMS = [
    SamplingParams(temperature=1.0, seed=1, logprobs=0),
    SamplingParams(temperature=0.0, logprobs=3),
    SamplingParams(temperature=0.7, seed=2),
    SamplingParams(temperature=1.3, top_p=0.8, seed=3, logprobs=1),  # per-row path
    SamplingParams(temperature=1.0, top_k=1, seed=4),  # greedy by top_k
    SamplingParams(temperature=0.9, presence_penalty=0.5, frequency_penalty=0.3, seed=5),  # per-row path
    SamplingParams(temperature=2.0, top_k=-1, seed=6, logprobs=2),
]


def test_sample_rows_equals_sample_row_by_row():
    g = torch.Generator().manual_seed(0)
    for step in range(20):
        logits = torch.randn(len(PARAMS) + 2, 1000, generator=g) * 3
        order = torch.randperm(len(PARAMS), generator=g).tolist()  # rows in any order, some rows unused
        outs = [[7, 7, 3]] * len(PARAMS)
        got = sample_rows(logits, [(order[i], p, make_generator(1000 * step + i), outs[i]) for i, p in enumerate(PARAMS)])
        for i, p in enumerate(PARAMS):
            want = sample(logits[order[i]], p, make_generator(1000 * step + i), outs[i])
            assert got[i][0] == want[0], (step, i)
            if p.logprobs is None:
                assert got[i][1] is None and want[1] is None
            else:
                assert got[i][1].token_id == want[1].token_id and got[i][1].top == want[1].top
                assert got[i][1].logprob == want[1].logprob


def test_first_argmax_is_torch_argmax_on_ties_inf_and_nan():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (64, 5000), generator=g).float()  # many ties per row: the first one must win
    x[1] = float("-inf")
    x[2, 10:] = float("-inf")
    x[3, 7] = x[3, 9] = float("nan")
    for rows in (x, x[5:9], x[0]):
        assert torch.equal(first_argmax(rows), torch.argmax(rows, dim=-1))


def test_greedy_rows_in_order_equal_rows_out_of_order():
    """A step whose rows are the logits' consecutive rows samples from them in place; any order gives the same."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 300, generator=g)
    greedy = SamplingParams(temperature=0.0)
    before = logits.clone()
    in_order = sample_rows(logits, [(r, greedy, make_generator(0), []) for r in range(1, 5)])
    shuffled = sample_rows(logits, [(r, greedy, make_generator(0), []) for r in (3, 1, 4, 2)])
    assert [t for t, _ in in_order] == torch.argmax(logits[1:5], dim=-1).tolist()
    assert dict(zip((3, 1, 4, 2), (t for t, _ in shuffled))) == dict(zip(range(1, 5), (t for t, _ in in_order)))
    assert torch.equal(logits, before)
