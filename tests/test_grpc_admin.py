"""Tenancy administration, adapter upload and standard reflection over gRPC, against a real server.

The gRPC Admin service runs the same operations as the HTTP admin endpoints (server/api/auth_api.py), so
each test does a thing over gRPC and reads the outcome back over HTTP (or the other way round): keys made
by one front end work on the other, the audit log lists the same entries for the same filters, a quota
set over gRPC is the one HTTP shows. Tenant confinement is the HTTP one: a tenant's admin key sees and
makes its tenant's keys only, another tenant's key id is the NOT_FOUND of an absent one, and tenant `*`
sees all. An upload that is refused leaves the store exactly as it was.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import grpc
import httpx
import pytest

from loraplex.protos import reflection_v1
from loraplex.protos.loraplex.v1 import loraplex_pb2 as pb
from loraplex.protos.loraplex.v1 import loraplex_pb2_grpc as pbg

_http = functools.partial(httpx.request, timeout=60)
CHUNK = 1024  # small, so each file takes several messages


class Env:
    def __init__(self, srv, ch, keys, ids):
        self.srv, self.ch, self.keys, self.ids = srv, ch, keys, ids
        self.admin = pbg.AdminStub(ch)

    def md(self, who):
        return (("authorization", f"Bearer {self.keys.get(who, who)}"),)

    def http(self, method, path, who, **kw):
        auth = {"Authorization": f"Bearer {self.keys.get(who, who)}"}
        return _http(method, f"{self.srv.url}{path}", headers=auth, **kw)

    def call(self, rpc, request, who):
        return getattr(self.admin, rpc)(request, metadata=self.md(who), timeout=60)

    def fails(self, rpc, request, who) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as e:
            self.call(rpc, request, who)
        return e.value


@pytest.fixture(scope="module")
def env(tiny_base, tmp_path_factory):
    from conftest import start_server

    from loraplex.server.api.grpc_server import GrpcServer

    s = start_server(tmp_path_factory.mktemp("grpc_admin"), tiny_base, max_loras=4, kv_cache_tokens=16384)
    reg = s.state.gate.registry
    keys, ids = {}, {}
    for who, tenant, scopes in (("op", "*", "inference,train,admin"), ("acme", "acme", "inference,train,admin"),
                                ("globex", "globex", "inference,train,admin"),
                                ("acme_user", "acme", "inference,train")):
        k, keys[who] = reg.create_key(tenant, scopes, name=who)
        ids[who] = k.id
    gs = GrpcServer(s.state, port=0)
    port = gs.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(ch).result(timeout=10)
    yield Env(s, ch, keys, ids)
    ch.close()
    gs.stop()
    s.stop()


# --- API keys -----------------------------------------------------------------------------------------
def test_keys_over_grpc_are_confined_to_the_tenant_and_work_over_http(env):
    made = env.call("CreateKey", pb.CreateKeyRequest(scopes=["inference"], name="ci-bot"), "acme")
    assert made.secret.startswith("lpx-") and made.key.tenant == "acme" and list(made.key.scopes) == ["inference"]
    assert made.key.hint.endswith(made.secret[-4:]) and not made.key.HasField("revoked_at")
    me = env.http("GET", "/v1/me", made.secret).json()  # the new key works on the other front end
    assert (me["tenant"], me["scopes"], me["key_id"]) == ("acme", ["inference"], made.key.id)
    ident = env.call("GetIdentity", pb.GetIdentityRequest(), made.secret)
    assert (ident.tenant, list(ident.scopes), ident.key_id, ident.key_name, ident.auth) == (
        "acme", ["inference"], made.key.id, "ci-bot", True)

    listed = env.call("ListKeys", pb.ListKeysRequest(), "acme").keys
    assert {k.tenant for k in listed} == {"acme"} and made.key.id in [k.id for k in listed]
    assert [k.id for k in listed] == [k["id"] for k in env.http("GET", "/v1/keys", "acme").json()["data"]]
    every = env.call("ListKeys", pb.ListKeysRequest(), "op").keys
    assert {"acme", "globex", "*"} <= {k.tenant for k in every}
    assert {k.tenant for k in env.call("ListKeys", pb.ListKeysRequest(tenant="globex"), "op").keys} == {"globex"}
    e = env.fails("ListKeys", pb.ListKeysRequest(tenant="globex"), "acme")
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
    e = env.fails("CreateKey", pb.CreateKeyRequest(tenant="globex", scopes=["admin"]), "acme")
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
    e = env.fails("CreateKey", pb.CreateKeyRequest(scopes=["root"]), "acme")
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "root" in e.details()
    assert env.call("CreateKey", pb.CreateKeyRequest(tenant="initech", scopes=["train"]), "op").key.tenant == "initech"

    # another tenant's key id: exactly the NOT_FOUND of an absent one
    foreign = env.fails("RevokeKey", pb.RevokeKeyRequest(key_id=made.key.id), "globex")
    absent = env.fails("RevokeKey", pb.RevokeKeyRequest(key_id="key_0000000000000000"), "globex")
    assert foreign.code() == absent.code() == grpc.StatusCode.NOT_FOUND
    assert foreign.details().replace(made.key.id, "ID") == absent.details().replace("key_0000000000000000", "ID")
    assert env.fails("GetKey", pb.GetKeyRequest(key_id=made.key.id), "globex").code() == grpc.StatusCode.NOT_FOUND
    assert env.call("GetKey", pb.GetKeyRequest(key_id=made.key.id), "acme").name == "ci-bot"
    assert env.http("GET", "/v1/me", made.secret).status_code == 200  # the failed revocations changed nothing

    revoked = env.call("RevokeKey", pb.RevokeKeyRequest(key_id=made.key.id), "acme")
    assert revoked.HasField("revoked_at") and env.ids["acme"] in revoked.revoked_by
    assert env.http("GET", "/v1/me", made.secret).status_code == 401
    assert env.fails("GetIdentity", pb.GetIdentityRequest(), made.secret).code() == grpc.StatusCode.UNAUTHENTICATED
    assert made.key.id not in [k.id for k in env.call("ListKeys", pb.ListKeysRequest(), "acme").keys]
    assert made.key.id in [k.id for k in env.call("ListKeys", pb.ListKeysRequest(include_revoked=True), "acme").keys]
    # a key without the admin scope manages no keys
    assert env.fails("ListKeys", pb.ListKeysRequest(), "acme_user").code() == grpc.StatusCode.PERMISSION_DENIED

    # both changes are in the audit log, as the gate recorded them
    audit = env.http("GET", "/v1/audit", "acme", params={"action": "Admin/", "key_id": env.ids["acme"]}).json()["data"]
    actions = {(a["action"], a["resource"]) for a in audit}
    assert ("/loraplex.v1.Admin/CreateKey", made.key.id) in actions
    assert ("/loraplex.v1.Admin/RevokeKey", made.key.id) in actions
    assert all(a["status"] == "OK" and a["caller"] == "127.0.0.1" for a in audit)


# --- audit --------------------------------------------------------------------------------------------
def _ids(entries):
    return [e.id for e in entries]


def test_list_audit_has_the_filters_and_paging_of_http(env):
    for v in ("a", "b", "c"):  # three audited changes of acme's
        env.call("SetQuota", pb.SetQuotaRequest(tenant="acme", quota=pb.Quota(queued_jobs=5)), "op")
        env.http("PUT", "/v1/tenants/acme/quota", "op", json={"queued_jobs": 5})
        env.call("CreateKey", pb.CreateKeyRequest(scopes=["train"], name=f"audit-{v}"), "acme")
    got = env.call("ListAudit", pb.ListAuditRequest(), "acme").entries
    http = env.http("GET", "/v1/audit", "acme").json()["data"]
    assert _ids(got) == [e["id"] for e in http] and {e.tenant for e in got} == {"acme"}
    assert [e.at for e in got] == sorted((e.at for e in got), reverse=True)
    first = got[0]
    assert json.loads(first.detail_json) == http[0]["detail"] and first.action == http[0]["action"]

    for filters in ({"action": "CreateKey"}, {"key_id": env.ids["op"]}, {"action": "quota"},
                    {"tenant": "acme", "action": "Key"}):
        want = [e["id"] for e in env.http("GET", "/v1/audit", "op", params=filters).json()["data"]]
        assert want and _ids(env.call("ListAudit", pb.ListAuditRequest(**filters), "op").entries) == want, filters
    # paging: `limit`, then on from the oldest entry seen
    page1 = env.call("ListAudit", pb.ListAuditRequest(limit=2), "acme").entries
    page2 = env.call("ListAudit", pb.ListAuditRequest(limit=2, until=page1[-1].at), "acme").entries
    assert len(page1) == len(page2) == 2 and _ids(page1) + _ids(page2) == _ids(got[:4])
    since = env.call("ListAudit", pb.ListAuditRequest(since=got[1].at), "acme").entries
    assert _ids(since) == _ids(got[:2])
    # a tenant's key: its own entries only, its adapters by bare name
    e = env.fails("ListAudit", pb.ListAuditRequest(tenant="globex"), "acme")
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
    assert {e.tenant for e in env.call("ListAudit", pb.ListAuditRequest(tenant="globex"), "op").entries} <= {"globex"}
    for bad in (0, 1001):
        e = env.fails("ListAudit", pb.ListAuditRequest(limit=bad), "acme")
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit" in e.details()
        assert dict(e.trailing_metadata())["x-loraplex-field"] == "limit"
    assert env.fails("ListAudit", pb.ListAuditRequest(), "acme_user").code() == grpc.StatusCode.PERMISSION_DENIED


# --- quotas -------------------------------------------------------------------------------------------
def test_quota_message_has_the_fields_of_the_quota_model():
    from loraplex.adapters_store.tenancy import Quota

    assert [f.name for f in pb.Quota.DESCRIPTOR.fields] == list(Quota.model_fields)


def test_quotas_over_grpc_are_the_ones_http_sees(env):
    try:
        set_ = env.call("SetQuota", pb.SetQuotaRequest(tenant="globex", quota=pb.Quota(
            tokens_per_minute=5000, adapter_versions=3, queued_jobs=0)), "op")
        assert set_.tenant == "globex" and set_.quota.tokens_per_minute == 5000
        assert not set_.quota.HasField("max_upload_bytes")
        assert set_.quota.HasField("queued_jobs") and set_.quota.queued_jobs == 0
        http = env.http("GET", "/v1/tenants/globex/quota", "globex").json()
        assert http["quota"]["tokens_per_minute"] == 5000 and http["quota"]["adapter_versions"] == 3
        got = env.call("GetQuota", pb.GetQuotaRequest(tenant="globex"), "globex")
        assert (got.quota.tokens_per_minute, got.quota.adapter_versions, got.quota.queued_jobs) == (5000, 3, 0)
        assert got.usage.requests_last_minute == http["usage"]["requests_last_minute"]
        assert env.call("GetIdentity", pb.GetIdentityRequest(), "globex").quota.tokens_per_minute == 5000

        e = env.fails("SetQuota", pb.SetQuotaRequest(tenant="globex", quota=pb.Quota(tokens_per_minute=0)), "op")
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "tokens_per_minute" in e.details()
        e = env.fails("SetQuota", pb.SetQuotaRequest(tenant="Not A Tenant", quota=pb.Quota()), "op")
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "tenant" in e.details()
        for who in ("globex", "acme"):  # setting quotas is for operators, even one's own
            e = env.fails("SetQuota", pb.SetQuotaRequest(tenant="globex", quota=pb.Quota(tokens_per_minute=1)), who)
            assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        e = env.fails("GetQuota", pb.GetQuotaRequest(tenant="globex"), "acme")
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        assert env.http("GET", "/v1/tenants/globex/quota", "op").json()["quota"]["tokens_per_minute"] == 5000
        params = {"action": "SetQuota", "key_id": env.ids["op"]}
        audit = env.http("GET", "/v1/audit", "op", params=params).json()["data"]
        assert audit[0]["resource"] == "globex" and audit[0]["detail"]["tokens_per_minute"] == 5000
    finally:
        env.call("SetQuota", pb.SetQuotaRequest(tenant="globex"), "op")  # no limits again
    assert env.http("GET", "/v1/tenants/globex/quota", "op").json()["quota"]["tokens_per_minute"] is None


# --- adapter upload -----------------------------------------------------------------------------------
def upload_messages(name, files: dict[str, bytes], lineage=None, total=None, chunk=CHUNK):
    meta = pb.UploadAdapterMetadata(name=name, lineage_json=json.dumps(lineage) if lineage else "")
    if total is not None:
        meta.total_bytes = total
    yield pb.UploadAdapterRequest(metadata=meta)
    for fname, data in files.items():
        for i in range(0, max(len(data), 1), chunk):
            yield pb.UploadAdapterRequest(chunk=pb.FileChunk(filename=fname, data=data[i:i + chunk]))


def adapter_files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_upload_over_grpc_registers_a_version_the_tenant_serves(env, adapter_dirs):
    files = adapter_files(adapter_dirs["alpha"])
    assert max(len(b) for b in files.values()) > 3 * CHUNK
    v = env.admin.UploadAdapter(upload_messages("uploaded", files, {"run": 7}), metadata=env.md("acme"), timeout=120)
    assert (v.name, v.version, v.r) == ("acme:uploaded", 1, 4) and not v.path
    lineage = json.loads(v.lineage_json)
    assert lineage["run"] == 7 and lineage["source"] == "upload"
    assert lineage["registered_by"]["key_id"] == env.ids["acme"]
    # what HTTP's upload of the same files gives
    r = env.http("POST", "/v1/adapters/uploaded/versions", "acme", files=[("file", (n, b)) for n, b in files.items()])
    assert r.status_code == 201 and r.json()["sha256"] == v.sha256 and r.json()["version"] == 2
    # served to its tenant by the bare name, identical to the HTTP-registered version
    inf = pbg.InferenceStub(env.ch)
    req = pb.GenerateRequest(text="Hello", sampling=pb.SamplingParams(max_tokens=6, temperature=0))
    req.model = "uploaded@1"
    one = inf.Generate(req, metadata=env.md("acme"), timeout=60)
    req.model = "uploaded@2"
    assert one.served_by == "acme:uploaded@1"
    assert inf.Generate(req, metadata=env.md("acme"), timeout=60).text == one.text
    # invisible to the other tenant
    e = env.fails("GetAdapter", pb.GetAdapterRequest(name="acme:uploaded"), "globex")
    assert e.code() == grpc.StatusCode.NOT_FOUND
    audit = env.http("GET", "/v1/audit", "acme", params={"action": "UploadAdapter"}).json()["data"]
    assert audit[0]["resource"] == "acme:uploaded" and audit[0]["detail"]["version"] == 1
    # the upload needs the admin scope, as over HTTP
    with pytest.raises(grpc.RpcError) as e:
        env.admin.UploadAdapter(upload_messages("nope", files), metadata=env.md("acme_user"), timeout=60)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def _bad_tensor(files):
    from safetensors.torch import load, save

    t = load(files["adapter_model.safetensors"])
    k = next(k for k in t if "lora_B" in k)
    t[k] = t[k][:-1].contiguous()  # one output row short of the base's projection
    return {**files, "adapter_model.safetensors": save(t)}


def _foreign_module(files):
    from safetensors.torch import load, save

    t = load(files["adapter_model.safetensors"])
    t = {k.replace("q_proj", "nope_proj"): v for k, v in t.items()}  # a module the base does not have
    return {**files, "adapter_model.safetensors": save(t)}


INVALID = {
    "pickle": (lambda f: {"adapter_config.json": f["adapter_config.json"], "adapter_model.bin": b"\x80\x04K\x01."},
               None, grpc.StatusCode.FAILED_PRECONDITION),
    "shape": (_bad_tensor, None, None),
    "module": (_foreign_module, None, None),
    "no_files": (lambda f: {}, None, grpc.StatusCode.INVALID_ARGUMENT),
    "path_name": (lambda f: {"../adapter_config.json": f["adapter_config.json"]}, None,
                  grpc.StatusCode.INVALID_ARGUMENT),
    "lineage": (lambda f: f, "[1, 2]", grpc.StatusCode.INVALID_ARGUMENT),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_an_invalid_upload_changes_nothing(env, adapter_dirs, case):
    make, lineage, want = INVALID[case]
    store = env.srv.state.store
    before = [(v.ref, v.sha256) for v in store.list()]
    messages = list(upload_messages("bad", make(adapter_files(adapter_dirs["alpha"]))))
    if lineage is not None:
        messages[0].metadata.lineage_json = lineage
    with pytest.raises(grpc.RpcError) as e:
        env.admin.UploadAdapter(iter(messages), metadata=env.md("acme"), timeout=60)
    code = e.value.code()
    assert code == want if want else code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION), (
        code, e.value.details())
    assert e.value.details() and "Traceback" not in e.value.details() and str(store.root) not in e.value.details()
    assert [(v.ref, v.sha256) for v in store.list()] == before
    assert not list((store.root / "tmp").glob("upload.*"))
    assert env.fails("GetAdapter", pb.GetAdapterRequest(name="bad"), "acme").code() == grpc.StatusCode.NOT_FOUND


def test_upload_messages_out_of_order_and_quotas_are_refused_before_storing(env, adapter_dirs):
    store = env.srv.state.store
    files = adapter_files(adapter_dirs["alpha"])
    before = [v.ref for v in store.list()]

    def refused(messages, who="globex"):
        with pytest.raises(grpc.RpcError) as e:
            env.admin.UploadAdapter(iter(messages), metadata=env.md(who), timeout=60)
        assert [v.ref for v in store.list()] == before and not list((store.root / "tmp").glob("upload.*"))
        return e.value

    msgs = list(upload_messages("q", files))
    e = refused(msgs[1:])  # no metadata first
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "metadata" in e.details()
    e = refused(msgs[:2] + msgs[:1] + msgs[2:])  # metadata again after a chunk
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "metadata" in e.details()
    e = refused([])
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    size = sum(len(b) for b in files.values())
    try:
        env.call("SetQuota", pb.SetQuotaRequest(tenant="globex", quota=pb.Quota(max_upload_bytes=size - 1)), "op")
        e = refused(list(upload_messages("q", files, total=size)))  # declared: refused before any file byte
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_upload_bytes" in e.details()
        e = refused(list(upload_messages("q", files)))  # undeclared: refused while counting
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_upload_bytes" in e.details()
        env.call("SetQuota", pb.SetQuotaRequest(tenant="globex"), "op")
        cfg = env.srv.state.extra["config"]
        server_limit, cfg.max_upload_bytes = cfg.max_upload_bytes, size - 1  # the server's own limit, any tenant
        try:
            e = refused(list(upload_messages("q", files)), who="op")
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-upload-bytes" in e.details()
        finally:
            cfg.max_upload_bytes = server_limit
        env.call("SetQuota", pb.SetQuotaRequest(tenant="globex", quota=pb.Quota(adapter_versions=1)), "op")
        v = env.admin.UploadAdapter(upload_messages("q", files), metadata=env.md("globex"), timeout=120)
        assert v.version == 1
        before = [v.ref for v in store.list()]
        e = refused(list(upload_messages("q2", files)))
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "adapter_versions" in e.details()
    finally:
        env.call("SetQuota", pb.SetQuotaRequest(tenant="globex"), "op")


# --- sharing ------------------------------------------------------------------------------------------
def test_sharing_over_grpc_is_for_operators(env, adapter_dirs):
    files = adapter_files(adapter_dirs["alpha"])
    v = env.admin.UploadAdapter(upload_messages("common", files), metadata=env.md("op"), timeout=120)
    assert v.name == "common"
    inf = pbg.InferenceStub(env.ch)
    req = pb.GenerateRequest(model="common", text="Hi", sampling=pb.SamplingParams(max_tokens=2, temperature=0))
    with pytest.raises(grpc.RpcError) as e:
        inf.Generate(req, metadata=env.md("globex"), timeout=60)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    e = env.fails("SetSharing", pb.SetSharingRequest(name="common", shared=True), "globex")
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
    e = env.fails("SetSharing", pb.SetSharingRequest(name="absent", shared=True), "op")
    assert e.code() == grpc.StatusCode.NOT_FOUND
    assert env.call("SetSharing", pb.SetSharingRequest(name="common", shared=True), "op").shared
    assert inf.Generate(req, metadata=env.md("globex"), timeout=60).served_by == "common@1"
    env.call("SetSharing", pb.SetSharingRequest(name="common", shared=False), "op")
    with pytest.raises(grpc.RpcError) as e:
        inf.Generate(req, metadata=env.md("globex"), timeout=60)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


# --- reflection ---------------------------------------------------------------------------------------
def test_standard_reflection_v1_lists_and_describes_the_services(env):
    from google.protobuf import descriptor_pb2

    call = reflection_v1.stub(env.ch)
    reqs = [reflection_v1.ServerReflectionRequest(list_services=""),
            reflection_v1.ServerReflectionRequest(file_containing_symbol="loraplex.v1.Admin"),
            reflection_v1.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection")]
    listed, admin, itself = list(call(iter(reqs), timeout=30))  # public: no key needed
    names = {s.name for s in listed.list_services_response.service}
    assert {"loraplex.v1.Inference", "loraplex.v1.Admin", "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= names
    fd = descriptor_pb2.FileDescriptorProto.FromString(admin.file_descriptor_response.file_descriptor_proto[0])
    methods = {m.name: m for m in next(s for s in fd.service if s.name == "Admin").method}
    assert {"UploadAdapter", "CreateKey", "ListAudit", "SetQuota"} <= set(methods)
    assert methods["UploadAdapter"].client_streaming and not methods["UploadAdapter"].server_streaming
    fd = descriptor_pb2.FileDescriptorProto.FromString(itself.file_descriptor_response.file_descriptor_proto[0])
    assert fd.package == "grpc.reflection.v1"
    assert fd.service[0].method[0].input_type == ".grpc.reflection.v1.ServerReflectionRequest"
