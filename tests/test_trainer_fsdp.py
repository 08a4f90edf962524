"""`distributed: fsdp`: 2 processes over gloo with the model sharded by FSDP2 give the single-process run."""
from __future__ import annotations

import json
import re

import pytest

from loraplex.trainer.config import parse_config

from test_trainer import color_data, job


def test_two_process_fsdp_matches_single_process_and_saves_a_whole_adapter(tiny_base, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from loraplex.trainer.distributed import train_distributed
    from loraplex.trainer.sft import train_sft

    data = color_data(tmp_path / "c.jsonl", 2)
    base = job(tiny_base, data, epochs=1, packing=False, micro_batch_size=1, gradient_accumulation_steps=4,
               validation_datasets=[str(color_data(tmp_path / "v.jsonl", 1))])
    single = train_sft(parse_config(base), tmp_path / "single")
    events = []
    dist = train_distributed(parse_config({**base, "num_processes": 2, "distributed": "fsdp"}), tmp_path / "dist", on_event=events.append)
    assert any(e.get("world_size") == 2 for e in events)
    sharded = next(re.match(r"fsdp: (\d+) of (\d+) parameter tensors sharded over 2 processes", e.get("message", ""))
                   for e in events if e.get("message", "").startswith("fsdp:"))
    assert sharded and sharded[1] == sharded[2]  # the whole model, not a DDP replica
    assert dist.steps == single.steps == 3
    assert dist.losses == pytest.approx(single.losses, rel=1e-4)
    assert dist.metrics["eval_loss"] == pytest.approx(single.metrics["eval_loss"], rel=1e-4)
    # the saved adapter is whole (every LoRA tensor at full shape), not rank 0's shard
    a, b = load_file(str(single.adapter_dir / "adapter_model.safetensors")), load_file(str(dist.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 7 * 2 * 2  # A and B of q k v o gate up down, two layers
    assert all(a[k].shape == b[k].shape for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert json.loads((dist.adapter_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), dist.adapter_dir)
    # stopped after one step, then resumed: each rank's (sharded) optimizer state and RNG come back
    dcfg = parse_config({**base, "num_processes": 2, "distributed": "fsdp", "adapter": {"name": "colors", "r": 16, "alpha": 32, "dropout": 0.1}})
    part = train_distributed(dcfg, tmp_path / "part", stop_after=1)
    assert part.steps == 1
    resumed = train_distributed(dcfg, tmp_path / "part", resume=True)
    again = train_distributed(dcfg, tmp_path / "again")
    assert resumed.losses == pytest.approx(again.losses, rel=1e-5)
