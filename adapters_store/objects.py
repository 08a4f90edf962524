"""Adapter files in S3-compatible object storage, behind a local read-through cache checked by content hash.

`loraplex serve --store s3://bucket/prefix` keeps every version's files in a bucket (AWS S3, MinIO, Ceph, R2:
anything that speaks the S3 protocol), so replicas on different machines share them without a shared
filesystem. boto3 finds the endpoint and credentials where every AWS tool does: `AWS_ENDPOINT_URL_S3` /
`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (or a profile, an instance role),
`AWS_DEFAULT_REGION`.

Layout in the bucket, under `prefix/`:
    blobs/sha256/<hex>    one object per distinct file content, named by its SHA-256 (content-addressed)

A version's files are rows of the registry's `version_files` table (name, version, file, sha256, size), written
in the transaction that commits its version row. The ordering that makes a registration all or nothing:
every file is uploaded first (no lock held: uploads can be slow), then, inside the registry's write
transaction, each blob is checked to exist (re-uploaded if a sweep took it meanwhile) and the rows commit.
A version is therefore visible only once every byte it names is in the bucket, and an S3 PUT is atomic (an
object is whole or absent, multipart uploads included), so a registration killed at any point leaves no
version and nothing a replica could half-read: at most unreferenced blobs, which `sweep` deletes. Content
addressing is what lets the upload run before the version number exists (numbers are allocated under the
write lock) and makes a re-registration of the same weights cost no new storage.

The local side is a directory (`--store-cache`, default `$LORAPLEX_HOME/store-cache/<bucket>/<prefix>`) laid
out like a local store (`adapters/<name>/<version>/`, `tmp/` for registrations in progress) with a marker,
`objects.json`, naming the bucket: any tool handed that directory (a trainer job, `loraplex routes`) opens the
same object store. A version's files are fetched into it on first use; every time they are opened each file
is hashed against the sha256 recorded at registration, and a file that is missing, partial or corrupt is
fetched again (to a temporary name, verified, then renamed into place): a bad file is never served.

Deletion removes the rows (so no replica serves the version and each drains it) and the local cached copy;
the objects are left to `sweep`, which deletes blobs no version references and that are older than
`SWEEP_GRACE_S` (a registration uploading right now keeps its fresh blobs). The sweep decides under the
registry's write lock, the same lock under which a registration checks its blobs, so a blob is never deleted
from under a version that commits. The server sweeps when it starts. The sweep knows only its own registry's
references, so a bucket/prefix belongs to one registry: two registries must never share a prefix.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import AdapterNotFound, InvalidRequest, StoreUnavailable

log = logging.getLogger("loraplex.store")

S3_SCHEME = "s3://"
MARKER = "objects.json"  # in a cache directory: the object store it caches
SWEEP_GRACE_S = 3600.0  # unreferenced blobs younger than this are kept: a registration may be about to commit them
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", re.ASCII)  # S3's bucket naming rules
_CHUNK = 1 << 20


def default_home() -> Path:
    """`$LORAPLEX_HOME`, else ./var: where the server keeps its store, cache and jobs by default."""
    return Path(os.environ.get("LORAPLEX_HOME") or "./var")


def is_s3_url(location) -> bool:
    return isinstance(location, str) and location.startswith(S3_SCHEME)


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # without leading or trailing '/'; may be empty

    @property
    def url(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.prefix}".rstrip("/")

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)


def parse_s3_url(url: str) -> S3Location:
    """`s3://bucket[/prefix]`; InvalidRequest naming what is wrong otherwise."""
    if not is_s3_url(url):
        raise InvalidRequest(f"not an s3:// URL: {url!r}", param="store")
    bucket, _, prefix = url[len(S3_SCHEME):].partition("/")
    if not bucket:
        raise InvalidRequest(f"store URL {url!r} names no bucket: use s3://BUCKET[/PREFIX]", param="store")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise InvalidRequest(f"store URL {url!r}: {bucket!r} is not a valid S3 bucket name (3-63 characters: "
                             "lowercase letters, digits, '.' and '-')", param="store")
    prefix = prefix.strip("/")
    if "//" in prefix or any(p in (".", "..") for p in prefix.split("/")) or not prefix.isprintable():
        raise InvalidRequest(f"store URL {url!r}: the prefix must be '/'-separated names, without '.', '..' or "
                             "empty parts", param="store")
    return S3Location(bucket, prefix)


def store_arg(text: str):
    """argparse `type=` of `--store`: an s3:// URL (checked) or a directory."""
    import argparse

    if is_s3_url(text):
        try:
            parse_s3_url(text)
        except InvalidRequest as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text
    return Path(text)


