"""The one check: authentication, scopes, tenant, quota admission and audit for every HTTP route and gRPC method.

Every call enters through `Gate.enter` and leaves through `Gate.leave`, from exactly two places: the
ASGI middleware (`AuthMiddleware`, wrapped around the whole Starlette app, so it sees every request
before routing) and the gRPC server interceptor (`AuthInterceptor`, installed on the server, so it
sees every method of every service). What a call needs is declared in two tables, `HTTP_RULES` keyed
by (method, route path) and `GRPC_RULES` keyed by the full method name. A route or method missing from
its table is refused with 403 / PERMISSION_DENIED for everyone (fail closed), so a new endpoint cannot
go live without a rule, and a test enumerates the app's routes and the services' methods against the
tables and calls each anonymously and with a wrong-scope key.

A call carries an `Identity`: the key's tenant and scopes, or, in open mode (no keys configured, on a
loopback address, or `--insecure-no-auth`), tenant `*` with every scope. The Identity of the call being
served is in a context variable (`current()`), set by the gate for the duration of the call: handlers,
the threads they start with `asyncio.to_thread` and the tasks of a streamed response inherit it, and
code outside a call sees none, so a tenant-scoped lookup outside the gate fails instead of falling back
to `*`. Tenant scoping itself is name arithmetic (`adapters_store.tenancy`): handlers turn the name a
client sent into the stored name with `resolve_model` (inference: own or shared) or `own` (management),
both of which answer another tenant's adapter with the 404 of an absent one.

Audit: a call whose rule says it changes state is recorded when it succeeds (or is refused a scope):
tenant, key id, the client address as the server saw it, time, the action and the resource named in
the path or request message; handlers add what only they know with `note(...)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hmac
import ipaddress
import logging
from dataclasses import dataclass, field

from loraplex.adapters_store.tenancy import ALL, SCOPES, AccessRegistry, can_manage, qualify

from .errors import ApiError, NotFound, PermissionDenied, Unauthenticated  # noqa: F401  (re-exported for handlers)
from .quotas import QuotaExceeded, RateLimiter

log = logging.getLogger("loraplex.auth")

INFERENCE, TRAIN, ADMIN = SCOPES
FLAG_KEY_ID = "key_flag"  # the id `--api-key` / LORAPLEX_API_KEY shows in the audit log


@dataclass(frozen=True)
class Identity:
    tenant: str
    scopes: frozenset
    key_id: str | None = None
    key_name: str | None = None
    authenticated: bool = True  # False in open mode

    @property
    def operator(self) -> bool:
        return self.tenant == ALL

    def to_json(self) -> dict:
        return {
            "object": "identity",
            "tenant": self.tenant,
            "scopes": [s for s in SCOPES if s in self.scopes],
            "key_id": self.key_id,
            "key_name": self.key_name,
            "auth": self.authenticated,
        }


OPEN = Identity(ALL, frozenset(SCOPES), None, None, False)


@dataclass(frozen=True)
class Rule:
    """What a route or method requires. `scope` None: any valid key. `operator`: tenant `*` only."""

    scope: str | None
    operator: bool = False
    public: bool = False
    mutates: bool = False  # audited
    metered: bool = False  # counts against the tenant's request quotas


PUBLIC = Rule(None, public=True)
ANY = Rule(None)


def _r(scope, **kw) -> Rule:
    return Rule(scope, **kw)


# (method, route path as declared in app.py) -> Rule
HTTP_RULES: dict[tuple[str, str], Rule] = {
    ("GET", "/health"): PUBLIC,
    ("GET", "/v1/me"): ANY,
    ("GET", "/metrics"): _r(ADMIN, operator=True),
    ("GET", "/v1/models"): _r(INFERENCE),
    ("GET", "/v1/models/{model_id:path}"): _r(INFERENCE),
    ("POST", "/tokenize"): _r(INFERENCE),
    ("POST", "/detokenize"): _r(INFERENCE),
    ("GET", "/tokenizer_info"): _r(INFERENCE),
    ("POST", "/v1/chat/completions"): _r(INFERENCE, metered=True),
    ("POST", "/v1/completions"): _r(INFERENCE, metered=True),
    ("POST", "/v1/rewards"): _r(INFERENCE, metered=True),
    ("POST", "/v1/adapters"): _r(ADMIN, operator=True, mutates=True),  # by server path
    ("GET", "/v1/adapters"): _r(ADMIN),
    ("GET", "/v1/adapters/{name}"): _r(ADMIN),
    ("DELETE", "/v1/adapters/{name}"): _r(ADMIN, mutates=True),
    ("POST", "/v1/adapters/{name}/versions"): _r(ADMIN, mutates=True),  # by upload
    ("PUT", "/v1/adapters/{name}/sharing"): _r(ADMIN, operator=True, mutates=True),
    ("POST", "/v1/load_lora_adapter"): _r(ADMIN, operator=True, mutates=True),
    ("POST", "/v1/unload_lora_adapter"): _r(ADMIN, mutates=True),
    ("GET", "/v1/routes"): _r(ADMIN),
    ("PUT", "/v1/routes/{name}"): _r(ADMIN, mutates=True),
    ("GET", "/v1/routes/{name}"): _r(ADMIN),
    ("POST", "/v1/routes/{name}/promote"): _r(ADMIN, mutates=True),
    ("POST", "/v1/routes/{name}/rollback"): _r(ADMIN, mutates=True),
    ("GET", "/v1/routes/{name}/history"): _r(ADMIN),
    ("GET", "/v1/routes/{name}/compare"): _r(ADMIN),
    ("POST", "/v1/files"): _r(TRAIN, mutates=True),
    ("GET", "/v1/files"): _r(TRAIN),
    ("GET", "/v1/files/{file_id}"): _r(TRAIN),
    ("DELETE", "/v1/files/{file_id}"): _r(TRAIN, mutates=True),
    ("GET", "/v1/files/{file_id}/content"): _r(TRAIN),
    ("POST", "/v1/fine_tuning/jobs"): _r(TRAIN, mutates=True),
    ("GET", "/v1/fine_tuning/jobs"): _r(TRAIN),
    ("GET", "/v1/fine_tuning/jobs/{job_id}"): _r(TRAIN),
    ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel"): _r(TRAIN, mutates=True),
    ("POST", "/v1/fine_tuning/jobs/{job_id}/pause"): _r(TRAIN, mutates=True),
    ("POST", "/v1/fine_tuning/jobs/{job_id}/resume"): _r(TRAIN, mutates=True),
    ("GET", "/v1/fine_tuning/jobs/{job_id}/events"): _r(TRAIN),
    ("GET", "/v1/fine_tuning/jobs/{job_id}/checkpoints"): _r(TRAIN),
    ("POST", "/v1/keys"): _r(ADMIN, mutates=True),
    ("GET", "/v1/keys"): _r(ADMIN),
    ("GET", "/v1/keys/{key_id}"): _r(ADMIN),
    ("DELETE", "/v1/keys/{key_id}"): _r(ADMIN, mutates=True),
    ("GET", "/v1/audit"): _r(ADMIN),
    ("GET", "/v1/tenants/{tenant}/quota"): _r(ADMIN),
    ("PUT", "/v1/tenants/{tenant}/quota"): _r(ADMIN, operator=True, mutates=True),
    # the web console (server/api/console/): static page public, its JSON endpoints scoped like the API they mirror
    ("GET", "/console"): PUBLIC,  # the redirect and the static files mounted there
    ("GET", "/v1/console/metrics"): _r(ADMIN),
    ("POST", "/v1/console/datasets/preview"): _r(TRAIN),
    ("POST", "/v1/console/plan"): _r(TRAIN),
    ("POST", "/v1/console/jobs/{job_id}/canary"): _r(ADMIN, mutates=True),
}

_INF, _ADM = "/loraplex.v1.Inference/", "/loraplex.v1.Admin/"
GRPC_RULES: dict[str, Rule] = {
    _INF + "Generate": _r(INFERENCE, metered=True),
    _INF + "GenerateStream": _r(INFERENCE, metered=True),
    _INF + "ListModels": _r(INFERENCE),
    _ADM + "RegisterAdapter": _r(ADMIN, operator=True, mutates=True),  # by server path
    _ADM + "GetAdapter": _r(ADMIN),
    _ADM + "ListAdapters": _r(ADMIN),
    _ADM + "DeleteAdapter": _r(ADMIN, mutates=True),
    _ADM + "SetRoute": _r(ADMIN, mutates=True),
    _ADM + "GetRoute": _r(ADMIN),
    _ADM + "PromoteRoute": _r(ADMIN, mutates=True),
    _ADM + "RollbackRoute": _r(ADMIN, mutates=True),
    _ADM + "UploadAdapter": _r(ADMIN, mutates=True),  # as POST /v1/adapters/{name}/versions
    _ADM + "GetIdentity": ANY,  # as GET /v1/me
    _ADM + "CreateKey": _r(ADMIN, mutates=True),
    _ADM + "ListKeys": _r(ADMIN),
    _ADM + "GetKey": _r(ADMIN),
    _ADM + "RevokeKey": _r(ADMIN, mutates=True),
    _ADM + "ListAudit": _r(ADMIN),
    _ADM + "GetQuota": _r(ADMIN),
    _ADM + "SetQuota": _r(ADMIN, operator=True, mutates=True),
    _ADM + "SetSharing": _r(ADMIN, operator=True, mutates=True),
    "/grpc.health.v1.Health/Check": PUBLIC,
    "/grpc.health.v1.Health/Watch": PUBLIC,
    "/grpc.health.v1.Health/List": PUBLIC,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": PUBLIC,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": PUBLIC,
}

NO_RULE = Rule(ADMIN, operator=True)  # what an endpoint without a rule gets: nobody passes `_check_rule`


# --- the call being served -------------------------------------------------------------------------
@dataclass
class Call:
    identity: Identity
    address: str
    action: str
    rule: Rule
    resource: str | None = None
    detail: dict = field(default_factory=dict)
    gate: "Gate | None" = None

    def charge(self, tokens: int) -> None:
        if self.gate is not None and self.rule.metered:
            self.gate.limiter.charge(self.identity.tenant, tokens)

    def who(self) -> str:
        """Who made a change, for route history and lineage: key and tenant as authenticated, and address."""
        i = self.identity
        if not i.authenticated:
            return self.address
        name = f" ({i.key_name})" if i.key_name else ""
        return f"{i.tenant}/{i.key_id}{name}@{self.address}"


_current: contextvars.ContextVar[Call | None] = contextvars.ContextVar("loraplex_call", default=None)


def current() -> Call:
    """The call being served; an internal error outside one (never a silent `*`)."""
    c = _current.get()
    if c is None:
        raise RuntimeError("no authenticated call in this context: tenant-scoped code ran outside the gate")
    return c


def current_or_none() -> Call | None:
    return _current.get()


def identity() -> Identity:
    return current().identity


def note(resource: str | None = None, **detail) -> None:
    """Adds what a handler knows (the version it registered, the key it created) to the call's audit entry."""
    c = _current.get()
    if c is not None:
        if resource is not None:
            c.resource = resource
        c.detail.update(detail)


