"""The gRPC front end: `loraplex.v1.Inference` and `loraplex.v1.Admin`, plus standard health and reflection.

A grpc.aio server on its own asyncio loop in its own thread, sharing the
process's `ServerState` (engine, store, adapter manager, routes) with the
HTTP front end, so both see the same adapters, routes and batch. The engine
runs in its own thread and wakes each request's consumer on the loop that
submitted it, so neither front end's loop waits on the other's.

Requests are translated with the same rules as the HTTP API (defaults, `n`
choices with seeds seed + i, logprobs), so a request and seed give the same
tokens over either protocol. A call's deadline becomes the engine request's
deadline, and a cancelled call cancels its engine request(s): either way the
sequence leaves the batch at the next engine step. Every failure leaves as a
status code: our typed errors and the store's carry theirs; anything else is
logged with its stack trace and answered INTERNAL with a generic message.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from loraplex.protos.loraplex.v1 import loraplex_pb2 as pb
from loraplex.protos.loraplex.v1 import loraplex_pb2_grpc as pbg

from . import auth
from .adapters_api import version_json
from .openai_api import load_json
from .caller import caller_of
from .errors import BadRequest, DeadlineExceeded, LoraplexError, NotFound, Unavailable, internal
from .generation_params import (
    CHAT_ROLES, COMPLETION_DEFAULT_MAX_TOKENS, MAX_MESSAGES, MAX_NAME_CHARS, GenerationParams,
)
from .structured_fields import grpc_answer
from .service import Generation, gather_streams, merge

log = logging.getLogger("loraplex.grpc")

INFERENCE = pb.DESCRIPTOR.services_by_name["Inference"].full_name
ADMIN = pb.DESCRIPTOR.services_by_name["Admin"].full_name
SERVICE_NAMES = (INFERENCE, ADMIN, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)

# The shared service names fields as the HTTP bodies do; these are their names in GenerateRequest.
_GRPC_FIELD = {"messages": "chat.messages", "max_tokens": "sampling.max_tokens", "prompt": "prompt"}


async def _abort(context, e: Exception, method: str):
    if isinstance(e, LoraplexError):
        err = e
    else:
        log.error("internal error in gRPC %s", method, exc_info=e)
        err = internal()
    code = getattr(grpc.StatusCode, str(err.grpc_code), None)
    if not isinstance(code, grpc.StatusCode) or code in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN):
        log.error("error without a usable status code in gRPC %s: %r", method, err)
        code, err = grpc.StatusCode.INTERNAL, internal()
    details = err.message
    field = _GRPC_FIELD.get(err.param, err.param) if err.param else None
    if field:  # the offending field, in the details and machine-readable in trailing metadata
        if field not in details:
            details = f"{details} (field '{field}')"
        context.set_trailing_metadata(tuple(context.trailing_metadata() or ()) + (("x-loraplex-field", field),))
    await context.abort(code, details)


class Undecodable:
    """What a request message that does not parse becomes: the handler answers INVALID_ARGUMENT for it.

    gRPC's own deserialization failure would answer INTERNAL, which for a client's
    bytes is the wrong code (INTERNAL says the server is broken)."""

    def __init__(self, reason: str):
        self.reason = reason


def _lenient(message_cls):
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except Exception as e:  # protobuf's DecodeError, invalid UTF-8 in a string field...
            return Undecodable(f"the request is not a valid {message_cls.DESCRIPTOR.full_name} message: {e}")

    return parse


def _decoded(request):
    if isinstance(request, Undecodable):
        raise BadRequest(request.reason)
    return request


def add_service(server, servicer, service_name: str) -> None:
    """Registers `servicer`'s methods for `service_name` of our protos, with lenient request parsing."""
    desc = pb.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for m in desc.methods:
        make = grpc.unary_stream_rpc_method_handler if m.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[m.name] = make(getattr(servicer, m.name),
                                request_deserializer=_lenient(getattr(pb, m.input_type.name)),
                                response_serializer=getattr(pb, m.output_type.name).SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(desc.full_name, handlers),))
    server.add_registered_method_handlers(desc.full_name, handlers)


class _Health(HealthServicer):
    """grpcio-health-checking's servicer plus `List` (every service's status), which it leaves UNIMPLEMENTED."""

    async def List(self, request, context) -> health_pb2.HealthListResponse:
        # _server_status is the base class's only record of the statuses `set` stored
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=st) for name, st in self._server_status.items()})


def _count_rejected(servicer, e: Exception) -> None:
    tel = getattr(servicer.state, "telemetry", None)
    if tel is not None and isinstance(e, LoraplexError) and 400 <= e.http_status < 500:
        tel.request_rejected("grpc", e.grpc_code, e.error_type)


