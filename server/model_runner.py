"""Runs one flattened batch of tokens (prefill chunks and decode steps mixed) through the base model.

We load the checkpoint with transformers and keep its modules (embedding,
norms, projections, rotary embedding, MLP) but drive them ourselves: the
batch is a flat `[T]` token vector tagged with positions and with the slot of
the adapter each token belongs to. Each sequence's keys and values are a
row of a KV arena (server/kv_cache.py): a prefill chunk attends through its
own row, and the decode tokens of one arena's sequences attend in one
batched call per layer (`_decode_groups`). This is what lets requests join
and leave at every step without padding, and adapters differ per token.
On CPU the frozen projections and the LM head run through oneDNN with
packed weights (kernels/cpu_gemm.py).

Supported: Llama-family decoders (Llama 2/3, Mistral, Qwen2/2.5, Qwen3,
SmolLM). Others are refused at load time by `check_architecture`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.kernels import LoraSegments, cpu_gemm

from .kv_cache import KVCacheManager, SeqKVCache
from .lora_layer import LoraContext, LoraLinear, wrap_lora_modules

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
    extra: dict = field(default_factory=dict)


@dataclass
class _DecodeGroup:
    """The decode steps of one KV arena's sequences, attended in one call per layer."""

    arena: object  # kv_cache._Arena
    rows: int  # the arena's rows in use (all read)
    width: int  # keys read per row: the longest decoding row's length
    masks: dict  # window -> [R, 1, 1, width] additive bias (0 or -inf)
    q_index: torch.Tensor  # [R] flat token index of each row's query (any index for rows not decoding)
    out_rows: torch.Tensor  # [k] rows decoding in this step
    out_flat: torch.Tensor  # [k] their flat token index


