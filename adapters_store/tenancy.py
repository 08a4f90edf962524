"""Who may do what: tenants, API keys, explicit sharing, per-tenant quotas, resource owners and the audit log.

Tenants own names, not rows. An adapter of tenant `acme` is stored under the qualified name
`acme:support-bot`; a name without a tenant prefix (every adapter registered before tenancy, or by an
operator) belongs to no tenant and only the all-tenants identity `*` sees it, unless it is shared. The
separator `:` cannot occur in a bare adapter name (the store's NAME_RE), so ownership follows from the
name alone: no table to keep consistent with the versions, nothing to migrate, and routes, history,
events and telemetry labels carry the owner with the name. A caller of tenant `acme` may write
`support-bot` for its own `acme:support-bot` (`qualify`); responses always show the qualified name,
so what a client reads back is what it can send.

API keys are `lpx-` plus 256 random bits. The registry keeps only their SHA-256 (a slow password hash
buys nothing for secrets of that entropy and would cost every request), with the tenant, the scopes, a
name and the last four characters to recognise a key in `keys list`. The secret is shown once, when it
is created, and never logged.

Keys, shares and quotas are read on every request, so they come from an in-memory snapshot; a one-row
counter moves with every change of those tables (in the same transaction), and the snapshot is
reloaded when it moved, looked at no more often than every `REFRESH_S`. A key revoked by the CLI in
another process therefore stops working on a running server within that time.

The tables live in the adapter store's registry beside the versions, created through the registry's
`ensure_schema` (`CREATE TABLE IF NOT EXISTS`, nothing altered, so an existing registry gains them on
first open) and written in its transactions. The SQL is plain: text ids generated here instead of
AUTOINCREMENT, `ON CONFLICT ... DO UPDATE` upserts, so the same statements run on SQLite and PostgreSQL
(tests/test_tenancy_registry.py runs them on both).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import AdapterNotFound, InvalidRequest, StoreError

ALL = "*"  # the tenant of operators: sees and administers every tenant's resources
SCOPES = ("inference", "train", "admin")
SEP = ":"
TENANT_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
BARE_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"  # an adapter name within a tenant (the store's NAME_RE)
QUALIFIED_NAME_PATTERN = rf"^(?:{TENANT_RE.pattern}{SEP})?{BARE_NAME}$"  # what a job config may name
KEY_PREFIX = "lpx-"
USAGE_STALE_S = 5.0  # a replica's usage report older than this is from a replica that stopped
REFRESH_S = 0.25  # how stale the key / share / quota snapshot may get: a revoked key works at most this long
DEFAULT_QUOTA_TENANT = ALL  # the quota row that applies to every tenant without its own
AUDIT_PRUNE_INTERVAL_S = 60.0  # with a retention set, old audit rows go at most this often, as new ones are written

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, scopes TEXT NOT NULL, name TEXT, secret_sha256 TEXT NOT NULL UNIQUE,
    hint TEXT NOT NULL, created_at REAL NOT NULL, created_by TEXT NOT NULL, revoked_at REAL, revoked_by TEXT);
CREATE TABLE IF NOT EXISTS shared_adapters (name TEXT PRIMARY KEY, shared_at REAL NOT NULL, shared_by TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tenant_quotas (tenant TEXT PRIMARY KEY, limits TEXT NOT NULL, updated_at REAL NOT NULL,
    updated_by TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS resource_owners (kind TEXT NOT NULL, id TEXT NOT NULL, tenant TEXT NOT NULL,
    PRIMARY KEY (kind, id));
CREATE TABLE IF NOT EXISTS audit (
    id TEXT PRIMARY KEY, at REAL NOT NULL, tenant TEXT NOT NULL, key_id TEXT, caller TEXT NOT NULL,
    action TEXT NOT NULL, resource TEXT, status TEXT NOT NULL, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS audit_at ON audit(at);
CREATE TABLE IF NOT EXISTS access_meta (id INTEGER PRIMARY KEY, version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tenant_usage (replica TEXT NOT NULL, tenant TEXT NOT NULL, requests INTEGER NOT NULL,
    tokens INTEGER NOT NULL, running INTEGER NOT NULL, at REAL NOT NULL, PRIMARY KEY (replica, tenant));
"""


class KeyNotFound(AdapterNotFound):
    """An API key id that does not exist or belongs to another tenant (404, indistinguishable)."""


