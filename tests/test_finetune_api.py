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


def wait(client, jid, timeout=900):
    deadline = time.time() + timeout
    while time.time() < deadline:
        j = client.fine_tuning.jobs.retrieve(jid)
        if j.status in ("succeeded", "failed", "cancelled"):
            return j
        time.sleep(0.5)
    raise AssertionError(f"job {jid} did not finish: {j.status}")


def test_openai_client_fine_tunes_and_chats_with_the_result(srv, client, tmp_path, tmp_path_factory):
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
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 10, "batch_size": 4, "learning_rate_multiplier": 25}}},
            extra_body={"loraplex": {"sequence_len": 256}},
        )
        # OpenAI's meaning: 48 examples / 4 per step = 12 optimizer steps per epoch, packed or not
        assert job.status in ("queued", "running") and job.hyperparameters.n_epochs == 10
        assert job.to_dict()["training_plan"]["optimizer_steps"] == 120
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
    assert client.files.content(done.result_files[0]).text.startswith("step,train_loss,valid_loss")
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
    # what a client reads back names uploads and checkpoints, never a server path
    assert [(d["path"], d["format"]) for d in lin["config"]["datasets"]] == [(f"{f.id} (colors.jsonl)", "auto")] and list(lin["dataset_sha256"]) == [f"{f.id} (colors.jsonl)"]
    assert all(c.fine_tuned_model_checkpoint == name or c.fine_tuned_model_checkpoint.startswith(f"{name}:ckpt-step-") for c in cks)
    shown = json.dumps([httpx.get(f"{srv.url}/v1/fine_tuning/jobs/{job.id}").json(),
                        httpx.get(f"{srv.url}/v1/fine_tuning/jobs/{job.id}/events", params={"limit": 100}).json(),
                        httpx.get(f"{srv.url}/v1/fine_tuning/jobs/{job.id}/checkpoints").json(),
                        httpx.get(f"{srv.url}/v1/adapters/{name}").json()["versions"][0]["lineage"]])
    assert str(tmp_path_factory.getbasetemp()) not in shown and "/tmp/" not in shown, shown


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
    pid = srv.state.jobs._row("SELECT pid FROM ft_jobs WHERE id=?", (job.id,))["pid"]
    time.sleep(2)
    os.kill(pid, signal.SIGKILL)  # an out-of-memory kill looks like this
    done = wait(client, job.id)
    # the reason is the signal, not whatever the process last logged
    assert done.status == "failed" and done.error.message == "the training process was killed by SIGKILL (out of memory?)"
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


def test_restart_lists_past_jobs_and_requeues_interrupted_ones(tmp_path, tiny_base):
    from loraplex.trainer.jobs import JobManager

    data = color_data(tmp_path / "c.jsonl", 1)
    m = JobManager(tmp_path / "jobs", tmp_path / "store", str(tiny_base), "tiny", poll=3600)  # watcher effectively idle
    f = m.add_file("c.jsonl", data.read_bytes(), "fine-tune")
    j = m.create_job({"model": "tiny", "training_file": f["id"], "method": {"type": "supervised"}})
    with m.db.write() as c:
        c.execute("UPDATE ft_jobs SET status='running' WHERE id=?", (j["id"],))
    m.close()
    m2 = JobManager(tmp_path / "jobs", tmp_path / "store", str(tiny_base), "tiny", poll=3600)
    try:
        j2 = m2.job(j["id"])
        assert j2["status"] == "queued" and j2["error"] is None  # to resume from its last checkpoint
        assert "interrupted by a server restart" in m2.events(j["id"])[0][0]["message"]
        assert m2.files()[0]["id"] == f["id"]
    finally:
        m2.close()


def test_routes_mounted_alone_answer_the_openai_client(tmp_path, tiny_base):
    """fine_tuning_routes() in a bare Starlette app (no server wrapper): shapes the openai client parses, errors as bodies."""
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from loraplex.server.api.http_fine_tuning import fine_tuning_routes
    from loraplex.trainer.jobs import JobManager

    m = JobManager(tmp_path / "jobs", tmp_path / "store", str(tiny_base), "tiny", poll=3600)  # jobs stay queued
    try:
        http = TestClient(Starlette(routes=fine_tuning_routes(m)))
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)
        data = color_data(tmp_path / "c.jsonl", 1)
        ids = [client.files.create(file=(f"c{i}.jsonl", data.read_bytes()), purpose="fine-tune").id for i in range(3)]
        other = client.files.create(file=("b.jsonl", b'{"custom_id": "1"}\n'), purpose="batch")
        assert [f.id for f in client.files.list(purpose="fine-tune")] == ids[::-1]
        page = client.files.list(limit=2, order="asc")
        assert [f.id for f in page.data] == ids[:2] and page.has_more
        assert [f.id for f in client.files.list(limit=2, order="asc", after=ids[1]).data] == [ids[2], other.id]
        assert client.files.content(ids[0]).read() == data.read_bytes()
        assert client.files.delete(ids[2]).deleted and ids[2] not in [f.id for f in client.files.list()]

        jobs = [client.fine_tuning.jobs.create(model="tiny", training_file=ids[0], suffix="a", seed=3,
                                               method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": "auto",
                                                                                                                "learning_rate_multiplier": 0.5}}})]
        jobs.append(client.fine_tuning.jobs.create(model="tiny", training_file=ids[1], hyperparameters={"n_epochs": 1}))  # legacy form
        j = client.fine_tuning.jobs.retrieve(jobs[0].id)
        assert j.status == "queued" and j.seed == 3 and j.method.type == "supervised"
        assert j.method.supervised.hyperparameters.n_epochs == 2 and j.hyperparameters.learning_rate_multiplier == 0.5
        assert jobs[1].hyperparameters.n_epochs == 1
        first = client.fine_tuning.jobs.list(limit=1)
        assert [x.id for x in first.data] == [jobs[1].id] and first.has_more
        assert [x.id for x in client.fine_tuning.jobs.list(limit=1, after=jobs[1].id).data] == [jobs[0].id]
        assert client.fine_tuning.jobs.list_events(jobs[0].id).data[-1].message.startswith("job created and queued: ")
        assert client.fine_tuning.jobs.checkpoints.list(jobs[0].id).data == []
        assert client.fine_tuning.jobs.cancel(jobs[0].id).status == "cancelled"
        with pytest.raises(openai.ConflictError):
            client.fine_tuning.jobs.cancel(jobs[0].id)
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve("file-nope")
        with pytest.raises(openai.NotFoundError):
            client.fine_tuning.jobs.create(model="gpt-4o", training_file=ids[0])
        r = http.get("/v1/fine_tuning/jobs?limit=0")
        assert r.status_code == 400 and r.json()["error"]["param"] == "limit"
        r = http.post("/v1/fine_tuning/jobs", content=b"{oops")
        assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    finally:
        m.close()