def _visible(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which keys each query sees: causal, and within the sliding window if the layer has one."""
    allowed = kpos <= qpos
    if window is not None:
        allowed &= kpos > qpos - window
    return allowed


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class ModelRunner:
    def __init__(self, model: nn.Module, *, max_loras: int, kv_budget_tokens: int, max_model_len: int | None = None,
                 owns_weights: bool = False):
        """`owns_weights`: nothing but this runner uses `model`, so base weights packed for the CPU GEMM
        may drop their unpacked copy (the server's model); the trainer's rollout engine shares them."""
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
        self.lora_ctx = LoraContext()
        self.max_loras = max_loras
        self.lora_modules: dict[str, LoraLinear] = wrap_lora_modules(model, self.lora_ctx, max_loras, self.layers)
        # CPU fp32: every frozen base product through oneDNN with its weight packed once (kernels/cpu_gemm.py)
        self.lm_head_packed = None
        self.cpu_gemm = cpu_gemm.available(self.lm_head.weight)
        if self.cpu_gemm:
            for m in self.lora_modules.values():
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

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits [K, V] fp32 at batch.logits_indices, last hidden states [K, H])."""
        self.lora_ctx.seg = batch.seg
        try:
            return self._forward(batch)
        finally:
            self.lora_ctx.seg = None

    def _forward(self, batch: StepBatch):
        T = batch.input_ids.shape[0]
        nH, nKV, D = self.num_heads, self.num_kv_heads, self.head_dim
        h = self.embed(batch.input_ids)  # [T, H]
        cos, sin = self.rotary(h, batch.positions[None])  # [1, T, D]
        cos, sin = cos[0][:, None, :], sin[0][:, None, :]  # [T, 1, D]
        # Built once per step, shared by every layer: where this step's K/V go (one `unbind`
        # per sequence), the decode groups attended in one call each, and the views of the
        # sequences attended one by one (prefill chunks, lone decodes).
        sizes = [c.n for c in batch.chunks]
        dst = [c.cache.kv[:, :, :, c.past : c.past + c.n].unbind(0) for c in batch.chunks]  # [seq][layer] -> [2, nKV, n, D]
        dst_by_layer = list(zip(*dst))
        groups, single = self._decode_groups(batch.chunks)
        keys: dict[int | None, list] = {}
        for window in set(self.windows):
            per_seq = []
            for c in single:
                lo = 0 if window is None else max(0, c.past - window + 1)
                kv = c.cache.kv[:, :, None, :, lo : c.past + c.n]  # [L, 2, 1, nKV, len, D]
                per_seq.append((c, kv[:, 0].unbind(0), kv[:, 1].unbind(0), self._mask(c, window, lo)))
            keys[window] = per_seq
        gqa = nH != nKV
        for li, layer in enumerate(self.layers):
            attn = layer.self_attn
            window = self.windows[li]
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(T, nH, D)
            k = attn.k_proj(x).view(T, nKV, D)
            v = attn.v_proj(x).view(T, nKV, D)
            if hasattr(attn, "q_norm"):
                q = attn.q_norm(q)
                k = attn.k_norm(k)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kv_new = torch.stack((k, v)).permute(0, 2, 1, 3)  # [2, nKV, T, D]
            torch._foreach_copy_(dst_by_layer[li], kv_new.split(sizes, dim=2))
            if not groups and len(single) == 1:
                c, K, V, mask = keys[window][0]
                out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], K[li], V[li], attn_mask=mask, scale=self.scaling,
                                                     enable_gqa=gqa)[0].transpose(0, 1)
            else:
                out = q.new_empty((T, nH, D))
                for c, K, V, mask in keys[window]:
                    qi = q[c.start : c.start + c.n].transpose(0, 1)[None]  # [1, nH, n, D]
                    o = F.scaled_dot_product_attention(qi, K[li], V[li], attn_mask=mask, scale=self.scaling, enable_gqa=gqa)
                    out[c.start : c.start + c.n] = o[0].transpose(0, 1)
                for g in groups:
                    kv = g.arena.kv[li, :, : g.rows, :, : g.width]  # [2, R, nKV, width, D]: every row of the class
                    # one query per row: plain batched matmuls (GQA as [R, nKV, group, D]) beat SDPA's kernel here
                    qg = q.index_select(0, g.q_index).view(g.rows, nKV, nH // nKV, D)
                    scores = torch.matmul(qg, kv[0].transpose(-1, -2)).mul_(self.scaling).add_(g.masks[window])
                    o = torch.matmul(torch.softmax(scores, dim=-1), kv[1]).view(g.rows, nH, D)
                    out.index_copy_(0, g.out_flat, o.index_select(0, g.out_rows))
            h = h + attn.o_proj(out.reshape(T, nH * D))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        for c in batch.chunks:
            c.cache.length = max(c.cache.length, c.past + c.n)
        hs = self.norm(h[batch.logits_indices])
        if self.lm_head_packed is not None:
            logits = cpu_gemm.packed_linear(hs, self.lm_head_packed, self.lm_head.bias).float()
        else:
            logits = self.lm_head(hs).float()
        return logits, hs

    def _decode_groups(self, chunks: list[SeqChunk]) -> tuple[list["_DecodeGroup"], list[SeqChunk]]:
        """Splits a step's chunks into batched decode groups (one per KV arena) and chunks attended alone.

        A group is worth it when at least two of its arena's rows decode in this
        step and they are at least half of the rows: the call then reads every
        row of the arena (up to the longest of them), and rows that are not
        decoding attend to key 0 only, with their output thrown away.
        """
        by_arena: dict[int, list[SeqChunk]] = {}
        single: list[SeqChunk] = []
        for c in chunks:
            if c.n == 1:
                by_arena.setdefault(id(c.cache.arena), []).append(c)
            else:
                single.append(c)
        groups = []
        dev = self.device
        for cs in by_arena.values():
            arena = cs[0].cache.arena
            rows = len(arena.rows)
            if len(cs) < 2 or 2 * len(cs) < rows:
                single.extend(cs)
                continue
            past = [0] * rows  # a row not decoding now sees key 0 only
            q_index = [cs[0].start] * rows
            for c in cs:
                past[c.cache.row] = c.past
                q_index[c.cache.row] = c.start
            width = max(past) + 1
            qpos = torch.tensor(past, device=dev)[:, None]
            kpos = torch.arange(width, device=dev)[None, :]
            masks = {}
            for window in set(self.windows):
                m = _visible(qpos, kpos, window)
                bias = torch.zeros(m.shape, dtype=self.dtype, device=dev).masked_fill_(~m, float("-inf"))
                masks[window] = bias[:, None, None, :]  # [R, 1, 1, width], added to the scores
            groups.append(_DecodeGroup(
                arena=arena, rows=rows, width=width, masks=masks,
                q_index=torch.tensor(q_index, device=dev),
                out_rows=torch.tensor([c.cache.row for c in cs], device=dev),
                out_flat=torch.tensor([c.start for c in cs], device=dev),
            ))
        return groups, single

    def _mask(self, c: SeqChunk, window: int | None, lo: int) -> torch.Tensor | None:
        # Query i (position past+i) sees keys lo..past+i (and within the window).
        if c.n == 1:
            return None  # one query at the newest position sees every key from lo on
        qpos = torch.arange(c.past, c.past + c.n, device=self.device)[:, None]
        kpos = torch.arange(lo, c.past + c.n, device=self.device)[None, :]
        return _visible(qpos, kpos, window)[None, None]

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        return {name: (m.in_features, m.out_features) for name, m in self.lora_modules.items()}
