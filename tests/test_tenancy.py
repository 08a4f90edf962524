"""Keys, scopes and tenants on a running server, over HTTP (the official openai client) and gRPC.

One server with API keys for two tenants (acme, globex) and an operator (`*`): every route and method
refuses anonymous and wrong-scope calls; each tenant sees, uses, routes and deletes only its own
adapters, files and jobs (another tenant's answer the 404 of an absent one), the base serves both;
quotas answer 429 with Retry-After without slowing the other tenant; a key revoked under load fails
from its next request on while the other tenant's never do.
"""

from __future__ import annotations

import functools
import re
import statistics
import threading
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from loraplex.protos.loraplex.v1 import loraplex_pb2 as pb
from loraplex.protos.loraplex.v1 import loraplex_pb2_grpc as pbg

MSGS = [{"role": "user", "content": "Say something."}]
_http = functools.partial(httpx.request, timeout=60)


def hdr(key):
    return {"Authorization": f"Bearer {key}"} if key else {}


class Env:
    def __init__(self, srv, channel, keys, key_ids):
        self.srv, self.ch, self.keys, self.key_ids = srv, channel, keys, key_ids
        self.url = srv.url

    def req(self, method, path, who=None, **kw):
        return _http(method, f"{self.url}{path}", headers=hdr(self.keys.get(who, who)), **kw)

    def client(self, who):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.keys[who], max_retries=0)

    def md(self, who):
        return (("authorization", f"Bearer {self.keys[who]}"),)


def upload(env, who, name, adapter_dir: Path, lineage=None):
    files = [("file", (p.name, p.read_bytes())) for p in sorted(adapter_dir.iterdir()) if p.is_file()]
    data = {"lineage": lineage} if lineage else None
    return env.req("POST", f"/v1/adapters/{name}/versions", who, files=files, data=data)


@pytest.fixture(scope="module")
def env(tiny_base, tmp_path_factory, adapter_dirs):
    from conftest import start_server

    from loraplex.server.api.grpc_server import GrpcServer

    s = start_server(tmp_path_factory.mktemp("tenancy"), tiny_base, max_loras=4, kv_cache_tokens=16384)
    reg = s.state.gate.registry
    specs = {
        "op": ("*", "inference,train,admin"),
        "acme": ("acme", "inference,train,admin"),
        "globex": ("globex", "inference,train,admin"),
        "no_inference": ("acme", "train,admin"),
        "no_train": ("acme", "inference,admin"),
        "no_admin": ("acme", "inference,train"),
    }
    keys, ids = {}, {}
    for who, (tenant, scopes) in specs.items():
        k, secret = reg.create_key(tenant, scopes, name=who)
        keys[who], ids[who] = secret, k.id
    gs = GrpcServer(s.state, port=0)
    port = gs.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(ch).result(timeout=10)
    e = Env(s, ch, keys, ids)
    assert upload(e, "acme", "bot", adapter_dirs["alpha"]).status_code == 201
    assert upload(e, "globex", "bot", adapter_dirs["beta"]).status_code == 201
    yield e
    ch.close()
    gs.stop()
    s.stop()


# --- the one check, everywhere --------------------------------------------------------------------------
PARAM_VALUES = {"name": "bot", "model_id": "bot", "file_id": "file-x", "job_id": "ftjob-x", "key_id": "key_x",
                "tenant": "acme"}
WRONG = {"inference": "no_inference", "train": "no_train", "admin": "no_admin"}


def _http_endpoints(state):
    from starlette.routing import Mount, Route

    from loraplex.server.app import build_app

    out = []
    for r in build_app(state).routes:
        if isinstance(r, Mount):  # static files: every GET under its path
            out.append(("GET", r.path))
            continue
        assert isinstance(r, Route), f"{r!r}: the gate's rules know Route and Mount paths; teach the test this kind"
        for m in sorted(r.methods - {"HEAD"}):
            out.append((m, r.path))
    return out


