"""Hostile fine-tuning requests and uploads, as an attacker would send them to a running server.

Every case of the corpus asserts what the hardening promises: a 4xx in OpenAI's error shape naming the
offending field, nothing created (the job and file lists are unchanged, no stray file on disk), and a
server that still answers a completion afterwards. The rest checks one limit each: the allow-list keeps
code, paths, devices and names with the operator; uploads stream to disk under a size limit without
growing the server's memory; the queue and a job's run time are bounded; a killed job says which signal
killed it; nothing a client reads back names a server path.
"""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import openai
import pytest

from test_trainer import color_data


@pytest.fixture(scope="module")
def srv(tiny_base, tmp_path_factory, adapter_dirs):
    from conftest import start_server

    s = start_server(tmp_path_factory.mktemp("hostile"), tiny_base)
    r = httpx.post(f"{s.url}/v1/adapters", json={"name": "prod", "path": str(adapter_dirs["beta"])})
    assert r.status_code in (200, 201), r.text
    yield s
    s.stop()


@pytest.fixture(scope="module")
def good_file(srv, tmp_path_factory):
    p = color_data(tmp_path_factory.mktemp("data") / "colors.jsonl", 1)
    r = httpx.post(
        f"{srv.url}/v1/files", files={"file": ("colors.jsonl", p.read_bytes())}, data={"purpose": "fine-tune"}
    )
    assert r.status_code == 200, r.text
    return r.json()["id"]


@pytest.fixture(scope="module")
def batch_file(srv):
    r = httpx.post(
        f"{srv.url}/v1/files", files={"file": ("b.jsonl", b'{"custom_id": "1"}\n')}, data={"purpose": "batch"}
    )
    assert r.status_code == 200, r.text
    return r.json()["id"]


