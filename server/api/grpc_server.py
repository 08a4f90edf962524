"""The gRPC front end: `loraplex.v1.Inference` and `loraplex.v1.Admin`, plus standard health and reflection
(`grpc.reflection.v1` and `v1alpha`).

Admin's tenancy methods (keys, audit, quotas, sharing, identity) and its client-streamed `UploadAdapter`
call the operations the HTTP admin endpoints call (`auth_api`), so both front ends apply one set of
rules; this module only translates messages.

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
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from loraplex.protos import reflection_v1

from loraplex.protos.loraplex.v1 import loraplex_pb2 as pb
from loraplex.protos.loraplex.v1 import loraplex_pb2_grpc as pbg

from . import auth, auth_api
from .adapters_api import version_json
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
SERVICE_NAMES = (INFERENCE, ADMIN, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME,
                 reflection_v1.SERVICE_NAME)

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
    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler}
    for m in desc.methods:
        make = kinds[(m.client_streaming, m.server_streaming)]  # no bidirectional methods of ours
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
        lineage = auth_api.parse_lineage(request.lineage_json, "lineage_json")
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


    # --- adapter upload ----------------------------------------------------------------------------
    @edge
    async def UploadAdapter(self, request_iterator, context):
        m, _, _ = self._parts()
        messages = request_iterator.__aiter__()
        first = await anext(messages, None)
        if first is not None:
            first = _decoded(first)
        if first is None or first.WhichOneof("part") != "metadata":
            raise BadRequest("the first message of UploadAdapter must be 'metadata' (name, lineage_json)",
                             param="metadata")
        meta = first.metadata
        lineage = auth_api.parse_lineage(meta.lineage_json, "metadata.lineage_json")
        declared = meta.total_bytes if meta.HasField("total_bytes") else None
        with auth_api.AdapterUpload(self.state, self._name(meta.name), declared, param="chunk.filename") as up:
            current = None
            async for msg in messages:
                msg = _decoded(msg)
                if msg.WhichOneof("part") != "chunk":
                    raise BadRequest("only the first message of UploadAdapter is 'metadata'; the others are 'chunk'",
                                     param="metadata")
                if msg.chunk.filename != current:
                    current = msg.chunk.filename
                    up.start_file(current)
                up.write(msg.chunk.data)
            v = await up.register(lineage)
        return _version_msg(version_json(v, m.engine))

    # --- tenancy administration: auth_api's operations, as HTTP's admin endpoints run them ---------
    def _gate(self):
        gate = self.state.gate
        if gate is None or gate.registry is None:
            raise Unavailable(self.state.error or "the model is still loading")
        return gate

    @edge
    async def GetIdentity(self, request, context):
        view = auth_api.identity_view(self._gate())
        return pb.Identity(tenant=view["tenant"], scopes=view["scopes"], key_id=view["key_id"] or "",
                           key_name=view["key_name"] or "", auth=view["auth"], quota=_quota_msg(view["quota"]),
                           usage=pb.QuotaUsage(**view["usage"]))

    @edge
    async def CreateKey(self, request, context):
        reg = self._gate().registry
        tenant = request.tenant if request.HasField("tenant") else None
        name = request.name if request.HasField("name") else None
        key, secret = await asyncio.to_thread(auth_api.create_key, reg, tenant, list(request.scopes), name)
        return pb.CreateKeyResponse(key=_key_msg(key), secret=secret)

    @edge
    async def ListKeys(self, request, context):
        reg = self._gate().registry
        tenant = request.tenant if request.HasField("tenant") else None
        keys = await asyncio.to_thread(auth_api.list_keys, reg, tenant, request.include_revoked)
        return pb.ListKeysResponse(keys=[_key_msg(k) for k in keys])

    @edge
    async def GetKey(self, request, context):
        return _key_msg(await asyncio.to_thread(auth_api.get_key, self._gate().registry, _key_id(request)))

    @edge
    async def RevokeKey(self, request, context):
        return _key_msg(await asyncio.to_thread(auth_api.revoke_key, self._gate().registry, _key_id(request)))

    @edge
    async def ListAudit(self, request, context):
        reg = self._gate().registry

        def opt(f):
            return getattr(request, f) if request.HasField(f) else None

        limit = opt("limit")
        entries = await asyncio.to_thread(
            auth_api.list_audit, reg, tenant=opt("tenant"), key_id=opt("key_id"), action=opt("action"),
            resource=opt("resource"), since=opt("since"), until=opt("until"),
            limit=auth_api.AUDIT_DEFAULT_LIMIT if limit is None else limit)
        return pb.ListAuditResponse(entries=[
            pb.AuditEntry(id=e.id, at=e.at, tenant=e.tenant, key_id=e.key_id or "", caller=e.caller, action=e.action,
                          resource=e.resource or "", status=e.status, detail_json=json.dumps(e.detail, default=str))
            for e in entries])

    @edge
    async def GetQuota(self, request, context):
        view = auth_api.quota_view(self._gate(), _tenant(request))
        return pb.TenantQuota(tenant=view["tenant"], quota=_quota_msg(view["quota"]),
                              usage=pb.QuotaUsage(**view["usage"]))

    @edge
    async def SetQuota(self, request, context):
        limits = {f.name: getattr(request.quota, f.name) for f, _ in request.quota.ListFields()}
        tenant, q = await asyncio.to_thread(auth_api.set_quota, self._gate().registry, _tenant(request), limits)
        return pb.TenantQuota(tenant=tenant, quota=_quota_msg(q.model_dump()))

    @edge
    async def SetSharing(self, request, context):
        self._gate()
        name = self._name(request.name)
        await asyncio.to_thread(auth_api.set_sharing, self.state, name, request.shared)
        return pb.SetSharingResponse(name=name, shared=request.shared)


def _key_id(request) -> str:
    if not request.key_id:
        raise BadRequest("'key_id' is required", param="key_id")
    return request.key_id


def _tenant(request) -> str:
    if not request.tenant:
        raise BadRequest("'tenant' is required (a tenant, or * for the default of all tenants)", param="tenant")
    return request.tenant


def _key_msg(k) -> pb.ApiKey:
    msg = pb.ApiKey(id=k.id, tenant=k.tenant, scopes=list(k.scopes), name=k.name or "", hint=k.hint,
                    created_at=k.created_at, created_by=k.created_by, revoked_by=k.revoked_by or "")
    if k.revoked_at is not None:
        msg.revoked_at = k.revoked_at
    return msg


def _quota_msg(limits: dict) -> pb.Quota:
    """A Quota (tenancy.Quota's fields; the message declares the same names, a test holds them equal)."""
    return pb.Quota(**{k: v for k, v in limits.items() if v is not None})


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
        reflector = reflection.aio.ReflectionServicer(SERVICE_NAMES)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflector, self.server)
        reflection_v1.add_to_server(reflector, self.server)  # the standard name beside v1alpha
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
