"""Rollouts for RL from our own batched multi-LoRA engine, inside the trainer process.

Why a second engine in the trainer process rather than the serving engine:
a job must never be able to take the server down (DESIGN: jobs run in their
own process), and the serving engine's slots belong to client traffic. So
the trainer builds an `Engine` of its own over the *same* frozen base tensors
as the policy it trains (the rollout model's parameters are views of the
policy's base parameters). On CPU with fp32 weights the engine also keeps its
oneDNN-packed copy of the frozen projections and LM head (kernels/cpu_gemm.py:
about one more copy of the base, bought for 1.4-3x faster decode steps;
`LORAPLEX_CPU_GEMM=torch` trades it back). After every
optimizer step the trainer pushes the LoRA A/B tensors of the policy into a
private slot (`AdapterPool.put`): no adapter files are written, nothing is
merged, and a whole batch of rollouts runs through continuous batching.
The same engine scores sequences under the reference (base or starting
adapter) and under a reward adapter.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from loraplex.server.engine import Engine, EngineConfig
from loraplex.server.engine.model_runner import ModelRunner
from loraplex.server.engine.request import OutputStream, Request, SamplingParams


@dataclass(frozen=True)
class MemoryAdapter:
    """A handle for weights pushed from memory; the engine only needs `.ref`."""

    ref: str
    name: str = "rollout"
    version: int = 0


def shared_base_model(peft_model):
    """A plain HF model whose parameters and buffers are the policy's frozen base tensors (no copy)."""
    from transformers import AutoModelForCausalLM

    base = peft_model.get_base_model()
    src = {n.replace(".base_layer", ""): p for n, p in base.named_parameters() if "lora_" not in n}
    bufs = {n.replace(".base_layer", ""): b for n, b in base.named_buffers()}
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(base.config)
    for mod_name, mod in m.named_modules():
        for pname in list(mod._parameters):
            if mod._parameters[pname] is None:  # e.g. a Linear without bias
                continue
            full = f"{mod_name}.{pname}" if mod_name else pname
            t = src.get(full)
            if t is None and full == "lm_head.weight":
                t = src["model.embed_tokens.weight"]  # tied embeddings
            if t is None:
                raise ValueError(f"cannot share base parameter {full}: not found in the policy model")
            mod._parameters[pname] = torch.nn.Parameter(t.detach(), requires_grad=False)
        for bname in list(mod._buffers):
            full = f"{mod_name}.{bname}" if mod_name else bname
            if full in bufs:
                mod._buffers[bname] = bufs[full]
    m.eval()
    return m


def lora_weights(peft_model, module_names) -> tuple[dict, dict]:
    """(weights, scales) of the policy's current LoRA, keyed by the engine's module paths."""
    base = peft_model.get_base_model()
    w, s = {}, {}
    for name in module_names:
        mod = base.get_submodule(name)
        if not hasattr(mod, "lora_A") or "default" not in mod.lora_A:
            continue
        w[name] = (mod.lora_A["default"].weight.detach().float().clone(), mod.lora_B["default"].weight.detach().float().clone())
        s[name] = float(mod.scaling["default"])
    return w, s


class RolloutEngine:
    def __init__(self, peft_model, tokenizer, eos_ids: set[int], *, max_num_seqs: int = 64, kv_tokens: int = 65536):
        self.model = shared_base_model(peft_model)
        runner = ModelRunner(self.model, max_loras=3, kv_budget_tokens=kv_tokens)
        self.engine = Engine(runner, tokenizer, EngineConfig(max_loras=3, max_num_seqs=max_num_seqs, max_queue=100000,
                                                            kv_cache_tokens=kv_tokens), eos_token_ids=eos_ids)
        # No loop thread: `_run` drives the engine on the trainer's thread until the batch is done
        # (the trainer blocks on its rollouts anyway; measured ~10% faster on 2 CPU cores, far more under load).
        self.tokenizer = tokenizer
        self._ids = itertools.count()
        self.policy = MemoryAdapter("policy@live")
        self.reference: MemoryAdapter | None = None

    def close(self) -> None:
        self.engine.shutdown()

    def push_policy(self, peft_model) -> None:
        w, s = lora_weights(peft_model, self.engine.runner.lora_modules)
        self.engine.call(lambda: self.engine.pool.put(self.policy.ref, w, s))

    def freeze_reference(self, peft_model) -> None:
        """The reference policy is the starting adapter (its weights now); None means the bare base."""
        w, s = lora_weights(peft_model, self.engine.runner.lora_modules)
        if all(float(b.abs().max()) == 0 for _, b in w.values()):
            self.reference = None  # a fresh LoRA (B = 0) is the base model itself
            return
        self.reference = MemoryAdapter("reference@0", "reference")
        self.engine.call(lambda: self.engine.pool.put(self.reference.ref, w, s))

    def _run(self, items: list[tuple[list[int], SamplingParams, object]]) -> list[dict]:
        reqs = []
        for ids, params, adapter in items:
            r = Request(f"ro-{next(self._ids)}", list(ids), params, adapter=adapter, stream=OutputStream())
            self.engine.submit(r)
            reqs.append(r)
        self.engine.run_until_idle()
        out = []
        for r in reqs:
            toks, lps, plp, hid = [], [], None, []
            while True:
                o = r.stream.get_nowait()
                toks += o.token_ids
                lps += [e.logprob for e in o.logprobs]
                hid += o.hidden
                if o.prompt_logprobs is not None:
                    plp = o.prompt_logprobs
                if o.finished:
                    if o.error:
                        raise RuntimeError(f"rollout failed: {o.error}")
                    break
            out.append({"tokens": toks, "logprobs": lps, "prompt_logprobs": plp, "hidden": hid})
        return out

    def generate(self, prompts: list[list[int]], *, max_tokens: int, temperature: float, seeds: list[int]) -> list[dict]:
        """Samples one response per prompt with the live policy; returns tokens and their logprobs."""
        return self._run([(p, SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=s, logprobs=0), self.policy)
                          for p, s in zip(prompts, seeds)])

    def sequence_logprobs(self, seqs: list[tuple[list[int], list[int]]], adapter) -> list[list[float]]:
        """Log-probs of each response token given its prompt, under `adapter` (None = base)."""
        res = self._run([(p + r, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, ignore_eos=True), adapter)
                         for p, r in seqs])
        return [[e.logprob for e in x["prompt_logprobs"][len(p):]] for x, (p, _) in zip(res, seqs)]

    def final_hidden(self, seqs: list[list[int]], adapter) -> list[torch.Tensor]:
        res = self._run([(s, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, return_hidden=True), adapter) for s in seqs])
        return [x["hidden"][0] for x in res]
