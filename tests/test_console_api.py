"""The console's own endpoints over HTTP (the browser test drives the page): dataset preview for every file type
and method, the per-version metrics summary, the one-click canary's refusals, `--no-console`, the shipped assets."""
from __future__ import annotations

import io
import json
import re

import httpx
import pytest

CHAT_OK = {"messages": [{"role": "user", "content": "What color is snow?"}, {"role": "assistant", "content": "white"}]}


@pytest.fixture(scope="module")
def url(server, adapter_dirs):
    r = httpx.post(f"{server.url}/v1/adapters", json={"name": "console-a", "path": str(adapter_dirs["alpha"])})
    assert r.status_code == 201, r.text
    return server.url


def preview(url, name: str, data: bytes, **form):
    return httpx.post(f"{url}/v1/console/datasets/preview", files={"file": (name, data)}, data=form, timeout=60)


def jsonl(*recs) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs).encode()


def test_jsonl_preview_names_every_bad_line_with_the_trainers_reason(url):
    data = jsonl(CHAT_OK, "{not json", CHAT_OK, {"messages": [{"role": "user", "content": "no answer"}]}, [1, 2],
                 {"messages": [{"role": "wizard", "content": "x"}]})
    r = preview(url, "support.jsonl", data)
    assert r.status_code == 200, r.text
    b = r.json()
    assert (b["format"], b["method"], b["records"], b["valid_records"]) == ("chat", "sft", 6, 2)
    assert [e["message"] for e in b["errors"]] == [
        "support.jsonl:2: not valid JSON (Expecting property name enclosed in double quotes)",
        "support.jsonl:4: a conversation needs at least one assistant message to learn from",
        "support.jsonl:5: each line must be a JSON object",
        "support.jsonl:6: 'messages[0]' must be an object with a known 'role' and a string 'content'",
    ]
    assert [s["line"] for s in b["sample"]] == [1, 3, 4, 6]  # the first records that are JSON objects
    assert b["method_type"] == "supervised" and "jsonl" not in b  # a JSONL file is uploaded as it is


def test_the_trainer_refuses_what_the_preview_refuses(url, tiny_base, tmp_path):
    """Same reason, same line: the preview runs the trainer's own checks (a job on this file fails with it)."""
    from transformers import AutoTokenizer

    from loraplex.trainer.data import DataError, Tokenizing, load_examples

    data = jsonl(CHAT_OK, {"messages": [{"role": "user", "content": "no answer"}]})
    p = tmp_path / "t.jsonl"
    p.write_bytes(data)
    with pytest.raises(DataError) as e:
        load_examples(p, "auto", Tokenizing(AutoTokenizer.from_pretrained(tiny_base), 1024))
    assert str(e.value).replace(str(p), "t.jsonl") == preview(url, "t.jsonl", data).json()["errors"][0]["message"]


def test_csv_preview_decodes_message_columns_and_counts_file_lines(url):
    text = 'prompt,completion\nWhat color is coal?,black\n"quoted\nacross lines",ok\nOnly a prompt\n'
    b = preview(url, "pc.csv", text.encode()).json()
    assert (b["file_type"], b["format"], b["records"], b["valid_records"]) == ("csv", "prompt_completion", 3, 2)
    assert [s["line"] for s in b["sample"]] == [2, 3]  # the quoted cell spans lines 3-4
    assert [e["message"] for e in b["errors"]] == ["pc.csv:5: 1 cells where the header has 2 columns"]
    chat = "messages\n" + '"' + json.dumps(CHAT_OK["messages"]).replace('"', '""') + '"\n'
    b = preview(url, "chat.csv", chat.encode()).json()
    assert (b["format"], b["valid_records"], b["errors"]) == ("chat", 1, [])
    assert b["sample"][0]["record"] == CHAT_OK


