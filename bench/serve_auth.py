"""What authentication costs: the same server with API keys on and off, side by side in one run.

Starts `loraplex serve` (embedded default model, CPU, loopback, so it runs open while it has no key)
as a subprocess, then alternates for each level of concurrent clients: open (no key), keys on (a key
created through `POST /v1/keys`; every call authenticated, scope-checked and quota-admitted), open
again (the key revoked), over HTTP and over gRPC, keeping each mode's best run. Both modes pass the
same gate (route rule, identity, tenant scoping); "on" adds the key lookup, the scope check and quota
admission, which is what must cost nothing that shows. 1-token requests by default, so the
front ends' per-request work is as large a share of the time as it gets.

Usage: .venv/bin/python bench/serve_auth.py [--max-tokens 1] [--levels 1,8,32] [--rounds 3] [--requests-per-client 8]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from common import free_port, wait_healthy  # noqa: E402
from serve_grpc_http import run_level  # noqa: E402


def gate_cost(n: int = 20000) -> tuple[float, float]:
    """Microseconds per call of the gate itself (enter + leave of a metered inference call), in this
    process: open (no key) and with a key (hash, lookup, scope, quota admission). Machine noise that
    swamps the end-to-end ratio does not hide this one."""
    from loraplex.adapters_store import AdapterStore
    from loraplex.adapters_store.tenancy import AccessRegistry
    from loraplex.server.api.auth import HTTP_RULES, Gate

    rule = HTTP_RULES[("POST", "/v1/chat/completions")]
    with tempfile.TemporaryDirectory() as d:
        reg = AccessRegistry(AdapterStore(d))
        out = []
        for keyed in (False, True):
            gate = Gate(reg, open_when_keyless=True)
            header = None
            if keyed:
                header = "Bearer " + reg.create_key("acme", "inference")[1]
            t0 = time.perf_counter()
            for _ in range(n):
                gate.leave(gate.enter(rule, header, "127.0.0.1", "POST /v1/chat/completions"), 200)
            out.append((time.perf_counter() - t0) / n * 1e6)
        reg.store.close()
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests-per-client", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=1)
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument(
        "--rounds", type=int, default=3, help="off/on alternations per level and protocol; the best of each is kept"
    )
    args = ap.parse_args()
    hp, gp = free_port(), free_port()
    tmp = tempfile.mkdtemp(prefix="loraplex-bench-auth-")
    env = dict(os.environ, PYTHONUNBUFFERED="1", LORAPLEX_HOME=tmp)
    env.pop("LORAPLEX_API_KEY", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loraplex.server.cli",
            "serve",
            "--port",
            str(hp),
            "--grpc-port",
            str(gp),
            "--log-level",
            "warning",
        ],
        env=env,
    )
    url, target = f"http://127.0.0.1:{hp}", f"127.0.0.1:{gp}"

    def keys_on() -> tuple[str, str]:
        r = httpx.post(
            f"{url}/v1/keys", json={"tenant": "*", "scopes": ["inference", "admin"], "name": "bench"}, timeout=60
        )
        r.raise_for_status()
        key = r.json()
        assert httpx.get(f"{url}/v1/me", timeout=60).status_code == 401  # keys are on: anonymous calls are refused
        return key["key"], key["id"]

    def keys_off(secret: str, key_id: str) -> None:
        httpx.delete(
            f"{url}/v1/keys/{key_id}", headers={"Authorization": f"Bearer {secret}"}, timeout=60
        ).raise_for_status()
        assert httpx.get(f"{url}/v1/me", timeout=60).json()["auth"] is False

    def alternate(kind: str, conc: int, per: int):
        """Keys off, on, off, on, ...: the best run of each mode and every mode's req/s."""
        best, seen = {}, {"off": [], "on": []}
        for _ in range(args.rounds):
            for mode in ("off", "on"):
                secret, key_id = keys_on() if mode == "on" else (None, None)
                r = run_level(kind, conc, per, args.max_tokens, url, target, model, key=secret)
                if mode == "on":
                    keys_off(secret, key_id)
                print(f"  {conc:2d} clients {kind:4s} keys {mode:3s}: {r['rps']:.2f} req/s, p50 {r['p50']:.4f} s, "
                      f"{r['errors']} errors", file=sys.stderr, flush=True)
                seen[mode].append(r["rps"])
                if mode not in best or r["rps"] > best[mode]["rps"]:
                    best[mode] = r
        return best["off"], best["on"], seen

    model = None
    try:
        wait_healthy(url, proc)
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        run_level("http", 2, 2, 4, url, target, model)  # warm-up
        run_level("grpc", 2, 2, 4, url, target, model)
        rows = []
        for conc in [int(x) for x in args.levels.split(",")]:
            per = max(args.requests_per_client, 16 // conc)
            for kind in ("http", "grpc"):
                rows.append((conc, kind, *alternate(kind, conc, per)))
        print(f"\nchat requests, {args.max_tokens} new token(s) (greedy, EOS ignored), embedded SmolLM2-135M-Instruct "
              f"on CPU; {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); "
              f"best of {args.rounds} alternating runs")
        print(f"{'clients':>7} {'proto':>5} | {'off req/s':>9} {'range':>11} {'p50 s':>7} | {'on req/s':>9} "
              f"{'range':>11} {'p50 s':>7} | {'on/off req/s':>12}")
        for conc, kind, off, on, seen in rows:
            rng = {m: f"{min(v):.2f}-{max(v):.2f}" for m, v in seen.items()}
            print(f"{conc:7d} {kind:>5} | {off['rps']:9.2f} {rng['off']:>11} {off['p50']:7.4f} | {on['rps']:9.2f} "
                  f"{rng['on']:>11} {on['p50']:7.4f} | {on['rps'] / off['rps']:12.3f}")
        print(f"errors: {sum(off['errors'] + on['errors'] for _, _, off, on, _ in rows)}")
        off_us, on_us = gate_cost()
        print(f"the gate alone, per call: {off_us:.1f} us open, {on_us:.1f} us with a key")
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
