"""Routes over HTTP: canary splits, promotion, rollback, history, side-by-side comparison, guards.

A route says where a bare adapter name goes (`{"versions": {"3": 90, "4": 10}}`);
the store applies changes atomically and records who made them. Before a
route that sends traffic to a version is stored, the server loads that
version into memory, so no request pays the load. A guard rolls a route
back by itself when a version new in that route misbehaves.

Routes also change without us: `loraplex routes set` and trainer jobs write
the store from other processes. The server sees those changes in the store's
event log (`on_store_event`) and arms or disarms guards from the stored route
and its history, as it does at start for routes set while it was down.

Replicas on one registry share a guard's evidence: each publishes, for the versions its guards
watch, its own counts (requests and errors over its last `min_requests` outcomes since the route
changed) to the registry, and decides on the sum over every replica's latest counts, so a canary
whose errors are spread over many replicas trips as it would on one. The first replica to trip
rolls back only the route its guard was armed for (`if_updated_at`), so replicas that trip together
roll back once.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse

from loraplex.adapters_store.registry import REPLICA_ID
from loraplex.adapters_store.store import check_guard

from . import auth
from .caller import caller_of
from .errors import BadRequest, NotFound
from .openai_api import parse_body

log = logging.getLogger("loraplex.routes")
MAX_COMPARE_WINDOW_S = 30 * 86400.0  # `compare?window=`; outcomes older than the telemetry window are gone anyway


class RouteBody(BaseModel):
    """Versions, percents and guard are checked by the store (`parse_weights`, `check_guard`): one rule for
    HTTP, gRPC, the CLI and trainer canaries."""
    model_config = ConfigDict(extra="forbid")
    versions: dict[str, Any]
    sticky: str | None = Field(None, pattern="^(user|session)$")
    guard: dict[str, Any] | None = None


class PromoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = None


def route_json(r) -> dict | None:
    if r is None:
        return None
    return {
        "name": r.name,
        "versions": {str(k): w for k, w in sorted(r.versions.items())},
        "sticky": r.sticky,
        "guard": r.guard,
        "updated_at": r.updated_at,
        "updated_by": r.updated_by,
    }


def change_json(c) -> dict:
    d = dict(vars(c)) if not hasattr(c, "__dataclass_fields__") else {k: getattr(c, k) for k in c.__dataclass_fields__}
    for k in ("old", "new"):
        if hasattr(d.get(k), "__dataclass_fields__"):
            d[k] = route_json(d[k])
    return d


def _store_call(fn, *a, **kw):
    return fn(*a, **kw)  # the store's errors are LoraplexErrors: the edge answers them as they are


class RouteGuards:
    """Watches outcomes of versions introduced by a guarded route; rolls the route back past a threshold."""

    SHARE_INTERVAL_S = 0.25  # how often counts go to / come from the registry while a guard is armed

    def __init__(self, store, telemetry, replica: str = REPLICA_ID):
        self.store = store
        self.telemetry = telemetry
        self.replica = replica  # this process's name in the shared counts (tests stand several replicas in one)
        self._lock = threading.Lock()
        self._armed: dict[str, dict] = {}  # adapter name -> {"versions": set[int], "since": float, "guard": dict}
        self._others: dict[tuple, tuple[int, int]] = {}  # (name, version, since) -> other replicas' summed counts
        self._stop = threading.Event()
        telemetry.listeners.append(self.observe)
        threading.Thread(target=self._share_loop, name="loraplex-guard-share", daemon=True).start()

    def close(self) -> None:
        self._stop.set()

    def _local_counts(self, name: str, version: int, armed: dict) -> tuple[int, int]:
        xs = self.telemetry.window.outcomes(f"{name}@{version}", since=armed["since"], last=armed["guard"]["min_requests"])
        return len(xs), sum(1 for o in xs if not o.ok)

    def share(self) -> None:
        """Publishes this replica's counts for every watched version, reads the others', and decides on them."""
        with self._lock:
            armed = {n: dict(a) for n, a in self._armed.items()}
        if not armed:
            return
        mine, others = {}, {}
        for name, a in armed.items():
            for v in a["versions"]:
                key = (name, v, a["since"])
                mine[key] = self._local_counts(name, v, a)
                rows = self.store.guard_counts(name, v, a["since"])
                others[key] = tuple(map(sum, zip((0, 0), *(c for r, c in rows.items() if r != self.replica))))
        self.store.publish_guard_counts(self.replica, mine)
        with self._lock:
            self._others = others
        for name, a in armed.items():
            for v in a["versions"]:
                self._decide(name, v)

    def _share_loop(self) -> None:
        while not self._stop.wait(self.SHARE_INTERVAL_S):
            try:
                self.share()
            except Exception:
                log.exception("could not share guard counts through the registry")

    def arm(self, name: str, route, previous) -> None:
        with self._lock:
            if route is None or not route.guard:
                self._armed.pop(name, None)
                return
            old = set(previous.versions) if previous is not None else set()
            new = {v for v, w in route.versions.items() if w > 0 and v not in old}
            if not new or previous is None:
                self._armed.pop(name, None)
                return
            # since the route's change time: every replica keys the shared counts by it
            self._armed[name] = {"versions": new, "since": route.updated_at, "guard": dict(route.guard)}

    def sync(self, name: str) -> None:
        """Arms or disarms `name`'s guard from what the store holds: the current route and the change that made it.

        Only a `set` arms (as over the API); promote and rollback disarm; pruning a 0% version keeps what
        the route's last real change armed. The watch counts outcomes since that change."""
        route = self.store.get_route(name)
        hist = self.store.route_history(name) if route is not None else []
        if hist and hist[-1].new is not None and {int(k): w for k, w in hist[-1].new["versions"].items()} != route.versions:
            return  # the route moved between the two reads; that change's own event syncs it
        change = next((c for c in reversed(hist) if c.action != "prune"), None)
        with self._lock:
            if route is None or not route.guard or change is None or change.action != "set" or change.old is None:
                self._armed.pop(name, None)
                return
            old = {int(v) for v in change.old["versions"]}
            new = {v for v, w in route.versions.items() if w > 0 and v not in old}
            if not new:
                self._armed.pop(name, None)
                return
            self._armed[name] = {"versions": new, "since": change.at, "guard": dict(route.guard)}

    def sync_all(self) -> None:
        for name in self.store.names():
            try:
                self.sync(name)
            except Exception:
                log.exception("could not arm the guard of route %s", name)

    def armed(self, name: str) -> dict | None:
        """What the guard of `name` watches now: {"versions", "since", "guard"}, or None."""
        with self._lock:
            a = self._armed.get(name)
            return None if a is None else {"versions": sorted(a["versions"]), "since": a["since"], "guard": dict(a["guard"])}

    def observe(self, ref: str | None, outcome) -> None:
        if ref is None:
            return
        name, _, ver = ref.partition("@")
        self._decide(name, int(ver))

    def _decide(self, name: str, version: int) -> None:
        with self._lock:
            armed = self._armed.get(name)
            if armed is None or version not in armed["versions"]:
                return
            g, since = armed["guard"], armed["since"]
            other_n, other_e = self._others.get((name, version, since), (0, 0))
        n, e = self._local_counts(name, version, armed)
        n, e = n + other_n, e + other_e  # every replica's evidence
        if n < g["min_requests"]:
            return
        rate = e / n
        if rate > g["max_error_rate"]:
            with self._lock:
                if self._armed.pop(name, None) is None:
                    return  # another thread already rolled back
            ref = f"{name}@{version}"
            reason = f"guard: {ref} error rate {rate:.1%} over its last {n} requests exceeds {g['max_error_rate']:.1%}"
            try:
                self.store.rollback(name, caller="guard", reason=reason, if_updated_at=since)
                log.warning("rolled back route %s: %s", name, reason)
            except Exception:
                log.exception("guard rollback of %s failed", name)


