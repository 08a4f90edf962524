"""Preference training on LoRA: DPO (sigmoid / IPO / hinge) and reward models (LoRA + scalar head).

DPO's reference model costs no second copy of the weights: the reference
log-probabilities are those of the starting point (the base with the
adapter at its zero init, or the SFT adapter named by `adapter.init_from`),
computed once before the first step and kept beside the checkpoints, so a
resumed job uses exactly the same ones.

A reward model is a LoRA adapter plus a linear score head on the final
(normed) hidden state of the last token; it is trained with the
Bradley-Terry loss and saved as a PEFT adapter with `score_head.safetensors`
and `"loraplex_kind": "reward"`, which the store and the server's
`/v1/rewards` understand.
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import JobConfig
from .core import (Run, TrainResult, gradient_checkpointing_on, init_adapter, load_base_and_tokenizer, lora_model,
                   make_optimizer, save_adapter, total_steps)
from .data import Example, Tokenizing, collate, pad_token_id
from .preference_data import Pair, load_pairs


def seq_logps(model, exs: list[Example], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each sequence's labelled tokens [N], and their counts [N]."""
    c = collate([[e] for e in exs], pad_id)
    out = model(input_ids=c["input_ids"].to(device), attention_mask=c["attention_mask"].to(device), position_ids=c["position_ids"].to(device))
    labels = c["labels"].to(device)
    mask = labels != -100
    lp = torch.log_softmax(out.logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1), mask.sum(-1)


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta: float, loss_type: str, n_c=None, n_r=None):
    """-> (loss, chosen reward, rejected reward); rewards are beta * (policy - reference) log-ratios."""
    if loss_type == "ipo":  # IPO works on length-normalised log-probs
        pi_c, pi_r, ref_c, ref_r = pi_c / n_c, pi_r / n_r, ref_c / n_c, ref_r / n_r
    logits = (pi_c - ref_c) - (pi_r - ref_r)
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * logits)
    elif loss_type == "ipo":
        loss = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * logits)
    else:
        raise ValueError(loss_type)
    return loss.mean(), beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()


