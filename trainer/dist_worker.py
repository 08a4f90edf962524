"""One data-parallel SFT rank (launched by distributed.py): `python -m loraplex.trainer.dist_worker SPEC`.

SPEC (JSON) holds the resolved config, the output dir and whether to resume.
Every rank runs the same SFT loop as a single-process job (sft.train_sft) with
its `Ranks`; rank 0 writes `dist_events.jsonl` (the job's events) and
`dist_result.json` (adapter dir, metrics, loss curve) into the output dir.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(spec_path: str) -> int:
    from .config import parse_config
    from .distributed import Ranks, die_with_parent
    from .sft import train_sft

    die_with_parent()  # the launcher (torchrun) gone means the job is gone

    spec = json.loads(Path(spec_path).read_text())
    cfg = parse_config(spec["config"])
    out_dir = Path(spec["out_dir"])
    ranks = Ranks.from_launch(cfg)
    events = open(out_dir / "dist_events.jsonl", "a", buffering=1) if ranks.is_main else None

    def emit(e: dict) -> None:
        if events is not None:
            events.write(json.dumps({"at": time.time(), **e}) + "\n")

    res = train_sft(cfg, out_dir, resume=bool(spec.get("resume")), on_event=emit, stop_after=spec.get("stop_after"), ranks=ranks,
                    store_dir=spec.get("store_dir"))
    if ranks.is_main:
        (out_dir / "dist_result.json").write_text(json.dumps({"adapter_dir": str(res.adapter_dir), "metrics": res.metrics,
                                                              "steps": res.steps, "losses": res.losses,
                                                              "stopped": res.stopped, "lineage": res.lineage}))
    ranks.barrier()
    ranks.acc.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
