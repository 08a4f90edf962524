"""Building a running server from its configuration: base model, store, engine, front-end services."""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loraplex.adapters_store.objects import default_cache_dir, default_home, is_s3_url, parse_s3_url
from loraplex.trainer.jobs import DEFAULT_LEASE_SECONDS, DEFAULT_MAX_JOB_SECONDS, DEFAULT_MAX_QUEUED_JOBS

from .app import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_UPLOAD_BYTES, ServerState

log = logging.getLogger("loraplex.server")


class ServeConfig(BaseModel):
    """Everything `loraplex serve` takes; CLI flags map 1:1 onto these fields."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None  # local HF checkpoint dir; None = embedded SmolLM2-135M-Instruct
    served_model_name: str | None = None
    adapters: dict[str, str] = Field(default_factory=dict)  # name -> PEFT dir, registered at start
    store: Path | str | None = None  # a directory or s3://bucket/prefix; default $LORAPLEX_HOME/store
    store_cache: Path | None = None  # an s3:// store's local cache; default $LORAPLEX_HOME/store-cache/<bucket>/...
    registry: str | None = None  # postgresql:// URL; default $LORAPLEX_REGISTRY, else registry.sqlite3 in the store
    allowed_adapter_roots: list[Path] | None = None  # None = any readable path
    hub_orgs: list[str] | None = None  # hub orgs whose adapters the API may register ("*": any); None = no remote ids
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 50051
    device: str | None = None
    dtype: str | None = None
    max_loras: int = Field(8, ge=1)
    max_cpu_loras: int = Field(64, ge=1)
    max_lora_rank: int = Field(256, ge=1)
    max_adapter_bytes: int = Field(4 << 30, ge=1 << 20)  # all of one adapter version's files; see AdapterStore
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=16)
    max_queue: int = Field(512, ge=1)
    kv_cache_tokens: int = Field(65536, ge=64)
    max_model_len: int | None = Field(None, ge=16)
    prefix_caching: bool = True  # reuse computed prompt prefixes per adapter version (server/engine/prefix_cache.py)
    jobs_dir: Path | None = None  # fine-tuning files and jobs; default $LORAPLEX_HOME/jobs (<store>/jobs on PostgreSQL)
    job_lease_seconds: float = Field(DEFAULT_LEASE_SECONDS, gt=0, le=3600)  # a dead replica's jobs move after this
    max_concurrent_jobs: int = Field(1, ge=1)
    max_queued_jobs: int = Field(DEFAULT_MAX_QUEUED_JOBS, ge=1)
    max_job_seconds: float = Field(DEFAULT_MAX_JOB_SECONDS, gt=0)
    reward_functions: dict[str, str] = Field(default_factory=dict)  # NAME -> "module:function", named by jobs

    max_request_bytes: int = Field(DEFAULT_MAX_REQUEST_BYTES, ge=1024)  # any HTTP body but an upload (413 above)
    max_upload_bytes: int = Field(DEFAULT_MAX_UPLOAD_BYTES, ge=1024)  # POST /v1/files
    drain_timeout: float = Field(30.0, ge=0.0, le=3600.0)  # seconds SIGTERM waits for in-flight requests, then aborts
    console: bool = True  # serve the web console at /console
    api_key: str | None = Field(None, repr=False)  # a single admin key (tenant '*'), besides those in the registry
    insecure_no_auth: bool = False  # serve without authentication, even on a non-loopback address
    audit_retention_days: float | None = Field(None, gt=0)  # None: keep every audit entry

    @field_validator("reward_functions")
    @classmethod
    def _rewards(cls, v):
        from loraplex.trainer.jobs import check_reward_functions

        return check_reward_functions(v)

    @field_validator("store")
    @classmethod
    def _store(cls, v):
        if is_s3_url(v):
            from loraplex.adapters_store import StoreError

            try:
                parse_s3_url(v)
            except StoreError as e:
                raise ValueError(str(e)) from None
            return v
        return None if v is None else Path(v)

    def store_dir(self) -> Path:
        """The store's local directory: the store itself, or an s3:// store's cache (which names its bucket,
        so a job process handed it opens the object store)."""
        if is_s3_url(self.store):
            return self.store_cache or default_cache_dir(self.store)
        return self.store or default_home() / "store"

    def jobs_root(self, store) -> tuple[bool, Path]:
        """(shared, folder) of the fine-tuning queue over `store` (an AdapterStore of this configuration).
        Replicas on PostgreSQL share the queue, whose uploads and checkpoints are files: in the shared
        store, or with an s3:// store in `--jobs-dir`, which every replica must mount. ValueError when that
        folder is not named."""
        from loraplex.adapters_store.registry import PostgresRegistry

        if not isinstance(store.registry, PostgresRegistry):
            return False, self.jobs_dir or ((default_home() if is_s3_url(self.store) else self.store_dir().parent) / "jobs")
        if is_s3_url(self.store):
            if self.jobs_dir is None:
                raise ValueError("--store s3:// with a PostgreSQL registry: fine-tuning jobs keep their uploads and "
                                 "checkpoints in files, so give --jobs-dir a folder every replica mounts at the same path")
            return True, self.jobs_dir
        if self.jobs_dir is not None:
            log.warning("--jobs-dir is not used with a PostgreSQL registry: jobs live in %s", self.store_dir() / "jobs")
        return True, self.store_dir() / "jobs"

    def open_store(self, **kw):
        """An `AdapterStore` on this configuration's store and registry."""
        from loraplex.adapters_store import AdapterStore

        if is_s3_url(self.store):
            return AdapterStore(self.store, cache_dir=self.store_dir(), registry=self.registry, **kw)
        return AdapterStore(self.store_dir(), registry=self.registry, **kw)


