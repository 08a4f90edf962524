"""A training job's own process: `python -m loraplex.trainer.run_job JOB_DIR`.

JOB_DIR/job.json holds the resolved JobConfig, the store and output paths;
the process appends events to JOB_DIR/events.jsonl and ends by writing
JOB_DIR/result.json (success) or JOB_DIR/error.json (failure, with the
reason). Running apart from the server means a crash, an out-of-memory kill
or a cancel of the job never touches the server.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path


def main(job_dir: str) -> int:
    d = Path(job_dir)
    spec = json.loads((d / "job.json").read_text())
    events = open(d / "events.jsonl", "a", buffering=1)

    stopped_at = []

    def emit(e: dict) -> None:
        if e.get("type") == "stopped":
            stopped_at.append(e["step"])
        events.write(json.dumps({"at": time.time(), **e}) + "\n")

    try:
        from .cli import run_job
        from .config import parse_config

        cfg = parse_config(spec["config"])
        if spec.get(
            "new_name"
        ):  # before any work: a name taken since the job was queued fails it now, not after training
            from loraplex.adapters_store import AdapterStore

            from .register import check_new_name

            check_new_name(AdapterStore(spec["store_dir"]), cfg.adapter.name)
        emit({"type": "message", "message": f"training {cfg.adapter.name} ({cfg.method}) started"})
        v, route = run_job(
            cfg,
            Path(spec["output_dir"]),
            Path(spec["store_dir"]),
            resume=spec.get("resume", False),
            caller=spec.get("caller", "fine_tuning"),
            on_event=emit,
            new_name=spec.get("new_name", False),
            public_names=spec.get("public_names"),
        )
        if v is None:  # paused (a stop request): the checkpoint is written; the server resumes from it
            (d / "paused.json").write_text(json.dumps({"step": stopped_at[-1] if stopped_at else None}))
            return 0
        result = {
            "adapter": v.name,
            "version": v.version,
            "ref": v.ref,
            "route": None if route is None else route.to_json(),
            "trained_tokens": v.lineage.get("metrics", {}).get("tokens_seen_this_run"),
        }
        (d / "result.json").write_text(json.dumps(result))
        emit({"type": "message", "message": f"registered {v.ref}"})
        return 0
    except Exception as e:  # the reason goes to the job record; the server stays up regardless
        from loraplex.adapters_store.errors import AdapterConflict, InvalidAdapter, InvalidRequest

        from .config import JobConfigError
        from .data import DataError

        known = isinstance(e, (DataError, JobConfigError, InvalidAdapter, InvalidRequest, AdapterConflict))
        (d / "error.json").write_text(
            json.dumps(
                {
                    "code": "invalid_training_file"
                    if isinstance(e, DataError)
                    else ("invalid_request" if known else "training_failed"),
                    "message": str(e),
                    "traceback": None if known else traceback.format_exc(),
                }
            )
        )
        emit({"type": "message", "level": "error", "message": f"job failed: {e}"})
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
