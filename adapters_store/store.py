"""The versioned adapter store: immutable versions on disk, a SQLite registry, routes and their history.

Layout under `root`:
    registry.sqlite3              versions, per-name version counters, routes, route history, event log
    adapters/<name>/<version>/    a copy of the PEFT directory's top-level files, never modified
    tmp/                          registrations in progress (renamed into place when complete)

Registration checks the name, the source path (allowed roots, symlinks and '..' resolved), validates
the adapter, copies its top-level files into `tmp/` (sub-directories such as `checkpoint-*` are not
copied), validates the copy (values too: no NaN/inf), fsyncs, and then, holding the registry's write
lock, allocates the version, renames the copy into place and records it; a failure at any step
removes what it wrote, so the store never holds a partial adapter or a row without files. Version
numbers come from a per-name counter that survives deletes, so `name@3` always means the same
weights. Every change appends to an event log in the same transaction; other processes (the
server, when the trainer registers) poll it with `events_since`.

Routes say where a bare adapter name goes: `{version: percent}` summing to 100. With a sticky key
(end user or session id) the pick is a hash of (name, key), so one key keeps its version while the
route holds, and raising the newest version's share only moves keys onto it. Each route change is
one transaction (readers see the old route or the new one) recorded in the route history with time,
caller and reason; `rollback` restores the route as it was before the latest change (two rollbacks
in a row swap back, like `kubectl rollout undo`).

Threads and processes may share one store: SQLite serialises writers (`BEGIN IMMEDIATE`, WAL mode);
threads borrow connections from a small pool. Reads come from an in-memory snapshot refreshed when the event
log's head moves (one indexed query per read), so `resolve` stays cheap on the request path.
"""
from __future__ import annotations

import contextlib
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
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AdapterConflict, AdapterNotFound, AdapterPathForbidden, InvalidAdapter, InvalidRequest
from .peft_format import PICKLE_SUFFIXES, AdapterManifest, BaseModelSpec, validate_adapter_dir
from .tenancy import BARE_NAME, SEP, check_tenant

NAME_RE = re.compile(BARE_NAME)
RESERVED_NAMES = ("default",)  # the server answers model="default" with the base model
STICKY_KINDS = ("user", "session")
TMP_MAX_AGE_S = 3600.0  # leftovers of crashed registrations older than this are removed at open

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
CREATE INDEX IF NOT EXISTS route_history_name ON route_history(name, id);
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
    sha256: str  # over the version directory's file names and bytes

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


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


@dataclass(frozen=True)
class StoreEvent:
    seq: int
    kind: str  # registered | deleted | route_changed
    name: str
    version: int | None
    at: float
    caller: str
    detail: dict


@dataclass(frozen=True)
class _View:
    """An immutable snapshot of the registry as of event `seq`; swapped whole, so readers never see a mix."""
    seq: int
    versions: dict[str, dict[int, AdapterVersion]] = field(default_factory=dict)
    routes: dict[str, Route] = field(default_factory=dict)


