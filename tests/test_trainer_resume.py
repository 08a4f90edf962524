"""`loraplex train job.yaml` killed with SIGKILL mid-run, then `--resume`: the same loss curve as a run never interrupted."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_trainer import color_data


def write_job(path: Path, tiny_base, data: Path, **kw) -> Path:
    import yaml

    job = {"base_model": str(tiny_base), "adapter": {"name": "colors", "r": 8, "alpha": 16, "dropout": 0.1},
           "datasets": [{"path": str(data), "format": "auto"}], "sequence_len": 128, "packing": False, "epochs": 10,
           "learning_rate": 3e-3, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "save_steps": 2, "seed": 7,
           "gradient_checkpointing": False}
    job.update(kw)
    path.write_text(yaml.safe_dump(job))
    return path


def curve(out: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_sigkill_then_resume_gives_the_uninterrupted_curve(tiny_base, tmp_path, capsys):
    from loraplex.trainer.cli import train_main

    data = color_data(tmp_path / "c.jsonl", 2)  # 12 rows, micro-batch 2, accumulation 2: 3 steps an epoch, 30 in all
    job = write_job(tmp_path / "job.yaml", tiny_base, data)
    assert train_main([str(job), "--output", str(tmp_path / "full"), "--store", str(tmp_path / "s1")]) == 0
    full = curve(tmp_path / "full")
    assert [s for s, _ in full] == list(range(1, 31))

    part = tmp_path / "part"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "loraplex.trainer.cli", str(job), "--output", str(part), "--store", str(tmp_path / "s2")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 120
        while not (part / "checkpoint-4").is_dir() and p.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert p.poll() is None, "the run ended before it could be killed"
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
    killed_at = len(curve(part))
    assert 4 <= killed_at < 30
    assert not (tmp_path / "s2").exists() or not list((tmp_path / "s2").rglob("adapter_model.safetensors"))

    # a changed config is refused, naming what changed
    changed = write_job(tmp_path / "changed.yaml", tiny_base, data, learning_rate=1e-3)
    assert train_main([str(changed), "--resume", "--output", str(part), "--store", str(tmp_path / "s2")]) == 2
    assert "learning_rate" in capsys.readouterr().err

    assert train_main([str(job), "--resume", "--output", str(part), "--store", str(tmp_path / "s2")]) == 0
    resumed = curve(part)
    assert [s for s, _ in resumed] == [s for s, _ in full]  # steps past the checkpoint were dropped, then trained again
    assert [l for _, l in resumed] == pytest.approx([l for _, l in full], rel=1e-5, abs=1e-6)
