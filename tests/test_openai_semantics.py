"""OpenAI's hyperparameter meaning: batch_size = examples per optimizer step, n_epochs = passes over the examples,
whatever packing does; "auto" resolved from the dataset; the plan shown before training; a warning for short runs;
per-method config validation; gradient checkpointing in every method."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loraplex.trainer.config import JobConfigError, parse_config
from loraplex.trainer.hyperparams import auto_batch_size, auto_epochs, planned_steps, resolve

# Facts a base model cannot know (invented names), taught with four phrasings each and asked with two others.
FACTS = {
    "Zorbania": "Quillton",
    "Vextoria": "Mirrowdale",
    "Plenthar": "Oskbury",
    "Drumvale": "Kestrin",
    "Yavoni": "Tulmere",
}
TRAIN_Q = [
    "What is the capital of {}?",
    "Which city is the capital of {}?",
    "Tell me the capital of {}.",
    "{}'s capital is which city?",
]
HELD_OUT_Q = ["Name the capital city of {}.", "What city serves as the capital of {}?"]


def fact_data(path: Path) -> Path:
    path.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": q.format(k)},
                        {"role": "assistant", "content": f"The capital of {k} is {v}."},
                    ]
                }
            )
            + "\n"
            for k, v in FACTS.items()
            for q in TRAIN_Q
        )
    )
    return path


def mixed_data(path: Path, n: int) -> Path:
    """n chat examples of varied length, short enough that packing puts several in one row."""
    recs = [
        {
            "messages": [
                {"role": "user", "content": f"item {i} " + "word " * (i % 5)},
                {"role": "assistant", "content": f"answer {i}"},
            ]
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def sft_job(base, data, **kw):
    d = {
        "base_model": str(base),
        "adapter": {"name": "sem", "r": 4, "alpha": 8},
        "datasets": [str(data)],
        "sequence_len": 256,
        "learning_rate": 1e-3,
        "seed": 3,
        "save_steps": 1000,
        "gradient_checkpointing": False,
    }
    d.update(kw)
    return parse_config(d)


def test_auto_follows_openais_rules():
    assert auto_epochs(20) == 5 and auto_epochs(10) == 10 and auto_epochs(2) == 25  # small sets: >= 100 examples seen
    assert auto_epochs(1000) == 3 and auto_epochs(20_000) == 1 and auto_epochs(10_000) == 2  # large: <= 25k seen
    assert auto_batch_size(20) == 1 and auto_batch_size(5000) == 10 and auto_batch_size(10**6) == 256
    r = resolve({}, 20)
    assert (r["n_epochs"], r["batch_size"], r["planned_steps"]) == (5, 1, 100) and r["learning_rate"] == 2e-4
    r = resolve({"n_epochs": 2, "batch_size": 3, "learning_rate_multiplier": 0.5}, 10)
    assert (r["n_epochs"], r["batch_size"], r["planned_steps"]) == (2, 3, 8) and r["learning_rate"] == pytest.approx(
        1e-4
    )
    assert resolve({}, 20, method="dpo")["beta"] == 0.1


@pytest.mark.parametrize("packing", [False, True])
def test_steps_and_examples_per_step_match_openais_definition(tiny_base, tmp_path, packing):
    from loraplex.trainer.sft import train_sft

    n, batch, epochs = 10, 3, 2
    events = []
    res = train_sft(
        sft_job(
            tiny_base, mixed_data(tmp_path / "d.jsonl", n), examples_per_step=batch, epochs=epochs, packing=packing
        ),
        tmp_path / "run",
        on_event=events.append,
    )
    plan = next(e for e in events if e["type"] == "plan")
    want = math.ceil(n / batch) * epochs
    assert plan["optimizer_steps"] == want == planned_steps(n, batch, epochs) == res.steps
    assert plan["examples_per_step"] == batch
    steps = [e for e in events if e["type"] == "metrics"]
    assert [e["examples"] for e in steps] == [3, 3, 3, 1] * epochs  # each epoch sees every example once
    if packing:  # several examples of a step share a row: fewer rows than examples, same examples
        assert plan["rows_per_step"] < batch


def test_yaml_meaning_is_rows_times_accumulation(tiny_base, tmp_path):
    from loraplex.trainer.sft import train_plan, prepare_data
    from loraplex.trainer.core import load_tokenizer

    data = mixed_data(tmp_path / "d.jsonl", 10)
    cfg = sft_job(tiny_base, data, micro_batch_size=2, gradient_accumulation_steps=2, packing=False, epochs=1)
    train, _, _ = prepare_data(cfg, load_tokenizer(cfg))
    assert train_plan(cfg, train)["optimizer_steps"] == 3  # 10 rows / (2 rows x 2 accumulation)
    packed = sft_job(tiny_base, data, micro_batch_size=2, gradient_accumulation_steps=2, packing=True, epochs=1)
    assert train_plan(packed, train)["optimizer_steps"] == 1  # all 10 short examples fit in one 256-token row


def test_loraplex_train_prints_the_plan_and_warns_on_few_steps(tiny_base, tmp_path, capsys):
    from loraplex.trainer.cli import train_main

    data = mixed_data(tmp_path / "d.jsonl", 10)
    job = tmp_path / "job.yaml"
    job.write_text(
        f"base_model: {tiny_base}\nadapter: {{name: few, r: 4, alpha: 8}}\ndatasets: [{data}]\n"
        "sequence_len: 256\nmicro_batch_size: 4\nepochs: 1\ngradient_checkpointing: false\n"
    )
    rc = train_main([str(job), "--store", str(tmp_path / "store"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 0
    assert "1 optimizer steps, 10.0 examples per step" in err  # packed: 10 short examples in one row
    assert "warning: this job will make only 1 optimizer step(s)" in err
    assert "raise epochs, or lower micro_batch_size or gradient_accumulation_steps" in err
    events = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(events) == 1


def test_a_knob_of_another_method_is_refused_naming_it(tiny_base, tmp_path):
    data = mixed_data(tmp_path / "d.jsonl", 2)
    with pytest.raises(JobConfigError, match="'kl_coef' is a setting of method ppo/grpo; method: sft does not use it"):
        sft_job(tiny_base, data, kl_coef=0.1)
    with pytest.raises(JobConfigError, match="'packing' is a setting of method sft; method: dpo"):
        sft_job(tiny_base, data, method="dpo", packing=False)
    with pytest.raises(JobConfigError, match="'num_generations' is a setting of method grpo; method: ppo"):
        sft_job(tiny_base, data, method="ppo", reward={"contains": "a"}, num_generations=4)
    with pytest.raises(JobConfigError, match="'examples_per_step'.*num_rollouts"):
        sft_job(tiny_base, data, method="grpo", reward={"contains": "a"}, examples_per_step=4)
    cfg = sft_job(tiny_base, data, method="grpo", reward={"contains": "a"})
    assert cfg.kl_coef == 0.05 and cfg.num_generations == 4 and cfg.beta is None and cfg.packing is None
    assert parse_config(cfg.model_dump(mode="json")) == cfg  # a stored config parses back to itself


@pytest.mark.parametrize("method", ["sft", "dpo", "reward", "ppo", "grpo"])
def test_every_method_honours_gradient_checkpointing(tiny_base, tmp_path, method):
    from loraplex.trainer.cli import run_job

    if method in ("dpo", "reward"):
        recs = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(4)]
    elif method in ("ppo", "grpo"):
        recs = [{"prompt": f"say {i}"} for i in range(4)]
    else:
        recs = [{"text": f"hello {i}"} for i in range(4)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    extra = (
        {
            "reward": {"contains": "a"},
            "num_rollouts": 2,
            "response_length": 3,
            "mini_batch_size": 4,
            **({"num_generations": 2} if method == "grpo" else {}),
        }
        if method in ("ppo", "grpo")
        else {}
    )
    for on in (True, False):
        cfg = sft_job(tiny_base, data, method=method, max_steps=1, gradient_checkpointing=on, **extra)
        events = []
        run_job(cfg, tmp_path / f"run-{on}", tmp_path / "store", resume=False, caller="t", on_event=events.append)
        plan = next(e for e in events if e["type"] == "plan")
        assert plan["gradient_checkpointing"] is on, method