def caller(unauthenticated: str) -> str:
    """Who makes a change, for route history and the store's records: the authenticated key (tenant, key id,
    name, address) as the gate established it, or `unauthenticated` in open mode."""
    c = _current.get()
    return c.who() if c is not None and c.identity.authenticated else unauthenticated


def stamp_lineage(lineage: dict | None) -> dict | None:
    """A version's lineage with who registered it, when an authenticated call does (a client cannot set it)."""
    c = _current.get()
    if c is None or not c.identity.authenticated:
        return lineage
    i = c.identity
    return {
        **(lineage or {}),
        "registered_by": {"tenant": i.tenant, "key_id": i.key_id, "key_name": i.key_name, "address": c.address},
    }


def charge_tokens(tokens: int) -> None:
    """Counts tokens against the current call's tenant (no-op outside a metered call)."""
    c = _current.get()
    if c is not None:
        c.charge(tokens)


# --- tenant scoping of names -----------------------------------------------------------------------
def registry_of(call: Call) -> AccessRegistry | None:
    return None if call.gate is None else call.gate.registry


def resolve_model(name: str) -> str:
    """The stored adapter name the current caller means for inference (its own, else shared); NotFound
    worded as for an absent adapter otherwise."""
    c = current()
    reg = registry_of(c)
    if reg is None:
        return name
    return reg.resolve_name(c.identity.tenant, name)


