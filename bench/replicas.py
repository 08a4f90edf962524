"""Two replicas on one PostgreSQL registry under closed-loop load while versions are registered and routes change.

Two `loraplex serve` processes (a tiny random Llama, so the figures are about the registry, not the model)
share one PostgreSQL registry and one store directory. `--clients` closed-loop clients send 8-token greedy
completions for the routed adapter, alternating replicas. Phase "quiet" runs `--seconds` without changes;
phase "changes" runs as long while a route change is made on one replica every 0.5 s (alternating replicas)
and a new version is registered every 2 s. Printed: the propagation delay of a change (its write returning on
one replica until the other replica's route shows it; p50/p99), request latency p99 during changes over p99
without (target <= 1.1) and failed requests (target 0).

Usage: python bench/replicas.py [--registry postgresql://postgres@127.0.0.1:5432/postgres] [--clients 4]
       [--seconds 20]   (creates and drops its own database)
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, also under PYTHONSAFEPATH=1 (the Makefile sets it)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import free_port, wait_healthy  # noqa: E402


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def start(tmp: Path, model: Path, store: Path, url: str, name: str, port: int):
    log = open(tmp / f"{name}.log", "w")
    env = dict(os.environ, LORAPLEX_REGISTRY="", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "loraplex.server.cli", "serve", "--model", str(model), "--store", str(store),
           "--registry", url, "--port", str(port), "--grpc-port", "0", "--jobs-dir", str(tmp / f"jobs-{name}"),
           "--log-level", "warning"]
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, p, what=f"replica {name}")
    except SystemExit:
        print((tmp / f"{name}.log").read_text()[-2000:], file=sys.stderr)
        raise
    return p, base


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--registry", default="postgresql://postgres@127.0.0.1:5432/postgres",
                    help="an admin URL: the bench creates (and drops) its own database there")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()

    from helpers import make_peft_adapter, make_tiny_llama

    admin = psycopg.connect(args.registry, autocommit=True)
    db = f"loraplex_bench_{uuid.uuid4().hex[:8]}"
    admin.execute(f'CREATE DATABASE "{db}"')
    url = args.registry.rsplit("/", 1)[0] + "/" + db
    procs = []
    try:
        with tempfile.TemporaryDirectory() as td:
            tmp = Path(td)
            model = make_tiny_llama(tmp / "base", seed=0)
            adapters = [make_peft_adapter(model, tmp / f"a{i}", r=8, seed=i) for i in range(4)]
            store = tmp / "store"
            for name in ("a", "b"):
                procs.append(start(tmp, model, store, url, name, free_port()))
            urls = [b for _, b in procs]
            for src in adapters[:2]:
                r = httpx.post(f"{urls[0]}/v1/adapters", json={"name": "bot", "path": str(src)}, timeout=60)
                assert r.status_code == 201, r.text
            time.sleep(1.0)

            lat = {"quiet": [], "changes": []}
            failed = {"quiet": 0, "changes": 0}
            phase = {"name": "quiet", "stop": False}

            def client(i: int) -> None:
                with httpx.Client(timeout=60) as c:
                    n = 0
                    while not phase["stop"]:
                        body = {"model": "bot", "prompt": "Hello there", "max_tokens": 8, "temperature": 0,
                                "user": f"u{i}-{n}"}
                        ph, t0 = phase["name"], time.perf_counter()
                        try:
                            ok = c.post(f"{urls[n % 2]}/v1/completions", json=body).status_code == 200
                        except httpx.HTTPError:
                            ok = False
                        lat[ph].append(time.perf_counter() - t0)
                        failed[ph] += not ok
                        n += 1

            threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
            for t in threads:
                t.start()
            time.sleep(args.seconds)
            phase["name"] = "changes"
            delays, k, t_end, next_reg = [], 0, time.time() + args.seconds, time.time() + 2.0
            versions = [1, 2]
            while time.time() < t_end:
                writer, reader = urls[k % 2], urls[(k + 1) % 2]
                if time.time() >= next_reg:
                    src = adapters[len(versions) % 4]
                    r = httpx.post(f"{writer}/v1/adapters", json={"name": "bot", "path": str(src)}, timeout=60)
                    versions.append(r.json()["version"])
                    next_reg += 2.0
                a, b = versions[-2], versions[-1]
                want = {str(a): 100} if k % 2 else {str(a): 50, str(b): 50}
                t0 = time.perf_counter()
                assert httpx.put(f"{writer}/v1/routes/bot", json={"versions": want}, timeout=60).status_code == 200
                w = time.perf_counter()
                while httpx.get(f"{reader}/v1/routes/bot", timeout=60).json().get("versions") != want:
                    time.sleep(0.002)
                delays.append(time.perf_counter() - w)
                k += 1
                time.sleep(max(0.0, 0.5 - (time.perf_counter() - t0)))
            phase["stop"] = True
            for t in threads:
                t.join(60)
    finally:
        for p, _ in procs:
            p.terminate()
            p.wait(30)
        admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.close()

    q99, c99 = pct(lat["quiet"], 0.99), pct(lat["changes"], 0.99)
    print(f"route changes: {len(delays)}; propagation delay p50 {statistics.median(delays) * 1e3:.1f} ms, "
          f"p99 {pct(delays, 0.99) * 1e3:.1f} ms (target < 1000 ms)")
    print(f"requests: quiet {len(lat['quiet'])}, during changes {len(lat['changes'])}; p99 latency quiet "
          f"{q99 * 1e3:.1f} ms, during changes {c99 * 1e3:.1f} ms, ratio {c99 / q99:.2f} (target <= 1.1)")
    print(f"failed requests: {failed['quiet'] + failed['changes']} (target 0)")


if __name__ == "__main__":
    main()
