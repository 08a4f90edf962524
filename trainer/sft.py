"""The supervised fine-tuning loop: base model + PEFT LoRA, packed padding-free batches, resumable checkpoints.

We drive the loop ourselves (torch + peft) rather than through TRL's
SFTTrainer because three things this product needs are awkward there:
exact resume of the data order mid-epoch, packing with a block-diagonal mask
that is correct on SDPA/CPU (not only with flash-attention), and events
streamed to the job runner. The loss is the mean over the label tokens of a
whole optimizer step (all micro-batches of the accumulation), so packing and
batching never change what is optimized.

Checkpoint layout (`output_dir/checkpoint-<step>/`): the PEFT adapter,
`trainer_state.pt` (optimizer, scheduler, RNG states, step), and
`metrics.jsonl` beside the checkpoints holds one line per logged step.
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

from loraplex.adapters_store.base_model import fingerprint, model_id_for, resolve_base_model

from .config import JobConfig
from .data import Example, Tokenizing, batches, collate, file_sha256, load_examples

Event = Callable[[dict], None]


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


def load_base_and_tokenizer(cfg: JobConfig, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_base_model(cfg.base_model)
    tok = AutoTokenizer.from_pretrained(path)
    kw = {"dtype": torch.float32 if device.type == "cpu" else torch.bfloat16, "attn_implementation": "sdpa"}
    if cfg.quantize == "4bit":
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    if cfg.quantize is None:
        model.to(device)
    return model, tok, path


def lora_model(model, cfg: JobConfig):
    from peft import LoraConfig, get_peft_model

    lc = LoraConfig(r=cfg.adapter.r, lora_alpha=cfg.adapter.alpha, lora_dropout=cfg.adapter.dropout,
                    target_modules=cfg.target_modules(), use_rslora=cfg.adapter.use_rslora, task_type="CAUSAL_LM")
    if cfg.quantize == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
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


def step_loss(model, batch: dict, device) -> tuple[torch.Tensor, int]:
    """Summed token cross-entropy of one micro-batch (and its label count).

    The vocabulary projection runs only on positions that carry a label: with
    a 50k vocabulary the full logits tensor is the largest activation of a
    small model, and prompt tokens never need it.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    h = causal_lm.model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                        position_ids=batch["position_ids"].to(device)).last_hidden_state
    labels = batch["labels"].to(device)
    sel = labels != -100
    logits = causal_lm.lm_head(h[sel]).float()
    loss = torch.nn.functional.cross_entropy(logits, labels[sel], reduction="sum")
    return loss, int(sel.sum())


@torch.no_grad()
def evaluate(model, examples: list[Example], cfg: JobConfig, pad_id: int, device) -> float:
    model.eval()
    total, n = 0.0, 0
    for mb in batches(examples, seq_len=cfg.sequence_len, micro_batch_size=cfg.micro_batch_size, packing=cfg.packing, seed=0, epoch=0):
        loss, k = step_loss(model, collate(mb, pad_id), device)
        total += float(loss)
        n += k
    model.train()
    return total / max(1, n)


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


