"""The supervised fine-tuning loop: base model + PEFT LoRA, packed padding-free batches, resumable checkpoints.

We drive the loop ourselves (torch + peft) rather than through TRL's
SFTTrainer because three things this product needs are awkward there:
exact resume of the data order mid-epoch, packing with a block-diagonal mask
that is correct on SDPA/CPU (not only with flash-attention), and events
streamed to the job runner. The loss is the mean over the label tokens of a
whole optimizer step (all micro-batches of the accumulation, on all ranks),
so packing, batching and the number of processes never change what is
optimized.

Data parallelism (`ranks`, see distributed.py): the micro-batches of one
optimizer step are dealt to the ranks in turn; each rank weights its summed
loss by world / labels-of-the-whole-step and the gradient mean of DDP (or
FSDP) makes that the single-process gradient, so a job gives the same adapter
on 1 or N processes (N only changes the speed).

Checkpoint layout (`output_dir/checkpoint-<step>/`): the PEFT adapter and
`trainer_state.pt` (optimizer, scheduler, RNG states, step, loss history,
config); a distributed run keeps each rank's optimizer and RNG state in
`rank-<r>.pt`. `metrics.jsonl` beside the checkpoints holds one line per
logged step; a resume cuts it back to the checkpoint's step.
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
from .data import IGNORE, Example, Tokenizing, batches, collate, file_sha256, load_examples, pad_token_id

Event = Callable[[dict], None]

# Config keys that may change between a run and its resume without changing what is trained.
RESUMABLE_CHANGES = {"output_dir", "device", "canary", "logging_steps", "save_steps", "eval_steps"}


@dataclass
class TrainResult:
    adapter_dir: Path
    metrics: dict
    steps: int
    losses: list[float] = field(default_factory=list)
    lineage: dict = field(default_factory=dict)  # what the run started from (adapters), recorded at registration


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


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

        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
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
    from peft import LoraConfig, get_peft_model

    lc = LoraConfig(r=cfg.adapter.r, lora_alpha=cfg.adapter.alpha, lora_dropout=cfg.adapter.dropout,
                    target_modules=cfg.target_modules(), use_rslora=cfg.adapter.use_rslora, task_type="CAUSAL_LM")
    if cfg.quantize == "4bit":
        from peft import prepare_model_for_kbit_training

        # freezes the base and keeps its non-quantized parameters in fp32; checkpointing is the caller's, as without 4-bit
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, lc)


def _schedule(cfg: JobConfig, total: int):
    def f(step):
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        if cfg.lr_scheduler == "constant":
            return 1.0
        prog = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return max(0.0, 1 - prog) if cfg.lr_scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))

    return f


class CausalLMLoss(torch.nn.Module):
    """Summed token cross-entropy of a (PEFT) causal LM on one collated micro-batch.

    The vocabulary projection runs only on positions that carry a label: with
    a 50k vocabulary the full logits tensor is the largest activation of a
    small model, and prompt tokens never need it. Training calls go through
    this module so a DDP / FSDP wrapper around it sees the forward.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._no_split_modules = getattr(lm, "_no_split_modules", None)  # FSDP shards each of these layers (Ranks.prepare)

    def forward(self, input_ids, attention_mask, position_ids, labels):
        lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        sel = labels != IGNORE
        c = lm.config
        if getattr(c, "final_logit_softcapping", None) or getattr(c, "logit_scale", None) or getattr(c, "logits_scaling", None):
            # models whose logits are more than lm_head(h): take the model's own logits
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[sel].float()
        else:
            h = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
            logits = lm.get_output_embeddings()(h[sel]).float()  # [n_labels, V]
        return torch.nn.functional.cross_entropy(logits, labels[sel], reduction="sum")


def _inputs(batch: dict, device) -> dict:
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids", "labels")}


def step_loss(model, batch: dict, device) -> tuple[torch.Tensor, int]:
    """Summed token cross-entropy of one micro-batch (and its label count)."""
    return CausalLMLoss(model)(**_inputs(batch, device)), int(batch["num_label_tokens"])


