"""HTTP endpoints of tenancy: who am I, API keys, audit log, quotas, sharing, adapter upload.

Access is decided by the gate (`auth.py` HTTP_RULES) before these handlers run; what they add is
the tenant arithmetic: a key of tenant `acme` lists, creates and revokes `acme`'s keys and reads
`acme`'s audit entries only; another tenant's key id is a 404 like an absent one. Tenant `*` (an
operator) sees everything and may pass `tenant=` to narrow.

Uploading an adapter (`POST /v1/adapters/{name}/versions`, multipart: the PEFT files as `file` parts,
optional `lineage` as a JSON string) is how tenants register adapters: registration by server path
reads the server's file system and is for operators only. The parts are spooled into the store's own
`tmp/` (inside the store root, so registration accepts them wherever the allowed roots point) and
registered from there as any directory would be: validated, copied, renamed into place.

The operations themselves (`create_key`, `list_audit`, `set_quota`, `AdapterUpload`, ...) are plain
functions of the call the gate admitted, so the gRPC Admin service (grpc_server.py) runs the same ones:
the HTTP routes below and the gRPC methods only translate their wire format.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse

from loraplex.adapters_store.peft_format import shown_path
from loraplex.adapters_store.tenancy import ALL, SEP, check_tenant, parse_quota, qualify

from . import auth
from .errors import BadRequest, LoraplexError
from .openai_api import load_json, parse_body
from .quotas import PayloadTooLarge, check_jobs, check_upload, check_versions

UPLOAD_MAX_FILES = 16
ADAPTER_FILE_CHUNK = 1 << 20


class KeyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant: str | None = None  # default: the caller's tenant
    scopes: list[str] = Field(min_length=1)
    name: str | None = Field(None, min_length=1, max_length=64)


class SharingBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shared: bool


def _target_tenant(requested: str | None) -> str:
    """The tenant an admin call acts on: the caller's own, or (operators only) the one asked for."""
    me = auth.identity()
    if requested is None or requested == me.tenant:
        return me.tenant
    if not me.operator:
        raise auth.PermissionDenied(f"a key of tenant {me.tenant!r} acts on tenant {me.tenant!r} only")
    return check_tenant(requested)


def tenant_version_count(store, tenant: str) -> int:
    prefix = tenant + SEP
    return sum(1 for v in store.list() if v.name.startswith(prefix))


# --- the operations, shared by the HTTP routes below and the gRPC Admin service (grpc_server.py) ------
# Each runs inside a call the gate admitted (auth.current()); the sync ones touch the registry and run off
# the event loop (asyncio.to_thread carries the call's context along).
AUDIT_MAX_LIMIT = 1000
AUDIT_DEFAULT_LIMIT = 100


def identity_view(gate) -> dict:
    """The calling key as GET /v1/me shows it: identity, the quota that applies and the current usage."""
    ident = auth.identity()
    quota, usage = gate.quota(ident.tenant).model_dump(), gate.limiter.usage(ident.tenant)
    return {**ident.to_json(), "quota": quota, "usage": usage}


def create_key(registry, tenant: str | None, scopes, name: str | None):
    """(key record, secret) of a new key for the caller's tenant or, for operators, `tenant`."""
    tenant = _target_tenant(tenant)
    key, secret = registry.create_key(tenant, scopes, name=name, created_by=auth.current().who())
    auth.note(resource=key.id, tenant=tenant, scopes=list(key.scopes))
    return key, secret


def list_keys(registry, tenant: str | None, include_revoked: bool):
    """The caller's tenant's keys; an operator's call lists every tenant's unless it names one."""
    target = ALL if tenant is None and auth.identity().operator else _target_tenant(tenant)
    return registry.keys(target, include_revoked=include_revoked)


def get_key(registry, key_id: str):
    return registry.get_key(key_id, auth.identity().tenant)  # another tenant's key: 404 as an absent one