def train_sft(cfg: JobConfig, out_dir: Path, *, resume: bool = False, on_event: Event | None = None,
              stop_after: int | None = None, progress: bool = False) -> TrainResult:
    """Trains; returns the final adapter dir. `stop_after` ends the run after that many optimizer steps (tests, preemption)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    emit = on_event or (lambda e: None)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    model, tok, base_path = load_base_and_tokenizer(cfg, device)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train, val, data_info = prepare_data(cfg, tok)  # fails before any step on malformed data
    emit({"type": "data", "train_examples": len(train), "val_examples": len(val), **data_info})
    model = lora_model(model, cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    per_epoch = len(batches(train, seq_len=cfg.sequence_len, micro_batch_size=cfg.micro_batch_size, packing=cfg.packing, seed=cfg.seed, epoch=0))
    steps_per_epoch = max(1, math.ceil(per_epoch / cfg.gradient_accumulation_steps))
    total = cfg.max_steps or max(1, int(math.ceil(steps_per_epoch * cfg.epochs)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, total))
    step = 0
    metrics_path = out_dir / "metrics.jsonl"
    losses: list[float] = []
    if resume:
        ck = latest_checkpoint(out_dir)
        if ck is not None:
            set_peft_model_state_dict(model, load_file(str(ck / "adapter_model.safetensors")))
            st = torch.load(ck / "trainer_state.pt", weights_only=False)
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            torch.set_rng_state(st["torch_rng"])
            random.setstate(st["py_rng"])
            step = st["step"]
            losses = st["losses"]
            emit({"type": "resumed", "step": step, "checkpoint": str(ck)})
        elif metrics_path.exists():
            metrics_path.unlink()
    elif metrics_path.exists():
        metrics_path.unlink()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, desc=f"sft {cfg.adapter.name}", unit="step")
    t_start = time.time()
    tokens_seen = 0
    last_eval = None
    run_steps = 0
    while step < total:
        epoch, within = divmod(step, steps_per_epoch)
        mbs = batches(train, seq_len=cfg.sequence_len, micro_batch_size=cfg.micro_batch_size, packing=cfg.packing, seed=cfg.seed, epoch=epoch)
        groups = [mbs[i : i + cfg.gradient_accumulation_steps] for i in range(0, len(mbs), cfg.gradient_accumulation_steps)]
        for g in groups[within:]:
            if step >= total:
                break
            t0 = time.time()
            cols = [collate(mb, pad_id) for mb in g]
            n_labels = sum(c["num_label_tokens"] for c in cols)
            opt.zero_grad(set_to_none=True)
            total_loss = 0.0
            for c in cols:
                loss, _ = step_loss(model, c, device)
                (loss / max(1, n_labels)).backward()
                total_loss += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            step += 1
            run_steps += 1
            ntok = sum(c["num_tokens"] for c in cols)
            tokens_seen += ntok
            loss_v = total_loss / max(1, n_labels)
            losses.append(loss_v)
            dt = time.time() - t0
            rec = {"type": "metrics", "step": step, "total_steps": total, "epoch": epoch + (within + 1) / steps_per_epoch,
                   "loss": loss_v, "learning_rate": sched.get_last_lr()[0], "tokens_per_second": ntok / max(dt, 1e-9),
                   "eta_seconds": (time.time() - t_start) / run_steps * (total - step)}
            if val and cfg.eval_steps and step % cfg.eval_steps == 0:
                last_eval = evaluate(model, val, cfg, pad_id, device)
                rec["eval_loss"] = last_eval
            if step % cfg.logging_steps == 0 or step == total:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                emit(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_v:.4f}")
            if step % cfg.save_steps == 0 and step < total:
                save_checkpoint(model, opt, sched, step, losses, out_dir)
                emit({"type": "checkpoint", "step": step, "path": str(out_dir / f"checkpoint-{step}")})
            if stop_after is not None and run_steps >= stop_after:
                save_checkpoint(model, opt, sched, step, losses, out_dir)
                if bar is not None:
                    bar.close()
                return TrainResult(out_dir, {"stopped_at": step}, step, losses)
    if bar is not None:
        bar.close()
    final = out_dir / "adapter"
    if final.exists():
        shutil.rmtree(final)
    model.save_pretrained(final)
    cfg_json = json.loads((final / "adapter_config.json").read_text())
    cfg_json["base_model_name_or_path"] = model_id_for(base_path)
    (final / "adapter_config.json").write_text(json.dumps(cfg_json, indent=2))
    if val:
        last_eval = evaluate(model, val, cfg, pad_id, device)
    metrics = {"final_loss": losses[-1] if losses else None, "eval_loss": last_eval, "steps": step,
               "train_examples": len(train), "tokens_seen_this_run": tokens_seen}
    emit({"type": "finished", **metrics})
    return TrainResult(final, {**metrics, **data_info, "base_path": str(base_path)}, step, losses)


def save_checkpoint(model, opt, sched, step: int, losses: list[float], out_dir: Path) -> Path:
    ck = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".tmp-checkpoint-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                "py_rng": random.getstate(), "step": step, "losses": losses}, tmp / "trainer_state.pt")
    if ck.exists():
        shutil.rmtree(ck)
    os.rename(tmp, ck)  # a checkpoint is either whole or absent, even if the job is killed here
    return ck
