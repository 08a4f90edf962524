"""SFT trainer: config validation, dataset formats, packing equivalence, training that learns, resume, registration."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from loraplex.trainer.config import JobConfigError, load_config, parse_config
from loraplex.trainer.data import DataError, Tokenizing, collate, load_examples

COLORS = {"apple": "red", "sky": "blue", "grass": "green", "snow": "white", "coal": "black", "sun": "yellow"}


def write_jsonl(path: Path, recs) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def color_data(path: Path, reps: int = 8) -> Path:
    return write_jsonl(path, [{"messages": [{"role": "user", "content": f"What color is {k}?"}, {"role": "assistant", "content": v}]}
                              for _ in range(reps) for k, v in COLORS.items()])


@pytest.fixture(scope="module")
def tok(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def job(tiny_base, data, **kw):
    d = {"base_model": str(tiny_base), "adapter": {"name": "colors", "r": 16, "alpha": 32}, "datasets": [str(data)],
         "sequence_len": 256, "epochs": 40, "learning_rate": 5e-3, "micro_batch_size": 2, "seed": 1, "save_steps": 1000}
    d.update(kw)
    return d


def test_unknown_keys_and_wrong_types_are_refused(tmp_path, tiny_base):
    data = color_data(tmp_path / "d.jsonl", 1)
    with pytest.raises(JobConfigError, match="unknown key 'learning_rat'"):
        parse_config({**job(tiny_base, data), "learning_rat": 1e-3})
    with pytest.raises(JobConfigError, match="unknown key 'adapter.rank'"):
        parse_config(job(tiny_base, data, adapter={"name": "x", "rank": 8}))
    with pytest.raises(JobConfigError, match="epochs"):
        parse_config(job(tiny_base, data, epochs="many"))
    with pytest.raises(JobConfigError, match="not found"):
        parse_config(job(tiny_base, tmp_path / "missing.jsonl"))
    yml = tmp_path / "job.yaml"
    yml.write_text("base_model: default\nadapter: {name: a}\nmethod: sft\ndatasets: [{path: d.jsonl, format: auto}]\nbogus: 1\n")
    with pytest.raises(JobConfigError, match="unknown key 'bogus'"):
        load_config(yml)


def test_dataset_formats_mask_the_prompt(tmp_path, tok):
    tk = Tokenizing(tok, 512)
    cases = {
        "text": {"text": "hello world"},
        "chat": {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        "pc": {"prompt": "2+2=", "completion": "4"},
        "pc_msgs": {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "hello"}]},
        "alpaca": {"instruction": "Say hi", "input": "", "output": "hello"},
        "sharegpt": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    }
    for name, rec in cases.items():
        ex = load_examples(write_jsonl(tmp_path / f"{name}.jsonl", [rec]), "auto", tk)[0]
        trained = tok.decode([t for t, l in zip(ex.input_ids, ex.labels) if l != -100])
        if name == "text":
            assert trained == "hello world" + tok.eos_token
        elif name == "pc":
            assert trained == "4" + tok.eos_token
        else:
            assert trained.startswith("hello") and tok.eos_token in trained, (name, trained)
            assert "hi" not in trained and "Say" not in trained  # prompt tokens carry no loss


@pytest.mark.parametrize("line,err", [
    ("{not json", "not valid JSON"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "assistant"),
    ('{"messages": [{"role": "wizard", "content": "x"}]}', "role"),
    ('{"text": 5}', "text"),
    ('[1, 2]', "JSON object"),
])
def test_malformed_line_is_reported_with_its_number(tmp_path, tok, line, err):
    p = tmp_path / "bad.jsonl"
    good = json.dumps({"text": "fine"} if '"text"' in line else {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    p.write_text(good + "\n" + good + "\n" + line + "\n")
    with pytest.raises(DataError) as e:
        load_examples(p, "auto", Tokenizing(tok, 128))
    assert f"{p}:3:" in str(e.value) and err in str(e.value)


def test_packed_loss_equals_unpacked_loss(tiny_base, tmp_path, tok):
    from transformers import AutoModelForCausalLM

    from loraplex.trainer.sft import step_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation="sdpa").eval()
    tk = Tokenizing(tok, 512)
    exs = load_examples(color_data(tmp_path / "c.jsonl", 1), "auto", tk) + [tk.text("the quick brown fox jumps")]
    pad = tok.eos_token_id
    with torch.no_grad():
        packed, n1 = step_loss(model, collate([exs[:4], exs[4:]], pad), "cpu")
        single = [step_loss(model, collate([[e]], pad), "cpu") for e in exs]
        padded, n3 = step_loss(model, collate([[e] for e in exs], pad), "cpu")
    total = sum(float(l) for l, _ in single)
    n2 = sum(k for _, k in single)
    assert n1 == n2 == n3
    assert abs(float(packed) / n1 - total / n2) < 1e-4
    assert abs(float(padded) / n3 - total / n2) < 1e-4


def test_sft_learns_a_mapping_and_registers_with_lineage(tiny_base, tmp_path, tok):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraplex.adapters_store import AdapterStore
    from loraplex.trainer.cli import run_job

    cfg = parse_config(job(tiny_base, color_data(tmp_path / "c.jsonl")))
    events = []
    v, route = run_job(cfg, tmp_path / "run", tmp_path / "store", resume=False, caller="test", on_event=events.append)
    losses = [e["loss"] for e in events if e.get("type") == "metrics"]
    assert losses[-1] < losses[0] - 3
    assert {"tokens_per_second", "learning_rate", "eta_seconds"} <= set(next(e for e in events if e.get("type") == "metrics"))
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == len(losses)
    assert v.ref == "colors@1" and route is None
    lin = AdapterStore(tmp_path / "store").get("colors").lineage
    assert lin["base_fingerprint"].startswith("sha256:") and lin["seed"] == 1
    assert lin["config"]["learning_rate"] == 5e-3 and lin["libraries"]["torch"]
    assert list(lin["dataset_sha256"].values())[0] and lin["metrics"]["final_loss"] == pytest.approx(losses[-1])
    # the trained adapter answers where the base does not
    base = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), v.path).eval()

    def ask(model, k):
        ids = tok.apply_chat_template([{"role": "user", "content": f"What color is {k}?"}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        out = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
        return tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()

    assert sum(ask(m, k) == c for k, c in COLORS.items()) >= 5
    assert sum(ask(base, k) == c for k, c in COLORS.items()) == 0


def test_kill_and_resume_gives_the_same_loss_curve(tiny_base, tmp_path):
    from loraplex.trainer.sft import train_sft

    data = color_data(tmp_path / "c.jsonl", 2)
    cfg = parse_config(job(tiny_base, data, epochs=2, save_steps=100, packing=False))
    full = train_sft(cfg, tmp_path / "full")
    part = train_sft(cfg, tmp_path / "part", stop_after=5)  # as if killed after step 5's checkpoint
    assert part.steps == 5
    resumed = train_sft(cfg, tmp_path / "part", resume=True)
    assert resumed.steps == full.steps
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)


def test_canary_registration_splits_traffic(tiny_base, tmp_path):
    from loraplex.adapters_store import AdapterStore
    from loraplex.trainer.cli import run_job

    data = color_data(tmp_path / "c.jsonl", 1)
    v1, r1 = run_job(parse_config(job(tiny_base, data, epochs=1)), tmp_path / "r1", tmp_path / "store", resume=False, caller="t")
    v2, r2 = run_job(parse_config(job(tiny_base, data, epochs=1, canary=10)), tmp_path / "r2", tmp_path / "store", resume=False, caller="t")
    assert r1 is None and r2.versions == {1: 90, 2: 10}
    assert AdapterStore(tmp_path / "store").get_route("colors").versions == {1: 90, 2: 10}


def test_two_process_data_parallel_matches_single_process(tiny_base, tmp_path):
    """2 workers over gloo (torch.distributed.run) give the single-process loss curve and adapter."""
    from safetensors.torch import load_file

    from loraplex.trainer.distributed import train_distributed
    from loraplex.trainer.sft import train_sft

    data = color_data(tmp_path / "c.jsonl", 2)
    base = job(tiny_base, data, epochs=1, packing=False, micro_batch_size=1, gradient_accumulation_steps=4, gradient_checkpointing=False)
    single = train_sft(parse_config(base), tmp_path / "single")
    events = []
    dist = train_distributed(parse_config({**base, "num_processes": 2}), tmp_path / "dist", on_event=events.append)
    assert dist.steps == single.steps == 3
    assert dist.losses == pytest.approx(single.losses, rel=1e-4)
    a, b = load_file(str(single.adapter_dir / "adapter_model.safetensors")), load_file(str(dist.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert any(e.get("world_size") == 2 for e in events)
    # stopped after one step, then resumed: each rank's optimizer and RNG state come back from the checkpoint
    dcfg = parse_config({**base, "num_processes": 2, "adapter": {"name": "colors", "r": 16, "alpha": 32, "dropout": 0.1}})
    part = train_distributed(dcfg, tmp_path / "part", stop_after=1)
    assert part.steps == 1 and sorted(p.name for p in (tmp_path / "part" / "checkpoint-1").glob("rank-*.pt")) == ["rank-0.pt", "rank-1.pt"]
    resumed = train_distributed(dcfg, tmp_path / "part", resume=True)
    again = train_distributed(dcfg, tmp_path / "again")
    assert resumed.losses == pytest.approx(again.losses, rel=1e-5)


@pytest.mark.slow  # ~40 s on a quiet 2-core machine: four training processes
def test_two_machines_each_running_loraplex_train_give_the_single_process_adapter(tiny_base, tmp_path):
    """Two launchers with machine ranks 0 and 1 (as on two nodes; here one host, one output dir they share)."""
    import subprocess
    import sys

    import yaml
    from safetensors.torch import load_file

    from conftest import free_port
    from loraplex.adapters_store import AdapterStore
    from loraplex.trainer.sft import train_sft

    data = color_data(tmp_path / "c.jsonl", 2)
    base = job(tiny_base, data, epochs=1, packing=False, micro_batch_size=1, gradient_accumulation_steps=4, gradient_checkpointing=False)
    single = train_sft(parse_config(base), tmp_path / "single")
    spec = {**base, "num_processes": 2, "num_machines": 2, "main_process_ip": "127.0.0.1", "main_process_port": free_port(),
            "output_dir": str(tmp_path / "shared-run")}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "loraplex.server.cli", "train", str(tmp_path / "job.yaml"),
                               "--machine-rank", str(r), "--store", str(tmp_path / "store")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in (1, 0)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    worker, main = (json.loads(o[0].strip().splitlines()[-1]) for o in outs)
    assert worker == {"machine_rank": 1, "done": True, "registered_on": "machine 0"} and main["adapter"] == "colors@1"
    assert [v.ref for v in AdapterStore(tmp_path / "store").list()] == ["colors@1"]  # registered once
    a = load_file(str(single.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(Path(main["path"]) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    for bad, msg in [({"num_machines": 2, "num_processes": 3}, "multiple of num_machines"),
                     ({"num_machines": 2, "num_processes": 2}, "main_process_ip and main_process_port"),
                     ({"machine_rank": 1}, "below num_machines")]:
        with pytest.raises(JobConfigError, match=msg):
            parse_config({**base, **bad})


def test_distributed_options_are_refused_clearly_where_they_cannot_run(tmp_path, tiny_base):
    from loraplex.trainer.distributed import check_launchable

    data = color_data(tmp_path / "d.jsonl", 1)
    with pytest.raises(JobConfigError, match="distributed: deepspeed is not supported yet"):
        check_launchable(parse_config(job(tiny_base, data, num_processes=2, distributed="deepspeed")))
    with pytest.raises(JobConfigError, match="num_processes > 1 is supported for method: sft only"):
        check_launchable(parse_config(job(tiny_base, data, num_processes=2, method="dpo")))
    check_launchable(parse_config(job(tiny_base, data, num_processes=2, distributed="fsdp", device="cpu")))