def label_count(mb: list[list[Example]]) -> int:
    """Label tokens of a micro-batch as collate() will shift them (position t predicts t+1)."""
    return sum(sum(1 for l in ex.labels[1:] if l != IGNORE) for row in mb for ex in row)


def _evaluate(loss_mod, examples: list[Example], cfg: JobConfig, pad_id: int, ranks) -> float:
    mbs = batches(examples, seq_len=cfg.sequence_len, micro_batch_size=cfg.micro_batch_size, packing=cfg.packing, seed=0, epoch=0)
    loss_mod.eval()
    total = 0.0
    with torch.no_grad():
        for mb, w in ranks.deal(mbs, [1.0] * len(mbs)):
            total += w * float(loss_mod(**_inputs(collate(mb, pad_id), ranks.device)))
    loss_mod.train()
    total, = ranks.sum([total])
    return total / max(1, sum(label_count(mb) for mb in mbs))


@torch.no_grad()
def evaluate(model, examples: list[Example], cfg: JobConfig, pad_id: int, device) -> float:
    """Mean token loss of `model` (a plain or PEFT causal LM) over `examples`."""
    from .distributed import Ranks

    return _evaluate(CausalLMLoss(model), examples, cfg, pad_id, Ranks.single(torch.device(device)))


def prepare_data(cfg: JobConfig, tok) -> tuple[list[Example], list[Example], dict]:
    tk = Tokenizing(tok, cfg.sequence_len, cfg.train_on_prompt)
    train: list[Example] = []
    hashes = {}
    for d in cfg.datasets:
        train += load_examples(d.path, d.format, tk)
        hashes[d.path] = file_sha256(d.path)
    val: list[Example] = []
    for d in cfg.validation_datasets:
        val += load_examples(d.path, d.format, tk)
        hashes[d.path] = file_sha256(d.path)
    if cfg.val_set_size and not val:
        rng = random.Random(cfg.seed)
        idx = list(range(len(train)))
        rng.shuffle(idx)
        k = max(1, int(round(len(train) * cfg.val_set_size)))
        vset = set(idx[:k])
        val = [train[i] for i in sorted(vset)]
        train = [e for i, e in enumerate(train) if i not in vset]
    return train, val, {"dataset_sha256": hashes, "truncated_examples": tk.truncated}


def latest_checkpoint(out: Path) -> Path | None:
    cks = sorted((p for p in out.glob("checkpoint-*") if (p / "trainer_state.pt").is_file()), key=lambda p: int(p.name.split("-")[1]))
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


