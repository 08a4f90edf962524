"""OpenAI-compatible files and fine-tuning endpoints, backed by the trainer's JobManager.

Shapes follow what the official `openai` client parses (`FileObject`,
`FineTuningJob`, `FineTuningJobEvent`, `FineTuningJobCheckpoint`). Our
extension rides in the same body: `loraplex`, an allow-list of training knobs
(`{"adapter": {"r": 8}, "sequence_len": 512}`, see `trainer/job_request.py`),
which the client sends through `extra_body`. The JobManager parses the body:
this module only moves bytes.

Uploads never sit in memory: the multipart body is parsed as it streams in
(python-multipart's push parser, on a worker thread so the event loop only
forwards chunks) and the file part goes straight into the JobManager's
`Upload`, which counts it against the server's limit and checks it line by
line; the request ends with 413 or 400 at the first byte or line that is too
much, without reading the rest.
"""

from __future__ import annotations

import asyncio

from pydantic import RootModel
from python_multipart.multipart import MultipartParser, parse_options_header
from python_multipart.exceptions import MultipartParseError
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Route

from . import auth
from .auth_api import check_file_quota, check_job_overrides, check_job_quota
from .errors import ApiError, BadRequest, PayloadTooLarge
from .openai_api import parse_body

MULTIPART_SLACK = 64 << 10  # bytes of a multipart body beyond the file itself: boundaries, part headers, `purpose`
CHUNK = 1 << 20  # bytes handed to the parser thread at a time


class _MultipartUpload:
    """The push-parser state of one `POST /v1/files` body: `purpose` (small) and `file` (streamed to an Upload)."""

    def __init__(self, manager, boundary: bytes):
        self.m = manager
        self.upload = None
        self.purpose: str | None = None
        self._headers: dict[bytes, bytes] = {}
        self._field = self._value = b""
        self._part: str | None = None  # "file", "purpose" or None (ignored)
        self._purpose_bytes = bytearray()
        self.ended = False
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_header_field": self._hfield,
                "on_header_value": self._hvalue,
                "on_header_end": self._hend,
                "on_headers_finished": self._headers_done,
                "on_part_data": self._data,
                "on_end": self._end,
            },
        )

    def _begin(self):
        self._headers, self._part = {}, None

    def _hfield(self, data, start, end):
        self._field += data[start:end]

    def _hvalue(self, data, start, end):
        self._value += data[start:end]

    def _hend(self):
        self._headers[self._field.strip().lower()] = self._value.strip()
        self._field = self._value = b""

    def _headers_done(self):
        _, opts = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = opts.get(b"name", b"")
        if name == b"file":
            if self.upload is not None:
                raise BadRequest("multipart field 'file' given twice", param="file")
            if b"filename" not in opts:
                raise BadRequest("multipart field 'file' must be a file (with a filename)", param="file")
            try:
                filename = opts[b"filename"].decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest("the file name is not valid UTF-8", param="file") from None
            self.upload = self.m.upload(filename, self.purpose)
            self._part = "file"
        elif name == b"purpose":
            self._part = "purpose"

    def _data(self, data, start, end):
        if self._part == "file":
            self.upload.write(data[start:end])
        elif self._part == "purpose":
            self._purpose_bytes += data[start:end]
            if len(self._purpose_bytes) > 64:
                raise BadRequest("multipart field 'purpose' is too long", param="purpose")
            try:
                self.purpose = self._purpose_bytes.decode("utf-8")
            except UnicodeDecodeError:
                self.purpose = None  # a character split across chunks; decoded at the next one

    def _end(self):
        self.ended = True

    def feed(self, data: bytes) -> None:
        try:
            self.parser.write(data)
        except MultipartParseError as e:
            raise BadRequest(f"malformed multipart body: {e}") from None

    def finish(self) -> dict:
        if not self.ended:
            raise BadRequest("the multipart body ended early (no closing boundary)")
        if self.upload is None:
            raise BadRequest("multipart field 'file' is required", param="file")
        if not self.purpose:
            raise BadRequest("multipart field 'purpose' is required", param="purpose")
        return self.upload.finish(self.purpose)

    def abort(self) -> None:
        if self.upload is not None:
            self.upload.abort()


