"""What every training method shares: loading base + LoRA, optimizer and schedule, the step logger, checkpoints,
resume, stop requests and saving the final adapter.

SFT, DPO, reward, PPO and GRPO differ in their data, their loop and their
loss; they do not differ in how a run starts, how a step is recorded, how it
stops or how its result is written. Each method's module keeps its own loop
readable from top to bottom and hands the bookkeeping to a `Run`:

    run = Run(cfg, out_dir, resume=..., on_event=..., progress=..., stop_after=...)
    model = run.load_weights(model)                 # adapter weights of the checkpoint being resumed, if any
    opt, sched = make_optimizer(params, cfg, total)
    run.start(opt, sched, total, model=model, heads={"value_head": head})
    while run.step < total:
        ... one optimizer step ...
        run.step_done(loss, {"reward_mean": ...})     # metrics.jsonl, event, ETA, progress bar, checkpoint
        if run.should_stop(): return run.stopped()  # stop_after (tests) or a stop request (pause)
    return run.finish(final_dir, metrics)

A stop request is a file (`LORAPLEX_STOP_FILE`, set by the job runner):
when it appears the run checkpoints at the end of the current step and ends,
so a paused job resumes from exactly there with the same loss curve.

Checkpoint layout (`output_dir/checkpoint-<step>/`): the PEFT adapter,
`trainer_state.pt` (optimizer, scheduler, RNG states, step, loss history,
config) and one `<head>.pt` per extra trained module (a reward model's score
head, PPO's value head); a distributed run keeps each rank's optimizer and RNG
state in `rank-<r>.pt`. `metrics.jsonl` beside the checkpoints holds one line
per logged step; a resume cuts it back to the checkpoint's step.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from loraplex.adapters_store.base_model import model_id_for, resolve_base_model

from .config import JobConfig, JobConfigError

Event = Callable[[dict], None]

# Config keys that may change between a run and its resume without changing what is trained.
RESUMABLE_CHANGES = {"output_dir", "device", "canary", "logging_steps", "save_steps", "eval_steps"}
STOP_FILE_ENV = "LORAPLEX_STOP_FILE"
FEW_STEPS = 10  # fewer planned optimizer steps than this rarely teach an adapter anything: warn


@dataclass
class TrainResult:
    adapter_dir: Path
    metrics: dict
    steps: int
    losses: list[float] = field(default_factory=list)
    lineage: dict = field(default_factory=dict)  # what the run started from (adapters), recorded at registration
    stopped: bool = False  # ended early (stop_after or a stop request) with a checkpoint to resume from


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# --- model -------------------------------------------------------------------------------------------------------
def load_tokenizer(cfg: JobConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_base_model(cfg.base_model))


def load_base_and_tokenizer(cfg: JobConfig, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_base_model(cfg.base_model)
    tok = AutoTokenizer.from_pretrained(path)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    kw = {"dtype": dtype, "attn_implementation": "sdpa"}
    if cfg.quantize == "4bit":  # QLoRA: the base's linear layers become frozen nf4 bitsandbytes Linear4bit layers
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
        kw["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    if cfg.quantize is None:
        model.to(device)
    else:
        # On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight for its inference kernel on the first
        # forward in eval mode without grad (an evaluation, DPO's reference pass) and from then on runs that kernel,
        # which has no autograd: later backward passes silently lose the gradient through the base weights.
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    return model, tok, path


def lora_model(model, cfg: JobConfig):
    """The base wrapped in a fresh PEFT LoRA; with gradient_checkpointing on, activations are recomputed in backward."""
    from peft import LoraConfig, get_peft_model

    lc = LoraConfig(
        r=cfg.adapter.r,
        lora_alpha=cfg.adapter.alpha,
        lora_dropout=cfg.adapter.dropout,
        target_modules=cfg.target_modules(),
        use_rslora=cfg.adapter.use_rslora,
        task_type="CAUSAL_LM",
    )
    if cfg.quantize == "4bit":
        from peft import prepare_model_for_kbit_training

        # freezes the base and keeps its non-quantized parameters in fp32; checkpointing is done below, as without 4-bit
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_model = get_peft_model(model, lc)
    if cfg.gradient_checkpointing:
        enable = getattr(peft_model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return peft_model


def gradient_checkpointing_on(model) -> bool:
    """Whether the decoder layers of `model` (PEFT-wrapped or not) recompute activations in backward."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    flag = (
        "is_activation_checkpointing"
        if hasattr(type(lm), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    return bool(getattr(lm, flag, False))


def init_adapter(model, cfg: JobConfig, store_dir) -> dict:
    """Loads the starting adapter named by adapter.init_from into the fresh LoRA; returns lineage.

    `init_from` is a store ref (`name`, `name@3`) or a Hugging Face hub id (`org/repo[@revision]`, resolved into the
    hub cache and validated like any adapter registered from a directory)."""
    if not cfg.adapter.init_from:
        return {}
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from loraplex.adapters_store import AdapterStore
    from loraplex.adapters_store.hub import is_hub_id, resolve_hub_adapter

    ref = cfg.adapter.init_from
    if is_hub_id(ref):
        path, rank, shown, sha = resolve_hub_adapter(ref, cfg.base_model)
    else:
        if store_dir is None:
            raise ValueError("adapter.init_from needs the adapter store")
        name, _, ver = ref.partition("@")
        v = AdapterStore(store_dir).get(name, int(ver) if ver else None)
        path, rank, shown, sha = v.path, v.manifest.r, v.ref, v.sha256
    if rank != cfg.adapter.r:
        raise JobConfigError(f"adapter.init_from {shown} has rank {rank} but the job asks for r={cfg.adapter.r}")
    result = set_peft_model_state_dict(model, load_file(str(Path(path) / "adapter_model.safetensors")))
    if getattr(result, "unexpected_keys", None):
        raise JobConfigError(
            f"adapter.init_from {shown} targets modules this job does not: {result.unexpected_keys[:3]}"
        )
    return {"started_from": shown, "started_from_sha256": sha}


def save_adapter(
    peft_model, final: Path, base_path: Path, *, state_dict: dict | None = None, config_extra: dict | None = None
) -> Path:
    """The final PEFT adapter directory, naming the base by the id clients use for it."""
    if final.exists():
        shutil.rmtree(final)
    peft_model.save_pretrained(final, **({"state_dict": state_dict} if state_dict is not None else {}))
    acfg = json.loads((final / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = model_id_for(base_path)
    acfg.update(config_extra or {})
    (final / "adapter_config.json").write_text(json.dumps(acfg, indent=2))
    return final


# --- optimizer ---------------------------------------------------------------------------------------------------
def lr_lambda(cfg: JobConfig, total: int):
    def f(step):
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        if cfg.lr_scheduler == "constant":
            return 1.0
        prog = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return max(0.0, 1 - prog) if cfg.lr_scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))

    return f


def make_optimizer(params, cfg: JobConfig, total: int):
    """AdamW over the trainable parameters and the job's learning-rate schedule over `total` optimizer steps."""
    opt = torch.optim.AdamW(list(params), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))