def revoke_key(registry, key_id: str):
    return registry.revoke_key(key_id, tenant=auth.identity().tenant, revoked_by=auth.current().who())


def list_audit(
    registry,
    *,
    tenant: str | None = None,
    key_id: str | None = None,
    action: str | None = None,
    resource: str | None = None,
    since: float | None = None,
    until: float | None = None,
    limit: int = AUDIT_DEFAULT_LIMIT,
):
    """Audit entries newest first; a tenant's key reads its tenant's only. Page back with `until` = the
    oldest `at` seen."""
    me = auth.identity()
    tenant = _target_tenant(tenant) if tenant else me.tenant
    if not 1 <= limit <= AUDIT_MAX_LIMIT:
        raise BadRequest(f"'limit' must be an integer from 1 to {AUDIT_MAX_LIMIT}", param="limit")
    if (
        resource is not None
        and not me.operator
        and SEP not in resource
        and not resource.startswith(("key_", "file-", "ftjob-"))
    ):
        resource = qualify(me.tenant, resource)  # a tenant names its adapters without its prefix
    return registry.audit(
        tenant=tenant, key_id=key_id, action=action, resource=resource, since=since, until=until, limit=limit
    )


def quota_view(gate, tenant: str) -> dict:
    tenant = _target_tenant(tenant)
    return {"tenant": tenant, "quota": gate.quota(tenant).model_dump(), "usage": gate.limiter.usage(tenant)}


def set_quota(registry, tenant: str, limits):
    """Replaces `tenant`'s limits (a dict of Quota fields); the rule allows operators only."""
    tenant = check_tenant(tenant)
    if not isinstance(limits, dict):
        raise BadRequest("the quota must be a JSON object of limits")
    q = parse_quota(limits)
    registry.set_quota(tenant, q, by=auth.current().who())
    auth.note(**q.model_dump(exclude_none=True))
    return tenant, q


def set_sharing(state, name: str, shared: bool) -> None:
    state.store.versions(name)  # 404 for an unknown adapter
    state.gate.registry.share(name, shared=shared, by=auth.current().who())
    auth.note(shared=shared)


def parse_lineage(raw: str | bytes | None, param: str = "lineage") -> dict | None:
    """A client's lineage: a JSON object, or nothing."""
    if not raw:
        return None
    lineage = load_json(raw, f"'{param}'", param)
    if not isinstance(lineage, dict):
        raise BadRequest(f"'{param}' must be a JSON object", param=param)
    return lineage