def edge(fn):
    """Maps every failure of a unary handler to a status code, once."""

    async def wrapper(self, request, context):
        try:
            return await fn(self, _decoded(request), context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            _count_rejected(self, e)
            await _abort(context, e, fn.__name__)

    wrapper.__name__ = fn.__name__
    return wrapper


def edge_stream(fn):
    """The same for a server-streaming handler."""

    async def wrapper(self, request, context):
        try:
            async for item in fn(self, _decoded(request), context):
                yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            _count_rejected(self, e)
            await _abort(context, e, fn.__name__)

    wrapper.__name__ = fn.__name__
    return wrapper


def _metadata(context) -> dict:
    return {k: v for k, v in (context.invocation_metadata() or ())}


def _check_finished(out, req) -> None:
    """An engine request that ended without finishing normally, as the status the client should see."""
    if out.finish_reason == "error":
        log.error("engine error on request %s: %s", req.request_id, out.error)
        raise internal()
    if out.finish_reason == "abort":
        if req.deadline is not None and time.monotonic() >= req.deadline:
            raise DeadlineExceeded("deadline exceeded")
        raise Unavailable("the request was aborted: the server is shutting down")


def _logprob_msgs(service, entries) -> list:
    return [
        pb.TokenLogprob(token_id=e.token_id, token=service.token_text(e.token_id), logprob=e.logprob,
                        top=[pb.TopLogprob(token_id=t, token=service.token_text(t), logprob=lp) for t, lp in e.top])
        for e in entries
    ]


def _usage(prompt: int, completion: int) -> pb.Usage:
    return pb.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class _Base:
    def __init__(self, state):
        self.state = state

    def _service(self):
        if not self.state.ready:
            raise Unavailable(self.state.failure or self.state.error or
                              ("the server is shutting down" if self.state.draining else "the model is still loading"))
        return self.state.service


class InferenceServicer(_Base, pbg.InferenceServicer):
    def _prompt(self, s, request) -> tuple[list[int], bool]:
        """(prompt token ids, is chat); tokenizes, so it runs off the loop."""
        which = request.WhichOneof("prompt")
        if which == "chat":
            if not request.chat.messages:
                raise BadRequest("'chat.messages' is empty", param="chat.messages")
            if len(request.chat.messages) > MAX_MESSAGES:
                raise BadRequest(f"'chat.messages' holds more than {MAX_MESSAGES} messages", param="chat.messages")
            msgs = []
            for i, m in enumerate(request.chat.messages):
                if m.role not in CHAT_ROLES:
                    raise BadRequest(f"'chat.messages[{i}].role' must be one of {list(CHAT_ROLES)}", param=f"chat.messages[{i}].role")
                msgs.append({"role": "system" if m.role == "developer" else m.role, "content": m.content})
            return s.chat_prompt_ids(msgs), True
        if which == "text":
            return s.text_prompt_ids(request.text, "text"), False
        if which == "token_ids":
            return s.check_token_ids(list(request.token_ids.ids), "token_ids"), False
        raise BadRequest("one of 'text', 'chat' or 'token_ids' is required", param="prompt")

    async def _submit(self, request, context):
        """Validates, routes and queues the request's n engine requests; returns (service, requests, identity)."""
        s = self._service()
        if not request.model:
            raise BadRequest("'model' is required", param="model")
        if len(request.request_id) > MAX_NAME_CHARS:
            raise BadRequest(f"'request_id' is longer than {MAX_NAME_CHARS} characters", param="request_id")
        gp = GenerationParams.from_proto(request.sampling)
        session = request.session or _metadata(context).get("x-loraplex-session") or None
        adapter = s.resolve(request.model, session)
        prompt, chat = await asyncio.to_thread(self._prompt, s, request)
        if gp.max_tokens is not None:
            max_tokens = gp.max_tokens
        else:
            max_tokens = s.default_max_tokens(len(prompt)) if chat else COMPLETION_DEFAULT_MAX_TOKENS
        constraint, logit_bias = await asyncio.to_thread(grpc_answer, s.grammars, request, s.vocab_size)
        rid = request.request_id or uuid.uuid4().hex
        deadline = context.time_remaining()  # None without a client deadline
        reqs = s.submit_choices([prompt], gp, max_tokens, adapter, loop=asyncio.get_running_loop(),
                                deadline_s=deadline, request_id=rid, constraint=constraint, logit_bias=logit_bias)
        served = s.model_id if adapter is None else adapter.ref
        ident = dict(request_id=rid, adapter="" if adapter is None else adapter.name,
                     adapter_version=0 if adapter is None else adapter.version, served_by=served)
        context.set_trailing_metadata((("x-loraplex-adapter", served),))
        return s, reqs, ident

    @edge
    async def Generate(self, request, context):
        s, reqs, ident = await self._submit(request, context)
        gens = [Generation() for _ in reqs]
        outputs = ((0, o) async for o in s.stream(reqs[0])) if len(reqs) == 1 else gather_streams(reqs, s)
        async for i, out in outputs:
            if out.finished:
                _check_finished(out, reqs[i])
            merge(gens[i], out)
        first = gens[0]
        msg = pb.GenerateResponse(
            text=first.text, token_ids=first.token_ids, logprobs=_logprob_msgs(s, first.logprobs),
            finish_reason=first.finish_reason or "",
            usage=_usage(len(reqs[0].prompt_ids), sum(g.completion_tokens for g in gens)), **ident,
        )
        if len(gens) > 1:
            msg.choices.extend(
                pb.Choice(index=i, text=g.text, token_ids=g.token_ids, logprobs=_logprob_msgs(s, g.logprobs),
                          finish_reason=g.finish_reason or "", completion_tokens=g.completion_tokens)
                for i, g in enumerate(gens)
            )
        return msg

    @edge_stream
    async def GenerateStream(self, request, context):
        s, reqs, ident = await self._submit(request, context)
        outputs = ((0, o) async for o in s.stream(reqs[0])) if len(reqs) == 1 else gather_streams(reqs, s)
        left, completion = len(reqs), 0
        async for i, out in outputs:
            msg = pb.GenerateResponse(text=out.text, token_ids=out.token_ids, logprobs=_logprob_msgs(s, out.logprobs), index=i, **ident)
            if out.finished:
                _check_finished(out, reqs[i])
                msg.finish_reason = out.finish_reason
                completion += out.completion_tokens
                left -= 1
                if left == 0:
                    msg.usage.CopyFrom(_usage(len(reqs[0].prompt_ids), completion))
            yield msg

    @edge
    async def ListModels(self, request, context):
        s = self._service()
        models = [pb.ModelInfo(id=s.model_id)]
        versions = [v for v in s.store.list() if auth.sees(v.name)]
        models += [pb.ModelInfo(id=v.ref, parent=s.model_id, version=v.version) for v in versions]
        models += [pb.ModelInfo(id=name, parent=s.model_id) for name in sorted({v.name for v in versions})]
        return pb.ListModelsResponse(models=models)


def _version_msg(d: dict) -> pb.AdapterVersion:
    return pb.AdapterVersion(
        name=d["name"], version=d["version"], id=d["id"], created_at=d["created_at"], path=d.get("path"), sha256=d["sha256"],
        r=d["r"], lora_alpha=d["lora_alpha"], target_modules=d["target_modules"], lineage_json=json.dumps(d["lineage"]),
        in_flight=d.get("in_flight", 0), kind=d["kind"], use_rslora=bool(d.get("use_rslora")),
        base_fingerprint=d.get("base_fingerprint") or "", resident_slot=d.get("resident_slot"),
    )


def _route_msg(r) -> pb.Route:
    msg = pb.Route(name=r.name, weights={int(k): int(v) for k, v in r.versions.items()}, sticky=r.sticky or "",
                   updated_at=r.updated_at, updated_by=r.updated_by or "")
    if r.guard:
        msg.guard.CopyFrom(pb.RouteGuard(max_error_rate=r.guard.get("max_error_rate", 0.0), min_requests=r.guard.get("min_requests", 0)))
    return msg


class AdminServicer(_Base, pbg.AdminServicer):
    def _caller(self, context) -> str:
        return caller_of(context)

    def _parts(self):
        self._service()
        return self.state.manager, self.state.store, self.state.routes

    @staticmethod
    def _name(name: str) -> str:
        if not name:
            raise BadRequest("'name' is required", param="name")
        return name

    @edge
    async def RegisterAdapter(self, request, context):
        m, st, _ = self._parts()
        name = auth.own(self._name(request.name))
        auth.check_path_registration(st, request.path)
        if not request.path:
            raise BadRequest("'path' is required", param="path")
        lineage = load_json(request.lineage_json, "'lineage_json'", "lineage_json") if request.lineage_json else None
        if lineage is not None and not isinstance(lineage, dict):
            raise BadRequest("'lineage_json' must be a JSON object", param="lineage_json")
        v = await m.register_async(name, request.path, lineage, self._caller(context))
        return _version_msg(version_json(v, m.engine))

    @edge
    async def GetAdapter(self, request, context):
        m, st, _ = self._parts()
        name = auth.own(self._name(request.name))
        versions = st.versions(name)
        if not versions:
            raise NotFound(f"adapter {name!r} does not exist", param="name")
        msg = pb.Adapter(name=name, latest=versions[-1].version, versions=[_version_msg(version_json(v, m.engine)) for v in versions])
        r = st.get_route(name)
        if r is not None:
            msg.route.CopyFrom(_route_msg(r))
        return msg

    @edge
    async def ListAdapters(self, request, context):
        m, st, _ = self._parts()
        mine = [v for v in st.list() if auth.manages(v.name)]
        return pb.ListAdaptersResponse(versions=[_version_msg(version_json(v, m.engine)) for v in mine])

    @edge
    async def DeleteAdapter(self, request, context):
        m, _, _ = self._parts()
        version = request.version if request.HasField("version") else None
        removed = await asyncio.to_thread(m.delete, auth.own(self._name(request.name)), version, self._caller(context))
        return pb.DeleteAdapterResponse(deleted=[v.ref for v in removed], draining=[v.ref for v in removed if m.engine.in_use(v.ref)])

    @edge
    async def SetRoute(self, request, context):
        _, _, routes = self._parts()
        name = auth.own(self._name(request.name))
        if request.sticky not in ("", "user", "session"):
            raise BadRequest("'sticky' must be empty, 'user' or 'session'", param="sticky")
        guard = None
        if request.HasField("guard"):
            g = request.guard
            if not 0.0 <= g.max_error_rate <= 1.0:
                raise BadRequest("'guard.max_error_rate' must be within [0, 1]", param="guard.max_error_rate")
            guard = {"max_error_rate": g.max_error_rate, "min_requests": g.min_requests or 20}
        r = await asyncio.to_thread(routes.apply_set, name, dict(request.weights), request.sticky or None, guard, self._caller(context))
        return _route_msg(r)

    @edge
    async def GetRoute(self, request, context):
        _, st, _ = self._parts()
        name = auth.own(self._name(request.name))
        r = st.get_route(name)
        if r is None:
            st.versions(name)  # NOT_FOUND for an unknown adapter
            raise NotFound(f"adapter {name!r} has no route: bare-name requests go to its latest version", param="name")
        return _route_msg(r)

    @edge
    async def PromoteRoute(self, request, context):
        _, _, routes = self._parts()
        return _route_msg(await asyncio.to_thread(routes.apply_promote, auth.own(self._name(request.name)), request.version, self._caller(context)))

    @edge
    async def RollbackRoute(self, request, context):
        _, _, routes = self._parts()
        return _route_msg(await asyncio.to_thread(routes.apply_rollback, auth.own(self._name(request.name)), request.reason or None, self._caller(context)))


class GrpcServer:
    """A grpc.aio server on its own loop and thread; `start()` returns the port once it listens.

    Health: NOT_SERVING until `state.ready` (model loaded), SERVING while it is,
    NOT_SERVING again once `state.draining` is set and during `stop()`.
    """

    def __init__(self, state, host: str = "127.0.0.1", port: int = 50051, poll_interval: float = 0.1):
        self.state = state
        self.host = host
        self.port = port
        self.poll_interval = poll_interval
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="loraplex-grpc", daemon=True)
        self.server: grpc.aio.Server | None = None
        self.health: HealthServicer | None = None
        self._watch: asyncio.Task | None = None

    async def _start(self) -> int:
        # so_reuseport off: a second server on a taken port fails instead of sharing it
        # every method of every service passes the gate (auth.py GRPC_RULES) before its handler runs
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], interceptors=[auth.make_interceptor(self.state)])
        add_service(self.server, InferenceServicer(self.state), "Inference")
        add_service(self.server, AdminServicer(self.state), "Admin")
        self.health = _Health()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(SERVICE_NAMES, self.server)
        try:
            port = self.server.add_insecure_port(f"{self.host}:{self.port}")
        except RuntimeError as e:
            self.server = None  # collected now, on its loop, not at interpreter exit
            raise OSError(f"cannot listen for gRPC on {self.host}:{self.port}: {e}") from None
        await self._set_health(False)
        await self.server.start()
        self._watch = asyncio.create_task(self._watch_ready())
        return port

    async def _set_health(self, serving: bool) -> None:
        st = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", INFERENCE, ADMIN):
            await self.health.set(name, st)

    async def _watch_ready(self) -> None:
        serving = False
        while True:
            ready = bool(self.state.ready)
            if ready != serving:
                serving = ready
                await self._set_health(serving)
            await asyncio.sleep(self.poll_interval)

    def start(self) -> int:
        self.thread.start()
        try:
            self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            raise
        return self.port

    async def _stop(self, grace: float) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await self.health.enter_graceful_shutdown()  # every service NOT_SERVING, for good
        await self.server.stop(grace)  # in-flight calls get `grace` seconds; then they are cancelled (and so their engine requests)

    def stop(self, grace: float = 5.0) -> None:
        if self.server is None or not self.thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._stop(grace), self.loop).result(grace + 10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
