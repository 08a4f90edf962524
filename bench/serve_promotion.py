"""p99 latency under load with and without route changes, measured side by side in one run.

Starts `loraplex serve` (embedded default model, CPU) in a subprocess with two
versions of one adapter, then runs the same closed-loop load twice
(8 concurrent clients, short chat requests, 16 tokens) without a break
while phases alternate: a fixed route, then the route changing every 0.25 s
(set 90/10, promote 2, promote 1, ...), `--rounds` times each. Prints p50/p99
of both phases and their ratio; a promotion should add no pause (ratio <= 1.1).

Usage: python bench/serve_promotion.py [--phase-seconds 15] [--rounds 4] [--clients 8]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, also under PYTHONSAFEPATH=1 (the Makefile sets it)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import free_port, wait_healthy  # noqa: E402


def load(url: str, clients: int, phase_seconds: float, rounds: int) -> dict[str, list[float] | int]:
    """Closed-loop load that never stops, while the route alternates between phases.

    Phases alternate `fixed` / `flips` every `phase_seconds`, `rounds` times
    each, so drift in machine load hits both alike. A request counts for the
    phase it started in; one that spans a phase boundary counts for neither.
    """
    res: dict = {"fixed": [], "flips": [], "errors": 0, "straddling": 0, "changes": 0}
    lock = threading.Lock()
    stop = threading.Event()
    flipping = threading.Event()
    phase_id = [0]

    def client(i):
        with httpx.Client(timeout=300) as c:
            k = 0
            while not stop.is_set():
                ph = phase_id[0]
                t0 = time.perf_counter()
                r = c.post(f"{url}/v1/chat/completions", json={"model": "bot", "messages": [{"role": "user", "content": f"Hello {i}-{k}"}],
                                                              "max_tokens": 16, "temperature": 0, "ignore_eos": True, "user": f"u{i}"})
                dt = time.perf_counter() - t0
                k += 1
                with lock:
                    if r.status_code != 200:
                        res["errors"] += 1
                    elif phase_id[0] != ph:
                        res["straddling"] += 1
                    elif ph <= 0:
                        pass  # warm-up
                    else:
                        res["flips" if ph % 2 else "fixed"].append(dt)

    def flipper():
        n = 0
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                if not flipping.wait(0.05):
                    continue
                action = n % 3
                if action == 0:
                    r = c.put(f"{url}/v1/routes/bot", json={"versions": {"1": 90, "2": 10}})
                elif action == 1:
                    r = c.post(f"{url}/v1/routes/bot/promote", json={"version": 2})
                else:
                    r = c.post(f"{url}/v1/routes/bot/promote", json={"version": 1})
                assert r.status_code == 200, r.text
                n += 1
                res["changes"] = n
                time.sleep(0.25)

    ts = [threading.Thread(target=client, args=(i,)) for i in range(clients)] + [threading.Thread(target=flipper)]
    for t in ts:
        t.start()
    time.sleep(phase_seconds)  # warm-up, not counted (phase 0 requests that finish later count as straddling)
    for p in range(1, 2 * rounds + 1):
        with lock:
            phase_id[0] = p + 1  # even: fixed, odd: flips (warm-up was 0 and is never counted)
        if (p + 1) % 2:
            flipping.set()
        else:
            flipping.clear()
        time.sleep(phase_seconds)
    with lock:
        phase_id[0] = -1
    flipping.clear()
    stop.set()
    for t in ts:
        t.join()
    res["fixed"].sort()
    res["flips"].sort()
    return res


def pct(xs, q):
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase-seconds", type=float, default=15)
    ap.add_argument("--rounds", type=int, default=4)
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
        wait_healthy(url, proc)
        for p in (a1, a2):
            assert httpx.post(f"{url}/v1/adapters", json={"name": "bot", "path": str(p)}, timeout=60).status_code == 201
        httpx.put(f"{url}/v1/routes/bot", json={"versions": {"1": 100}})
        r = load(url, args.clients, args.phase_seconds, args.rounds)
        base_lat, flip_lat = r["fixed"], r["flips"]
        print(f"\n{args.clients} clients, 16-token chat requests, {args.rounds} x {args.phase_seconds:.0f} s per phase, interleaved, "
              f"SmolLM2-135M on CPU, {r['changes']} route changes, {r['errors']} errors, {r['straddling']} requests across a phase edge")
        print(f"{'phase':22s} {'requests':>8s} {'p50 s':>7s} {'p99 s':>7s} {'max s':>7s}")
        print(f"{'fixed route':22s} {len(base_lat):8d} {pct(base_lat, .5):7.3f} {pct(base_lat, .99):7.3f} {base_lat[-1]:7.3f}")
        print(f"{'route flips every .25s':22s} {len(flip_lat):8d} {pct(flip_lat, .5):7.3f} {pct(flip_lat, .99):7.3f} {flip_lat[-1]:7.3f}")
        print(f"\np99 with flips / p99 without: {pct(flip_lat, .99) / pct(base_lat, .99):.2f} (target <= 1.10)")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