def build_state(cfg: ServeConfig, state: ServerState | None = None, telemetry=None) -> ServerState:
    """Loads everything; fills `state` in place (so an app built earlier sees it once ready)."""
    from loraplex.adapters_store import BaseModelSpec
    from loraplex.adapters_store.registry import REGISTRY_ENV, REPLICA_ID
    from loraplex.adapters_store.tenancy import AccessRegistry

    from .api.adapters_api import AdapterManager
    from .engine import Engine, EngineConfig
    from .engine.loading import load_base
    from .engine.model_runner import ModelRunner
    from .api.service import GenerationService

    from .api.routes_api import RouteGuards, RouteRoutes
    from .telemetry import Telemetry

    state = state or ServerState()
    gate = open_gate(cfg)  # before the model loads: a server that must not start fails fast
    base = load_base(cfg.model, dtype=cfg.dtype, device=cfg.device, model_id=cfg.served_model_name)
    spec = BaseModelSpec(model_id=base.model_id, fingerprint=base.fingerprint, module_shapes=base.module_shapes,
                         max_rank=cfg.max_lora_rank, dtype=str(base.model.dtype).removeprefix("torch."))
    from loraplex.adapters_store.hub import hub_cache_root, is_hub_id

    roots = cfg.allowed_adapter_roots
    if roots is not None and (cfg.hub_orgs or any(is_hub_id(p) for p in cfg.adapters.values())):
        roots = [*roots, hub_cache_root()]  # hub snapshots are symlinks into the hub cache's blobs
    if cfg.registry:  # job processes and other handles on this store open the same registry
        os.environ[REGISTRY_ENV] = cfg.registry
    store = cfg.open_store(base=spec, allowed_roots=roots, max_adapter_bytes=cfg.max_adapter_bytes)
    if store.objects is not None:  # blobs that deleted versions and killed registrations left behind
        threading.Thread(target=_sweep, args=(store,), name="loraplex-sweep", daemon=True).start()
    runner = ModelRunner(base.model, max_loras=cfg.max_loras, kv_budget_tokens=cfg.kv_cache_tokens, max_model_len=cfg.max_model_len,
                         owns_weights=True)
    ecfg = EngineConfig(
        max_loras=cfg.max_loras,
        max_cpu_loras=cfg.max_cpu_loras,
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        max_queue=cfg.max_queue,
        kv_cache_tokens=cfg.kv_cache_tokens,
        max_model_len=cfg.max_model_len,
        prefix_caching=cfg.prefix_caching,
    )
    telemetry = telemetry or Telemetry(base.model_id)
    engine = Engine(runner, base.tokenizer, ecfg, eos_token_ids=base.eos_token_ids, telemetry=telemetry)
    telemetry.engine, telemetry.store = engine, store
    engine.start()
    manager = AdapterManager(store, engine, hub_orgs=cfg.hub_orgs)
    for name, path in cfg.adapters.items():
        v = manager.register(name, path, {"source": str(path), "registered_by": "cli"}, "cli", operator=True)
        log.info("registered %s from %s", v.ref, path)
    for v in sorted(store.list(), key=lambda v: -v.created_at):  # warm what the store holds, newest first, up to the CPU tier
        if engine.pool.stats()["cpu_resident"] >= cfg.max_cpu_loras:
            break
        try:
            engine.pool.prefetch(v)
        except Exception as e:
            log.warning("could not preload %s: %s", v.ref, e)
    # the event log position first: a change made while we look at the routes is then replayed by the poller
    state._seq = store.last_event_seq()
    guards = RouteGuards(store, telemetry)
    guards.sync_all()  # guarded routes set while the server was down (CLI, trainer jobs) are watched from the start
    state.routes = RouteRoutes(store, engine, telemetry, guards)  # before the store: the poller needs both
    gate.registry.store.close()
    gate.registry = AccessRegistry(store, audit_retention_days=cfg.audit_retention_days)
    gate.limiter.start_sharing(lambda: gate.registry, REPLICA_ID)  # tenants' rate limits hold across replicas
    state.gate = gate
    state.store, state.engine, state.manager, state.telemetry = store, engine, manager, telemetry
    state.extra["base"] = base
    state.extra["config"] = cfg
    from loraplex.trainer.jobs import JobManager

    shared, jobs_root = cfg.jobs_root(store)
    state.jobs = JobManager(jobs_root, cfg.store_dir(), str(base.path), base.model_id,
                            registry=store.registry if shared else None, lease_seconds=cfg.job_lease_seconds,
                            max_concurrent=cfg.max_concurrent_jobs, max_queued=cfg.max_queued_jobs, max_job_seconds=cfg.max_job_seconds,
                            max_upload_bytes=cfg.max_upload_bytes, reward_functions=cfg.reward_functions)
    from .api.auth_api import job_admission

    state.jobs.may_start = job_admission(gate.registry)
    state.service = GenerationService(engine, store, base, telemetry=telemetry)
    return state


def _sweep(store) -> None:
    try:
        store.sweep_objects()
    except Exception as e:  # the next start sweeps again; serving does not depend on it
        log.warning("could not sweep %s: %s", store.objects.url, e)


def open_gate(cfg: ServeConfig):
    """The server's auth.Gate over the store's registry; ValueError when `cfg` would serve a
    non-loopback address without keys (auth.bind_refusal says why and what to do)."""
    from loraplex.adapters_store.tenancy import AccessRegistry

    from .api.auth import Gate, bind_refusal, is_loopback

    registry = AccessRegistry(cfg.open_store(), audit_retention_days=cfg.audit_retention_days)
    try:
        cfg.jobs_root(registry.store)  # a replicated queue without a shared folder is refused here, before loading
    except ValueError:
        registry.store.close()
        raise
    refusal = bind_refusal(cfg.host, has_keys=registry.has_keys(), api_key=cfg.api_key,
                           insecure_no_auth=cfg.insecure_no_auth)
    if refusal:
        registry.store.close()
        raise ValueError(refusal)
    return Gate(registry, api_key=cfg.api_key, open_when_keyless=is_loopback(cfg.host), no_auth=cfg.insecure_no_auth)