def listing(srv) -> tuple[list, list, list]:
    jobs = httpx.get(f"{srv.url}/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]
    files = httpx.get(f"{srv.url}/v1/files").json()["data"]
    return (
        [j["id"] for j in jobs],
        [f["id"] for f in files],
        sorted(p.name for p in srv.state.jobs.files_dir.iterdir()),
    )


def assert_refused(r: httpx.Response, status: int | tuple, names: str | None = None):
    assert r.status_code in ((status,) if isinstance(status, int) else status), (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["type"]
    if names is not None:
        assert names in err["message"] and (
            err["param"] is None or names.startswith(err["param"]) or err["param"] in names
        ), err
    return err


def assert_serves(srv):
    r = httpx.post(
        f"{srv.url}/v1/chat/completions",
        timeout=60,
        json={"model": srv.state.service.model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert r.status_code == 200, r.text
    assert httpx.get(f"{srv.url}/health").json()["status"] == "ok"


def base(**kw):
    return {"model": "__base__", "training_file": "__file__", **kw}


# (id, body, status, the field the error must name)
JOB_BODIES = [
    ("grpo-with-python-reward", base(loraplex={"method": "grpo", "reward": "pty:spawn"}), 400, "loraplex.method"),
    ("python-reward", base(loraplex={"reward": "os:system"}), 400, "loraplex.reward"),
    ("reward-adapter", base(loraplex={"reward": {"adapter": "prod"}}), 400, "loraplex.reward"),
    ("dataset-server-path", base(loraplex={"datasets": [{"path": "/etc/passwd"}]}), 400, "loraplex.datasets"),
    ("dataset-string", base(loraplex={"datasets": ["/etc/hostname"]}), 400, "loraplex.datasets"),
    (
        "validation-dataset",
        base(loraplex={"validation_datasets": ["/etc/passwd"]}),
        400,
        "loraplex.validation_datasets",
    ),
    ("base-model-path", base(loraplex={"base_model": "/"}), 400, "loraplex.base_model"),
    ("num-processes", base(loraplex={"num_processes": 64}), 400, "loraplex.num_processes"),
    ("distributed", base(loraplex={"distributed": "fsdp"}), 400, "loraplex.distributed"),
    ("output-dir", base(loraplex={"output_dir": "/tmp/x"}), 400, "loraplex.output_dir"),
    ("device", base(loraplex={"device": "cuda:7"}), 400, "loraplex.device"),
    ("seed-override", base(loraplex={"seed": 1}), 400, "loraplex.seed"),
    ("epochs-override", base(loraplex={"epochs": 1e9}), 400, "loraplex.epochs"),
    ("rl-knob-on-sft", base(loraplex={"kl_coef": 0.1}), 400, "loraplex.kl_coef"),
    ("ppo-knob", base(loraplex={"vf_coef": 0.1}), 400, "loraplex.vf_coef"),
    ("rl-knob-huge", base(loraplex={"response_length": 10**9}), 400, "loraplex.response_length"),
    ("canary-override", base(loraplex={"canary": 50}), 400, "loraplex.canary"),
    ("canary", base(canary=50), 400, "canary"),
    ("hijack-existing-name", base(loraplex={"adapter": {"name": "prod"}}), 400, "loraplex.adapter.name"),
    ("unknown-knob", base(loraplex={"__class__": 1}), 400, "loraplex.__class__"),
    ("unknown-adapter-key", base(loraplex={"adapter": {"bias": "all"}}), 400, "loraplex.adapter.bias"),
    ("loraplex-not-object", base(loraplex="rm -rf /"), 400, "loraplex"),
    ("method-grpo", base(method={"type": "grpo"}), 400, "method.type"),
    (
        "grader-python-source",
        base(method={"type": "reinforcement", "reinforcement": {"grader": {"type": "python", "source": "import os"}}}),
        400,
        "method.reinforcement.grader",
    ),
    (
        "grader-python-unregistered",
        base(
            method={"type": "reinforcement", "reinforcement": {"grader": {"type": "python", "function": "os:system"}}}
        ),
        400,
        "method.reinforcement.grader",
    ),
    (
        "grader-python-in-multi",
        base(
            method={
                "type": "reinforcement",
                "reinforcement": {
                    "grader": {
                        "type": "multi",
                        "graders": {"a": {"type": "python", "function": "pty:spawn"}},
                        "calculate_output": "a",
                    }
                },
            }
        ),
        400,
        "method.reinforcement.grader",
    ),
    ("reinforcement-no-grader", base(method={"type": "reinforcement"}), 400, "method.reinforcement"),
    (
        "reinforcement-unknown-hp",
        base(
            method={
                "type": "reinforcement",
                "reinforcement": {
                    "grader": {"type": "string_check", "input": "a", "reference": "b"},
                    "hyperparameters": {"compute_multiplier": 1e9},
                },
            }
        ),
        400,
        "method.reinforcement.hyperparameters.compute_multiplier",
    ),
    ("method-not-object", base(method="supervised"), 400, "method"),
    ("method-mismatch", base(method={"type": "supervised", "dpo": {}}), 400, "method.dpo"),
    ("supervised-not-object", base(method={"type": "supervised", "supervised": "fast"}), 400, "method.supervised"),
    (
        "hp-not-object",
        base(method={"type": "supervised", "supervised": {"hyperparameters": [1]}}),
        400,
        "method.supervised.hyperparameters",
    ),
    (
        "lr-multiplier-abc",
        base(hyperparameters={"learning_rate_multiplier": "abc"}),
        400,
        "hyperparameters.learning_rate_multiplier",
    ),
    (
        "lr-multiplier-negative",
        base(hyperparameters={"learning_rate_multiplier": -1}),
        400,
        "hyperparameters.learning_rate_multiplier",
    ),
    (
        "lr-multiplier-huge",
        base(method={"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": 1e300}}}),
        400,
        "method.supervised.hyperparameters.learning_rate_multiplier",
    ),
    ("n-epochs-1e308", base(hyperparameters={"n_epochs": 1e308}), 400, "hyperparameters.n_epochs"),
    ("n-epochs-float", base(hyperparameters={"n_epochs": 2.5}), 400, "hyperparameters.n_epochs"),
    ("n-epochs-zero", base(hyperparameters={"n_epochs": 0}), 400, "hyperparameters.n_epochs"),
    ("n-epochs-bool", base(hyperparameters={"n_epochs": True}), 400, "hyperparameters.n_epochs"),
    ("batch-size-huge", base(hyperparameters={"batch_size": 10**9}), 400, "hyperparameters.batch_size"),
    ("beta-on-supervised", base(hyperparameters={"beta": 0.1}), 400, "hyperparameters.beta"),
    (
        "dpo-beta-huge",
        base(method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 1e9}}}),
        400,
        "method.dpo.hyperparameters.beta",
    ),
    ("seed-1e23", base(seed=1e23), 400, "seed"),
    ("seed-2**64-1", base(seed=2**64 - 1), 400, "seed"),
    ("seed-negative", base(seed=-1), 400, "seed"),
    ("seed-string", base(seed="42"), 400, "seed"),
    ("sequence-len-huge", base(loraplex={"sequence_len": 10**9}), 400, "loraplex.sequence_len"),
    ("max-steps-bool", base(loraplex={"max_steps": True}), 400, "loraplex.max_steps"),
    (
        "grad-accum-huge",
        base(loraplex={"gradient_accumulation_steps": 10**12}),
        400,
        "loraplex.gradient_accumulation_steps",
    ),
    ("rank-huge", base(loraplex={"adapter": {"r": 100000}}), 400, "loraplex.adapter.r"),
    ("rank-float", base(loraplex={"adapter": {"r": 4.9}}), 400, "loraplex.adapter.r"),
    ("dropout-one", base(loraplex={"adapter": {"dropout": 1.0}}), 400, "loraplex.adapter.dropout"),
    (
        "target-lm-head",
        base(loraplex={"adapter": {"target_modules": ["lm_head"]}}),
        400,
        "loraplex.adapter.target_modules",
    ),
    (
        "target-regex",
        base(loraplex={"adapter": {"target_modules": "(.*.*)*Z"}}),
        400,
        "loraplex.adapter.target_modules",
    ),
    ("quantize-8bit", base(loraplex={"quantize": "8bit"}), 400, "loraplex.quantize"),
    ("init-from-missing", base(loraplex={"adapter": {"init_from": "nope"}}), 404, "loraplex.adapter.init_from"),
    (
        "init-from-missing-version",
        base(loraplex={"adapter": {"init_from": "prod@9"}}),
        404,
        "loraplex.adapter.init_from",
    ),
    ("init-from-path", base(loraplex={"adapter": {"init_from": "../../etc"}}), 400, "loraplex.adapter.init_from"),
    ("init-from-arabic-digit", base(loraplex={"adapter": {"init_from": "prod@١"}}), 400, "loraplex.adapter.init_from"),
    ("suffix-path", base(suffix="../../x"), 400, "suffix"),
    ("suffix-long", base(suffix="a" * 300), 400, "suffix"),
    ("suffix-unicode-digits", base(suffix="a²"), 400, "suffix"),
    ("metadata-too-many", base(metadata={f"k{i}": "v" for i in range(17)}), 400, "metadata"),
    ("metadata-not-string", base(metadata={"k": {"nested": 1}}), 400, "metadata"),
    ("integrations", base(integrations=[{"type": "wandb", "wandb": {"project": "x"}}]), 400, "integrations"),
    ("unknown-top-level", base(hyperparams={}), 400, "hyperparams"),
    ("model-other", base(model="gpt-4o"), 404, "model"),
    ("model-server-path", base(model="__path__"), 404, "model"),
    ("model-not-string", base(model=["x"]), 400, "model"),
    ("training-file-missing", base(training_file="file-nope"), 404, "training_file"),
    ("training-file-batch-purpose", base(training_file="__batch__"), 400, "training_file"),
    ("validation-file-missing", base(validation_file="file-nope"), 404, "validation_file"),
    ("no-training-file", {"model": "__base__"}, 400, "training_file"),
]


