"""The `loraplex` command: `serve`, `train`, `routes`, `keys`, `tenants`."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from loraplex.adapters_store.objects import store_arg

STORE_HELP = ("adapter store: a directory or s3://bucket/prefix (endpoint and credentials from AWS_ENDPOINT_URL_S3 / "
              "AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION; default "
              "$LORAPLEX_HOME/store, ./var/store)")

def _adapter_arg(s: str) -> tuple[str, str]:
    name, sep, path = s.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter expects NAME=DIR, got {s!r}")
    return name, path


def _reward_arg(s: str) -> tuple[str, str]:
    name, sep, spec = s.partition("=")
    if not sep or not name or ":" not in spec:
        raise argparse.ArgumentTypeError(f"--reward-function expects NAME=module:function, got {s!r}")
    return name, spec


def serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the base model and its adapters over HTTP (OpenAI-compatible) and gRPC")
    p.add_argument("--model", help="local Hugging Face checkpoint dir (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", help="the id clients use for the base model")
    p.add_argument("--adapter", action="append", type=_adapter_arg, default=[], metavar="NAME=DIR", help="register a PEFT adapter at start (repeatable)")
    p.add_argument("--store", type=store_arg, help=STORE_HELP)
    p.add_argument("--store-cache", type=Path, help="an s3:// store's local cache of adapter files, checked by "
                   "content hash (default $LORAPLEX_HOME/store-cache/<bucket>/<prefix>)")
    p.add_argument("--registry", help="registry database: a postgresql:// URL shared by replicas (default "
                   "$LORAPLEX_REGISTRY, else registry.sqlite3 in the store; an s3:// store needs one named)")
    p.add_argument("--allow-hub-org", action="append", dest="hub_orgs", metavar="ORG",
                   help="let POST /v1/adapters register Hugging Face hub adapters (org/repo[@rev]) of this org; '*' = any "
                        "(repeatable; default: none, remote ids refused)")
    p.add_argument("--allowed-adapter-root", action="append", type=Path, dest="allowed_adapter_roots", help="only register adapters from under these dirs (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=50051, help="0 disables gRPC")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: bf16 on GPU, fp32 on CPU)")
    for flag, default, help_ in [
        ("--max-loras", 8, "adapter slots usable in one batch"),
        ("--max-cpu-loras", 64, "adapter versions kept loaded in host memory"),
        ("--max-lora-rank", 256, "largest rank accepted"),
        ("--max-adapter-bytes", 4 << 30, "size cap of one adapter version's files (only its own are copied)"),
        ("--max-num-seqs", 64, "sequences in one batch"),
        ("--max-num-batched-tokens", 2048, "token budget of one step (prefill chunks + decodes)"),
        ("--max-queue", 512, "waiting requests before 429"),
        ("--kv-cache-tokens", 65536, "KV cache budget, in tokens over all sequences"),
    ]:
        p.add_argument(flag, type=int, default=default, help=help_)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false", default=None,
                   help="do not reuse the KV of prompt prefixes already computed (per adapter version)")
    p.add_argument("--jobs-dir", type=Path, help="fine-tuning files and jobs (default $LORAPLEX_HOME/jobs; with a "
                   "PostgreSQL registry they are shared by the replicas, in <store>/jobs)")
    p.add_argument("--job-lease-seconds", type=float,
                   help="a replica that has not renewed a running job's lease for this long is taken to be gone: "
                   "another replica resumes the job (default 10)")
    p.add_argument("--max-concurrent-jobs", type=int, default=1, help="training jobs run at once")
    from loraplex.trainer import jobs

    p.add_argument("--max-queued-jobs", type=int,
                   help=f"fine-tuning jobs waiting before new ones get 429 (default {jobs.DEFAULT_MAX_QUEUED_JOBS})")
    p.add_argument("--max-job-seconds", type=float,
                   help=f"wall-clock limit of one training job; past it the job fails (default {jobs.DEFAULT_MAX_JOB_SECONDS})")
    p.add_argument("--reward-function", action="append", type=_reward_arg, default=[], metavar="NAME=module:function",
                   help="a Python reward function jobs may name by NAME (repeatable); requests never name code")
    p.add_argument("--max-request-bytes", type=int,
                   help="largest HTTP request body, uploads aside (default 8 MiB; 413 above)")
    p.add_argument("--max-upload-bytes", type=int,
                   help="largest file upload, POST /v1/files (default 512 MiB; 413 above)")
    p.add_argument("--drain-timeout", type=float,
                   help="seconds SIGTERM lets in-flight requests finish before aborting them (default 30)")
    p.add_argument("--no-console", dest="console", action="store_false", help="do not serve the web console at /console")
    p.add_argument("--api-key", default=os.environ.get("LORAPLEX_API_KEY") or None, metavar="KEY",
                   help="a single admin key (tenant '*', every scope) besides those of `loraplex keys create` "
                        "(default $LORAPLEX_API_KEY)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="serve without authentication, even on a non-loopback --host (anyone who can connect "
                        "is admin)")
    p.add_argument("--audit-retention-days", type=float, metavar="DAYS",
                   help="delete audit entries older than this, as new ones are written (default: keep all)")
    p.add_argument("--log-level", default="info")


def cmd_serve(args) -> int:
    import uvicorn

    from .app import ServerState, build_app
    from .runtime import ServeConfig, build_state, open_gate

    fields = set(ServeConfig.model_fields)
    raw = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    raw["adapters"] = dict(args.adapter)
    raw["reward_functions"] = dict(args.reward_function)
    try:
        cfg = ServeConfig(**raw)
    except Exception as e:
        print(f"loraplex serve: {e}", file=sys.stderr)
        return 2
    from loraplex.adapters_store import StoreError

    try:
        # refuses a non-loopback address without keys, and a store it cannot open, before loading anything
        open_gate(cfg).registry.store.close()
    except (ValueError, StoreError) as e:
        print(f"loraplex serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = ServerState()
    from .api.http_fine_tuning import MULTIPART_SLACK

    # --max-upload-bytes bounds the file, which the upload route counts exactly (413 naming the flag's value); the
    # body limit stays above the file's limit plus the multipart framing the route allows, as a backstop
    app = build_app(state, max_request_bytes=cfg.max_request_bytes, max_upload_bytes=cfg.max_upload_bytes + 2 * MULTIPART_SLACK,
                    console=cfg.console)
    failed = threading.Event()
    log = logging.getLogger("loraplex")
    # Bounded shutdown: after `drain_timeout` uvicorn cancels the handlers still running (their engine requests
    # are cancelled with them), so SIGTERM ends the process whatever is in flight.
    http = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=args.log_level.lower(),
                                         timeout_graceful_shutdown=cfg.drain_timeout))

    def fail(reason: str) -> None:
        """Ends the process with a non-zero status: a server that cannot serve must be restarted, not kept up."""
        state.error = reason
        failed.set()
        http.should_exit = True

    def load():
        try:
            build_state(cfg, state)
            log.info("ready: %s on http://%s:%d", state.service.model_id, cfg.host, cfg.port)
        except Exception as e:
            log.exception("startup failed")
            fail(f"startup failed: {e}")
            return
        state.engine.failed.wait()  # only returns if the engine thread died
        if not state.draining:
            log.critical("%s; exiting so that a supervisor restarts the server", state.engine.failure)
            fail(state.engine.failure)

    threading.Thread(target=load, name="loraplex-load", daemon=True).start()
    # gRPC runs on its own asyncio loop in its own thread (see grpc_server.py); uvicorn keeps the main thread.
    grpc_server = None
    if cfg.grpc_port:
        from .api.grpc_server import GrpcServer

        grpc_server = GrpcServer(state, host=cfg.host, port=cfg.grpc_port)
        try:
            grpc_server.start()  # NOT_SERVING on the health service until the model is loaded
        except OSError as e:
            print(f"loraplex serve: {e}", file=sys.stderr)
            return 1
        logging.getLogger("loraplex").info("gRPC on %s:%d", cfg.host, grpc_server.port)
    def handle_exit(sig, frame):
        # uvicorn's own handler would re-raise the signal once HTTP is down, killing the process
        # before the gRPC drain and engine shutdown below; this one only asks it to stop.
        state.draining = True  # at once: gRPC health NOT_SERVING, new calls UNAVAILABLE; in-flight ones finish
        if http.should_exit and sig == signal.SIGINT:
            http.force_exit = True  # a second Ctrl-C
        http.should_exit = True

    http.handle_exit = handle_exit
    try:
        http.run()
        if not http.started:
            failed.set()  # uvicorn could not bind its port (it logged why)
    finally:
        state.draining = True  # health turns NOT_SERVING while in-flight RPCs finish
        if grpc_server is not None:
            grpc_server.stop(grace=cfg.drain_timeout)
        if state.jobs is not None:
            state.jobs.close()
        if state.gate is not None:
            state.gate.limiter.close()
        if state.engine is not None:
            state.engine.shutdown()
    if failed.is_set():
        print(f"loraplex serve: {state.error or 'could not start'}", file=sys.stderr)
        return 1
    return 0


def routes_parser(sub) -> None:
    p = sub.add_parser("routes", help="show and change adapter routes (canary splits) in the store")
    p.add_argument("--store", type=store_arg, help=STORE_HELP)
    p.add_argument("--caller", default=None, help="who makes the change (recorded in the history; default $USER); "
                   "with --server the server records the identity it sees instead")
    p.add_argument("--server", default=os.environ.get("LORAPLEX_SERVER"), metavar="URL",
                   help="a running server (default $LORAPLEX_SERVER): change routes through its API, so it loads new versions "
                        "before they take traffic and arms guards at once, instead of writing the store directly")
    rs = p.add_subparsers(dest="action", required=True)
    s = rs.add_parser("set", help="loraplex routes set NAME VERSION=PERCENT ... [--sticky user] [--guard-max-error-rate 0.05]")
    s.add_argument("name")
    s.add_argument("weights", nargs="+", metavar="VERSION=PERCENT")
    s.add_argument("--sticky", choices=["user", "session"])
    s.add_argument("--guard-max-error-rate", type=float, metavar="RATE",
                   help="guard: roll the route back by itself when a version new in it fails more than RATE (0..1) of its last "
                        "--guard-min-requests requests (armed by the running server, or by the server when it starts)")
    s.add_argument("--guard-min-requests", type=int, metavar="N", help="guard: requests the rate is measured over (default 20)")
    s = rs.add_parser("promote", help="send all traffic of NAME to VERSION")
    s.add_argument("name")
    s.add_argument("version", type=int)
    s = rs.add_parser("rollback", help="return NAME to its previous route")
    s.add_argument("name")
    s.add_argument("--reason")
    for a in ("show", "history"):
        s = rs.add_parser(a)
        s.add_argument("name")


def cmd_routes(args) -> int:
    import getpass
    import json

    from loraplex.adapters_store import AdapterStore, StoreError

    from .runtime import default_home

    guard, err = _guard_arg(args) if args.action == "set" else (None, None)
    if err:
        print(f"loraplex routes: {err}", file=sys.stderr)
        return 2
    caller = args.caller or f"cli:{getpass.getuser()}"
    weights = {}
    for w in getattr(args, "weights", None) or []:
        v, sep, pct = w.partition("=")
        if not sep or not v.isdigit() or not pct.isdigit():
            print(f"loraplex routes: expected VERSION=PERCENT, got {w!r}", file=sys.stderr)
            return 2
        weights[int(v)] = int(pct)
    if args.server:
        return _routes_via_server(args, weights, guard)
    try:
        store = AdapterStore(args.store or default_home() / "store")
    except StoreError as e:
        print(f"loraplex routes: {e}", file=sys.stderr)
        return 1
    try:
        if args.action == "set":
            r = store.set_route(args.name, weights, sticky=args.sticky, guard=guard, caller=caller)
        elif args.action == "promote":
            r = store.promote(args.name, args.version, caller=caller)
        elif args.action == "rollback":
            r = store.rollback(args.name, caller=caller, reason=args.reason)
        elif args.action == "show":
            r = store.get_route(args.name)
            if r is None:
                store.versions(args.name)
                print(f"{args.name}: no route; requests go to the latest version ({store.get(args.name).version})")
                return 0
        else:
            for c in store.route_history(args.name):
                print(json.dumps({"at": c.at, "caller": c.caller, "action": c.action, "old": c.old and c.old["versions"],
                                  "new": c.new and c.new["versions"], "reason": c.reason}))
            return 0
    except StoreError as e:
        print(f"loraplex routes: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"name": args.name, **r.to_json()}))
    return 0


def _routes_via_server(args, weights: dict, guard: dict | None) -> int:
    """`loraplex routes ... --server URL`: the same actions through the server's HTTP API."""
    import json

    import httpx

    base = f"{args.server.rstrip('/')}/v1/routes/{args.name}"
    try:
        with httpx.Client(timeout=120) as c:
            if args.action == "set":
                body = {"versions": {str(v): p for v, p in weights.items()}, "sticky": args.sticky}
                if guard:
                    body["guard"] = guard
                r = c.put(base, json=body)
            elif args.action == "promote":
                r = c.post(f"{base}/promote", json={"version": args.version})
            elif args.action == "rollback":
                r = c.post(f"{base}/rollback", json={"reason": args.reason} if args.reason else {})
            elif args.action == "show":
                r = c.get(base)
            else:
                r = c.get(f"{base}/history")
    except httpx.HTTPError as e:
        print(f"loraplex routes: cannot reach the server at {args.server}: {e}", file=sys.stderr)
        return 1
    if r.status_code >= 400:
        try:
            msg = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = r.text
        print(f"loraplex routes: {msg}", file=sys.stderr)
        return 1
    body = r.json()
    if args.action == "history":
        for c in body["data"]:
            print(json.dumps(c))
    else:
        print(json.dumps({"name": args.name, **body}))
    return 0


