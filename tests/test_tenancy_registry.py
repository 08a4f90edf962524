"""Keys, names, shares, quotas and audit in the registry, and the rate limiter: no model, no server."""

from __future__ import annotations

import sqlite3
import time

import pytest

from loraplex.adapters_store import AdapterNotFound, AdapterStore, InvalidRequest
from loraplex.adapters_store.tenancy import REFRESH_S, AccessRegistry, Quota, qualify


@pytest.fixture()
def tiny_adapter_dir(adapter_dirs):
    return adapter_dirs["alpha"]


def test_keys_are_stored_hashed_and_revocation_reaches_another_process_view(tmp_path):
    reg = AccessRegistry(AdapterStore(tmp_path / "store"))
    key, secret = reg.create_key("acme", "inference,train", name="ci-bot", created_by="test")
    assert secret.startswith("lpx-") and len(secret) > 40 and key.scopes == ("inference", "train")
    raw = (tmp_path / "store" / "registry.sqlite3").read_bytes()
    assert secret.encode() not in raw and secret[4:].encode() not in raw  # only its hash is stored
    other = AccessRegistry(AdapterStore(tmp_path / "store"))  # what a running server holds
    assert other.lookup(secret).id == key.id and other.lookup(secret + "x") is None
    reg.revoke_key(key.id, revoked_by="test")
    time.sleep(REFRESH_S + 0.05)
    assert other.lookup(secret) is None and not other.has_keys()
    assert [k.id for k in other.keys(include_revoked=True)] == [key.id] and other.keys() == []
    with pytest.raises(AdapterNotFound):
        reg.revoke_key(key.id, tenant="globex")  # another tenant's key id: as absent


def test_bad_tenants_and_scopes_are_refused(tmp_path):
    reg = AccessRegistry(AdapterStore(tmp_path / "store"))
    for tenant, scopes in [("Acme", "inference"), ("a:b", "inference"), ("acme", "inference,root"), ("acme", "")]:
        with pytest.raises(InvalidRequest):
            reg.create_key(tenant, scopes)
    assert reg.keys() == []


