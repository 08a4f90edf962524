"""The fine-tuning API as a user drives it with the official openai client: all-"auto" jobs that learn, the
resolved plan on the job and its first event, pause and resume with the loss curve of an uninterrupted run, a job
that survives a server restart, and the reinforcement method with a string_check grader."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from test_openai_semantics import FACTS, HELD_OUT_Q, fact_data, mixed_data


def wait(client, jid, statuses=("succeeded", "failed", "cancelled"), timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        j = client.fine_tuning.jobs.retrieve(jid)
        if j.status in statuses:
            return j
        time.sleep(0.3)
    raise AssertionError(f"job {jid} is still {j.status}")


def events(client, jid) -> list:
    """Every event of a job, newest first (the client pages through them)."""
    return list(client.fine_tuning.jobs.list_events(jid, limit=100))


def losses(jobs_dir: Path, jid: str) -> list[float]:
    path = jobs_dir / "runs" / jid / "output" / "metrics.jsonl"
    return [json.loads(l)["loss"] for l in path.read_text().splitlines()]


@pytest.fixture()
def manager_client(tiny_base, tmp_path):
    """The fine-tuning routes over a JobManager (jobs in their own processes), without an engine."""
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from loraplex.server.api.http_fine_tuning import fine_tuning_routes
    from loraplex.trainer.jobs import JobManager

    m = JobManager(tmp_path / "jobs", tmp_path / "store", str(tiny_base), "tiny", poll=0.2)
    http = TestClient(Starlette(routes=fine_tuning_routes(m)))
    yield m, openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)
    m.close()


def _all_auto_fact_job(model_dir, tmp_path):
    """An all-"auto" supervised job on 20 fact examples through the openai client -> (client, base id, done job)."""
    from conftest import start_server

    srv = start_server(tmp_path / "srv", model_dir)
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)
    f = client.files.create(file=fact_data(tmp_path / "facts.jsonl").open("rb"), purpose="fine-tune")
    base = srv.state.service.model_id
    job = client.fine_tuning.jobs.create(
        model=base,
        training_file=f.id,
        suffix="facts",
        method={"type": "supervised", "supervised": {"hyperparameters": {}}},
    )
    # 20 examples: OpenAI's auto gives 5 epochs (>= 100 examples seen) of batch size 1, so 100 optimizer steps
    hp = job.method.supervised.hyperparameters
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (
        5,
        1,
        1.0,
    ) and job.hyperparameters.n_epochs == 5
    plan = job.to_dict()["training_plan"]
    assert plan == {
        "optimizer_steps": 100,
        "examples_per_step": 1,
        "train_examples": 20,
        "n_epochs": 5,
        "learning_rate": 2e-4,
    }
    first = events(client, job.id)[-1]
    assert "100 optimizer steps" in first.message and first.data["batch_size"] == 1
    done = wait(client, job.id, timeout=3600)
    assert done.status == "succeeded", done.error
    steps = [e for e in events(client, job.id) if e.type == "metrics"]
    assert len(steps) == 100 and all(e.data["examples"] == 1 for e in steps)
    return srv, client, base, done, [e.data["loss"] for e in reversed(steps)]


def held_out_right(client, model) -> int:
    right = 0
    for k, v in FACTS.items():
        for q in HELD_OUT_Q:
            r = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": q.format(k)}], max_tokens=16, temperature=0
            )
            right += v in r.choices[0].message.content
    return right


# The default run's all-auto job that learns is in tests/test_finetune_learns.py (a small model built to learn).


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 100 optimizer steps of the 135M model on CPU: beyond the suite's 900 s on a busy machine
def test_all_auto_job_teaches_the_embedded_model_facts_it_answers_rephrased(tmp_path):
    from loraplex.adapters_store.base_model import resolve_base_model

    srv, client, base, done, _ = _all_auto_fact_job(resolve_base_model("default"), tmp_path)
    try:
        assert held_out_right(client, base) == 0
        assert held_out_right(client, done.fine_tuned_model) >= 8  # of 10 rephrasings never seen in training
    finally:
        srv.stop()


def test_pause_and_resume_continue_with_the_same_loss_curve(manager_client, tmp_path):
    m, client = manager_client
    f = client.files.create(file=mixed_data(tmp_path / "d.jsonl", 12).open("rb"), purpose="fine-tune")
    # 180 steps: long enough that the pause lands mid-run (18 steps took a fraction of a second and could end
    # before the pause was seen, which then, rightly, ends the job as succeeded)
    hp = {"n_epochs": 30, "batch_size": 2, "learning_rate_multiplier": 5}
    paused = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, seed=7, hyperparameters=hp)
    wait(client, paused.id, ("running",))
    deadline = time.time() + 300
    while not any(e.type == "metrics" and e.data["step"] >= 2 for e in events(client, paused.id)):
        assert time.time() < deadline
        time.sleep(0.2)
    assert client.fine_tuning.jobs.pause(paused.id).status == "paused"
    deadline = time.time() + 300
    while not any("paused at step" in e.message for e in events(client, paused.id)):
        assert time.time() < deadline, "the job did not write its pause checkpoint"
        assert client.fine_tuning.jobs.retrieve(paused.id).status == "paused", "the job ended before it paused"
        time.sleep(0.2)
    assert client.fine_tuning.jobs.retrieve(paused.id).status == "paused"
    assert client.fine_tuning.jobs.checkpoints.list(paused.id).data  # the checkpoint it resumes from
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.pause(paused.id)
    assert client.fine_tuning.jobs.resume(paused.id).status == "running"
    assert wait(client, paused.id).status == "succeeded"
    straight = client.fine_tuning.jobs.create(model="tiny", training_file=f.id, seed=7, hyperparameters=hp)
    assert wait(client, straight.id).status == "succeeded"
    a, b = losses(m.root, paused.id), losses(m.root, straight.id)
    assert len(a) == len(b) == 180
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.resume(straight.id)


def _serve(tiny_base, tmp_path, port):
    env = {**os.environ, "LORAPLEX_HOME": str(tmp_path / "home")}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loraplex.server.cli",
            "serve",
            "--model",
            str(tiny_base),
            "--port",
            str(port),
            "--grpc-port",
            "0",
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / f"server-{port}.log", "ab"),
    )


def _up(url, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the server exited"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("server did not come up")


def test_a_job_interrupted_by_a_server_restart_resumes_and_finishes(tiny_base, tmp_path):
    from conftest import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(tiny_base, tmp_path, port)
    try:
        _up(url, proc)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        f = client.files.create(file=mixed_data(tmp_path / "d.jsonl", 12).open("rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model=client.models.list().data[0].id,
            training_file=f.id,
            # 240 steps: several seconds, so the kill lands mid-run (24 steps took 0.4 s and were sometimes
            # all done before the first checkpoint was seen)
            hyperparameters={"n_epochs": 40, "batch_size": 2},
            extra_body={"loraplex": {"save_steps": 10}},
        )
        deadline = time.time() + 300
        while not client.fine_tuning.jobs.checkpoints.list(job.id).data:
            assert time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # a crash or a host restart: nothing is shut down cleanly
        proc.wait(10)
        proc = _serve(tiny_base, tmp_path, port)
        _up(url, proc)
        done = wait(client, job.id)
        assert done.status == "succeeded", done.error
        messages = [e.message for e in events(client, job.id)]
        assert any("interrupted by a server restart" in msg for msg in messages)
        assert any(msg == "resumed" for msg in messages)
        steps = [e.data["step"] for e in events(client, job.id) if e.type == "metrics"]
        assert max(steps) == 240
        r = client.chat.completions.create(
            model=done.fine_tuned_model, messages=[{"role": "user", "content": "item 1"}], max_tokens=4
        )
        assert r.choices[0].message.content is not None
    finally:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def char_base(tmp_path_factory):
    from helpers import make_tiny_char_llama

    return make_tiny_char_llama(tmp_path_factory.mktemp("char-base"))


def test_reinforcement_with_a_string_check_grader_raises_its_mean_score(char_base, tmp_path):
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from loraplex.server.api.http_fine_tuning import fine_tuning_routes
    from loraplex.trainer.jobs import JobManager

    m = JobManager(tmp_path / "jobs", tmp_path / "store", str(char_base), "char", poll=0.2)
    try:
        client = openai.OpenAI(
            base_url="http://testserver/v1",
            api_key="none",
            max_retries=0,
            http_client=TestClient(Starlette(routes=fine_tuning_routes(m))),
        )
        subjects = ["cats", "rain", "music", "bread", "trains", "stars", "paper", "tea"]
        data = tmp_path / "rft.jsonl"  # OpenAI's reinforcement format: messages, plus fields the grader reads
        data.write_text(
            "".join(
                json.dumps(
                    {"messages": [{"role": "user", "content": f"say something about {s}."}], "must_contain": "z"}
                )
                + "\n"
                for s in subjects
            )
        )
        f = client.files.create(file=data.open("rb"), purpose="fine-tune")
        grader = {
            "type": "string_check",
            "name": "has z",
            "input": "{{sample.output_text}}",
            "reference": "{{item.must_contain}}",
            "operation": "like",
        }
        bad = {**grader, "operation": "regex"}
        with pytest.raises(openai.BadRequestError, match="operation"):
            client.fine_tuning.jobs.create(
                model="char", training_file=f.id, method={"type": "reinforcement", "reinforcement": {"grader": bad}}
            )
        with pytest.raises(openai.BadRequestError, match="code in a request is never run"):
            client.fine_tuning.jobs.create(
                model="char",
                training_file=f.id,
                method={
                    "type": "reinforcement",
                    "reinforcement": {
                        "grader": {"type": "python", "name": "x", "source": "def grade(s, i): return 1"}
                    },
                },
            )
        job = client.fine_tuning.jobs.create(
            model="char",
            training_file=f.id,
            seed=0,
            method={
                "type": "reinforcement",
                "reinforcement": {
                    "grader": grader,
                    "hyperparameters": {"n_epochs": 14, "batch_size": 8, "learning_rate_multiplier": 50},
                },
            },
            extra_body={
                "loraplex": {"response_length": 8, "mini_batch_size": 16, "kl_coef": 0.02, "num_generations": 4}
            },
        )
        assert job.method.type == "reinforcement" and job.to_dict()["training_plan"]["optimizer_steps"] == 14
        done = wait(client, job.id, timeout=3600)
        assert done.status == "succeeded", done.error
        steps = sorted((e.data for e in events(client, job.id) if e.type == "metrics"), key=lambda d: d["step"])
        first, last = steps[0]["reward_mean"], sum(d["reward_mean"] for d in steps[-4:]) / 4
        assert first < 0.3 and last > first + 0.4, [round(d["reward_mean"], 2) for d in steps]
    finally:
        m.close()
