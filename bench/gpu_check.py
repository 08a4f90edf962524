"""Everything that needs a GPU, in one command (`make gpu-check`), with every figure in one results file.

Runs, in order, each in its own process so one failure does not hide the rest:
  1. the GPU tests: every test marked `gpu`, plus the kernel and engine tests that run on CUDA when it is
     present (tests/test_kernels.py, tests/test_engine_triton.py, tests/test_engine_parity.py);
  2. bench/lora_kernels.py (grouped and interleaved layouts);
  3. the serving benchmarks on the GPU: bench/serve_multi_lora.py and bench/serve_prefix.py.
Each command, its exit status, wall time and the tail of its output go to
bench/results/gpu-check-<UTC time>.md (or --out). The exit status is 0 only if every step passed.
Without CUDA it says so and exits 2 without running anything.

Usage: python bench/gpu_check.py [--out FILE] [--quick]
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TAIL = 12000  # characters of each command's output kept in the results file


def steps(py: str, quick: bool) -> list[tuple[str, list[str]]]:
    tests = ["tests/test_kernels.py", "tests/test_engine_triton.py", "tests/test_engine_parity.py"]
    return [
        ("GPU tests (marked gpu)", [py, "-m", "pytest", "-q", "-m", "gpu", "tests/"]),
        ("kernel and engine tests on CUDA", [py, "-m", "pytest", "-q", *tests]),
        ("bench/lora_kernels.py grouped", [py, "bench/lora_kernels.py", "--layout", "grouped", *(["--quick"] if quick else [])]),
        ("bench/lora_kernels.py interleaved", [py, "bench/lora_kernels.py", "--layout", "interleaved", *(["--quick"] if quick else [])]),
        ("bench/serve_multi_lora.py", [py, "bench/serve_multi_lora.py", "--device", "cuda"]),
        ("bench/serve_prefix.py", [py, "bench/serve_prefix.py", "--device", "cuda"]),
    ]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--quick", action="store_true", help="bench/lora_kernels.py on one model only")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device is visible to torch (torch.cuda.is_available() is False); nothing was run.\n"
              "Run it on a machine with an NVIDIA GPU and a CUDA build of torch.", file=sys.stderr)
        return 2
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or ROOT / "bench" / "results" / f"gpu-check-{stamp}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = [f"# make gpu-check, {stamp}", "",
             f"- device: {torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible)",
             f"- torch {torch.__version__}, CUDA {torch.version.cuda}, commit {head or 'unknown'}", ""]
    failed = []
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for title, cmd in steps(sys.executable, args.quick):
        print(f"gpu-check: {title}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        text = (run.stdout + run.stderr)[-TAIL:]
        status = "passed" if run.returncode == 0 else f"FAILED (exit {run.returncode})"
        if run.returncode:
            failed.append(title)
        print(f"gpu-check: {title}: {status} in {wall:.0f} s", flush=True)
        lines += [f"## {title}: {status}, {wall:.0f} s", "", f"`{' '.join(cmd[1:])}`", "", "```", text.rstrip(), "```", ""]
        out.write_text("\n".join(lines))
    lines += ["## summary", "", "all steps passed" if not failed else "failed: " + ", ".join(failed), ""]
    out.write_text("\n".join(lines))
    print(f"gpu-check: results in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