def test_existing_registry_gains_the_tables_and_keeps_its_adapters(tmp_path, tiny_adapter_dir):
    st = AdapterStore(tmp_path / "store")  # a registry from before tenancy: versions, routes, no access tables
    st.register("legacy", tiny_adapter_dir)
    st.set_route("legacy", {1: 100})
    st.close()
    con = sqlite3.connect(tmp_path / "store" / "registry.sqlite3")
    assert "api_keys" not in {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
    con.close()
    st = AdapterStore(tmp_path / "store")
    reg = AccessRegistry(st)
    assert st.get("legacy").version == 1 and st.get_route("legacy").versions == {1: 100} and reg.keys() == []
    reg.create_key("acme", "admin")
    assert len(AccessRegistry(st).keys()) == 1  # opening again changes nothing


def test_names_belong_to_tenants(tmp_path, tiny_adapter_dir):
    st = AdapterStore(tmp_path / "store")
    reg = AccessRegistry(st)
    st.register(qualify("acme", "bot"), tiny_adapter_dir)
    st.register(qualify("globex", "bot"), tiny_adapter_dir)
    st.register("shared-bot", tiny_adapter_dir)
    assert sorted(st.names()) == ["acme:bot", "globex:bot", "shared-bot"]
    assert reg.resolve_name("acme", "bot") == "acme:bot" and reg.resolve_name("globex", "bot") == "globex:bot"
    with pytest.raises(AdapterNotFound) as foreign:
        reg.resolve_name("acme", "globex:bot")
    with pytest.raises(AdapterNotFound) as absent:
        reg.resolve_name("acme", "globex:nothing")
    assert str(foreign.value).replace("globex:bot", "X") == str(absent.value).replace("globex:nothing", "X")
    assert reg.resolve_name("acme", "shared-bot") == "acme:shared-bot"  # not shared yet: its own (absent) name
    with pytest.raises(AdapterNotFound):
        reg.resolve_name("acme", "x:shared-bot")
    reg.share("shared-bot", by="test")
    time.sleep(REFRESH_S + 0.05)
    assert reg.resolve_name("acme", "shared-bot") == "shared-bot"
    st.register(qualify("acme", "shared-bot"), tiny_adapter_dir)
    assert reg.resolve_name("acme", "shared-bot") == "acme:shared-bot"  # its own adapter of that name comes first
    with pytest.raises(AdapterNotFound):
        reg.own_name("globex", "acme:bot")  # to manage: its own only
    assert reg.resolve_name("*", "globex:bot") == "globex:bot" and reg.own_name("*", "acme:bot") == "acme:bot"
    with pytest.raises(InvalidRequest):
        st.register("Bad Tenant:bot", tiny_adapter_dir)


def test_quotas_merge_over_the_default(tmp_path):
    reg = AccessRegistry(AdapterStore(tmp_path / "store"))
    reg.set_quota("*", {"tokens_per_minute": 1000, "concurrent_requests": 4})
    reg.set_quota("acme", {"tokens_per_minute": 50})
    assert reg.quota("acme") == Quota(tokens_per_minute=50, concurrent_requests=4)
    assert reg.quota("globex") == Quota(tokens_per_minute=1000, concurrent_requests=4)
    assert reg.quota("*") == Quota()  # operators are never limited
    with pytest.raises(InvalidRequest, match="tokens_per_minute"):
        reg.set_quota("acme", {"tokens_per_minute": 0})
    with pytest.raises(InvalidRequest, match="tokens_per_mintue"):
        reg.set_quota("acme", {"tokens_per_mintue": 5})


def test_audit_filters(tmp_path):
    reg = AccessRegistry(AdapterStore(tmp_path / "store"))
    reg.record(
        tenant="acme",
        key_id="key_a",
        caller="10.0.0.1",
        action="PUT /v1/routes/{name}",
        resource="acme:bot",
        status=200,
    )
    reg.record(
        tenant="globex",
        key_id="key_g",
        caller="10.0.0.2",
        action="DELETE /v1/adapters/{name}",
        resource="globex:x",
        status=200,
    )
    assert [e.tenant for e in reg.audit()] == ["globex", "acme"]
    assert [e.key_id for e in reg.audit(tenant="acme")] == ["key_a"]
    assert [e.resource for e in reg.audit(action="routes")] == ["acme:bot"]
    assert reg.audit(since=time.time() + 10) == []


def test_rate_limiter_tokens_and_concurrency():
    from loraplex.server.api.quotas import QuotaExceeded, RateLimiter

    quotas = {"acme": Quota(tokens_per_minute=100, concurrent_requests=2), "globex": Quota()}
    rl = RateLimiter(quotas.get)
    rl.admit("acme")
    rl.admit("acme")
    with pytest.raises(QuotaExceeded) as e:
        rl.admit("acme")
    assert e.value.limit == "concurrent_requests" and e.value.http_status == 429
    rl.release("acme")
    rl.release("acme")
    rl.charge("acme", 120)
    with pytest.raises(QuotaExceeded) as e:
        rl.admit("acme")
    assert e.value.limit == "tokens_per_minute" and 55 <= e.value.retry_after <= 60 and "100" in e.value.message
    for _ in range(10):
        rl.admit("globex")  # another tenant is not affected


def test_a_tenant_at_its_concurrent_jobs_waits_and_others_start(tmp_path):
    from loraplex.server.api.auth_api import job_admission

    reg = AccessRegistry(AdapterStore(tmp_path / "store"))
    reg.set_quota("acme", {"concurrent_jobs": 1})
    for jid, tenant in (("j1", "acme"), ("j2", "acme"), ("j3", "globex")):
        reg.set_owner("job", jid, tenant)
    may_start = job_admission(reg)
    assert may_start("j1", []) and not may_start("j2", ["j1"]) and may_start("j3", ["j1"])


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request):
    return None if request.param == "sqlite" else request.getfixturevalue("postgres_url")


def test_access_tables_work_on_every_registry_backend_across_replicas(tmp_path, registry_url):
    a = AccessRegistry(AdapterStore(tmp_path / "store", registry=registry_url))
    b = AccessRegistry(AdapterStore(tmp_path / "store", registry=registry_url))  # another replica
    key, secret = a.create_key("acme", "inference", name="ci")
    assert b.lookup(secret).id == key.id
    a.share("shared-bot")
    a.set_quota("acme", {"tokens_per_minute": 10})
    a.set_quota("acme", {"tokens_per_minute": 20})  # an upsert
    a.set_owner("file", "file-1", "acme")
    a.record(tenant="acme", key_id=key.id, caller="10.0.0.1", action="POST /v1/files", resource="file-1", status=200)
    a.revoke_key(key.id)
    time.sleep(REFRESH_S + 0.05)
    assert b.lookup(secret) is None and b.is_shared("shared-bot") and b.quota("acme").tokens_per_minute == 20
    assert b.owner("file", "file-1") == "acme" and b.owned("file", "acme") == {"file-1"}
    assert [e.resource for e in b.audit(tenant="acme", action="files")] == ["file-1"]
    a.store.close()
    b.store.close()


