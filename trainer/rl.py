"""PPO and GRPO on LoRA, with rollouts from our own engine (see rollout.py).

One step: sample `num_rollouts` prompts (x `num_generations` for GRPO), roll
them out with the live policy in the rollout engine, score them (reward
adapter, Python function or rule), compute reference log-probs (base with
the adapter disabled, or the starting adapter) in the same engine, then
optimise for `ppo_epochs` over mini-batches with a clipped objective.
PPO adds a value head on the final hidden states, per-token KL-penalised
rewards and GAE; GRPO uses group-normalised sequence rewards as advantages
and a KL term (k3 estimator) in the loss. TRL's GRPOTrainer generates with
`model.generate` or an external vLLM server and cannot take an engine living
in the same process, so the loop is ours; it stays small.

The loss functions are plain functions over tensors (tested against hand-
computed values); everything else is plumbing.
"""
from __future__ import annotations

import importlib
import math
import random
import re
import time
from pathlib import Path

import torch

from .config import JobConfig
from .core import (Run, TrainResult, gradient_checkpointing_on, init_adapter, load_base_and_tokenizer, lora_model,
                   make_optimizer, save_adapter, total_steps)
from .data import DataError, _messages, pad_token_id, read_records


# --- loss terms ----------------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def kl_penalized_rewards(logp_old: torch.Tensor, logp_ref: torch.Tensor, score: torch.Tensor, mask: torch.Tensor, kl_coef: float):
    """Per-token rewards [B, T]: -kl_coef * (logp_old - logp_ref), plus the sequence score on its last token."""
    r = -kl_coef * (logp_old - logp_ref) * mask
    last = mask.sum(-1).long() - 1
    r[torch.arange(r.shape[0]), last.clamp(min=0)] += score
    return r


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over response tokens -> (advantages, returns), both [B, T]."""
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        nxt = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        last = (delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < T else 0)) * mask[:, t]
        adv[:, t] = last
    return adv, adv + values


def policy_loss(logp_new, logp_old, adv, mask, cliprange: float):
    ratio = torch.exp(logp_new - logp_old)
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cliprange, 1 + cliprange))
    return masked_mean(pg, mask), masked_mean(((ratio - 1).abs() > cliprange).float(), mask)


def value_loss(v_new, v_old, returns, mask, cliprange_value: float):
    vc = v_old + (v_new - v_old).clamp(-cliprange_value, cliprange_value)
    return 0.5 * masked_mean(torch.max((v_new - returns) ** 2, (vc - returns) ** 2), mask)


def group_advantages(rewards: torch.Tensor, group: int, eps: float = 1e-4) -> torch.Tensor:
    g = rewards.view(-1, group)
    return ((g - g.mean(-1, keepdim=True)) / (g.std(-1, keepdim=True) + eps)).view(-1)


def k3_kl(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Unbiased, non-negative per-token KL estimate exp(ref - p) - (ref - p) - 1."""
    d = logp_ref - logp
    return torch.exp(d) - d - 1


# --- rewards -------------------------------------------------------------------------------------
def _imported(spec: str):
    """The function a "module:function" reference names (the operator's: a job file or the server's registry)."""
    mod, _, fn = spec.partition(":")
    if not fn:
        raise ValueError(f"reward {spec!r}: expected 'module:function'")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward {spec!r} cannot be imported: {e}") from None


