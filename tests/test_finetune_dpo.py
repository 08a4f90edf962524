"""DPO through the OpenAI fine-tuning API, end to end: the official client uploads an OpenAI-format
preference file, creates a `method: dpo` job with explicit hyperparameters, polls it to success and
chats with the result; the events carry the DPO metrics and the store's lineage records the method
and beta. A file with a record whose answer is missing or null is refused, naming the line and field."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from test_finetune_api import wait
from test_preference import pref_data


@pytest.fixture(scope="module")
def srv(tiny_base, tmp_path_factory):
    from conftest import start_server

    s = start_server(tmp_path_factory.mktemp("ft-dpo"), tiny_base)
    yield s
    s.stop()


@pytest.fixture()
def client(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)


def test_openai_client_dpo_job_trains_registers_and_serves(srv, client, tmp_path):
    f = client.files.create(file=pref_data(tmp_path / "prefs.jsonl", 16, style="openai").open("rb"), purpose="fine-tune")
    val = client.files.create(file=pref_data(tmp_path / "held-out.jsonl", 6, seed=7, style="openai").open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=srv.state.service.model_id, training_file=f.id, validation_file=val.id, suffix="prefs", seed=3,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 10}}},
        extra_body={"loraplex": {"sequence_len": 128, "adapter": {"r": 8}}},
    )
    assert job.method.type == "dpo"
    hp = job.method.dpo.hyperparameters
    assert (hp.beta, hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (0.25, 2, 4, 10)
    done = wait(client, job.id, timeout=120)
    assert done.status == "succeeded", done.error
    name = done.fine_tuned_model
    assert name.startswith("ft-prefs-")

    # the job's events carry the DPO metrics of every step (16 pairs / batch 4 x 2 epochs = 8 steps)
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    steps = sorted((e.data for e in events if e.type == "metrics" and not e.data.get("initial")), key=lambda d: d["step"])
    assert [s["step"] for s in steps] == list(range(1, 9))
    for s in steps:
        assert {"loss", "rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy"} <= set(s)
        assert s["rewards_margin"] == pytest.approx(s["rewards_chosen"] - s["rewards_rejected"], abs=1e-5)
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=0.01)  # step 1: policy == reference, -log sigmoid(0)
    assert steps[0]["loss"] > steps[-1]["loss"] and steps[-1]["rewards_accuracy"] == 1.0
    # held out: the validation file, evaluated before the first step (policy == reference: margin 0) and at the end
    initial = next(e for e in events if e.type == "metrics" and e.data.get("initial"))
    assert initial.data["loss"] is None and initial.data["val_margin"] == pytest.approx(0.0, abs=1e-4)
    finished = next(e for e in events if e.data and "val_accuracy" in e.data and e.data.get("steps") == 8)
    assert finished.data["val_accuracy"] > 0.8 and finished.data["val_margin"] > 0.1

    # the store registered the version with its lineage: method dpo, the beta asked for
    v = srv.state.store.get(name)
    assert v.version == 1
    assert v.lineage["method"] == "dpo" and v.lineage["config"]["beta"] == 0.25 and v.lineage["seed"] == 3
    assert v.lineage["config"]["epochs"] == 2 and v.lineage["config"]["micro_batch_size"] == 4
    assert len(v.lineage["dataset_sha256"]) == 2  # the training and the validation file

    # and the server serves it at once, saying which version answered
    r = client.chat.completions.with_raw_response.create(model=name, messages=[{"role": "user", "content": "Tell me about the river."}],
                                                         max_tokens=4, temperature=0)
    assert r.headers["x-loraplex-adapter"] == f"{name}@1"
    c = r.parse()
    assert c.system_fingerprint == f"{name}@1" and c.choices[0].message.content is not None


@pytest.mark.parametrize(
    "style,field,value",
    [
        ("openai", "non_preferred_output", "missing"),
        ("openai", "preferred_output", None),
        ("ours", "chosen", None),  # {"prompt", "chosen", "rejected"}: a null answer was a TypeError in training
        ("ours", "rejected", None),
    ],
)
def test_dpo_file_with_a_missing_or_null_answer_is_refused_naming_line_and_field(srv, client, tmp_path, style,
                                                                                field, value):
    p = pref_data(tmp_path / "bad-prefs.jsonl", 4, style=style)
    lines = p.read_text().splitlines()
    rec = json.loads(lines[2])
    if value == "missing":
        del rec[field]
    else:
        rec[field] = value
    lines[2] = json.dumps(rec)
    p.write_text("\n".join(lines) + "\n")
    f = client.files.create(file=p.open("rb"), purpose="fine-tune")
    before = {j.id for j in client.fine_tuning.jobs.list(limit=100).data}
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=srv.state.service.model_id, training_file=f.id, suffix="bad",
                                       method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 1}}})
    err = e.value.body
    assert "bad-prefs.jsonl:3" in err["message"] and f"'{field}'" in err["message"], err
    assert ("null" in err["message"]) == (value is None)
    assert err["param"] == "training_file" and err["code"] == "invalid_training_file" and f.id in err["message"]
    assert {j.id for j in client.fine_tuning.jobs.list(limit=100).data} == before  # no job was created
    assert not [a for a in srv.state.store.names() if a.startswith("ft-bad-")]
    assert httpx.get(f"{srv.url}/health").status_code == 200


def test_dpo_record_too_long_fails_the_job_naming_the_uploaded_file_and_line(srv, client, tmp_path):
    """What only the tokenizer can see fails in the job: the reason names the upload (not a server path) and the line."""
    p = pref_data(tmp_path / "long-prefs.jsonl", 4, style="openai")
    lines = p.read_text().splitlines()
    rec = json.loads(lines[1])
    rec["input"]["messages"][0]["content"] = "tell me everything " * 40
    lines[1] = json.dumps(rec)
    p.write_text("\n".join(lines) + "\n")
    f = client.files.create(file=p.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=srv.state.service.model_id, training_file=f.id, suffix="long",
                                         method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 1}}},
                                         extra_body={"loraplex": {"sequence_len": 96}})
    done = wait(client, job.id, timeout=120)
    assert done.status == "failed" and done.error.code == "invalid_training_file"
    assert f"{f.id} (long-prefs.jsonl):2: " in done.error.message and "sequence_len=96" in done.error.message, done.error.message
    assert str(srv.state.jobs.files_dir) not in done.error.message
    assert not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id).data)
    assert not [a for a in srv.state.store.names() if a.startswith("ft-long-")]