class AdapterUpload:
    """One adapter upload, whichever front end carries its bytes, registered as any directory would be.

    Quotas first (stored versions, a declared size), before a byte is read; then the files, each a plain
    name written once, spooled into the store's `tmp/` while the total is counted against
    `max_upload_bytes`; then `register`, which validates (safetensors only, shapes, base match) and
    copies through the store. The spool is removed whatever happens, so a refused upload leaves nothing.

        with AdapterUpload(state, name, declared) as up:
            up.start_file("adapter_config.json"); up.write(chunk); ...
            version = await up.register(lineage)
    """

    def __init__(self, state, name: str, declared_bytes: int | None = None, *, param: str = "file"):
        self.state = state
        self.param = param  # the field that carries the files, in error messages
        self.name = auth.own(name)
        auth.note(resource=self.name)
        self.tenant = auth.identity().tenant
        self.quota = state.gate.quota(self.tenant)
        # the server's own limit on one upload (`--max-upload-bytes`; HTTP's body limit counts it too)
        self.server_limit = getattr(state.extra.get("config"), "max_upload_bytes", None)
        if declared_bytes is not None:
            self._check_server_limit(declared_bytes)
            check_upload(self.quota, self.tenant, declared_bytes, 0)
        if self.tenant != ALL:
            check_versions(self.quota, self.tenant, tenant_version_count(state.store, self.tenant))
        self.tmp = state.store.root / "tmp" / f"upload.{uuid.uuid4().hex[:16]}"
        self.total = 0
        self.files: list[str] = []
        self._out = None

    def __enter__(self):
        self.tmp.mkdir(parents=True)
        return self

    def __exit__(self, *exc):
        self._close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def start_file(self, filename: str | None) -> None:
        fname = Path(filename or "").name
        if not fname or fname != (filename or "") or fname.startswith("."):
            raise BadRequest(f"uploaded file name {filename!r} must be a plain file name", param=self.param)
        if fname in self.files:
            raise BadRequest(f"file {fname!r} is uploaded twice", param=self.param)
        if len(self.files) >= UPLOAD_MAX_FILES:
            raise BadRequest(f"an adapter upload holds at most {UPLOAD_MAX_FILES} files", param=self.param)
        self._close()
        self.files.append(fname)
        self._out = open(self.tmp / fname, "wb")  # noqa: SIM115  (written chunk by chunk, closed by _close)

    def _check_server_limit(self, size: int) -> None:
        if self.server_limit is not None and size > self.server_limit:
            raise PayloadTooLarge(
                f"upload is over the server's limit of {self.server_limit} bytes (server flag --max-upload-bytes)",
                limit="request_too_large",
            )

    def write(self, chunk: bytes) -> None:
        if self._out is None:
            raise BadRequest("file data before any file name", param=self.param)
        self.total += len(chunk)
        self._check_server_limit(self.total)
        if self.quota.max_upload_bytes is not None and self.total > self.quota.max_upload_bytes:
            raise PayloadTooLarge(
                f"upload is over tenant {self.tenant!r}'s limit of {self.quota.max_upload_bytes} "
                "bytes per upload (max_upload_bytes)",
                limit="max_upload_bytes",
            )
        self._out.write(chunk)

    async def register(self, lineage: dict | None):
        self._close()
        if not self.files:
            raise BadRequest(
                f"'{self.param}' is required: the adapter's files (adapter_config.json, "
                "adapter_model.safetensors, ...), one each",
                param=self.param,
            )
        lineage = {**(lineage or {}), "source": "upload"}
        try:
            v = await self.state.manager.register_async(self.name, str(self.tmp), lineage, auth.current().who())
        except LoraplexError as e:
            # the store names the directory it read, here the server's spool: the client sees its upload
            shown = shown_path(self.tmp)
            if shown in e.message:
                e.message = e.message.replace(repr(shown), "(the uploaded files)").replace(shown, "(the uploaded files)")
                e.args = (e.message,)
            raise
        auth.note(version=v.version, sha256=v.sha256)
        return v


