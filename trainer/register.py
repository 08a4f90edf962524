"""Registering a finished job's adapter in the store, with its lineage, optionally as a canary.

The lineage is served to clients (`GET /v1/adapters/{name}`), so it names what it records without the
server's paths: datasets by the name the caller knows them by (an upload's `file-id (filename)`, else
the file's name) beside their sha256, the base model by its id, no output directory.
"""

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


def check_new_name(store: AdapterStore, name: str) -> None:
    """A job that may only create `name` (the fine-tuning API's) refuses to publish a version of a taken name."""
    from loraplex.adapters_store.errors import AdapterConflict

    if name in store.names():
        raise AdapterConflict(
            f"adapter name {name!r} was taken while the job ran; a fine-tuning job only creates new names"
        )


def public_config(cfg: JobConfig, model_id: str, names: dict[str, str] | None = None) -> dict:
    """`cfg` as the lineage shows it: dataset paths as their public names, the base model by id, no output dir."""
    out = cfg.model_dump(mode="json")
    for key in ("datasets", "validation_datasets"):
        for d in out[key]:
            d["path"] = _shown(d["path"], names)
    if Path(cfg.base_model).exists():
        out["base_model"] = model_id
    out["output_dir"] = None
    return out


def _shown(path: str, names: dict[str, str] | None) -> str:
    return (names or {}).get(path) or Path(path).name


def register_result(
    cfg: JobConfig,
    adapter_dir: Path,
    metrics: dict,
    store_dir: Path,
    *,
    caller: str,
    extra_lineage: dict | None = None,
    new_name: bool = False,
    public_names: dict[str, str] | None = None,
):
    """Registers the trained adapter as the next version of `cfg.adapter.name` (with `new_name`, only as its first)."""
    spec = base_spec(cfg.base_model)
    store = AdapterStore(store_dir, base=spec)
    if new_name:
        check_new_name(store, cfg.adapter.name)
    config = public_config(cfg, spec.model_id, public_names)
    lineage = {
        "method": cfg.method,
        "base_model": config["base_model"],
        "base_model_id": spec.model_id,
        "base_fingerprint": spec.fingerprint,
        "config": config,
        "dataset_sha256": {_shown(p, public_names): h for p, h in metrics.get("dataset_sha256", {}).items()},
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
            route = store.set_route(
                cfg.adapter.name,
                w,
                sticky=current.sticky if current else None,
                guard=current.guard if current else None,
                caller=caller,
            )
    return v, route
