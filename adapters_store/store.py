"""The versioned adapter store: immutable versions on disk, a SQLite registry, routes and their history.

Layout under `root`:
    registry.sqlite3              versions, per-name version counters, routes, route history, event log
    adapters/<name>/<version>/    a copy of the adapter's own files (`ADAPTER_FILES`), never modified
    tmp/<entry>/, <entry>.lock    registrations in progress (renamed into place when complete), each
                                  guarded by an flock on its .lock file while its process lives
With `s3://bucket/prefix` the files live in object storage and `root` is their local cache, laid out the
same (plus `objects.json`, naming the bucket); `objects.py` says how registration orders upload and commit.

Registration checks the name, the source path (allowed roots, symlinks and '..' resolved), plans the
copy (only the files PEFT writes for an adapter, `ADAPTER_FILES`; regular files within the size cap
`max_adapter_bytes`: never every top-level file of a directory), validates the adapter, copies it
into `tmp/`, validates the copy (values too: finite in the serving dtype), fsyncs, and then, holding
the registry's write lock, allocates the version, renames the copy into place and records it; a
failure at any step removes what it wrote, so the store never holds a partial adapter or a row
without files. Leftovers of a crashed registration are removed when a store is opened: an entry
whose .lock nobody holds has no live owner (a registration in progress in another process holds
its lock, so it is never swept from under it). Version
numbers come from a per-name counter that survives deletes, so `name@3` always means the same
weights. Every change appends to an event log in the same transaction; other processes (the
server, when the trainer registers) poll it with `events_since`.

Routes say where a bare adapter name goes: `{version: percent}` summing to 100. With a sticky key
(end user or session id) the pick is a hash of (name, key), so one key keeps its version while the
route holds, and raising the newest version's share only moves keys onto it. Each route change is
one transaction (readers see the old route or the new one) recorded in the route history with time,
caller and reason; `rollback` restores the route as it was before the latest change (two rollbacks
in a row swap back, like `kubectl rollout undo`).

The code is split along the registry seam: `registry.py` (the database: connections, transactions),
`versions.py` (files and version rows), `routes.py` (routes, history, the sticky pick); this module is the
façade that joins them with the event log and the in-memory snapshot. Threads and processes may share
one store. Reads come from an in-memory snapshot refreshed when the event
log's head moves (one indexed query per read), so `resolve` stays cheap on the request path.
"""
from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidRequest
from .objects import ObjectStore, default_cache_dir, is_s3_url, marked_store, parse_s3_url
from .peft_format import BaseModelSpec
from .refs import MAX_VERSION, parse_version  # noqa: F401  (re-exported)
from .registry import REGISTRY_ENV, Registry, SQLiteRegistry, open_registry
from .routes import (  # noqa: F401  (re-exported: the store's public names stay importable from here)
    GUARD_DEFAULT_MIN_REQUESTS, GUARD_MAX_MIN_REQUESTS, STICKY_KINDS, Route, RouteChange, RoutesMixin, _route_from_row,
    _stored_guard, check_guard,
)
from .versions import (  # noqa: F401
    ADAPTER_FILES, DEFAULT_MAX_ADAPTER_BYTES, MAX_LINEAGE_BYTES, MAX_PATH_CHARS, MAX_SIDE_FILE_BYTES, NAME_RE,
    RESERVED_NAMES, SIDE_FILES, WEIGHT_FILES, AdapterVersion, VersionsMixin, client_lineage, lineage_json,
)

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
CREATE TABLE IF NOT EXISTS version_files (
    name TEXT NOT NULL, version INTEGER NOT NULL, file TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
    PRIMARY KEY (name, version, file));
CREATE TABLE IF NOT EXISTS guard_counts (
    name TEXT NOT NULL, version INTEGER NOT NULL, since REAL NOT NULL, replica TEXT NOT NULL,
    requests INTEGER NOT NULL, errors INTEGER NOT NULL, at REAL NOT NULL, PRIMARY KEY (name, version, since, replica));