def fill(body, srv, good_file, batch_file):
    text = json.dumps(body).replace('"__base__"', json.dumps(srv.state.service.model_id))
    text = text.replace('"__file__"', json.dumps(good_file)).replace('"__batch__"', json.dumps(batch_file))
    return text.replace('"__path__"', json.dumps(srv.state.jobs.base_model))


@pytest.mark.parametrize("body,status,field", [c[1:] for c in JOB_BODIES], ids=[c[0] for c in JOB_BODIES])
def test_hostile_job_body_is_refused_naming_the_field_and_changes_nothing(
    srv, good_file, batch_file, body, status, field
):
    before = listing(srv)
    r = httpx.post(
        f"{srv.url}/v1/fine_tuning/jobs",
        content=fill(body, srv, good_file, batch_file),
        headers={"content-type": "application/json"},
    )
    err = assert_refused(r, status, field)
    assert err["param"] == field, err
    assert str(srv.state.jobs.root) not in r.text and (
        str(srv.state.jobs.base_model) not in r.text or "__path__" in json.dumps(body)
    )
    assert listing(srv) == before
    assert_serves(srv)


RAW_JOB_BODIES = [  # bodies JSON libraries write but json.dumps would not: non-finite numbers, lone surrogates
    ("n-epochs-nan", '"hyperparameters": {"n_epochs": NaN}', "hyperparameters.n_epochs"),
    (
        "lr-multiplier-infinity",
        '"hyperparameters": {"learning_rate_multiplier": Infinity}',
        "hyperparameters.learning_rate_multiplier",
    ),
    ("alpha-infinity", '"loraplex": {"adapter": {"alpha": Infinity}}', "loraplex.adapter.alpha"),
    ("weight-decay-nan", '"loraplex": {"weight_decay": NaN}', "loraplex.weight_decay"),
    ("metadata-lone-surrogate", '"metadata": {"k": "\\ud800"}', "metadata.k"),
    ("suffix-lone-surrogate", '"suffix": "a\\udfff"', "suffix"),
]