def _dir_sha256(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _route_from_row(name: str, row) -> Route | None:
    if row is None:
        return None
    versions, sticky, guard, at, by = row
    return Route(name, {int(k): int(v) for k, v in json.loads(versions).items()}, sticky,
                 json.loads(guard) if guard else None, at, by)


def _is_within(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


class AdapterStore:
    def __init__(self, root, *, base: BaseModelSpec | None = None, allowed_roots: list | None = None):
        self.root = Path(root).expanduser().resolve()
        self.base = base
        self.allowed_roots = None if allowed_roots is None else [Path(r).expanduser().resolve() for r in allowed_roots]
        (self.root / "adapters").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)
        self.db_path = self.root / "registry.sqlite3"
        self._idle: list[sqlite3.Connection] = []  # a small pool: threads borrow a connection per operation
        self._pool_lock = threading.Lock()
        self._closed = False
        self._view = _View(-1)
        self._view_lock = threading.Lock()
        self._rng = random.Random()
        with self._connection() as c:
            c.executescript(_SCHEMA)  # idempotent; concurrent opens wait on the busy timeout
        self._clean_tmp()

    def __repr__(self) -> str:
        return f"AdapterStore({str(self.root)!r})"

    # --- plumbing -------------------------------------------------------------------
    # Connections are pooled rather than per thread: SQLite defers closing a connection's file
    # descriptor while other connections of the process hold locks on the file, so a connection
    # per short-lived thread leaked one descriptor per finished thread.
    MAX_IDLE_CONNECTIONS = 16

    def _open(self) -> sqlite3.Connection:
        c = sqlite3.connect(self.db_path, timeout=60, isolation_level=None, check_same_thread=False)
        c.execute("PRAGMA busy_timeout=60000")
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=FULL")
        return c

    @contextlib.contextmanager
    def _connection(self):
        with self._pool_lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            c = self._idle.pop() if self._idle else None
        if c is None:
            c = self._open()
        try:
            yield c
        finally:
            if c.in_transaction:  # never hand a connection back mid-transaction
                c.execute("ROLLBACK")
            with self._pool_lock:
                keep = not self._closed and len(self._idle) < self.MAX_IDLE_CONNECTIONS
                if keep:
                    self._idle.append(c)
            if not keep:
                c.close()

    def _query(self, sql: str, args=()) -> list:
        with self._connection() as c:
            return c.execute(sql, args).fetchall()

    def close(self) -> None:
        """Closes the store's connections; it must not be used afterwards."""
        with self._pool_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for c in idle:
            with contextlib.suppress(Exception):
                c.close()

    @contextlib.contextmanager
    def _write(self):
        """One write transaction; SQLite's write lock is held from BEGIN IMMEDIATE until commit.
        Never nest: the inner one would wait for the outer one's lock."""
        with self._connection() as c:
            c.execute("BEGIN IMMEDIATE")
            try:
                yield c
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")  # on failure _connection rolls back

    @contextlib.contextmanager
    def _read(self):
        """A consistent read snapshot over several queries."""
        with self._connection() as c:
            c.execute("BEGIN")
            try:
                yield c
            finally:
                c.execute("COMMIT")

    def _clean_tmp(self) -> None:
        now = time.time()
        for d in (self.root / "tmp").iterdir():
            with contextlib.suppress(OSError):
                if now - d.stat().st_mtime > TMP_MAX_AGE_S:
                    shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink()

    def _event(self, c, kind, name, version, caller, detail=None) -> None:
        c.execute("INSERT INTO events(kind, name, version, at, caller, detail) VALUES (?,?,?,?,?,?)",
                  (kind, name, version, time.time(), caller, json.dumps(detail or {}, default=str)))

    def last_event_seq(self) -> int:
        return int(self._query("SELECT COALESCE(MAX(seq), 0) FROM events")[0][0])

    def events_since(self, seq: int) -> list[StoreEvent]:
        rows = self._query("SELECT seq, kind, name, version, at, caller, detail FROM events WHERE seq > ? ORDER BY seq", (int(seq),))
        return [StoreEvent(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6])) for r in rows]

    # --- the in-memory snapshot -----------------------------------------------------
    def _version_from_row(self, r) -> AdapterVersion:
        name, version = r[0], r[1]
        return AdapterVersion(name, version, self.root / "adapters" / name / str(version), r[2],
                              AdapterManifest.from_json(json.loads(r[3])), json.loads(r[4]), r[5], r[6])

    _VERSION_COLS = "name, version, created_at, manifest, lineage, base_fingerprint, sha256"

    def _snapshot(self) -> _View:
        """The registry as of now: the cached view, reloaded (only the names that changed) when the
        event log moved, whichever thread or process made the change."""
        view = self._view
        if self.last_event_seq() == view.seq:
            return view
        with self._read() as c:
            seq = int(c.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])
            if view.seq < 0 or seq - view.seq > 500:
                versions: dict[str, dict[int, AdapterVersion]] = {}
                for r in c.execute(f"SELECT {self._VERSION_COLS} FROM versions ORDER BY name, version"):
                    versions.setdefault(r[0], {})[r[1]] = self._version_from_row(r)
                routes = {r[0]: _route_from_row(r[0], r[1:]) for r in
                          c.execute("SELECT name, versions, sticky, guard, updated_at, updated_by FROM routes")}
            else:
                versions, routes = dict(view.versions), dict(view.routes)
                for (name,) in c.execute("SELECT DISTINCT name FROM events WHERE seq > ?", (view.seq,)).fetchall():
                    vs = {r[1]: self._version_from_row(r) for r in
                          c.execute(f"SELECT {self._VERSION_COLS} FROM versions WHERE name = ? ORDER BY version", (name,))}
                    if vs:
                        versions[name] = vs
                    else:
                        versions.pop(name, None)
                    route = self._route_row(c, name)
                    if route is None:
                        routes.pop(name, None)
                    else:
                        routes[name] = route
        new = _View(seq, versions, routes)
        with self._view_lock:
            if new.seq > self._view.seq:
                self._view = new
            return self._view

    # --- checks ---------------------------------------------------------------------
    def check_name(self, name) -> None:
        """InvalidRequest unless `name` can name an adapter: a bare name, or `tenant:name` (tenancy.py)."""
        if isinstance(name, str) and SEP in name:
            tenant, name = name.split(SEP, 1)
            check_tenant(tenant, allow_all=False)
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise InvalidRequest(f"invalid adapter name {name!r}: use 1-64 characters from letters, digits, '.', '_' "
                                 "and '-', starting with a letter or digit (no '@', '/' or spaces)")
        reserved = list(RESERVED_NAMES) + ([self.base.model_id] if self.base is not None else [])
        if name.casefold() in (r.casefold() for r in reserved):
            raise InvalidRequest(f"adapter name {name!r} is reserved: it names the base model")

    def _allowed(self, real: Path) -> bool:
        if _is_within(real, self.root):
            return True
        return self.allowed_roots is None or any(_is_within(real, r) for r in self.allowed_roots)

    def _check_source(self, source_dir) -> Path:
        """The real source directory; AdapterPathForbidden when it (or a file in it, through a symlink)
        lies outside the allowed roots, symlinks and '..' resolved."""
        if not isinstance(source_dir, (str, os.PathLike)) or not str(source_dir):
            raise InvalidRequest(f"adapter path must be a non-empty path, got {source_dir!r}")
        raw = Path(source_dir).expanduser()
        real = raw.resolve()
        if not self._allowed(real):
            how = "" if str(real) == os.path.abspath(raw) else f" (it resolves to {str(real)!r})"
            raise AdapterPathForbidden(f"adapter path {str(source_dir)!r}{how} is outside the allowed adapter roots "
                                       f"{[str(r) for r in self.allowed_roots or []]}")
        if not real.is_dir():
            raise InvalidAdapter(f"adapter path {str(source_dir)!r} does not exist or is not a directory")
        self._check_files_allowed(real, str(source_dir))
        return real

    def _check_files_allowed(self, real_dir: Path, shown: str) -> None:
        for f in real_dir.iterdir():
            if f.is_symlink() and not self._allowed(f.resolve()):
                raise AdapterPathForbidden(f"{f.name} in adapter path {shown!r} is a symlink to a file outside the allowed adapter roots")

    def _check_lineage_base(self, lineage: dict | None) -> None:
        fp = (lineage or {}).get("base_fingerprint")
        if (self.base is not None and isinstance(fp, str) and fp.startswith("sha256:")
                and self.base.fingerprint.startswith("sha256:") and fp != self.base.fingerprint):
            raise InvalidAdapter(f"base model mismatch: the adapter's lineage says it was trained on base fingerprint {fp}, "
                                 f"but the base model {self.base.model_id!r} has fingerprint {self.base.fingerprint}")

    def _check_compatible(self, v: AdapterVersion) -> AdapterVersion:
        if (self.base is not None and v.base_fingerprint and v.base_fingerprint != self.base.fingerprint
                and v.base_fingerprint.startswith("sha256:") and self.base.fingerprint.startswith("sha256:")):
            raise InvalidAdapter(f"adapter {v.ref} was registered for base fingerprint {v.base_fingerprint}, but the base "
                                 f"model {self.base.model_id!r} has fingerprint {self.base.fingerprint}; register it again for this base")
        return v

    # --- versions -------------------------------------------------------------------
    def register(self, name: str, source_dir, *, lineage: dict | None = None, caller: str = "api") -> AdapterVersion:
        """Validates the PEFT directory `source_dir` and adds it as the next version of `name`."""
        self.check_name(name)
        if lineage is not None and not isinstance(lineage, dict):
            raise InvalidRequest(f"lineage must be a JSON object, got {type(lineage).__name__}")
        lineage_json = json.dumps(lineage or {}, default=str, sort_keys=True)
        src = self._check_source(source_dir)
        self._check_lineage_base(lineage)
        validate_adapter_dir(src, self.base, check_values=False)  # fail fast, before copying anything
        tmp = self.root / "tmp" / f"{name}.{os.getpid()}.{uuid.uuid4().hex[:12]}"
        final: Path | None = None
        committed = False
        try:
            self._copy_files(src, tmp, str(source_dir))
            # the copy is what we keep (the source may change under us): validate it, values too
            manifest = validate_adapter_dir(tmp, self.base)
            sha = _dir_sha256(tmp)
            _fsync_dir(tmp)
            with self._write() as c:
                version = self._allocate_version(c, name)
                parent = self.root / "adapters" / name
                parent.mkdir(exist_ok=True)
                final = parent / str(version)
                os.rename(tmp, final)
                _fsync_dir(parent)
                c.execute(
                    "INSERT INTO versions(name, version, path, created_at, manifest, lineage, base_fingerprint, sha256, caller) "
                    "VALUES (?,?,?,?,?,?,?,?,?)",
                    (name, version, f"adapters/{name}/{version}", time.time(), json.dumps(manifest.to_json()), lineage_json,
                     self.base.fingerprint if self.base else None, sha, caller),
                )
                self._event(c, "registered", name, version, caller, {"sha256": sha, "kind": manifest.kind})
            committed = True
        finally:
            if not committed:
                shutil.rmtree(tmp, ignore_errors=True)
                if final is not None:
                    shutil.rmtree(final, ignore_errors=True)
                self._remove_empty_parent(name)
        return self.get(name, version)

    def _copy_files(self, src: Path, dst: Path, shown: str) -> None:
        """Copies the top-level regular files of `src` (following symlinks that stay inside the allowed
        roots) into a new directory `dst`, fsyncing each."""
        dst.mkdir()
        for f in sorted(src.iterdir()):
            if not f.is_file():  # directories (checkpoints, runs/) and special files are not part of an adapter
                continue
            if f.suffix.lower() in PICKLE_SUFFIXES:
                raise InvalidAdapter(f"adapter directory {shown!r} contains pickle file {f.name!r}; only safetensors weights are accepted")
            real = f.resolve()
            if not self._allowed(real):
                raise AdapterPathForbidden(f"{f.name} in adapter path {shown!r} is a symlink to a file outside the allowed adapter roots")
            with open(real, "rb") as fi, open(dst / f.name, "wb") as fo:
                shutil.copyfileobj(fi, fo, 1 << 20)
                fo.flush()
                os.fsync(fo.fileno())

    def _allocate_version(self, c, name: str) -> int:
        """The next version of `name`; call inside a write transaction. Skips numbers whose directory
        exists (left by a crash between rename and commit), so a number is never reused."""
        row = c.execute("SELECT next_version FROM counters WHERE name = ?", (name,)).fetchone()
        version = row[0] if row else 1
        parent = self.root / "adapters" / name
        if parent.is_dir():
            on_disk = [int(d.name) for d in parent.iterdir() if d.name.isdigit()]
            version = max([version] + [v + 1 for v in on_disk])
        c.execute("INSERT INTO counters(name, next_version) VALUES (?, ?) "
                  "ON CONFLICT(name) DO UPDATE SET next_version = excluded.next_version", (name, version + 1))
        return version

    def _remove_empty_parent(self, name: str) -> None:
        # under the write lock: a concurrent register makes the parent and renames into it under the same lock
        parent = self.root / "adapters" / name
        if not parent.is_dir():
            return
        with self._write():
            with contextlib.suppress(OSError):
                parent.rmdir()  # only succeeds when empty

    def get(self, name: str, version: int | None = None) -> AdapterVersion:
        """One version (None: the latest); AdapterNotFound if the name or version does not exist."""
        vs = self._snapshot().versions.get(name)
        if not vs:
            raise AdapterNotFound(f"adapter {name!r} does not exist")
        if version is None:
            return vs[max(vs)]
        if isinstance(version, bool) or not isinstance(version, int) or version not in vs:
            raise AdapterNotFound(f"adapter {name!r} has no version {version!r} (versions: {sorted(vs)})")
        return vs[version]

    def versions(self, name: str) -> list[AdapterVersion]:
        """Every live version of `name`, oldest first; AdapterNotFound for an unknown name."""
        vs = self._snapshot().versions.get(name)
        if not vs:
            raise AdapterNotFound(f"adapter {name!r} does not exist")
        return [vs[k] for k in sorted(vs)]

    def list(self) -> list[AdapterVersion]:
        view = self._snapshot()
        return [v for name in sorted(view.versions) for _, v in sorted(view.versions[name].items())]

    def names(self) -> list[str]:
        return sorted(self._snapshot().versions)

    def delete(self, name: str, version: int | None = None, *, caller: str = "api") -> list[AdapterVersion]:
        """Removes one version, or (None) every version of `name` and its route. A version its route
        still sends traffic to is refused (AdapterConflict). Files go after the registry commit."""
        with self._write() as c:
            rows = c.execute(f"SELECT {self._VERSION_COLS} FROM versions WHERE name = ? ORDER BY version", (name,)).fetchall()
            if not rows:
                raise AdapterNotFound(f"adapter {name!r} does not exist")
            existing = [self._version_from_row(r) for r in rows]
            if version is not None and version not in {v.version for v in existing}:
                raise AdapterNotFound(f"adapter {name!r} has no version {version!r} (versions: {[v.version for v in existing]})")
            removed = existing if version is None else [v for v in existing if v.version == version]
            route = self._route_row(c, name)
            if version is not None and route is not None and route.versions.get(version, 0) > 0:
                raise AdapterConflict(f"version {version} of {name!r} still receives {route.versions[version]}% of the route's "
                                      f"traffic ({route.to_json()['versions']}); change the route first")
            if version is None:
                c.execute("DELETE FROM versions WHERE name = ?", (name,))
                if route is not None:
                    c.execute("DELETE FROM routes WHERE name = ?", (name,))
                    self._history(c, name, caller, "delete", route, None, "adapter deleted")
            else:
                c.execute("DELETE FROM versions WHERE name = ? AND version = ?", (name, version))
                if route is not None and version in route.versions:  # a 0% entry: drop it, the version is gone
                    kept = {v: w for v, w in route.versions.items() if v != version}
                    self._put_route(c, name, kept, route.sticky, route.guard, caller, "prune", route, f"version {version} deleted")
            for v in removed:
                self._event(c, "deleted", name, v.version, caller)
        for v in removed:
            shutil.rmtree(v.path, ignore_errors=True)
        self._remove_empty_parent(name)
        return removed

    # --- routes ---------------------------------------------------------------------
    def _route_row(self, c, name: str) -> Route | None:
        return _route_from_row(name, c.execute(
            "SELECT versions, sticky, guard, updated_at, updated_by FROM routes WHERE name = ?", (name,)).fetchone())

    def _history(self, c, name, caller, action, old: Route | None, new: Route | None, reason=None) -> None:
        c.execute("INSERT INTO route_history(name, at, caller, action, old, new, reason) VALUES (?,?,?,?,?,?,?)",
                  (name, time.time(), caller, action, json.dumps(old.to_json()) if old else None,
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
        self._history(c, name, caller, action, old, new, reason)
        return new

    @staticmethod
    def parse_weights(versions) -> dict[int, int]:
        """{version: percent} from a mapping whose keys may be strings ("2") and values integer percents;
        InvalidRequest unless they are integers 0..100 summing to 100."""
        if not isinstance(versions, dict) or not versions:
            raise InvalidRequest(f"route 'versions' must be a non-empty mapping of version numbers to percentages, got {versions!r}")
        out: dict[int, int] = {}
        for k, w in versions.items():
            if isinstance(k, bool):
                raise InvalidRequest(f"route version {k!r} is not an integer")
            try:
                v = int(k)
            except (TypeError, ValueError):
                raise InvalidRequest(f"route version {k!r} is not an integer") from None
            if str(v) != str(k).strip() or v < 1:
                raise InvalidRequest(f"route version {k!r} is not a positive integer")
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
        if guard is not None and not isinstance(guard, dict):
            raise InvalidRequest(f"route guard must be a JSON object or null, got {guard!r}")
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

    def rollback(self, name: str, *, caller: str = "api", reason: str | None = None) -> Route:
        """Restores the route as it was before its latest change; InvalidRequest when there was none."""
        with self._write() as c:
            known = self._known(c, name)
            if not known:
                raise AdapterNotFound(f"adapter {name!r} does not exist")
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
            return self._put_route(c, name, weights, prev.get("sticky"), prev.get("guard"), caller, "rollback",
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
