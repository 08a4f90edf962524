"""`loraplex train job.yaml [--resume] [--store DIR] [--output DIR]`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loraplex.adapters_store.objects import default_home, store_arg


def run_job(cfg, out_dir: Path, store_dir: Path, *, resume: bool, caller: str, on_event=None, progress=False, **register):
    """Trains with the method the config names and registers the result (`register`: register_result's options);
    returns (version, route), or (None, None) when the run stopped early on a stop request (core.STOP_FILE_ENV: a
    pause) with a checkpoint to resume from."""
    from .register import register_result

    if cfg.num_processes > 1:
        from .distributed import train_distributed

        result = train_distributed(cfg, out_dir, resume=resume, on_event=on_event, progress=progress,
                                   store_dir=store_dir)
        if result is None:  # this machine only ran workers; machine 0 registers
            return None, None
    elif cfg.method == "sft":
        from .sft import train_sft

        result = train_sft(cfg, out_dir, resume=resume, on_event=on_event, progress=progress, store_dir=store_dir)
    else:
        from .preference import train_method

        result = train_method(cfg, out_dir, resume=resume, on_event=on_event, progress=progress, store_dir=store_dir)
    if result.stopped:
        return None, None
    return register_result(cfg, result.adapter_dir, result.metrics, store_dir, caller=caller,
                           extra_lineage=getattr(result, "lineage", None) or None, **register)


def console_events(e: dict) -> None:
    """What `loraplex train` prints besides its progress bar: the plan before the first step, and warnings."""
    if e.get("type") == "plan":
        eps = e.get("examples_per_step")
        print(f"loraplex train: {e['method']}: {e['optimizer_steps']} optimizer steps, {eps} examples per step"
              f"{' (mean; packed rows)' if e.get('packing') and not float(eps).is_integer() else ''}, "
              f"{e.get('train_examples')} training examples, {e['epochs']} epoch(s), "
              f"learning rate {e['learning_rate']:g}",
              file=sys.stderr, flush=True)
    elif e.get("level") == "warn":
        print(f"loraplex train: warning: {e['message']}", file=sys.stderr, flush=True)


def train_main(argv: list[str] | None = None) -> int:
    from loraplex.adapters_store.base_model import BaseModelError
    from loraplex.adapters_store.errors import StoreError

    from .config import JobConfigError, load_config
    from .data import DataError
    from .distributed import DistributedJobError

    ap = argparse.ArgumentParser(prog="loraplex train", description="run a training job and register its adapter")
    ap.add_argument("job", type=Path, help="job YAML file")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output dir")
    ap.add_argument("--store", type=store_arg, help="adapter store: a directory or s3://bucket/prefix (default "
                    "$LORAPLEX_HOME/store, ./var/store)")
    ap.add_argument("--output", type=Path, help="checkpoints and metrics (default $LORAPLEX_HOME/runs/<adapter name>)")
    ap.add_argument("--machine-rank", type=int, help="this machine's place in a multi-machine job (num_machines in the "
                    "file); overrides the file's machine_rank, so every machine runs the same file")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.job, {} if args.machine_rank is None else {"machine_rank": args.machine_rank})
    except JobConfigError as e:
        print(f"loraplex train: {e}", file=sys.stderr)
        return 2
    out = args.output or (Path(cfg.output_dir) if cfg.output_dir else default_home() / "runs" / cfg.adapter.name)
    store = args.store or default_home() / "store"
    try:
        v, route = run_job(cfg, out, store, resume=args.resume, caller=f"train:{args.job.name}", progress=True,
                           on_event=console_events)
    except (DataError, JobConfigError, BaseModelError) as e:
        print(f"loraplex train: {e}", file=sys.stderr)
        return 2
    except (StoreError, DistributedJobError) as e:  # e.g. the store refused the adapter; the checkpoints stay in --output
        print(f"loraplex train: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if v is None:
        if cfg.machine_rank > 0:
            print(json.dumps({"machine_rank": cfg.machine_rank, "done": True, "registered_on": "machine 0"}))
        return 0
    print(json.dumps({"adapter": v.ref, "path": str(v.path), "route": None if route is None else route.to_json()}))
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