@pytest.mark.parametrize("extra,field", [c[1:] for c in RAW_JOB_BODIES], ids=[c[0] for c in RAW_JOB_BODIES])
def test_non_finite_numbers_and_lone_surrogates_are_refused(srv, good_file, extra, field):
    before = listing(srv)
    body = f'{{"model": {json.dumps(srv.state.service.model_id)}, "training_file": "{good_file}", {extra}}}'
    r = httpx.post(f"{srv.url}/v1/fine_tuning/jobs", content=body, headers={"content-type": "application/json"})
    assert assert_refused(r, 400, field)["param"] == field
    assert listing(srv) == before
    assert httpx.get(f"{srv.url}/v1/fine_tuning/jobs").status_code == 200  # listing still encodes
    assert_serves(srv)


def test_a_dataset_override_cannot_probe_which_server_files_exist(srv, good_file):
    def ask(path):
        r = httpx.post(
            f"{srv.url}/v1/fine_tuning/jobs",
            json={
                "model": srv.state.service.model_id,
                "training_file": good_file,
                "loraplex": {"datasets": [{"path": path}]},
            },
        )
        return r.status_code, r.json()

    assert ask("/etc/passwd") == ask("/no/such/file") == ask(str(srv.state.jobs.files_dir))


def test_allowed_knobs_reach_the_job_config_and_the_record_states_the_method(srv, good_file):
    body = {
        "model": srv.state.service.model_id,
        "training_file": good_file,
        "suffix": "knobs",
        "seed": 7,
        "method": {
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 2}},
        },
        "metadata": {"team": "search"},
        "loraplex": {
            "sequence_len": 128,
            "packing": False,
            "lr_scheduler": "cosine",
            "warmup_steps": 2,
            "weight_decay": 0.01,
            "max_grad_norm": 0.5,
            "save_steps": 7,
            "logging_steps": 2,
            "max_steps": 3,
            "adapter": {
                "r": 4,
                "alpha": 8,
                "dropout": 0.1,
                "target_modules": ["q_proj", "v_proj"],
                "init_from": "prod@1",
            },
        },
    }
    r = httpx.post(f"{srv.url}/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    job = r.json()
    try:
        assert job["method"]["type"] == "supervised" and job["seed"] == 7 and job["metadata"] == {"team": "search"}
        cfg = json.loads(
            srv.state.jobs._row("SELECT config FROM ft_jobs WHERE id=?", (job["id"],))["config"]
        )
        assert cfg["method"] == "sft" and cfg["epochs"] == 2 and cfg["examples_per_step"] == 2
        assert cfg["learning_rate"] == pytest.approx(4e-4) and cfg["sequence_len"] == 128 and cfg["packing"] is False
        assert (cfg["lr_scheduler"], cfg["warmup_steps"], cfg["save_steps"], cfg["max_steps"]) == ("cosine", 2, 7, 3)
        a = cfg["adapter"]
        assert (a["r"], a["alpha"], a["dropout"], a["target_modules"], a["init_from"]) == (
            4,
            8,
            0.1,
            ["q_proj", "v_proj"],
            "prod@1",
        )
        assert a["name"].startswith("ft-knobs-") and a["name"] != "prod"
        assert (
            cfg["reward"] is None and cfg["num_processes"] == 1 and cfg["output_dir"] is None and cfg["device"] is None
        )
    finally:
        httpx.post(f"{srv.url}/v1/fine_tuning/jobs/{job['id']}/cancel")


# --- uploads -------------------------------------------------------------------------------------------
def multipart(
    parts: list[tuple[str, str | None, bytes]], boundary: str = "loraplexboundary", close: bool = True
) -> bytes:
    out = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    return out + (f"--{boundary}--\r\n".encode() if close else b"")


MP = "multipart/form-data; boundary=loraplexboundary"
GOOD_LINE = (
    json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}).encode()
    + b"\n"
)

