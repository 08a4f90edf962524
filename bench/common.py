"""What the benchmarks share: free ports, waiting for a server, start-up off the measuring thread, draining streams."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from typing import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300, what: str = "the server") -> None:
    """Returns once `url`/health answers 200; exits the benchmark if the process dies or the time runs out."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with status {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} did not become ready within {timeout:.0f} s")


def off_thread(setup: Callable[[], object]) -> object:
    """Runs start-up on a thread that ends before measuring, as `loraplex serve` loads: the engine thread's
    OpenMP team is then the only one while we measure (adapters_store.peft_format.one_intra_op_thread)."""
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("v", setup()))
    t.start()
    t.join()
    if "v" not in out:
        raise SystemExit("start-up failed (its traceback is above)")
    return out["v"]


def drain(submitted, timeout: float = 600) -> int:
    """Reads every request's stream to its end; the number of tokens produced."""
    n = 0
    for r in submitted:
        while True:
            o = r.stream.get(timeout=timeout)
            n += len(o.token_ids)
            if o.finished:
                break
    return n