# --- tenants and names ---------------------------------------------------------------------------
def check_tenant(tenant, *, allow_all: bool = True) -> str:
    if tenant == ALL and allow_all:
        return tenant
    if not isinstance(tenant, str) or not TENANT_RE.fullmatch(tenant):
        raise InvalidRequest(
            f"invalid tenant {tenant!r}: use 1-32 lowercase letters, digits, '-' and '_', starting with a "
            f"letter or digit{' (or * for all tenants)' if allow_all else ''}"
        )
    return tenant


def check_scopes(scopes) -> tuple[str, ...]:
    if isinstance(scopes, str):
        scopes = [s.strip() for s in scopes.split(",") if s.strip()]
    if not scopes or not all(isinstance(s, str) for s in scopes):
        raise InvalidRequest(f"scopes must be a non-empty list of {list(SCOPES)}, got {scopes!r}")
    bad = [s for s in scopes if s not in SCOPES]
    if bad:
        raise InvalidRequest(f"unknown scope(s) {bad}: use {list(SCOPES)}")
    return tuple(s for s in SCOPES if s in scopes)


def owner_of(name: str) -> str:
    """The tenant a stored adapter name belongs to; `*` for names without a tenant prefix."""
    tenant, sep, _ = name.partition(SEP)
    return tenant if sep else ALL


def split_name(name: str) -> tuple[str | None, str]:
    """(tenant or None, bare name) of a possibly qualified adapter name."""
    tenant, sep, rest = name.partition(SEP)
    return (tenant, rest) if sep else (None, name)


def qualify(tenant: str, name: str) -> str:
    """The stored name `name` means for a caller of `tenant`: its own namespace for a bare name, the name
    itself when qualified (whether the caller may touch it is `can_see` / `can_manage`)."""
    if tenant == ALL or SEP in name:
        return name
    return f"{tenant}{SEP}{name}"


def can_manage(tenant: str, name: str) -> bool:
    return tenant == ALL or owner_of(name) == tenant


# --- quotas ----------------------------------------------------------------------------------------
class Quota(BaseModel):
    """Per-tenant limits; None is unlimited. One model for the CLI, the admin API and enforcement."""

    model_config = ConfigDict(extra="forbid")
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)  # prompt + completion tokens
    concurrent_requests: int | None = Field(None, ge=1)
    adapter_versions: int | None = Field(None, ge=1)  # stored versions over all the tenant's adapters
    concurrent_jobs: int | None = Field(None, ge=1)
    queued_jobs: int | None = Field(None, ge=0)
    max_upload_bytes: int | None = Field(None, ge=1)  # one uploaded file (fine-tuning data or adapter files)
    file_storage_bytes: int | None = Field(None, ge=1)  # all the tenant's uploaded files together

    def merged_over(self, default: "Quota") -> "Quota":
        mine = self.model_dump(exclude_none=True)
        return Quota(**{**default.model_dump(exclude_none=True), **mine})


def parse_quota(raw) -> Quota:
    try:
        return Quota.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidRequest(
            f"invalid quota field '{loc}': {first.get('msg')}" if loc else f"invalid quota: {e}"
        ) from None


# --- records ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ApiKey:
    id: str
    tenant: str
    scopes: tuple[str, ...]
    name: str | None
    hint: str  # "lpx-…" + the last four characters
    created_at: float
    created_by: str
    revoked_at: float | None = None
    revoked_by: str | None = None

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "object": "api_key",
            "tenant": self.tenant,
            "scopes": list(self.scopes),
            "name": self.name,
            "hint": self.hint,
            "created_at": self.created_at,
            "created_by": self.created_by,
            "revoked_at": self.revoked_at,
            "revoked_by": self.revoked_by,
        }


@dataclass(frozen=True)
class AuditEntry:
    id: str
    at: float
    tenant: str
    key_id: str | None
    caller: str  # the client's address as the server saw it
    action: str  # "POST /v1/routes/{name}/promote", "/loraplex.v1.Admin/PromoteRoute", "keys.create" (CLI)
    resource: str | None
    status: str  # HTTP status or gRPC code of the outcome
    detail: dict

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "object": "audit_entry",
            "at": self.at,
            "tenant": self.tenant,
            "key_id": self.key_id,
            "caller": self.caller,
            "action": self.action,
            "resource": self.resource,
            "status": self.status,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class _Snapshot:
    version: int
    keys: dict[str, ApiKey] = field(default_factory=dict)  # secret sha256 -> active key
    shared: frozenset = frozenset()
    quotas: dict[str, Quota] = field(default_factory=dict)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _key_from_row(r) -> ApiKey:
    return ApiKey(r[0], r[1], tuple(json.loads(r[2])), r[3], r[4], r[5], r[6], r[7], r[8])


_KEY_COLS = "id, tenant, scopes, name, hint, created_at, created_by, revoked_at, revoked_by"