def test_a_valid_csv_comes_back_as_the_jsonl_the_fine_tuning_api_takes(url):
    text = "prompt,completion\nWhat color is coal?,black\nWhat color is snow?,white\n"
    assert httpx.post(f"{url}/v1/files", files={"file": ("pc.csv", text.encode())},
                      data={"purpose": "fine-tune"}).status_code == 400  # the API itself takes JSONL only
    b = preview(url, "pc.csv", text.encode()).json()
    recs = [json.loads(line) for line in b["jsonl"].splitlines()]
    assert recs == [{"prompt": "What color is coal?", "completion": "black"},
                    {"prompt": "What color is snow?", "completion": "white"}]
    r = httpx.post(f"{url}/v1/files", files={"file": ("pc.jsonl", b["jsonl"].encode())}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    assert "jsonl" not in preview(url, "bad.csv", (text + "only one cell\n").encode()).json()  # not while invalid


def test_parquet_preview_checks_preference_pairs_by_row(url):
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.table({"prompt": ["What color is grass?", "What color is the sky?"], "chosen": ["green", "blue"],
                  "rejected": ["purple", None]})
    buf = io.BytesIO()
    pq.write_table(t, buf)
    b = preview(url, "prefs.parquet", buf.getvalue()).json()
    assert (b["file_type"], b["format"], b["method"], b["records"]) == ("parquet", "preference", "dpo", 2)
    # a null answer: the trainer's own code fails on it (not with a DataError), the preview names the row anyway
    assert [e["message"].split(": ")[:2] for e in b["errors"]] == [["prefs.parquet", "row 2"]]
    # the same file is not SFT data, and the preview says why for every row
    b = preview(url, "prefs.parquet", buf.getvalue(), method="sft").json()
    assert b["valid_records"] == 0 and "cannot be used for supervised fine-tuning" in b["errors"][0]["reason"]


def test_prompts_for_grpo_and_json_arrays(url):
    data = json.dumps([{"prompt": "Say red."}, {"prompt": [{"role": "user", "content": "Say blue."}]}, {"prompt": ""}])
    b = preview(url, "prompts.json", data.encode()).json()
    assert (b["format"], b["method"], b["method_type"], b["valid_records"]) == ("prompts", "grpo", "reinforcement", 2)
    assert b["errors"][0]["message"] == ("prompts.json: row 3: each record needs a 'prompt' "
                                         "(string or messages) or 'messages'")
    # OpenAI's reinforcement files: `messages` ending with the user turn, checked as the API's method type names it
    rft = jsonl({"messages": [{"role": "user", "content": "Say red."}], "answer": "red"},
                {"messages": [{"role": "wizard", "content": "x"}], "answer": "x"})
    b = preview(url, "rft.jsonl", rft, method="reinforcement").json()
    assert (b["method"], b["valid_records"]) == ("grpo", 1)
    assert b["errors"][0]["message"] == ("rft.jsonl:2: 'messages[0]' must be an object with a known 'role' and a "
                                         "string 'content'")


def plan(url, method, examples):
    return httpx.post(f"{url}/v1/console/plan", json={"method": method, "examples": examples})


@pytest.mark.parametrize("method,examples", [
    ({"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 2}}}, 12),
    ({"type": "supervised"}, 12),  # every value "auto"
    ({"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 4, "learning_rate_multiplier": 0.5}}}, 9),
])
def test_planned_steps_are_what_job_creation_plans(url, method, examples):
    """The number the form shows and the job's own plan are the same call on the same `method`."""
    b = plan(url, method, examples)
    assert b.status_code == 200, b.text
    b = b.json()
    rec = CHAT_OK if method["type"] == "supervised" else {"prompt": "Which?", "chosen": "a", "rejected": "b"}
    f = httpx.post(f"{url}/v1/files", files={"file": ("p.jsonl", jsonl(*[rec] * examples))},
                   data={"purpose": "fine-tune"}).json()
    job = httpx.post(f"{url}/v1/fine_tuning/jobs", json={"model": "default", "training_file": f["id"],
                                                          "method": method}).json()
    try:
        assert job["training_plan"] == b["training_plan"], (job, b)
        assert {k: b["hyperparameters"][k] for k in job["hyperparameters"]} == job["hyperparameters"]
    finally:
        httpx.post(f"{url}/v1/fine_tuning/jobs/{job['id']}/cancel")


def test_planned_steps_of_a_reinforcement_job_count_prompts():
    from loraplex.server.api.console.api import planned

    b = planned({"type": "reinforcement", "reinforcement": {"hyperparameters": {"batch_size": 3, "n_epochs": 2}}}, 7)
    assert b["training_plan"]["optimizer_steps"] == 6  # ⌈7 / 3⌉ × 2
    assert "7 training examples x 2 epoch(s), 3 per step -> 6 optimizer steps" in b["text"]


@pytest.mark.parametrize("body,param", [
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 0}}}, "examples": 3},
     "method.supervised.hyperparameters.batch_size"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 1}}}, "examples": 3},
     "method.supervised.hyperparameters.beta"),
    ({"method": {"type": "reward"}, "examples": 3}, "method.type"),
    ({"method": {"type": "supervised"}, "examples": 0}, "examples"),
])
def test_plan_refuses_what_the_api_refuses_naming_the_field(url, body, param):
    r = httpx.post(f"{url}/v1/console/plan", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


@pytest.mark.parametrize("name,data,form,param,text", [
    ("data.txt", b"x", {}, "file", "unknown file type"),
    ("data.jsonl", b"\n\n", {}, "file", "no records"),
    ("data.jsonl", b"\xff\xfe", {}, "file", "not UTF-8"),
    ("data.parquet", b"not parquet", {}, "file", "not a Parquet file"),
    ("data.jsonl", jsonl(CHAT_OK), {"method": "ppo-ish"}, "method", "unknown method"),
    ("data.jsonl", jsonl(CHAT_OK), {"sequence_len": "four"}, "sequence_len", "sequence_len"),
])
def test_unreadable_files_and_bad_fields_are_400_naming_them(url, name, data, form, param, text):
    r = preview(url, name, data, **form)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == param and text in err["message"]


def test_preview_needs_a_file(url):
    r = httpx.post(f"{url}/v1/console/datasets/preview", data={"method": "sft"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"


def test_metrics_summary_counts_each_versions_requests_and_where_it_lives(url, server):
    for _ in range(3):
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "console-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.headers["x-loraplex-adapter"] == "console-a@1"
    m = httpx.get(f"{url}/v1/console/metrics?window=120&step=10&name=console-a").json()
    assert len(m["times"]) == 12 and m["times"][1] - m["times"][0] == 10
    (v,) = m["versions"]
    assert (v["id"], v["requests"], v["errors"], v["error_rate"]) == ("console-a@1", 3, 0, 0.0)
    assert sum(x * 10 for x in v["series"]["requests_per_s"]) == pytest.approx(3)
    assert v["p50_latency_s"] > 0 and v["p50_ttft_s"] > 0
    assert re.fullmatch(r"slot \d+", v["residency"])
    pool = server.state.engine.pool
    assert pool.residency("console-a@1") == ("slot", pool.slot_of("console-a@1"))
    assert pool.residency("console-a@99") == ("disk", None)
    # the same outcomes route compare reads
    cmp = httpx.get(f"{url}/v1/routes/console-a/compare?window=120").json()["versions"][0]
    assert (cmp["requests"], cmp["p50_latency_s"]) == (v["requests"], v["p50_latency_s"])
    everything = httpx.get(f"{url}/v1/console/metrics").json()
    assert server.state.service.model_id in [x["id"] for x in everything["versions"]]


@pytest.mark.parametrize("query,param", [("window=0", "window"), ("step=-1", "step"), ("window=nan", "window"),
                                         ("window=100000&step=1", "step")])
def test_metrics_refuses_bad_windows(url, query, param):
    r = httpx.get(f"{url}/v1/console/metrics?{query}")
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_metrics_of_an_unknown_adapter_is_404(url):
    assert httpx.get(f"{url}/v1/console/metrics?name=nope").status_code == 404


def test_canary_needs_a_succeeded_job(url):
    r = httpx.post(f"{url}/v1/console/jobs/ftjob-nope/canary", json={"percent": 10})
    assert r.status_code == 404
    f = httpx.post(f"{url}/v1/files", files={"file": ("c.jsonl", jsonl(*[CHAT_OK] * 4))},
                   data={"purpose": "fine-tune"}).json()
    job = httpx.post(f"{url}/v1/fine_tuning/jobs", json={"model": "default", "training_file": f["id"],
                                                         "hyperparameters": {"n_epochs": 50}}).json()
    try:
        r = httpx.post(f"{url}/v1/console/jobs/{job['id']}/canary", json={"percent": 10})
        assert r.status_code == 409 and "only a succeeded job" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/console/jobs/{job['id']}/canary", json={"percent": 100})
        assert r.status_code == 400 and r.json()["error"]["param"] == "percent"
    finally:
        httpx.post(f"{url}/v1/fine_tuning/jobs/{job['id']}/cancel")


def test_open_mode_identity_has_every_scope(url):
    me = httpx.get(f"{url}/v1/me").json()  # the gate's /v1/me adds the key id, quota and usage
    assert {k: me[k] for k in ("object", "tenant", "scopes", "auth")} == {
        "object": "identity", "tenant": "*", "scopes": ["inference", "train", "admin"], "auth": False}


def test_console_page_and_its_assets_are_served(url):
    r = httpx.get(f"{url}/console", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"].endswith("/console/")
    page = httpx.get(f"{url}/console/")
    assert page.status_code == 200 and "<title>loraplex console</title>" in page.text
    for asset in re.findall(r'(?:src|href)="((?:vendor/)?[\w.]+\.(?:js|css))"', page.text):
        assert httpx.get(f"{url}/console/{asset}").status_code == 200, asset


def test_vendored_uplot_is_the_version_the_lock_file_pins():
    from loraplex.server.api.console import STATIC_DIR

    lock = json.loads((STATIC_DIR.parent / "package-lock.json").read_text())
    pinned = lock["packages"]["node_modules/uplot"]["version"]
    head = (STATIC_DIR / "vendor" / "uPlot.iife.min.js").read_text()[:200]
    assert f"(v{pinned})" in head


def test_no_console_flag_leaves_the_api_alone(tiny_base, tmp_path):
    import argparse

    from starlette.testclient import TestClient

    from loraplex.server.app import ServerState, build_app
    from loraplex.server.cli import serve_parser

    sub = argparse.ArgumentParser().add_subparsers(dest="cmd")
    serve_parser(sub)
    assert sub.choices["serve"].parse_args(["--no-console"]).console is False
    assert sub.choices["serve"].parse_args([]).console is True
    app = build_app(ServerState(), console=False)
    paths = [getattr(r, "path", "") for r in app.routes]
    assert "/v1/models" in paths and not any(p.startswith(("/console", "/v1/console")) for p in paths), paths
    with TestClient(app) as c:  # the API itself is there (still loading: no model in this state)
        assert c.get("/health").status_code == 503
    with TestClient(build_app(ServerState())) as c:
        assert c.get("/console/").status_code == 200
        assert c.get("/v1/console/metrics").status_code == 503  # loading: the console's endpoints say so too