UPLOADS = [  # (id, content type, body, status, what the message names)
    (
        "no-boundary",
        "multipart/form-data",
        multipart([("purpose", None, b"fine-tune"), ("file", "x.jsonl", GOOD_LINE)]),
        400,
        "boundary",
    ),
    ("not-multipart", "application/json", b'{"file": "x"}', 400, "multipart"),
    ("no-content-type", "", GOOD_LINE, 400, "multipart"),
    (
        "filename-300",
        MP,
        multipart([("purpose", None, b"fine-tune"), ("file", "a" * 296 + ".jsonl", GOOD_LINE)]),
        400,
        "255",
    ),
    (
        "bad-json-line-3",
        MP,
        multipart([("purpose", None, b"fine-tune"), ("file", "bad.jsonl", GOOD_LINE * 2 + b"{oops\n" + GOOD_LINE)]),
        400,
        "bad.jsonl:3",
    ),
    (
        "bad-line-purpose-after-file",
        MP,
        multipart([("file", "late.jsonl", GOOD_LINE + b"[1, 2]\n"), ("purpose", None, b"fine-tune")]),
        400,
        "late.jsonl:2",
    ),
    (
        "invalid-utf8-line",
        MP,
        multipart([("purpose", None, b"fine-tune"), ("file", "u.jsonl", GOOD_LINE + b'{"text": "\xff\xfe"}\n')]),
        400,
        "u.jsonl:2",
    ),
    (
        "lone-surrogate-line",
        MP,
        multipart([("purpose", None, b"fine-tune"), ("file", "s.jsonl", b'{"text": "\\ud800"}\n')]),
        400,
        "s.jsonl:1",
    ),
    (
        "nested-100k-deep",
        MP,
        multipart([("purpose", None, b"fine-tune"), ("file", "d.jsonl", b'{"a": ' * 100000 + b"1" + b"}" * 100000)]),
        400,
        "d.jsonl:1",
    ),
    (
        "line-over-8-mib",
        MP,
        multipart([("purpose", None, b"fine-tune"), ("file", "l.jsonl", b'{"text": "' + b"x" * (9 << 20))]),
        400,
        "l.jsonl:1",
    ),
    (
        "not-an-object",
        MP,
        multipart([("purpose", None, b"fine-tune"), ("file", "n.jsonl", b"42\n")]),
        400,
        "n.jsonl:1",
    ),
    (
        "empty-fine-tune-file",
        MP,
        multipart([("purpose", None, b"fine-tune"), ("file", "e.jsonl", b"\n\n")]),
        400,
        "e.jsonl",
    ),
    (
        "last-line-bad-no-newline",
        MP,
        multipart([("purpose", None, b"fine-tune"), ("file", "t.jsonl", GOOD_LINE + b'{"a": ')]),
        400,
        "t.jsonl:2",
    ),
    ("no-purpose", MP, multipart([("file", "x.jsonl", GOOD_LINE)]), 400, "purpose"),
    (
        "unknown-purpose",
        MP,
        multipart([("purpose", None, b"../../etc"), ("file", "x.jsonl", GOOD_LINE)]),
        400,
        "purpose",
    ),
    ("no-file", MP, multipart([("purpose", None, b"fine-tune")]), 400, "file"),
    (
        "file-without-filename",
        MP,
        multipart([("purpose", None, b"fine-tune"), ("file", None, GOOD_LINE)]),
        400,
        "file",
    ),
    (
        "two-files",
        MP,
        multipart([("purpose", None, b"fine-tune"), ("file", "a.jsonl", GOOD_LINE), ("file", "b.jsonl", GOOD_LINE)]),
        400,
        "twice",
    ),
    (
        "truncated",
        MP,
        multipart([("purpose", None, b"fine-tune"), ("file", "x.jsonl", GOOD_LINE)], close=False),
        400,
        "multipart",
    ),
    ("garbage", MP, b"\x00" * 5000, 400, "multipart"),
]


