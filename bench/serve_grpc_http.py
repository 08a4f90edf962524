"""gRPC against the HTTP API on the same server, side by side in one run.

Starts `loraplex serve` (embedded default model, CPU) as a subprocess, then for
1, 8 and 32 concurrent clients sends short chat requests (16 new tokens,
greedy, EOS ignored so both protocols do identical work) over HTTP
(`/v1/chat/completions`, httpx) and over gRPC (`Inference.Generate`),
alternating HTTP, gRPC, HTTP, gRPC and keeping each protocol's better run.
Prints requests/s and p50/p99 latency per protocol, and gRPC/HTTP ratios.

Usage: .venv/bin/python bench/serve_grpc_http.py [--requests-per-client 4] [--max-tokens 16] [--levels 1,8,32] [--rounds 2]
(`--max-tokens 1` isolates the front ends' per-request cost from decoding.)
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, also under PYTHONSAFEPATH=1 (the Makefile sets it)
from common import free_port, wait_healthy  # noqa: E402
from loraplex.protos.loraplex.v1 import loraplex_pb2 as pb  # noqa: E402
from loraplex.protos.loraplex.v1 import loraplex_pb2_grpc as pbg  # noqa: E402

PROMPTS = ["Hi!", "Name a color.", "What is 2+2?", "Say hello.", "Give me a word.", "Pick a number."]


def run_level(kind: str, conc: int, per_client: int, max_tokens: int, http_url: str, grpc_target: str, model: str,
              key: str | None = None):
    lat: list[float] = []
    errors: list = []
    lock = threading.Lock()

    def client(ci: int):
        if kind == "http":
            c = httpx.Client(timeout=300, headers={"Authorization": f"Bearer {key}"} if key else None)
        else:
            ch = grpc.insecure_channel(grpc_target)
            stub = pbg.InferenceStub(ch)
            md = (("authorization", f"Bearer {key}"),) if key else None
        for k in range(per_client):
            p = PROMPTS[(ci + k) % len(PROMPTS)]
            t0 = time.perf_counter()
            try:
                if kind == "http":
                    r = c.post(f"{http_url}/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": p}],
                                                                          "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
                    ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == max_tokens
                else:
                    r = stub.Generate(pb.GenerateRequest(model=model, chat=pb.ChatPrompt(messages=[pb.ChatMessage(role="user", content=p)]),
                                                         sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)),
                                      metadata=md)
                    ok = r.usage.completion_tokens == max_tokens
            except Exception as e:  # noqa: BLE001
                ok = False
                errors.append(repr(e))
            dt = time.perf_counter() - t0
            with lock:
                (lat.append(dt) if ok else errors.append("bad response"))
        if kind == "http":
            c.close()
        else:
            ch.close()

    t0 = time.perf_counter()
    ts = [threading.Thread(target=client, args=(i,)) for i in range(conc)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")
    return {"rps": len(lat) / wall, "p50": p(0.5), "p99": p(0.99), "errors": len(errors)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=2, help="HTTP/gRPC alternations per level; the best run of each is kept")
    args = ap.parse_args()
    hp, gp = free_port(), free_port()
    tmp = tempfile.mkdtemp(prefix="loraplex-bench-grpc-")
    env = dict(os.environ, PYTHONUNBUFFERED="1", LORAPLEX_HOME=tmp)  # store and jobs in tmp; the model cache stays shared
    proc = subprocess.Popen([sys.executable, "-m", "loraplex.server.cli", "serve", "--port", str(hp), "--grpc-port", str(gp),
                             "--log-level", "warning"], env=env)
    url, target = f"http://127.0.0.1:{hp}", f"127.0.0.1:{gp}"
    try:
        wait_healthy(url, proc)
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        run_level("http", 2, 1, 4, url, target, model)  # warm-up
        run_level("grpc", 2, 1, 4, url, target, model)
        rows = []
        for conc in [int(x) for x in args.levels.split(",")]:
            per = max(args.requests_per_client, 8 // conc) if conc < 8 else args.requests_per_client
            best, seen = {}, {"http": [], "grpc": []}
            for kind in ("http", "grpc") * args.rounds:
                r = run_level(kind, conc, per, args.max_tokens, url, target, model)
                print(f"  {conc:2d} clients {kind:4s}: {r['rps']:.2f} req/s, p50 {r['p50']:.3f} s, p99 {r['p99']:.3f} s, {r['errors']} errors",
                      file=sys.stderr, flush=True)
                seen[kind].append(r["rps"])
                if kind not in best or r["rps"] > best[kind]["rps"]:
                    best[kind] = r
            for kind in seen:
                best[kind]["range"] = f"{min(seen[kind]):.2f}-{max(seen[kind]):.2f}"
            rows.append((conc, best["http"], best["grpc"]))
        print(f"\nshort chat requests, {args.max_tokens} new tokens (greedy, EOS ignored), embedded SmolLM2-135M-Instruct on CPU; "
              f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); clients in one process, server in another")
        print(f"best of {args.rounds} alternating runs per protocol (req/s range over the runs shows the machine's noise)")
        print(f"{'clients':>7} | {'HTTP req/s':>10} {'range':>11} {'p50 s':>7} {'p99 s':>7} | {'gRPC req/s':>10} {'range':>11} {'p50 s':>7} {'p99 s':>7} "
              f"| {'gRPC/HTTP req/s':>15} {'p50 HTTP/gRPC':>13} {'p99 HTTP/gRPC':>13}")
        for conc, h, g in rows:
            print(f"{conc:7d} | {h['rps']:10.2f} {h['range']:>11} {h['p50']:7.3f} {h['p99']:7.3f} | {g['rps']:10.2f} {g['range']:>11} {g['p50']:7.3f} {g['p99']:7.3f} "
                  f"| {g['rps'] / h['rps']:15.2f} {h['p50'] / g['p50']:13.2f} {h['p99'] / g['p99']:13.2f}")
        errs = sum(h["errors"] + g["errors"] for _, h, g in rows)
        print(f"errors: {errs}")
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
