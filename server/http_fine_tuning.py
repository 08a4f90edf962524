"""OpenAI-compatible files and fine-tuning endpoints, backed by the trainer's JobManager.

Shapes follow what the official `openai` client parses (`FileObject`,
`FineTuningJob`, `FineTuningJobEvent`, `FineTuningJobCheckpoint`). Our
extensions ride in the same body: `canary` (percent of traffic for the new
version) and `loraplex` (any job-config overrides such as
`{"adapter": {"r": 8}, "sequence_len": 512}`), which the client sends through
`extra_body`.
"""
from __future__ import annotations

import asyncio
import json

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request as HttpRequest
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Route

from . import auth
from .auth_api import check_file_quota, check_job_overrides, check_job_quota
from .errors import ApiError, BadRequest
from .openai_api import parse_body


class JobBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(None, max_length=40)
    seed: int | None = None
    method: dict | None = None
    hyperparameters: dict | None = None
    metadata: dict | None = None
    integrations: list | None = None
    canary: int | None = Field(None, ge=1, le=99)
    loraplex: dict | None = None


class FineTuningRoutes:
    def __init__(self, manager):
        self.m = manager

    async def _call(self, fn, *a, **kw):
        return await asyncio.to_thread(fn, *a, **kw)  # a JobError is a LoraplexError: the edge answers it as it is

    async def upload(self, request: HttpRequest):
        form = await request.form()
        f = form.get("file")
        purpose = form.get("purpose")
        if f is None or not hasattr(f, "read"):
            raise BadRequest("multipart field 'file' is required", param="file")
        if not purpose:
            raise BadRequest("multipart field 'purpose' is required", param="purpose")
        data = await f.read()
        await asyncio.to_thread(check_file_quota, self.m, len(data))
        out = await self._call(self.m.add_file, f.filename or "upload.jsonl", data, str(purpose))
        await asyncio.to_thread(auth.claim, "file", out["id"])
        return JSONResponse(out)

    async def list_files(self, request: HttpRequest):
        q = request.query_params
        order = q.get("order", "desc")
        if order not in ("asc", "desc"):
            raise BadRequest("'order' must be 'asc' or 'desc'", param="order")
        limit = _limit(request, default=10000, most=10000)
        mine = await asyncio.to_thread(auth.owned_filter, "file")
        every, _ = await self._call(self.m.list_files, purpose=q.get("purpose"), limit=1 << 30, order=order)
        data = [f for f in every if mine(f["id"])]
        after = q.get("after")
        if after is not None:
            ids = [f["id"] for f in data]
            data = data[ids.index(after) + 1:] if after in ids else []
        data, more = data[:limit], len(data) > limit
        return JSONResponse({"object": "list", "data": data, "has_more": more,
                             "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})

    async def _own_file(self, request: HttpRequest) -> str:
        fid = request.path_params["file_id"]
        await asyncio.to_thread(auth.check_owner, "file", fid, f"no file {fid!r}", "file_id")
        return fid

    async def _own_job(self, request: HttpRequest) -> str:
        jid = request.path_params["job_id"]
        await asyncio.to_thread(auth.check_owner, "job", jid, f"no fine-tuning job {jid!r}", "fine_tuning_job_id")
        return jid

    async def get_file(self, request: HttpRequest):
        await self._own_file(request)
        return JSONResponse(await self._call(self.m.file, request.path_params["file_id"]))

    async def delete_file(self, request: HttpRequest):
        await self._own_file(request)
        return JSONResponse(await self._call(self.m.delete_file, request.path_params["file_id"]))

    async def file_content(self, request: HttpRequest):
        await self._own_file(request)
        path = await self._call(self.m.file_path, request.path_params["file_id"])
        return FileResponse(path, media_type="text/csv" if path.suffix == ".csv" else "application/jsonl")

    async def create_job(self, request: HttpRequest):
        body: JobBody = await parse_body(request, JobBody)
        method = body.method or {"type": "supervised", "supervised": {"hyperparameters": body.hyperparameters or {}}}
        if method.get("type") not in ("supervised", "dpo", "reinforcement"):
            raise BadRequest(f"method type {method.get('type')!r} is not supported; use 'supervised', 'dpo' or "
                             "'reinforcement'", param="method.type")
        overrides = dict(body.loraplex or {})
        if body.canary is not None:
            overrides["canary"] = body.canary
        tenant = auth.identity().tenant
        for param, fid in (("training_file", body.training_file), ("validation_file", body.validation_file)):
            if fid:
                await asyncio.to_thread(auth.check_owner, "file", fid, f"no file {fid!r}", "file_id")
        overrides = await asyncio.to_thread(check_job_overrides, overrides)
        await asyncio.to_thread(check_job_quota, self.m)
        job = await self._call(self.m.create_job, model=body.model, training_file=body.training_file, validation_file=body.validation_file,
                               suffix=body.suffix, seed=body.seed, method=method, hyperparameters=body.hyperparameters or {},
                               overrides=overrides, metadata=body.metadata, tenant=tenant)
        await asyncio.to_thread(auth.claim, "job", job["id"])
        return JSONResponse(job)

    async def list_jobs(self, request: HttpRequest):
        limit = _limit(request)
        mine = await asyncio.to_thread(auth.owned_filter, "job")
        every, _ = await self._call(self.m.jobs, None, 1 << 30)
        data = [j for j in every if mine(j["id"])]
        after = request.query_params.get("after")
        if after is not None:
            ids = [j["id"] for j in data]
            data = data[ids.index(after) + 1:] if after in ids else []
        data, more = data[:limit], len(data) > limit
        return JSONResponse({"object": "list", "data": data, "has_more": more})

    async def get_job(self, request: HttpRequest):
        return JSONResponse(await self._call(self.m.job, await self._own_job(request)))

    async def cancel(self, request: HttpRequest):
        return JSONResponse(await self._call(self.m.cancel, await self._own_job(request)))

    async def pause(self, request: HttpRequest):
        return JSONResponse(await self._call(self.m.pause, request.path_params["job_id"]))

    async def resume(self, request: HttpRequest):
        return JSONResponse(await self._call(self.m.resume, request.path_params["job_id"]))

    async def events(self, request: HttpRequest):
        data, more = await self._call(self.m.events, await self._own_job(request), request.query_params.get("after"), _limit(request))
        return JSONResponse({"object": "list", "data": data, "has_more": more})

    async def checkpoints(self, request: HttpRequest):
        data = await self._call(self.m.checkpoints, await self._own_job(request))
        limit = _limit(request)
        return JSONResponse({"object": "list", "data": data[:limit], "has_more": len(data) > limit,
                             "first_id": data[0]["id"] if data else None, "last_id": data[min(limit, len(data)) - 1]["id"] if data else None})


def _limit(request: HttpRequest, default: int = 20, most: int = 100) -> int:
    v = request.query_params.get("limit", str(default))
    if not v.isdigit() or not 1 <= int(v) <= most:
        raise BadRequest(f"'limit' must be an integer from 1 to {most}", param="limit")
    return int(v)


def fine_tuning_routes(manager) -> list[Route]:
    """The files and fine-tuning endpoints over `manager` (a trainer JobManager), ready to mount.

    Each handler answers its own errors (`ApiError.body()` with its status; a
    bare 500 for anything unexpected, logged, never a stack trace), so the
    routes work in any Starlette app, with or without the server's wrapper.
    """
    import logging

    r = FineTuningRoutes(manager)
    log = logging.getLogger("loraplex.fine_tuning")

    def answer(fn):
        async def endpoint(request: HttpRequest):
            try:
                with auth.unguarded():
                    return await fn(request)
            except ApiError as e:
                return JSONResponse(e.body(), status_code=e.http_status)
            except Exception:
                log.exception("internal error on %s %s", request.method, request.url.path)
                return JSONResponse({"error": {"message": "internal server error", "type": "server_error", "param": None, "code": None}},
                                    status_code=500)

        return endpoint

    return [
        Route("/v1/files", answer(r.upload), methods=["POST"]),
        Route("/v1/files", answer(r.list_files), methods=["GET"]),
        Route("/v1/files/{file_id}", answer(r.get_file), methods=["GET"]),
        Route("/v1/files/{file_id}", answer(r.delete_file), methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", answer(r.file_content), methods=["GET"]),
        Route("/v1/fine_tuning/jobs", answer(r.create_job), methods=["POST"]),
        Route("/v1/fine_tuning/jobs", answer(r.list_jobs), methods=["GET"]),
        Route("/v1/fine_tuning/jobs/{job_id}", answer(r.get_job), methods=["GET"]),
        Route("/v1/fine_tuning/jobs/{job_id}/cancel", answer(r.cancel), methods=["POST"]),
        Route("/v1/fine_tuning/jobs/{job_id}/pause", answer(r.pause), methods=["POST"]),
        Route("/v1/fine_tuning/jobs/{job_id}/resume", answer(r.resume), methods=["POST"]),
        Route("/v1/fine_tuning/jobs/{job_id}/events", answer(r.events), methods=["GET"]),
        Route("/v1/fine_tuning/jobs/{job_id}/checkpoints", answer(r.checkpoints), methods=["GET"]),
    ]