class FineTuningRoutes:
    def __init__(self, manager):
        self.m = manager

    async def _call(self, fn, *a, **kw):
        return await asyncio.to_thread(fn, *a, **kw)  # a JobError is a LoraplexError: the edge answers it as it is

    async def upload(self, request: HttpRequest):
        ctype, opts = parse_options_header(request.headers.get("content-type", ""))
        if ctype != b"multipart/form-data":
            raise BadRequest("upload files as multipart/form-data with fields 'file' and 'purpose'")
        boundary = opts.get(b"boundary")
        if not boundary or len(boundary) > 200:
            raise BadRequest("the multipart/form-data content type has no (or an overlong) boundary")
        limit = self.m.max_upload_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit + MULTIPART_SLACK:  # refused before a byte of it is read
            raise PayloadTooLarge(
                f"the upload is {int(declared)} bytes; this server's limit is {limit} bytes (--max-upload-bytes)",
                param="file",
                code="file_too_large",
            )
        body = _MultipartUpload(self.m, boundary)
        received, buf = 0, bytearray()
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit + MULTIPART_SLACK:  # a body without (or lying in) its Content-Length
                    raise PayloadTooLarge(
                        f"the upload is larger than this server's limit of {limit} bytes (--max-upload-bytes)",
                        param="file",
                        code="file_too_large",
                    )
                buf += chunk
                if len(buf) >= CHUNK:
                    await self._call(body.feed, bytes(buf))
                    buf.clear()
            if buf:
                await self._call(body.feed, bytes(buf))
            if body.upload is not None:  # the tenant's storage quota, now that the size is known (before it is kept)
                await asyncio.to_thread(check_file_quota, self.m, body.upload.size)
            out = await self._call(body.finish)
            await asyncio.to_thread(auth.claim, "file", out["id"])
            return JSONResponse(out)
        except ClientDisconnect:
            await asyncio.to_thread(body.abort)
            raise BadRequest("the client disconnected before the upload ended") from None
        except BaseException:
            await asyncio.to_thread(body.abort)
            raise

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
            data = data[ids.index(after) + 1 :] if after in ids else []
        data, more = data[:limit], len(data) > limit
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "has_more": more,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )

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
        body = await parse_body(request, RootModel[dict])
        raw = dict(body.root)
        if isinstance(raw.get("loraplex"), dict):
            # tenancy first: a tenant's key outside what tenants may set is 403, its adapter.init_from resolves to its
            # own (or a shared) adapter's stored name, else 404
            raw["loraplex"] = await asyncio.to_thread(check_job_overrides, raw["loraplex"])
        # then the allow-list (trainer/job_request.py), for every caller: what no request may set is 400
        req = self.m.parse_request(raw)
        tenant = auth.identity().tenant
        for param, fid in (("training_file", req.training_file), ("validation_file", req.validation_file)):
            if fid:
                await asyncio.to_thread(auth.check_owner, "file", fid, f"no file {fid!r}", param)
        await asyncio.to_thread(check_job_quota, self.m)
        job = await self._call(self.m.create_job, req, tenant=tenant)
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
        return JSONResponse(await self._call(self.m.pause, await self._own_job(request)))

    async def resume(self, request: HttpRequest):
        return JSONResponse(await self._call(self.m.resume, await self._own_job(request)))

    async def events(self, request: HttpRequest):
        # a job logs one metrics event per step: a page may hold a long run's worth
        limit = _limit(request, most=1000)
        jid = await self._own_job(request)
        data, more = await self._call(self.m.events, jid, request.query_params.get("after"), limit)
        return JSONResponse({"object": "list", "data": data, "has_more": more})

    async def checkpoints(self, request: HttpRequest):
        data = await self._call(self.m.checkpoints, await self._own_job(request))
        limit = _limit(request)
        return JSONResponse(
            {
                "object": "list",
                "data": data[:limit],
                "has_more": len(data) > limit,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[min(limit, len(data)) - 1]["id"] if data else None,
            }
        )


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
                return JSONResponse(
                    {
                        "error": {
                            "message": "internal server error",
                            "type": "server_error",
                            "param": None,
                            "code": None,
                        }
                    },
                    status_code=500,
                )

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