@pytest.mark.parametrize("ctype,body,status,names", [c[1:] for c in UPLOADS], ids=[c[0] for c in UPLOADS])
def test_hostile_upload_is_refused_and_leaves_nothing(srv, ctype, body, status, names):
    before = listing(srv)
    r = httpx.post(f"{srv.url}/v1/files", content=body, headers={"content-type": ctype} if ctype else {})
    assert_refused(r, status)
    assert names in r.json()["error"]["message"], r.json()
    assert listing(srv) == before  # no record, no file (not even a partial one) in the files dir
    assert_serves(srv)


def test_upload_names_are_sanitised_and_never_choose_the_file_on_disk(srv):
    body = multipart([("purpose", None, b"fine-tune"), ("file", "../../jobs/evil\x07.py", GOOD_LINE)])
    r = httpx.post(f"{srv.url}/v1/files", content=body, headers={"content-type": MP})
    assert r.status_code == 200, r.text
    f = r.json()
    assert f["filename"] == "evil.py" and f["bytes"] == len(GOOD_LINE)
    on_disk = [p.name for p in srv.state.jobs.files_dir.iterdir() if p.name.startswith(f["id"])]
    assert on_disk == [f"{f['id']}.jsonl"]  # not a .py anything could import
    assert httpx.get(f"{srv.url}/v1/files/{f['id']}/content").content == GOOD_LINE
    httpx.delete(f"{srv.url}/v1/files/{f['id']}")


def test_upload_over_the_limit_is_413_naming_it_as_soon_as_it_is_passed(srv, monkeypatch):
    import socket

    monkeypatch.setattr(srv.state.jobs, "max_upload_bytes", 1 << 20)
    before = listing(srv)
    # a chunked body (no Content-Length) that goes on: the answer comes after 2 MiB, while the client is still sending
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            f"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: {MP}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        head = (
            multipart([("purpose", None, b"fine-tune")], close=False)
            + b'--loraplexboundary\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
        )
        block = GOOD_LINE * (65536 // len(GOOD_LINE))
        sent = []

        def send():  # on its own thread: the server may stop reading while we still write
            try:
                for data in [head] + [block] * 1024:  # 64 MiB
                    sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))
                    sent.append(len(data))
            except OSError:
                pass

        writer = threading.Thread(target=send, daemon=True)
        writer.start()
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            got = sock.recv(65536)
            if not got:
                break
            answer += got
        assert sum(sent) < 16 << 20  # answered long before the body's end
    status = int(answer.split(b" ", 2)[1])
    err = json.loads(answer[answer.index(b"{") :])["error"]
    assert status == 413 and "1048576 bytes" in err["message"] and "--max-upload-bytes" in err["message"], answer
    # a Content-Length over the limit is refused before the body is read
    data = multipart(
        [("purpose", None, b"fine-tune"), ("file", "big.jsonl", GOOD_LINE * ((2 << 20) // len(GOOD_LINE)))]
    )
    r = httpx.post(f"{srv.url}/v1/files", content=data, headers={"content-type": MP})
    assert "--max-upload-bytes" in assert_refused(r, 413)["message"]
    assert listing(srv) == before
    assert_serves(srv)


def _hwm_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))


def _rss_kib() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1))


