"""The versioned adapter store: immutable versions on disk, a SQLite registry, routes and their history.

Layout under `root`:
    registry.sqlite3              versions, routes, route history, event log
    adapters/<name>/<version>/    a copy of the PEFT directory, never modified after registration
    tmp/                          registrations in progress (renamed into place when complete)

Registration validates first, copies into `tmp/`, fsyncs, renames into
place, then records the version in one transaction; a failure at any step
removes what it wrote, so the store never holds a partial adapter. Version
numbers come from a per-name counter that survives deletes, so `name@3`
always means the same weights. Every change appends to an event log, which
other processes (the server, when the trainer registers) poll.

Several threads and processes may use one store: SQLite serialises writers
(`BEGIN IMMEDIATE`), each thread has its own connection.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import AdapterConflict, AdapterNotFound, AdapterPathForbidden, InvalidAdapter, InvalidRequest
from .peft_format import AdapterManifest, BaseModelSpec, validate_adapter_dir

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
STICKY_KINDS = ("user", "session")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, next_version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL, version INTEGER NOT NULL, path TEXT NOT NULL, created_at REAL NOT NULL,
    manifest TEXT NOT NULL, lineage TEXT NOT NULL, base_fingerprint TEXT, sha256 TEXT NOT NULL,
    caller TEXT NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS routes (
    name TEXT PRIMARY KEY, versions TEXT NOT NULL, sticky TEXT, guard TEXT, updated_at REAL NOT NULL, updated_by TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS route_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, at REAL NOT NULL, caller TEXT NOT NULL,
    action TEXT NOT NULL, old TEXT, new TEXT, reason TEXT);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, name TEXT NOT NULL, version INTEGER,
    at REAL NOT NULL, caller TEXT NOT NULL, detail TEXT NOT NULL);
"""


@dataclass(frozen=True)
class AdapterVersion:
    name: str
    version: int
    path: Path
    created_at: float
    manifest: AdapterManifest
    lineage: dict
    base_fingerprint: str | None
    sha256: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class Route:
    name: str
    versions: dict[int, int]  # version -> percent of traffic
    sticky: str | None
    guard: dict | None
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
    action: str  # set | promote | rollback | delete
    old: dict | None
    new: dict | None
    reason: str | None


@dataclass(frozen=True)
class StoreEvent:
    seq: int
    kind: str  # registered | deleted | route_changed
    name: str
    version: int | None
    at: float
    caller: str
    detail: dict


