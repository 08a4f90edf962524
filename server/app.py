"""Process wiring: the Starlette app, its routes, error mapping, readiness and store polling.

`ServerState` is filled in once the base model is loaded (in a background
thread, so `/health` can answer 503 meanwhile); every other route answers
503 until then.
"""
from __future__ import annotations

import asyncio
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse
from starlette.routing import Route

from loraplex.trainer.jobs import DEFAULT_MAX_UPLOAD_BYTES as JOBS_MAX_UPLOAD_BYTES

from .api.adapters_api import AdapterManager, AdapterRoutes
from .api.errors import LoraplexError, NotFound, PayloadTooLarge, Unavailable, internal

log = logging.getLogger("loraplex.server")


@dataclass
class ServerState:
    service: object | None = None  # GenerationService
    manager: AdapterManager | None = None
    store: object | None = None
    engine: object | None = None
    telemetry: object | None = None
    routes: object | None = None  # RouteRoutes
    jobs: object | None = None  # trainer JobManager
    gate: object | None = None  # auth.Gate: keys, scopes, tenants, quotas, audit
    error: str | None = None
    draining: bool = False
    extra: dict = field(default_factory=dict)
    _seq: int = 0

    @property
    def ready(self) -> bool:
        return self.service is not None and not self.draining and self.failure is None

    @property
    def failure(self) -> str | None:
        """Why this server cannot serve any more (its engine thread ended), None while it can."""
        return None if self.engine is None else self.engine.failure


def _error_response(err: LoraplexError) -> JSONResponse:
    from .api.quotas import QuotaExceeded

    headers = {"Retry-After": str(err.retry_after)} if isinstance(err, QuotaExceeded) and err.retry_after else None
    return JSONResponse(err.body(), status_code=err.http_status, headers=headers)


DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20  # any body but an upload: a context's worth of text or token ids, many times
DEFAULT_MAX_UPLOAD_BYTES = JOBS_MAX_UPLOAD_BYTES  # POST /v1/files: the fine-tuning routes' own limit, stated there
UPLOAD_PATHS = ("/v1/files", "/v1/console/datasets/preview")  # the console checks a dataset before uploading it
ADAPTER_UPLOAD_RE = re.compile(r"/v1/adapters/[^/]+/versions")  # an adapter's files, uploaded (auth_api.py)