"""
# The event log is compacted as it grows: every COMPACT_EVERY events, events older than EVENT_RETENTION_S
# beyond the newest EVENT_KEEP go. Replicas poll it every second, so an hour is far more history than any
# running replica needs; one that starts later loads the registry whole and needs none.
EVENT_KEEP = 10_000
EVENT_RETENTION_S = 3600.0
COMPACT_EVERY = 256
log = logging.getLogger("loraplex.store")



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


class AdapterStore(VersionsMixin, RoutesMixin):
    def __init__(self, root, *, base: BaseModelSpec | None = None, allowed_roots: list | None = None,
                 max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES, registry: str | Registry | None = None,
                 cache_dir=None):
        """`root`: a directory, or an `s3://bucket/prefix` URL (files in object storage, see objects.py) whose
        local cache is `cache_dir` (default `$LORAPLEX_HOME/store-cache/<bucket>/<prefix>`); a cache directory
        names its bucket, so opening it opens the object store too. `registry`: a `Registry`, a postgresql://
        URL or a SQLite path; None: `$LORAPLEX_REGISTRY`, else `registry.sqlite3` in `root` (not for object
        storage: replicas sharing a bucket must share a registry, so one must be named)."""
        if is_s3_url(root):
            objects_url = parse_s3_url(root).url
            local = Path(cache_dir) if cache_dir is not None else default_cache_dir(root)
        else:
            local = Path(root)
            objects_url = marked_store(local.expanduser().resolve())
        local = local.expanduser().resolve()
        if objects_url is not None:
            marked = marked_store(local)
            if marked is not None and marked != objects_url:
                raise InvalidRequest(f"cache directory {local} belongs to {marked}, not {objects_url}: give each "
                                     "store its own --store-cache", param="store")
            if not isinstance(registry, Registry) and not (registry or os.environ.get(REGISTRY_ENV)):
                raise InvalidRequest(f"the store {objects_url} needs a registry named explicitly: "
                                     "--registry postgresql://... (or LORAPLEX_REGISTRY), shared by every replica "
                                     "using the bucket (a SQLite path works for a single process)", param="registry")
        self.objects = None if objects_url is None else ObjectStore(objects_url, local)  # fails before any write
        self.root = local
        self.base = base
        self.max_adapter_bytes = int(max_adapter_bytes)
        self.allowed_roots = None if allowed_roots is None else [Path(r).expanduser().resolve() for r in allowed_roots]
        (self.root / "adapters").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)
        if self.objects is not None:
            self.objects.open_cache()
        self.db_path = self.root / "registry.sqlite3"
        self.registry = registry if isinstance(registry, Registry) else open_registry(registry, self.root)
        if self.objects is not None and isinstance(self.registry, SQLiteRegistry):
            log.warning("store %s uses the SQLite registry %s: only processes on this machine see its versions; "
                        "replicas need a shared --registry postgresql://...", self.objects.url, self.registry.url)
        self._view = _View(-1)
        self._view_lock = threading.Lock()
        self._rng = random.Random()
        self.registry.ensure_schema(_SCHEMA)
        self._clean_tmp()

    def __repr__(self) -> str:
        return f"AdapterStore({self.objects.url if self.objects else str(self.root)!r})"

    # --- plumbing: the registry's transactions (tables other modules add use them too) ---
    def _connection(self):
        return self.registry.connection()

    def _write(self):
        return self.registry.write()

    def _read(self):
        return self.registry.read()

    def _query(self, sql: str, args=()) -> list:
        return self.registry.query(sql, args)

    def close(self) -> None:
        """Closes the store's connections; it must not be used afterwards."""
        self.registry.close()

    # --- the event log --------------------------------------------------------------
    def _event(self, c, kind, name, version, caller, detail=None) -> None:
        now = time.time()
        seq = c.execute("INSERT INTO events(kind, name, version, at, caller, detail) VALUES (?,?,?,?,?,?) "
                        "RETURNING seq",
                        (kind, name, version, now, caller, json.dumps(detail or {}, default=str))).fetchone()[0]
        if seq % COMPACT_EVERY == 0:
            c.execute("DELETE FROM events WHERE seq <= ? AND at < ?", (seq - EVENT_KEEP, now - EVENT_RETENTION_S))
        self.registry.notify(c)

    def last_event_seq(self) -> int:
        return int(self._query("SELECT COALESCE(MAX(seq), 0) FROM events")[0][0])

    def events_since(self, seq: int) -> list[StoreEvent]:
        rows = self._query("SELECT seq, kind, name, version, at, caller, detail FROM events WHERE seq > ? ORDER BY seq", (int(seq),))
        return [StoreEvent(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6])) for r in rows]

    def wait_events(self, seq: int, timeout: float) -> list[StoreEvent]:
        """The events after `seq`, waiting up to `timeout` seconds for one (woken by other writers'
        notifications where the registry has them): what a replica's poller calls in a loop."""
        deadline = time.monotonic() + timeout
        while True:
            events = self.events_since(seq)
            left = deadline - time.monotonic()
            if events or left <= 0:
                return events
            self.registry.wait(left if self.registry.notifies else min(left, 0.1))

    # --- guard outcomes of every replica ---------------------------------------------
    def publish_guard_counts(self, replica: str, counts: dict) -> None:
        """Records what `replica` saw of guarded versions: {(name, version, since): (requests, errors)}.
        Rows of routes that changed since are dropped by `guard_counts`' callers' keys (`since`)."""
        if not counts:
            return
        now = time.time()
        with self._connection() as c:
            for (name, version, since), (n, e) in counts.items():
                c.execute("INSERT INTO guard_counts(name, version, since, replica, requests, errors, at) "
                          "VALUES (?,?,?,?,?,?,?) ON CONFLICT(name, version, since, replica) DO UPDATE SET "
                          "requests = excluded.requests, errors = excluded.errors, at = excluded.at",
                          (name, int(version), float(since), replica, int(n), int(e), now))
            c.execute("DELETE FROM guard_counts WHERE at < ?", (now - EVENT_RETENTION_S,))

    def guard_counts(self, name: str, version: int, since: float) -> dict[str, tuple[int, int]]:
        """{replica: (requests, errors)} published for `name@version` under the guard armed at `since`."""
        rows = self._query("SELECT replica, requests, errors FROM guard_counts WHERE name = ? AND version = ? "
                           "AND since = ?", (name, int(version), float(since)))
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    # --- the in-memory snapshot -----------------------------------------------------
    def _snapshot(self) -> _View:
        """The registry as of now: the cached view, reloaded (only the names that changed) when the
        event log moved, whichever thread or process made the change."""
        view = self._view
        if self.last_event_seq() == view.seq:
            return view
        with self._read() as c:
            seq = int(c.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])
            if view.seq < 0 or seq - view.seq > 500:
                by_name: dict[str, list] = {}
                for r in c.execute(f"SELECT {self._VERSION_COLS} FROM versions ORDER BY name, version"):
                    by_name.setdefault(r[0], []).append(r)
                versions = {n: vs for n, rows in by_name.items() if (vs := self._servable_rows(rows))}
                routes = {r[0]: _route_from_row(r[0], r[1:]) for r in
                          c.execute("SELECT name, versions, sticky, guard, updated_at, updated_by FROM routes")}
            else:
                versions, routes = dict(view.versions), dict(view.routes)
                for (name,) in c.execute("SELECT DISTINCT name FROM events WHERE seq > ?", (view.seq,)).fetchall():
                    vs = self._servable_rows(c.execute(
                        f"SELECT {self._VERSION_COLS} FROM versions WHERE name = ? ORDER BY version", (name,)))
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