def _dir_sha256(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _route_from_row(name, row) -> Route | None:
    if row is None:
        return None
    versions, sticky, guard, at, by = row
    return Route(name, {int(k): int(v) for k, v in json.loads(versions).items()}, sticky, json.loads(guard) if guard else None, at, by)


class AdapterStore:
    def __init__(self, root, *, base: BaseModelSpec | None = None, allowed_roots: list | None = None):
        self.root = Path(root).resolve()
        self.base = base
        self.allowed_roots = None if allowed_roots is None else [Path(r).resolve() for r in allowed_roots]
        (self.root / "adapters").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)
        self.db_path = self.root / "registry.sqlite3"
        self._local = threading.local()
        self._conn().executescript(_SCHEMA)
        self._cache_lock = threading.Lock()
        self._cache_seq = -1
        self._versions: dict[str, dict[int, AdapterVersion]] = {}
        self._routes: dict[str, Route] = {}
        self._rng = random.Random()

    # --- plumbing -------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.db_path, timeout=30, isolation_level=None, check_same_thread=True)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=FULL")
            self._local.conn = c
        return c

    class _Tx:
        def __init__(self, conn):
            self.c = conn

        def __enter__(self):
            self.c.execute("BEGIN IMMEDIATE")
            return self.c

        def __exit__(self, et, ev, tb):
            self.c.execute("COMMIT" if et is None else "ROLLBACK")
            return False

    def _tx(self):
        return self._Tx(self._conn())

    def _event(self, c, kind, name, version, caller, detail=None) -> None:
        c.execute("INSERT INTO events(kind, name, version, at, caller, detail) VALUES (?,?,?,?,?,?)",
                  (kind, name, version, time.time(), caller, json.dumps(detail or {})))

    def last_event_seq(self) -> int:
        row = self._conn().execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
        return int(row[0])

    def events_since(self, seq: int) -> list[StoreEvent]:
        rows = self._conn().execute("SELECT seq, kind, name, version, at, caller, detail FROM events WHERE seq > ? ORDER BY seq", (seq,)).fetchall()
        return [StoreEvent(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6])) for r in rows]

    def _refresh(self) -> None:
        """Reloads the in-memory view when the event log moved (changes from any thread or process)."""
        seq = self.last_event_seq()
        if seq == self._cache_seq:
            return
        c = self._conn()
        versions: dict[str, dict[int, AdapterVersion]] = {}
        for r in c.execute("SELECT name, version, path, created_at, manifest, lineage, base_fingerprint, sha256 FROM versions ORDER BY name, version"):
            v = AdapterVersion(r[0], r[1], Path(r[2]), r[3], AdapterManifest.from_json(json.loads(r[4])), json.loads(r[5]), r[6], r[7])
            versions.setdefault(v.name, {})[v.version] = v
        routes = {r[0]: _route_from_row(r[0], r[1:]) for r in c.execute("SELECT name, versions, sticky, guard, updated_at, updated_by FROM routes")}
        with self._cache_lock:
            self._versions, self._routes, self._cache_seq = versions, routes, seq

    # --- versions -------------------------------------------------------------------
    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise InvalidRequest(f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        if self.base is not None and name == self.base.model_id:
            raise InvalidRequest(f"adapter name {name!r} is the base model's id")

    def _check_allowed(self, src: Path) -> Path:
        try:
            real = src.resolve(strict=True)
        except (FileNotFoundError, RuntimeError):
            raise InvalidAdapter(f"adapter path {str(src)!r} does not exist")
        if real.is_relative_to(self.root):
            return real
        if self.allowed_roots is not None and not any(real.is_relative_to(r) for r in self.allowed_roots):
            raise AdapterPathForbidden(f"adapter path {str(src)!r} is outside the allowed adapter roots")
        return real

    def register(self, name: str, source_dir, *, lineage: dict | None = None, caller: str = "api") -> AdapterVersion:
        self._check_name(name)
        src = self._check_allowed(Path(source_dir).expanduser())
        manifest = validate_adapter_dir(src, self.base)
        tmp = self.root / "tmp" / f"{name}-{uuid.uuid4().hex}"
        final: Path | None = None
        try:
            shutil.copytree(src, tmp, symlinks=False, ignore=shutil.ignore_patterns("*.bin", "*.pt", "*.pth", "*.pkl", "checkpoint-*"))
            # validate the copy too: the source could have changed between the check and the copy
            manifest = validate_adapter_dir(tmp, self.base)
            sha = _dir_sha256(tmp)
            _fsync_tree(tmp)
            with self._tx() as c:
                row = c.execute("SELECT next_version FROM counters WHERE name = ?", (name,)).fetchone()
                version = row[0] if row else 1
                c.execute("INSERT OR REPLACE INTO counters(name, next_version) VALUES (?, ?)", (name, version + 1))
                final = self.root / "adapters" / name / str(version)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.rename(tmp, final)
                now = time.time()
                c.execute(
                    "INSERT INTO versions(name, version, path, created_at, manifest, lineage, base_fingerprint, sha256, caller) VALUES (?,?,?,?,?,?,?,?,?)",
                    (name, version, str(final), now, json.dumps(manifest.to_json()), json.dumps(lineage or {}, default=str),
                     self.base.fingerprint if self.base else None, sha, caller),
                )
                self._event(c, "registered", name, version, caller, {"sha256": sha})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if final is not None and final.exists() and not self._row_exists(name, final):
                shutil.rmtree(final, ignore_errors=True)
            raise
        return self.get(name, version)

    def _row_exists(self, name: str, path: Path) -> bool:
        return self._conn().execute("SELECT 1 FROM versions WHERE name = ? AND path = ?", (name, str(path))).fetchone() is not None

    def get(self, name: str, version: int | None = None) -> AdapterVersion:
        self._refresh()
        vs = self._versions.get(name)
        if not vs:
            raise AdapterNotFound(f"adapter {name!r} does not exist")
        if version is None:
            return vs[max(vs)]
        if version not in vs:
            raise AdapterNotFound(f"adapter {name!r} has no version {version} (versions: {sorted(vs)})")
        return vs[version]

    def versions(self, name: str) -> list[AdapterVersion]:
        self._refresh()
        vs = self._versions.get(name)
        if not vs:
            raise AdapterNotFound(f"adapter {name!r} does not exist")
        return [vs[k] for k in sorted(vs)]

    def list(self) -> list[AdapterVersion]:
        self._refresh()
        return [v for name in sorted(self._versions) for _, v in sorted(self._versions[name].items())]

    def names(self) -> list[str]:
        self._refresh()
        return sorted(self._versions)

    def delete(self, name: str, version: int | None = None, *, caller: str = "api") -> list[AdapterVersion]:
        """Removes one version (None: every version and the route). Files go after the registry commit."""
        existing = self.versions(name)
        if version is not None and version not in {v.version for v in existing}:
            raise AdapterNotFound(f"adapter {name!r} has no version {version}")
        with self._tx() as c:
            route = _route_from_row(name, c.execute("SELECT versions, sticky, guard, updated_at, updated_by FROM routes WHERE name = ?", (name,)).fetchone())
            if version is not None and route is not None and route.versions.get(version, 0) > 0:
                raise AdapterConflict(f"version {version} of {name!r} still receives {route.versions[version]}% of its route's traffic; change the route first")
            rows = c.execute("SELECT version FROM versions WHERE name = ?" + ("" if version is None else " AND version = ?"),
                             (name,) if version is None else (name, version)).fetchall()
            gone = {r[0] for r in rows}
            c.execute("DELETE FROM versions WHERE name = ?" + ("" if version is None else " AND version = ?"),
                      (name,) if version is None else (name, version))
            if version is None and route is not None:
                c.execute("DELETE FROM routes WHERE name = ?", (name,))
                self._history(c, name, caller, "delete", route, None, "adapter deleted")
            for v in sorted(gone):
                self._event(c, "deleted", name, v, caller)
        removed = [v for v in existing if v.version in gone]
        for v in removed:
            shutil.rmtree(v.path, ignore_errors=True)
        if version is None:
            try:
                (self.root / "adapters" / name).rmdir()
            except OSError:
                pass
        return removed

    # --- routes ---------------------------------------------------------------------
    def _history(self, c, name, caller, action, old: Route | None, new: Route | None, reason=None) -> None:
        c.execute("INSERT INTO route_history(name, at, caller, action, old, new, reason) VALUES (?,?,?,?,?,?,?)",
                  (name, time.time(), caller, action, json.dumps(old.to_json()) if old else None,
                   json.dumps(new.to_json()) if new else None, reason))
        self._event(c, "route_changed", name, None, caller, {"action": action, "reason": reason})

    def validate_route(self, name: str, versions: dict, sticky=None) -> dict[int, int]:
        """The route's weights as {version: percent}, or InvalidRequest / AdapterNotFound; changes nothing."""
        if not isinstance(versions, dict) or not versions:
            raise InvalidRequest("route 'versions' must map version numbers to percentages")
        out: dict[int, int] = {}
        for k, w in versions.items():
            try:
                v = int(k)
            except (TypeError, ValueError):
                raise InvalidRequest(f"route version {k!r} is not an integer")
            if not isinstance(w, int) or isinstance(w, bool) or not 0 <= w <= 100:
                raise InvalidRequest(f"route weight for version {v} must be an integer percentage 0..100, got {w!r}")
            out[v] = w
        total = sum(out.values())
        if total != 100:
            raise InvalidRequest(f"route weights must sum to 100, got {total}")
        known = {v.version for v in self.versions(name)}
        missing = sorted(set(out) - known)
        if missing:
            raise InvalidRequest(f"route for {name!r} names version(s) {missing} that do not exist (versions: {sorted(known)})")
        if sticky is not None and sticky not in STICKY_KINDS:
            raise InvalidRequest(f"sticky must be one of {STICKY_KINDS} or null, got {sticky!r}")
        return out

    def _write_route(self, name, versions, sticky, guard, caller, action, reason=None) -> Route:
        with self._tx() as c:
            old = _route_from_row(name, c.execute("SELECT versions, sticky, guard, updated_at, updated_by FROM routes WHERE name = ?", (name,)).fetchone())
            now = time.time()
            c.execute("INSERT OR REPLACE INTO routes(name, versions, sticky, guard, updated_at, updated_by) VALUES (?,?,?,?,?,?)",
                      (name, json.dumps({str(k): v for k, v in versions.items()}), sticky, json.dumps(guard) if guard else None, now, caller))
            new = Route(name, dict(versions), sticky, guard, now, caller)
            self._history(c, name, caller, action, old, new, reason)
        return new

    def set_route(self, name: str, versions: dict, *, sticky: str | None = None, guard: dict | None = None, caller: str = "api") -> Route:
        v = self.validate_route(name, versions, sticky)
        return self._write_route(name, v, sticky, guard, caller, "set")

    def get_route(self, name: str) -> Route | None:
        self._refresh()
        return self._routes.get(name)

    def promote(self, name: str, version: int, *, caller: str = "api") -> Route:
        cur = self.get_route(name)
        v = self.validate_route(name, {version: 100}, None)
        return self._write_route(name, v, cur.sticky if cur else None, None, caller, "promote")

    def rollback(self, name: str, *, caller: str = "api", reason: str | None = None) -> Route:
        self.versions(name)  # 404 for an unknown adapter
        rows = self._conn().execute("SELECT old FROM route_history WHERE name = ? AND action != 'delete' ORDER BY id DESC LIMIT 1", (name,)).fetchone()
        if rows is None or rows[0] is None:
            raise InvalidRequest(f"route for {name!r} has no earlier state to roll back to")
        prev = json.loads(rows[0])
        versions = {int(k): int(w) for k, w in prev["versions"].items()}
        known = {v.version for v in self.versions(name)}
        if set(versions) - known:
            raise InvalidRequest(f"cannot roll back {name!r}: the previous route used deleted version(s) {sorted(set(versions) - known)}")
        return self._write_route(name, versions, prev.get("sticky"), prev.get("guard"), caller, "rollback", reason)

    def route_history(self, name: str) -> list[RouteChange]:
        rows = self._conn().execute("SELECT name, at, caller, action, old, new, reason FROM route_history WHERE name = ? ORDER BY id", (name,)).fetchall()
        return [RouteChange(r[0], r[1], r[2], r[3], json.loads(r[4]) if r[4] else None, json.loads(r[5]) if r[5] else None, r[6]) for r in rows]

    def resolve(self, name: str, version: int | None = None, sticky_key: str | None = None) -> AdapterVersion:
        """The version a request for `name` goes to: explicit version, else the route's pick, else the latest."""
        if version is not None:
            return self.get(name, version)
        route = self.get_route(name)
        if route is None:
            return self.get(name)
        choices = [(v, w) for v, w in sorted(route.versions.items()) if w > 0]
        if route.sticky and sticky_key is not None:
            # a stable hash of (name, key): the same end user keeps the same version while the route holds
            x = int.from_bytes(hashlib.sha256(f"{name}\0{sticky_key}".encode()).digest()[:8], "big") % 100
        else:
            x = self._rng.randrange(100)
        acc = 0
        for v, w in choices:
            acc += w
            if x < acc:
                return self.get(name, v)
        return self.get(name, choices[-1][0])
