"""Runs one flattened batch of tokens (prefill chunks and decode steps mixed) through the base model.

We load the checkpoint with transformers and keep its modules (embedding,
norms, projections, rotary embedding, MLP) but drive them ourselves: the
batch is a flat `[T]` token vector tagged with positions and with the slot of
the adapter each token belongs to (`prepare` builds it from the scheduler's
plan). Each sequence's keys and values are a row of a KV arena
(server/engine/kv_cache.py); how the step attends is planned once per step
(server/engine/attention.py), as is the LoRA work every projection shares
(`LoraContext.begin_step`). This is what lets requests join and leave at
every step without padding, and adapters differ per token. On CPU the frozen
projections and the LM head run through oneDNN with packed weights
(kernels/cpu_gemm.py); q/k/v and gate/up, which read the same input, are one
packed GEMM and one LoRA shrink each (`LoraGroup`).

Supported: Llama-family decoders (Llama 2/3, Mistral, Qwen2/2.5, Qwen3,
SmolLM). Others are refused at load time by `check_architecture`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.kernels import LoraSegments, cpu_gemm, select_backend

from .attention import AttentionPlan
from .kv_cache import KVCacheManager, SeqKVCache
from .lora_layer import LoraContext, LoraGroup, LoraLinear, wrap_lora_modules

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


class UnsupportedModel(ValueError):
    pass


def check_architecture(config) -> str:
    archs = list(getattr(config, "architectures", None) or [])
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return a
    mt = getattr(config, "model_type", None)
    for a, t in SUPPORTED_ARCHITECTURES.items():
        if mt == t and not archs:
            return a
    raise UnsupportedModel(
        f"unsupported architecture {archs or mt!r}: loraplex serves {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
    )


@dataclass
class SeqChunk:
    """One sequence's share of a step: tokens [start, start+n) of the flat batch, at positions past..past+n-1."""

    cache: SeqKVCache
    start: int
    n: int
    past: int


@dataclass
class StepBatch:
    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    chunks: list[SeqChunk]
    seg: LoraSegments | None
    logits_indices: torch.Tensor  # [K] flat indices whose next-token logits are wanted
    items: list = field(default_factory=list)  # the scheduled [(sequence, tokens)] this batch computes
    sample_rows: list = field(default_factory=list)  # [(sequence, logits row)]: sequences that sample a token
    prompt_rows: list = field(default_factory=list)  # [(sequence, first logits row, first position)]: prompt logprobs


