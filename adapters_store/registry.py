"""The registry database behind the store: connections, transactions, schema, the event log.

Everything the store keeps besides the adapter files (versions, counters, routes, route history, the
event log, and the tables other modules add: keys, tenants, audit) lives in one database reached
through a `Registry`. The store's SQL is written once, with `?` placeholders, and runs on every
backend; a backend supplies what differs: how to connect, how a write transaction takes the
registry-wide write lock, and the DDL dialect.

`SQLiteRegistry` is the embedded default (`registry.sqlite3` in the store directory): WAL mode,
writers serialised by `BEGIN IMMEDIATE`, connections pooled (SQLite defers closing a connection's
file descriptor while other connections of the process hold locks on the file, so a connection per
short-lived thread leaked one descriptor per finished thread).

`PostgresRegistry` (`--registry postgresql://...` or `LORAPLEX_REGISTRY`) lets many replicas share one
registry through psycopg 3. A write transaction takes one transaction-scoped advisory lock first, the
same registry-wide write lock SQLite's `BEGIN IMMEDIATE` gives: writers are serialised, so event
sequence numbers commit in order and a reader that has seen event n has seen every event before it
(with concurrent writers a sequence value could commit after a larger one and a poller would skip
it). Reads run at REPEATABLE READ. The DDL stays SQLite-flavoured and is translated here
(`AUTOINCREMENT` keys become identity columns, `REAL` double precision, `INTEGER` bigint), so a
module adding tables (keys, tenants, audit) writes its schema once and calls `ensure_schema`.

Other replicas learn of a change from the event log, which is the source of truth (ordered,
replayable after a disconnect, compacted by age); a PostgreSQL `NOTIFY` sent in the writing
transaction (delivered at commit) only wakes their pollers at once (`wait`), so a change is seen in
milliseconds rather than at the next poll, and a lost notification costs at most one poll interval.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import sqlite3
import threading
import time
import uuid
from pathlib import Path

REGISTRY_ENV = "LORAPLEX_REGISTRY"  # a postgresql:// URL; unset: the SQLite file in the store directory
NOTIFY_CHANNEL = "loraplex_events"
# This process's name in the tables replicas share (guard counts, quota usage): host, pid and a random part,
# so a restarted process on the same pid is a new replica.
REPLICA_ID = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
_WRITE_LOCK_KEY = 0x6C6F7261706C6578  # pg_advisory_xact_lock key of the registry's write lock ("loraplex")


class Registry:
    """A pool of connections and the transactions the store runs on them."""

    MAX_IDLE_CONNECTIONS = 16
    notifies = False  # whether `wait` wakes on another writer's commit (else it just sleeps)
    url: str

    def __init__(self):
        self._idle: list = []
        self._pool_lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # backend hooks
    def _open(self):
        raise NotImplementedError

    def _begin_write(self, c) -> None:
        raise NotImplementedError

    def _begin_read(self, c) -> None:
        raise NotImplementedError

    @staticmethod
    def _in_transaction(c) -> bool:
        raise NotImplementedError

    def ensure_schema(self, ddl: str) -> None:
        """Applies `ddl` (SQLite-flavoured `CREATE ... IF NOT EXISTS` statements; idempotent)."""
        raise NotImplementedError

    def notify(self, c) -> None:
        """Inside a write transaction: wake other replicas' `wait` when it commits."""

    def wait(self, timeout: float) -> None:
        """Blocks up to `timeout` seconds, less when another writer's `notify` arrives."""
        time.sleep(timeout)

    @contextlib.contextmanager
    def connection(self):
        with self._pool_lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            c = self._idle.pop() if self._idle else None
        if c is None:
            c = self._open()
        try:
            yield c
        finally:
            if self._in_transaction(c):  # never hand a connection back mid-transaction
                c.execute("ROLLBACK")
            with self._pool_lock:
                keep = not self._closed and len(self._idle) < self.MAX_IDLE_CONNECTIONS
                if keep:
                    self._idle.append(c)
            if not keep:
                c.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def query(self, sql: str, args=()) -> list:
        with self.connection() as c:
            return c.execute(sql, args).fetchall()

    @contextlib.contextmanager
    def write(self):
        """One write transaction holding the registry's write lock until commit. Never nest: the inner
        one would wait for the outer one's lock."""
        with self.connection() as c:
            self._begin_write(c)
            try:
                yield c
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")  # on failure connection() rolls back

    @contextlib.contextmanager
    def read(self):
        """A consistent read snapshot over several queries."""
        with self.connection() as c:
            self._begin_read(c)
            try:
                yield c
            finally:
                c.execute("COMMIT")

    def close(self) -> None:
        """Closes the connections; the registry must not be used afterwards."""
        with self._pool_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for c in idle:
            with contextlib.suppress(Exception):
                c.close()