class RewardHead(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.score = torch.nn.Linear(hidden, 1)
        torch.nn.init.normal_(self.score.weight, std=1 / math.sqrt(hidden))
        torch.nn.init.zeros_(self.score.bias)


def last_hidden(peft_model, exs: list[Example], pad_id: int, device) -> torch.Tensor:
    """Final normed hidden state at each sequence's last token: [N, H]."""
    c = collate([[e] for e in exs], pad_id)
    inner = peft_model.get_base_model().model  # the decoder stack (ends with the final norm)
    h = inner(input_ids=c["input_ids"].to(device), attention_mask=c["attention_mask"].to(device),
              position_ids=c["position_ids"].to(device)).last_hidden_state
    idx = torch.tensor([len(e.input_ids) - 1 for e in exs], device=device)
    return h[torch.arange(len(exs), device=device), idx].float()


def reward_scores(peft_model, head: RewardHead, exs, pad_id, device) -> torch.Tensor:
    return head.score(last_hidden(peft_model, exs, pad_id, device)).squeeze(-1)


def _split(pairs: list[Pair], cfg: JobConfig) -> tuple[list[Pair], list[Pair]]:
    if not cfg.val_set_size:
        return pairs, []
    rng = random.Random(cfg.seed)
    idx = list(range(len(pairs)))
    rng.shuffle(idx)
    k = max(1, int(round(len(pairs) * cfg.val_set_size)))
    val = set(idx[:k])
    return [p for i, p in enumerate(pairs) if i not in val], [pairs[i] for i in sorted(val)]


def _exs(pairs: list[Pair]) -> tuple[list[Example], list[Example]]:
    return [Example(p.chosen_ids, p.chosen_labels) for p in pairs], [Example(p.rejected_ids, p.rejected_labels) for p in pairs]


def train_method(cfg: JobConfig, out_dir: Path, *, resume: bool = False, on_event=None, progress: bool = False,
                 stop_after: int | None = None, store_dir=None) -> TrainResult:
    if cfg.method in ("dpo", "reward"):
        return train_preference(cfg, out_dir, resume=resume, on_event=on_event, progress=progress, stop_after=stop_after, store_dir=store_dir)
    if cfg.method in ("ppo", "grpo"):
        from .rl import train_rl

        return train_rl(cfg, out_dir, resume=resume, on_event=on_event, progress=progress, stop_after=stop_after, store_dir=store_dir)
    raise ValueError(f"unknown method {cfg.method!r}")


def train_preference(cfg: JobConfig, out_dir: Path, *, resume=False, on_event=None, progress=False, stop_after=None,
                     store_dir=None) -> TrainResult:
    run = Run(cfg, out_dir, resume=resume, on_event=on_event, progress=progress, stop_after=stop_after)
    device = run.device
    base, tok, base_path = load_base_and_tokenizer(cfg, device)
    pad = pad_token_id(tok)
    tk = Tokenizing(tok, cfg.sequence_len)
    pairs: list[Pair] = []
    held_out: list[Pair] = []
    hashes = {}
    for specs, into in ((cfg.datasets, pairs), (cfg.validation_datasets, held_out)):
        for d in specs:
            got, hashes[d.path] = load_pairs(d, tk)  # a malformed record fails here, before any step
            into += got
    # a validation file (the fine-tuning API's validation_file) replaces the split off the training pairs, as in SFT
    train, val = (pairs, held_out) if held_out else _split(pairs, cfg)
    run.emit({"type": "data", "train_pairs": len(train), "val_pairs": len(val)})
    model = lora_model(base, cfg)
    lineage = init_adapter(model, cfg, store_dir)
    head = RewardHead(base.config.hidden_size).to(device) if cfg.method == "reward" else None
    params = [p for p in model.parameters() if p.requires_grad] + (list(head.parameters()) if head else [])
    per_step = cfg.examples_per_step or cfg.micro_batch_size * cfg.gradient_accumulation_steps  # pairs per step
    steps_per_epoch = max(1, math.ceil(len(train) / per_step))
    total = total_steps(cfg, steps_per_epoch)
    opt, sched = make_optimizer(params, cfg, total)

    # the reference log-probs are the starting point's: computed before a resumed checkpoint's weights are loaded
    ref_path = run.out_dir / "reference_logps.pt"
    ref = None
    if cfg.method == "dpo":
        if resume and ref_path.exists():
            ref = torch.load(ref_path)
        else:
            model.eval()
            with torch.no_grad():
                ref = {}
                for name, ps in (("train", train), ("val", val)):
                    c, r = _exs(ps)
                    rc = [seq_logps(model, c[i:i + 8], pad, device)[0] for i in range(0, len(c), 8)]
                    rr = [seq_logps(model, r[i:i + 8], pad, device)[0] for i in range(0, len(r), 8)]
                    ref[name] = (torch.cat(rc) if rc else torch.zeros(0), torch.cat(rr) if rr else torch.zeros(0))
            torch.save(ref, ref_path)
            model.train()
    run.load_weights(model)

    def evaluate(ps: list[Pair], which: str) -> dict:
        if not ps:
            return {}
        model.eval()
        with torch.no_grad():
            c, r = _exs(ps)
            if cfg.method == "dpo":
                pc = torch.cat([seq_logps(model, c[i:i + 8], pad, device)[0] for i in range(0, len(c), 8)])
                pr = torch.cat([seq_logps(model, r[i:i + 8], pad, device)[0] for i in range(0, len(r), 8)])
                rc_, rr_ = ref[which]
                margin = cfg.beta * ((pc - rc_) - (pr - rr_))
            else:
                sc = torch.cat([reward_scores(model, head, c[i:i + 8], pad, device) for i in range(0, len(c), 8)])
                sr = torch.cat([reward_scores(model, head, r[i:i + 8], pad, device) for i in range(0, len(r), 8)])
                margin = sc - sr
        model.train()
        acc = float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())
        return {f"{which}_accuracy": acc, f"{which}_margin": float(margin.mean())}

    run.plan(total, train_examples=len(train), examples_per_step=min(per_step, len(train)),
             steps_per_epoch=steps_per_epoch, gradient_checkpointing=gradient_checkpointing_on(model))
    run.start(opt, sched, total, model=model, heads={"score_head": head} if head is not None else None)
    initial = evaluate(val, "val")
    run.emit({"type": "metrics", "step": run.step, "total_steps": total, "loss": float("nan"), **initial,
              "initial": True})
    mb = cfg.micro_batch_size
    while run.step < total:
        epoch, within = divmod(run.step, steps_per_epoch)
        order = list(range(len(train)))
        random.Random(cfg.seed * 1000003 + epoch).shuffle(order)
        groups = [order[i:i + per_step] for i in range(0, len(order), per_step)]
        for g in groups[within:]:
            if run.step >= total:
                break
            t0 = time.time()
            opt.zero_grad(set_to_none=True)
            tot, stats = 0.0, {"chosen": [], "rejected": []}
            for ch in [g[i:i + mb] for i in range(0, len(g), mb)]:
                c, r = _exs([train[i] for i in ch])
                if cfg.method == "dpo":
                    pc, nc = seq_logps(model, c, pad, device)
                    pr, nr = seq_logps(model, r, pad, device)
                    idx = torch.tensor(ch)
                    loss, rwc, rwr = dpo_loss(pc, pr, ref["train"][0][idx].to(device), ref["train"][1][idx].to(device),
                                              cfg.beta, cfg.loss_type, nc, nr)
                else:
                    sc = reward_scores(model, head, c, pad, device)
                    sr = reward_scores(model, head, r, pad, device)
                    loss, rwc, rwr = -F.logsigmoid(sc - sr).mean(), sc.detach(), sr.detach()
                (loss * len(ch) / len(g)).backward()
                tot += float(loss.detach()) * len(ch) / len(g)
                stats["chosen"].append(rwc)
                stats["rejected"].append(rwr)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            rc_, rr_ = torch.cat(stats["chosen"]), torch.cat(stats["rejected"])
            rec = {"examples": len(g), "rewards_chosen": float(rc_.mean()), "rewards_rejected": float(rr_.mean()),
                   "rewards_margin": float((rc_ - rr_).mean()), "rewards_accuracy": float((rc_ > rr_).float().mean()),
                   "seconds_per_step": time.time() - t0}
            if val and cfg.eval_steps and (run.step + 1) % cfg.eval_steps == 0:
                rec.update(evaluate(val, "val"))
            run.step_done(tot, rec, force_log="val_accuracy" in rec)
            if run.should_stop():
                return run.stopped(lineage)
    final = save_adapter(model, run.out_dir / "adapter", base_path,
                         config_extra={"loraplex_kind": "reward"} if head is not None else None)
    if head is not None:
        from safetensors.torch import save_file

        save_file({"weight": head.score.weight.detach().cpu().contiguous(), "bias": head.score.bias.detach().cpu().contiguous()},
                  str(final / "score_head.safetensors"))
    metrics = {**{f"initial_{k}": v for k, v in initial.items()}, **evaluate(val, "val"), "dataset_sha256": hashes,
               "base_path": str(base_path)}
    return run.finish(final, metrics, lineage)