def test_rate_limits_hold_across_replicas_and_a_dead_replica_stops_counting(tmp_path, registry_url, monkeypatch):
    from loraplex.adapters_store import tenancy
    from loraplex.server.api.quotas import QuotaExceeded, RateLimiter

    regs = [AccessRegistry(AdapterStore(tmp_path / "store", registry=registry_url)) for _ in range(2)]
    regs[0].set_quota("acme", {"requests_per_minute": 3, "concurrent_requests": 2})
    time.sleep(REFRESH_S + 0.05)
    a, b = (RateLimiter(r.quota) for r in regs)
    a.admit("acme")
    a.admit("acme")  # two running on replica A
    a.share(regs[0], "replica-a")
    b.share(regs[1], "replica-b")
    with pytest.raises(QuotaExceeded) as e:
        b.admit("acme")  # B alone has nothing running, but the tenant has two
    assert e.value.limit == "concurrent_requests"
    assert b.usage("acme") == {"requests_last_minute": 2, "tokens_last_minute": 0, "running_requests": 2}
    a.release("acme")
    a.share(regs[0], "replica-a")
    b.share(regs[1], "replica-b")
    b.admit("acme")  # the third request of the minute, on B
    b.release("acme")
    b.share(regs[1], "replica-b")
    a.share(regs[0], "replica-a")
    with pytest.raises(QuotaExceeded) as e:
        a.admit("acme")  # the fourth, on A: over requests_per_minute counted on both replicas
    assert e.value.limit == "requests_per_minute" and e.value.retry_after >= 1
    b.admit("globex")  # another tenant is not affected
    # replica B dies (stops reporting): after USAGE_STALE_S its request no longer counts
    monkeypatch.setattr(tenancy, "USAGE_STALE_S", 0.2)
    time.sleep(0.3)
    a.share(regs[0], "replica-a")
    assert a.usage("acme")["requests_last_minute"] == 2
    for r in regs:
        r.store.close()


def test_usage_is_shared_only_when_a_tenant_has_limits(tmp_path):
    from loraplex.server.api.quotas import RateLimiter

    reg = AccessRegistry(AdapterStore(tmp_path / "store"))
    rl = RateLimiter(reg.quota)
    rl.admit("acme")
    rl.share(reg, "replica-a")
    assert reg.store._query("SELECT COUNT(*) FROM tenant_usage")[0][0] == 0  # no quotas: no writes
    reg.set_quota("acme", {"tokens_per_minute": 1000})
    time.sleep(REFRESH_S + 0.05)
    rl.admit("acme")
    rl.charge("acme", 7)
    rl.share(reg, "replica-a")
    assert reg.store._query("SELECT tenant, requests, tokens, running FROM tenant_usage") == [("acme", 1, 7, 2)]
    reg.store.close()


def test_audit_retention_deletes_old_entries_as_new_ones_are_written(tmp_path, registry_url):
    from loraplex.adapters_store import tenancy

    keep = AccessRegistry(AdapterStore(tmp_path / "store", registry=registry_url))  # no retention: keeps all
    old = [keep.record(tenant="acme", key_id=None, caller="1.2.3.4", action=f"old-{i}", resource=None, status=200)
           for i in range(3)]
    with keep.store._write() as c:  # written 40 and 20 days ago
        c.execute("UPDATE audit SET at = at - ? WHERE id IN (?, ?)", (40 * 86400.0, old[0].id, old[1].id))
        c.execute("UPDATE audit SET at = at - ? WHERE id = ?", (20 * 86400.0, old[2].id))
    keep.record(tenant="acme", key_id=None, caller="1.2.3.4", action="new-0", resource=None, status=200)
    assert len(keep.audit(limit=10)) == 4 and keep.prune_audit() == 0

    pruning = AccessRegistry(AdapterStore(tmp_path / "store", registry=registry_url), audit_retention_days=30)
    pruning.record(tenant="globex", key_id=None, caller="1.2.3.4", action="new-1", resource=None, status=200)
    assert [e.action for e in keep.audit(limit=10)] == ["new-1", "new-0", "old-2"]  # older than 30 days: gone
    with keep.store._write() as c:
        c.execute("UPDATE audit SET at = at - ? WHERE action = ?", (31 * 86400.0, "new-0"))
    pruning.record(tenant="globex", key_id=None, caller="1.2.3.4", action="new-2", resource=None, status=200)
    assert len(keep.audit(limit=10)) == 4  # within AUDIT_PRUNE_INTERVAL_S of the last prune: not yet
    assert pruning.prune_audit() == 1 and [e.action for e in keep.audit(limit=10)] == ["new-2", "new-1", "old-2"]
    assert tenancy.AUDIT_PRUNE_INTERVAL_S >= 1
    with pytest.raises(InvalidRequest):
        AccessRegistry(pruning.store, audit_retention_days=0)
    keep.store.close()
    pruning.store.close()
