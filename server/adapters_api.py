"""Adapter management over HTTP: our /v1/adapters API and vLLM's load/unload endpoints.

Registering validates the adapter against the running base model, copies it
into the store as a new immutable version and loads it into the CPU tier
before answering, so the first request to it does not pay the load.
Deleting drains: new requests get 404 at once, requests already admitted
finish on the version they were pinned to, and its memory is released
after the last one.
"""
from __future__ import annotations

import asyncio

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse

from .caller import caller_of
from .errors import BadRequest, NotFound
from .openai_api import parse_body
from pydantic import BaseModel, ConfigDict, Field


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
        "path": str(v.path),
        "sha256": v.sha256,
        "kind": getattr(m, "kind", "lora"),
        "r": m.r,
        "lora_alpha": m.lora_alpha,
        "use_rslora": m.use_rslora,
        "target_modules": sorted({k.rsplit(".", 1)[-1] for k in m.module_ranks}),
        "base_fingerprint": v.base_fingerprint,
        "lineage": v.lineage,
    }
    if engine is not None:
        d["in_flight"] = engine.pool.pinned(v.ref)
        d["resident_slot"] = engine.pool.slot_of(v.ref)
    return d


class AdapterManager:
    """Store + engine together: registration with warm-up, deletion with drain."""

    def __init__(self, store, engine):
        self.store = store
        self.engine = engine

    def register(self, name: str, path: str, lineage: dict | None, caller: str):
        v = self.store.register(name, path, lineage=lineage, caller=caller)
        self.engine.pool.prefetch(v)  # warm before it takes traffic
        return v

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
            except Exception:
                pass
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
        v = await asyncio.to_thread(self.m.register, body.name, body.path, body.lineage, self._caller(request))
        return JSONResponse(version_json(v, self.m.engine), status_code=201)

    async def list(self, request: HttpRequest):
        versions = self.m.store.list()
        return JSONResponse({"object": "list", "data": [version_json(v, self.m.engine) for v in versions]})

    async def get(self, request: HttpRequest):
        name = request.path_params["name"]
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
        name = request.path_params["name"]
        ver = request.query_params.get("version")
        if ver is not None and not ver.isdigit():
            raise BadRequest("query parameter 'version' must be an integer", param="version")
        removed = await asyncio.to_thread(self.m.delete, name, int(ver) if ver else None, self._caller(request))
        return JSONResponse({"deleted": [v.ref for v in removed], "draining": [v.ref for v in removed if self.m.engine.in_use(v.ref)]})

    async def vllm_load(self, request: HttpRequest):
        body = await parse_body(request, VllmLoadBody)
        v = await asyncio.to_thread(self.m.register, body.lora_name, body.lora_path, None, self._caller(request))
        return JSONResponse({"message": f"Success: LoRA adapter '{body.lora_name}' added successfully.", "name": v.name, "version": v.version}, status_code=200)

    async def vllm_unload(self, request: HttpRequest):
        body = await parse_body(request, VllmUnloadBody)
        await asyncio.to_thread(self.m.delete, body.lora_name, None, self._caller(request))
        return JSONResponse({"message": f"Success: LoRA adapter '{body.lora_name}' removed successfully."})