def own(name: str) -> str:
    """The stored name of an adapter the current caller manages; NotFound (as if absent) otherwise."""
    c = current()
    reg = registry_of(c)
    return name if reg is None else reg.own_name(c.identity.tenant, name)


def sees(name: str) -> bool:
    c = current()
    reg = registry_of(c)
    return True if reg is None else reg.can_see(c.identity.tenant, name)


def manages(name: str) -> bool:
    """May the current caller manage stored adapter `name` (list it among its adapters, change it)?"""
    return can_manage(current().identity.tenant, name)


def check_path_registration(store, path) -> None:
    """With API keys in use, registration by server path reads only under --allowed-adapter-root (and the store);
    a hub id is no server path (adapters_store.hub checks its org)."""
    from loraplex.adapters_store.hub import is_hub_id

    if isinstance(path, str) and is_hub_id(path):
        return
    if current().identity.authenticated and store.allowed_roots is None:
        raise PermissionDenied(
            "registering an adapter by server path needs --allowed-adapter-root while API keys are in "
            "use; upload the adapter's files instead (POST /v1/adapters/{name}/versions)"
        )


def check_owner(kind: str, rid: str, message: str, param: str | None = None) -> None:
    """NotFound(message) unless the current caller's tenant owns file / job `rid` (or is `*`); `message`
    is the one the resource's own lookup gives for an absent id, so the two cannot be told apart."""
    c = current()
    reg = registry_of(c)
    if reg is None or c.identity.operator:
        return
    if reg.owner(kind, rid) != c.identity.tenant:
        raise NotFound(message, param=param)