def _guard_arg(args) -> tuple[dict | None, str | None]:
    """The route guard the `--guard-*` flags ask for, checked as the HTTP API checks it: (guard, None) or (None, error)."""
    if args.guard_max_error_rate is None:
        if args.guard_min_requests is not None:
            return None, "--guard-min-requests needs --guard-max-error-rate"
        return None, None
    from loraplex.adapters_store import StoreError
    from loraplex.adapters_store.store import check_guard

    raw = {"max_error_rate": args.guard_max_error_rate}
    if args.guard_min_requests is not None:
        raw["min_requests"] = args.guard_min_requests
    try:
        return check_guard(raw), None
    except StoreError as e:
        flag = (e.param or "guard.max_error_rate").rsplit(".", 1)[-1].replace("_", "-")
        return None, f"--guard-{flag}: {e}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from loraplex.trainer.cli import train_main

        return train_main(argv[1:])
    parser = argparse.ArgumentParser(prog="loraplex")
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve_parser(sub)
    sub.add_parser("train", help="run a training job from a YAML file (see `loraplex train --help`)")
    routes_parser(sub)
    from .auth_cli import cmd_keys, cmd_tenants, keys_parser, tenants_parser

    keys_parser(sub)
    tenants_parser(sub)
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        return cmd_serve(args)
    if args.cmd == "routes":
        return cmd_routes(args)
    if args.cmd == "keys":
        return cmd_keys(args)
    if args.cmd == "tenants":
        return cmd_tenants(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
