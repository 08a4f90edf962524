"""DPO and reward models on a synthetic preference set (tiny model, CPU), and serving rewards."""
from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import pytest
import torch

from loraplex.trainer.config import parse_config
from loraplex.trainer.data import DataError

WORDS = "apple river stone cloud music paper garden window candle forest rocket silver pepper winter ocean lemon".split()


def pref_data(path: Path, n: int, seed: int = 0, style: str = "ours") -> Path:
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        w = rng.choice(WORDS)
        prompt = [{"role": "user", "content": f"Tell me about the {w} number {i}."}]
        good, bad = [{"role": "assistant", "content": f"Sure! The {w} is lovely."}], [{"role": "assistant", "content": "No."}]
        if style == "openai":
            recs.append({"input": {"messages": prompt}, "preferred_output": good, "non_preferred_output": bad})
        elif style == "implicit":
            recs.append({"chosen": prompt + good, "rejected": prompt + bad})
        else:
            recs.append({"prompt": prompt, "chosen": good, "rejected": bad})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def pref_job(tiny_base, data, method, **kw):
    d = {"base_model": str(tiny_base), "adapter": {"name": f"{method}-bot", "r": 8, "alpha": 16}, "method": method,
         "datasets": [str(data)], "sequence_len": 128, "epochs": 2, "learning_rate": 5e-3, "micro_batch_size": 4,
         "val_set_size": 0.25, "eval_steps": 1000, "seed": 0, "save_steps": 1000}
    if method == "dpo":
        d["beta"] = 0.1
    d.update(kw)
    return parse_config(d)


@pytest.mark.parametrize("style,loss_type", [("ours", "sigmoid"), ("openai", "ipo"), ("implicit", "hinge")])
def test_dpo_raises_held_out_preference_accuracy(tiny_base, tmp_path, style, loss_type):
    from loraplex.trainer.cli import run_job

    cfg = pref_job(tiny_base, pref_data(tmp_path / "p.jsonl", 48, style=style), "dpo", loss_type=loss_type)
    events = []
    v, _ = run_job(cfg, tmp_path / "run", tmp_path / "store", resume=False, caller="t", on_event=events.append)
    first = next(e for e in events if e.get("initial"))
    fin = next(e for e in events if e.get("type") == "finished")
    assert 0.4 <= first["val_accuracy"] <= 0.6  # the reference and the policy agree at the start
    assert fin["val_accuracy"] > 0.9
    assert fin["val_margin"] > first["val_margin"] + 0.1
    steps = [e for e in events if e.get("type") == "metrics" and not e.get("initial")]
    assert {"rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy"} <= set(steps[-1])
    assert v.lineage["method"] == "dpo"


def test_reward_model_and_served_scores_match(tiny_base, tmp_path, adapter_dirs):
    from conftest import start_server
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraplex.trainer.cli import run_job
    from loraplex.trainer.data import Tokenizing
    from loraplex.trainer.preference import RewardHead, reward_scores

    cfg = pref_job(tiny_base, pref_data(tmp_path / "p.jsonl", 48, seed=1), "reward", epochs=3)
    events = []
    store = tmp_path / "srv" / "store"
    v, _ = run_job(cfg, tmp_path / "run", store, resume=False, caller="t", on_event=events.append)
    fin = next(e for e in events if e.get("type") == "finished")
    assert fin["val_accuracy"] > 0.9
    assert v.manifest.kind == "reward"
    # the trainer's own scores for two conversations
    tok = AutoTokenizer.from_pretrained(tiny_base)
    convs = [[{"role": "user", "content": "Tell me about the stone number 99."}, {"role": "assistant", "content": a}]
             for a in ("Sure! The stone is lovely.", "No.")]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), v.path).eval()
    head = RewardHead(model.config.hidden_size)
    sd = load_file(str(v.path / "score_head.safetensors"))
    head.score.weight.data, head.score.bias.data = sd["weight"], sd["bias"]
    tk = Tokenizing(tok, 128)
    with torch.no_grad():
        want = reward_scores(model, head, [tk.chat(c) for c in convs], tok.eos_token_id, "cpu").tolist()
    assert want[0] > want[1]
    s = start_server(tmp_path / "srv", tiny_base)
    try:
        got = [httpx.post(f"{s.url}/v1/rewards", json={"model": v.name, "messages": c}).json()["score"] for c in convs]
        assert got == pytest.approx(want, abs=1e-4)
        r = httpx.post(f"{s.url}/v1/adapters", json={"name": "plain", "path": str(adapter_dirs["alpha"])})
        assert r.status_code == 201
        bad = httpx.post(f"{s.url}/v1/rewards", json={"model": "plain", "messages": convs[0]})
        assert bad.status_code == 400 and "reward" in bad.json()["error"]["message"]
    finally:
        s.stop()


def test_missing_rejected_fails_before_training(tiny_base, tmp_path):
    from loraplex.trainer.cli import run_job

    p = pref_data(tmp_path / "p.jsonl", 4)
    lines = p.read_text().splitlines()
    rec = json.loads(lines[2])
    del rec["rejected"]
    lines[2] = json.dumps(rec)
    p.write_text("\n".join(lines) + "\n")
    events = []
    with pytest.raises(DataError, match=r"p.jsonl:3: missing 'rejected'"):
        run_job(pref_job(tiny_base, p, "dpo"), tmp_path / "run", tmp_path / "store", resume=False, caller="t", on_event=events.append)
    assert not any(e.get("type") == "metrics" for e in events)
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store" / "adapters").glob("*"))


def test_dpo_stop_and_resume_gives_the_same_losses(tiny_base, tmp_path):
    from loraplex.trainer.preference import train_preference

    cfg = pref_job(tiny_base, pref_data(tmp_path / "p.jsonl", 24), "dpo", epochs=1, val_set_size=0.0)
    full = train_preference(cfg, tmp_path / "full")
    part = train_preference(cfg, tmp_path / "part", stop_after=2)
    assert part.steps == 2
    resumed = train_preference(cfg, tmp_path / "part", resume=True)
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)
