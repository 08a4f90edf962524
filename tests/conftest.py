"""Shared fixtures: a tiny random Llama with the embedded model's tokenizer, PEFT adapters for it,
and a real server (engine + HTTP) started in-process on a free port."""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ADAPTER_SPECS = {
    # name: (r, alpha, target modules, rslora, seed)
    "alpha": (4, 8, ["q_proj", "v_proj"], False, 1),
    "beta": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False, 2),
    "gamma": (16, 8, ["q_proj", "k_proj", "v_proj", "o_proj"], True, 3),
    "delta": (2, 4, ["gate_proj", "up_proj", "down_proj"], False, 4),
}


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from helpers import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-base"), seed=0)


@pytest.fixture(scope="session")
def adapter_dirs(tiny_base, tmp_path_factory) -> dict[str, Path]:
    from helpers import make_peft_adapter

    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, (r, alpha, targets, rslora, seed) in ADAPTER_SPECS.items():
        out[name] = make_peft_adapter(tiny_base, root / name, r=r, alpha=alpha, target_modules=targets, seed=seed, use_rslora=rslora)
    return out


PG_ADMIN_URLS = ("postgresql://postgres@127.0.0.1:5432/postgres", "postgresql://root@127.0.0.1:5432/postgres")


@pytest.fixture
def postgres_url():
    """A fresh PostgreSQL database on the server every machine of the project runs (127.0.0.1:5432, trust
    auth), dropped afterwards. Never skipped: CI must run the PostgreSQL tests, so no server is a failure."""
    import uuid

    import psycopg

    errors = []
    for admin in PG_ADMIN_URLS:
        try:
            conn = psycopg.connect(admin, autocommit=True, connect_timeout=5)
            break
        except psycopg.Error as e:
            errors.append(str(e))
    else:
        pytest.fail(f"PostgreSQL is not reachable at 127.0.0.1:5432: {errors}")
    db = f"loraplex_test_{uuid.uuid4().hex[:12]}"
    conn.execute(f'CREATE DATABASE "{db}"')
    try:
        yield admin.rsplit("/", 1)[0] + "/" + db
    finally:
        conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, state, url: str, thread, server):
        self.state = state
        self.url = url
        self._thread = thread
        self._server = server

    @property
    def engine(self):
        return self.state.engine

    def stop(self):
        self._server.should_exit = True
        self._thread.join(10)
        if self.state.jobs is not None:
            self.state.jobs.close()
        if self.state.engine is not None:
            self.state.engine.shutdown()


def start_server(tmp: Path, model_dir: Path, *, extra_routes=None, **cfg) -> RunningServer:
    import uvicorn

    from loraplex.server.app import ServerState, build_app
    from loraplex.server.runtime import ServeConfig, build_state

    cfg.setdefault("store", tmp / "store")
    conf = ServeConfig(model=str(model_dir), port=free_port(), grpc_port=0, **cfg)
    state = build_state(conf, ServerState())
    app = build_app(state, extra_routes=extra_routes, poll_interval=0.2, max_request_bytes=conf.max_request_bytes,
                    max_upload_bytes=conf.max_upload_bytes)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=conf.port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    return RunningServer(state, f"http://127.0.0.1:{conf.port}", t, server)


@pytest.fixture(scope="module")
def server(tiny_base, tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("srv"), tiny_base, max_loras=4, kv_cache_tokens=16384, max_queue=64)
    yield s
    s.stop()
