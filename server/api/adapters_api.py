"""Adapter management over HTTP: our /v1/adapters API and vLLM's load/unload endpoints.

Registering validates the adapter against the running base model, copies it
into the store as a new immutable version and loads it into the CPU tier
before answering, so the first request to it does not pay the load.
Deleting drains: new requests get 404 at once, requests already admitted
finish on the version they were pinned to, and its memory is released
after the last one.

Registrations copy and hash files, which can take long on a slow disk: they
run on their own small executor (`REGISTER_WORKERS` threads, at most
`REGISTER_PENDING` waiting, then 429), never on the event loop's shared
thread pool, so route changes, health checks and completions never queue
behind a copy.

What clients see of a version names no server path: no `path` field, and
lineage strings with absolute paths reduced to their last component.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse

from loraplex.adapters_store import StoreError
from loraplex.adapters_store.errors import StoreBusy
from loraplex.adapters_store.refs import parse_version
from loraplex.adapters_store.store import client_lineage

from . import auth
from .caller import caller_of
from .errors import NotFound
from .openai_api import parse_body

log = logging.getLogger("loraplex.adapters")
REGISTER_WORKERS = 2  # registrations copying files at once
REGISTER_PENDING = 8  # registrations waiting for a worker before new ones get 429


class RegisterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    path: str = Field(min_length=1)
    lineage: dict | None = None


class VllmLoadBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class VllmUnloadBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1)


def version_json(v, engine=None) -> dict:
    m = v.manifest
    d = {
        "name": v.name,
        "version": v.version,
        "id": v.ref,
        "created_at": v.created_at,
        "sha256": v.sha256,
        "kind": getattr(m, "kind", "lora"),
        "r": m.r,
        "lora_alpha": m.lora_alpha,
        "use_rslora": m.use_rslora,
        "target_modules": sorted({k.rsplit(".", 1)[-1] for k in m.module_ranks}),
        "base_fingerprint": v.base_fingerprint,
        "lineage": client_lineage(v.lineage),
    }
    if engine is not None:
        d["in_flight"] = engine.pool.pinned(v.ref)
        d["resident_slot"] = engine.pool.slot_of(v.ref)
    return d


class AdapterManager:
    """Store + engine together: registration with warm-up, deletion with drain."""

    def __init__(self, store, engine, hub_orgs: list[str] | None = None):
        self.store = store
        self.engine = engine
        self.hub_orgs = hub_orgs  # orgs whose hub adapters may be registered over the API (adapters_store.hub)
        self._registrations = ThreadPoolExecutor(REGISTER_WORKERS, thread_name_prefix="loraplex-register")
        self._admitted = threading.BoundedSemaphore(REGISTER_WORKERS + REGISTER_PENDING)

    def register(self, name: str, path: str, lineage: dict | None, caller: str, *, operator: bool = False):
        from loraplex.adapters_store.hub import adapter_source

        path, source = adapter_source(path, self.hub_orgs, operator=operator)  # a hub id -> its snapshot directory
        if source:
            lineage = {**(lineage or {}), **source}
        v = self.store.register(name, path, lineage=auth.stamp_lineage(lineage), caller=caller)
        try:
            self.engine.pool.prefetch(v)  # warm before it takes traffic
        except StoreError:
            # the store's checks and the engine's disagree (they should not): never keep a version the
            # engine refuses to serve
            self.store.delete(v.name, v.version, caller=caller)
            raise
        return v

    async def register_async(self, name: str, path: str, lineage: dict | None, caller: str):
        """`register` on the registration executor; StoreBusy (429) when too many are running or waiting."""
        if not self._admitted.acquire(blocking=False):
            raise StoreBusy(f"{REGISTER_WORKERS + REGISTER_PENDING} adapter registrations are in progress or "
                            "waiting; retry later")
        # released when the work ends, not when the caller stops waiting: a client that disconnects does not
        # free a place while its copy still runs
        try:
            # in the caller's context: the registration records who asked (auth.stamp_lineage)
            work = self._registrations.submit(contextvars.copy_context().run, self.register, name, path, lineage, caller)
        except RuntimeError:  # shut down
            self._admitted.release()
            raise
        work.add_done_callback(lambda _: self._admitted.release())
        return await asyncio.wrap_future(work)

    def close(self) -> None:
        self._registrations.shutdown(wait=False, cancel_futures=True)

    def delete(self, name: str, version: int | None, caller: str):
        removed = self.store.delete(name, version, caller=caller)
        for v in removed:
            self.engine.call(lambda ref=v.ref: self.engine.pool.mark_deleted(ref))
        return removed

    def on_store_event(self, ev) -> None:
        """Registrations and deletions made by other processes (the trainer), seen by polling."""
        if ev.kind == "registered":
            try:
                self.engine.pool.prefetch(self.store.get(ev.name, ev.version))
            except Exception as e:  # served from disk on first use instead; a bad one fails its requests (422)
                log.warning("could not preload %s@%s: %s", ev.name, ev.version, e)
        elif ev.kind == "deleted":
            ref = f"{ev.name}@{ev.version}"
            self.engine.call(lambda: self.engine.pool.mark_deleted(ref))


class AdapterRoutes:
    def __init__(self, manager: AdapterManager):
        self.m = manager

    def _caller(self, request: HttpRequest) -> str:
        return caller_of(request)

    async def register(self, request: HttpRequest):
        body = await parse_body(request, RegisterBody)
        auth.check_path_registration(self.m.store, body.path)
        v = await self.m.register_async(auth.own(body.name), body.path, body.lineage, self._caller(request))
        return JSONResponse(version_json(v, self.m.engine), status_code=201)

    async def list(self, request: HttpRequest):
        versions = [v for v in self.m.store.list() if auth.manages(v.name)]
        return JSONResponse({"object": "list", "data": [version_json(v, self.m.engine) for v in versions]})

    async def get(self, request: HttpRequest):
        name = auth.own(request.path_params["name"])
        versions = self.m.store.versions(name)
        if not versions:
            raise NotFound(f"adapter {name!r} does not exist", param="name")
        route = self.m.store.get_route(name)
        return JSONResponse(
            {
                "name": name,
                "latest": versions[-1].version,
                "versions": [version_json(v, self.m.engine) for v in versions],
                "route": None if route is None else {"versions": {str(k): w for k, w in route.versions.items()}, "sticky": route.sticky},
            }
        )

    async def delete(self, request: HttpRequest):
        name = auth.own(request.path_params["name"])
        ver = request.query_params.get("version")
        version = None if ver is None else parse_version(ver, param="version", what="query parameter 'version'")
        removed = await asyncio.to_thread(self.m.delete, name, version, self._caller(request))
        return JSONResponse({"deleted": [v.ref for v in removed], "draining": [v.ref for v in removed if self.m.engine.in_use(v.ref)]})

    async def vllm_load(self, request: HttpRequest):
        body = await parse_body(request, VllmLoadBody)
        auth.check_path_registration(self.m.store, body.lora_path)
        v = await self.m.register_async(auth.own(body.lora_name), body.lora_path, None, self._caller(request))
        return JSONResponse({"message": f"Success: LoRA adapter '{body.lora_name}' added successfully.", "name": v.name, "version": v.version}, status_code=200)

    async def vllm_unload(self, request: HttpRequest):
        body = await parse_body(request, VllmUnloadBody)
        await asyncio.to_thread(self.m.delete, auth.own(body.lora_name), None, self._caller(request))
        return JSONResponse({"message": f"Success: LoRA adapter '{body.lora_name}' removed successfully."})
