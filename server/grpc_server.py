"""The gRPC front end: `loraplex.v1.Inference` and `loraplex.v1.Admin`, plus standard health and reflection.

It runs a grpc.aio server on its own asyncio loop in its own thread and
shares the process's `ServerState` (engine, store, adapter manager) with the
HTTP front end, so both see the same adapters, routes and batch.
Deadlines are handed to the engine (the request is aborted at the next step
after they pass) and a cancelled RPC cancels its engine request, so no
orphan keeps generating. Every error leaves as a status code: our typed
errors carry theirs; anything else is logged and answered INTERNAL with a
generic message.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from loraplex.protos.loraplex.v1 import loraplex_pb2 as pb
from loraplex.protos.loraplex.v1 import loraplex_pb2_grpc as pbg

from .adapters_api import version_json
from .errors import ApiError, BadRequest, Unavailable, from_store_error
from .request import SamplingParams
from .service import Generation, merge

log = logging.getLogger("loraplex.grpc")

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["Inference"].full_name,
    pb.DESCRIPTOR.services_by_name["Admin"].full_name,
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.SERVICE_NAME,
)


def _to_api_error(e: Exception) -> ApiError | None:
    if isinstance(e, ApiError):
        return e
    if hasattr(e, "http_status") and hasattr(e, "grpc_code"):
        return from_store_error(e)
    return None


def edge(fn):
    """Maps every failure of an RPC handler to a status code, once."""

    async def wrapper(self, request, context):
        try:
            return await fn(self, request, context)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if isinstance(e, grpc.aio.AbortError) or (hasattr(grpc.aio, "AioRpcError") and isinstance(e, grpc.aio.AioRpcError)):
                raise
            err = _to_api_error(e)
            if err is None:
                log.exception("internal error in %s", fn.__name__)
                await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
            await context.abort(getattr(grpc.StatusCode, err.grpc_code), err.message)

    wrapper.__name__ = fn.__name__
    return wrapper


def edge_stream(fn):
    async def wrapper(self, request, context):
        try:
            async for item in fn(self, request, context):
                yield item
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if isinstance(e, grpc.aio.AbortError):
                raise
            err = _to_api_error(e)
            if err is None:
                log.exception("internal error in %s", fn.__name__)
                await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
            await context.abort(getattr(grpc.StatusCode, err.grpc_code), err.message)

    wrapper.__name__ = fn.__name__
    return wrapper


def _logprob_msgs(service, entries) -> list:
    out = []
    for e in entries:
        out.append(pb.TokenLogprob(
            token_id=e.token_id, token=service.token_text(e.token_id), logprob=e.logprob,
            top=[pb.TopLogprob(token_id=t, token=service.token_text(t), logprob=lp) for t, lp in e.top],
        ))
    return out


class _Base:
    def __init__(self, state):
        self.state = state

    def _service(self):
        if not self.state.ready:
            raise Unavailable(self.state.error or "the model is still loading")
        return self.state.service


class InferenceServicer(_Base, pbg.InferenceServicer):
    def _prepare(self, request, context):
        s = self._service()
        if not request.model:
            raise BadRequest("'model' is required", param="model")
        which = request.WhichOneof("prompt")
        sp = request.sampling
        if sp.HasField("temperature") and not 0.0 <= sp.temperature <= 2.0:
            raise BadRequest("'sampling.temperature' must be within [0, 2]", param="sampling.temperature")
        if sp.HasField("top_p") and not 0.0 < sp.top_p <= 1.0:
            raise BadRequest("'sampling.top_p' must be within (0, 1]", param="sampling.top_p")
        if sp.HasField("logprobs") and sp.logprobs > 20:
            raise BadRequest("'sampling.logprobs' must be at most 20", param="sampling.logprobs")
        if sp.HasField("max_tokens") and sp.max_tokens < 1:
            raise BadRequest("'sampling.max_tokens' must be at least 1", param="sampling.max_tokens")
        adapter = s.resolve(request.model, request.session or None)
        if which == "chat":
            if not request.chat.messages:
                raise BadRequest("'chat.messages' is empty", param="chat.messages")
            roles = {"system", "developer", "user", "assistant", "tool"}
            msgs = []
            for i, m in enumerate(request.chat.messages):
                if m.role not in roles:
                    raise BadRequest(f"'chat.messages[{i}].role' must be one of {sorted(roles)}", param=f"chat.messages.{i}.role")
                msgs.append({"role": "system" if m.role == "developer" else m.role, "content": m.content})
            prompt = s.chat_prompt_ids(msgs)
        elif which == "text":
            prompt = s.text_prompt_ids(request.text)
        elif which == "token_ids":
            prompt = s.check_token_ids(list(request.token_ids.ids), "token_ids")
        else:
            raise BadRequest("one of 'text', 'chat' or 'token_ids' is required", param="prompt")
        params = SamplingParams(
            max_tokens=sp.max_tokens if sp.HasField("max_tokens") else s.default_max_tokens(len(prompt)),
            temperature=sp.temperature if sp.HasField("temperature") else 1.0,
            top_p=sp.top_p if sp.HasField("top_p") else 1.0,
            top_k=sp.top_k if sp.HasField("top_k") and sp.top_k > 0 else 0,
            seed=sp.seed if sp.HasField("seed") else None,
            stop=list(sp.stop),
            logprobs=sp.logprobs if sp.HasField("logprobs") else None,
            presence_penalty=sp.presence_penalty,
            frequency_penalty=sp.frequency_penalty,
            ignore_eos=sp.ignore_eos,
        )
        remaining = context.time_remaining()
        req = s.submit(prompt, params, adapter, loop=asyncio.get_running_loop(), deadline_s=remaining,
                       request_id=request.request_id or None)
        served = s.model_id if adapter is None else adapter.ref
        ident = dict(request_id=req.request_id, adapter="" if adapter is None else adapter.name,
                     adapter_version=0 if adapter is None else adapter.version, served_by=served)
        context.set_trailing_metadata((("x-loraplex-adapter", served),))
        return s, req, ident

    @edge
    async def Generate(self, request, context):
        s, req, ident = self._prepare(request, context)
        g = Generation()
        async for out in s.stream(req):
            merge(g, out)
        if g.finish_reason == "abort":
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        return pb.GenerateResponse(
            text=g.text, token_ids=g.token_ids, logprobs=_logprob_msgs(s, g.logprobs), finish_reason=g.finish_reason or "",
            usage=pb.Usage(prompt_tokens=len(req.prompt_ids), completion_tokens=g.completion_tokens,
                           total_tokens=len(req.prompt_ids) + g.completion_tokens), **ident,
        )

    @edge_stream
    async def GenerateStream(self, request, context):
        s, req, ident = self._prepare(request, context)
        async for out in s.stream(req):
            if out.finished and out.error:
                raise ApiError(out.error)
            msg = pb.GenerateResponse(text=out.text, token_ids=out.token_ids, logprobs=_logprob_msgs(s, out.logprobs), **ident)
            if out.finished:
                if out.finish_reason == "abort":
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
                msg.finish_reason = out.finish_reason
                msg.usage.CopyFrom(pb.Usage(prompt_tokens=len(req.prompt_ids), completion_tokens=out.completion_tokens,
                                            total_tokens=len(req.prompt_ids) + out.completion_tokens))
            yield msg

    @edge
    async def ListModels(self, request, context):
        s = self._service()
        models = [pb.ModelInfo(id=s.model_id)]
        for v in s.store.list():
            models.append(pb.ModelInfo(id=v.ref, parent=s.model_id, version=v.version))
        for name in s.store.names():
            models.append(pb.ModelInfo(id=name, parent=s.model_id))
        return pb.ListModelsResponse(models=models)


def _version_msg(d: dict) -> pb.AdapterVersion:
    return pb.AdapterVersion(
        name=d["name"], version=d["version"], id=d["id"], created_at=d["created_at"], path=d["path"], sha256=d["sha256"],
        r=d["r"], lora_alpha=d["lora_alpha"], target_modules=d["target_modules"], lineage_json=json.dumps(d["lineage"]),
        in_flight=d.get("in_flight", 0), kind=d["kind"],
    )


def _route_msg(r) -> pb.Route:
    return pb.Route(name=r.name, weights={int(k): int(v) for k, v in r.versions.items()}, sticky=r.sticky or "",
                    updated_at=r.updated_at, updated_by=r.updated_by)


class AdminServicer(_Base, pbg.AdminServicer):
    def _caller(self, context) -> str:
        md = dict(context.invocation_metadata() or ())
        return md.get("x-loraplex-caller") or context.peer() or "grpc"

    def _parts(self):
        self._service()
        return self.state.manager, self.state.store, self.state.routes

    @edge
    async def RegisterAdapter(self, request, context):
        m, _, _ = self._parts()
        if not request.name:
            raise BadRequest("'name' is required", param="name")
        if not request.path:
            raise BadRequest("'path' is required", param="path")
        try:
            lineage = json.loads(request.lineage_json) if request.lineage_json else None
        except json.JSONDecodeError as e:
            raise BadRequest(f"'lineage_json' is not valid JSON: {e}", param="lineage_json") from e
        v = await asyncio.to_thread(m.register, request.name, request.path, lineage, self._caller(context))
        return _version_msg(version_json(v, m.engine))

    @edge
    async def GetAdapter(self, request, context):
        m, st, _ = self._parts()
        versions = st.versions(request.name)
        r = st.get_route(request.name)
        msg = pb.Adapter(name=request.name, latest=versions[-1].version, versions=[_version_msg(version_json(v, m.engine)) for v in versions])
        if r is not None:
            msg.route.CopyFrom(_route_msg(r))
        return msg

    @edge
    async def ListAdapters(self, request, context):
        m, st, _ = self._parts()
        return pb.ListAdaptersResponse(versions=[_version_msg(version_json(v, m.engine)) for v in st.list()])

    @edge
    async def DeleteAdapter(self, request, context):
        m, _, _ = self._parts()
        version = request.version if request.HasField("version") else None
        removed = await asyncio.to_thread(m.delete, request.name, version, self._caller(context))
        return pb.DeleteAdapterResponse(deleted=[v.ref for v in removed], draining=[v.ref for v in removed if m.engine.in_use(v.ref)])

    @edge
    async def SetRoute(self, request, context):
        _, st, routes = self._parts()
        sticky = request.sticky or None
        weights = st.validate_route(request.name, dict(request.weights), sticky)
        routes._warm(request.name, [v for v, w in weights.items() if w > 0])
        prev = st.get_route(request.name)
        r = await asyncio.to_thread(st.set_route, request.name, weights, sticky=sticky, caller=self._caller(context))
        routes.guards.arm(request.name, r, prev)
        return _route_msg(r)

    @edge
    async def GetRoute(self, request, context):
        _, st, _ = self._parts()
        r = st.get_route(request.name)
        if r is None:
            st.versions(request.name)
            from .errors import NotFound

            raise NotFound(f"adapter {request.name!r} has no route", param="name")
        return _route_msg(r)

    @edge
    async def PromoteRoute(self, request, context):
        _, st, routes = self._parts()
        st.validate_route(request.name, {request.version: 100})
        routes._warm(request.name, [request.version])
        return _route_msg(await asyncio.to_thread(st.promote, request.name, request.version, caller=self._caller(context)))

    @edge
    async def RollbackRoute(self, request, context):
        _, st, _ = self._parts()
        return _route_msg(await asyncio.to_thread(st.rollback, request.name, caller=self._caller(context), reason=request.reason or None))


class GrpcServer:
    """A grpc.aio server on its own loop and thread; `start()` returns once it listens."""

    def __init__(self, state, host: str = "127.0.0.1", port: int = 50051):
        self.state = state
        self.host = host
        self.port = port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="loraplex-grpc", daemon=True)
        self.server: grpc.aio.Server | None = None
        self.health = None
        self._watch: asyncio.Task | None = None

    async def _start(self) -> int:
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pbg.add_InferenceServicer_to_server(InferenceServicer(self.state), self.server)
        pbg.add_AdminServicer_to_server(AdminServicer(self.state), self.server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(SERVICE_NAMES, self.server)
        port = self.server.add_insecure_port(f"{self.host}:{self.port}")
        await self.server.start()
        await self._set_health(False)
        self._watch = asyncio.create_task(self._watch_ready())
        return port

    async def _set_health(self, serving: bool) -> None:
        st = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICE_NAMES[:2]):
            await self.health.set(name, st)

    async def _watch_ready(self) -> None:
        serving = False
        while True:
            ready = bool(self.state.ready)
            if ready != serving:
                serving = ready
                await self._set_health(serving)
            await asyncio.sleep(0.1)

    def start(self) -> int:
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self.port

    async def _stop(self, grace: float) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)

    def stop(self, grace: float = 5.0) -> None:
        if self.server is None:
            return
        asyncio.run_coroutine_threadsafe(self._stop(grace), self.loop).result(grace + 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