class AccessRegistry:
    """Keys, shares, quotas, owners and audit, in the registry database of `store` (an AdapterStore)."""

    def __init__(self, store, *, audit_retention_days: float | None = None):
        if audit_retention_days is not None and not audit_retention_days > 0:
            raise InvalidRequest(f"audit retention must be a positive number of days, got {audit_retention_days!r}")
        self.store = store
        self.audit_retention_days = audit_retention_days  # None: keep every entry
        self._pruned_at = 0.0  # monotonic time of the last prune; 0: never (the first write prunes)
        store.registry.ensure_schema(_SCHEMA)  # the registry's backend translates the DDL (registry.py)
        with store._write() as c:
            c.execute("INSERT INTO access_meta(id, version) VALUES (1, 0) ON CONFLICT(id) DO NOTHING")
        self._snap = _Snapshot(-1)
        self._checked = 0.0
        self._lock = threading.Lock()

    # --- the snapshot read on the request path ---------------------------------------------------
    def _bump(self, c) -> None:
        c.execute("UPDATE access_meta SET version = version + 1 WHERE id = 1")

    def snapshot(self) -> _Snapshot:
        now = time.monotonic()
        snap = self._snap
        if now - self._checked < REFRESH_S:
            return snap
        with self._lock:
            if now - self._checked < REFRESH_S:
                return self._snap
            with self.store._read() as c:
                version = int(c.execute("SELECT version FROM access_meta WHERE id = 1").fetchone()[0])
                if version != self._snap.version:
                    keys = {
                        r[0]: _key_from_row(r[1:])
                        for r in c.execute(f"SELECT secret_sha256, {_KEY_COLS} FROM api_keys WHERE revoked_at IS NULL")
                    }
                    shared = frozenset(r[0] for r in c.execute("SELECT name FROM shared_adapters"))
                    quotas = {
                        r[0]: Quota.model_validate(json.loads(r[1]))
                        for r in c.execute("SELECT tenant, limits FROM tenant_quotas")
                    }
                    self._snap = _Snapshot(version, keys, shared, quotas)
            self._checked = time.monotonic()
            return self._snap

    # --- keys ------------------------------------------------------------------------------------
    def create_key(
        self, tenant: str, scopes, *, name: str | None = None, created_by: str = "api"
    ) -> tuple[ApiKey, str]:
        """A new key; returns (its record, the secret). The secret is not stored and cannot be shown again."""
        check_tenant(tenant)
        scopes = check_scopes(scopes)
        if name is not None and (not isinstance(name, str) or not 1 <= len(name) <= 64):
            raise InvalidRequest("key name must be a string of 1 to 64 characters")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(
            "key_" + secrets.token_hex(8), tenant, scopes, name, f"{KEY_PREFIX}…{secret[-4:]}", time.time(), created_by
        )
        with self.store._write() as c:
            c.execute(
                f"INSERT INTO api_keys(secret_sha256, {_KEY_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    _hash(secret),
                    key.id,
                    key.tenant,
                    json.dumps(list(key.scopes)),
                    key.name,
                    key.hint,
                    key.created_at,
                    key.created_by,
                    None,
                    None,
                ),
            )
            self._bump(c)
        self._checked = 0.0  # this process sees its own change at once
        return key, secret

    def keys(self, tenant: str = ALL, *, include_revoked: bool = False) -> list[ApiKey]:
        sql, args = f"SELECT {_KEY_COLS} FROM api_keys", []
        where = []
        if tenant != ALL:
            where.append("tenant = ?")
            args.append(tenant)
        if not include_revoked:
            where.append("revoked_at IS NULL")
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [_key_from_row(r) for r in self.store._query(sql + " ORDER BY created_at, id", args)]

    def get_key(self, key_id: str, tenant: str = ALL) -> ApiKey:
        rows = self.store._query(f"SELECT {_KEY_COLS} FROM api_keys WHERE id = ?", (key_id,))
        if not rows or (tenant != ALL and rows[0][1] != tenant):
            raise KeyNotFound(f"API key {key_id!r} does not exist")
        return _key_from_row(rows[0])

    def revoke_key(self, key_id: str, *, tenant: str = ALL, revoked_by: str = "api") -> ApiKey:
        """Revokes a key (idempotent); a running server refuses it within REFRESH_S."""
        with self.store._write() as c:
            row = c.execute(f"SELECT {_KEY_COLS} FROM api_keys WHERE id = ?", (key_id,)).fetchone()
            if row is None or (tenant != ALL and row[1] != tenant):
                raise KeyNotFound(f"API key {key_id!r} does not exist")
            if row[7] is None:
                c.execute(
                    "UPDATE api_keys SET revoked_at = ?, revoked_by = ? WHERE id = ?",
                    (time.time(), revoked_by, key_id),
                )
                self._bump(c)
        self._checked = 0.0
        return self.get_key(key_id)

    def lookup(self, secret: str) -> ApiKey | None:
        """The active key whose secret this is, or None."""
        return self.snapshot().keys.get(_hash(secret))

    def has_keys(self) -> bool:
        return bool(self.snapshot().keys)

    # --- sharing ---------------------------------------------------------------------------------
    def share(self, name: str, *, shared: bool = True, by: str = "api") -> None:
        """Makes adapter `name` (every version) usable for inference by every tenant, or stops that."""
        with self.store._write() as c:
            if shared:
                c.execute(
                    "INSERT INTO shared_adapters(name, shared_at, shared_by) VALUES (?,?,?) "
                    "ON CONFLICT(name) DO UPDATE SET shared_at = excluded.shared_at, shared_by = excluded.shared_by",
                    (name, time.time(), by),
                )
            else:
                c.execute("DELETE FROM shared_adapters WHERE name = ?", (name,))
            self._bump(c)
        self._checked = 0.0

    def is_shared(self, name: str) -> bool:
        return name in self.snapshot().shared

    def can_see(self, tenant: str, name: str) -> bool:
        """May a caller of `tenant` list and use adapter `name` (its own, or shared)?"""
        return can_manage(tenant, name) or name in self.snapshot().shared

    def resolve_name(self, tenant: str, name: str) -> str:
        """The stored adapter name a caller of `tenant` means by `name` for inference: its own adapter
        first, else a shared one of that name; AdapterNotFound (the message of an absent adapter) when
        the caller may not see it, so another tenant's adapter looks exactly like no adapter."""
        own = qualify(tenant, name)
        if own != name and not self._exists(own) and self.is_shared(name):
            return name  # a bare name the tenant has no adapter of: the shared operator adapter of that name
        if self.can_see(tenant, own):
            return own
        raise AdapterNotFound(f"adapter {name!r} does not exist")

    def _exists(self, name: str) -> bool:
        try:
            self.store.versions(name)
        except AdapterNotFound:
            return False
        return True

    def own_name(self, tenant: str, name: str) -> str:
        """The stored name of an adapter the caller manages (register, delete, route); AdapterNotFound
        for another tenant's, as for an absent one."""
        q = qualify(tenant, name)
        if not can_manage(tenant, q):
            raise AdapterNotFound(f"adapter {name!r} does not exist")
        return q

    # --- quotas ----------------------------------------------------------------------------------
    def set_quota(self, tenant: str, quota, *, by: str = "api") -> Quota:
        check_tenant(tenant)
        q = quota if isinstance(quota, Quota) else parse_quota(quota)
        with self.store._write() as c:
            c.execute(
                "INSERT INTO tenant_quotas(tenant, limits, updated_at, updated_by) VALUES (?,?,?,?) "
                "ON CONFLICT(tenant) DO UPDATE SET limits = excluded.limits, updated_at = excluded.updated_at, "
                "updated_by = excluded.updated_by",
                (tenant, q.model_dump_json(exclude_none=True), time.time(), by),
            )
            self._bump(c)
        self._checked = 0.0
        return q

    def quota(self, tenant: str) -> Quota:
        """The limits that apply to `tenant`: its own row over the default row (`*`). The all-tenants
        identity itself is never limited."""
        if tenant == ALL:
            return Quota()
        qs = self.snapshot().quotas
        default = qs.get(DEFAULT_QUOTA_TENANT, Quota())
        own = qs.get(tenant)
        return default if own is None else own.merged_over(default)

    def quotas(self) -> dict[str, Quota]:
        return dict(self.snapshot().quotas)

    # --- rate-quota usage of every replica -------------------------------------------------------
    def publish_usage(self, replica: str, usage: dict[str, tuple[int, int, int]]) -> None:
        """Replaces what `replica` reports of its last minute: {tenant: (requests, tokens, running)}."""
        now = time.time()
        with self.store._connection() as c:  # row by row (upserts): a reader sees each tenant's old or new count
            for tenant, (req, tok, run) in usage.items():
                c.execute("INSERT INTO tenant_usage(replica, tenant, requests, tokens, running, at) VALUES (?,?,?,?,?,?) "
                          "ON CONFLICT(replica, tenant) DO UPDATE SET requests = excluded.requests, "
                          "tokens = excluded.tokens, running = excluded.running, at = excluded.at",
                          (replica, tenant, int(req), int(tok), int(run), now))
            c.execute("DELETE FROM tenant_usage WHERE (replica = ? AND at < ?) OR at < ?",
                      (replica, now, now - USAGE_STALE_S))

    def peer_usage(self, replica: str) -> dict[str, tuple[int, int, int]]:
        """{tenant: (requests, tokens, running)} summed over the other replicas' recent reports; a replica
        that stopped reporting (it died) stops counting after USAGE_STALE_S."""
        rows = self.store._query(
            "SELECT tenant, SUM(requests), SUM(tokens), SUM(running) FROM tenant_usage WHERE replica <> ? AND at >= ? "
            "GROUP BY tenant", (replica, time.time() - USAGE_STALE_S))
        return {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in rows}

    # --- owners of files and jobs ----------------------------------------------------------------
    def set_owner(self, kind: str, rid: str, tenant: str) -> None:
        with self.store._write() as c:
            c.execute(
                "INSERT INTO resource_owners(kind, id, tenant) VALUES (?,?,?) "
                "ON CONFLICT(kind, id) DO UPDATE SET tenant = excluded.tenant",
                (kind, rid, tenant),
            )

    def owner(self, kind: str, rid: str) -> str:
        """The tenant of a file or job; `*` for those made before tenancy or by operators."""
        rows = self.store._query("SELECT tenant FROM resource_owners WHERE kind = ? AND id = ?", (kind, rid))
        return rows[0][0] if rows else ALL

    def owned(self, kind: str, tenant: str) -> set[str]:
        return {
            r[0]
            for r in self.store._query("SELECT id FROM resource_owners WHERE kind = ? AND tenant = ?", (kind, tenant))
        }

    # --- audit -----------------------------------------------------------------------------------
    def record(
        self,
        *,
        tenant: str,
        key_id: str | None,
        caller: str,
        action: str,
        resource: str | None,
        status,
        detail: dict | None = None,
    ) -> AuditEntry:
        e = AuditEntry(
            f"aud_{time.time_ns():020d}{uuid.uuid4().hex[:6]}",
            time.time(),
            tenant,
            key_id,
            caller,
            action,
            resource,
            str(status),
            detail or {},
        )
        with self.store._write() as c:
            c.execute(
                "INSERT INTO audit(id, at, tenant, key_id, caller, action, resource, status, detail) "
                "VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    e.id,
                    e.at,
                    e.tenant,
                    e.key_id,
                    e.caller,
                    e.action,
                    e.resource,
                    e.status,
                    json.dumps(e.detail, default=str),
                ),
            )
            if self.audit_retention_days is not None and time.monotonic() - self._pruned_at >= AUDIT_PRUNE_INTERVAL_S:
                self._prune(c, e.at)
        return e

    def _prune(self, c, now: float) -> int:
        """Deletes the audit entries older than the retention (in the transaction of `c`); how many."""
        cur = c.execute("DELETE FROM audit WHERE at < ?", (now - self.audit_retention_days * 86400.0,))
        self._pruned_at = time.monotonic()
        return max(cur.rowcount, 0)

    def prune_audit(self) -> int:
        """Deletes the audit entries older than the retention now (`record` does it as it writes, at most every
        AUDIT_PRUNE_INTERVAL_S); returns how many. Nothing without a retention."""
        if self.audit_retention_days is None:
            return 0
        with self.store._write() as c:
            return self._prune(c, time.time())

    def audit(
        self,
        *,
        tenant: str = ALL,
        key_id: str | None = None,
        action: str | None = None,
        resource: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
    ) -> list[AuditEntry]:
        """Entries newest first. `tenant` other than `*` sees its own; `action` matches a substring."""
        where, args = [], []
        for col, val in (("tenant", None if tenant == ALL else tenant), ("key_id", key_id), ("resource", resource)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        if action is not None:
            where.append("action LIKE ?")
            args.append(f"%{action}%")
        if since is not None:
            where.append("at >= ?")
            args.append(float(since))
        if until is not None:
            where.append("at < ?")
            args.append(float(until))
        sql = "SELECT id, at, tenant, key_id, caller, action, resource, status, detail FROM audit"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self.store._query(sql + " ORDER BY at DESC, id DESC LIMIT ?", (*args, int(limit)))
        return [AuditEntry(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], json.loads(r[8])) for r in rows]


__all__ = [
    "ALL",
    "SCOPES",
    "SEP",
    "AccessRegistry",
    "ApiKey",
    "AuditEntry",
    "KeyNotFound",
    "Quota",
    "StoreError",
    "can_manage",
    "check_scopes",
    "check_tenant",
    "owner_of",
    "parse_quota",
    "qualify",
    "split_name",
]