def claim(kind: str, rid: str) -> None:
    """Records the current caller's tenant as the owner of a new file / job (operators own by default)."""
    c = current()
    reg = registry_of(c)
    if reg is not None and not c.identity.operator:
        reg.set_owner(kind, rid, c.identity.tenant)
    note(resource=rid)


def owned_filter(kind: str):
    """A predicate on ids: those of the current caller's tenant (everything for operators)."""
    c = current()
    reg = registry_of(c)
    if reg is None or c.identity.operator:
        return lambda rid: True
    mine = reg.owned(kind, c.identity.tenant)
    return lambda rid: rid in mine


@contextlib.contextmanager
def unguarded():
    """Runs handlers as an open call when no gate set one: for the fine-tuning routes mounted in an app of
    the embedder's own (`fine_tuning_routes`), which brings its own access control. Inside our server the
    gate's call is already set and stays."""
    if _current.get() is not None:
        yield
        return
    token = _current.set(Call(OPEN, "embedded", "embedded", Rule(None)))
    try:
        yield
    finally:
        _current.reset(token)


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_refusal(host: str, *, has_keys: bool, api_key: str | None, insecure_no_auth: bool) -> str | None:
    """Why the server must not start on `host` as configured, or None."""
    if has_keys or api_key or insecure_no_auth or is_loopback(host):
        return None
    return (
        f"refusing to serve on {host} without API keys: anyone who can reach it could register adapters, read "
        "files and start jobs. Create a key with `loraplex keys create --tenant '*' --scope admin` (it is stored in "
        "the registry), or pass --api-key KEY (or set LORAPLEX_API_KEY) for a single admin key, or --insecure-no-auth "
        "to serve without authentication anyway"
    )


