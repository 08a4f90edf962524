"""Registering a finished job's adapter in the store, with its lineage, optionally as a canary."""
from __future__ import annotations

import importlib.metadata as md
import platform
from pathlib import Path

import torch

from loraplex.adapters_store import AdapterStore, BaseModelSpec
from loraplex.adapters_store.base_model import fingerprint, model_id_for, resolve_base_model

from .config import JobConfig

LIBS = ("torch", "transformers", "peft", "trl", "accelerate", "safetensors", "bitsandbytes")


def library_versions() -> dict:
    out = {"python": platform.python_version()}
    for lib in LIBS:
        try:
            out[lib] = md.version(lib)
        except md.PackageNotFoundError:
            pass
    try:
        out["loraplex"] = md.version("loraplex")
    except md.PackageNotFoundError:
        pass
    return out


def base_spec(base_model: str) -> BaseModelSpec:
    """Module shapes of the base without loading its weights (meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_base_model(base_model)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return BaseModelSpec.from_model(model, model_id_for(path), fingerprint(path))


def canary_weights(store: AdapterStore, name: str, new_version: int, percent: int) -> dict[int, int] | None:
    """The route that gives `percent` to the new version and scales the current split into the rest."""
    route = store.get_route(name)
    if route is not None:
        current = {v: w for v, w in route.versions.items() if w > 0}
    else:
        older = [v.version for v in store.versions(name) if v.version != new_version]
        if not older:
            return None  # the first version takes all traffic
        current = {max(older): 100}
    rest = 100 - percent
    out = {v: (w * rest) // 100 for v, w in current.items()}
    top = max(current, key=current.get)
    out[top] += rest - sum(out.values())
    out[new_version] = percent
    return {v: w for v, w in out.items() if w > 0}


def register_result(cfg: JobConfig, adapter_dir: Path, metrics: dict, store_dir: Path, *, caller: str,
                    extra_lineage: dict | None = None):
    spec = base_spec(cfg.base_model)
    store = AdapterStore(store_dir, base=spec)
    lineage = {
        "method": cfg.method,
        "base_model": cfg.base_model,
        "base_model_id": spec.model_id,
        "base_fingerprint": spec.fingerprint,
        "config": cfg.model_dump(mode="json"),
        "dataset_sha256": metrics.get("dataset_sha256", {}),
        "seed": cfg.seed,
        "libraries": library_versions(),
        "metrics": {k: v for k, v in metrics.items() if k not in ("dataset_sha256", "base_path")},
        **(extra_lineage or {}),
    }
    v = store.register(cfg.adapter.name, adapter_dir, lineage=lineage, caller=caller)
    route = None
    if cfg.canary:
        w = canary_weights(store, cfg.adapter.name, v.version, cfg.canary)
        if w is not None:
            # the canary keeps the route's guard (and sticky setting): a running server arms the guard for the new
            # version from the stored route, so a failing canary rolls back by itself
            current = store.get_route(cfg.adapter.name)
            route = store.set_route(cfg.adapter.name, w, sticky=current.sticky if current else None,
                                    guard=current.guard if current else None, caller=caller)
    return v, route