def test_every_http_route_has_a_rule_and_refuses_anonymous_and_wrong_scope_calls(env):
    from loraplex.server.api.auth import HTTP_RULES

    endpoints = _http_endpoints(env.srv.state)
    assert set(endpoints) == set(HTTP_RULES), "every route needs a rule in server/api/auth.py HTTP_RULES, and only routes"
    checked = 0
    for method, path in sorted(set(endpoints)):  # a path two routes declare (the console's /v1/me) is checked once
        rule = HTTP_RULES[(method, path)]
        url = re.sub(r"\{(\w+)(:\w+)?\}", lambda m: PARAM_VALUES[m.group(1)], path)
        if rule.public:
            assert env.req(method, url).status_code != 401
            continue
        r = env.req(method, url)
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert r.json()["error"]["type"] == "authentication_error"
        assert env.req(method, url, "lpx-not-a-key").status_code == 401
        if rule.scope is not None:
            r = env.req(method, url, WRONG[rule.scope])
            assert r.status_code == 403, (method, path, r.status_code, r.text)
            assert rule.scope in r.json()["error"]["message"]
        if rule.operator:
            r = env.req(method, url, "acme")  # every scope, but a tenant's key
            assert r.status_code == 403 and r.json()["error"]["code"] == "operator_only", (method, path, r.text)
        checked += 1
    assert checked == sum(1 for r in HTTP_RULES.values() if not r.public)


def _grpc_methods():
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    from loraplex.protos import reflection_v1

    out = []
    for fd in (pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR, reflection_v1.DESCRIPTOR):
        for svc in fd.services_by_name.values():
            for m in svc.methods:
                out.append((f"/{svc.full_name}/{m.name}", m.client_streaming, m.server_streaming))
    return out


def test_every_grpc_method_has_a_rule_and_refuses_anonymous_and_wrong_scope_calls(env):
    from loraplex.server.api.auth import GRPC_RULES

    methods = _grpc_methods()
    assert {m for m, _, _ in methods} <= set(GRPC_RULES)

    def ident(b):  # the empty request message is b""
        return b

    checked = 0
    for method, cstream, sstream in methods:
        rule = GRPC_RULES[method]
        if rule.public:
            continue
        assert not (cstream and sstream), f"{method}: the gate handles unary, server- and client-streaming methods"

        def call(md):
            if cstream:
                return env.ch.stream_unary(method, request_serializer=ident, response_deserializer=ident)(
                    iter([b""]), metadata=md, timeout=30
                )
            if sstream:
                return list(
                    env.ch.unary_stream(method, request_serializer=ident, response_deserializer=ident)(
                        b"", metadata=md, timeout=30
                    )
                )
            return env.ch.unary_unary(method, request_serializer=ident, response_deserializer=ident)(
                b"", metadata=md, timeout=30
            )

        cases = [
            ((), grpc.StatusCode.UNAUTHENTICATED),
            ((("authorization", "Bearer lpx-nope"),), grpc.StatusCode.UNAUTHENTICATED),
        ]
        if rule.scope is not None:
            cases.append((env.md(WRONG[rule.scope]), grpc.StatusCode.PERMISSION_DENIED))
        if rule.operator:
            cases.append((env.md("acme"), grpc.StatusCode.PERMISSION_DENIED))
        for md, want in cases:
            with pytest.raises(grpc.RpcError) as e:
                call(md)
            assert e.value.code() == want, (method, md and md[0][1][:12], e.value.code(), e.value.details())
        checked += 1
    assert checked == sum(1 for m, _, _ in methods if not GRPC_RULES[m].public)
    assert {m for m, cs, _ in methods if cs and not GRPC_RULES[m].public} == {"/loraplex.v1.Admin/UploadAdapter"}


# --- tenants ---------------------------------------------------------------------------------------------
def test_me_names_the_keys_tenant_and_scopes(env):
    me = env.req("GET", "/v1/me", "no_admin").json()
    assert me["tenant"] == "acme" and me["scopes"] == ["inference", "train"] and me["auth"] is True
    assert me["key_id"] == env.key_ids["no_admin"]