# --- the gate --------------------------------------------------------------------------------------
class Gate:
    """Authentication + authorization + quota admission + audit, shared by both front ends.

    `open_when_keyless`: a server bound to a loopback address with no keys configured runs open
    (every call is tenant `*` with every scope, `auth: false`); elsewhere no keys means nobody gets in.
    `no_auth` (`--insecure-no-auth`) is open whatever the keys.
    """

    def __init__(
        self,
        registry: AccessRegistry | None,
        *,
        api_key: str | None = None,
        open_when_keyless: bool = True,
        no_auth: bool = False,
    ):
        self.registry = registry
        self.api_key = api_key or None
        self.open_when_keyless = open_when_keyless
        self.no_auth = no_auth
        self.limiter = RateLimiter(self._quota)

    def _quota(self, tenant: str):
        from loraplex.adapters_store.tenancy import Quota

        return Quota() if self.registry is None else self.registry.quota(tenant)

    def quota(self, tenant: str):
        return self._quota(tenant)

    @property
    def open(self) -> bool:
        """True while calls need no key."""
        if self.no_auth:
            return True
        return (
            self.open_when_keyless
            and not self.api_key
            and not (self.registry is not None and self.registry.has_keys())
        )

    def authenticate(self, authorization: str | None) -> Identity:
        if self.open:  # clients send placeholder keys ("Bearer unused"); in open mode nothing is checked
            return OPEN
        if not authorization:
            raise Unauthenticated(
                "missing API key: send the header 'Authorization: Bearer <key>' (gRPC: metadata "
                "'authorization: Bearer <key>')",
                code="missing_api_key",
            )
        scheme, _, secret = authorization.strip().partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise Unauthenticated("malformed Authorization header: expected 'Bearer <key>'", code="invalid_api_key")
        if self.api_key and hmac.compare_digest(secret.encode(), self.api_key.encode()):
            return Identity(ALL, frozenset(SCOPES), FLAG_KEY_ID, "--api-key")
        key = self.registry.lookup(secret) if self.registry is not None else None
        if key is None:
            raise Unauthenticated("invalid or revoked API key", code="invalid_api_key")
        return Identity(key.tenant, frozenset(key.scopes), key.id, key.name)

    @staticmethod
    def authorize(ident: Identity, rule: Rule, action: str) -> None:
        if rule is NO_RULE:
            log.error("refused %s: no access rule is declared for it (server/api/auth.py HTTP_RULES / GRPC_RULES)", action)
            raise PermissionDenied(f"{action} has no access rule; it is refused to everyone")
        if rule.scope is not None and rule.scope not in ident.scopes:
            raise PermissionDenied(
                f"this API key lacks the '{rule.scope}' scope that {action} needs "
                f"(it has: {', '.join(s for s in SCOPES if s in ident.scopes)})",
                code="missing_scope",
            )
        if rule.operator and not ident.operator:
            raise PermissionDenied(
                f"{action} is for operators: it needs a key of tenant '*' with the '{rule.scope}' scope",
                code="operator_only",
            )

    def enter(self, rule: Rule, authorization: str | None, address: str, action: str) -> Call:
        """Authenticates and authorizes one call and admits it against its tenant's quota. Raises ApiError."""
        ident = self.authenticate(authorization)
        call = Call(ident, address, action, rule, gate=self)
        try:
            self.authorize(ident, rule, action)
        except PermissionDenied as e:
            if rule.mutates or rule is NO_RULE:
                self._audit(call, e.http_status)
            raise
        if rule.metered:
            self.limiter.admit(ident.tenant)
        return call

    def leave(self, call: Call, status) -> None:
        """Releases the call's quota slot; records the change when it succeeded."""
        if call.rule.metered:
            self.limiter.release(call.identity.tenant)
        ok = str(status) == "OK" or (str(status).isdigit() and int(status) < 400)
        if call.rule.mutates and ok:
            self._audit(call, status)

    def _audit(self, call: Call, status) -> None:
        if self.registry is None:
            return
        try:
            self.registry.record(
                tenant=call.identity.tenant,
                key_id=call.identity.key_id,
                caller=call.address,
                action=call.action,
                resource=call.resource,
                status=status,
                detail=call.detail,
            )
        except Exception:
            log.exception("could not record the audit entry of %s", call.action)

    async def leave_async(self, call: Call, status) -> None:
        if call.rule.mutates:  # the audit write is a registry transaction: off the event loop
            await asyncio.to_thread(self.leave, call, status)
        else:
            self.leave(call, status)


def _error_headers(err: ApiError) -> list[tuple[bytes, bytes]]:
    h = [(b"content-type", b"application/json")]
    if isinstance(err, QuotaExceeded) and err.retry_after is not None:
        h.append((b"retry-after", str(err.retry_after).encode()))
    if isinstance(err, Unauthenticated):
        h.append((b"www-authenticate", b'Bearer realm="loraplex"'))
    return h


# --- HTTP --------------------------------------------------------------------------------------------
class AuthMiddleware:
    """ASGI middleware around the whole app: every HTTP request passes `Gate.enter` before routing.

    `state.gate` is created with the store; until then only public routes answer (the rest 503)."""

    def __init__(self, app, state, router):
        self.app = app
        self.state = state
        self.router = router  # the Starlette router whose routes the rules are keyed by

    def _route(self, scope):
        from starlette.routing import Match

        for route in self.router.routes:
            match, child = route.matches(scope)
            if match == Match.FULL:
                return route, child.get("path_params", {})
        return None, {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.requests import Request

        route, params = self._route(scope)
        method = "GET" if scope["method"] == "HEAD" else scope["method"]  # HEAD is GET without the body
        path = getattr(route, "path", None)
        rule = HTTP_RULES.get((method, path), NO_RULE) if route is not None else None
        gate: Gate | None = self.state.gate
        if (rule is not None and rule.public) or (rule is None and gate is None):
            return await self.app(scope, receive, send)  # public, or no such route before the gate exists: 404 / 405
        action = f"{method} {path or scope['path']}"
        try:
            if gate is None:
                from .errors import Unavailable

                raise Unavailable(self.state.error or "the model is still loading")
            client = scope.get("client")
            address = client[0] if client else "unknown"
            authorization = Request(scope).headers.get("authorization")
            if rule is None:  # no such route: authenticate, then let the router answer 404 / 405
                gate.authenticate(authorization)
                return await self.app(scope, receive, send)
            call = gate.enter(rule, authorization, address, action)
        except ApiError as e:
            return await _send_error(send, e)
        call.resource = _resource(call.identity, params)
        if params:
            call.detail["params"] = {k: str(v) for k, v in params.items()}
        status = {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        token = _current.set(call)
        try:
            await self.app(scope, receive, send_status)
        finally:
            _current.reset(token)
            await gate.leave_async(call, status["code"])


def _resource(ident: Identity, params: dict) -> str | None:
    if "name" in params:
        return qualify(ident.tenant, str(params["name"]))
    for k in ("key_id", "file_id", "job_id", "tenant"):
        if k in params:
            return str(params[k])
    return None


async def _send_error(send, err: ApiError) -> None:
    import json

    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.http_status, "headers": _error_headers(err)})
    await send({"type": "http.response.body", "body": body})


