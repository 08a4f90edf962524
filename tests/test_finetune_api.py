"""The OpenAI fine-tuning API end to end: the official client uploads a file, creates a job, polls it to
success, and chats with the result, while requests to another adapter keep being answered."""
from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from test_trainer import COLORS, color_data


@pytest.fixture(scope="module")
def srv(tiny_base, tmp_path_factory, adapter_dirs):
    from conftest import start_server

    s = start_server(tmp_path_factory.mktemp("ft"), tiny_base)
    httpx.post(f"{s.url}/v1/adapters", json={"name": "other", "path": str(adapter_dirs["beta"])})
    yield s
    s.stop()


@pytest.fixture()
def client(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)


def wait(client, jid, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        j = client.fine_tuning.jobs.retrieve(jid)
        if j.status in ("succeeded", "failed", "cancelled"):
            return j
        time.sleep(0.5)
    raise AssertionError(f"job {jid} did not finish: {j.status}")


def test_openai_client_fine_tunes_and_chats_with_the_result(srv, client, tmp_path):
    base = srv.state.service.model_id
    f = client.files.create(file=color_data(tmp_path / "colors.jsonl").open("rb"), purpose="fine-tune")
    assert f.purpose == "fine-tune" and f.bytes > 0
    assert client.files.retrieve(f.id).filename == "colors.jsonl"
    # traffic to another adapter keeps flowing while the job trains
    stop, failures, served = threading.Event(), [], []

    def load():
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                r = c.post(f"{srv.url}/v1/chat/completions", json={"model": "other", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
                (served if r.status_code == 200 else failures).append(r.status_code)
                time.sleep(0.05)

    t = threading.Thread(target=load)
    t.start()
    try:
        job = client.fine_tuning.jobs.create(
            model=base, training_file=f.id, suffix="colors", seed=1,
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 40, "batch_size": 2, "learning_rate_multiplier": 25}}},
            extra_body={"loraplex": {"sequence_len": 256}},  # shorter packed rows: more steps for this tiny set
        )
        assert job.status in ("queued", "running") and job.hyperparameters.n_epochs == 40
        assert job.id in [j.id for j in client.fine_tuning.jobs.list().data]
        done = wait(client, job.id)
    finally:
        stop.set()
        t.join()
    assert done.status == "succeeded", done.error
    assert failures == [] and len(served) > 3
    name = done.fine_tuned_model
    assert name.startswith("ft-colors-")
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and {"step", "loss", "tokens_per_second", "eta_seconds"} <= set(metrics[0].data)
    assert metrics[-1].data["loss"] > metrics[0].data["loss"]  # events are newest first
    cks = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert cks and cks[0].fine_tuned_model_checkpoint == name
    # the server serves the new adapter immediately, and it learned the mapping
    right = 0
    for k, v in COLORS.items():
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": f"What color is {k}?"}], max_tokens=3, temperature=0)
        right += r.choices[0].message.content.strip() == v
    assert right >= 5
    lin = srv.state.store.get(name).lineage
    assert lin["seed"] == 1 and lin["base_fingerprint"] == srv.state.extra["base"].fingerprint


def test_bad_data_fails_the_job_before_training_and_the_server_stays_up(srv, client, tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n"
                 + json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    f = client.files.create(file=p.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=srv.state.service.model_id, training_file=f.id)
    done = wait(client, job.id)
    assert done.status == "failed" and ":2:" in done.error.message and done.error.code == "invalid_training_file"
    assert not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id).data)
    assert httpx.get(f"{srv.url}/health").status_code == 200


def test_crashing_job_is_failed_with_a_reason_and_cancel_works(srv, client, tmp_path):
    import os
    import signal

    f = client.files.create(file=color_data(tmp_path / "c.jsonl", 30).open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=srv.state.service.model_id, training_file=f.id,
                                         hyperparameters={"n_epochs": 50, "batch_size": 1})
    deadline = time.time() + 60
    while srv.state.jobs.job(job.id)["status"] != "running" and time.time() < deadline:
        time.sleep(0.2)
    pid = srv.state.jobs._db().execute("SELECT pid FROM jobs WHERE id=?", (job.id,)).fetchone()["pid"]
    time.sleep(2)
    os.kill(pid, signal.SIGKILL)  # an out-of-memory kill looks like this
    done = wait(client, job.id)
    assert done.status == "failed" and "exited" in done.error.message
    assert httpx.get(f"{srv.url}/health").status_code == 200
    job2 = client.fine_tuning.jobs.create(model=srv.state.service.model_id, training_file=f.id, hyperparameters={"n_epochs": 50, "batch_size": 1})
    c = client.fine_tuning.jobs.cancel(job2.id)
    assert c.status == "cancelled"
    time.sleep(1)
    assert client.fine_tuning.jobs.retrieve(job2.id).status == "cancelled"


def test_bad_requests(srv, client):
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model=srv.state.service.model_id, training_file="file-nope")
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")
    r = httpx.post(f"{srv.url}/v1/fine_tuning/jobs", json={"model": srv.state.service.model_id, "training_file": "x", "hyperparams": {}})
    assert r.status_code == 400 and "hyperparams" in r.json()["error"]["message"]
    r = httpx.post(f"{srv.url}/v1/files", files={"file": ("x.jsonl", b"not json\n")}, data={"purpose": "fine-tune"})
    assert r.status_code == 400 and "x.jsonl:1" in r.json()["error"]["message"]


def test_restart_lists_past_jobs_and_fails_interrupted_ones(tmp_path, tiny_base):
    from loraplex.trainer.jobs import JobManager

    data = color_data(tmp_path / "c.jsonl", 1)
    m = JobManager(tmp_path / "jobs", tmp_path / "store", str(tiny_base), "tiny", poll=3600)  # watcher effectively idle
    f = m.add_file("c.jsonl", data.read_bytes(), "fine-tune")
    j = m.create_job(model="tiny", training_file=f["id"], validation_file=None, suffix=None, seed=None, method={"type": "supervised"},
                     hyperparameters={}, overrides={}, metadata=None)
    with m._db() as c:
        c.execute("UPDATE jobs SET status='running' WHERE id=?", (j["id"],))
    m.close()
    m2 = JobManager(tmp_path / "jobs", tmp_path / "store", str(tiny_base), "tiny", poll=3600)
    try:
        j2 = m2.job(j["id"])
        assert j2["status"] == "failed" and j2["error"]["code"] == "interrupted"
        assert m2.files()[0]["id"] == f["id"]
    finally:
        m2.close()
