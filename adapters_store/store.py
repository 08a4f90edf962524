"""The versioned adapter store: immutable versions on disk, a SQLite registry, routes and their history.

Layout under `root`:
    registry.sqlite3              versions, per-name version counters, routes, route history, event log
    adapters/<name>/<version>/    a copy of the adapter's own files (`ADAPTER_FILES`), never modified
    tmp/<entry>/, <entry>.lock    registrations in progress (renamed into place when complete), each
                                  guarded by an flock on its .lock file while its process lives

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

Threads and processes may share one store: SQLite serialises writers (`BEGIN IMMEDIATE`, WAL mode);
threads borrow connections from a small pool. Reads come from an in-memory snapshot refreshed when the event
log's head moves (one indexed query per read), so `resolve` stays cheap on the request path.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import sqlite3
import stat
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AdapterConflict, AdapterNotFound, AdapterPathForbidden, InvalidAdapter, InvalidRequest
from .peft_format import (
    CONFIG_FILE, SCORE_HEAD_FILE, WEIGHTS_FILE, AdapterManifest, BaseModelSpec, shown_path, validate_adapter_dir,
)
from .refs import MAX_VERSION, parse_version

log = logging.getLogger("loraplex.store")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
RESERVED_NAMES = ("default",)  # the server answers model="default" with the base model
STICKY_KINDS = ("user", "session")
# What a registration copies: the adapter (config, weights, a reward head) and the small files PEFT / TRL
# save beside it (model card, tokenizer). Anything else in the directory (checkpoints, logs, junk) stays behind.
WEIGHT_FILES = (WEIGHTS_FILE, SCORE_HEAD_FILE)
SIDE_FILES = ("README.md", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
ADAPTER_FILES = (CONFIG_FILE, *WEIGHT_FILES, *SIDE_FILES)
DEFAULT_MAX_ADAPTER_BYTES = 4 << 30  # all of a version's files together (`loraplex serve --max-adapter-bytes`)
MAX_SIDE_FILE_BYTES = 64 << 20  # one tokenizer / README file
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux
MAX_LINEAGE_BYTES = 256 << 10  # a version's lineage as JSON
GUARD_MAX_MIN_REQUESTS = 1_000_000  # fits gRPC's uint32 RouteGuard.min_requests
GUARD_DEFAULT_MIN_REQUESTS = 20
_VERSION_DIR = re.compile(r"[0-9]{1,10}", re.ASCII)

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


def lineage_json(lineage) -> str:
    """A version's lineage as stored: a JSON object of finite numbers, bounded in size; InvalidRequest otherwise."""
    if lineage is None:
        return "{}"
    if not isinstance(lineage, dict):
        raise InvalidRequest(f"lineage must be a JSON object, got {type(lineage).__name__}", param="lineage")
    try:
        text = json.dumps(lineage, default=str, sort_keys=True, allow_nan=False)
    except ValueError:
        raise InvalidRequest("lineage holds a non-finite number (NaN or Infinity)", param="lineage") from None
    except RecursionError:
        raise InvalidRequest("lineage nests too deeply", param="lineage") from None
    except TypeError:
        raise InvalidRequest("lineage keys must be strings", param="lineage") from None
    if len(text) > MAX_LINEAGE_BYTES:
        raise InvalidRequest(f"lineage is {len(text)} bytes as JSON; at most {MAX_LINEAGE_BYTES} are accepted",
                             param="lineage")
    return text


# An absolute path inside a string: at its start or after a space, quote, '=', ',', '(' or '[' (so URLs stay).
_ABS_PATH = re.compile(r"""(?:(?<=^)|(?<=[\s'"=,(\[]))~?/[^\s'",)\]]*""")


def client_lineage(value):
    """Lineage as shown to clients: every absolute filesystem path (a dataset, the base checkpoint, an
    output directory) reduced to its last component, so no client learns the server's layout."""
    if isinstance(value, dict):
        return {client_lineage(k) if isinstance(k, str) else k: client_lineage(v) for k, v in value.items()}
    if isinstance(value, list):
        return [client_lineage(v) for v in value]
    if isinstance(value, str) and "/" in value:
        return _ABS_PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1], value)
    return value