def test_a_large_upload_streams_to_disk_without_growing_the_servers_memory(srv):
    """96 MiB of JSONL through the in-process server: its peak resident memory grows by far less than the file."""
    line = (
        json.dumps(
            {"messages": [{"role": "user", "content": "x" * 400}, {"role": "assistant", "content": "y" * 400}]}
        ).encode()
        + b"\n"
    )
    n = (96 << 20) // len(line)
    head = (
        b'--loraplexboundary\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        b'--loraplexboundary\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
    )
    block = line * 1024

    def body():
        yield head
        for _ in range(n // 1024):
            yield block
        yield b"\r\n--loraplexboundary--\r\n"

    peak = [0]
    stop = threading.Event()
    try:  # the kernel's high-water mark, reset now; sampling if this kernel does not allow the reset
        open("/proc/self/clear_refs", "w").write("5")
        start, measure = _hwm_kib(), _hwm_kib
    except OSError:
        start, measure = _rss_kib(), lambda: peak[0]

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss_kib())
                time.sleep(0.002)

        threading.Thread(target=sample, daemon=True).start()
    r = httpx.post(f"{srv.url}/v1/files", content=body(), headers={"content-type": MP}, timeout=300)
    stop.set()
    grown_mib = (measure() - start) / 1024
    assert r.status_code == 200, r.text
    f = r.json()
    assert f["bytes"] == (n // 1024) * len(block)
    assert grown_mib < 48, f"peak RSS grew by {grown_mib:.0f} MiB for a 96 MiB upload"
    httpx.delete(f"{srv.url}/v1/files/{f['id']}")


# --- limits on jobs ------------------------------------------------------------------------------------
def test_the_queue_has_a_limit(tmp_path, tiny_base):
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from loraplex.server.api.http_fine_tuning import fine_tuning_routes
    from loraplex.trainer.jobs import JobManager

    m = JobManager(
        tmp_path / "jobs", tmp_path / "store", str(tiny_base), "tiny", max_queued=2, poll=3600
    )  # jobs stay queued
    try:
        http = TestClient(Starlette(routes=fine_tuning_routes(m)))
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)
        fid = client.files.create(
            file=("c.jsonl", color_data(tmp_path / "c.jsonl", 1).read_bytes()), purpose="fine-tune"
        ).id
        for _ in range(2):
            client.fine_tuning.jobs.create(model="tiny", training_file=fid)
        before = [j.id for j in client.fine_tuning.jobs.list().data]
        with pytest.raises(openai.RateLimitError) as e:
            client.fine_tuning.jobs.create(model="tiny", training_file=fid)
        assert "--max-queued-jobs" in e.value.body["message"] and "limit is 2" in e.value.body["message"]
        assert [j.id for j in client.fine_tuning.jobs.list().data] == before
        client.fine_tuning.jobs.cancel(before[0])  # a place frees up
        client.fine_tuning.jobs.create(model="tiny", training_file=fid)
    finally:
        m.close()


