"""The web console in a real browser: Debian's chromium, driven by Playwright, against a real server on a tiny model.

One person's afternoon, in order: sign in; upload a dataset with one bad line and see it named; fix it and start
a job; watch loss points appear; send 10% of the name's traffic to the new version with one click; watch the
compare chart while traffic flows; move the split with the sliders; promote; roll back with a reason; ask both
versions the same question in the playground; read the adapters page; start a graded reinforcement job from a CSV
file; pause, resume and cancel a running job. Then a key without the admin scope signs in and sees no route
controls. Every step asserts on what the page shows, and at the end the browser console must hold no errors but
the 401s the sign-in page provokes by design.

Keys are real: the server's registry holds two keys of tenant `acme` (created the way tests/test_tenancy.py does),
one with every scope and one with inference + train only; the page signs in with them through the API's own
`GET /v1/me`, and every call the test makes beside the browser carries the admin key. Screenshots of each page
are saved under `$LORAPLEX_TEST_ARTIFACTS` (default `build/test-artifacts`)/console.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
from pathlib import Path

import httpx
import pytest

from test_trainer import COLORS, color_data

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("LORAPLEX_TEST_ARTIFACTS", "build/test-artifacts")) / "console"
TENANT = "acme"
NAME = f"{TENANT}:support-bot"  # what tenant acme's `support-bot` is stored and shown as
WAIT = 90_000  # ms: a training job's process starts torch and transformers on two shared cores


@pytest.fixture(scope="module")
def srv(tiny_base, adapter_dirs, tmp_path_factory):
    """A server with API keys: `srv.keys` the secrets ("admin", "user"), `srv.who` the admin key's recorded name,
    `srv.api` an httpx client signed in with the admin key."""
    from conftest import start_server

    s = start_server(tmp_path_factory.mktemp("console"), tiny_base, max_loras=4, kv_cache_tokens=16384,
                     max_concurrent_jobs=2)
    reg = s.state.gate.registry
    s.keys = {}
    for who, scopes in (("admin", "inference,train,admin"), ("user", "inference,train")):
        key, s.keys[who] = reg.create_key(TENANT, scopes, name=f"console-{who}")
        if who == "admin":
            s.who = f"{TENANT}/{key.id} (console-admin)@127.0.0.1"
    s.api = httpx.Client(base_url=s.url, headers={"Authorization": f"Bearer {s.keys['admin']}"}, timeout=60)
    assert httpx.get(f"{s.url}/v1/models").status_code == 401  # keys exist: nothing without one
    files = [("file", (p.name, p.read_bytes())) for p in sorted(adapter_dirs["alpha"].iterdir()) if p.is_file()]
    r = s.api.post("/v1/adapters/support-bot/versions", files=files)
    assert r.status_code == 201, r.text
    yield s
    s.api.close()
    s.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is needed: `make test` installs it (apt-get install chromium)"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"],
            viewport={"width": 1400, "height": 1000})
        yield ctx
        ctx.close()


class Page:
    """A browser tab on the console that records console errors and the API calls it makes."""

    def __init__(self, ctx, url: str):
        self.page = ctx.new_page()
        self.url = url
        self.errors: list[tuple[str, str]] = []
        self.requests: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.errors.append((f"uncaught: {e}", "")))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.set_default_timeout(20_000)

    def _console(self, m) -> None:
        if m.type == "error":
            self.errors.append((m.text, m.location.get("url") or ""))

    def sign_in(self, key: str) -> None:
        self.page.goto(f"{self.url}/console/")
        self.page.locator("#signin").wait_for(state="visible")
        self.shot("signin")
        self.page.fill("#signin-key", "lpx-wrong")
        self.page.click("#signin button[type=submit]")
        self.page.locator("#signin-error", has_text="not valid").wait_for()
        self.page.fill("#signin-key", key)
        self.page.click("#signin button[type=submit]")
        self.page.locator("#who-tenant", has_text=f"tenant {TENANT}").wait_for()

    def go(self, view: str) -> None:
        self.page.click(f"nav a[data-view={view}]")
        self.page.locator(f"#view-{view}").wait_for(state="visible")

    def points(self, sel: str) -> int:
        return int(self.page.locator(sel).get_attribute("data-points") or 0)

    def wait_points(self, sel: str, n: int, timeout: int = WAIT) -> None:
        self.page.wait_for_function("([s, n]) => Number(document.querySelector(s).dataset.points || 0) >= n",
                                    arg=[sel, n], timeout=timeout)

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def unexpected_errors(self) -> list:
        # The sign-in page asks /v1/me without a key and with a wrong one: those 401s are the design, nothing else.
        return [e for e in self.errors if not ("401" in e[0] and e[1].endswith("/v1/me"))]


@pytest.fixture(scope="module")
def admin(browser, srv):
    p = Page(browser, srv.url)
    p.sign_in(srv.keys["admin"])
    yield p
    p.page.close()


def route_of(srv) -> dict:
    r = srv.api.get("/v1/routes/support-bot")
    return r.json()["versions"] if r.status_code == 200 else {}


def test_sign_in_shows_every_page_an_admin_key_allows(admin):
    pg = admin.page
    for view in ("adapters", "routes", "finetune", "playground"):
        assert pg.locator(f"nav a[data-view={view}]").is_visible()
    assert "admin" in pg.inner_text("#who-scopes")
    # a page loads under a second: reload (the key stays for the tab) and time it until the first data is drawn;
    # the best of three, since this machine is shared with other work and one reload can land on a busy moment
    timings = []
    for _ in range(3):
        pg.reload()
        pg.locator(f".adapter[data-name='{NAME}'] tr[data-version='1']").wait_for()
        timings.append(pg.evaluate("""[performance.getEntriesByType('navigation')[0].loadEventEnd,
                                        performance.getEntriesByName('loraplex:first-data')[0].startTime]"""))
    load_ms, drawn_ms = min(t[0] for t in timings), min(t[1] for t in timings)
    print(f"console: page loaded in {load_ms:.0f} ms, adapters drawn at {drawn_ms:.0f} ms (best of 3: {timings})")
    assert load_ms < 1000 and drawn_ms < 1000


def dpo_job(srv) -> str:
    """A short DPO job, started beside the SFT one (two jobs at once) so its rewards are there when looked at."""
    pairs = [{"prompt": f"What color is {k}?", "chosen": v, "rejected": "purple"} for k, v in COLORS.items()] * 2
    data = "".join(json.dumps(p) + "\n" for p in pairs).encode()
    f = srv.api.post("/v1/files", files={"file": ("prefs.jsonl", data)}, data={"purpose": "fine-tune"}).json()
    job = srv.api.post("/v1/fine_tuning/jobs", json={
        "model": "default", "training_file": f["id"], "suffix": "prefs",
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}}}).json()
    assert "id" in job, job
    return job["id"]


DPO = {}


def test_bad_line_is_named_then_fixed_file_trains_with_live_loss_and_one_click_canary(admin, srv, tmp_path):
    pg = admin.page
    DPO["id"] = dpo_job(srv)
    admin.go("finetune")
    good = color_data(tmp_path / "colors.jsonl", reps=2)
    lines = good.read_text().splitlines()
    lines[2] = json.dumps({"messages": [{"role": "user", "content": "What color is a ghost?"}]})
    bad = tmp_path / "colors-bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")

    pg.set_input_files("#ft-file", str(bad))
    pg.locator("#ft-errors li").first.wait_for()
    assert pg.locator("#ft-errors li").all_inner_texts() == [
        "colors-bad.jsonl:3: a conversation needs at least one assistant message to learn from"]
    assert pg.inner_text("#ft-format") == "chat"
    assert pg.locator("#ft-start").is_disabled()
    assert pg.locator("#ft-sample tr").count() == 5
    admin.shot("finetune-invalid-line")

    pg.set_input_files("#ft-file", str(good))
    pg.locator("#ft-preview-summary", has_text="all valid").wait_for()
    assert "12 records" in pg.inner_text("#ft-preview-summary")
    pg.fill("#ft-seq", "128")
    pg.press("#ft-seq", "Tab")  # a new sequence length checks the file again
    pg.locator("#ft-preview-summary", has_text="all valid").wait_for()
    pg.fill("#ft-suffix", "colors")
    pg.fill("#ft-epochs", "3")
    pg.fill("#ft-batch", "2")
    pg.fill("#ft-lr", "10")
    pg.locator("#ft-steps", has_text="18 optimizer steps").wait_for()  # ⌈12 / 2⌉ × 3, counted by the server
    assert "learning rate 0.002" in pg.inner_text("#ft-plan")  # 2e-4 × 10
    pg.fill("#ft-batch", "")  # "auto": the trainer's resolver picks the batch size for 12 examples
    pg.locator("#ft-plan", has_text="batch_size=auto (1)").wait_for()
    assert pg.inner_text("#ft-steps") == "36 optimizer steps"
    pg.fill("#ft-batch", "0")  # what the API refuses, the form says before anything is sent
    pg.locator("#ft-plan-error", has_text="hyperparameters.batch_size").wait_for()
    # the 400 the browser logged for it is that refusal, shown above: the design, not a console fault
    admin.errors = [e for e in admin.errors if not ("400" in e[0] and e[1].endswith("/v1/console/plan"))]
    pg.fill("#ft-batch", "2")
    pg.locator("#ft-steps", has_text="18 optimizer steps").wait_for()
    assert pg.locator("#ft-start").is_enabled()
    pg.click("#ft-start")
    pg.locator("#ft-msg", has_text="created").wait_for()
    job_id = pg.inner_text("#ft-msg").split()[1]
    assert job_id.startswith("ftjob-")

    admin.wait_points("#ft-chart-loss", 2)  # loss points appear while the job runs
    pg.locator("#ft-status", has_text="succeeded").wait_for(timeout=WAIT)
    events = srv.api.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100").json()["data"]
    trained = [e for e in events if e["type"] == "metrics" and e["data"].get("loss") is not None]
    pg.wait_for_function("n => Number(document.querySelector('#ft-chart-loss').dataset.points) === n",
                         arg=len(trained))
    assert pg.locator("#ft-events li", has_text="successfully completed").count() == 1
    job = srv.api.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    ft = job["fine_tuned_model"]
    assert ft.startswith(f"{TENANT}:ft-colors-")
    assert job["method"]["type"] == "supervised" and job["training_plan"]["optimizer_steps"] == 18
    assert (job["hyperparameters"]["n_epochs"], job["hyperparameters"]["batch_size"]) == (3, 2)
    assert pg.locator("#ft-cancel").is_hidden() and pg.locator("#ft-pause").is_hidden()
    admin.shot("finetune-job")

    # one click: the new model becomes support-bot@2 and takes 10% of support-bot's traffic
    pg.fill("#ft-canary-name", "support-bot")
    pg.click("#ft-canary-btn")
    pg.locator("#ft-canary-msg", has_text=f"{NAME}: @1 90% · @2 10%").wait_for()
    assert route_of(srv) == {"1": 90, "2": 10}
    shipped, trained = srv.state.store.get(NAME, 2), srv.state.store.get(ft, 1)
    assert shipped.sha256 == trained.sha256 and shipped.lineage["copied_from"] == f"{ft}@1"
    pg.evaluate("document.querySelector('#ft-canary-msg').textContent = ''")
    pg.click("#ft-canary-btn")  # a second click changes nothing
    pg.locator("#ft-canary-msg", has_text=f"{NAME}: @1 90% · @2 10%").wait_for()
    assert [v.version for v in srv.state.store.versions(NAME)] == [1, 2]


def test_compare_chart_follows_traffic_then_sliders_promote_and_rollback(admin, srv):
    pg = admin.page
    admin.go("routes")
    pg.locator("#rt-name").select_option(NAME)
    pg.locator("#rt-sliders input[type=number][data-version='2']").wait_for()
    assert pg.input_value("#rt-sliders input[type=number][data-version='1']") == "90"
    assert pg.input_value("#rt-sliders input[type=number][data-version='2']") == "10"

    stop = threading.Event()
    served = []

    def traffic():
        with httpx.Client(timeout=60, headers=srv.api.headers) as c:
            i = 0
            while not stop.is_set() and i < 400:
                model = "support-bot@2" if i % 3 == 0 else "support-bot"  # the canary gets traffic for sure
                r = c.post(f"{srv.url}/v1/chat/completions",
                           json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
                served.append(r.headers.get("x-loraplex-adapter"))
                i += 1

    t = threading.Thread(target=traffic)
    t.start()
    try:
        start = admin.points("#rt-chart-lat")
        admin.wait_points("#rt-chart-lat", start + 6)  # the chart refreshes live, both versions plotted
        assert admin.page.locator("#rt-chart-lat").get_attribute("data-series") == "@1,@2"
        pg.wait_for_function("""() => [...document.querySelectorAll('#rt-compare tr[data-version]')]
            .every(tr => Number(tr.children[2].textContent) > 0)""")
        admin.shot("routes-compare")
    finally:
        stop.set()
        t.join()
    assert {f"{NAME}@1", f"{NAME}@2"} <= set(served)

    n2 = pg.locator("#rt-sliders input[type=number][data-version='2']")
    n2.fill("20")
    n2.dispatch_event("change")
    assert pg.input_value("#rt-sliders input[type=number][data-version='1']") == "80"
    assert pg.inner_text("#rt-total") == "100"
    pg.click("#rt-apply")
    pg.locator("#rt-msg", has_text="route set: @1 80% · @2 20%").wait_for()
    assert route_of(srv) == {"1": 80, "2": 20}

    pg.locator("#rt-promote-version").select_option("2")
    pg.click("#rt-promote")
    pg.locator("#rt-msg", has_text="promoted @2").wait_for()
    assert route_of(srv) == {"2": 100}
    pg.locator("#rt-history tr[data-action=promote]").wait_for()

    pg.fill("#rt-reason", "worse answers")
    pg.click("#rt-rollback")
    pg.locator("#rt-msg", has_text="rolled back").wait_for()
    assert route_of(srv) == {"1": 80, "2": 20}
    row = pg.locator("#rt-history tr[data-action=rollback]").first
    row.wait_for()
    assert "worse answers" in row.inner_text()
    hist = srv.api.get("/v1/routes/support-bot/history").json()["data"]
    assert hist[-1]["action"] == "rollback" and hist[-1]["reason"] == "worse answers"
    assert [c["caller"] for c in hist] == [srv.who] * len(hist)  # the console's changes, by the signed-in key
    admin.shot("routes")


def test_playground_streams_two_versions_side_by_side(admin, srv):
    pg = admin.page
    admin.go("playground")
    a, b = pg.locator(".pane[data-pane=a]"), pg.locator(".pane[data-pane=b]")
    a.locator(f".pg-model option[value='{NAME}@1']").wait_for(state="attached")
    a.locator(".pg-model").select_option(f"{NAME}@1")
    b.locator(".pg-model").select_option(f"{NAME}@2")
    pg.fill("#pg-temp", "0")
    pg.fill("#pg-max", "8")
    pg.fill("#pg-input", "What color is sky?")
    pg.click("#pg-send")
    for pane, ref in ((a, f"{NAME}@1"), (b, f"{NAME}@2")):
        pane.locator(".served", has_text=f"served by {ref}").wait_for()
        pane.locator(".usage", has_text="completion tokens").wait_for()
        assert pane.locator(".msg-assistant").get_attribute("data-served") == ref
    expect = srv.api.post("/v1/chat/completions", json={
        "model": "support-bot@2", "messages": [{"role": "user", "content": "What color is sky?"}], "max_tokens": 8,
        "temperature": 0, "top_p": 1}).json()
    assert b.locator(".msg-assistant").inner_text() == expect["choices"][0]["message"]["content"]
    usage = b.locator(".usage").inner_text()
    assert f"{expect['usage']['prompt_tokens']} prompt + {expect['usage']['completion_tokens']} completion" in usage
    admin.shot("playground")


def test_adapters_page_shows_versions_lineage_residency_and_traffic(admin, srv):
    pg = admin.page
    admin.go("adapters")
    card = pg.locator(f".adapter[data-name='{NAME}']")
    card.locator("tr[data-version='2']").wait_for()
    row2 = card.locator("tr[data-version='2']")
    assert re.search(r"slot \d|cpu|disk", row2.inner_text())
    row2.locator("summary").click()
    lineage = row2.locator("details").inner_text()
    assert "sft" in lineage and "copied from" in lineage
    assert f"registered by{srv.who}" in lineage.replace("\t", "").replace("\n", "")  # the admin key, as recorded
    sha = next(iter(srv.state.store.get(NAME, 2).lineage["dataset_sha256"].values()))
    assert sha[:12] in lineage
    admin.wait_points(f".adapter[data-name='{NAME}'] .chart[data-metric=requests_per_s]", 1)
    assert "route: @1 80% · @2 20%" in card.locator("h3").inner_text()
    admin.shot("adapters")


def test_dpo_job_plots_rewards_and_accuracy(admin, srv):
    pg = admin.page
    admin.go("finetune")
    pg.locator(f"#ft-jobs tr[data-job='{DPO['id']}']").click()
    pg.locator("#ft-status", has_text="succeeded").wait_for(timeout=WAIT)
    events = srv.api.get(f"/v1/fine_tuning/jobs/{DPO['id']}/events?limit=100").json()["data"]
    steps = [e["data"] for e in events if e["type"] == "metrics" and not e["data"].get("initial")]
    assert steps and all("rewards_accuracy" in m and "rewards_margin" in m for m in steps)
    admin.wait_points("#ft-chart-reward", 2 * len(steps))  # accuracy and margin of every step
    assert set(pg.locator("#ft-chart-reward").get_attribute("data-series").split(",")) >= {"rewards_accuracy",
                                                                                             "rewards_margin"}
    assert admin.points("#ft-chart-loss") == len(steps)
    admin.shot("finetune-dpo")


def test_a_reinforcement_job_from_a_csv_file_is_the_api_s_reinforcement_method(admin, srv, tmp_path):
    pg = admin.page
    admin.go("finetune")
    assert pg.locator("#ft-method option[value=reward]").is_disabled()  # the fine-tuning API has no reward method
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,answer\n" + "".join(f"What color is {k}?,{v}\n" for k, v in COLORS.items()))
    pg.set_input_files("#ft-file", str(prompts))
    pg.locator("#ft-preview-summary", has_text="all valid").wait_for()
    assert pg.input_value("#ft-method") == "reinforcement"  # prompts: the format suggests it
    assert "uploaded as JSONL" in pg.inner_text("#ft-preview-summary")
    pg.locator("#ft-grader-kind").select_option("ilike")
    pg.fill("#ft-grader-value", "{{item.answer}}")
    pg.fill("#ft-gens", "2")
    pg.fill("#ft-epochs", "1")
    pg.fill("#ft-batch", "3")
    pg.fill("#ft-lr", "")
    pg.fill("#ft-suffix", "graded")
    pg.locator("#ft-steps", has_text="2 optimizer steps").wait_for()  # 6 prompts, 3 per step, 1 epoch
    pg.click("#ft-start")
    pg.locator("#ft-msg", has_text="created").wait_for()
    job_id = pg.inner_text("#ft-msg").split()[1]
    job = srv.api.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    srv.api.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")  # what was asked is on the job; running it is test_rl's
    assert job["method"]["type"] == "reinforcement" and job["training_plan"]["optimizer_steps"] == 2
    assert (job["hyperparameters"]["n_epochs"], job["hyperparameters"]["batch_size"]) == (1, 3)
    f = srv.api.get(f"/v1/files/{job['training_file']}").json()
    assert f["filename"] == "prompts.jsonl"
    content = srv.api.get(f"/v1/files/{job['training_file']}/content").text.splitlines()
    assert [json.loads(line) for line in content] == [{"prompt": f"What color is {k}?", "answer": v}
                                                       for k, v in COLORS.items()]


def test_pause_resume_and_cancel_a_running_job(admin, srv, tmp_path):
    pg = admin.page
    data = color_data(tmp_path / "l.jsonl", 2).read_bytes()
    f = srv.api.post("/v1/files", files={"file": ("long.jsonl", data)}, data={"purpose": "fine-tune"}).json()
    job = srv.api.post("/v1/fine_tuning/jobs", json={
        "model": "default", "training_file": f["id"], "hyperparameters": {"n_epochs": 50, "batch_size": 1}}).json()
    jid = job["id"]
    admin.go("finetune")
    pg.locator(f"#ft-jobs tr[data-job='{jid}']").click()
    pg.locator("#ft-status", has_text="running").wait_for(timeout=WAIT)
    admin.wait_points("#ft-chart-loss", 1)  # it has trained a step
    pg.click("#ft-pause")
    pg.locator("#ft-job-msg", has_text=f"Paused {jid}.").wait_for()
    pg.locator("#ft-status", has_text="paused").wait_for()
    assert srv.api.get(f"/v1/fine_tuning/jobs/{jid}").json()["status"] == "paused"
    pg.locator("#ft-events li", has_text="job paused").wait_for()
    assert pg.locator("#ft-pause").is_hidden() and pg.locator("#ft-resume").is_visible()
    admin.shot("finetune-paused")
    pg.click("#ft-resume")  # the server waits for the pause checkpoint, then starts the job from it
    pg.locator("#ft-job-msg", has_text=f"Resumed {jid}.").wait_for(timeout=WAIT)
    pg.locator("#ft-events li", has_text="job resumed").wait_for()
    pg.locator("#ft-status", has_text="running").wait_for(timeout=WAIT)
    assert srv.api.get(f"/v1/fine_tuning/jobs/{jid}").json()["status"] == "running"
    # (that the resumed run continues from its checkpoint with the same loss curve is the trainer's test)
    pg.click("#ft-cancel")
    pg.locator("#ft-status", has_text="cancelled").wait_for()
    assert srv.api.get(f"/v1/fine_tuning/jobs/{jid}").json()["status"] == "cancelled"
    assert pg.locator("#ft-cancel").is_hidden() and pg.locator("#ft-resume").is_hidden()


def test_a_key_without_admin_sees_no_route_controls(browser, srv, admin):
    user = Page(browser, srv.url)
    try:
        user.sign_in(srv.keys["user"])
        pg = user.page
        assert pg.inner_text("#who-scopes") == "inference · train"
        assert pg.locator("nav a[data-view=finetune]").is_visible()
        assert pg.locator("nav a[data-view=playground]").is_visible()
        assert pg.locator("nav a[data-view=routes]").is_hidden()
        assert pg.locator("nav a[data-view=adapters]").is_hidden()
        pg.goto(f"{srv.url}/console/#routes")  # typing the address does not bring them back
        pg.locator("#view-finetune").wait_for(state="visible")
        assert pg.locator("#view-routes").is_hidden() and pg.locator("#rt-promote").is_hidden()
        # the tenant's jobs, as the API lists them for this key
        pg.locator("#ft-jobs tr[data-job]", has=pg.locator(".badge.succeeded")).first.click()
        pg.locator("#ft-status", has_text="succeeded").wait_for()
        assert pg.locator("#ft-canary").is_hidden()  # sending traffic is a route change: admin only
        assert not [u for u in user.requests if "/v1/routes" in u or "/v1/adapters" in u or "/v1/console/metrics" in u]
        # and the server agrees: what the page hides, this key is refused
        key = {"Authorization": f"Bearer {srv.keys['user']}"}
        assert httpx.get(f"{srv.url}/v1/routes/support-bot", headers=key).status_code == 403
        user.shot("finetune-without-admin")
        assert user.unexpected_errors() == []
    finally:
        user.page.close()
    assert admin.unexpected_errors() == []