class BodyLimit:
    """ASGI middleware: a request body larger than the limit is refused with 413 naming the limit.

    A declared Content-Length over the limit is answered before the body is
    read; a chunked or lying body is counted as it arrives and cut off at the
    limit (the handler reading it gets `PayloadTooLarge`, which the edge
    answers). Uploads have their own, larger limit.
    """

    def __init__(self, app, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES):
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.max_upload_bytes = max_upload_bytes

    def _error(self, limit: int, flag: str) -> PayloadTooLarge:
        return PayloadTooLarge(f"the request body is larger than the limit of {limit} bytes (server flag {flag})",
                               code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        upload = scope["path"] in UPLOAD_PATHS or ADAPTER_UPLOAD_RE.fullmatch(scope["path"]) is not None
        limit = self.max_upload_bytes if upload else self.max_request_bytes
        flag = "--max-upload-bytes" if upload else "--max-request-bytes"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            err = self._error(limit, flag) if declared.isdigit() else LoraplexError("malformed Content-Length header")
            return await _error_response(err)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise self._error(limit, flag)
            return msg

        await self.app(scope, counted, send)


def build_app(state: ServerState, *, extra_routes: list[Route] | None = None, poll_interval: float = 1.0,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
              console: bool = True) -> Starlette:
    def need(attr):
        def get():
            obj = getattr(state, attr)
            if obj is None or not state.ready:
                raise Unavailable(state.failure or state.error or
                                  ("the server is shutting down" if state.draining else "the model is still loading"))
            return obj

        return get

    service, manager = need("service"), need("manager")
    route_routes = need("routes")

    def wrap(fn_getter):
        async def endpoint(request: HttpRequest):
            try:
                return await fn_getter()(request)
            except LoraplexError as e:
                if state.telemetry is not None and 400 <= e.http_status < 500:
                    state.telemetry.request_rejected("http", e.http_status, e.error_type)
                return _error_response(e)
            except Exception:
                log.exception("internal error on %s %s", request.method, request.url.path)
                return _error_response(internal())

        return endpoint

    from .api.openai_api import OpenAIRoutes

    def oa():
        return OpenAIRoutes(service())

    def tk():
        from .api.tokenizer_api import TokenizerRoutes

        return TokenizerRoutes(service())

    def ad():
        return AdapterRoutes(manager())

    async def metrics(request: HttpRequest):
        from starlette.responses import Response

        tel = state.telemetry
        if tel is None:
            return Response("# loading\n", media_type="text/plain; version=0.0.4")
        body = await asyncio.to_thread(tel.render)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    def rr():
        return route_routes()

    jobs = need("jobs")

    def ft():
        from .api.http_fine_tuning import FineTuningRoutes

        return FineTuningRoutes(jobs())

    async def health(request: HttpRequest):
        if state.ready:
            return JSONResponse({"status": "ok"})
        failure = state.failure or state.error
        status = "error" if failure else ("draining" if state.draining else "loading")
        return JSONResponse({"status": status, "detail": failure}, status_code=503)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", wrap(lambda: oa().models), methods=["GET"]),
        Route("/v1/models/{model_id:path}", wrap(lambda: oa().model), methods=["GET"]),
        Route("/tokenize", wrap(lambda: tk().tokenize), methods=["POST"]),
        Route("/detokenize", wrap(lambda: tk().detokenize), methods=["POST"]),
        Route("/tokenizer_info", wrap(lambda: tk().tokenizer_info), methods=["GET"]),
        Route("/v1/chat/completions", wrap(lambda: oa().chat), methods=["POST"]),
        Route("/v1/completions", wrap(lambda: oa().completions), methods=["POST"]),
        Route("/v1/rewards", wrap(lambda: oa().rewards), methods=["POST"]),
        Route("/v1/adapters", wrap(lambda: ad().register), methods=["POST"]),
        Route("/v1/adapters", wrap(lambda: ad().list), methods=["GET"]),
        Route("/v1/adapters/{name}", wrap(lambda: ad().get), methods=["GET"]),
        Route("/v1/adapters/{name}", wrap(lambda: ad().delete), methods=["DELETE"]),
        Route("/v1/load_lora_adapter", wrap(lambda: ad().vllm_load), methods=["POST"]),
        Route("/v1/unload_lora_adapter", wrap(lambda: ad().vllm_unload), methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/routes", wrap(lambda: rr().list), methods=["GET"]),
        Route("/v1/routes/{name}", wrap(lambda: rr().put), methods=["PUT"]),
        Route("/v1/routes/{name}", wrap(lambda: rr().get), methods=["GET"]),
        Route("/v1/routes/{name}/promote", wrap(lambda: rr().promote), methods=["POST"]),
        Route("/v1/routes/{name}/rollback", wrap(lambda: rr().rollback), methods=["POST"]),
        Route("/v1/routes/{name}/history", wrap(lambda: rr().history), methods=["GET"]),
        Route("/v1/routes/{name}/compare", wrap(lambda: rr().compare), methods=["GET"]),
        Route("/v1/files", wrap(lambda: ft().upload), methods=["POST"]),
        Route("/v1/files", wrap(lambda: ft().list_files), methods=["GET"]),
        Route("/v1/files/{file_id}", wrap(lambda: ft().get_file), methods=["GET"]),
        Route("/v1/files/{file_id}", wrap(lambda: ft().delete_file), methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", wrap(lambda: ft().file_content), methods=["GET"]),
        Route("/v1/fine_tuning/jobs", wrap(lambda: ft().create_job), methods=["POST"]),
        Route("/v1/fine_tuning/jobs", wrap(lambda: ft().list_jobs), methods=["GET"]),
        Route("/v1/fine_tuning/jobs/{job_id}", wrap(lambda: ft().get_job), methods=["GET"]),
        Route("/v1/fine_tuning/jobs/{job_id}/cancel", wrap(lambda: ft().cancel), methods=["POST"]),
        Route("/v1/fine_tuning/jobs/{job_id}/pause", wrap(lambda: ft().pause), methods=["POST"]),
        Route("/v1/fine_tuning/jobs/{job_id}/resume", wrap(lambda: ft().resume), methods=["POST"]),
        Route("/v1/fine_tuning/jobs/{job_id}/events", wrap(lambda: ft().events), methods=["GET"]),
        Route("/v1/fine_tuning/jobs/{job_id}/checkpoints", wrap(lambda: ft().checkpoints), methods=["GET"]),
        *_auth_routes(state, wrap, need),
    ]
    for r in extra_routes or []:
        routes.append(r)
    if console:  # the web console at /console and its JSON endpoints (server/api/console/), after the API's own routes
        from .api.console import console_routes

        routes += console_routes(state)

    async def poll_store():
        # Registrations made by other processes (the trainer) reach us through the store's event log.
        # Other replicas' changes too: `wait_events` returns as soon as the log moves (PostgreSQL NOTIFY wakes it).
        while True:
            st, m = state.store, state.manager
            if st is None or m is None:
                await asyncio.sleep(poll_interval)
                continue
            try:
                events = await asyncio.to_thread(st.wait_events, state._seq, poll_interval)
                for ev in events:
                    state._seq = max(state._seq, ev.seq)
                    await asyncio.to_thread(m.on_store_event, ev)
                    if state.routes is not None:  # route changes from the CLI or a trainer: warm, arm guards
                        await asyncio.to_thread(state.routes.on_store_event, ev)
            except Exception:
                log.exception("store polling failed")
                await asyncio.sleep(poll_interval)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(poll_store())
        try:
            yield
        finally:
            task.cancel()

    from starlette.middleware import Middleware

    async def no_route(request: HttpRequest, exc):  # Starlette's own 404 / 405, in OpenAI's error shape too
        kind = NotFound if exc.status_code == 404 else LoraplexError
        err = kind(f"no route for {request.method} {request.url.path}" if exc.status_code == 404 else
                   f"{request.method} is not allowed on {request.url.path}")
        if state.telemetry is not None:
            state.telemetry.request_rejected("http", exc.status_code, err.error_type)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: no_route, 405: no_route}, middleware=[
        Middleware(BodyLimit, max_request_bytes=max_request_bytes, max_upload_bytes=max_upload_bytes)])
    app.router.redirect_slashes = False  # `/v1/routes/` is an unknown route (404), not a redirect a client must follow
    app.state.loraplex = state
    from .api.auth import AuthMiddleware

    app.add_middleware(AuthMiddleware, state=state, router=app.router)  # every request passes the gate first
    return app


def _auth_routes(state: ServerState, wrap, need) -> list[Route]:
    from .api.auth_api import AuthRoutes

    gate = need("gate")

    def au():
        gate()
        return AuthRoutes(state)

    return [
        Route("/v1/me", wrap(lambda: au().me), methods=["GET"]),
        Route("/v1/keys", wrap(lambda: au().create_key), methods=["POST"]),
        Route("/v1/keys", wrap(lambda: au().list_keys), methods=["GET"]),
        Route("/v1/keys/{key_id}", wrap(lambda: au().get_key), methods=["GET"]),
        Route("/v1/keys/{key_id}", wrap(lambda: au().revoke_key), methods=["DELETE"]),
        Route("/v1/audit", wrap(lambda: au().audit), methods=["GET"]),
        Route("/v1/tenants/{tenant}/quota", wrap(lambda: au().get_quota), methods=["GET"]),
        Route("/v1/tenants/{tenant}/quota", wrap(lambda: au().put_quota), methods=["PUT"]),
        Route("/v1/adapters/{name}/sharing", wrap(lambda: au().sharing), methods=["PUT"]),
        Route("/v1/adapters/{name}/versions", wrap(lambda: au().upload_adapter), methods=["POST"]),
    ]
