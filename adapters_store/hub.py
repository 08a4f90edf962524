"""Hugging Face hub ids (`org/name[@revision]`) for base models, adapters and datasets, as local snapshot directories.

A hub id is resolved by `huggingface_hub.snapshot_download` into the hub's
standard cache, so `HF_HOME` / `HF_HUB_CACHE`, `HF_TOKEN` and
`HF_HUB_OFFLINE=1` (resolve from the cache only, never the network) mean
what they mean for every other Hugging Face tool. What comes back is an
ordinary directory: a model goes through the same checks as a local
checkpoint, an adapter through the same validation as one registered from a
directory (safetensors only, shapes, base match), a dataset through the same
loader. Nothing here decides whether a caller may name a remote repository;
the server's front ends do (`hub_allowed`).

A local directory always wins over a hub id of the same spelling, and store
adapter names cannot hold a `/`, so `org/name` is never ambiguous.
"""

from __future__ import annotations

import re
from pathlib import Path

from .base_model import BaseModelError
from .errors import InvalidAdapter

_HUB_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})(?:@(?P<rev>[A-Za-z0-9_./-]{1,128}))?$"
)
ADAPTER_FILES = ["adapter_config.json", "*.safetensors", "README.md"]  # never a pickle, whatever the repo holds
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


class HubError(BaseModelError):
    """A hub id that cannot be resolved (unknown repo or revision, offline without a cached copy, no access)."""


def is_hub_id(value) -> bool:
    """`org/name[@revision]` that is not an existing local path."""
    s = str(value)
    return bool(_HUB_ID.match(s)) and not Path(s).expanduser().exists()


def split_hub_id(value: str) -> tuple[str, str | None]:
    m = _HUB_ID.match(value)
    if m is None:
        raise HubError(f"{value!r} is not a hub id (expected org/name or org/name@revision)")
    return m["repo"], m["rev"]


def org_of(value: str) -> str:
    return split_hub_id(value)[0].split("/")[0]


def snapshot(value: str, *, repo_type: str = "model", allow_patterns: list[str] | None = None) -> Path:
    """The local snapshot directory of hub id `value`, downloaded into the hub cache when not there (and allowed)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    repo, rev = split_hub_id(value)
    kind = {"model": "model", "dataset": "dataset"}[repo_type]
    try:
        return Path(snapshot_download(repo, repo_type=repo_type, revision=rev, allow_patterns=allow_patterns))
    except LocalEntryNotFoundError:
        raise HubError(
            f"hub {kind} {value!r} is not in the local hub cache and cannot be downloaded "
            "(offline: HF_HUB_OFFLINE=1 or no network)"
        ) from None
    except (HfHubHTTPError, HFValidationError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise HubError(f"hub {kind} {value!r} cannot be fetched: {first}") from None


def resolve_hub_model(value: str) -> Path:
    path = snapshot(value, allow_patterns=MODEL_FILES)
    if not (path / "config.json").is_file():
        raise HubError(f"hub model {value!r} has no config.json: not a Hugging Face checkpoint")
    return path


def hub_adapter_dir(value: str) -> Path:
    """The snapshot of an adapter repo; InvalidAdapter (422) when it cannot be had, naming the id."""
    try:
        return snapshot(value, allow_patterns=ADAPTER_FILES)
    except HubError as e:
        raise InvalidAdapter(str(e)) from None


def resolve_hub_adapter(value: str, base_model: str) -> tuple[Path, int, str, str]:
    """A hub adapter validated against `base_model` -> (directory, rank, shown id, sha256 of its files)."""
    from .base_model import fingerprint, model_id_for, resolve_base_model
    from .peft_format import BaseModelSpec, validate_adapter_dir
    from .store import _dir_sha256

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = hub_adapter_dir(value)
    base = resolve_base_model(base_model)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    manifest = validate_adapter_dir(path, BaseModelSpec.from_model(meta, model_id_for(base), fingerprint(base)))
    return path, manifest.r, value, _dir_sha256(path)


def hub_allowed(value: str, allowed_orgs: list[str] | None) -> str | None:
    """Why a hub id named over the API is refused (None when allowed): remote ids are off unless the operator lists
    the orgs they may come from (`--allow-hub-org ORG`, `*` for any)."""
    if allowed_orgs is None or not allowed_orgs:
        return (
            f"{value!r} names a Hugging Face hub repository, and this server does not fetch remote repositories "
            "over the API (start it with --allow-hub-org ORG to allow an organisation)"
        )
    if "*" in allowed_orgs or org_of(value) in allowed_orgs:
        return None
    return f"hub organisation {org_of(value)!r} of {value!r} is not in this server's allow-list {sorted(allowed_orgs)}"


def adapter_source(path: str, allowed_orgs: list[str] | None, *, operator: bool = False) -> tuple[str, dict]:
    """Where to register an adapter from: `path` itself, or for a hub id its snapshot directory (then validated by the
    store like any directory) -> (directory, lineage fields naming the source). A hub id named over the API must be
    allowed (`hub_allowed`, 403 otherwise); the operator's own `--adapter NAME=org/repo` always is."""
    if not is_hub_id(path):
        return path, {}
    if not operator:
        why = hub_allowed(path, allowed_orgs)
        if why:
            from .errors import AdapterPathForbidden

            raise AdapterPathForbidden(why)
    snap = hub_adapter_dir(path)
    return str(snap), {"source": f"hub:{split_hub_id(path)[0]}@{snap.name}"}


def hub_cache_root() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)