class SQLiteRegistry(Registry):
    def __init__(self, path):
        super().__init__()
        self.path = Path(path)
        self.url = str(self.path)

    def _open(self) -> sqlite3.Connection:
        c = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        c.execute("PRAGMA busy_timeout=60000")
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=FULL")
        return c

    def _begin_write(self, c) -> None:
        c.execute("BEGIN IMMEDIATE")

    def _begin_read(self, c) -> None:
        c.execute("BEGIN")

    @staticmethod
    def _in_transaction(c) -> bool:
        return c.in_transaction

    def ensure_schema(self, ddl: str) -> None:
        with self.connection() as c:
            c.executescript(ddl)  # concurrent opens wait on the busy timeout


def _pg_ddl(ddl: str) -> str:
    ddl = re.sub(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", ddl)
    ddl = re.sub(r"\bREAL\b", "DOUBLE PRECISION", ddl)
    return re.sub(r"\bINTEGER\b", "BIGINT", ddl)


class _PgConnection:
    """A psycopg connection that takes the store's `?` placeholders (and SQLite's `executescript`)."""

    def __init__(self, raw):
        self.raw = raw

    def execute(self, sql: str, args=()):
        return self.raw.execute(sql.replace("%", "%%").replace("?", "%s"), tuple(args))

    def executescript(self, ddl: str) -> None:
        for stmt in _pg_ddl(ddl).split(";"):
            if stmt.strip():
                self.raw.execute(stmt)

    def close(self) -> None:
        self.raw.close()


class PostgresRegistry(Registry):
    notifies = True

    def __init__(self, url: str):
        super().__init__()
        import psycopg  # only PostgreSQL users need the driver loaded

        self._psycopg = psycopg
        self.url = url
        self._listener = None
        self._listen_lock = threading.Lock()

    def __repr__(self) -> str:  # never the password
        return f"PostgresRegistry({re.sub(r'//[^@/]*@', '//***@', self.url)!r})"

    def _open(self) -> _PgConnection:
        return _PgConnection(self._psycopg.connect(self.url, autocommit=True, connect_timeout=10))

    def _begin_write(self, c) -> None:
        c.execute("BEGIN")
        c.execute("SELECT pg_advisory_xact_lock(?)", (_WRITE_LOCK_KEY,))

    def _begin_read(self, c) -> None:
        c.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def _in_transaction(self, c) -> bool:
        return c.raw.info.transaction_status != self._psycopg.pq.TransactionStatus.IDLE

    def ensure_schema(self, ddl: str) -> None:
        with self.write() as c:  # under the write lock: concurrent CREATE ... IF NOT EXISTS can collide
            c.executescript(ddl)

    def notify(self, c) -> None:
        c.execute("SELECT pg_notify(?, '')", (NOTIFY_CHANNEL,))

    def wait(self, timeout: float) -> None:
        if not self._listen_lock.acquire(blocking=False):  # one waiter listens; others poll
            time.sleep(min(timeout, 0.05))
            return
        try:
            if self._listener is None:
                self._listener = self._psycopg.connect(self.url, autocommit=True, connect_timeout=10)
                self._listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
            for _ in self._listener.notifies(timeout=timeout, stop_after=1):
                pass
        except self._psycopg.Error:  # the server went away: drop the listener, fall back to the poll interval
            with contextlib.suppress(Exception):
                self._listener.close()
            self._listener = None
            time.sleep(min(timeout, 0.5))
        finally:
            self._listen_lock.release()

    def close(self) -> None:
        super().close()
        with self._listen_lock:
            if self._listener is not None:
                with contextlib.suppress(Exception):
                    self._listener.close()
                self._listener = None


def open_registry(url: str | None, store_root) -> Registry:
    """The registry named by `url` (else `$LORAPLEX_REGISTRY`, else the SQLite file in `store_root`)."""
    url = url or os.environ.get(REGISTRY_ENV) or None
    if url is None or url.startswith("sqlite:") or "://" not in url:
        default = Path(store_root) / "registry.sqlite3"
        path = Path(url.removeprefix("sqlite:///").removeprefix("sqlite:")) if url else default
        return SQLiteRegistry(path)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresRegistry(url)
    from .errors import InvalidRequest

    raise InvalidRequest(f"unsupported registry URL scheme in {url.split('://')[0]!r}://...; use postgresql:// "
                         "or a SQLite file path", param="registry")
