"""PPO and GRPO on the tiny model with rollouts from our engine; the loss terms against hand-computed values."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from loraplex.trainer.config import parse_config
from loraplex.trainer.rl import gae, group_advantages, k3_kl, kl_penalized_rewards, policy_loss, value_loss


def test_loss_terms_match_hand_computed_values():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # KL-penalised rewards: -0.1 * (old - ref), the score added on the last real token
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.5], [-0.5, -2.0, 0.0]])
    r = kl_penalized_rewards(old, ref, torch.tensor([1.0, 2.0]), mask, 0.1)
    assert torch.allclose(r, torch.tensor([[-0.05, 0.0, 0.9], [0.05, 1.9, 0.0]]))
    # GAE with gamma=1, lam=0.5 on row 0: deltas d_t = r_t + V_{t+1} - V_t
    values = torch.tensor([[0.5, 0.25, 0.0], [0.0, 0.0, 0.0]])
    adv, ret = gae(r, values, mask, gamma=1.0, lam=0.5)
    d2 = 0.9 - 0.0
    d1 = 0.0 + 0.0 - 0.25
    d0 = -0.05 + 0.25 - 0.5
    a2, a1 = d2, d1 + 0.5 * d2
    a0 = d0 + 0.5 * a1
    assert torch.allclose(adv[0], torch.tensor([a0, a1, a2]))
    assert torch.allclose(ret[0], torch.tensor([a0 + 0.5, a1 + 0.25, a2]))
    assert torch.allclose(adv[1], torch.tensor([0.05 + 0.5 * 1.9, 1.9, 0.0]))
    # clipped policy loss: ratio e^{0.5}=1.6487 clipped to 1.2 for a positive advantage
    lp_new = torch.tensor([[0.5, 0.0]])
    lp_old = torch.tensor([[0.0, 0.0]])
    A = torch.tensor([[1.0, -2.0]])
    m = torch.ones(1, 2)
    pl, clipfrac = policy_loss(lp_new, lp_old, A, m, 0.2)
    assert pl.item() == pytest.approx(((-1.0 * 1.2) + (2.0 * 1.0)) / 2)
    assert clipfrac.item() == pytest.approx(0.5)
    # negative advantage with ratio below the clip range: the unclipped (larger) loss is kept
    pl2, _ = policy_loss(torch.tensor([[-0.5]]), torch.tensor([[0.0]]), torch.tensor([[-1.0]]), torch.ones(1, 1), 0.2)
    assert pl2.item() == pytest.approx(max(1.0 * math.exp(-0.5), 1.0 * 0.8))
    # clipped value loss: 0.5 * max((v - R)^2, (clip(v) - R)^2)
    vl = value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[0.5]]), torch.ones(1, 1), 0.2)
    assert vl.item() == pytest.approx(0.5 * max((1.0 - 0.5) ** 2, (0.2 - 0.5) ** 2))
    # group-normalised advantages and the k3 KL estimate
    g = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0]), 2)
    s = torch.tensor([1.0, 0.0]).std()
    assert torch.allclose(g[:2], torch.tensor([0.5 / (s + 1e-4), -0.5 / (s + 1e-4)]))
    assert torch.allclose(g[4:], torch.zeros(2))
    assert k3_kl(torch.tensor([-1.0]), torch.tensor([-1.5])).item() == pytest.approx(math.exp(-0.5) + 0.5 - 1)


@pytest.fixture(scope="module")
def char_base(tmp_path_factory):
    from helpers import make_tiny_char_llama

    return make_tiny_char_llama(tmp_path_factory.mktemp("char-base"))


def prompts_file(path: Path) -> Path:
    subjects = ["cats", "rain", "music", "bread", "trains", "stars", "paper", "tea"]
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"say something about {s}."}]}) + "\n" for s in subjects))
    return path


def rl_job(tiny_base, data, method, **kw):
    d = {"base_model": str(tiny_base), "adapter": {"name": f"{method}-bot", "r": 8, "alpha": 16}, "method": method,
         "datasets": [str(data)], "reward": {"regex": "z"}, "num_rollouts": 16, "response_length": 8,
         "max_steps": 14, "learning_rate": 1e-2, "mini_batch_size": 16, "ppo_epochs": 2, "kl_coef": 0.02, "seed": 0, "save_steps": 1000}
    if method == "grpo":
        d["num_generations"] = 4
    d.update(kw)
    return parse_config(d)


def test_rollout_logprobs_match_the_training_forward(tiny_base, tmp_path):  # the real 49k tokenizer
    from loraplex.trainer.rl import _forward, load_prompts
    from loraplex.trainer.rollout import RolloutEngine
    from loraplex.trainer.core import load_base_and_tokenizer, lora_model

    cfg = rl_job(tiny_base, prompts_file(tmp_path / "p.jsonl"), "ppo")
    base, tok, _ = load_base_and_tokenizer(cfg, torch.device("cpu"))
    model = lora_model(base, cfg)
    with torch.no_grad():  # a non-trivial adapter, as after some training
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ro = RolloutEngine(model, tok, {tok.eos_token_id})
    try:
        ro.push_policy(model)
        prompts = [ids for _, ids, _ in load_prompts(cfg.datasets[0].path, tok)]
        gens = ro.generate(prompts, max_tokens=6, temperature=1.0, seeds=list(range(len(prompts))))
        seqs = [(p, g["tokens"]) for p, g in zip(prompts, gens)]
        with torch.no_grad():
            logp, _, mask = _forward(model, None, seqs, tok.eos_token_id, "cpu")
        for i, g in enumerate(gens):
            n = len(g["tokens"])
            assert torch.allclose(logp[i, :n], torch.tensor(g["logprobs"]), atol=1e-4), i
        # the reference (a fresh LoRA is the base itself) scored by the same engine
        ro.freeze_reference(model)
        ref = ro.sequence_logprobs(seqs, ro.reference)
        with torch.no_grad(), model.disable_adapter():
            base_lp, _, _ = _forward(model, None, seqs, tok.eos_token_id, "cpu")
        for i, r in enumerate(ref):
            assert ro.reference is not None  # B != 0 here: the starting adapter is the reference
        ro.reference = None
        ref = ro.sequence_logprobs(seqs, None)
        for i, r in enumerate(ref):
            assert torch.allclose(base_lp[i, : len(r)], torch.tensor(r), atol=1e-4)
    finally:
        ro.close()


@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_rule_reward_rises_with_bounded_kl(char_base, tmp_path, method):
    from loraplex.trainer.cli import run_job

    kw = {"num_rollouts": 8} if method == "grpo" else {}
    cfg = rl_job(char_base, prompts_file(tmp_path / "p.jsonl"), method, **kw)
    events = []
    v, _ = run_job(cfg, tmp_path / "run", tmp_path / "store", resume=False, caller="t", on_event=events.append)
    steps = [e for e in events if e.get("type") == "metrics"]
    first = steps[0]["reward_mean"]  # the base policy: about 1 answer in 8 contains a 'z'
    last = sum(e["reward_mean"] for e in steps[-4:]) / 4
    assert first < 0.3
    assert last > first + 0.4, [round(e["reward_mean"], 2) for e in steps]
    assert all(abs(e["kl"]) < 5.0 for e in steps)
    assert {"reward_std", "policy_loss", "rollout_tokens_per_second"} <= set(steps[-1])
    if method == "ppo":
        assert "value_loss" in steps[-1]
    assert v.lineage["reward"] == {"regex": "z"} and v.lineage["method"] == method


def test_reward_function_that_raises_fails_before_training(tiny_base, tmp_path):
    from loraplex.trainer.cli import run_job

    cfg = rl_job(tiny_base, prompts_file(tmp_path / "p.jsonl"), "grpo", reward="json:loads")  # raises on a list argument
    events = []
    with pytest.raises(ValueError, match="reward function failed"):
        run_job(cfg, tmp_path / "run", tmp_path / "store", resume=False, caller="t", on_event=events.append)
    assert not any(e.get("type") == "metrics" for e in events)
