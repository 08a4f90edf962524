"""The supervised fine-tuning loop: base model + PEFT LoRA, packed padding-free batches, OpenAI step semantics.

We drive the loop ourselves (torch + peft) rather than through TRL's
SFTTrainer because three things this product needs are awkward there:
exact resume of the data order mid-epoch, packing with a block-diagonal mask
that is correct on SDPA/CPU (not only with flash-attention), and events
streamed to the job runner. The loss is the mean over the label tokens of a
whole optimizer step (all micro-batches of the accumulation, on all ranks),
so packing, batching and the number of processes never change what is
optimized.

What one optimizer step holds (`epoch_steps`): with `examples_per_step`
(the OpenAI API's `batch_size`) each step takes that many examples, in an
order shuffled per epoch, and packing only decides how they are laid out in
rows (several short examples share a row; a step sees the same examples
either way), so steps = ceil(examples / examples_per_step) x epochs, as
OpenAI defines it. Without it (YAML jobs, Axolotl's meaning) a step is
`micro_batch_size` rows x `gradient_accumulation_steps`, and a packed row
holds as many examples as fit in `sequence_len`.

Data parallelism (`ranks`, see distributed.py): the micro-batches of one
optimizer step are dealt to the ranks in turn; each rank weights its summed
loss by world / labels-of-the-whole-step and the gradient mean of DDP (or
FSDP) makes that the single-process gradient, so a job gives the same adapter
on 1 or N processes (N only changes the speed). Checkpoints, resume, the
metrics file and stop requests are the shared core's (core.py).
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from .config import JobConfig
from .core import (Event, Run, TrainResult, gradient_checkpointing_on, init_adapter,  # noqa: F401
                   load_base_and_tokenizer, load_tokenizer, lora_model, make_optimizer, save_adapter, set_seed, total_steps)
from .data import IGNORE, Example, Tokenizing, batches, collate, load_dataset_examples, pack, pad_token_id

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
        exs, hashes[d.path] = load_dataset_examples(d, tk)
        train += exs
    val: list[Example] = []
    for d in cfg.validation_datasets:
        exs, hashes[d.path] = load_dataset_examples(d, tk)
        val += exs
    if cfg.val_set_size and not val:
        rng = random.Random(cfg.seed)
        idx = list(range(len(train)))
        rng.shuffle(idx)
        k = max(1, int(round(len(train) * cfg.val_set_size)))
        vset = set(idx[:k])
        val = [train[i] for i in sorted(vset)]
        train = [e for i, e in enumerate(train) if i not in vset]
    return train, val, {"dataset_sha256": hashes, "truncated_examples": tk.truncated}


Step = list[list[list[Example]]]  # one optimizer step: micro-batches of rows of examples


def epoch_steps(train: list[Example], cfg: JobConfig, epoch: int) -> list[Step]:
    """The optimizer steps of one epoch, deterministic in (seed, epoch); see the module docstring."""
    if cfg.examples_per_step:
        order = list(range(len(train)))
        random.Random(cfg.seed * 1000003 + epoch).shuffle(order)
        steps = []
        for i in range(0, len(order), cfg.examples_per_step):
            group = [train[j] for j in order[i : i + cfg.examples_per_step]]
            rows = pack(group, cfg.sequence_len) if cfg.packing else [[e] for e in group]
            steps.append([rows[k : k + cfg.micro_batch_size] for k in range(0, len(rows), cfg.micro_batch_size)])
        return steps
    mbs = batches(train, seq_len=cfg.sequence_len, micro_batch_size=cfg.micro_batch_size, packing=cfg.packing,
                  seed=cfg.seed, epoch=epoch)
    return [mbs[i : i + cfg.gradient_accumulation_steps] for i in range(0, len(mbs), cfg.gradient_accumulation_steps)]


def step_examples(step: Step) -> int:
    return sum(len(row) for mb in step for row in mb)


def train_plan(cfg: JobConfig, train: list[Example]) -> dict:
    """Planned optimizer steps and how many examples each sees (exact with examples_per_step, else the mean)."""
    first = epoch_steps(train, cfg, 0)
    per_epoch = max(1, len(first))
    total = total_steps(cfg, per_epoch)
    eps = cfg.examples_per_step or len(train) / per_epoch
    return {"optimizer_steps": total, "steps_per_epoch": per_epoch, "train_examples": len(train),
            "examples_per_step": min(eps, len(train)) if cfg.examples_per_step else round(eps, 2),
            "rows_per_step": round(sum(len(mb) for s in first for mb in s) / per_epoch, 2), "packing": cfg.packing}


def train_sft(cfg: JobConfig, out_dir: Path, *, resume: bool = False, on_event: Event | None = None,
              stop_after: int | None = None, progress: bool = False, ranks=None, store_dir=None) -> TrainResult:
    """Trains and saves the adapter. `stop_after` ends the run after that many optimizer steps (tests, preemption).

    `ranks` (distributed.Ranks) is given by a data-parallel worker; None is an ordinary single-process run.
    """
    run = Run(cfg, out_dir, resume=resume, on_event=on_event, progress=progress, stop_after=stop_after, ranks=ranks)
    ranks = run.ranks
    model, tok, base_path = load_base_and_tokenizer(cfg, ranks.device)
    pad_id = pad_token_id(tok)
    train, val, data_info = prepare_data(cfg, tok)  # fails before any step on malformed data
    run.emit({"type": "data", "train_examples": len(train), "val_examples": len(val), "world_size": ranks.world,
              **data_info})
    if ranks.world > 1 and not cfg.examples_per_step and ranks.world > cfg.gradient_accumulation_steps:
        run.warn(f"{ranks.world} processes but gradient_accumulation_steps={cfg.gradient_accumulation_steps}: some "
                 "ranks idle; use a multiple of num_processes")
    model = lora_model(model, cfg)
    lineage = init_adapter(model, cfg, store_dir)  # adapter.init_from: a stored or hub adapter to continue from
    model = run.load_weights(model)
    model.train()
    plan = train_plan(cfg, train)
    total, steps_per_epoch = plan["optimizer_steps"], plan["steps_per_epoch"]
    opt, sched = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg, total)
    loss_mod, opt = ranks.prepare(CausalLMLoss(model), opt)
    if ranks.fsdp:
        from torch.distributed.tensor import DTensor

        params = list(loss_mod.parameters())
        sharded = sum(isinstance(p, DTensor) for p in params)
        run.emit({"type": "message", "message": f"fsdp: {sharded} of {len(params)} parameter tensors sharded over "
                                                f"{ranks.world} processes"})
    run.plan(total, **{k: v for k, v in plan.items() if k != "optimizer_steps"},
             gradient_checkpointing=gradient_checkpointing_on(model))
    run.start(opt, sched, total, model=model, save_model=lambda: ranks.unwrap(loss_mod).model,
              adapter_state=lambda: ranks.adapter_state(loss_mod))
    tokens_seen, last_eval = 0, None
    while run.step < total:
        epoch, within = divmod(run.step, steps_per_epoch)
        for g in epoch_steps(train, cfg, epoch)[within:]:
            if run.step >= total:
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
            step_loss_sum, ntok = ranks.sum([local_loss, local_tokens])
            tokens_seen += int(ntok)
            within += 1
            step = run.step + 1
            rec = {"epoch": epoch + within / steps_per_epoch, "examples": step_examples(g),
                   "tokens_per_second": ntok / max(time.time() - t0, 1e-9)}
            if val and ((cfg.eval_steps and step % cfg.eval_steps == 0)
                        or (not cfg.eval_steps and step % steps_per_epoch == 0) or step == total):
                rec["eval_loss"] = last_eval = _evaluate(loss_mod, val, cfg, pad_id, ranks)
            run.step_done(step_loss_sum / n_labels, rec, force_log="eval_loss" in rec)
            if run.should_stop():
                return run.stopped()
    state = ranks.adapter_state(loss_mod)
    final = run.out_dir / "adapter"
    if run.main:
        save_adapter(ranks.unwrap(loss_mod).model, final, base_path, state_dict=state)
    ranks.barrier()
    metrics = {"eval_loss": last_eval, "train_examples": len(train), "tokens_seen_this_run": tokens_seen,
               "world_size": ranks.world}
    result = run.finish(final, metrics, lineage)
    result.metrics.update({**data_info, "base_path": str(base_path)})
    return result