def build_step_batch(items, device) -> StepBatch:
    """Flattens a scheduled step: each sequence's next `n` tokens, their positions and adapter slots.

    Logits are computed only where they are used: the last token of every
    sequence whose computed tokens reach its end (it samples), and the prompt
    rows of a sequence that asked for prompt logprobs.
    """
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    chunks: list[SeqChunk] = []
    logits_idx: list[int] = []
    sample_rows: list = []
    prompt_rows: list = []
    for seq, n in items:
        start = len(ids)
        a = seq.num_computed
        ids.extend(seq.all_ids[a : a + n])
        positions.extend(range(a, a + n))
        slots.extend([seq.slot] * n)
        chunks.append(SeqChunk(seq.cache, start, n, a))
        if seq.prompt_logprobs is not None and a < seq.num_prompt - 1:
            last = min(a + n, seq.num_prompt - 1)  # rows whose next token is still a prompt token
            prompt_rows.append((seq, len(logits_idx), a))
            logits_idx.extend(range(start, start + (last - a)))
        if a + n == len(seq.all_ids):
            sample_rows.append((seq, len(logits_idx)))
            logits_idx.append(start + n - 1)
    return StepBatch(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        chunks=chunks,
        seg=LoraSegments.from_token_slots(slots, device) if any(s >= 0 for s in slots) else None,
        logits_indices=torch.tensor(logits_idx, dtype=torch.long, device=device),
        items=list(items), sample_rows=sample_rows, prompt_rows=prompt_rows,
    )


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, `x·cos + rotate_half(x)·sin` with rotate_half's sign folded into `sin_signed`
    (the same floats in fewer ops); x: [T, heads, D], cos / sin_signed: [T, 1, D]."""
    return (x * cos).add_(x.roll(x.shape[-1] // 2, -1).mul_(sin_signed))


def _rms_norm_op(norms: list[nn.Module], dtype: torch.dtype, device):
    """`norm(x)` for the model's RMSNorm modules: the first of these that gives exactly the module's floats
    (checked here, on this device and dtype), else the module itself:
    - fp32: HF's formula in five ops, two of them in place (at [32, 576] on CPU, 14 us against 19 for
      `F.rms_norm`, which runs its generic path there);
    - `F.rms_norm`, one fused kernel where the device has one."""
    def five_ops(norm, x):
        r = x.pow(2).mean(-1, keepdim=True).add_(norm.variance_epsilon).rsqrt_()
        return torch.mul(x, r).mul_(norm.weight)

    def fused(norm, x):
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)

    # HF computes a 16-bit input's statistics in fp32: the five ops are HF's formula for fp32 only
    for op in (five_ops, fused) if dtype == torch.float32 else (fused,):
        try:
            g = torch.Generator(device="cpu").manual_seed(0)
            for norm in norms:
                for rows, s in ((7, 3.0), (32, 0.01), (1, 100.0)):
                    x = (torch.randn(rows, norm.weight.shape[0], generator=g) * s).to(device=device, dtype=dtype)
                    if not torch.equal(op(norm, x), norm(x)):
                        raise ValueError("differs")
        except (AttributeError, TypeError, ValueError, RuntimeError):
            continue
        return op
    return lambda norm, x: norm(x)


class ModelRunner:
    def __init__(self, model: nn.Module, *, max_loras: int, kv_budget_tokens: int, max_model_len: int | None = None,
                 owns_weights: bool = False, lora_backend: str | None = None):
        """`owns_weights`: nothing but this runner uses `model`, so base weights packed for the CPU GEMM
        may drop their unpacked copy (the server's model); the trainer's rollout engine shares them.
        `lora_backend`: torch | triton | auto (None: `LORAPLEX_KERNELS`), fixed for the runner's life."""
        self.model = model
        self.config = model.config
        self.arch = check_architecture(self.config)
        model.eval()
        model.requires_grad_(False)
        inner = model.model
        self.embed = inner.embed_tokens
        self.layers = inner.layers
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.lm_head = model.lm_head
        cfg = self.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.windows = [self._window(i, layer) for i, layer in enumerate(self.layers)]
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        norms = [self.norm] + [n for l in self.layers for n in (l.input_layernorm, l.post_attention_layernorm,
                                                               getattr(l.self_attn, "q_norm", None),
                                                               getattr(l.self_attn, "k_norm", None)) if n is not None]
        self.rms_norm = _rms_norm_op(norms, self.dtype, self.device)
        self.qk_norm = hasattr(self.layers[0].self_attn, "q_norm")
        self.lora_ctx = LoraContext(select_backend(self.device, lora_backend))
        self.batched_decode = True  # decode groups in attention (tests switch it off to compare)
        self.max_loras = max_loras
        self.lora_modules: dict[str, LoraLinear] = wrap_lora_modules(model, self.lora_ctx, max_loras, self.layers)
        # per layer: (q, k, v) and (gate, up), the projections that read the same input
        self.groups = [(LoraGroup([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj], self.lora_ctx),
                        LoraGroup([l.mlp.gate_proj, l.mlp.up_proj], self.lora_ctx)) for l in self.layers]
        # CPU fp32: every frozen base product through oneDNN with its weight packed once (kernels/cpu_gemm.py),
        # a group's weights packed together (one GEMM, one LoRA shrink)
        self.lm_head_packed = None
        self.cpu_gemm = cpu_gemm.available(self.lm_head.weight)
        if self.cpu_gemm:
            for pair in self.groups if self.lora_ctx.backend.fuses_groups else ():
                for g in pair:
                    g.fuse(release=owns_weights)
            for m in self.lora_modules.values():
                if m.group is None:
                    m.pack_base(release=owns_weights)
            self.lm_head_packed = cpu_gemm.pack(self.lm_head.weight)  # often tied to the embedding: never released
        self.kv = KVCacheManager(
            num_layers=len(self.layers),
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
            device=self.device,
            budget_tokens=kv_budget_tokens,
            max_seq_len=self.max_model_len,
        )

    def _window(self, i: int, layer) -> int | None:
        w = getattr(layer.self_attn, "sliding_window", None)
        if w is None and self.arch == "MistralForCausalLM":
            w = getattr(self.config, "sliding_window", None)
        return int(w) if w else None

    def prepare(self, items) -> StepBatch:
        """The flat batch of a scheduled step: `items` is [(sequence, tokens to compute)], ordered by slot."""
        return build_step_batch(items, self.device)

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits [K, V] fp32 at batch.logits_indices, last hidden states [K, H])."""
        self.lora_ctx.begin_step(batch.seg)
        try:
            return self._forward(batch)
        finally:
            self.lora_ctx.begin_step(None)

    def _forward(self, batch: StepBatch):
        T = batch.input_ids.shape[0]
        nH, nKV, D = self.num_heads, self.num_kv_heads, self.head_dim
        attn_plan = AttentionPlan(batch.chunks, self.windows, num_heads=nH, num_kv_heads=nKV, head_dim=D,
                                  scaling=self.scaling, dtype=self.dtype, device=self.device,
                                  allow_groups=self.batched_decode)
        norm = self.rms_norm
        h = self.embed(batch.input_ids)  # [T, H]
        cos, sin = self.rotary(h, batch.positions[None])  # [1, T, D]
        cos, sin = cos[0][:, None, :], sin[0][:, None, :]  # [T, 1, D]
        sin = torch.cat((-sin[..., : D // 2], sin[..., D // 2 :]), dim=-1)  # rotate_half's sign, for _rope
        qk_cols = (nH + nKV) * D
        for li, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv, gate_up = self.groups[li]
            x = norm(layer.input_layernorm, h)
            if qkv.packed is not None and not self.qk_norm:  # q and k are side by side: one rotary for both
                y = qkv.fused(x)
                qk = _rope(y[:, :qk_cols].view(T, nH + nKV, D), cos, sin)
                q, k, v = qk[:, :nH], qk[:, nH:], y[:, qk_cols:].view(T, nKV, D)
            else:
                q, k, v = qkv(x)
                q, k, v = q.view(T, nH, D), k.view(T, nKV, D), v.view(T, nKV, D)
                if self.qk_norm:
                    q, k = norm(attn.q_norm, q), norm(attn.k_norm, k)
                q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            out = attn_plan.attend(li, q, k, v)  # [T, nH, D]
            h = h + attn.o_proj(out.reshape(T, nH * D))
            gate, up = gate_up(norm(layer.post_attention_layernorm, h))
            h = h + mlp.down_proj(mlp.act_fn(gate) * up)
        for c in batch.chunks:
            c.cache.length = max(c.cache.length, c.past + c.n)
        hs = norm(self.norm, h[batch.logits_indices])
        if self.lm_head_packed is not None:
            logits = cpu_gemm.packed_linear(hs, self.lm_head_packed, self.lm_head.bias).float()
        else:
            logits = self.lm_head(hs).float()
        return logits, hs

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        return {name: (m.in_features, m.out_features) for name, m in self.lora_modules.items()}