def make_reward(spec, rollout, tokenizer, store_dir):
    """-> fn(prompts: list[str], completions: list[str], seqs: list[list[int]], items: list[dict]) -> list[float]
    (`items`: each prompt's dataset record, which graders read as `{{item.<field>}}`); or (fn, reward adapter ref)."""
    if spec is None:
        raise ValueError("method ppo/grpo needs 'reward': a rule, 'module:function', {adapter: name} or {grader: ...}")
    if isinstance(spec, dict) and "grader" in spec and set(spec) <= {"grader", "functions"}:
        from .graders import make_grader

        # `functions`: the operator's registered python grader functions, NAME -> "module:function" (the server's
        # --reward-function registry; a request only ever names one)
        functions = {name: _imported(ref) for name, ref in (spec.get("functions") or {}).items()}
        return make_grader(spec["grader"], rollout, store_dir, functions or None)
    if isinstance(spec, str):
        f = _imported(spec)
        return lambda prompts, comps, seqs, items: [float(x) for x in f(prompts, comps)]
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError("reward must be one of {regex: ...}, {contains: ...}, {exact: ...}, {adapter: ...}")
    (kind, val), = spec.items()
    if kind == "regex":
        pat = re.compile(val)
        return lambda p, c, s, items: [1.0 if pat.search(x) else 0.0 for x in c]
    if kind == "contains":
        return lambda p, c, s, items: [1.0 if val in x else 0.0 for x in c]
    if kind == "exact":
        return lambda p, c, s, items: [1.0 if x.strip() == str(val).strip() else 0.0 for x in c]
    if kind == "adapter":
        score, ref = reward_adapter_scorer(str(val), rollout, store_dir)
        return (lambda p, c, seqs, items: score(seqs)), ref
    raise ValueError(f"unknown reward rule {kind!r}")


def reward_adapter_scorer(ref: str, rollout, store_dir):
    """A registered reward adapter as fn(token sequences) -> scores, scored in the rollout engine; and its ref."""
    from loraplex.adapters_store import AdapterStore, load_score_head

    name, _, ver = ref.partition("@")
    v = AdapterStore(store_dir).get(name, int(ver) if ver else None)
    if v.manifest.kind != "reward":
        raise ValueError(f"reward adapter {v.ref} is not a reward model")
    head = load_score_head(v.path)
    w, b = head["weight"].float()[0], head.get("bias")
    b = float(b[0]) if b is not None else 0.0
    return (lambda seqs: [float(h @ w) + b for h in rollout.final_hidden(seqs, v)]), v.ref


def load_prompts(spec, tok) -> list[tuple[str, list[int], dict]]:
    """Prompts of an RL dataset -> (text, token ids, the whole record). A record holds `prompt` (a string or messages)
    or, as in OpenAI's reinforcement fine-tuning files, `messages` ending with the user turn; its other fields are what
    a grader reads as `{{item.<field>}}`."""
    if isinstance(spec, (str, Path)):
        from .config import DatasetSpec

        spec = DatasetSpec(path=str(spec))
    out = []
    for where, rec in read_records(spec)[0]:
        try:
            p = record_prompt(rec)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        if isinstance(p, str):
            out.append((p, tok(p, add_special_tokens=True)["input_ids"], rec))
        else:
            text = tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            out.append((text, tok(text, add_special_tokens=False)["input_ids"], rec))
    return out


def record_prompt(rec: dict) -> str | list[dict]:
    """One RL record's prompt: `prompt` (a string or messages) or `messages`; ValueError saying what is wrong."""
    key = "prompt" if "prompt" in rec else "messages"
    p = rec.get(key)
    if isinstance(p, str) and p:
        return p
    if isinstance(p, list) and p:
        return _messages(p, key)
    raise ValueError("each record needs a 'prompt' (string or messages) or 'messages'")


