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
"""
from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path


class Registry:
    """A pool of connections and the transactions the store runs on them."""

    MAX_IDLE_CONNECTIONS = 16
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