def load_single_checkpoint(model, opt, sched, ck: Path) -> tuple[int, list[float]]:
    """Restores a one-process checkpoint (adapter, optimizer, scheduler, RNG) -> (step, loss history)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(ck / "adapter_model.safetensors")))
    st = torch.load(ck / "trainer_state.pt", weights_only=False)
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    _set_rng_state(st)
    return st["step"], st["losses"]


def _check_resumable(saved: dict | None, cfg: JobConfig, world: int, saved_world: int) -> None:
    if saved_world != world:
        raise JobConfigError(f"cannot resume: the checkpoint was written by {saved_world} process(es), this run has {world}")
    if saved is None:
        return
    now = cfg.model_dump(mode="json")
    diffs = [k for k in sorted(set(saved) | set(now)) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k)]
    if diffs:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diffs[:5])
        raise JobConfigError(f"cannot resume: the job config changed since the checkpoint ({shown}); start a new run instead")


def _cut_metrics(path: Path, step: int) -> None:
    """After a kill, metrics of steps past the checkpoint will be trained again: drop them."""
    if not path.exists():
        return
    keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
    path.write_text("".join(l + "\n" for l in keep))


def train_sft(cfg: JobConfig, out_dir: Path, *, resume: bool = False, on_event: Event | None = None,
              stop_after: int | None = None, progress: bool = False, ranks=None) -> TrainResult:
    """Trains; returns the final adapter dir. `stop_after` ends the run after that many optimizer steps (tests, preemption).

    `ranks` (distributed.Ranks) is given by a data-parallel worker; None is an ordinary single-process run.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from .distributed import Ranks

    if ranks is None:
        ranks = Ranks.single(torch.device(cfg.resolved_device()))
    main = ranks.is_main
    emit = (on_event or (lambda e: None)) if main else (lambda e: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    model, tok, base_path = load_base_and_tokenizer(cfg, ranks.device)
    pad_id = pad_token_id(tok)
    train, val, data_info = prepare_data(cfg, tok)  # fails before any step on malformed data
    emit({"type": "data", "train_examples": len(train), "val_examples": len(val), "world_size": ranks.world, **data_info})
    if ranks.world > cfg.gradient_accumulation_steps:
        emit({"type": "message", "level": "warn", "message": f"{ranks.world} processes but gradient_accumulation_steps="
              f"{cfg.gradient_accumulation_steps}: some ranks idle; use a multiple of num_processes"})
    model = lora_model(model, cfg)
    if cfg.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    per_epoch = len(batches(train, seq_len=cfg.sequence_len, micro_batch_size=cfg.micro_batch_size, packing=cfg.packing, seed=cfg.seed, epoch=0))
    steps_per_epoch = max(1, math.ceil(per_epoch / cfg.gradient_accumulation_steps))
    total = cfg.max_steps or max(1, int(math.ceil(steps_per_epoch * cfg.epochs)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, total))
    step = 0
    metrics_path = out_dir / "metrics.jsonl"
    losses: list[float] = []
    ck = latest_checkpoint(out_dir) if resume else None
    if ck is not None:
        st = torch.load(ck / "trainer_state.pt", weights_only=False)
        _check_resumable(st.get("config"), cfg, ranks.world, st.get("world_size", 1))
        set_peft_model_state_dict(model, load_file(str(ck / "adapter_model.safetensors")))
    loss_mod, opt = ranks.prepare(CausalLMLoss(model), opt)
    if ranks.fsdp:
        from torch.distributed.tensor import DTensor

        params = list(loss_mod.parameters())
        sharded = sum(isinstance(p, DTensor) for p in params)
        emit({"type": "message", "message": f"fsdp: {sharded} of {len(params)} parameter tensors sharded over {ranks.world} processes"})
    if ck is not None:
        own = st if ranks.world == 1 else torch.load(ck / f"rank-{ranks.rank}.pt", weights_only=False)
        opt.load_state_dict(own["optimizer"])
        sched.load_state_dict(st["scheduler"])
        _set_rng_state(own)
        step, losses = st["step"], st["losses"]
        if main:
            _cut_metrics(metrics_path, step)
        emit({"type": "resumed", "step": step, "checkpoint": str(ck)})
    elif main:
        if resume:
            emit({"type": "message", "message": f"no checkpoint in {out_dir}: starting from step 0"})
        metrics_path.unlink(missing_ok=True)
    bar = None
    if progress and main:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, desc=f"sft {cfg.adapter.name}", unit="step")
    t_start = time.time()
    tokens_seen = 0
    last_eval = None
    run_steps = 0

    def checkpoint() -> None:
        save_checkpoint(ranks.unwrap(loss_mod).model, opt, sched, step, losses, out_dir, ranks=ranks, config=cfg.model_dump(mode="json"),
                        adapter_state=ranks.adapter_state(loss_mod))
        emit({"type": "checkpoint", "step": step, "path": str(out_dir / f"checkpoint-{step}")})

    while step < total:
        epoch, within = divmod(step, steps_per_epoch)
        mbs = batches(train, seq_len=cfg.sequence_len, micro_batch_size=cfg.micro_batch_size, packing=cfg.packing, seed=cfg.seed, epoch=epoch)
        groups = [mbs[i : i + cfg.gradient_accumulation_steps] for i in range(0, len(mbs), cfg.gradient_accumulation_steps)]
        for g in groups[within:]:
            if step >= total:
                break
            t0 = time.time()
            n_labels = max(1, sum(label_count(mb) for mb in g))
            mine = ranks.deal(g, [1.0] * len(g))
            opt.zero_grad(set_to_none=True)
            local_loss, local_tokens = 0.0, 0
            for j, (mb, w) in enumerate(mine):
                c = collate(mb, pad_id)
                with ranks.no_sync(loss_mod, last=j == len(mine) - 1):
                    loss = loss_mod(**_inputs(c, ranks.device))
                    ranks.backward(loss * (w * ranks.world / n_labels))
                local_loss += w * float(loss.detach())
                local_tokens += int(w) * c["num_tokens"]
            ranks.clip(loss_mod, cfg.max_grad_norm)
            opt.step()
            sched.step()
            step += 1
            run_steps += 1
            step_loss_sum, ntok = ranks.sum([local_loss, local_tokens])
            tokens_seen += int(ntok)
            loss_v = step_loss_sum / n_labels
            losses.append(loss_v)
            dt = time.time() - t0
            rec = {"type": "metrics", "step": step, "total_steps": total, "epoch": epoch + (within + 1) / steps_per_epoch,
                   "loss": loss_v, "learning_rate": sched.get_last_lr()[0], "tokens_per_second": ntok / max(dt, 1e-9),
                   "eta_seconds": (time.time() - t_start) / run_steps * (total - step)}
            within += 1
            if val and ((cfg.eval_steps and step % cfg.eval_steps == 0) or (not cfg.eval_steps and step % steps_per_epoch == 0)
                        or step == total):
                last_eval = _evaluate(loss_mod, val, cfg, pad_id, ranks)
                rec["eval_loss"] = last_eval
            if main and (step % cfg.logging_steps == 0 or step == total or "eval_loss" in rec):
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                emit(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_v:.4f}")
            if step % cfg.save_steps == 0 and step < total:
                checkpoint()
            if stop_after is not None and run_steps >= stop_after:
                checkpoint()
                if bar is not None:
                    bar.close()
                return TrainResult(out_dir, {"stopped_at": step}, step, losses)
    if bar is not None:
        bar.close()
    final = out_dir / "adapter"
    state = ranks.adapter_state(loss_mod)
    if main:
        if final.exists():
            shutil.rmtree(final)
        ranks.unwrap(loss_mod).model.save_pretrained(final, **({"state_dict": state} if state is not None else {}))
        cfg_json = json.loads((final / "adapter_config.json").read_text())
        cfg_json["base_model_name_or_path"] = model_id_for(base_path)
        (final / "adapter_config.json").write_text(json.dumps(cfg_json, indent=2))
    ranks.barrier()
    metrics = {"final_loss": losses[-1] if losses else None, "eval_loss": last_eval, "steps": step,
               "train_examples": len(train), "tokens_seen_this_run": tokens_seen, "world_size": ranks.world}
    emit({"type": "finished", **metrics})
    return TrainResult(final, {**metrics, **data_info, "base_path": str(base_path)}, step, losses)


def save_checkpoint(model, opt, sched, step: int, losses: list[float], out_dir: Path, *, ranks=None, config: dict | None = None,
                    adapter_state: dict | None = None) -> Path:
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
    if world > 1:
        ranks.barrier()
        torch.save({"optimizer": opt.state_dict(), **_rng_state()}, tmp / f"rank-{ranks.rank}.pt")
        ranks.barrier()
    if main:
        state = {"scheduler": sched.state_dict(), "step": step, "losses": losses, "world_size": world, "config": config}
        if world == 1:
            state.update({"optimizer": opt.state_dict(), **_rng_state()})
        torch.save(state, tmp / "trainer_state.pt")
        if ck.exists():
            shutil.rmtree(ck)
        os.rename(tmp, ck)
    if world > 1:
        ranks.barrier()
    return ck