# --- the loop ------------------------------------------------------------------------------------
def _forward(model, value_head, seqs: list[tuple[list[int], list[int]]], pad: int, device):
    """Policy log-probs (and values) of each response token: [B, T] padded to the longest response."""
    L = max(len(p) + len(r) for p, r in seqs)
    T = max(len(r) for _, r in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, (p, r) in enumerate(seqs):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        att[i, : len(p) + len(r)] = 1
    ids, att = ids.to(device), att.to(device)
    base = model.get_base_model()
    h = base.model(input_ids=ids, attention_mask=att).last_hidden_state
    # only response positions need the vocabulary projection (logits at t predict token t+1)
    rows, cols, toks = [], [], []
    for i, (p, r) in enumerate(seqs):
        rows += [i] * len(r)
        cols += list(range(len(p) - 1, len(p) - 1 + len(r)))
        toks += list(r)
    rows_t, cols_t = torch.tensor(rows, device=device, dtype=torch.long), torch.tensor(cols, device=device, dtype=torch.long)
    hs = h[rows_t, cols_t]
    lp = torch.log_softmax(base.lm_head(hs).float(), -1).gather(-1, torch.tensor(toks, device=device)[:, None]).squeeze(-1)
    offs = torch.tensor([c - (len(seqs[r_][0]) - 1) for r_, c in zip(rows, cols)], device=device, dtype=torch.long)
    logp = torch.zeros((len(seqs), T), device=device).index_put((rows_t, offs), lp)
    mask = torch.zeros((len(seqs), T), device=device).index_put((rows_t, offs), torch.ones_like(lp))
    vals = torch.zeros((len(seqs), T), device=device)
    if value_head is not None:
        vals = vals.index_put((rows_t, offs), value_head(hs.float()).squeeze(-1))
    return logp, vals, mask


def _pad(rows: list[list[float]], T: int, device) -> torch.Tensor:
    out = torch.zeros((len(rows), T), device=device)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r[:T], device=device)
    return out


