"""Fine-tuning files and jobs shared by replicas: on one PostgreSQL registry (or one SQLite file, for processes of
one host) a file uploaded on A is listed and read on B, a job created on A is seen with its events on B and
cancelled from it, two replicas never claim the same job, a tenant's concurrent-jobs quota counts the jobs of every
replica, a replica that stops renewing its lease has its job taken over and resumed by another, and a job whose
adapter was registered before its replica died is not trained again. The slow test runs two `loraplex serve`
processes on one PostgreSQL: a pause, resume and cancel sent to the replica not running a job reach the one that
does; `kill -9` of the replica training a job, and the other resumes it from its checkpoint and finishes it."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from helpers import ServeProcess, started_pair
from test_trainer import color_data


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request):
    return None if request.param == "sqlite" else request.getfixturevalue("postgres_url")


@pytest.fixture
def pair(tmp_path, tiny_base, registry_url):
    """Two job managers, replicas "a" and "b", on one registry and one shared folder, watchers idle (the tests
    drive claims and takeovers themselves); `lease_seconds` 1."""
    from loraplex.adapters_store.registry import PostgresRegistry
    from loraplex.trainer.jobs import JobManager

    made, registries = [], []
    for name in "ab":
        reg = PostgresRegistry(registry_url) if registry_url else None
        registries.append(reg)
        made.append(JobManager(tmp_path / "jobs", tmp_path / "store", str(tiny_base), "tiny", registry=reg,
                               replica=f"replica-{name}", lease_seconds=1.0, poll=3600, max_queued=3))
    yield made
    for m in made:
        m.close()
    for reg in registries:
        if reg is not None:
            reg.close()


def _job(m, fid, **extra):
    return m.create_job({"model": "tiny", "training_file": fid, "method": {"type": "supervised"}, **extra})


def test_a_file_uploaded_on_one_replica_is_listed_and_read_on_another(pair, tmp_path):
    a, b = pair
    data = color_data(tmp_path / "c.jsonl", 1).read_bytes()
    f = a.add_file("colors.jsonl", data, "fine-tune")
    assert [x["id"] for x in b.files()] == [f["id"]]
    assert b.file(f["id"])["filename"] == "colors.jsonl" and b.file(f["id"])["bytes"] == len(data)
    assert b.file_path(f["id"]).read_bytes() == data
    b.delete_file(f["id"])
    with pytest.raises(Exception) as e:
        a.file(f["id"])
    assert getattr(e.value, "status", None) == 404 and a.files() == []


def test_a_job_created_on_one_replica_is_seen_with_its_events_and_cancelled_on_another(pair, tmp_path):
    from loraplex.trainer.jobs import JobError

    a, b = pair
    fid = a.add_file("c.jsonl", color_data(tmp_path / "c.jsonl", 1).read_bytes(), "fine-tune")["id"]
    job = _job(a, fid, suffix="shared")
    seen = b.job(job["id"])
    assert seen["status"] == "queued" and seen["training_plan"] == job["training_plan"]
    assert [j["id"] for j in b.jobs()[0]] == [job["id"]]
    assert "job created and queued" in b.events(job["id"])[0][-1]["message"]
    # the queue's length limit counts the jobs queued through every replica
    _job(b, fid)
    _job(a, fid)
    with pytest.raises(JobError) as e:
        _job(b, fid)
    assert e.value.status == 429 and len(a.jobs()[0]) == 3
    assert b.cancel(job["id"])["status"] == "cancelled"
    assert a.job(job["id"])["status"] == "cancelled" and a.events(job["id"])[0][0]["message"] == "job cancelled"
    with pytest.raises(JobError) as e:
        a.cancel(job["id"])
    assert e.value.status == 409


def test_replicas_never_claim_the_same_job_and_quotas_count_every_replica(pair, tmp_path, registry_url):
    from loraplex.adapters_store import AdapterStore
    from loraplex.adapters_store.tenancy import AccessRegistry
    from loraplex.server.api.auth_api import job_admission

    a, b = pair
    fid = a.add_file("c.jsonl", color_data(tmp_path / "c.jsonl", 1).read_bytes(), "fine-tune")["id"]
    ids = [_job(m, fid)["id"] for m in (a, b, a)]
    claims = {}
    threads = [threading.Thread(target=lambda m=m: claims.__setitem__(m.replica, m._claim(3))) for m in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claims["replica-a"] + claims["replica-b"]) == sorted(ids)
    assert not set(claims["replica-a"]) & set(claims["replica-b"])
    assert {r["job_id"]: r["holder"] for r in a._rows("SELECT job_id, holder FROM ft_leases")} == {
        j: who for who, js in claims.items() for j in js}
    for j in ids:
        a.cancel(j)

    # acme may run one job at a time: the one A runs keeps acme's next one off B; globex's starts on B
    access = AccessRegistry(AdapterStore(tmp_path / "store", registry=registry_url))
    try:
        access.set_quota("acme", {"concurrent_jobs": 1})
        first, second, other = (_job(a, fid)["id"] for _ in range(3))
        for jid, tenant in ((first, "acme"), (second, "acme"), (other, "globex")):
            access.set_owner("job", jid, tenant)
        a.may_start = b.may_start = job_admission(access)
        assert a._claim(1) == [first]
        assert b._claim(2) == [other] and b.job(second)["status"] == "queued"
    finally:
        access.store.close()


def test_a_replica_that_stops_renewing_its_lease_is_taken_over(pair, tmp_path):
    a, b = pair
    fid = a.add_file("c.jsonl", color_data(tmp_path / "c.jsonl", 1).read_bytes(), "fine-tune")["id"]
    jid = _job(a, fid)["id"]
    assert a._claim(1) == [jid]
    time.sleep(1.5)  # A's lease thread renews it: B must leave it alone
    b._recover()
    assert b.job(jid)["status"] == "validating_files" and b._claim(1) == []
    a._stop.set()  # A stops (as if killed): its leases are no longer renewed
    a._lease_thread.join(5)
    time.sleep(1.3)
    b._recover()
    messages = [e["message"] for e in b.events(jid, limit=50)[0]]
    assert "replica replica-a stopped renewing its lease" in messages[0] and b.job(jid)["status"] == "queued"
    assert b._claim(1) == [jid]
    b._launch(jid)
    try:
        first = b.events(jid)[0][0]
        assert first["message"] == "job resumed on replica replica-b after replica replica-a stopped"
        assert first["data"] == {"replica": "replica-b", "previous_replica": "replica-a"}
        assert b._row("SELECT holder FROM ft_leases WHERE job_id=?", (jid,))["holder"] == "replica-b"
    finally:
        b.cancel(jid)
    assert jid not in b._procs


def test_a_job_registered_by_a_replica_that_died_before_recording_it_is_not_trained_again(pair, tmp_path,
                                                                                          adapter_dirs):
    a, b = pair
    fid = a.add_file("c.jsonl", color_data(tmp_path / "c.jsonl", 1).read_bytes(), "fine-tune")["id"]
    jid = _job(a, fid)["id"]
    assert a._claim(1) == [jid]
    name = a._config(jid)["adapter"]["name"]
    a._store().register(name, adapter_dirs["alpha"], caller=f"fine_tuning:{jid}")  # its process got this far
    a._stop.set()
    a._lease_thread.join(5)
    time.sleep(1.3)
    b._recover()
    assert b._claim(1) == [jid]
    b._launch(jid)
    assert jid not in b._procs  # nothing to train
    done = a.job(jid)
    assert done["status"] == "succeeded" and done["fine_tuned_model"] == name
    assert [v.version for v in b._store().list() if v.name == name] == [1]
    assert b.events(jid)[0][0]["message"] == f"The job has successfully completed: {name}@1"
    assert b._rows("SELECT job_id FROM ft_leases") == []


# --- two server processes on one PostgreSQL registry ----------------------------------------------------------
class Server(ServeProcess):
    def __init__(self, tmp, model, store, registry, name):
        super().__init__(tmp, model, store, registry, name,
                         ["--job-lease-seconds", "2", "--max-loras", "2", "--kv-cache-tokens", "4096"])

    def api(self, method, path, **kw):
        r = httpx.request(method, f"{self.url}/v1{path}", timeout=60, **kw)
        assert r.status_code < 300, (r.status_code, r.text)
        return r.json()


@pytest.fixture
def servers(tmp_path, tiny_base, postgres_url):
    with started_pair(Server, tmp_path, tiny_base, postgres_url) as pair:
        yield pair


def _events(srv, jid):
    return srv.api("GET", f"/fine_tuning/jobs/{jid}/events", params={"limit": 1000})["data"][::-1]


def _holder(servers, jid, timeout=180, last=False):
    """The server whose replica started the job (its name carries the server's pid); `last`: the latest start."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for e in _events(servers[0], jid)[::-1] if last else _events(servers[0], jid):
            replica = (e.get("data") or {}).get("replica")
            if e["message"].startswith("job started on replica") and replica:
                for s in servers:
                    if f"-{s.proc.pid}-" in replica:
                        return s
        time.sleep(0.3)
    raise AssertionError(f"job {jid} did not start: {_events(servers[0], jid)}")


def _job_pid(postgres_url, jid):
    import psycopg

    with psycopg.connect(postgres_url) as c:
        return c.execute("SELECT pid FROM ft_jobs WHERE id=%s", (jid,)).fetchone()[0]


def _wait_status(srv, jid, want, timeout=300):
    deadline = time.time() + timeout
    while (job := srv.api("GET", f"/fine_tuning/jobs/{jid}"))["status"] not in want:
        assert time.time() < deadline, job
        time.sleep(0.5)
    return job


@pytest.mark.slow
def test_pause_resume_cancel_from_another_replica_and_kill_9_of_the_one_running_a_job(servers, tmp_path, postgres_url):
    a, b = servers
    data = color_data(tmp_path / "c.jsonl", 4).read_bytes()
    f = a.api("POST", "/files", files={"file": ("colors.jsonl", data)}, data={"purpose": "fine-tune"})
    assert b.api("GET", f"/files/{f['id']}")["filename"] == "colors.jsonl"
    r = httpx.get(f"{b.url}/v1/files/{f['id']}/content", timeout=60)
    assert r.status_code == 200 and r.content == data  # uploaded on A, read on B

    # pause, resume and cancel from the replica that does not run the job: the one that does follows
    job = a.api("POST", "/fine_tuning/jobs", json={"model": "default", "training_file": f["id"],
                                                   "hyperparameters": {"n_epochs": 50, "batch_size": 2}})
    holder = _holder(servers, job["id"])
    other = b if holder is a else a
    deadline = time.time() + 120
    while not any(e["type"] == "metrics" for e in _events(other, job["id"])):  # it trains
        assert time.time() < deadline
        time.sleep(0.3)
    assert other.api("POST", f"/fine_tuning/jobs/{job['id']}/pause")["status"] == "paused"
    deadline = time.time() + 60
    while not any(e["message"].startswith("job paused at step") for e in _events(other, job["id"])):
        assert time.time() < deadline, _events(other, job["id"])  # its process checkpointed and left
        time.sleep(0.3)
    assert other.api("GET", f"/fine_tuning/jobs/{job['id']}/checkpoints")["data"]
    assert other.api("POST", f"/fine_tuning/jobs/{job['id']}/resume")["status"] in ("queued", "validating_files",
                                                                                   "running")
    _wait_status(other, job["id"], ("running",), timeout=60)
    pid = _job_pid(postgres_url, job["id"])
    holder = _holder(servers, job["id"], last=True)
    other = b if holder is a else a
    assert other.api("POST", f"/fine_tuning/jobs/{job['id']}/cancel")["status"] == "cancelled"
    deadline = time.time() + 15
    while os.path.exists(f"/proc/{pid}"):
        assert time.time() < deadline, "the cancelled job's process still runs"
        time.sleep(0.2)
    assert holder.api("GET", f"/fine_tuning/jobs/{job['id']}")["status"] == "cancelled"
    assert any("was stopped: the job is cancelled" in e["message"] for e in _events(other, job["id"]))

    # kill -9 the replica training a job: the other resumes it from its last checkpoint and finishes it
    job = b.api("POST", "/fine_tuning/jobs", json={
        "model": "default", "training_file": f["id"], "suffix": "takeover",
        "hyperparameters": {"n_epochs": 3, "batch_size": 2}, "loraplex": {"save_steps": 4}})
    holder = _holder(servers, job["id"])
    survivor = b if holder is a else a
    deadline = time.time() + 300
    while not survivor.api("GET", f"/fine_tuning/jobs/{job['id']}/checkpoints")["data"]:  # seen from the other
        assert time.time() < deadline
        time.sleep(0.3)
    holder.proc.send_signal(signal.SIGKILL)
    holder.proc.wait(10)
    done = _wait_status(survivor, job["id"], ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded", done["error"]
    events = _events(survivor, job["id"])
    messages = [e["message"] for e in events]
    dead = f"-{holder.proc.pid}-"
    assert any("stopped renewing its lease" in m and dead in m for m in messages), messages
    resumed = [e for e in events if e["message"].startswith("job resumed on replica")]
    assert len(resumed) == 1 and dead in resumed[0]["data"]["previous_replica"]
    assert f"-{survivor.proc.pid}-" in resumed[0]["data"]["replica"] and "from its checkpoint at step" in messages[
        messages.index(resumed[0]["message"])]
    steps = [e["data"]["step"] for e in events if e["type"] == "metrics"]
    assert max(steps) == done["training_plan"]["optimizer_steps"]
    name = done["fine_tuned_model"].rsplit("@", 1)[0]
    versions = [v for v in survivor.api("GET", "/adapters")["data"] if v.get("name") == name]
    assert len(versions) == 1, versions  # registered once
    r = httpx.post(f"{survivor.url}/v1/completions", json={"model": done["fine_tuned_model"], "prompt": "What color",
                                                            "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text
    assert json.loads(r.text)["choices"]