class AuthRoutes:
    def __init__(self, state):
        self.state = state

    @property
    def registry(self):
        return self.state.gate.registry

    async def me(self, request: HttpRequest):
        return JSONResponse(identity_view(self.state.gate))

    # --- keys ------------------------------------------------------------------------------------
    async def create_key(self, request: HttpRequest):
        body: KeyBody = await parse_body(request, KeyBody)
        key, secret = await asyncio.to_thread(create_key, self.registry, body.tenant, body.scopes, body.name)
        return JSONResponse({**key.to_json(), "key": secret}, status_code=201)

    async def list_keys(self, request: HttpRequest):
        q = request.query_params
        revoked = q.get("include_revoked", "false").lower() in ("1", "true", "yes")
        keys = await asyncio.to_thread(list_keys, self.registry, q.get("tenant"), revoked)
        return JSONResponse({"object": "list", "data": [k.to_json() for k in keys]})

    async def get_key(self, request: HttpRequest):
        key = await asyncio.to_thread(get_key, self.registry, request.path_params["key_id"])
        return JSONResponse(key.to_json())

    async def revoke_key(self, request: HttpRequest):
        key = await asyncio.to_thread(revoke_key, self.registry, request.path_params["key_id"])
        return JSONResponse({**key.to_json(), "revoked": True})

    # --- audit -----------------------------------------------------------------------------------
    async def audit(self, request: HttpRequest):
        q = request.query_params

        def num(k):
            v = q.get(k)
            if v is None:
                return None
            try:
                return float(v)
            except ValueError:
                raise BadRequest(f"query parameter '{k}' must be a unix time in seconds", param=k) from None

        limit = q.get("limit", str(AUDIT_DEFAULT_LIMIT))
        if not limit.isdigit():
            raise BadRequest(f"'limit' must be an integer from 1 to {AUDIT_MAX_LIMIT}", param="limit")
        entries = await asyncio.to_thread(
            list_audit,
            self.registry,
            tenant=q.get("tenant"),
            key_id=q.get("key_id"),
            action=q.get("action"),
            resource=q.get("resource"),
            since=num("since"),
            until=num("until"),
            limit=int(limit),
        )
        return JSONResponse({"object": "list", "data": [e.to_json() for e in entries]})

    # --- quotas ----------------------------------------------------------------------------------
    async def get_quota(self, request: HttpRequest):
        return JSONResponse(quota_view(self.state.gate, request.path_params["tenant"]))

    async def put_quota(self, request: HttpRequest):
        raw = await request.body()
        try:
            data = json.loads(raw or b"null")
        except json.JSONDecodeError as e:
            raise BadRequest(f"malformed JSON body: {e.msg} at position {e.pos}") from e
        tenant, q = await asyncio.to_thread(set_quota, self.registry, request.path_params["tenant"], data)
        return JSONResponse({"tenant": tenant, "quota": q.model_dump()})

    # --- sharing ---------------------------------------------------------------------------------
    async def sharing(self, request: HttpRequest):
        name = request.path_params["name"]
        body: SharingBody = await parse_body(request, SharingBody)
        await asyncio.to_thread(set_sharing, self.state, name, body.shared)
        return JSONResponse({"name": name, "shared": body.shared})

    # --- adapter upload --------------------------------------------------------------------------
    async def upload_adapter(self, request: HttpRequest):
        from .adapters_api import version_json

        declared = request.headers.get("content-length")
        declared = int(declared) if declared is not None and declared.isdigit() else None
        with AdapterUpload(self.state, request.path_params["name"], declared) as up:  # refused before a byte is read
            form = await request.form(max_files=UPLOAD_MAX_FILES, max_fields=8)
            for f in form.getlist("file"):
                if not hasattr(f, "read"):
                    continue
                up.start_file(f.filename)
                while chunk := await f.read(ADAPTER_FILE_CHUNK):
                    up.write(chunk)
            v = await up.register(parse_lineage(form.get("lineage")))
        return JSONResponse(version_json(v, self.state.manager.engine), status_code=201)


def check_file_quota(jobs, size: int) -> None:
    """Before storing an uploaded fine-tuning file of `size` bytes for the calling tenant (`jobs`: JobManager)."""
    call = auth.current()
    tenant = call.identity.tenant
    if call.identity.operator or call.gate is None:
        return
    mine = auth.owned_filter("file")
    stored = sum(f["bytes"] for f in jobs.files() if mine(f["id"]))
    check_upload(call.gate.quota(tenant), tenant, size, stored)


def check_job_quota(jobs) -> None:
    """Before queueing a fine-tuning job: the calling tenant's queued jobs and stored versions."""
    call = auth.current()
    if call.identity.operator or call.gate is None:
        return
    tenant, quota = call.identity.tenant, call.gate.quota(call.identity.tenant)
    mine = auth.owned_filter("job")
    every, _ = jobs.jobs(None, 1 << 30)
    check_jobs(quota, tenant, sum(1 for j in every if mine(j["id"]) and j["status"] in ("queued", "validating_files")))
    store = call.gate.registry.store
    check_versions(quota, tenant, tenant_version_count(store, tenant))


