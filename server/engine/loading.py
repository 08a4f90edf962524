"""Loading the base model once: checkpoint directory -> frozen model, tokenizer, EOS ids, id, fingerprint."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.adapters_store.base_model import fingerprint, model_id_for, resolve_base_model

from .model_runner import check_architecture


@dataclass
class LoadedBase:
    model: torch.nn.Module
    tokenizer: object
    model_id: str
    path: Path
    fingerprint: str
    eos_token_ids: set[int]
    module_shapes: dict[str, tuple[int, int]]


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


def load_base(model: str | None, *, dtype: str | None = None, device: str | None = None, model_id: str | None = None) -> LoadedBase:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_base_model(model)
    config = AutoConfig.from_pretrained(path)
    check_architecture(config)  # refuse before spending time on weights
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation="sdpa").to(dev)
    hf.eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(path)
    eos: set[int] = set()
    for src in (tok.eos_token_id, getattr(hf.generation_config, "eos_token_id", None)):
        if isinstance(src, int):
            eos.add(src)
        elif src:
            eos.update(int(x) for x in src)
    shapes = {
        name: (m.in_features, m.out_features)
        for name, m in hf.named_modules()
        if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")
    }
    return LoadedBase(hf, tok, model_id or model_id_for(path), path, fingerprint(path), eos, shapes)
