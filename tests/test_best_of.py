"""`best_of` on /v1/completions: best_of candidates generated, the n with the highest mean logprob answered."""
from __future__ import annotations

import httpx
import pytest


def _post(server, **body):
    body = {"model": server.state.service.model_id, "prompt": "Once upon a", **body}
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)


def _mean(lp: dict) -> float:
    return sum(lp["token_logprobs"]) / len(lp["token_logprobs"])


@pytest.fixture(scope="module")
def candidates(server):
    """The 4 candidates best_of=4 draws (choice i is seeded seed + i), with their logprobs, best first."""
    r = _post(server, n=4, seed=11, temperature=1.0, max_tokens=6, logprobs=0)
    assert r.status_code == 200, r.text
    ch = r.json()["choices"]
    assert len({c["text"] for c in ch}) == 4 and len({round(_mean(c["logprobs"]), 6) for c in ch}) == 4
    return sorted(ch, key=lambda c: _mean(c["logprobs"]), reverse=True), r.json()["usage"]


def test_best_of_answers_the_candidate_with_the_highest_mean_logprob(server, candidates):
    ranked, usage = candidates
    r = _post(server, best_of=4, seed=11, temperature=1.0, max_tokens=6)
    assert r.status_code == 200, r.text
    [c] = r.json()["choices"]
    assert c["text"] == ranked[0]["text"] and c["index"] == 0
    assert c["logprobs"] is None  # not asked for: ranking needs them, the answer does not show them
    assert r.json()["usage"] == usage  # every candidate's tokens were generated


def test_best_of_with_n_answers_the_n_best_in_order(server, candidates):
    ranked, _ = candidates
    r = _post(server, best_of=4, n=2, seed=11, temperature=1.0, max_tokens=6, logprobs=1)
    assert r.status_code == 200, r.text
    ch = r.json()["choices"]
    assert [c["text"] for c in ch] == [c["text"] for c in ranked[:2]] and [c["index"] for c in ch] == [0, 1]
    assert [len(c["logprobs"]["tokens"]) for c in ch] == [6, 6]


@pytest.mark.parametrize("body", [{"best_of": 1, "n": 2}, {"best_of": 2, "stream": True}])
def test_best_of_below_n_or_streamed_is_a_400_naming_best_of(server, body):
    r = _post(server, max_tokens=2, **body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of", r.text