def total_steps(cfg: JobConfig, steps_per_epoch: int) -> int:
    return cfg.max_steps or max(1, int(math.ceil(steps_per_epoch * cfg.epochs)))


def few_steps_warning(cfg: JobConfig, total: int) -> str | None:
    """The warning for a run too short to learn much, naming the keys that lengthen it; None when long enough."""
    if total >= FEW_STEPS:
        return None
    if cfg.max_steps:
        keys = "raise max_steps"
    elif cfg.method in ("ppo", "grpo"):
        keys = "raise epochs or lower num_rollouts (the API's n_epochs, batch_size)"
    elif cfg.examples_per_step:
        keys = "raise epochs or lower examples_per_step (the API's n_epochs, batch_size)"
    else:
        keys = "raise epochs, or lower micro_batch_size or gradient_accumulation_steps" + (
            " (packing puts several examples in a row)" if cfg.packing else ""
        )
    return (
        f"this job will make only {total} optimizer step(s), too few to learn much; {keys} to get at least {FEW_STEPS}"
    )


# --- checkpoints -------------------------------------------------------------------------------------------------
def latest_checkpoint(out: Path) -> Path | None:
    cks = sorted(
        (p for p in out.glob("checkpoint-*") if (p / "trainer_state.pt").is_file()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    return cks[-1] if cks else None


def _rng_state() -> dict:
    st = {"torch_rng": torch.get_rng_state(), "py_rng": random.getstate()}
    if torch.cuda.is_available():
        st["cuda_rng"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch_rng"])
    random.setstate(st["py_rng"])
    if st.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda_rng"])


def save_checkpoint(
    model,
    opt,
    sched,
    step: int,
    losses: list[float],
    out_dir: Path,
    *,
    ranks=None,
    config: dict | None = None,
    adapter_state: dict | None = None,
    heads: dict | None = None,
) -> Path:
    """Writes `checkpoint-<step>` atomically (a temporary dir renamed into place): whole or absent, even after a kill.

    With `ranks` of more than one process every rank must call this; each writes its own optimizer and RNG state.
    """
    world = ranks.world if ranks is not None else 1
    main = ranks is None or ranks.is_main
    ck = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".tmp-checkpoint-{step}"
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp, **({"state_dict": adapter_state} if adapter_state is not None else {}))
        for name, module in (heads or {}).items():
            torch.save(module.state_dict(), tmp / f"{name}.pt")
    if world > 1:
        ranks.barrier()
        torch.save({"optimizer": opt.state_dict(), **_rng_state()}, tmp / f"rank-{ranks.rank}.pt")
        ranks.barrier()
    if main:
        state = {
            "scheduler": sched.state_dict(),
            "step": step,
            "losses": losses,
            "world_size": world,
            "config": config,
        }
        if world == 1:
            state.update({"optimizer": opt.state_dict(), **_rng_state()})
        torch.save(state, tmp / "trainer_state.pt")
        if ck.exists():
            shutil.rmtree(ck)
        os.rename(tmp, ck)
    if world > 1:
        ranks.barrier()
    return ck


def _check_resumable(saved: dict | None, cfg: JobConfig, world: int, saved_world: int) -> None:
    if saved_world != world:
        raise JobConfigError(
            f"cannot resume: the checkpoint was written by {saved_world} process(es), this run has {world}"
        )
    if saved is None:
        return
    now = cfg.model_dump(mode="json")
    diffs = [k for k in sorted(set(saved) | set(now)) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k)]
    if diffs:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diffs[:5])
        raise JobConfigError(
            f"cannot resume: the job config changed since the checkpoint ({shown}); start a new run instead"
        )


