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

from loraplex.adapters_store.tenancy import ALL, SEP, check_tenant, parse_quota, qualify

from . import auth
from .errors import BadRequest
from .openai_api import parse_body
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


class AuthRoutes:
    def __init__(self, state):
        self.state = state

    @property
    def registry(self):
        return self.state.gate.registry

    async def me(self, request: HttpRequest):
        call = auth.current()
        t = call.identity.tenant
        out = call.identity.to_json()
        out["quota"] = self.state.gate.quota(t).model_dump()
        out["usage"] = self.state.gate.limiter.usage(t)
        return JSONResponse(out)

    # --- keys ------------------------------------------------------------------------------------
    async def create_key(self, request: HttpRequest):
        body: KeyBody = await parse_body(request, KeyBody)
        tenant = _target_tenant(body.tenant)
        key, secret = await asyncio.to_thread(
            self.registry.create_key, tenant, body.scopes, name=body.name, created_by=auth.current().who()
        )
        auth.note(resource=key.id, tenant=tenant, scopes=list(key.scopes))
        return JSONResponse({**key.to_json(), "key": secret}, status_code=201)

    async def list_keys(self, request: HttpRequest):
        tenant = _target_tenant(request.query_params.get("tenant"))
        if auth.identity().operator and request.query_params.get("tenant") is None:
            tenant = ALL
        revoked = request.query_params.get("include_revoked", "false").lower() in ("1", "true", "yes")
        keys = await asyncio.to_thread(self.registry.keys, tenant, include_revoked=revoked)
        return JSONResponse({"object": "list", "data": [k.to_json() for k in keys]})

    async def get_key(self, request: HttpRequest):
        key = await asyncio.to_thread(self.registry.get_key, request.path_params["key_id"], auth.identity().tenant)
        return JSONResponse(key.to_json())

    async def revoke_key(self, request: HttpRequest):
        key = await asyncio.to_thread(
            self.registry.revoke_key,
            request.path_params["key_id"],
            tenant=auth.identity().tenant,
            revoked_by=auth.current().who(),
        )
        return JSONResponse({**key.to_json(), "revoked": True})

    # --- audit -----------------------------------------------------------------------------------
    async def audit(self, request: HttpRequest):
        q = request.query_params
        me = auth.identity()
        tenant = _target_tenant(q.get("tenant")) if q.get("tenant") else me.tenant

        def num(k):
            v = q.get(k)
            if v is None:
                return None
            try:
                return float(v)
            except ValueError:
                raise BadRequest(f"query parameter '{k}' must be a unix time in seconds", param=k) from None

        limit = q.get("limit", "100")
        if not limit.isdigit() or not 1 <= int(limit) <= 1000:
            raise BadRequest("'limit' must be an integer from 1 to 1000", param="limit")
        resource = q.get("resource")
        if (
            resource is not None
            and not me.operator
            and SEP not in resource
            and not resource.startswith(("key_", "file-", "ftjob-"))
        ):
            resource = qualify(me.tenant, resource)  # a tenant names its adapters without its prefix
        entries = await asyncio.to_thread(
            self.registry.audit,
            tenant=tenant,
            key_id=q.get("key_id"),
            action=q.get("action"),
            resource=resource,
            since=num("since"),
            until=num("until"),
            limit=int(limit),
        )
        return JSONResponse({"object": "list", "data": [e.to_json() for e in entries]})

    # --- quotas ----------------------------------------------------------------------------------
    async def get_quota(self, request: HttpRequest):
        tenant = _target_tenant(request.path_params["tenant"])
        return JSONResponse(
            {
                "tenant": tenant,
                "quota": self.state.gate.quota(tenant).model_dump(),
                "usage": self.state.gate.limiter.usage(tenant),
            }
        )

    async def put_quota(self, request: HttpRequest):
        tenant = check_tenant(request.path_params["tenant"])
        raw = await request.body()
        try:
            data = json.loads(raw or b"null")
        except json.JSONDecodeError as e:
            raise BadRequest(f"malformed JSON body: {e.msg} at position {e.pos}") from e
        if not isinstance(data, dict):
            raise BadRequest("the request body must be a JSON object of limits")
        q = parse_quota(data)
        await asyncio.to_thread(self.registry.set_quota, tenant, q, by=auth.current().who())
        auth.note(**q.model_dump(exclude_none=True))
        return JSONResponse({"tenant": tenant, "quota": q.model_dump()})

    # --- sharing ---------------------------------------------------------------------------------
    async def sharing(self, request: HttpRequest):
        name = request.path_params["name"]
        body: SharingBody = await parse_body(request, SharingBody)
        self.state.store.versions(name)  # 404 for an unknown adapter
        await asyncio.to_thread(self.registry.share, name, shared=body.shared, by=auth.current().who())
        auth.note(shared=body.shared)
        return JSONResponse({"name": name, "shared": body.shared})

    # --- adapter upload --------------------------------------------------------------------------
    async def upload_adapter(self, request: HttpRequest):
        from .adapters_api import version_json

        name = auth.own(request.path_params["name"])
        tenant = auth.identity().tenant
        gate, store, manager = self.state.gate, self.state.store, self.state.manager
        quota = gate.quota(tenant)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit():
            check_upload(quota, tenant, int(declared), 0)  # refuse before reading a byte
        if tenant != ALL:
            check_versions(quota, tenant, tenant_version_count(store, tenant))
        tmp = store.root / "tmp" / f"upload.{uuid.uuid4().hex[:16]}"
        tmp.mkdir(parents=True)
        try:
            form = await request.form(max_files=UPLOAD_MAX_FILES, max_fields=8)
            files = [f for f in form.getlist("file") if hasattr(f, "read")]
            if not files:
                raise BadRequest(
                    "multipart field 'file' is required: the adapter's files (adapter_config.json, "
                    "adapter_model.safetensors, ...), one part each",
                    param="file",
                )
            total = 0
            for f in files:
                fname = Path(f.filename or "").name
                if not fname or fname != (f.filename or "") or fname.startswith("."):
                    raise BadRequest(f"uploaded file name {f.filename!r} must be a plain file name", param="file")
                with open(tmp / fname, "wb") as out:
                    while chunk := await f.read(ADAPTER_FILE_CHUNK):
                        total += len(chunk)
                        if quota.max_upload_bytes is not None and total > quota.max_upload_bytes:
                            raise PayloadTooLarge(
                                f"upload is over tenant {tenant!r}'s limit of {quota.max_upload_bytes} "
                                "bytes per upload (max_upload_bytes)",
                                limit="max_upload_bytes",
                            )
                        out.write(chunk)
            lineage = None
            if form.get("lineage"):
                try:
                    lineage = json.loads(form.get("lineage"))
                except json.JSONDecodeError as e:
                    raise BadRequest(f"'lineage' is not valid JSON: {e}", param="lineage") from e
                if not isinstance(lineage, dict):
                    raise BadRequest("'lineage' must be a JSON object", param="lineage")
            lineage = {**(lineage or {}), "source": "upload"}
            v = await manager.register_async(name, str(tmp), lineage, auth.current().who())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        auth.note(version=v.version, sha256=v.sha256)
        return JSONResponse(version_json(v, manager.engine), status_code=201)


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


__all__ = ["AuthRoutes", "check_file_quota", "check_job_overrides", "check_job_quota", "tenant_version_count"]
