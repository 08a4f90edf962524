"""QLoRA (`quantize: 4bit`): LoRA trained on a bitsandbytes nf4 base, served as an ordinary adapter on the full-precision base."""
from __future__ import annotations

import pytest
import torch

from loraplex.trainer.config import JobConfigError, bnb_4bit_problem, parse_config

from test_trainer import color_data, job


@pytest.fixture
def bnb_4bit():
    problem = bnb_4bit_problem("cuda" if torch.cuda.is_available() else "cpu")
    if problem:
        pytest.skip(f"quantize: 4bit {problem}")


def test_4bit_sft_trains_on_a_quantized_base_and_registers_a_plain_adapter(bnb_4bit, tiny_base, tmp_path, monkeypatch):
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraplex.adapters_store import AdapterStore
    from loraplex.trainer import sft
    from loraplex.trainer.cli import run_job
    from loraplex.trainer.sft import evaluate, load_tokenizer, prepare_data

    trained = []  # the models the real sft.lora_model builds, to look at their layers
    real_lora_model = sft.lora_model

    def keep(model, cfg):
        trained.append(real_lora_model(model, cfg))
        return trained[-1]

    monkeypatch.setattr(sft, "lora_model", keep)

    spec = job(tiny_base, color_data(tmp_path / "c.jsonl", 4), quantize="4bit", epochs=25, learning_rate=1e-2,
               adapter={"name": "colors", "r": 8, "alpha": 16})
    cfg = parse_config({**spec, "validation_datasets": [str(color_data(tmp_path / "v.jsonl", 1))], "eval_steps": 5})
    events = []
    v, _ = run_job(cfg, tmp_path / "run", tmp_path / "store", resume=False, caller="test", on_event=events.append)
    losses = [e["loss"] for e in events if e.get("type") == "metrics"]
    evals = [e["eval_loss"] for e in events if e.get("type") == "metrics" and "eval_loss" in e]
    assert losses[-1] < losses[0] - 3 and len(evals) == 10 and evals[-1] < evals[0]
    # evaluating between steps does not change training (bitsandbytes' CPU inference repacking is kept off)
    assert sft.train_sft(parse_config(spec), tmp_path / "no-eval").losses == pytest.approx(losses, rel=1e-6)

    # during training every targeted linear layer of the base was a frozen 4-bit layer with the LoRA on top
    model = trained[0]
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 7 * 2  # q k v o gate up down, two layers
    assert all(m.weight.dtype == torch.uint8 and not m.weight.requires_grad for m in quantized)
    assert {n.rsplit(".lora_", 1)[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"A", "B"}

    # the registered version is a plain PEFT adapter: it loads on the full-precision base and has learned the data
    assert v.ref == "colors@1" and AdapterStore(tmp_path / "store").get("colors").lineage["config"]["quantize"] == "4bit"
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    tok = load_tokenizer(cfg)
    train, _, _ = prepare_data(cfg, tok)
    before = evaluate(base, train, cfg, tok.eos_token_id, "cpu")
    after = evaluate(PeftModel.from_pretrained(base, v.path).eval(), train, cfg, tok.eos_token_id, "cpu")
    assert after < before - 3 and after < losses[-1] + 0.5


@pytest.mark.parametrize("method", ["dpo", "reward"])
def test_4bit_preference_training_raises_held_out_accuracy(bnb_4bit, tiny_base, tmp_path, method):
    from loraplex.trainer.cli import run_job

    from test_preference import pref_data, pref_job

    cfg = pref_job(tiny_base, pref_data(tmp_path / "p.jsonl", 48), method, quantize="4bit")
    events = []
    v, _ = run_job(cfg, tmp_path / "run", tmp_path / "store", resume=False, caller="t", on_event=events.append)
    first = next(e for e in events if e.get("initial"))
    fin = next(e for e in events if e.get("type") == "finished")
    assert fin["val_accuracy"] > 0.9 and fin["val_margin"] > first["val_margin"] + 0.1
    assert v.lineage["method"] == method


def test_4bit_is_refused_clearly_where_it_cannot_run(tiny_base, tmp_path, monkeypatch):
    import importlib.metadata

    data = color_data(tmp_path / "d.jsonl", 1)
    with pytest.raises(JobConfigError, match="quantize: 4bit is not supported for method: grpo"):
        parse_config(job(tiny_base, data, quantize="4bit", method="grpo", reward={"contains": "red"}))
    with pytest.raises(JobConfigError, match="'quantize'"):
        parse_config(job(tiny_base, data, quantize="3bit"))

    real_version = importlib.metadata.version

    def without_bnb(name):
        if name == "bitsandbytes":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    bnb_4bit_problem.cache_clear()
    monkeypatch.setattr(importlib.metadata, "version", without_bnb)
    try:
        with pytest.raises(JobConfigError, match=r"quantize: 4bit needs the bitsandbytes package: pip install 'loraplex\[qlora\]'"):
            parse_config(job(tiny_base, data, quantize="4bit", device="cpu"))
    finally:
        monkeypatch.undo()
        bnb_4bit_problem.cache_clear()
    if bnb_4bit_problem("cpu") is None:
        from loraplex.trainer.distributed import check_launchable

        with pytest.raises(JobConfigError, match="quantize: 4bit runs on one process only"):
            check_launchable(parse_config(job(tiny_base, data, quantize="4bit", device="cpu", num_processes=2)))
        if not torch.cuda.is_available():
            with pytest.raises(JobConfigError, match="quantize: 4bit cannot run on device 'cuda' with bitsandbytes"):
                parse_config(job(tiny_base, data, quantize="4bit", device="cuda"))