# --- gRPC --------------------------------------------------------------------------------------------
def _peer_address(peer: str | None) -> str:
    from .caller import _peer_host

    return _peer_host(peer or "")


def make_interceptor(state):
    """A grpc.aio server interceptor that runs every method through `state.gate`."""
    import grpc

    async def abort(context, err: ApiError):
        md = []
        if isinstance(err, QuotaExceeded) and err.retry_after is not None:
            md.append(("retry-after", str(err.retry_after)))
        if md:
            context.set_trailing_metadata(tuple(md))
        await context.abort(getattr(grpc.StatusCode, err.grpc_code), err.message)

    def status_of(context) -> str:
        try:
            code = context.code()
        except Exception:
            code = None
        return "OK" if code is None else getattr(code, "name", str(code))

    def enter(rule, method, request, context) -> Call:
        gate: Gate | None = state.gate
        if gate is None:
            from .errors import Unavailable

            raise Unavailable(state.error or "the model is still loading")
        md = {k: v for k, v in (context.invocation_metadata() or ())}
        call = gate.enter(rule, md.get("authorization"), _peer_address(context.peer()), method)
        # the resource as HTTP derives it from its path parameters; a client-streamed request's is
        # noted by its handler
        params = {k: v for k in ("name", "key_id", "tenant") if isinstance(v := getattr(request, k, None), str) and v}
        call.resource = _resource(call.identity, params)
        return call

    class AuthInterceptor(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation, details):
            handler = await continuation(details)
            if handler is None:
                return None  # unknown method: UNIMPLEMENTED, nothing to protect
            rule = GRPC_RULES.get(details.method, NO_RULE)
            if rule.public:
                return handler
            method = details.method

            def answered(inner, reads_request: bool):
                """A method with one response (unary, or client-streaming: checked before its first message)."""

                async def handle(arg, context):
                    try:
                        call = enter(rule, method, arg if reads_request else None, context)
                    except ApiError as e:
                        await abort(context, e)
                    token = _current.set(call)
                    status = "UNKNOWN"
                    try:
                        resp = await inner(arg, context)
                        status = status_of(context)
                        return resp
                    except grpc.aio.AbortError:
                        status = status_of(context)
                        raise
                    finally:
                        _current.reset(token)
                        await state.gate.leave_async(call, status)

                return handle

            if handler.unary_unary is not None:
                return grpc.unary_unary_rpc_method_handler(
                    answered(handler.unary_unary, True),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
            if handler.unary_stream is not None:
                inner_s = handler.unary_stream

                async def stream(request, context):
                    try:
                        call = enter(rule, method, request, context)
                    except ApiError as e:
                        await abort(context, e)
                    _current.set(call)  # the RPC's own task: nothing else runs in this context
                    status = "UNKNOWN"
                    try:
                        async for item in inner_s(request, context):
                            yield item
                        status = status_of(context)
                    except grpc.aio.AbortError:
                        status = status_of(context)
                        raise
                    finally:
                        await state.gate.leave_async(call, status)

                return grpc.unary_stream_rpc_method_handler(
                    stream,
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
            if handler.stream_unary is not None:
                return grpc.stream_unary_rpc_method_handler(
                    answered(handler.stream_unary, False),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
            # bidirectional streams: none of ours behind the gate (reflection is public); refuse rather than
            # pass unchecked
            log.error("refused %s: the gate wraps unary, server- and client-streaming methods only", method)

            async def refuse(request_iterator, context):
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{method} has no access rule")

            return grpc.stream_stream_rpc_method_handler(
                refuse,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

    return AuthInterceptor()