def default_cache_dir(url: str) -> Path:
    loc = parse_s3_url(url)
    return default_home() / "store-cache" / loc.bucket / loc.prefix


def marked_store(root: Path) -> str | None:
    """The s3:// URL a cache directory `root` belongs to (its marker), or None for a plain local store."""
    try:
        return json.loads((root / MARKER).read_text())["store"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidRequest(f"{root / MARKER} is unreadable ({e}): remove it, or the cache directory") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class StoredFile:
    file: str  # the name inside the version directory (one of ADAPTER_FILES)
    sha256: str
    size: int


class ObjectStore:
    """One bucket/prefix: uploads of blobs, the read-through cache of versions' files, the sweep."""

    def __init__(self, url: str, root: Path):
        self.loc = parse_s3_url(url)
        self.url = self.loc.url
        self.root = Path(root)
        self.downloads = self.root / "downloads"  # fetches in progress; never inside a version's directory
        self._client = _client()
        self.endpoint = self._client.meta.endpoint_url
        self._check_bucket()

    def open_cache(self) -> None:
        """Creates the cache's marker and download area (the store has checked the marker names us)."""
        self.downloads.mkdir(parents=True, exist_ok=True)
        marker = self.root / MARKER
        if not marker.exists():
            part = marker.with_name(f".{MARKER}.{uuid.uuid4().hex[:8]}")
            part.write_text(json.dumps({"store": self.url}) + "\n")
            os.replace(part, marker)
        self._clean_downloads()

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    # --- connection checks ------------------------------------------------------------
    def _unavailable(self, e, doing: str) -> StoreUnavailable:
        from botocore.exceptions import (
            ClientError, EndpointConnectionError, NoCredentialsError, PartialCredentialsError,
        )

        where = f"{self.url} at {self.endpoint}"
        if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            return StoreUnavailable(f"no S3 credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                                    "(or AWS_PROFILE, or run where an instance role applies)", param="store")
        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("404", "NoSuchBucket"):
                return StoreUnavailable(f"S3 bucket {self.loc.bucket!r} does not exist at {self.endpoint}; create it "
                                        "first", param="store")
            if status == 403 or code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return StoreUnavailable(f"S3 refused {doing} on {where} ({code or status}): check AWS_ACCESS_KEY_ID, "
                                        "AWS_SECRET_ACCESS_KEY and the bucket's policy", param="store")
            return StoreUnavailable(f"S3 error while {doing} on {where}: {code or status}", param="store")
        if isinstance(e, EndpointConnectionError):
            return StoreUnavailable(f"cannot reach the S3 endpoint {self.endpoint} ({doing} on {self.url}): set "
                                    "AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL to a reachable S3-compatible server",
                                    param="store")
        return StoreUnavailable(f"S3 error while {doing} on {where}: {type(e).__name__}: {e}", param="store")

    def _call(self, doing: str, fn, *args, **kw):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kw)
        except (BotoCoreError, ClientError) as e:
            raise self._unavailable(e, doing) from None

    def _check_bucket(self) -> None:
        self._call("checking the bucket", self._client.head_bucket, Bucket=self.loc.bucket)

    # --- blobs --------------------------------------------------------------------------
    def _blob(self, sha: str) -> str:
        return self.loc.key("blobs", "sha256", sha)

    def _put(self, path: Path, sha: str) -> None:
        self._call(f"uploading {path.name}", self._client.upload_file, str(path), self.loc.bucket, self._blob(sha))

    def upload(self, directory: Path, names: list[str]) -> list[StoredFile]:
        """Uploads the files `names` of `directory` (a registration's checked copy) as blobs; what to record."""
        out = []
        for fname in names:
            p = directory / fname
            sha = sha256_file(p)
            self._put(p, sha)  # always PUT, even when the blob exists: its age then keeps the sweep off it
            out.append(StoredFile(fname, sha, p.stat().st_size))
        return out

    def ensure_uploaded(self, directory: Path, files: list[StoredFile]) -> None:
        """Under the registry's write lock, before the version's rows: every blob is there (a sweep that ran
        since the upload may have removed one; it is put back)."""
        from botocore.exceptions import ClientError

        for f in files:
            try:
                self._client.head_object(Bucket=self.loc.bucket, Key=self._blob(f.sha256))
            except ClientError as e:
                if str(e.response.get("Error", {}).get("Code")) not in ("404", "NoSuchKey", "NotFound"):
                    raise self._unavailable(e, f"checking {f.file}") from None
                self._put(directory / f.file, f.sha256)
            except Exception as e:
                raise self._unavailable(e, f"checking {f.file}") from None

    # --- the read-through cache ----------------------------------------------------------
    def local_dir(self, directory: Path, ref: str, files: list[StoredFile]) -> Path:
        """`directory` holding exactly `files`, each checked against its sha256; a missing, partial or corrupt
        cached file (or one another registry's version left under the same name) is fetched again."""
        if not files:
            raise AdapterNotFound(f"adapter {ref} has no files in the registry (was it deleted?)")
        directory.mkdir(parents=True, exist_ok=True)
        wanted = {f.file for f in files}
        for stale in directory.iterdir():
            if stale.name not in wanted:
                with contextlib.suppress(OSError):
                    shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink()
        for f in files:
            target = directory / f.file
            try:
                if target.is_file() and not target.is_symlink() and sha256_file(target) == f.sha256:
                    continue
            except OSError:
                pass
            if target.exists():
                log.warning("cached %s of %s does not match its sha256: fetching it again", f.file, ref)
            self._fetch(f, target, ref)
        return directory

    def _fetch(self, f: StoredFile, target: Path, ref: str) -> None:
        part = self.downloads / f"{f.sha256[:16]}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
        try:
            body = self._call(f"fetching {f.file} of {ref}", self._client.get_object, Bucket=self.loc.bucket,
                              Key=self._blob(f.sha256))["Body"]
            h = hashlib.sha256()
            with open(part, "wb") as out:
                try:
                    for block in body.iter_chunks(_CHUNK):
                        h.update(block)
                        out.write(block)
                except Exception as e:
                    raise self._unavailable(e, f"fetching {f.file} of {ref}") from None
                out.flush()
                os.fsync(out.fileno())
            if h.hexdigest() != f.sha256:
                raise StoreUnavailable(f"{f.file} of {ref} in {self.url} does not match the sha256 recorded at "
                                       f"registration ({f.sha256[:12]}...): the object store holds a corrupt copy")
            os.replace(part, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()

    def _clean_downloads(self) -> None:
        """Fetches cut short by a crash; a live process's fetch is younger than the cut-off."""
        cutoff = time.time() - SWEEP_GRACE_S
        for p in self.downloads.glob("*.part"):
            with contextlib.suppress(OSError):
                if p.stat().st_mtime < cutoff:
                    p.unlink()

    # --- the sweep ----------------------------------------------------------------------
    def unreferenced_candidates(self, grace_s: float) -> list[str]:
        """sha256s of blobs older than `grace_s` (whether referenced is decided by the caller, under the lock)."""
        cutoff = time.time() - grace_s
        out = []
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.loc.bucket,
                                                                       Prefix=self._blob("") + "/")
        for page in self._call("listing blobs", list, pages):
            for o in page.get("Contents", []):
                if o["LastModified"].timestamp() < cutoff:
                    out.append(o["Key"].rsplit("/", 1)[-1])
        return out

    def delete_blobs(self, shas: list[str]) -> None:
        for i in range(0, len(shas), 1000):
            batch = [{"Key": self._blob(s)} for s in shas[i:i + 1000]]
            self._call("deleting blobs", self._client.delete_objects, Bucket=self.loc.bucket,
                       Delete={"Objects": batch, "Quiet": True})


def _client():
    """An S3 client configured the standard AWS way (environment, profile, instance role); short connect
    timeouts so an unreachable endpoint fails a start within seconds, not minutes."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise StoreUnavailable("an s3:// store needs boto3: pip install 'loraplex[s3]'", param="store") from None
    cfg = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
    return boto3.session.Session().client("s3", config=cfg)