def train_rl(cfg: JobConfig, out_dir: Path, *, resume=False, on_event=None, progress=False, stop_after=None,
             store_dir=None) -> TrainResult:
    from .rollout import RolloutEngine

    run = Run(cfg, out_dir, resume=resume, on_event=on_event, progress=progress, stop_after=stop_after)
    device = run.device
    base, tok, base_path = load_base_and_tokenizer(cfg, device)
    pad = pad_token_id(tok)
    prompts = []
    for d in cfg.datasets:
        prompts += load_prompts(d, tok)
    model = lora_model(base, cfg)
    lineage = init_adapter(model, cfg, store_dir)
    gen_eos = base.generation_config.eos_token_id
    eos = {tok.eos_token_id} | set([gen_eos] if isinstance(gen_eos, int) else gen_eos or [])
    rollout = RolloutEngine(model, tok, eos)
    try:
        rollout.freeze_reference(model)  # the starting point, before a resumed checkpoint's weights are loaded
        run.load_weights(model)
        reward = make_reward(cfg.reward, rollout, tok, store_dir)
        if isinstance(reward, tuple):
            reward, ref_name = reward
            lineage["reward_adapter"] = ref_name
        else:
            lineage["reward"] = cfg.reward
        # a reward function that raises fails the job here, before any step
        probe = prompts[:2]
        try:
            got = reward([p for p, _, _ in probe], ["", "test"][: len(probe)], [ids for _, ids, _ in probe],
                         [it for _, _, it in probe])
            if len(got) != len(probe):
                raise ValueError(f"returned {len(got)} rewards for {len(probe)} completions")
        except Exception as e:
            raise ValueError(f"the reward function failed on a probe call: {e}") from e
        value_head = torch.nn.Linear(base.config.hidden_size, 1).to(device) if cfg.method == "ppo" else None
        params = [p for p in model.parameters() if p.requires_grad] + (list(value_head.parameters()) if value_head else [])
        total = total_steps(cfg, max(1, math.ceil(len(prompts) / cfg.num_rollouts)))
        opt, sched = make_optimizer(params, cfg, total)
        run.plan(total, train_examples=len(prompts), examples_per_step=cfg.num_rollouts,
                 steps_per_epoch=max(1, math.ceil(len(prompts) / cfg.num_rollouts)),
                 gradient_checkpointing=gradient_checkpointing_on(model))
        run.start(opt, sched, total, model=model, heads={"value_head": value_head} if value_head is not None else None)
        G = cfg.num_generations if cfg.method == "grpo" else 1
        history = []
        while run.step < total:
            t0 = time.time()
            rng = random.Random(cfg.seed * 7919 + run.step)
            batch = [prompts[rng.randrange(len(prompts))] for _ in range(cfg.num_rollouts)]
            batch = [b for b in batch for _ in range(G)]
            rollout.push_policy(model)
            t_roll = time.time()
            gens = rollout.generate([ids for _, ids, _ in batch], max_tokens=cfg.response_length,
                                    temperature=cfg.temperature, seeds=[cfg.seed * 1000003 + run.step * 4099 + i for i in range(len(batch))])
            t_roll = time.time() - t_roll
            seqs = [(ids, g["tokens"]) for (_, ids, _), g in zip(batch, gens)]
            texts = [tok.decode(g["tokens"], skip_special_tokens=True) for g in gens]
            got = reward([p for p, _, _ in batch], texts, [p + r for p, r in seqs], [it for _, _, it in batch])
            scores = torch.tensor(got, dtype=torch.float32, device=device)
            T = max(1, max(len(r) for _, r in seqs))
            logp_old = _pad([g["logprobs"] for g in gens], T, device)
            logp_ref = _pad(rollout.sequence_logprobs(seqs, rollout.reference), T, device)
            with torch.no_grad():
                _, v_old, mask = _forward(model, value_head, seqs, pad, device)
            if cfg.method == "ppo":
                rewards = kl_penalized_rewards(logp_old, logp_ref, scores, mask, cfg.kl_coef)
                adv, returns = gae(rewards, v_old, mask, cfg.gamma, cfg.lam)
                mean, std = masked_mean(adv, mask), torch.sqrt(masked_mean((adv - masked_mean(adv, mask)) ** 2, mask)) + 1e-8
                adv = (adv - mean) / std * mask
            else:
                adv = group_advantages(scores, G)[:, None].expand(-1, T) * mask
                returns = None
            stats = {"policy_loss": [], "value_loss": [], "clipfrac": []}
            for _ in range(cfg.ppo_epochs):
                order = list(range(len(seqs)))
                rng.shuffle(order)
                for i in range(0, len(order), cfg.mini_batch_size):
                    idx = order[i:i + cfg.mini_batch_size]
                    logp, v, m = _forward(model, value_head, [seqs[j] for j in idx], pad, device)
                    t_ = logp.shape[1]
                    pl, cf = policy_loss(logp, logp_old[idx, :t_], adv[idx, :t_], m, cfg.cliprange)
                    loss = pl
                    if cfg.method == "ppo":
                        vl = value_loss(v, v_old[idx, :t_], returns[idx, :t_], m, cfg.cliprange_value)
                        loss = loss + cfg.vf_coef * vl
                        stats["value_loss"].append(float(vl.detach()))
                    else:
                        loss = loss + cfg.kl_coef * masked_mean(k3_kl(logp, logp_ref[idx, :t_]), m)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    opt.step()
                    stats["policy_loss"].append(float(pl.detach()))
                    stats["clipfrac"].append(float(cf))
            sched.step()
            mean_pl = sum(stats["policy_loss"]) / len(stats["policy_loss"])
            rec = {"examples": cfg.num_rollouts, "reward_mean": float(scores.mean()),
                   "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
                   "kl": float(masked_mean(logp_old - logp_ref, mask)), "policy_loss": mean_pl,
                   "clipfrac": sum(stats["clipfrac"]) / len(stats["clipfrac"]),
                   "response_length": float(mask.sum(-1).mean()), "rollout_seconds": t_roll,
                   "step_seconds": time.time() - t0,
                   "rollout_tokens_per_second": float(mask.sum()) / max(t_roll, 1e-9)}
            if stats["value_loss"]:
                rec["value_loss"] = sum(stats["value_loss"]) / len(stats["value_loss"])
            history.append(run.step_done(mean_pl, rec))
            if run.should_stop():
                return run.stopped(lineage)
        final = save_adapter(model, run.out_dir / "adapter", base_path)
        k = max(1, len(history) // 4)
        metrics = {"reward_mean_first": sum(h["reward_mean"] for h in history[:k]) / k if history else None,
                   "reward_mean_last": sum(h["reward_mean"] for h in history[-k:]) / k if history else None,
                   "kl_last": history[-1]["kl"] if history else None, "base_path": str(base_path)}
        return run.finish(final, metrics, lineage)
    finally:
        rollout.close()
