"""Reading and validating PEFT LoRA adapter directories.

An adapter directory holds `adapter_config.json` and
`adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight`
([r, in]) and `...lora_B.weight` ([out, r]); an adapter-name segment
(`lora_A.default.weight`) is tolerated. Pickle files (`*.bin`, `*.pt`,
`*.pth`, `*.pkl`) are refused outright: loading them can run code.

Reward adapters (written by our trainer) additionally carry
`"loraplex_kind": "reward"` in the config and a `score_head.safetensors`
file with `weight` [1, hidden] (and optionally `bias` [1]).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import InvalidAdapter

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


@dataclass(frozen=True)
class BaseModelSpec:
    model_id: str
    fingerprint: str
    module_shapes: dict[str, tuple[int, int]]  # module path -> (in_features, out_features)
    max_rank: int = 256

    @classmethod
    def from_model(cls, model, model_id: str, fingerprint: str, max_rank: int = 256) -> "BaseModelSpec":
        shapes = {
            n: (m.in_features, m.out_features)
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
        }
        return cls(model_id, fingerprint, shapes, max_rank)


@dataclass(frozen=True)
class AdapterManifest:
    r: int
    lora_alpha: float
    use_rslora: bool
    module_ranks: dict[str, int]
    module_scales: dict[str, float]
    base_model_name_or_path: str | None
    kind: str = "lora"
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "r": self.r, "lora_alpha": self.lora_alpha, "use_rslora": self.use_rslora,
            "module_ranks": self.module_ranks, "module_scales": self.module_scales,
            "base_model_name_or_path": self.base_model_name_or_path, "kind": self.kind, "extra": self.extra,
        }

    @classmethod
    def from_json(cls, d: dict) -> "AdapterManifest":
        return cls(d["r"], d["lora_alpha"], d["use_rslora"], dict(d["module_ranks"]), dict(d["module_scales"]),
                   d.get("base_model_name_or_path"), d.get("kind", "lora"), d.get("extra", {}))


def _pattern_value(pattern: dict, module: str, default):
    # PEFT matches rank_pattern / alpha_pattern keys as regex suffixes of the module name.
    for key, val in (pattern or {}).items():
        if re.search(rf"(^|\.){key}$", module) or re.fullmatch(key, module):
            return val
    return default


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise InvalidAdapter(f"{path.name} is not a readable safetensors file: {e}") from e


def validate_adapter_dir(path, spec: BaseModelSpec | None) -> AdapterManifest:
    p = Path(path)
    if not p.is_dir():
        raise InvalidAdapter(f"adapter path {str(path)!r} is not a directory")
    pickles = sorted(f.name for f in p.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise InvalidAdapter(f"adapter directory contains pickle files {pickles}; only safetensors weights are accepted")
    cfg_path, w_path = p / "adapter_config.json", p / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise InvalidAdapter("adapter directory is missing adapter_config.json")
    if not w_path.is_file():
        raise InvalidAdapter("adapter directory is missing adapter_model.safetensors")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidAdapter(f"adapter_config.json is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise InvalidAdapter("adapter_config.json must hold a JSON object")
    ptype = cfg.get("peft_type", "LORA")
    if str(ptype).upper() != "LORA":
        raise InvalidAdapter(f"peft_type {ptype!r} is not supported; only LORA adapters are")
    if cfg.get("use_dora"):
        raise InvalidAdapter("DoRA adapters (use_dora: true) are not supported")
    if cfg.get("bias", "none") not in ("none", None):
        raise InvalidAdapter(f"LoRA bias {cfg.get('bias')!r} is not supported; use bias: none")
    if cfg.get("modules_to_save"):
        raise InvalidAdapter(f"modules_to_save {cfg['modules_to_save']} (fully trained modules) is not supported")
    if cfg.get("fan_in_fan_out"):
        raise InvalidAdapter("fan_in_fan_out adapters (Conv1D bases) are not supported")
    try:
        r = int(cfg.get("r", 8))
        alpha = float(cfg.get("lora_alpha", r))
    except (TypeError, ValueError) as e:
        raise InvalidAdapter(f"adapter_config.json: bad r / lora_alpha: {e}") from e
    rslora = bool(cfg.get("use_rslora", False))
    shapes = _tensor_shapes(w_path)
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        m = _KEY.match(key)
        if m is None:
            raise InvalidAdapter(f"unexpected tensor {key!r} in adapter_model.safetensors (only lora_A / lora_B weights are supported)")
        pairs.setdefault(m["module"], {})[m["ab"]] = shape
    if not pairs:
        raise InvalidAdapter("adapter_model.safetensors holds no LoRA weights")
    ranks, scales = {}, {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise InvalidAdapter(f"module {module}: lora_{'B' if 'A' in ab else 'A'} weight is missing")
        a, b = ab["A"], ab["B"]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise InvalidAdapter(f"module {module}: lora_A {list(a)} and lora_B {list(b)} are not [r, in] / [out, r] with the same r")
        rank = a[0]
        want_r = int(_pattern_value(cfg.get("rank_pattern"), module, r))
        if rank != want_r:
            raise InvalidAdapter(f"module {module}: weights have rank {rank} but the config says r={want_r}")
        if rank < 1:
            raise InvalidAdapter(f"module {module}: rank must be at least 1")
        m_alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, alpha))
        if spec is not None:
            if module not in spec.module_shapes:
                raise InvalidAdapter(f"adapter targets module {module!r}, which the base model {spec.model_id!r} does not have (or which cannot carry LoRA)")
            fin, fout = spec.module_shapes[module]
            if (a[1], b[0]) != (fin, fout):
                raise InvalidAdapter(f"module {module}: adapter shapes in={a[1]} out={b[0]} do not match the base model's in={fin} out={fout}")
            if rank > spec.max_rank:
                raise InvalidAdapter(f"module {module}: rank {rank} exceeds the server's maximum LoRA rank {spec.max_rank}")
        ranks[module] = rank
        scales[module] = m_alpha / (math.sqrt(rank) if rslora else rank)
    kind = cfg.get("loraplex_kind", "lora")
    extra = {}
    if kind == "reward":
        head = p / "score_head.safetensors"
        if not head.is_file():
            raise InvalidAdapter("reward adapter is missing score_head.safetensors")
        hs = _tensor_shapes(head)
        if "weight" not in hs or len(hs["weight"]) != 2 or hs["weight"][0] != 1:
            raise InvalidAdapter("score_head.safetensors must hold 'weight' of shape [1, hidden]")
        extra["score_hidden"] = hs["weight"][1]
    elif kind != "lora":
        raise InvalidAdapter(f"unknown loraplex_kind {kind!r}")
    return AdapterManifest(r, alpha, rslora, ranks, scales, cfg.get("base_model_name_or_path"), kind, extra)


def load_adapter_weights(path, manifest: AdapterManifest, dtype=torch.float32, device="cpu") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module path -> (A [r, in], B [out, r])."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(Path(path) / "adapter_model.safetensors"), framework="pt", device="cpu") as f:
        for key in f.keys():
            m = _KEY.match(key)
            if m is None:
                continue
            out.setdefault(m["module"], {})[m["ab"]] = f.get_tensor(key).to(device=device, dtype=dtype)
    return {mod: (ab["A"], ab["B"]) for mod, ab in out.items()}


def load_score_head(path) -> dict[str, torch.Tensor] | None:
    head = Path(path) / "score_head.safetensors"
    if not head.is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(head))
