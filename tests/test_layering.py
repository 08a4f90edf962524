"""The dependency rules of DESIGN.md's "Repository layout", checked in a fresh interpreter."""

import json
import subprocess
import sys

import pytest


def _loaded_after(import_line: str) -> list[str]:
    code = f"import sys\n{import_line}\nimport json; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_the_engine_loads_no_front_end():
    mods = _loaded_after("from loraplex.server.engine import Engine, EngineConfig")
    front = [m for m in mods if m.startswith("loraplex.server.api") or m.split(".")[0] in ("starlette", "grpc", "uvicorn")]
    assert not front, f"importing the engine pulled in front-end modules: {front}"


@pytest.mark.parametrize("module", ["loraplex.adapters_store.store", "loraplex.kernels"])
def test_lower_layers_import_no_server_or_trainer(module):
    mods = _loaded_after(f"import {module}")
    upward = [m for m in mods if m.startswith(("loraplex.server", "loraplex.trainer"))]
    assert not upward, f"{module} imports upward: {upward}"


def test_the_trainer_never_imports_the_front_ends():
    mods = _loaded_after("import loraplex.trainer.core, loraplex.trainer.jobs, loraplex.trainer.rollout, loraplex.trainer.run_job")
    front = [m for m in mods if m.startswith("loraplex.server.api")]
    assert not front, f"the trainer pulled in front-end modules: {front}"


def test_a_python_we_start_from_a_checkout_imports_transformers(monkeypatch):
    """Started from the repository root (a server run from its checkout), `python -m` would find our kernels/
    folder before the `kernels` distribution transformers imports; the environment we give children prevents it."""
    from pathlib import Path

    from loraplex.trainer.distributed import child_env

    root = Path(__file__).resolve().parents[1]
    monkeypatch.delenv("PYTHONSAFEPATH", raising=False)
    code = "import transformers.activations; print('ok')"  # -c, like -m, puts the working directory first
    ours = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, env=child_env())
    assert ours.returncode == 0 and ours.stdout.strip() == "ok", ours.stderr[-2000:]


def test_every_benchmark_starts_as_make_runs_it():
    """`make gpu-check` starts the benchmarks with PYTHONSAFEPATH=1, which leaves bench/ off sys.path: each script
    must find bench/common.py itself. One child runs each script's imports and `--help` as `python bench/X.py` would."""
    from pathlib import Path

    from loraplex.trainer.distributed import child_env

    root = Path(__file__).resolve().parents[1]
    scripts = sorted(str(p) for p in (root / "bench").glob("*.py") if p.name != "common.py")
    code = (
        "import runpy, sys\n"
        "failed, path0, mods0 = [], list(sys.path), set(sys.modules)\n"
        f"for path in {scripts!r}:\n"
        "    sys.path[:] = path0  # as a fresh `python bench/X.py`: no other script's path or modules\n"
        "    for m in set(sys.modules) - mods0:\n"
        "        if m in ('common', 'helpers') or m.startswith(('serve_', 'lora_', 'train_')): del sys.modules[m]\n"
        "    sys.argv = [path, '--help']\n"
        "    try:\n"
        "        runpy.run_path(path, run_name='__main__')\n"
        "    except SystemExit as e:\n"
        "        if e.code not in (0, None): failed.append((path, f'exit {e.code}'))\n"
        "    except Exception as e:\n"
        "        failed.append((path, repr(e)))\n"
        "    else:\n"
        "        failed.append((path, 'ran without argparse --help'))\n"
        "print('FAILED', failed) if failed else print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, env=child_env(),
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip().splitlines()[-1] == "ok", (run.stdout + run.stderr)[-3000:]