def test_tenants_see_and_use_only_their_adapters_over_http(env):
    acme, globex = env.client("acme"), env.client("globex")
    base = env.srv.state.service.model_id
    ids = {m.id for m in acme.models.list().data}
    assert {base, "acme:bot", "acme:bot@1"} <= ids and not any(i.startswith("globex:") for i in ids)
    assert not any(m.id.startswith("acme:") for m in globex.models.list().data)
    for client, mine in ((acme, "acme:bot@1"), (globex, "globex:bot@1")):
        r = client.chat.completions.with_raw_response.create(model="bot", messages=MSGS, max_tokens=2, temperature=0)
        assert r.headers["x-loraplex-adapter"] == mine
        assert client.chat.completions.create(model=base, messages=MSGS, max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(openai.NotFoundError) as foreign:
        acme.chat.completions.create(model="globex:bot", messages=MSGS, max_tokens=2)
    with pytest.raises(openai.NotFoundError) as absent:
        acme.chat.completions.create(model="globex:nope", messages=MSGS, max_tokens=2)
    assert foreign.value.body["message"].replace("globex:bot", "X") == absent.value.body["message"].replace(
        "globex:nope", "X"
    )
    with pytest.raises(openai.NotFoundError):
        acme.completions.create(model="globex:bot@1", prompt="hi", max_tokens=2)


def _same_404(env, who, method, path_foreign, path_absent, foreign, absent, **kw):
    a = env.req(method, path_foreign, who, **kw)
    b = env.req(method, path_absent, who, **kw)
    assert a.status_code == b.status_code == 404, (path_foreign, a.status_code, a.text)
    assert a.json()["error"]["message"].replace(foreign, "X") == b.json()["error"]["message"].replace(absent, "X")


def test_adapter_and_route_endpoints_answer_another_tenants_adapter_as_absent(env):
    for method, suffix, body in [("GET", "", None), ("DELETE", "", None)]:
        _same_404(
            env,
            "acme",
            method,
            f"/v1/adapters/globex:bot{suffix}",
            f"/v1/adapters/globex:nope{suffix}",
            "globex:bot",
            "globex:nope",
            json=body,
        )
    for method, suffix, body in [
        ("PUT", "", {"versions": {"1": 100}}),
        ("GET", "", None),
        ("POST", "/promote", {"version": 1}),
        ("POST", "/rollback", {}),
        ("GET", "/history", None),
        ("GET", "/compare", None),
    ]:
        _same_404(
            env,
            "acme",
            method,
            f"/v1/routes/globex:bot{suffix}",
            f"/v1/routes/globex:nope{suffix}",
            "globex:bot",
            "globex:nope",
            json=body,
        )
    assert env.req("POST", "/v1/unload_lora_adapter", "acme", json={"lora_name": "globex:bot"}).status_code == 404
    assert upload(env, "acme", "globex:bot", Path(env.srv.state.store.get("acme:bot").path)).status_code == 404
    assert [a["name"] for a in env.req("GET", "/v1/adapters", "acme").json()["data"]] == ["acme:bot"]
    assert env.req("PUT", "/v1/routes/bot", "acme", json={"versions": {"1": 100}}).status_code == 200
    assert [r["name"] for r in env.req("GET", "/v1/routes", "globex").json()["data"]] == []
    assert env.srv.state.store.get("globex:bot").version == 1  # untouched
    assert env.req("GET", "/v1/routes/globex:bot", "op").status_code == 404  # the operator sees it: it has no route
    assert env.req("GET", "/v1/adapters/globex:bot", "op").status_code == 200


def test_tenants_see_only_their_adapters_over_grpc(env):
    inf, adm = pbg.InferenceStub(env.ch), pbg.AdminStub(env.ch)
    ids = {m.id for m in inf.ListModels(pb.ListModelsRequest(), metadata=env.md("acme")).models}
    assert "acme:bot" in ids and not any(i.startswith("globex:") for i in ids)

    def req(model):
        return pb.GenerateRequest(
            model=model,
            chat=pb.ChatPrompt(messages=[pb.ChatMessage(role="user", content="Hi")]),
            sampling=pb.SamplingParams(max_tokens=2, temperature=0),
        )

    assert inf.Generate(req("bot"), metadata=env.md("globex"), timeout=60).served_by == "globex:bot@1"
    assert (
        inf.Generate(req(env.srv.state.service.model_id), metadata=env.md("acme"), timeout=60).usage.completion_tokens
        == 2
    )
    for call, foreign, absent in [
        (lambda n: inf.Generate(req(n), metadata=env.md("acme"), timeout=60), "globex:bot", "globex:nope"),
        (lambda n: adm.GetAdapter(pb.GetAdapterRequest(name=n), metadata=env.md("acme")), "globex:bot", "globex:nope"),
        (
            lambda n: adm.DeleteAdapter(pb.DeleteAdapterRequest(name=n), metadata=env.md("acme")),
            "globex:bot",
            "globex:nope",
        ),
        (
            lambda n: adm.SetRoute(pb.SetRouteRequest(name=n, weights={1: 100}), metadata=env.md("acme")),
            "globex:bot",
            "globex:nope",
        ),
        (
            lambda n: adm.PromoteRoute(pb.PromoteRouteRequest(name=n, version=1), metadata=env.md("acme")),
            "globex:bot",
            "globex:nope",
        ),
    ]:
        details = []
        for n in (foreign, absent):
            with pytest.raises(grpc.RpcError) as e:
                call(n)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND, (n, e.value.details())
            details.append(e.value.details().replace(n, "X"))
        assert details[0] == details[1]
    listed = adm.ListAdapters(pb.ListAdaptersRequest(), metadata=env.md("globex")).versions
    assert [v.name for v in listed] == ["globex:bot"]


def test_path_registration_is_for_operators_within_allowed_roots(env, adapter_dirs):
    body = {"name": "pathbot", "path": str(adapter_dirs["gamma"])}
    r = env.req("POST", "/v1/adapters", "acme", json=body)
    assert r.status_code == 403 and r.json()["error"]["code"] == "operator_only"
    r = env.req("POST", "/v1/adapters", "op", json=body)
    assert r.status_code == 403 and "--allowed-adapter-root" in r.json()["error"]["message"]
    from loraplex.adapters_store import AdapterNotFound

    with pytest.raises(AdapterNotFound):
        env.srv.state.store.versions("pathbot")


def test_files_and_jobs_belong_to_tenants(env, tmp_path):
    from test_trainer import color_data

    acme, globex = env.client("acme"), env.client("globex")
    base = env.srv.state.service.model_id
    f = acme.files.create(file=color_data(tmp_path / "colors.jsonl", reps=2).open("rb"), purpose="fine-tune")
    assert f.id in [x.id for x in acme.files.list().data] and f.id not in [x.id for x in globex.files.list().data]
    for call in (
        lambda i: globex.files.retrieve(i),
        lambda i: globex.files.content(i),
        lambda i: globex.files.delete(i),
        lambda i: globex.fine_tuning.jobs.create(model=base, training_file=i),
    ):
        msgs = []
        for fid in (f.id, "file-doesnotexist"):
            with pytest.raises(openai.NotFoundError) as e:
                call(fid)
            msgs.append(e.value.body["message"].replace(fid, "X"))
        assert msgs[0] == msgs[1]
    with pytest.raises(openai.NotFoundError):  # fine-tuning from another tenant's adapter
        acme.fine_tuning.jobs.create(
            model=base, training_file=f.id, extra_body={"loraplex": {"adapter": {"init_from": "globex:bot"}}}
        )
    with pytest.raises(openai.PermissionDeniedError):  # server paths stay the server's
        acme.fine_tuning.jobs.create(
            model=base, training_file=f.id, extra_body={"loraplex": {"datasets": ["/etc/passwd"]}}
        )
    with pytest.raises(openai.PermissionDeniedError):  # and so does running code the tenant names
        acme.fine_tuning.jobs.create(model=base, training_file=f.id, extra_body={"loraplex": {"reward": "os:system"}})
    job = acme.fine_tuning.jobs.create(
        model=base, training_file=f.id, suffix="colors", extra_body={"loraplex": {"max_steps": 1, "sequence_len": 64}}
    )
    assert job.id in [j.id for j in acme.fine_tuning.jobs.list().data]
    assert job.id not in [j.id for j in globex.fine_tuning.jobs.list().data]
    for call in (
        lambda i: globex.fine_tuning.jobs.retrieve(i),
        lambda i: globex.fine_tuning.jobs.cancel(i),
        lambda i: globex.fine_tuning.jobs.list_events(i),
        lambda i: globex.fine_tuning.jobs.checkpoints.list(i),
    ):
        with pytest.raises(openai.NotFoundError):
            call(job.id)
    deadline = time.time() + 240
    while (j := acme.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.time() < deadline, j.status
        time.sleep(0.5)
    assert j.status == "succeeded", j.error
    assert j.fine_tuned_model.startswith("acme:ft-colors-")  # the job's version belongs to the job's tenant
    deadline = time.time() + 10
    while j.fine_tuned_model not in {m.id for m in acme.models.list().data}:
        assert time.time() < deadline
        time.sleep(0.2)
    assert (
        acme.chat.completions.create(model=j.fine_tuned_model, messages=MSGS, max_tokens=2).usage.completion_tokens
        == 2
    )
    with pytest.raises(openai.NotFoundError):
        globex.chat.completions.create(model=j.fine_tuned_model, messages=MSGS, max_tokens=2)


def test_audit_route_history_and_lineage_show_who(env):
    acme_key = env.key_ids["acme"]
    assert env.req("PUT", "/v1/routes/bot", "acme", json={"versions": {"1": 100}}).status_code == 200
    hist = env.req("GET", "/v1/routes/bot/history", "acme").json()["data"]
    assert acme_key in hist[-1]["caller"] and "127.0.0.1" in hist[-1]["caller"]
    lineage = env.req("GET", "/v1/adapters/bot", "acme").json()["versions"][0]["lineage"]
    assert lineage["registered_by"]["key_id"] == acme_key and lineage["registered_by"]["tenant"] == "acme"
    mine = env.req("GET", "/v1/audit", "acme").json()["data"]
    assert mine and {e["tenant"] for e in mine} == {"acme"}
    put = next(e for e in mine if e["action"] == "PUT /v1/routes/{name}")
    assert (
        put["key_id"] == acme_key and put["caller"] == "127.0.0.1" and put["resource"] == "acme:bot" and put["at"] > 0
    )
    assert any(e["action"] == "POST /v1/adapters/{name}/versions" and e["resource"] == "acme:bot" for e in mine)
    every = env.req("GET", "/v1/audit", "op", params={"tenant": "globex"}).json()["data"]
    assert every and {e["tenant"] for e in every} == {"globex"}
    assert env.req("GET", "/v1/audit", "acme", params={"tenant": "globex"}).status_code == 403
    filtered = env.req("GET", "/v1/audit", "op", params={"action": "routes", "key_id": acme_key}).json()["data"]
    assert filtered and all("routes" in e["action"] and e["key_id"] == acme_key for e in filtered)


def test_keys_over_the_admin_api(env):
    r = env.req("POST", "/v1/keys", "acme", json={"scopes": ["inference"], "name": "ci-bot"})
    assert r.status_code == 201
    made = r.json()
    assert made["key"].startswith("lpx-") and made["tenant"] == "acme"
    assert env.req("GET", "/v1/me", made["key"]).json()["scopes"] == ["inference"]
    listed = env.req("GET", "/v1/keys", "acme").json()["data"]
    assert made["id"] in [k["id"] for k in listed] and all("key" not in k for k in listed)
    assert {k["tenant"] for k in listed} == {"acme"}
    assert env.req("POST", "/v1/keys", "acme", json={"tenant": "globex", "scopes": ["admin"]}).status_code == 403
    assert env.req("DELETE", f"/v1/keys/{made['id']}", "globex").status_code == 404  # another tenant's key: as absent
    assert env.req("DELETE", f"/v1/keys/{made['id']}", "acme").json()["revoked"] is True
    assert env.req("GET", "/v1/me", made["key"]).status_code == 401


def test_quota_429_with_retry_after_while_the_other_tenant_keeps_its_latency(env):
    body = {"model": env.srv.state.service.model_id, "messages": MSGS, "max_tokens": 4, "temperature": 0}

    def latency(who, n=6):
        xs = []
        for _ in range(n):
            t = time.perf_counter()
            assert env.req("POST", "/v1/chat/completions", who, json=body).status_code == 200
            xs.append(time.perf_counter() - t)
        return statistics.median(xs)

    _, env.keys["initech"] = env.srv.state.gate.registry.create_key(
        "initech", "inference"
    )  # a tenant with no usage yet
    before = latency("globex")
    assert env.req("PUT", "/v1/tenants/initech/quota", "op", json={"tokens_per_minute": 60}).status_code == 200
    try:
        assert env.req("GET", "/v1/tenants/initech/quota", "op").json()["quota"]["tokens_per_minute"] == 60
        statuses = []
        for _ in range(30):
            r = env.req("POST", "/v1/chat/completions", "initech", json=body)
            statuses.append(r.status_code)
            if r.status_code == 429:
                break
        assert statuses[-1] == 429 and statuses[0] == 200, statuses
        assert 1 <= int(r.headers["retry-after"]) <= 60 and "tokens_per_minute" in r.json()["error"]["message"]
        with pytest.raises(grpc.RpcError) as e:
            pbg.InferenceStub(env.ch).Generate(
                pb.GenerateRequest(model="bot", text="hi"), metadata=env.md("initech"), timeout=30
            )
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert int(dict(e.value.trailing_metadata())["retry-after"]) >= 1
        stop = threading.Event()

        refused = []

        def flood():  # the tenant keeps sending as it did (4 clients, 10 requests/s each), and is refused
            with httpx.Client(timeout=60, headers=hdr(env.keys["initech"])) as c:
                while not stop.wait(0.1):
                    refused.append(c.post(f"{env.url}/v1/chat/completions", json=body).status_code)

        flooders = [threading.Thread(target=flood) for _ in range(4)]
        for t in flooders:
            t.start()
        try:
            during = latency("globex")
        finally:
            stop.set()
            for t in flooders:
                t.join()
        assert len(refused) > 4 and set(refused) == {429}
        assert during < 1.5 * before + 0.1, (before, during)
    finally:
        assert env.req("PUT", "/v1/tenants/initech/quota", "op", json={}).status_code == 200


def test_storage_quotas_answer_413_and_429_naming_the_limit(env, tmp_path, adapter_dirs):
    import json

    _, env.keys["umbrella"] = env.srv.state.gate.registry.create_key("umbrella", "inference,train,admin")
    limits = {"max_upload_bytes": 200_000, "file_storage_bytes": 250_000, "adapter_versions": 1}
    assert env.req("PUT", "/v1/tenants/umbrella/quota", "op", json=limits).status_code == 200

    def jsonl(path, size):
        line = json.dumps({"text": "x" * 990}) + "\n"
        path.write_text(line * (size // len(line)))
        return path.open("rb")

    client = env.client("umbrella")
    with pytest.raises(openai.APIStatusError) as e:
        client.files.create(file=jsonl(tmp_path / "big.jsonl", 300_000), purpose="fine-tune")
    assert e.value.status_code == 413 and "max_upload_bytes" in e.value.body["message"]
    client.files.create(file=jsonl(tmp_path / "a.jsonl", 150_000), purpose="fine-tune")
    with pytest.raises(openai.RateLimitError) as e:
        client.files.create(file=jsonl(tmp_path / "b.jsonl", 150_000), purpose="fine-tune")
    assert "file_storage_bytes" in e.value.body["message"]
    assert len(client.files.list().data) == 1
    assert upload(env, "umbrella", "one", adapter_dirs["alpha"]).status_code == 201
    r = upload(env, "umbrella", "two", adapter_dirs["alpha"])
    assert r.status_code == 429 and "adapter_versions" in r.json()["error"]["message"]
    assert [a["name"] for a in env.req("GET", "/v1/adapters", "umbrella").json()["data"]] == ["umbrella:one"]


def test_revoking_a_key_under_load_fails_its_next_request_and_nobody_elses(env):
    from loraplex.adapters_store import AdapterStore
    from loraplex.adapters_store.tenancy import AccessRegistry

    reg = env.srv.state.gate.registry
    doomed, doomed_secret = reg.create_key("acme", "inference", name="doomed")
    body = {"model": "bot", "messages": MSGS, "max_tokens": 2, "temperature": 0}
    results = {"doomed": [], "globex": []}
    stop = threading.Event()

    def load(who, secret):
        with httpx.Client(timeout=60, headers=hdr(secret)) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                r = c.post(f"{env.url}/v1/chat/completions", json=body)
                results[who].append((t0, r.status_code))

    threads = [threading.Thread(target=load, args=("doomed", doomed_secret)) for _ in range(2)]
    threads += [threading.Thread(target=load, args=("globex", env.keys["globex"])) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        cli = AccessRegistry(
            AdapterStore(env.srv.state.store.root)
        )  # what `loraplex keys revoke` does, in another registry
        cli.revoke_key(doomed.id, revoked_by="test")
        revoked_at = time.monotonic()
        deadline = (
            revoked_at + 60
        )  # a loaded machine may take seconds per request: wait for a few after the revocation
        while time.monotonic() < deadline and sum(t0 > revoked_at + 1.0 for t0, _ in list(results["doomed"])) < 3:
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    before = [s for t0, s in results["doomed"] if t0 < revoked_at]
    after = [s for t0, s in results["doomed"] if t0 > revoked_at + 1.0]
    assert before and set(before) == {200}
    assert after and set(after) == {401}, (revoked_at, results["doomed"][-6:], len(results["globex"]))
    assert results["globex"] and {s for _, s in results["globex"]} == {200}


# --- safe defaults ---------------------------------------------------------------------------------------
def test_refuses_to_bind_a_public_address_without_keys(tmp_path, capsys):
    from loraplex.server.api.auth import bind_refusal
    from loraplex.server.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--store", str(tmp_path / "store"), "--grpc-port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--api-key" in err and "loraplex keys create" in err and "--insecure-no-auth" in err
    assert bind_refusal("0.0.0.0", has_keys=True, api_key=None, insecure_no_auth=False) is None
    assert bind_refusal("10.1.2.3", has_keys=False, api_key="k", insecure_no_auth=False) is None
    assert bind_refusal("::1", has_keys=False, api_key=None, insecure_no_auth=False) is None
    assert bind_refusal("localhost", has_keys=False, api_key=None, insecure_no_auth=False) is None
    assert bind_refusal("10.1.2.3", has_keys=False, api_key=None, insecure_no_auth=True) is None


def test_open_mode_and_the_single_api_key():
    from starlette.testclient import TestClient

    from loraplex.server.app import ServerState, build_app
    from loraplex.server.api.auth import Gate

    state = ServerState()
    state.service = object()  # "loaded": /v1/me answers once the server is ready
    state.gate = Gate(None, open_when_keyless=True)
    with TestClient(build_app(state)) as c:
        me = c.get("/v1/me", headers={"Authorization": "Bearer unused"}).json()  # what OpenAI clients send
        assert me["tenant"] == "*" and me["auth"] is False and me["scopes"] == ["inference", "train", "admin"]
    state.gate = Gate(None, api_key="s3cret", open_when_keyless=True)
    with TestClient(build_app(state)) as c:
        assert c.get("/v1/me").status_code == 401
        assert c.get("/v1/me", headers={"Authorization": "Bearer nope"}).status_code == 401
        me = c.get("/v1/me", headers={"Authorization": "Bearer s3cret"}).json()
        assert me["tenant"] == "*" and me["auth"] is True and me["key_id"] == "key_flag"
    state.gate = Gate(None, open_when_keyless=False)  # a public address with no keys (only with --insecure-no-auth)
    with TestClient(build_app(state)) as c:
        assert c.get("/v1/me").status_code == 401