def wait_status(m, jid, statuses, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        j = m.job(jid)
        if j["status"] in statuses:
            return j
        time.sleep(0.2)
    raise AssertionError(f"{jid} is {m.job(jid)['status']}")


def test_a_job_past_the_wall_clock_limit_fails_and_frees_the_slot(tmp_path, tiny_base):
    from loraplex.trainer.jobs import JobManager

    m = JobManager(tmp_path / "jobs", tmp_path / "store", str(tiny_base), "tiny", max_job_seconds=3, poll=0.2)
    try:
        fid = m.add_file("c.jsonl", color_data(tmp_path / "c.jsonl", 30).read_bytes(), "fine-tune")["id"]
        long = m.create_job(
            {"model": "tiny", "training_file": fid, "hyperparameters": {"n_epochs": 50, "batch_size": 1}}
        )
        nxt = m.create_job(
            {"model": "tiny", "training_file": fid, "hyperparameters": {"n_epochs": 50, "batch_size": 1}}
        )
        done = wait_status(m, long["id"], ("failed", "succeeded"), timeout=60)
        assert done["status"] == "failed" and done["error"]["code"] == "job_time_limit"
        assert "limit of 3 s" in done["error"]["message"] and "--max-job-seconds" in done["error"]["message"]
        assert wait_status(m, nxt["id"], ("running", "failed"), timeout=30)["status"] in (
            "running",
            "failed",
        )  # the slot was freed
        assert m.job(long["id"])["status"] == "failed"
    finally:
        m.close()


def test_a_job_never_publishes_under_a_name_taken_meanwhile(tmp_path, tiny_base, adapter_dirs):
    """A job's name is checked again in the job's process: registered by someone else since, the job fails."""
    from helpers import make_peft_adapter

    from loraplex.adapters_store import AdapterStore
    from loraplex.trainer import run_job
    from loraplex.trainer.register import base_spec

    store = AdapterStore(tmp_path / "store", base=base_spec(str(tiny_base)))
    store.register("ft-taken-abc123", make_peft_adapter(tiny_base, tmp_path / "a"), caller="someone")
    data = color_data(tmp_path / "c.jsonl", 1)
    job = tmp_path / "job"
    job.mkdir()
    cfg = {
        "base_model": str(tiny_base),
        "adapter": {"name": "ft-taken-abc123"},
        "datasets": [str(data)],
        "max_steps": 1,
    }
    (job / "job.json").write_text(
        json.dumps(
            {"config": cfg, "output_dir": str(job / "output"), "store_dir": str(tmp_path / "store"), "new_name": True}
        )
    )
    assert run_job.main(str(job)) == 1
    assert "taken" in json.loads((job / "error.json").read_text())["message"]
    assert [v.version for v in store.versions("ft-taken-abc123")] == [1]
    assert not (job / "output").exists()  # refused before any training


def test_reward_functions_are_the_operators_and_named_by_name(tmp_path, tiny_base):
    from pydantic import ValidationError

    from loraplex.server.cli import main
    from loraplex.server.runtime import ServeConfig
    from loraplex.trainer.jobs import JobError, JobManager

    assert ServeConfig(reward_functions={"length": "json:dumps"}).reward_functions == {"length": "json:dumps"}
    with pytest.raises(ValidationError, match="cannot be found"):
        ServeConfig(reward_functions={"x": "no_such_module_here:f"})
    with pytest.raises(ValidationError, match="NAME=module:function"):
        ServeConfig(reward_functions={"x": "json"})
    with pytest.raises(SystemExit):
        main(["serve", "--reward-function", "pty:spawn"])
    m = JobManager(
        tmp_path / "jobs",
        tmp_path / "store",
        str(tiny_base),
        "tiny",
        reward_functions={"length": "json:dumps"},
        poll=3600,
    )
    try:
        fid = m.add_file("p.jsonl", b'{"messages": [{"role": "user", "content": "hi"}]}\n', "fine-tune")["id"]
        body = {
            "model": "tiny",
            "training_file": fid,
            "method": {"type": "reinforcement", "reinforcement": {"grader": {"type": "python", "function": "length"}}},
        }
        job = m.create_job(body)
        assert job["method"]["type"] == "reinforcement"
        cfg = json.loads(m._row("SELECT config FROM ft_jobs WHERE id=?", (job["id"],))["config"])
        assert cfg["method"] == "grpo" and cfg["reward"] == {
            "grader": {"type": "python", "function": "length"},
            "functions": {"length": "json:dumps"},
        }
        with pytest.raises(JobError, match="no reward function 'json:dumps'"):
            m.create_job(
                {
                    **body,
                    "method": {
                        "type": "reinforcement",
                        "reinforcement": {"grader": {"type": "python", "function": "json:dumps"}},
                    },
                }
            )
        assert m.reward_function("length", "grader") == "json:dumps"
        with pytest.raises(JobError, match="registered: length") as e:
            m.reward_function("pty:spawn", "grader")
        assert e.value.status == 400 and e.value.param == "grader"
    finally:
        m.close()
    # in the job's process the grader calls the function the operator registered under that name
    from loraplex.trainer.rl import make_reward

    score = make_reward(
        {"grader": {"type": "python", "function": "f"}, "functions": {"f": "operator:is_not"}}, None, None, None
    )
    assert score(["p"], ["completion"], [[1]], [{}]) == [1.0]
