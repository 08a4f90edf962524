"""p99 latency under load with and without route changes, measured side by side in one run.

Starts `loraplex serve` (embedded default model, CPU) in a subprocess with two
versions of one adapter, then runs the same closed-loop load twice
(8 concurrent clients, short chat requests, 16 tokens, for --seconds each):
once with a fixed route, once while the route flips between the versions
every 0.25 s (set 90/10, promote, rollback, ...). Prints p50/p99 of both
runs and their ratio; a promotion should add no pause (ratio <= 1.1).

Usage: python bench/serve_promotion.py [--seconds 30] [--clients 8]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(url: str, clients: int, seconds: float, flip: bool) -> tuple[list[float], int]:
    lat, errors, stop = [], [0], threading.Event()
    lock = threading.Lock()

    def client(i):
        with httpx.Client(timeout=120) as c:
            k = 0
            while not stop.is_set():
                t0 = time.perf_counter()
                r = c.post(f"{url}/v1/chat/completions", json={"model": "bot", "messages": [{"role": "user", "content": f"Hello {i}-{k}"}],
                                                              "max_tokens": 16, "temperature": 0, "ignore_eos": True, "user": f"u{i}"})
                k += 1
                with lock:
                    if r.status_code == 200:
                        lat.append(time.perf_counter() - t0)
                    else:
                        errors[0] += 1

    def flipper():
        n = 0
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                action = n % 3
                if action == 0:
                    c.put(f"{url}/v1/routes/bot", json={"versions": {"1": 90, "2": 10}})
                elif action == 1:
                    c.post(f"{url}/v1/routes/bot/promote", json={"version": 2})
                else:
                    c.post(f"{url}/v1/routes/bot/promote", json={"version": 1})
                n += 1
                time.sleep(0.25)

    ts = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    if flip:
        ts.append(threading.Thread(target=flipper))
    for t in ts:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in ts:
        t.join()
    return sorted(lat), errors[0]


def pct(xs, q):
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    from helpers import make_peft_adapter

    from loraplex.adapters_store.base_model import resolve_base_model

    tmp = Path(tempfile.mkdtemp(prefix="loraplex-bench-promo-"))
    base = resolve_base_model("default")
    a1 = make_peft_adapter(base, tmp / "v1", r=16, alpha=32, target_modules=["q_proj", "v_proj", "o_proj"], seed=1, init_std=0.01)
    a2 = make_peft_adapter(base, tmp / "v2", r=16, alpha=32, target_modules=["q_proj", "v_proj", "o_proj"], seed=2, init_std=0.01)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "loraplex.server.cli", "serve", "--port", str(port), "--grpc-port", "0",
                             "--store", str(tmp / "store"), "--log-level", "warning"], env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        for p in (a1, a2):
            assert httpx.post(f"{url}/v1/adapters", json={"name": "bot", "path": str(p)}, timeout=60).status_code == 201
        httpx.put(f"{url}/v1/routes/bot", json={"versions": {"1": 100}})
        load(url, args.clients, 3, False)  # warm-up
        base_lat, base_err = load(url, args.clients, args.seconds, False)
        flip_lat, flip_err = load(url, args.clients, args.seconds, True)
        print(f"\n{args.clients} clients, 16-token chat requests, {args.seconds:.0f} s per run, SmolLM2-135M on CPU")
        print(f"{'run':22s} {'requests':>8s} {'errors':>6s} {'p50 s':>7s} {'p99 s':>7s}")
        print(f"{'fixed route':22s} {len(base_lat):8d} {base_err:6d} {pct(base_lat, .5):7.3f} {pct(base_lat, .99):7.3f}")
        print(f"{'route flips every .25s':22s} {len(flip_lat):8d} {flip_err:6d} {pct(flip_lat, .5):7.3f} {pct(flip_lat, .99):7.3f}")
        print(f"\np99 with flips / p99 without: {pct(flip_lat, .99) / pct(base_lat, .99):.2f} (target <= 1.10)")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
