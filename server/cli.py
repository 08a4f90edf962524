"""The `loraplex` command: `serve`, `train`, `routes`."""
from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path


def _adapter_arg(s: str) -> tuple[str, str]:
    name, sep, path = s.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter expects NAME=DIR, got {s!r}")
    return name, path


def serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the base model and its adapters over HTTP (OpenAI-compatible) and gRPC")
    p.add_argument("--model", help="local Hugging Face checkpoint dir (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", help="the id clients use for the base model")
    p.add_argument("--adapter", action="append", type=_adapter_arg, default=[], metavar="NAME=DIR", help="register a PEFT adapter at start (repeatable)")
    p.add_argument("--store", type=Path, help="adapter store directory (default $LORAPLEX_HOME/store, ./var/store)")
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
        ("--max-num-seqs", 64, "sequences in one batch"),
        ("--max-num-batched-tokens", 2048, "token budget of one step (prefill chunks + decodes)"),
        ("--max-queue", 512, "waiting requests before 429"),
        ("--kv-cache-tokens", 65536, "KV cache budget, in tokens over all sequences"),
    ]:
        p.add_argument(flag, type=int, default=default, help=help_)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--log-level", default="info")


def cmd_serve(args) -> int:
    import uvicorn

    from .app import ServerState, build_app
    from .runtime import ServeConfig, build_state

    fields = set(ServeConfig.model_fields)
    raw = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    raw["adapters"] = dict(args.adapter)
    try:
        cfg = ServeConfig(**raw)
    except Exception as e:
        print(f"loraplex serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = ServerState()
    extra = []
    try:
        from .http_fine_tuning import fine_tuning_routes  # noqa: F401  (the trainer's HTTP API, when installed)
    except ImportError:
        fine_tuning_routes = None
    app = build_app(state, extra_routes=extra)
    failed = threading.Event()

    def load():
        try:
            build_state(cfg, state)
            logging.getLogger("loraplex").info("ready: %s on http://%s:%d", state.service.model_id, cfg.host, cfg.port)
        except Exception as e:
            logging.getLogger("loraplex").exception("startup failed")
            state.error = f"startup failed: {e}"
            failed.set()

    threading.Thread(target=load, name="loraplex-load", daemon=True).start()
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=args.log_level.lower())
    return 1 if failed.is_set() else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from loraplex.trainer.cli import train_main

        return train_main(argv[1:])
    parser = argparse.ArgumentParser(prog="loraplex")
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve_parser(sub)
    sub.add_parser("train", help="run a training job from a YAML file (see `loraplex train --help`)")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        return cmd_serve(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
