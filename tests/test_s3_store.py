"""Adapter files in S3-compatible object storage (`--store s3://bucket/prefix`), against moto's standalone S3
server speaking the S3 protocol over HTTP: a version registered into the bucket reads back byte for byte
through another cache; the cache refetches a corrupt or partial file and never serves one that fails its
hash; a registration whose upload fails, or whose process is killed mid-upload, leaves no visible version;
a server serves what another process registered within a second, with the same greedy output; bad store
configuration fails at startup naming the problem."""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time
import uuid

import boto3
import httpx
import pytest

from conftest import free_port

from loraplex.adapters_store import AdapterStore
from loraplex.adapters_store.errors import InvalidRequest, StoreUnavailable
from loraplex.adapters_store.objects import ObjectStore, sha256_file
from loraplex.adapters_store.registry import REGISTRY_ENV
from loraplex.adapters_store.versions import ADAPTER_FILES, _dir_sha256


@pytest.fixture(scope="module")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(moto_endpoint, monkeypatch):
    """The AWS variables pointing at moto (inherited by subprocesses), a fresh bucket, a client on it."""
    for k, v in {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv(REGISTRY_ENV, "")  # restored afterwards, whatever a server started here exports
    bucket = f"loraplex-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    client.url = f"s3://{bucket}/team/adapters"
    client.bucket = bucket
    return client


def blobs(client) -> set[str]:
    resp = client.list_objects_v2(Bucket=client.bucket, Prefix="team/adapters/blobs/sha256/")
    return {o["Key"].rsplit("/", 1)[-1] for o in resp.get("Contents", [])}


def test_register_into_s3_reads_back_equal_through_another_cache(s3, tmp_path, adapter_dirs):
    reg = str(tmp_path / "registry.sqlite3")
    a = AdapterStore(s3.url, cache_dir=tmp_path / "cache-a", registry=reg)
    v = a.register("bot", adapter_dirs["alpha"])
    src = {f: (adapter_dirs["alpha"] / f).read_bytes() for f in ADAPTER_FILES if (adapter_dirs["alpha"] / f).exists()}
    assert blobs(s3) == {hashlib.sha256(b).hexdigest() for b in src.values()}  # content-addressed

    b = AdapterStore(s3.url, cache_dir=tmp_path / "cache-b", registry=reg)  # another machine: nothing cached
    got = b.get("bot", 1)
    assert not got.local.exists()
    d = got.path
    assert d.is_relative_to(tmp_path / "cache-b")
    assert {p.name: p.read_bytes() for p in d.iterdir()} == src
    assert _dir_sha256(d) == got.sha256 == v.sha256
    # a tool handed the cache directory (a trainer job) opens the same object store
    c = AdapterStore(tmp_path / "cache-b", registry=reg)
    assert c.objects is not None and c.objects.url == s3.url and c.get("bot").sha256 == v.sha256
    assert c.register("bot", adapter_dirs["beta"]).version == 2  # registered into the bucket, as a trainer's is
    assert _dir_sha256(a.get("bot", 2).path) == c.get("bot", 2).sha256
    for st in (a, b, c):
        st.close()


def test_cache_refetches_a_corrupt_or_partial_file_and_never_serves_a_bad_one(s3, tmp_path, adapter_dirs):
    reg = str(tmp_path / "registry.sqlite3")
    AdapterStore(s3.url, cache_dir=tmp_path / "cache-a", registry=reg).register("bot", adapter_dirs["beta"])
    st = AdapterStore(s3.url, cache_dir=tmp_path / "cache-b", registry=reg)
    v = st.get("bot")
    weights = v.path / "adapter_model.safetensors"
    good = weights.read_bytes()
    raw = bytearray(good)
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte, same size
    weights.write_bytes(bytes(raw))
    assert st.get("bot").path.joinpath("adapter_model.safetensors").read_bytes() == good
    weights.write_bytes(good[: len(good) // 3])  # a partial file, as a crash mid-write leaves
    assert weights.read_bytes() != good
    assert st.get("bot").path.joinpath("adapter_model.safetensors").read_bytes() == good
    (v.local / "stray.bin").write_bytes(b"x")  # nothing but the version's own files is ever in its directory
    assert _dir_sha256(st.get("bot").path) == v.sha256

    # the bucket itself holds a corrupt copy: the fetch is refused, nothing is put in the cache
    sha = sha256_file(weights)
    s3.put_object(Bucket=s3.bucket, Key=f"team/adapters/blobs/sha256/{sha}", Body=b"garbage")
    weights.unlink()
    with pytest.raises(StoreUnavailable, match="does not match the sha256"):
        st.get("bot").path
    assert not weights.exists() and list((tmp_path / "cache-b" / "downloads").iterdir()) == []
    st.close()


def test_a_failed_upload_leaves_no_version_and_its_blobs_are_swept(s3, tmp_path, adapter_dirs, monkeypatch):
    reg = str(tmp_path / "registry.sqlite3")
    st = AdapterStore(s3.url, cache_dir=tmp_path / "cache", registry=reg)
    real_put, puts = ObjectStore._put, []

    def put_then_fail(self, path, sha):
        if puts:
            raise StoreUnavailable("the connection dropped mid-registration")
        puts.append(path.name)
        real_put(self, path, sha)

    monkeypatch.setattr(ObjectStore, "_put", put_then_fail)
    with pytest.raises(StoreUnavailable, match="dropped"):
        st.register("bot", adapter_dirs["beta"])
    monkeypatch.setattr(ObjectStore, "_put", real_put)
    assert len(blobs(s3)) == 1  # one file made it to the bucket ...
    other = AdapterStore(s3.url, cache_dir=tmp_path / "cache-2", registry=reg)
    for view in (st, other):  # ... but no version names it, in this process or another
        assert view.list() == [] and view.names() == []
    assert other._query("SELECT COUNT(*) FROM version_files")[0][0] == 0
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
    assert st.sweep_objects(grace_s=3600) == 0 and len(blobs(s3)) == 1  # young: a registration may still commit it
    assert st.sweep_objects(grace_s=0) == 1 and blobs(s3) == set()
    v = st.register("bot", adapter_dirs["beta"])  # the failed attempt used no version number
    assert v.version == 1 and _dir_sha256(other.get("bot", 1).path) == v.sha256
    # deleting leaves the objects to the sweep, which keeps every blob a live version references
    st.register("bot", adapter_dirs["alpha"])
    st.delete("bot", 1)
    assert st.sweep_objects(grace_s=0) > 0
    assert _dir_sha256(AdapterStore(s3.url, cache_dir=tmp_path / "cache-3", registry=reg).get("bot", 2).path) \
        == st.get("bot", 2).sha256
    st.close()
    other.close()


KILLED_MID_UPLOAD = """
import sys
from loraplex.adapters_store import AdapterStore
from loraplex.adapters_store.objects import ObjectStore

put = ObjectStore._put
def announced_put(self, path, sha):
    print("put", path.name, flush=True)
    put(self, path, sha)
ObjectStore._put = announced_put
st = AdapterStore(sys.argv[1], cache_dir=sys.argv[2], registry=sys.argv[3])
st.register("bot", sys.argv[4])
print("registered", flush=True)
st.register("bot", sys.argv[5])
"""


def test_kill_9_mid_upload_leaves_no_visible_version(s3, tmp_path, adapter_dirs, postgres_url):
    cache = tmp_path / "cache-writer"
    p = subprocess.Popen([sys.executable, "-c", KILLED_MID_UPLOAD, s3.url, str(cache), postgres_url,
                          str(adapter_dirs["alpha"]), str(adapter_dirs["beta"])], stdout=subprocess.PIPE, text=True)
    try:
        lines = []
        while len([x for x in lines if x.startswith("put")]) < 5:  # 3 files of bot@1, then 2 of bot@2's 3
            line = p.stdout.readline()
            assert line, f"the writer ended early: {lines}"
            lines.append(line.strip())
        p.kill()  # SIGKILL between two uploads of the second registration
    finally:
        p.kill()
        p.wait()
    assert "registered" in lines
    replica = AdapterStore(s3.url, cache_dir=tmp_path / "cache-replica", registry=postgres_url)
    try:
        assert [v.ref for v in replica.list()] == ["bot@1"]  # the killed registration is not visible at all
        assert replica._query("SELECT COUNT(*) FROM version_files WHERE version = 2")[0][0] == 0
        assert _dir_sha256(replica.get("bot", 1).path) == replica.get("bot", 1).sha256
        reopened = AdapterStore(s3.url, cache_dir=cache, registry=postgres_url)  # the writer's cache, reopened
        assert list((cache / "tmp").iterdir()) == []  # its half-uploaded copy was swept
        v = reopened.register("bot", adapter_dirs["beta"])
        assert v.ref == "bot@2" and _dir_sha256(replica.get("bot", 2).path) == v.sha256
        reopened.close()
    finally:
        replica.close()


def test_a_server_serves_what_another_process_registered_into_s3_within_a_second(
        s3, tmp_path, tiny_base, adapter_dirs, postgres_url):
    from conftest import start_server

    srv = start_server(tmp_path, tiny_base, store=s3.url, store_cache=tmp_path / "cache-server",
                       registry=postgres_url, jobs_dir=tmp_path / "jobs", max_loras=2, kv_cache_tokens=4096)
    try:
        assert srv.state.store.objects is not None
        body = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
        # the reference: the same adapter registered through this server's own API
        r = httpx.post(f"{srv.url}/v1/adapters", json={"name": "ref", "path": str(adapter_dirs["gamma"])}, timeout=60)
        assert r.status_code == 201, r.text
        # another process (a replica, a trainer) registers into the same registry and bucket
        other = AdapterStore(s3.url, cache_dir=tmp_path / "cache-other", registry=postgres_url)
        other.register("bot", adapter_dirs["gamma"])
        t0 = time.monotonic()
        while httpx.post(f"{srv.url}/v1/completions", json={**body, "model": "bot@1", "max_tokens": 1},
                         timeout=60).status_code != 200:
            assert time.monotonic() - t0 < 1.0, "not served within a second"
            time.sleep(0.02)
        outs = [httpx.post(f"{srv.url}/v1/completions", json={**body, "model": m}, timeout=60).json()
                for m in ("bot@1", "ref@1")]
        assert outs[0]["choices"][0]["text"] == outs[1]["choices"][0]["text"]
        assert (tmp_path / "cache-server" / "adapters" / "bot" / "1" / "adapter_model.safetensors").is_file()
        other.delete("bot")
        t0 = time.monotonic()
        while httpx.post(f"{srv.url}/v1/completions", json={**body, "model": "bot@1"}, timeout=60).status_code != 404:
            assert time.monotonic() - t0 < 1.0
            time.sleep(0.02)
        other.close()
    finally:
        srv.stop()
        srv.state.store.close()


# --- bad configuration: a clear error at startup, nothing written ----------------------------------------


def test_bad_store_configuration_fails_naming_the_problem(s3, tmp_path, monkeypatch):
    from loraplex.server.cli import main
    from loraplex.server.runtime import ServeConfig

    reg = str(tmp_path / "registry.sqlite3")
    with pytest.raises(ValueError, match="names no bucket"):
        ServeConfig(store="s3://")
    with pytest.raises(InvalidRequest, match="needs a registry named explicitly"):
        AdapterStore(s3.url, cache_dir=tmp_path / "c")
    with pytest.raises(StoreUnavailable, match="bucket 'no-such-bucket' does not exist"):
        AdapterStore("s3://no-such-bucket/x", cache_dir=tmp_path / "c", registry=reg)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StoreUnavailable, match="cannot reach the S3 endpoint http://127.0.0.1"):
        AdapterStore(s3.url, cache_dir=tmp_path / "c", registry=reg)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.meta.endpoint_url)
    with pytest.raises(StoreUnavailable, match="no S3 credentials"):
        AdapterStore(s3.url, cache_dir=tmp_path / "c", registry=reg)
    assert not (tmp_path / "c").exists() and not os.path.exists(reg)  # nothing was written

    # the commands say so and stop: serve before loading a model, routes before touching anything
    assert main(["serve", "--store", s3.url, "--store-cache", str(tmp_path / "c"), "--registry", reg]) == 2
    with pytest.raises(SystemExit) as e:
        main(["routes", "--store", "s3:///prefix", "show", "bot"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["keys", "--store", s3.url, "list"])  # no registry named, no credentials: says so, no traceback
    assert e.value.code == 1
    assert not (tmp_path / "c").exists()


def test_serve_cli_reports_bad_store_on_stderr(s3, tmp_path, capsys):
    from loraplex.server.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--store", "s3://"])
    assert "names no bucket" in capsys.readouterr().err
    assert main(["serve", "--store", s3.url, "--store-cache", str(tmp_path / "c")]) == 2
    assert "needs a registry named explicitly" in capsys.readouterr().err


# --- two server processes on one PostgreSQL registry and one bucket ----------------------------------------


@pytest.mark.slow
def test_two_replicas_share_one_bucket_and_one_postgres_registry(s3, tmp_path, tiny_base, adapter_dirs,
                                                                postgres_url, monkeypatch):
    from test_replicas import Replica, _until

    replicas = []
    for name in ("a", "b"):  # each replica its own home, so each its own cache of the bucket
        monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path / f"home-{name}"))
        replicas.append(Replica(tmp_path, tiny_base, s3.url, postgres_url, name))
    a, b = replicas
    try:
        a.wait_ready()
        b.wait_ready()
        r = httpx.post(f"{a.url}/v1/adapters", json={"name": "bot", "path": str(adapter_dirs["alpha"])}, timeout=60)
        assert r.status_code == 201, r.text
        assert _until(lambda: b.complete("bot@1", max_tokens=1).status_code == 200, 1.0) < 1.0
        assert a.complete("bot@1").json()["choices"][0]["text"] == b.complete("bot@1").json()["choices"][0]["text"]
        assert (tmp_path / "home-b" / "store-cache").is_dir()  # B read the files from the bucket, not A's disk
        r = httpx.delete(f"{b.url}/v1/adapters/bot", timeout=60)
        assert r.status_code == 200, r.text
        _until(lambda: a.complete("bot@1", max_tokens=1).status_code == 404, 1.0)
    finally:
        a.stop()
        b.stop()
