"""Routes: where a bare adapter name goes, canary splits, promotion, rollback, history, sticky picks.

`RoutesMixin` is the part of `AdapterStore` (the façade in `store.py`) that owns the `routes` and
`route_history` tables. Every change is one registry write transaction recorded in the history and
the event log, so replicas on one registry see the old route or the new one, never a mix.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass

from .errors import AdapterConflict, AdapterNotFound, InvalidRequest
from .refs import parse_version

log = logging.getLogger("loraplex.store")

STICKY_KINDS = ("user", "session")
GUARD_MAX_MIN_REQUESTS = 1_000_000  # fits gRPC's uint32 RouteGuard.min_requests
GUARD_DEFAULT_MIN_REQUESTS = 20


@dataclass(frozen=True)
class Route:
    name: str
    versions: dict[int, int]  # version -> percent of traffic (sums to 100)
    sticky: str | None  # which request field the server should use as the sticky key: "user" | "session"
    guard: dict | None  # opaque to the store (the server's automatic-rollback rules)
    updated_at: float
    updated_by: str

    def to_json(self) -> dict:
        return {"versions": {str(k): v for k, v in self.versions.items()}, "sticky": self.sticky, "guard": self.guard,
                "updated_at": self.updated_at, "updated_by": self.updated_by}


@dataclass(frozen=True)
class RouteChange:
    name: str
    at: float
    caller: str
    action: str  # set | promote | rollback | delete (adapter deleted) | prune (a 0% version was deleted)
    old: dict | None  # Route.to_json() before, None when there was no route
    new: dict | None  # Route.to_json() after, None when the route was removed
    reason: str | None


def check_guard(guard) -> dict | None:
    """A route guard as the store keeps it, `{"max_error_rate": float in [0, 1], "min_requests": int}`, from a
    client's object (min_requests defaults to 20); InvalidRequest naming the field otherwise. The bounds are
    what both front ends can carry (gRPC's RouteGuard is a double and a uint32)."""
    if guard is None:
        return None
    if not isinstance(guard, dict):
        raise InvalidRequest(f"route guard must be a JSON object or null, got {type(guard).__name__}", param="guard")
    unknown = sorted(str(k)[:40] for k in guard if k not in ("max_error_rate", "min_requests"))
    if unknown:
        raise InvalidRequest(f"route guard has unknown field(s) {unknown}; expected max_error_rate and min_requests",
                             param="guard")
    rate = guard.get("max_error_rate")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (0.0 <= rate <= 1.0):  # NaN fails both
        raise InvalidRequest(f"route guard max_error_rate must be a number from 0 to 1, got {str(rate)[:40]}",
                             param="guard.max_error_rate")
    n = guard.get("min_requests", GUARD_DEFAULT_MIN_REQUESTS)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= GUARD_MAX_MIN_REQUESTS:
        raise InvalidRequest(f"route guard min_requests must be an integer from 1 to {GUARD_MAX_MIN_REQUESTS}, "
                             f"got {str(n)[:40]}", param="guard.min_requests")
    return {"max_error_rate": float(rate), "min_requests": n}


def _stored_guard(name: str, text: str | None) -> dict | None:
    """A guard read back from the registry; one written before guards were checked and not valid now is
    dropped (logged): reads never fail on stored data."""
    if not text:
        return None
    try:
        return check_guard(json.loads(text))
    except (ValueError, InvalidRequest) as e:
        log.warning("ignoring the invalid stored guard of route %s: %s", name, e)
        return None


def _route_from_row(name: str, row) -> Route | None:
    if row is None:
        return None
    versions, sticky, guard, at, by = row
    return Route(name, {int(k): int(v) for k, v in json.loads(versions).items()}, sticky,
                 _stored_guard(name, guard), at, by)


class RoutesMixin:
    """Route changes and the route pick of `resolve`; mixed into `AdapterStore`."""

    def _route_row(self, c, name: str) -> Route | None:
        return _route_from_row(name, c.execute(
            "SELECT versions, sticky, guard, updated_at, updated_by FROM routes WHERE name = ?", (name,)).fetchone())

    def _history(self, c, name, caller, action, old: Route | None, new: Route | None, reason=None,
                 at: float | None = None) -> None:
        c.execute("INSERT INTO route_history(name, at, caller, action, old, new, reason) VALUES (?,?,?,?,?,?,?)",
                  (name, time.time() if at is None else at, caller, action, json.dumps(old.to_json()) if old else None,
                   json.dumps(new.to_json()) if new else None, reason))
        self._event(c, "route_changed", name, None, caller,
                    {"action": action, "reason": reason, "versions": new.to_json()["versions"] if new else None})

    def _put_route(self, c, name, versions, sticky, guard, caller, action, old, reason=None) -> Route:
        now = time.time()
        c.execute("INSERT INTO routes(name, versions, sticky, guard, updated_at, updated_by) VALUES (?,?,?,?,?,?) "
                  "ON CONFLICT(name) DO UPDATE SET versions = excluded.versions, sticky = excluded.sticky, "
                  "guard = excluded.guard, updated_at = excluded.updated_at, updated_by = excluded.updated_by",
                  (name, json.dumps({str(k): v for k, v in sorted(versions.items())}), sticky,
                   json.dumps(guard) if guard else None, now, caller))
        new = Route(name, dict(sorted(versions.items())), sticky, guard, now, caller)
        self._history(c, name, caller, action, old, new, reason, at=now)  # the change's time is the route's
        return new

    @staticmethod
    def parse_weights(versions) -> dict[int, int]:
        """{version: percent} from a mapping whose keys may be strings ("2") and values integer percents;
        InvalidRequest unless they are integers 0..100 summing to 100."""
        if not isinstance(versions, dict) or not versions:
            raise InvalidRequest(f"route 'versions' must be a non-empty mapping of version numbers to percentages, got {versions!r}")
        out: dict[int, int] = {}
        for k, w in versions.items():
            v = parse_version(k, param="versions", what="route version")
            if v in out:
                raise InvalidRequest(f"route names version {v} twice")
            if not isinstance(w, int) or isinstance(w, bool) or not 0 <= w <= 100:
                raise InvalidRequest(f"route weight for version {v} must be an integer percentage 0..100, got {w!r}")
            out[v] = w
        total = sum(out.values())
        if total != 100:
            raise InvalidRequest(f"route weights must sum to 100, got {total} ({out})")
        return out

    @staticmethod
    def _check_sticky(sticky) -> None:
        if sticky is not None and sticky not in STICKY_KINDS:
            raise InvalidRequest(f"sticky must be one of {list(STICKY_KINDS)} or null, got {sticky!r}")

    @staticmethod
    def _check_known(name: str, weights: dict[int, int], known: set[int]) -> None:
        if not known:
            raise AdapterNotFound(f"adapter {name!r} does not exist")
        missing = sorted(set(weights) - known)
        if missing:
            raise InvalidRequest(f"route for {name!r} names version(s) {missing} that do not exist (versions: {sorted(known)})")

    def _known(self, c, name: str) -> set[int]:
        return {r[0] for r in c.execute("SELECT version FROM versions WHERE name = ?", (name,))}

    def validate_route(self, name: str, versions, sticky=None) -> dict[int, int]:
        """The weights as {version: percent}, or InvalidRequest / AdapterNotFound; changes nothing."""
        weights = self.parse_weights(versions)
        self._check_sticky(sticky)
        vs = self._snapshot().versions.get(name) or {}
        self._check_known(name, weights, set(vs))
        return weights

    def set_route(self, name: str, versions, *, sticky: str | None = None, guard: dict | None = None, caller: str = "api") -> Route:
        """Sends `versions` percent of `name`'s traffic to each version (a canary split); atomic, recorded."""
        weights = self.parse_weights(versions)
        self._check_sticky(sticky)
        guard = check_guard(guard)
        with self._write() as c:
            self._check_known(name, weights, self._known(c, name))  # inside the lock: no delete can slip in
            return self._put_route(c, name, weights, sticky, guard, caller, "set", self._route_row(c, name))

    def get_route(self, name: str) -> Route | None:
        return self._snapshot().routes.get(name)

    def promote(self, name: str, version: int, *, caller: str = "api") -> Route:
        """All traffic to `version` (keeps the route's sticky setting, drops its guard)."""
        weights = self.parse_weights({version: 100})
        with self._write() as c:
            self._check_known(name, weights, self._known(c, name))
            old = self._route_row(c, name)
            return self._put_route(c, name, weights, old.sticky if old else None, None, caller, "promote", old)

    def rollback(self, name: str, *, caller: str = "api", reason: str | None = None,
                 if_updated_at: float | None = None) -> Route:
        """Restores the route as it was before its latest change; InvalidRequest when there was none.
        With `if_updated_at` (a guard's), only if the route is still the one changed at that time: replicas
        whose guards trip together roll back once, where two rollbacks would swap the route back."""
        with self._write() as c:
            known = self._known(c, name)
            if not known:
                raise AdapterNotFound(f"adapter {name!r} does not exist")
            if if_updated_at is not None:
                current = self._route_row(c, name)
                if current is None or current.updated_at != if_updated_at:
                    return current
            row = c.execute("SELECT action, old FROM route_history WHERE name = ? AND action != 'prune' ORDER BY id DESC LIMIT 1",
                            (name,)).fetchone()
            if row is None or row[0] == "delete" or row[1] is None:
                raise InvalidRequest(f"route for {name!r} has no earlier state to roll back to")
            prev = json.loads(row[1])
            weights = {int(k): int(w) for k, w in prev["versions"].items() if int(k) in known or int(w) > 0}
            gone = sorted(set(weights) - known)
            if gone:
                raise InvalidRequest(f"cannot roll back {name!r}: the earlier route {prev['versions']} sends traffic to "
                                     f"deleted version(s) {gone}")
            guard = _stored_guard(name, json.dumps(prev["guard"]) if prev.get("guard") else None)
            return self._put_route(c, name, weights, prev.get("sticky"), guard, caller, "rollback",
                                   self._route_row(c, name), reason)

    def route_history(self, name: str) -> list[RouteChange]:
        rows = self._query("SELECT name, at, caller, action, old, new, reason FROM route_history WHERE name = ? ORDER BY id", (name,))
        return [RouteChange(r[0], r[1], r[2], r[3], json.loads(r[4]) if r[4] else None, json.loads(r[5]) if r[5] else None, r[6])
                for r in rows]

    @staticmethod
    def sticky_bucket(name: str, key: str) -> int:
        """0..99, a stable hash of (name, key): where a sticky key falls on a route's cumulative percentages."""
        return int.from_bytes(hashlib.sha256(f"{name}\0{key}".encode()).digest()[:8], "big") % 100

    def resolve(self, name: str, version: int | None = None, sticky_key: str | None = None) -> AdapterVersion:
        """The version a request for `name` goes to: the explicit `version`; else the route's pick (by
        `sticky_key` when given, so the same key gets the same version while the route holds; at random
        otherwise); else the latest version. AdapterNotFound for unknown names / versions."""
        view = self._snapshot()
        vs = view.versions.get(name)
        if not vs:
            raise AdapterNotFound(f"adapter {name!r} does not exist")
        if version is not None:
            if version not in vs:
                raise AdapterNotFound(f"adapter {name!r} has no version {version!r} (versions: {sorted(vs)})")
            return self._check_compatible(vs[version])
        route = view.routes.get(name)
        if route is None:
            return self._check_compatible(vs[max(vs)])
        x = self.sticky_bucket(name, sticky_key) if sticky_key is not None else self._rng.randrange(100)
        acc, picked = 0, None
        for v, w in sorted(route.versions.items()):
            acc += w
            if w > 0 and x < acc:
                picked = v
                break
        if picked not in vs:  # cannot happen: deleting a routed version is refused
            raise AdapterConflict(f"route for {name!r} points at version {picked}, which does not exist")
        return self._check_compatible(vs[picked])