def _cut_metrics(path: Path, step: int) -> None:
    """After a kill, metrics of steps past the checkpoint will be trained again: drop them."""
    if not path.exists():
        return
    keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
    path.write_text("".join(l + "\n" for l in keep))


def stop_requested() -> bool:
    p = os.environ.get(STOP_FILE_ENV)
    return bool(p) and os.path.exists(p)


# --- the run -----------------------------------------------------------------------------------------------------
class Run:
    """One training run's bookkeeping (see the module docstring). `ranks` (distributed.Ranks) for data-parallel SFT."""

    def __init__(
        self,
        cfg: JobConfig,
        out_dir: Path,
        *,
        resume: bool = False,
        on_event: Event | None = None,
        progress: bool = False,
        stop_after: int | None = None,
        ranks=None,
    ):
        from .distributed import Ranks

        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.ranks = ranks or Ranks.single(torch.device(cfg.resolved_device()))
        self.main = self.ranks.is_main
        self._emit = (on_event or (lambda e: None)) if self.main else (lambda e: None)
        self.progress = progress and self.main
        self.stop_after = stop_after
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.step, self.losses, self.run_steps = 0, [], 0
        self.resume = resume
        self.ck = latest_checkpoint(self.out_dir) if resume else None
        self._state = None
        if self.ck is not None:
            self._state = torch.load(self.ck / "trainer_state.pt", weights_only=False)
            _check_resumable(self._state.get("config"), cfg, self.ranks.world, self._state.get("world_size", 1))
        self._bar = None
        self._stopping = False
        set_seed(cfg.seed)

    @property
    def device(self) -> torch.device:
        return self.ranks.device

    def emit(self, event: dict) -> None:
        self._emit(event)

    def warn(self, message: str) -> None:
        self._emit({"type": "message", "level": "warn", "message": message})

    def plan(self, total: int, **numbers) -> None:
        """The `plan` event (before the first step): planned optimizer steps, examples per step, and the rest."""
        self.emit(
            {
                "type": "plan",
                "method": self.cfg.method,
                "optimizer_steps": total,
                "epochs": self.cfg.epochs,
                "learning_rate": self.cfg.learning_rate,
                **numbers,
            }
        )
        w = few_steps_warning(self.cfg, total)
        if w:
            self.warn(w)

    def load_weights(self, model):
        """Puts the adapter weights of the checkpoint being resumed into `model` (before any distributed wrapping)."""
        if self.ck is not None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(str(self.ck / "adapter_model.safetensors")))
        return model

    def start(
        self,
        opt,
        sched,
        total: int,
        *,
        model,
        heads: dict | None = None,
        save_model: Callable | None = None,
        adapter_state: Callable | None = None,
    ) -> None:
        """Restores optimizer, scheduler, RNG, heads, step and loss history when resuming; opens the metrics file.

        `model` is what a checkpoint saves (a PEFT model); `save_model`/`adapter_state` override that for wrapped
        (DDP / FSDP) models."""
        self.opt, self.sched, self.total, self.model = opt, sched, total, model
        self.heads = heads or {}
        self._save_model = save_model or (lambda: model)
        self._adapter_state = adapter_state or (lambda: None)
        if self._state is not None:
            st = self._state
            own = (
                st if self.ranks.world == 1 else torch.load(self.ck / f"rank-{self.ranks.rank}.pt", weights_only=False)
            )
            opt.load_state_dict(own["optimizer"])
            sched.load_state_dict(st["scheduler"])
            _set_rng_state(own)
            for name, module in self.heads.items():
                module.load_state_dict(torch.load(self.ck / f"{name}.pt"))
            self.step, self.losses = st["step"], list(st["losses"])
            if self.main:
                _cut_metrics(self.metrics_path, self.step)
            self.emit({"type": "resumed", "step": self.step, "checkpoint": str(self.ck)})
        elif self.main:
            if self.resume:
                self.emit({"type": "message", "message": f"no checkpoint in {self.out_dir}: starting from step 0"})
            self.metrics_path.unlink(missing_ok=True)
        if self.progress:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=self.step, desc=f"{self.cfg.method} {self.cfg.adapter.name}", unit="step"
            )
        self.t_start = time.time()

    def checkpoint(self) -> Path:
        ck = save_checkpoint(
            self._save_model(),
            self.opt,
            self.sched,
            self.step,
            self.losses,
            self.out_dir,
            ranks=self.ranks,
            config=self.cfg.model_dump(mode="json"),
            adapter_state=self._adapter_state(),
            heads=self.heads,
        )
        self.emit({"type": "checkpoint", "step": self.step, "path": str(ck)})
        return ck

    def step_done(self, loss: float, metrics: dict | None = None, *, force_log: bool = False) -> dict:
        """Records one finished optimizer step: loss history, metrics.jsonl and an event (every logging_steps, the
        last step, and any step carrying an evaluation), ETA, progress bar; checkpoints every save_steps and before a
        stop. Every rank calls this; only rank 0 writes."""
        self.step += 1
        self.run_steps += 1
        self.losses.append(loss)
        rec = {
            "type": "metrics",
            "step": self.step,
            "total_steps": self.total,
            "loss": loss,
            "learning_rate": self.sched.get_last_lr()[0],
            **(metrics or {}),
            "eta_seconds": (time.time() - self.t_start) / self.run_steps * (self.total - self.step),
        }
        if self.main and (force_log or self.step % self.cfg.logging_steps == 0 or self.step == self.total):
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            self.emit(rec)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.4f}")
        stop = self.stop_after is not None and self.run_steps >= self.stop_after
        if self.ranks.world > 1:  # every rank must agree to stop at the same step (the checkpoint is collective)
            stop = self.ranks.sum([float(stop or stop_requested())])[0] > 0
        else:
            stop = stop or stop_requested()
        self._stopping = stop and self.step < self.total
        if self._stopping or (self.step % self.cfg.save_steps == 0 and self.step < self.total):
            self.checkpoint()
        return rec

    def should_stop(self) -> bool:
        return self._stopping

    def stopped(self, lineage: dict | None = None) -> TrainResult:
        self._close_bar()
        self.emit({"type": "stopped", "step": self.step})
        return TrainResult(
            self.out_dir, {"stopped_at": self.step}, self.step, self.losses, lineage or {}, stopped=True
        )

    def finish(self, final: Path, metrics: dict, lineage: dict | None = None) -> TrainResult:
        """The end of a completed run: `final` holds the saved adapter; emits `finished` with the metrics."""
        self._close_bar()
        shown = {k: v for k, v in metrics.items() if k not in ("dataset_sha256", "base_path")}
        self.emit(
            {"type": "finished", "steps": self.step, "final_loss": self.losses[-1] if self.losses else None, **shown}
        )
        return TrainResult(
            final,
            {"steps": self.step, "final_loss": self.losses[-1] if self.losses else None, **metrics},
            self.step,
            self.losses,
            lineage or {},
        )

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
