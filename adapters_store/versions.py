"""Adapter versions: what a registration copies, how it is checked, copied, committed and deleted.

`VersionsMixin` is the part of `AdapterStore` (the façade in `store.py`) that owns the files: the
checks on a name and a source path, the copy plan, the tmp/ entries of registrations in progress
and their crash cleanup, and the version rows. It reaches the registry only through the store's
`_write` / `_read` / `_event` (see `registry.py`), so it runs unchanged on every registry backend.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AdapterConflict, AdapterNotFound, AdapterPathForbidden, InvalidAdapter, InvalidRequest
from .objects import SWEEP_GRACE_S, StoredFile
from .peft_format import (
    CONFIG_FILE, SCORE_HEAD_FILE, WEIGHTS_FILE, AdapterManifest, shown_path, validate_adapter_dir,
)
from .tenancy import BARE_NAME, SEP, check_tenant

log = logging.getLogger("loraplex.store")

NAME_RE = re.compile(BARE_NAME, re.ASCII)
RESERVED_NAMES = ("default",)  # the server answers model="default" with the base model
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
_VERSION_DIR = re.compile(r"[0-9]{1,10}", re.ASCII)


@dataclass(frozen=True)
class AdapterVersion:
    name: str
    version: int
    local: Path  # its directory in the store, or (object storage) where the local cache keeps its files
    created_at: float
    manifest: AdapterManifest
    lineage: dict
    base_fingerprint: str | None
    sha256: str  # over the version directory's file names and bytes
    fetch: Callable[[AdapterVersion], Path] | None = field(default=None, repr=False, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def path(self) -> Path:
        """The version's files as a local directory. In object storage they are fetched into the cache first,
        each checked against the sha256 recorded at registration (a corrupt or partial one is fetched again)."""
        return self.local if self.fetch is None else self.fetch(self)



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


class VersionsMixin:
    """Registration, reads and deletion of versions; mixed into `AdapterStore`."""

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
    def _version_from_row(self, r) -> AdapterVersion:
        name, version = r[0], r[1]
        return AdapterVersion(name, version, self.root / "adapters" / name / str(version), r[2],
                              AdapterManifest.from_json(json.loads(r[3])), json.loads(r[4]), r[5], r[6],
                              None if self.objects is None else self._fetch_version)

    def _fetch_version(self, v: AdapterVersion) -> Path:
        rows = self._query("SELECT file, sha256, size FROM version_files WHERE name = ? AND version = ? ORDER BY file",
                           (v.name, v.version))
        return self.objects.local_dir(v.local, v.ref, [StoredFile(r[0], r[1], int(r[2])) for r in rows])

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

    _VERSION_COLS = "name, version, created_at, manifest, lineage, base_fingerprint, sha256"

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
            # object storage: every blob is uploaded before the row exists (objects.py argues the ordering)
            files = None if self.objects is None else self.objects.upload(tmp, [f for f, _, _ in plan])
            with self._write() as c:
                version = self._allocate_version(c, name)
                if files is None:
                    parent = self.root / "adapters" / name
                    parent.mkdir(exist_ok=True)
                    final = parent / str(version)
                    os.rename(tmp, final)
                    _fsync_dir(parent)
                    where = f"adapters/{name}/{version}"
                else:
                    self.objects.ensure_uploaded(tmp, files)  # under the lock a sweep decides under
                    for f in files:
                        c.execute("INSERT INTO version_files(name, version, file, sha256, size) VALUES (?,?,?,?,?)",
                                  (name, version, f.file, f.sha256, f.size))
                    where = self.objects.url
                c.execute(
                    "INSERT INTO versions(name, version, path, created_at, manifest, lineage, base_fingerprint, sha256, caller) "
                    "VALUES (?,?,?,?,?,?,?,?,?)",
                    (name, version, where, time.time(),
                     json.dumps(manifest.to_json(), allow_nan=False), lineage_text,
                     self.base.fingerprint if self.base else None, sha, caller),
                )
                self._event(c, "registered", name, version, caller, {"sha256": sha, "kind": manifest.kind})
            committed = True
            if files is not None:  # the checked copy becomes this process's cached copy (no fetch on first use)
                self._keep_as_cached(tmp, name, version)
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

    def _keep_as_cached(self, tmp: Path, name: str, version: int) -> None:
        # never over a directory that exists: a poller may be filling it already (a stale one, left by a registry
        # this cache served before, is corrected file by file when it is read: every file is checked by hash)
        cached = self.root / "adapters" / name / str(version)
        with contextlib.suppress(OSError):
            cached.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, cached)  # fails (and tmp is removed) when `cached` exists and is not empty

    def _allocate_version(self, c, name: str) -> int:
        """The next version of `name`; call inside a write transaction. Skips numbers whose directory
        exists (left by a crash between rename and commit), so a number is never reused."""
        row = c.execute("SELECT next_version FROM counters WHERE name = ?", (name,)).fetchone()
        version = row[0] if row else 1
        parent = self.root / "adapters" / name
        if parent.is_dir() and self.objects is None:  # a cache's directories say nothing about numbers
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
                c.execute("DELETE FROM version_files WHERE name = ?", (name,))
                if route is not None:
                    c.execute("DELETE FROM routes WHERE name = ?", (name,))
                    self._history(c, name, caller, "delete", route, None, "adapter deleted")
            else:
                c.execute("DELETE FROM versions WHERE name = ? AND version = ?", (name, version))
                c.execute("DELETE FROM version_files WHERE name = ? AND version = ?", (name, version))
                if route is not None and version in route.versions:  # a 0% entry: drop it, the version is gone
                    kept = {v: w for v, w in route.versions.items() if v != version}
                    self._put_route(c, name, kept, route.sticky, route.guard, caller, "prune", route, f"version {version} deleted")
            for v in removed:
                self._event(c, "deleted", name, v.version, caller)
        for v in removed:  # the files, or the cached copy (the objects are left to `sweep_objects`)
            shutil.rmtree(v.local, ignore_errors=True)
        self._remove_empty_parent(name)
        return removed

    def sweep_objects(self, grace_s: float = SWEEP_GRACE_S) -> int:
        """Object storage: deletes blobs no version references that are older than `grace_s`, and cached
        copies of versions that are gone; the number of blobs deleted. Nothing to do for a local store."""
        if self.objects is None:
            return 0
        adapters = self.root / "adapters"
        cached = [(d.parent.name, d) for d in adapters.glob("*/*") if _VERSION_DIR.fullmatch(d.name)]
        live = {(r[0], r[1]) for r in self._query("SELECT name, version FROM versions")}  # after listing the cache
        for name, d in cached:
            if (name, int(d.name)) not in live:
                shutil.rmtree(d, ignore_errors=True)
                self._remove_empty_parent(name)
        candidates = self.objects.unreferenced_candidates(grace_s)
        if not candidates:
            return 0
        with self._write() as c:  # registrations check their blobs under this lock: none commits meanwhile
            referenced = {r[0] for r in c.execute("SELECT DISTINCT sha256 FROM version_files")}
            gone = [s for s in candidates if s not in referenced]
            self.objects.delete_blobs(gone)
        if gone:
            log.info("swept %d unreferenced blobs from %s", len(gone), self.objects.url)
        return len(gone)