class RouteRoutes:
    def __init__(self, store, engine, telemetry, guards: RouteGuards):
        self.store = store
        self.engine = engine
        self.telemetry = telemetry
        self.guards = guards

    def _caller(self, request: HttpRequest) -> str:
        return caller_of(request)

    def _warm(self, name: str, versions) -> None:
        for v in versions:
            self.engine.pool.prefetch(_store_call(self.store.get, name, int(v)))

    async def put(self, request: HttpRequest):
        name = auth.own(request.path_params["name"])
        body: RouteBody = await parse_body(request, RouteBody)
        caller = self._caller(request)
        r = await asyncio.to_thread(self.apply_set, name, body.versions, body.sticky, body.guard, caller)
        return JSONResponse(route_json(r))

    # The changes themselves (blocking: they load adapter versions); the gRPC Admin service calls them too.
    def apply_set(self, name: str, versions, sticky: str | None, guard: dict | None, caller: str):
        weights = _store_call(self.store.validate_route, name, versions, sticky)
        guard = _store_call(check_guard, guard)  # before warming: a bad guard changes nothing
        self._warm(name, [v for v, w in weights.items() if w > 0])
        prev = self.store.get_route(name)
        r = _store_call(self.store.set_route, name, versions, sticky=sticky, guard=guard, caller=caller)
        self.guards.arm(name, r, prev)
        return r

    def apply_promote(self, name: str, version: int, caller: str):
        _store_call(self.store.validate_route, name, {version: 100})
        self._warm(name, [version])
        r = _store_call(self.store.promote, name, version, caller=caller)
        self.guards.arm(name, None, None)
        return r

    def apply_rollback(self, name: str, reason: str | None, caller: str):
        r = _store_call(self.store.rollback, name, caller=caller, reason=reason)
        self.guards.arm(name, None, None)
        return r

    def on_store_event(self, ev) -> None:
        """A route changed in the store, maybe by another process (the CLI, a trainer job): warm the versions it
        sends traffic to and arm or disarm its guard from the stored definition."""
        if ev.kind != "route_changed":
            return
        r = self.store.get_route(ev.name)
        for v, w in (r.versions.items() if r is not None else ()):
            if w > 0:
                try:
                    self.engine.pool.prefetch(self.store.get(ev.name, v))
                except Exception as e:
                    log.warning("could not preload %s@%d: %s", ev.name, v, e)
        self.guards.sync(ev.name)

    async def get(self, request: HttpRequest):
        name = auth.own(request.path_params["name"])
        r = self.store.get_route(name)
        if r is None:
            _store_call(self.store.versions, name)  # 404 for an unknown adapter
            raise NotFound(f"adapter {name!r} has no route: bare-name requests go to its latest version", param="name")
        return JSONResponse(route_json(r))

    async def list(self, request: HttpRequest):
        out = [route_json(self.store.get_route(n)) for n in self.store.names() if auth.manages(n)]
        return JSONResponse({"object": "list", "data": [r for r in out if r is not None]})

    async def promote(self, request: HttpRequest):
        name = auth.own(request.path_params["name"])
        body: PromoteBody = await parse_body(request, PromoteBody)
        return JSONResponse(route_json(await asyncio.to_thread(self.apply_promote, name, body.version, self._caller(request))))

    async def rollback(self, request: HttpRequest):
        name = auth.own(request.path_params["name"])
        raw = await request.body()
        body = await parse_body(request, RollbackBody) if raw.strip() else RollbackBody()
        return JSONResponse(route_json(await asyncio.to_thread(self.apply_rollback, name, body.reason, self._caller(request))))

    async def history(self, request: HttpRequest):
        name = auth.own(request.path_params["name"])
        hist = _store_call(self.store.route_history, name)
        return JSONResponse({"object": "list", "data": [change_json(c) for c in hist]})

    async def compare(self, request: HttpRequest):
        name = auth.own(request.path_params["name"])
        w = request.query_params.get("window", "300")
        try:
            window = float(w) if len(w) <= 32 else math.nan
        except ValueError:
            window = math.nan
        if not 0 < window <= MAX_COMPARE_WINDOW_S:  # NaN fails too
            raise BadRequest(f"query parameter 'window' must be a number of seconds in (0, {MAX_COMPARE_WINDOW_S:g}]",
                             param="window")
        r = self.store.get_route(name)
        versions = sorted(r.versions) if r is not None else [v.version for v in _store_call(self.store.versions, name)]
        since = time.time() - window
        data = []
        for v in versions:
            ref = f"{name}@{v}"
            s = self.telemetry.window.summary(self.telemetry.window.outcomes(ref, since=since))
            data.append({"version": v, "weight": None if r is None else r.versions.get(v, 0), **s})
        return JSONResponse({"name": name, "window_s": window, "versions": data})