def job_admission(registry):
    """`JobManager.may_start`: a queued job starts only while its tenant runs fewer than its `concurrent_jobs`;
    the jobs behind it of other tenants start meanwhile."""

    def may_start(jid: str, running: list[str]) -> bool:
        tenant = registry.owner("job", jid)
        limit = registry.quota(tenant).concurrent_jobs
        return limit is None or sum(1 for r in running if registry.owner("job", r) == tenant) < limit

    return may_start


# What a tenant's fine-tuning job may set through the `loraplex` extension: training knobs only. Paths
# (datasets, output_dir, base_model), devices and process layout stay the server's, and a reward given as
# "module:function" would run code the tenant names inside the server's machine.
TENANT_JOB_KEYS = frozenset(
    {
        "adapter",
        "sequence_len",
        "packing",
        "epochs",
        "max_steps",
        "learning_rate",
        "lr_scheduler",
        "warmup_steps",
        "weight_decay",
        "max_grad_norm",
        "micro_batch_size",
        "gradient_accumulation_steps",
        "val_set_size",
        "eval_steps",
        "save_steps",
        "logging_steps",
        "seed",
        "train_on_prompt",
        "gradient_checkpointing",
        "canary",
        "beta",
        "loss_type",
        "reward",
        "kl_coef",
        "cliprange",
        "cliprange_value",
        "vf_coef",
        "ppo_epochs",
        "mini_batch_size",
        "num_rollouts",
        "num_generations",
        "response_length",
        "temperature",
        "gamma",
        "lam",
        "quantize",
    }
)
TENANT_ADAPTER_KEYS = frozenset({"r", "alpha", "dropout", "target_modules", "use_rslora", "init_from"})


def _visible_ref(ref, param: str) -> str:
    if not isinstance(ref, str) or not ref:
        raise BadRequest(f"'{param}' must name an adapter (name or name@version)", param=param)
    name, at, ver = ref.partition("@")
    return auth.resolve_model(name) + at + ver


def check_job_overrides(overrides: dict) -> dict:
    """The calling tenant's job-config overrides, checked and with adapter names made the stored names:
    `adapter.init_from` and a reward adapter must be the tenant's own or shared (404 otherwise)."""
    call = auth.current()
    out = dict(overrides)
    adapter = out.get("adapter")
    if isinstance(adapter, dict) and adapter.get("init_from"):
        out["adapter"] = {**adapter, "init_from": _visible_ref(adapter["init_from"], "loraplex.adapter.init_from")}
    reward = out.get("reward")
    if isinstance(reward, dict) and "adapter" in reward:
        out["reward"] = {**reward, "adapter": _visible_ref(reward["adapter"], "loraplex.reward.adapter")}
    if call.identity.operator:
        return out
    for k in out:
        if k not in TENANT_JOB_KEYS:
            raise auth.PermissionDenied(f"'loraplex.{k}' is set by the server, not by tenants", param=f"loraplex.{k}")
    if isinstance(adapter, dict):
        for k in adapter:
            if k not in TENANT_ADAPTER_KEYS:
                raise auth.PermissionDenied(
                    f"'loraplex.adapter.{k}' is set by the server, not by tenants", param=f"loraplex.adapter.{k}"
                )
    if isinstance(reward, str):
        raise auth.PermissionDenied(
            "a reward given as 'module:function' runs code on the server; tenants use a rule "
            "({regex|contains|exact: ...}) or a reward adapter ({adapter: name})",
            param="loraplex.reward",
        )
    return out


__all__ = [
    "AdapterUpload",
    "AuthRoutes",
    "check_file_quota",
    "check_job_overrides",
    "check_job_quota",
    "create_key",
    "get_key",
    "identity_view",
    "list_audit",
    "list_keys",
    "parse_lineage",
    "quota_view",
    "revoke_key",
    "set_quota",
    "set_sharing",
    "tenant_version_count",
]