def _is_within(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


class AdapterStore:
    def __init__(self, root, *, base: BaseModelSpec | None = None, allowed_roots: list | None = None,
                 max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES):
        self.root = Path(root).expanduser().resolve()
        self.base = base
        self.max_adapter_bytes = int(max_adapter_bytes)
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

    # --- registrations in progress (tmp/) ------------------------------------------
    @staticmethod
    @contextlib.contextmanager
    def _try_lock(lock: Path):
        """Yields None (no lock file), False (a live registration holds it) or True (held by us now)."""
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            yield None
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def _clean_tmp(self) -> None:
        """Removes what crashed registrations left in tmp/, whatever its age; never an entry whose owner lives."""
        tmp = self.root / "tmp"
        for entry in sorted(tmp.iterdir()):
            if entry.name.endswith(".lock"):
                continue
            lock = entry.with_name(entry.name + ".lock")
            with self._try_lock(lock) as held:
                if held is False:
                    continue  # a registration in progress (another process): its files are its own
                with contextlib.suppress(OSError):
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                if held:
                    with contextlib.suppress(OSError):
                        lock.unlink()
        for lock in tmp.glob("*.lock"):
            if not lock.with_name(lock.name[: -len(".lock")]).exists():
                with self._try_lock(lock) as held:
                    if held:
                        with contextlib.suppress(OSError):
                            lock.unlink()

    def _claim_tmp(self, name: str) -> tuple[Path, int]:
        """A fresh tmp/ entry (not created yet) and the fd of its held lock; the entry is ours while the fd is open."""
        tmp = self.root / "tmp"
        while True:
            entry = tmp / f"{name}.{os.getpid()}.{uuid.uuid4().hex[:12]}"
            lock = entry.with_name(entry.name + ".lock")
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # a cleaner may have swept the lock file between its creation and our flock: then try again
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    return entry, fd
            except FileNotFoundError:
                pass
            os.close(fd)

    @staticmethod
    def _release_tmp(entry: Path, fd: int) -> None:
        shutil.rmtree(entry, ignore_errors=True)  # gone already after a successful rename
        with contextlib.suppress(OSError):
            os.unlink(entry.with_name(entry.name + ".lock"))
        os.close(fd)

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

    def _servable_rows(self, rows) -> dict[int, AdapterVersion]:
        """The versions of `rows` a reader may see. A row that registration would refuse today (written by an
        older release: a NaN scale, say) is left out of every read, logged, never served; `delete` removes it."""
        out = {}
        for r in rows:
            try:
                v = self._version_from_row(r)
            except (ValueError, KeyError, TypeError) as e:
                log.warning("not serving %s@%s: its stored record is invalid (%s); delete it", r[0], r[1], e)
                continue
            out[v.version] = v
        return out

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

    # --- checks ---------------------------------------------------------------------
    def check_name(self, name) -> None:
        """InvalidRequest unless `name` can name an adapter."""
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
        lies outside the allowed roots, symlinks and '..' resolved. Errors name the path as the client
        wrote it, never what it resolves to nor the allowed roots themselves (server layout)."""
        if not isinstance(source_dir, (str, os.PathLike)) or not str(source_dir):
            raise InvalidRequest("adapter path must be a non-empty string", param="path")
        text = str(source_dir)
        if "\0" in text or not text.isprintable():
            raise InvalidRequest("adapter path contains NUL or control characters", param="path")
        if len(text) > MAX_PATH_CHARS or any(len(part) > 255 for part in text.split("/")):
            raise InvalidRequest(f"adapter path is longer than {MAX_PATH_CHARS} characters or has a component longer "
                                 "than 255", param="path")
        shown = shown_path(text)
        try:
            real = Path(text).expanduser().resolve()
            allowed = self._allowed(real)
            is_dir = allowed and real.is_dir()
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a path the OS refuses
            raise InvalidAdapter(f"adapter path {shown!r} cannot be resolved", param="path") from None
        if not allowed:
            log.info("refused adapter path %r: it resolves to %s, outside the allowed roots %s", text, real,
                     self.allowed_roots)
            raise AdapterPathForbidden(f"adapter path {shown!r} is outside the allowed adapter roots", param="path")
        if not is_dir:
            raise InvalidAdapter(f"adapter path {shown!r} does not exist or is not a directory", param="path")
        return real

    def _plan_copy(self, real_dir: Path, shown: str) -> list[tuple[str, Path, int]]:
        """(file name, real file, size) of what registering `real_dir` copies: the `ADAPTER_FILES` present,
        each a regular file inside the allowed roots, within the size caps."""
        plan, total = [], 0
        for fname in ADAPTER_FILES:
            f = real_dir / fname
            if not f.is_symlink() and not f.exists():
                continue
            try:
                real = f.resolve()
                if not self._allowed(real):
                    raise AdapterPathForbidden(f"{fname} in adapter path {shown!r} is a symlink to a file outside the "
                                               "allowed adapter roots", param="path")
                st = os.stat(real)
            except (OSError, RuntimeError):
                raise InvalidAdapter(f"{fname} in adapter path {shown!r} cannot be read", param="path") from None
            if not stat.S_ISREG(st.st_mode):
                raise InvalidAdapter(f"{fname} in adapter path {shown!r} is not a regular file", param="path")
            cap = self.max_adapter_bytes if fname in WEIGHT_FILES or fname == CONFIG_FILE else MAX_SIDE_FILE_BYTES
            total += st.st_size
            if st.st_size > cap or total > self.max_adapter_bytes:
                raise InvalidAdapter(f"adapter path {shown!r}: {fname} ({st.st_size} bytes) takes the adapter past "
                                     f"the size limit ({min(cap, self.max_adapter_bytes)} bytes; see "
                                     "--max-adapter-bytes)", param="path")
            plan.append((fname, real, st.st_size))
        return plan

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
        lineage_text = lineage_json(lineage)
        src = self._check_source(source_dir)
        shown = shown_path(source_dir)
        plan = self._plan_copy(src, shown)
        self._check_lineage_base(lineage)
        validate_adapter_dir(src, self.base, check_values=False, shown=shown)  # fail fast, before copying anything
        tmp, lock_fd = self._claim_tmp(name)
        final: Path | None = None
        committed = False
        try:
            self._copy_files(plan, tmp, shown)
            # the copy is what we keep (the source may change under us): validate it, values too
            manifest = validate_adapter_dir(tmp, self.base, shown=shown)
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
                    (name, version, f"adapters/{name}/{version}", time.time(),
                     json.dumps(manifest.to_json(), allow_nan=False), lineage_text,
                     self.base.fingerprint if self.base else None, sha, caller),
                )
                self._event(c, "registered", name, version, caller, {"sha256": sha, "kind": manifest.kind})
            committed = True
        finally:
            if not committed and final is not None:
                shutil.rmtree(final, ignore_errors=True)
            self._release_tmp(tmp, lock_fd)
            if not committed:
                self._remove_empty_parent(name)
        return self.get(name, version)

    @staticmethod
    def _copy_files(plan: list[tuple[str, Path, int]], dst: Path, shown: str) -> None:
        """Copies the planned files into a new directory `dst`, fsyncing each; a file that grew since it was
        planned (or is no longer a regular file) fails the registration rather than blowing the size cap."""
        dst.mkdir()
        for fname, real, size in plan:
            try:
                fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO swapped in must not block us
            except OSError:
                raise InvalidAdapter(f"{fname} in adapter path {shown!r} cannot be read", param="path") from None
            with open(fd, "rb") as fi, open(dst / fname, "wb") as fo:
                if not stat.S_ISREG(os.fstat(fi.fileno()).st_mode):
                    raise InvalidAdapter(f"{fname} in adapter path {shown!r} is not a regular file", param="path")
                left = size
                while left > 0:
                    block = fi.read(min(1 << 20, left))
                    if not block:
                        break
                    fo.write(block)
                    left -= len(block)
                if left or fi.read(1):
                    raise InvalidAdapter(f"{fname} in adapter path {shown!r} changed while it was copied",
                                         param="path")
                fo.flush()
                os.fsync(fo.fileno())

    def _allocate_version(self, c, name: str) -> int:
        """The next version of `name`; call inside a write transaction. Skips numbers whose directory
        exists (left by a crash between rename and commit), so a number is never reused."""
        row = c.execute("SELECT next_version FROM counters WHERE name = ?", (name,)).fetchone()
        version = row[0] if row else 1
        parent = self.root / "adapters" / name
        if parent.is_dir():
            on_disk = [int(d.name) for d in parent.iterdir() if _VERSION_DIR.fullmatch(d.name)]
            version = max([version] + [v + 1 for v in on_disk])
        c.execute("INSERT INTO counters(name, next_version) VALUES (?, ?) "
                  "ON CONFLICT(name) DO UPDATE SET next_version = excluded.next_version", (name, version + 1))
        return version

    def _deletable(self, r) -> AdapterVersion:
        """A row as a version to delete, even one `_servable_rows` hides (its manifest is not read back)."""
        try:
            return self._version_from_row(r)
        except (ValueError, KeyError, TypeError):
            return AdapterVersion(r[0], r[1], self.root / "adapters" / r[0] / str(r[1]), r[2], None, {}, r[5], r[6])

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
            existing = [self._deletable(r) for r in rows]
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
