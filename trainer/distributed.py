"""Data-parallel SFT over several processes, launched through `accelerate` (the workers are dist_worker.py).

`train_distributed` runs in the job's own process: it validates the data once
(a malformed line fails before any worker starts), writes the job spec and
an explicit accelerate config, runs
`accelerate launch --num_processes N -m loraplex.trainer.dist_worker SPEC`,
forwards rank 0's events (`dist_events.jsonl`) and returns its result
(`dist_result.json`). Registration stays in the calling process, so it
happens once.

`distributed: ddp` runs on CPU (gloo) and CUDA (NCCL), through accelerate's
DDP wrapper. `distributed: fsdp` shards the model with torch's FSDP2
(`fully_shard`, each transformer layer then the root; only the LoRA weights
train) on the process group accelerate starts. We call `fully_shard` ourselves
because accelerate (1.15) enables FSDP only for accelerator devices and on CPU
silently falls back to plain DDP; FSDP2 itself runs on CPU over gloo (tested
against a single-process run). `deepspeed` is refused until it is wired and
tested.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from loraplex.adapters_store.errors import InternalError


class DistributedJobError(InternalError, RuntimeError):
    pass


def check_launchable(cfg) -> None:
    """Refuses, before any process starts, a distributed setup this machine cannot run."""
    from .config import JobConfigError

    if cfg.method != "sft":
        raise JobConfigError(f"num_processes > 1 is supported for method: sft only (got {cfg.method})")
    cuda = torch.cuda.is_available() and not (cfg.device or "").startswith("cpu")
    if cfg.distributed == "deepspeed":
        raise JobConfigError("distributed: deepspeed is not supported yet; use ddp or fsdp")
    if cfg.quantize is not None:
        raise JobConfigError(f"quantize: {cfg.quantize} runs on one process only; drop num_processes or quantize")
    per_machine = cfg.num_processes // cfg.num_machines
    if cuda and torch.cuda.device_count() < per_machine:
        raise JobConfigError(f"num_processes: {per_machine} on this machine but only {torch.cuda.device_count()} CUDA "
                             "device(s)")


class Ranks:
    """This process's place in a data-parallel job; world 1 (no accelerate) for an ordinary run."""

    def __init__(self, device: torch.device, accelerator=None, fsdp: bool = False):
        self.acc = accelerator
        self.world = accelerator.num_processes if accelerator else 1
        self.rank = accelerator.process_index if accelerator else 0
        self.device = accelerator.device if accelerator else device
        self.is_main = self.rank == 0
        self.fsdp = fsdp and accelerator is not None

    @classmethod
    def single(cls, device: torch.device) -> "Ranks":
        return cls(device)

    @classmethod
    def from_launch(cls, cfg) -> "Ranks":
        """Inside `accelerate launch`: gloo on CPU, NCCL on CUDA."""
        from accelerate import Accelerator

        cpu = not torch.cuda.is_available() or (cfg.device or "").startswith("cpu")
        return cls(torch.device("cpu"), Accelerator(cpu=cpu), fsdp=cfg.distributed == "fsdp")

    def prepare(self, module, opt):
        if self.acc is None:
            return module, opt
        if not self.fsdp:
            return self.acc.prepare(module, opt)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        names = {id(p): n for n, p in module.named_parameters()}
        for m in list(module.modules()):
            if type(m).__name__ in (module._no_split_modules or ()):  # each transformer layer is one unit
                fully_shard(m, mesh=mesh)
        fully_shard(module, mesh=mesh)
        sharded = dict(module.named_parameters())  # sharding replaced the parameters: point the optimizer at the new ones
        for g in opt.param_groups:
            g["params"] = [sharded[names[id(p)]] for p in g["params"]]
        return module, opt

    def unwrap(self, module):
        return self.acc.unwrap_model(module) if self.acc is not None else module

    def no_sync(self, module, last: bool):
        """Gradients are all-reduced once per step, on each rank's last micro-batch."""
        if self.fsdp:  # FSDP2 has no no_sync context but a flag on the module
            module.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if self.acc is None or last:
            return contextlib.nullcontext()
        return self.acc.no_sync(module)

    def backward(self, loss: torch.Tensor) -> None:
        if self.acc is None:
            loss.backward()
        else:
            self.acc.backward(loss)

    def clip(self, module, max_norm: float) -> None:
        params = [p for p in module.parameters() if p.requires_grad]
        if self.acc is None:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            self.acc.clip_grad_norm_(params, max_norm)

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def adapter_state(self, module) -> dict | None:
        """FSDP: the trainable (LoRA) weights of the wrapped PEFT model, gathered whole (every rank must call this);
        otherwise None."""
        if not self.fsdp:
            return None
        return {n.removeprefix("model."): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
                for n, p in module.named_parameters() if p.requires_grad}

    def deal(self, group: list, weights: list[float]) -> list[tuple]:
        """This rank's share of a step's micro-batches, padded with weight-0 repeats so every rank runs as many
        forward/backward passes (and so as many collectives) as the others."""
        mine = list(zip(group[self.rank :: self.world], weights[self.rank :: self.world]))
        per_rank = -(-len(group) // self.world)
        while len(mine) < per_rank:
            mine.append((group[0], 0.0))
        return mine


def _load_libc():
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc() if sys.platform.startswith("linux") else None  # loaded here: a preexec_fn must not load libraries


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies (usable as a Popen preexec_fn).

    torchrun puts each rank in its own session, so a SIGKILL of the job's
    process (cancel escalation, the OOM killer) would otherwise leave ranks
    training on as orphans.
    """
    if _LIBC is None:
        return
    _LIBC.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a Python process we start: ours, PYTHONSAFEPATH=1, no tokenizer threads, then `extra`.

    `python -m` puts the working directory first on sys.path; run from a
    checkout, our `kernels/` folder would then shadow the `kernels`
    distribution that transformers imports (DESIGN.md, "Repository layout").
    """
    return {**os.environ, "PYTHONSAFEPATH": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_config(cfg, port: int) -> dict:
    """An explicit accelerate config, so a user's ~/.cache/huggingface/accelerate default never changes the job.

    The same for ddp and fsdp: for fsdp the workers shard the model themselves (Ranks.prepare)."""
    cuda = torch.cuda.is_available() and not (cfg.device or "").startswith("cpu")
    out = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "num_machines": cfg.num_machines,
           "machine_rank": cfg.machine_rank, "num_processes": cfg.num_processes, "mixed_precision": "no", "use_cpu": not cuda,
           "main_process_port": port, "gpu_ids": "all", "rdzv_backend": "static", "same_network": True,
           "downcast_bf16": "no", "debug": False}
    if cfg.num_machines > 1:
        out["main_process_ip"] = cfg.main_process_ip
    return out


def train_distributed(cfg, out_dir: Path, *, resume: bool = False, on_event=None, progress: bool = False,
                      stop_after: int | None = None, store_dir=None):
    """Runs the SFT job on `cfg.num_processes` workers and returns rank 0's TrainResult (`stop_after` as in train_sft);
    None on a machine other than machine 0 of a multi-machine job, which only contributes workers."""
    import yaml
    from transformers import AutoTokenizer

    from loraplex.adapters_store.base_model import resolve_base_model

    from .sft import TrainResult, prepare_data

    check_launchable(cfg)
    prepare_data(cfg, AutoTokenizer.from_pretrained(resolve_base_model(cfg.base_model)))  # fails here on malformed data
    emit = on_event or (lambda e: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Several machines share `out_dir` (every rank writes its state into the checkpoint rank 0 makes), so each
    # machine's launcher files carry its rank, and only machine 0 clears what rank 0 writes.
    tag = f"-machine{cfg.machine_rank}" if cfg.num_machines > 1 else ""
    first = cfg.machine_rank == 0
    if first:
        for f in ("dist_events.jsonl", "dist_result.json"):
            (out_dir / f).unlink(missing_ok=True)
        if not resume and (out_dir / "metrics.jsonl").exists():
            (out_dir / "metrics.jsonl").unlink()
    port = cfg.main_process_port or _free_port()
    spec = out_dir / f"dist_spec{tag}.json"
    spec.write_text(json.dumps({"config": cfg.model_dump(mode="json"), "out_dir": str(out_dir), "resume": resume,
                                "stop_after": stop_after, "store_dir": None if store_dir is None else str(store_dir)}))
    acc_cfg = out_dir / f"accelerate{tag}.yaml"
    acc_cfg.write_text(yaml.safe_dump(accelerate_config(cfg, port)))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(acc_cfg), "--num_processes", str(cfg.num_processes),
           "--main_process_port", str(port)]
    if cfg.num_machines > 1:
        cmd += ["--num_machines", str(cfg.num_machines), "--machine_rank", str(cfg.machine_rank),
                "--main_process_ip", cfg.main_process_ip]
    cmd += ["-m", "loraplex.trainer.dist_worker", str(spec)]
    env = child_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // cfg.num_processes)))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"sft {cfg.adapter.name} x{cfg.num_processes}", unit="step")
    mine = cfg.num_processes // cfg.num_machines
    emit({"type": "message", "message": f"launching {mine} workers ({cfg.distributed})" + (
        f" on machine {cfg.machine_rank} of {cfg.num_machines}, {cfg.num_processes} in all" if cfg.num_machines > 1 else "")})
    log_path = out_dir / f"dist_launcher{tag}.log"
    offset = 0
    with open(log_path, "wb") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                             preexec_fn=die_with_parent)
        try:
            while True:
                rc = p.poll()
                if first:  # rank 0's events: machine 0 reports them
                    offset = _forward_events(out_dir / "dist_events.jsonl", offset, emit, bar)
                if rc is not None:
                    break
                time.sleep(0.2)
        finally:
            if p.poll() is None:  # we are being torn down (cancel, Ctrl-C): take the workers with us
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
            if bar is not None:
                bar.close()
    res = out_dir / "dist_result.json"
    if rc == 0 and cfg.machine_rank > 0:
        return None  # a worker machine: global rank 0, on machine 0, saves the adapter and registers it
    if rc != 0 or not res.exists():
        lines = log_path.read_bytes()[-4000:].decode(errors="replace").strip().splitlines()
        reason = next((l for l in reversed(lines) if "Error" in l), lines[-1] if lines else "no output")
        raise DistributedJobError(f"the distributed launch exited with status {rc}: {reason.strip()}")
    r = json.loads(res.read_text())
    return TrainResult(Path(r["adapter_dir"]), r["metrics"], r["steps"], r["losses"], r.get("lineage", {}),
                       stopped=r.get("stopped", False))


def _forward_events(path: Path, offset: int, emit, bar) -> int:
    if not path.exists():
        return offset
    with open(path, "rb") as f:
        f.seek(offset)
        chunk = f.read()
    end = chunk.rfind(b"\n") + 1
    for line in chunk[:end].decode().splitlines():
        e = json.loads(line)
        if bar is not None and e.get("type") == "metrics":
            bar.total = e["total_steps"]
            bar.n = e["step"]
            bar.set_postfix(loss=f"{e['loss']:.4f}")
        emit(e)
    return offset + end
