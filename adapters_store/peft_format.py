"""Reading and validating PEFT LoRA adapter directories.

What an adapter directory must hold
    adapter_config.json          PEFT `LoraConfig` (peft_type LORA)
    adapter_model.safetensors    `base_model.model.<module>.lora_A.weight` [r, in] and
                                 `base_model.model.<module>.lora_B.weight` [out, r] for every adapted
                                 module; an adapter-name segment (`lora_A.default.weight`) and a missing
                                 `base_model.model.` prefix are tolerated.
Anything pickled (`*.bin`, `*.pt`, `*.pth`, `*.pkl`, `*.pickle`, `*.ckpt`, or a `.safetensors` file
whose bytes are really a pickle / `torch.save` zip) is refused: loading a pickle can run code.

Refused PEFT features (they change the forward pass in ways a plain `x·Aᵀ·Bᵀ·scale` does not
reproduce): DoRA, LoRA bias (`bias` != none, `lora_bias`), `modules_to_save`,
`trainable_token_indices`, `target_parameters`, `layer_replication`, aLoRA, QA-LoRA, VeLoRA,
MonteCLoRA, `fan_in_fan_out`, embedding / conv LoRA, and initialisations that rewrite the base
weights (PiSSA, OLoRA, CorDA, LoRA-GA, MiCA) unless PEFT converted the adapter back to plain LoRA.

Scaling is PEFT's: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`, per module after
`rank_pattern` / `alpha_pattern` (PEFT's matching: a key matches a module whose dotted path ends
with it, the key being a regular expression; matched without backtracking, see `patterns.py`).

Numbers are checked before anything is kept: adapter_config.json is strict JSON (no NaN /
Infinity, no number that overflows a float), `r` and the ranks of `rank_pattern` are positive
integers (4.9 is refused, not truncated), `lora_alpha` and `alpha_pattern` values are finite, and
every module's scale and every weight must stay finite once converted to the serving dtype
(`BaseModelSpec.dtype`): a scale of 1e308 or an F64 weight of 1e39 would turn into inf in the
engine's fp32 / bf16 tensors.

Reward adapters (the trainer's `method: reward`): a LoRA adapter as above plus
    score_head.safetensors       `weight` [1, hidden] and optionally `bias` [1]: the scalar score is
                                 `h_last · weight[0] + bias` on the final hidden state (after the norm)
    adapter_config.json          `"loraplex_kind": "reward"`
A directory with a score head is a reward adapter even without the marker; the marker without the
head is an error.

Base-model match: shapes must fit the base exactly; in addition, when the adapter names its base
by fingerprint (`"loraplex_base_fingerprint"` in adapter_config.json) or by an absolute local
checkpoint path whose fingerprint we can compute, it must be the served base's fingerprint.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import InvalidAdapter
from .patterns import MAX_KEYS, PatternTable, alpha_value, compile_fullmatch, compile_patterns, finite_number, rank_value

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SCORE_HEAD_FILE = "score_head.safetensors"
REWARD_KIND = "reward"
MAX_CONFIG_BYTES = 1 << 20  # adapter_config.json; PEFT writes a few KB
MAX_SHOWN_PATH = 200  # characters of a client's path echoed in an error
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[A-Za-z0-9_-]+))?\.weight$")
# init_lora_weights values whose adapters only work on a base whose weights were rewritten at init
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "lora_ga", "mica")


@dataclass(frozen=True)
class BaseModelSpec:
    model_id: str
    fingerprint: str
    module_shapes: dict[str, tuple[int, int]]  # module path -> (in_features, out_features)
    max_rank: int = 256
    hidden_size: int | None = None  # for reward heads; derived from the q_proj shapes when None
    dtype: str = "float32"  # the serving dtype (torch name): scales and weights must be finite in it

    @classmethod
    def from_model(cls, model, model_id: str, fingerprint: str, max_rank: int = 256) -> "BaseModelSpec":
        shapes = {
            n: (m.in_features, m.out_features)
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
        }
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        first = next(iter(model.parameters()), None)
        dtype = "float32" if first is None else str(first.dtype).removeprefix("torch.")
        return cls(model_id, fingerprint, shapes, max_rank, hidden if isinstance(hidden, int) else None, dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        dt = getattr(torch, self.dtype, None)
        return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.float32

    def model_hidden_size(self) -> int | None:
        if self.hidden_size:
            return self.hidden_size
        ins = {fin for name, (fin, _) in self.module_shapes.items() if name.endswith(("q_proj", "gate_proj", "up_proj"))}
        return ins.pop() if len(ins) == 1 else None


@dataclass(frozen=True)
class AdapterManifest:
    r: int
    lora_alpha: float
    use_rslora: bool
    module_ranks: dict[str, int]  # module path (as in BaseModelSpec.module_shapes) -> rank
    module_scales: dict[str, float]  # module path -> alpha / r (or alpha / sqrt(r) with rsLoRA)
    base_model_name_or_path: str | None
    kind: str = "lora"  # "lora" | "reward"
    extra: dict = field(default_factory=dict)  # module_in_out: {module: [in, out]}, score_hidden (reward)

    def to_json(self) -> dict:
        return {
            "r": self.r, "lora_alpha": self.lora_alpha, "use_rslora": self.use_rslora,
            "module_ranks": self.module_ranks, "module_scales": self.module_scales,
            "base_model_name_or_path": self.base_model_name_or_path, "kind": self.kind, "extra": self.extra,
        }

    @classmethod
    def from_json(cls, d: dict) -> "AdapterManifest":
        """A stored manifest; ValueError when it holds what registration never accepts (a non-finite number)."""
        m = cls(d["r"], d["lora_alpha"], d["use_rslora"], dict(d["module_ranks"]), dict(d["module_scales"]),
                d.get("base_model_name_or_path"), d.get("kind", "lora"), d.get("extra", {}))
        if finite_number(m.lora_alpha) is None or any(finite_number(x) is None for x in m.module_scales.values()):
            raise ValueError("manifest holds a non-finite lora_alpha or scale")
        if any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in [m.r, *m.module_ranks.values()]):
            raise ValueError("manifest holds a rank that is not a positive integer")
        return m

    @property
    def max_rank(self) -> int:
        return max(self.module_ranks.values())


def shown_path(path) -> str:
    """A client's path as echoed in an error: as given (never resolved), cut to a readable length."""
    s = str(path)
    return s if len(s) <= MAX_SHOWN_PATH else s[: MAX_SHOWN_PATH - 3] + "..."


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows (non-finite values are refused)")


def _finite_float(text: str) -> float:
    f = float(text)
    if not math.isfinite(f):
        raise ValueError(f"{text[:40]} overflows a float")
    return f


def read_config(cfg_path: Path, where: str) -> dict:
    """adapter_config.json as strict, finite JSON (an object), bounded in size; InvalidAdapter otherwise."""
    try:
        size = cfg_path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise InvalidAdapter(f"{where}: {CONFIG_FILE} is {size} bytes; at most {MAX_CONFIG_BYTES} are accepted")
        with open(cfg_path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise InvalidAdapter(f"{where}: {CONFIG_FILE} grew past {MAX_CONFIG_BYTES} bytes while being read")
        cfg = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float)
    except InvalidAdapter:
        raise
    except OSError as e:
        raise InvalidAdapter(f"{where}: {CONFIG_FILE} cannot be read ({e.strerror or type(e).__name__})") from None
    except RecursionError:
        raise InvalidAdapter(f"{where}: {CONFIG_FILE} nests too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, non-finite numbers, huge integers
        raise InvalidAdapter(f"{where}: {CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise InvalidAdapter(f"{where}: {CONFIG_FILE} must hold a JSON object")
    return cfg


def _positive_int(value, what: str, where: str) -> int:
    if isinstance(value, float) and value.is_integer() and 1 <= value <= 1 << 20:
        value = int(value)  # 8.0 is 8; 4.9 is refused below, never truncated
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidAdapter(f"{where}: {CONFIG_FILE} {what} must be a positive integer, got {str(value)[:40]}",
                             param=what)
    return value


def _scale_limit(spec: BaseModelSpec | None) -> float:
    """The largest |scale| the engine's scale table (fp32) and its serving dtype both hold as a finite number."""
    dt = spec.torch_dtype if spec is not None else torch.float32
    return min(torch.finfo(torch.float32).max, torch.finfo(dt).max)


def pattern_value(pattern: dict | PatternTable | None, module: str, default):
    """PEFT's `rank_pattern` / `alpha_pattern` lookup: the value of the first key matching the module path's tail."""
    if not isinstance(pattern, PatternTable):
        pattern = compile_patterns(pattern or None, "pattern", lambda f, k, v: v)
    return pattern.lookup(module, default)


def _looks_pickled(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4)
    # pickle protocol >= 2 starts with PROTO (0x80); torch.save writes a zip archive
    return head[:1] == b"\x80" or head == b"PK\x03\x04"


def _tensor_meta(path: Path, where: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from the safetensors header, without reading the data."""
    if _looks_pickled(path):
        raise InvalidAdapter(f"{where}: {path.name} is a pickle (torch.save) file, not safetensors; pickles are refused")
    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (str(sl.get_dtype()), tuple(sl.get_shape()))
            return out
    except Exception as e:
        raise InvalidAdapter(f"{where}: {path.name} is not a readable safetensors file: {e}") from e


@contextlib.contextmanager
def one_intra_op_thread():
    """Torch work here runs on the calling thread alone: no OpenMP team is started for it.

    Validation and loading run on request threads, beside the engine thread.
    A second thread with its own OpenMP team takes libgomp past one managed
    thread per CPU, and libgomp then stops spinning between parallel regions
    in *every* team: each of the engine's many small ops pays a futex
    wake-up, and on 2 cores we measured decode steps 1.4-2.5x slower. These
    tensors are small; one thread loses nothing.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _check_finite(path: Path, where: str, dtype: torch.dtype = torch.float32) -> None:
    """Every tensor finite, and still finite once converted to `dtype` (what the engine will hold)."""
    with safe_open(str(path), framework="pt") as f, one_intra_op_thread():
        for k in f.keys():
            t = f.get_tensor(k)
            if not torch.isfinite(t).all():
                raise InvalidAdapter(f"{where}: tensor {k!r} in {path.name} holds NaN or infinite values")
            if t.dtype != dtype and not torch.isfinite(t.to(dtype)).all():
                raise InvalidAdapter(f"{where}: tensor {k!r} in {path.name} holds values too large for the serving "
                                     f"dtype {str(dtype).removeprefix('torch.')} (they would become infinite)")


def _unsupported_features(cfg: dict) -> list[str]:
    bad = []
    ptype = str(cfg.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        bad.append(f"peft_type {cfg.get('peft_type')!r} (only LORA adapters are supported)")
    if cfg.get("use_dora"):
        bad.append("DoRA (use_dora: true)")
    if cfg.get("bias", "none") not in ("none", None):
        bad.append(f"LoRA bias (bias: {cfg.get('bias')!r}; use bias: none)")
    if cfg.get("lora_bias"):
        bad.append("lora_bias: true (a bias on lora_B)")
    if cfg.get("modules_to_save"):
        bad.append(f"modules_to_save {cfg['modules_to_save']} (fully trained copies of base modules)")
    if cfg.get("trainable_token_indices"):
        bad.append("trainable_token_indices (trained embedding rows)")
    if cfg.get("target_parameters"):
        bad.append(f"target_parameters {cfg['target_parameters']} (LoRA on raw parameters)")
    if cfg.get("layer_replication"):
        bad.append("layer_replication (a base with duplicated layers)")
    if cfg.get("alora_invocation_tokens"):
        bad.append("aLoRA (alora_invocation_tokens)")
    if cfg.get("use_qalora"):
        bad.append("QA-LoRA (use_qalora: true)")
    for k in ("velora_config", "monteclora_config"):
        if cfg.get(k):
            bad.append(f"{k} (a LoRA variant with a different forward pass)")
    if cfg.get("fan_in_fan_out"):
        bad.append("fan_in_fan_out (Conv1D bases)")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        bad.append(f"init_lora_weights {init!r} (needs the base weights it rewrote; save with "
                   "path_initial_model_for_weight_conversion to get a plain LoRA)")
    return bad


@functools.lru_cache(maxsize=64)
def _fingerprint_cached(path: str, stamp: tuple) -> str | None:
    from .base_model import fingerprint

    p = Path(path)
    for f in p.glob("*.safetensors"):
        with open(f, "rb") as fh:
            if int.from_bytes(fh.read(8), "little") > 100 << 20:  # not a sane safetensors header
                return None
    try:
        return fingerprint(p)
    except Exception:
        return None


def local_base_fingerprint(name_or_path: str | None) -> str | None:
    """The fingerprint of the base an adapter names, when that is an absolute local checkpoint path."""
    if not name_or_path or not os.path.isabs(name_or_path):
        return None
    p = Path(name_or_path)
    try:
        if not (p / "config.json").is_file() or not any(p.glob("*.safetensors")):
            return None
        stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(p.glob("*.safetensors")))
        return _fingerprint_cached(str(p.resolve()), ((p / "config.json").stat().st_mtime_ns, stamp))
    except (OSError, ValueError):
        return None


def _comparable(fp: str | None) -> bool:
    return isinstance(fp, str) and fp.startswith("sha256:")


def validate_adapter_dir(path, spec: BaseModelSpec | None, *, check_values: bool = True,
                         shown: str | None = None) -> AdapterManifest:
    """Checks a PEFT LoRA directory (against `spec` when given); returns what it learned, or InvalidAdapter.

    `check_values` also reads every tensor to refuse NaN / infinite weights (in the serving dtype).
    Errors name the directory as `shown` (default: `path`): the store passes the path its client
    gave, never the copy it validates under its own root.
    """
    p = Path(path)
    where = f"adapter directory {shown_path(path if shown is None else shown)!r}"
    if not p.is_dir():
        raise InvalidAdapter(f"{where} does not exist or is not a directory")
    files = sorted(f for f in p.iterdir() if f.is_file())
    pickles = [f.name for f in files if f.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise InvalidAdapter(f"{where} contains pickle file(s) {pickles}; only safetensors weights are accepted "
                             "(re-save with safe_serialization=True)")
    cfg_path, w_path = p / CONFIG_FILE, p / WEIGHTS_FILE
    for need in (cfg_path, w_path):
        if not need.is_file():
            raise InvalidAdapter(f"{where} is missing {need.name} (a PEFT adapter needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    cfg = read_config(cfg_path, where)
    bad = _unsupported_features(cfg)
    if bad:
        raise InvalidAdapter(f"{where}: unsupported PEFT feature(s): {'; '.join(bad)}")
    r = _positive_int(cfg.get("r", 8), "r", where)
    alpha = finite_number(cfg.get("lora_alpha", 8))
    if alpha is None:
        raise InvalidAdapter(f"{where}: {CONFIG_FILE} lora_alpha must be a finite number, got "
                             f"{str(cfg.get('lora_alpha'))[:40]}", param="lora_alpha")
    try:
        rank_pattern = compile_patterns(cfg.get("rank_pattern"), "rank_pattern", rank_value)
        alpha_pattern = compile_patterns(cfg.get("alpha_pattern"), "alpha_pattern", alpha_value)
    except InvalidAdapter as e:
        raise InvalidAdapter(f"{where}: {e}", param=getattr(e, "param", None)) from None
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise InvalidAdapter(f"{where}: {CONFIG_FILE} use_rslora must be true or false, got {str(rslora)[:40]}",
                             param="use_rslora")
    base_name = cfg.get("base_model_name_or_path")
    if base_name is not None and (not isinstance(base_name, str) or len(base_name) > 4096 or "\0" in base_name):
        raise InvalidAdapter(f"{where}: {CONFIG_FILE} base_model_name_or_path must be a string of at most 4096 "
                             "characters", param="base_model_name_or_path")
    max_scale = _scale_limit(spec)

    meta = _tensor_meta(w_path, where)
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, (dtype, shape) in meta.items():
        m = _KEY.match(key)
        if m is None:
            raise InvalidAdapter(f"{where}: unexpected tensor {key!r} in {WEIGHTS_FILE} "
                                 "(only lora_A / lora_B weights of linear modules are supported)")
        if dtype not in FLOAT_DTYPES:
            raise InvalidAdapter(f"{where}: tensor {key!r} has dtype {dtype}; expected one of {list(FLOAT_DTYPES)}")
        ab = pairs.setdefault(m["module"], {})
        if m["ab"] in ab:
            raise InvalidAdapter(f"{where}: module {m['module']} has more than one lora_{m['ab']} weight (several adapters in one file?)")
        ab[m["ab"]] = shape
    if not pairs:
        raise InvalidAdapter(f"{where}: {WEIGHTS_FILE} holds no LoRA weights")

    ranks: dict[str, int] = {}
    scales: dict[str, float] = {}
    in_out: dict[str, list[int]] = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise InvalidAdapter(f"{where}: module {module} has lora_{'A' if 'A' in ab else 'B'} but no lora_{'B' if 'A' in ab else 'A'} weight")
        a, b = ab["A"], ab["B"]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise InvalidAdapter(f"{where}: module {module}: lora_A {list(a)} and lora_B {list(b)} are not "
                                 "[r, in] and [out, r] with the same r")
        rank = a[0]
        if rank < 1:
            raise InvalidAdapter(f"{where}: module {module} has rank {rank}; expected at least 1")
        want_r = int(pattern_value(rank_pattern, module, r))
        if rank != want_r:
            raise InvalidAdapter(f"{where}: module {module}: weights have rank {rank} but {CONFIG_FILE} says r={want_r}")
        if spec is not None:
            if module not in spec.module_shapes:
                raise InvalidAdapter(f"{where}: adapter targets module {module!r}, which the base model {spec.model_id!r} "
                                     "does not have (or which is not a linear layer that can carry LoRA)")
            fin, fout = spec.module_shapes[module]
            if (a[1], b[0]) != (fin, fout):
                raise InvalidAdapter(
                    f"{where}: module {module}: adapter expects in_features={a[1]}, out_features={b[0]} "
                    f"(lora_A {list(a)}, lora_B {list(b)}) but base model {spec.model_id!r} has in_features={fin}, "
                    f"out_features={fout} (expected lora_A [{rank}, {fin}], lora_B [{fout}, {rank}]); "
                    "was it trained for another base model?")
            if rank > spec.max_rank:
                raise InvalidAdapter(f"{where}: module {module} has rank {rank}, above the maximum LoRA rank {spec.max_rank}")
        m_alpha = float(pattern_value(alpha_pattern, module, alpha))
        scale = m_alpha / (math.sqrt(rank) if rslora else rank)
        if not math.isfinite(scale) or abs(scale) > max_scale:
            how = "sqrt(r)" if rslora else "r"
            raise InvalidAdapter(f"{where}: module {module}: scale lora_alpha / {how} = {scale:g} is not finite in "
                                 f"the serving dtype (|scale| must be at most {max_scale:g})", param="lora_alpha")
        ranks[module] = rank
        scales[module] = scale
        in_out[module] = [a[1], b[0]]

    _check_targets(cfg, sorted(pairs), spec, where)
    extra: dict = {"module_in_out": in_out}
    kind = cfg.get("loraplex_kind", "lora")
    head = p / SCORE_HEAD_FILE
    if not isinstance(kind, str) or kind not in ("lora", REWARD_KIND):
        raise InvalidAdapter(f"{where}: unknown loraplex_kind {str(kind)[:40]!r}; expected 'lora' or 'reward'")
    if kind == REWARD_KIND and not head.is_file():
        raise InvalidAdapter(f"{where}: loraplex_kind is 'reward' but {SCORE_HEAD_FILE} is missing")
    if head.is_file():
        kind = REWARD_KIND
        extra["score_hidden"] = _check_score_head(head, spec, where)

    if spec is not None:
        theirs = cfg.get("loraplex_base_fingerprint")
        src = f"{CONFIG_FILE} loraplex_base_fingerprint"
        if theirs is None:
            theirs = local_base_fingerprint(cfg.get("base_model_name_or_path"))
            src = f"base_model_name_or_path {cfg.get('base_model_name_or_path')!r}"
        if _comparable(theirs) and _comparable(spec.fingerprint) and theirs != spec.fingerprint:
            raise InvalidAdapter(f"{where}: base model mismatch: the adapter was made for {src} with fingerprint {theirs}, "
                                 f"but the base model {spec.model_id!r} has fingerprint {spec.fingerprint}")

    if check_values:
        dt = spec.torch_dtype if spec is not None else torch.float32
        _check_finite(w_path, where, dt)
        if head.is_file():
            _check_finite(head, where, dt)
    return AdapterManifest(r, alpha, rslora, ranks, scales, base_name, kind, extra)


def _check_targets(cfg: dict, modules: list[str], spec: BaseModelSpec | None, where: str) -> None:
    """`target_modules` as PEFT reads it: PEFT loads weights only for the modules it names (a tensor outside
    would be served here and ignored there) and refuses a name the base model lacks."""
    tm = cfg.get("target_modules")
    if tm is None or tm == "all-linear":
        return
    names = None
    if isinstance(tm, str):  # PEFT: re.fullmatch(target_modules, module)
        rx = compile_fullmatch("target_modules", tm)

        def covered(m: str) -> bool:
            return rx.match(m) is not None
    elif isinstance(tm, list) and 0 < len(tm) <= MAX_KEYS and all(isinstance(t, str) and t for t in tm):
        names = set(tm)  # PEFT: the module's name, or its path ending in ".<name>"

        def covered(m: str) -> bool:
            return m in names or any(m.endswith("." + t) for t in names)
    else:
        raise InvalidAdapter(f"{where}: {CONFIG_FILE} target_modules must be a non-empty list of module names or a "
                             "regular expression", param="target_modules")
    outside = [m for m in modules if not covered(m)]
    if outside:
        more = f" (and {len(outside) - 1} more)" if len(outside) > 1 else ""
        raise InvalidAdapter(f"{where}: {WEIGHTS_FILE} holds weights for module {outside[0]!r}{more}, which {CONFIG_FILE} "
                             f"target_modules does not name: PEFT would not load them", param="target_modules")
    if spec is not None and names is not None:
        absent = sorted(t for t in names if not any(k == t or k.endswith("." + t) for k in spec.module_shapes))
        if absent:
            raise InvalidAdapter(f"{where}: {CONFIG_FILE} target_modules names {absent[:5]}, which the base model "
                                 f"{spec.model_id!r} does not have as linear layers (PEFT would refuse the adapter)",
                                 param="target_modules")


def _check_score_head(head: Path, spec: BaseModelSpec | None, where: str) -> int:
    hs = _tensor_meta(head, where)
    unknown = sorted(set(hs) - {"weight", "bias"})
    if unknown:
        raise InvalidAdapter(f"{where}: {SCORE_HEAD_FILE} holds unexpected tensors {unknown}; expected 'weight' [1, hidden] and optional 'bias' [1]")
    if "weight" not in hs or len(hs["weight"][1]) != 2 or hs["weight"][1][0] != 1:
        got = list(hs["weight"][1]) if "weight" in hs else "nothing"
        raise InvalidAdapter(f"{where}: {SCORE_HEAD_FILE} must hold 'weight' of shape [1, hidden], got {got}")
    if "bias" in hs and tuple(hs["bias"][1]) != (1,):
        raise InvalidAdapter(f"{where}: {SCORE_HEAD_FILE} 'bias' must have shape [1], got {list(hs['bias'][1])}")
    for k, (dtype, _) in hs.items():
        if dtype not in FLOAT_DTYPES:
            raise InvalidAdapter(f"{where}: {SCORE_HEAD_FILE} tensor {k!r} has dtype {dtype}; expected a float dtype")
    hidden = hs["weight"][1][1]
    want = spec.model_hidden_size() if spec is not None else None
    if want is not None and hidden != want:
        raise InvalidAdapter(f"{where}: {SCORE_HEAD_FILE} 'weight' is [1, {hidden}] but the base model's hidden size is {want}")
    return hidden


def load_adapter_weights(path, manifest: AdapterManifest, dtype=torch.float32, device="cpu") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module path -> (A [r, in], B [out, r]), in the manifest's module order; InvalidAdapter if the
    file no longer matches the manifest it was validated into."""
    raw: dict[str, dict[str, torch.Tensor]] = {}
    w_path = Path(path) / WEIGHTS_FILE
    with safe_open(str(w_path), framework="pt", device="cpu") as f, one_intra_op_thread():
        for key in f.keys():
            m = _KEY.match(key)
            if m is not None:
                raw.setdefault(m["module"], {})[m["ab"]] = f.get_tensor(key)
    if set(raw) != set(manifest.module_ranks):
        raise InvalidAdapter(f"{w_path}: modules {sorted(set(raw) ^ set(manifest.module_ranks))} differ from the registered manifest")
    out = {}
    for mod, rank in manifest.module_ranks.items():
        a, b = raw[mod].get("A"), raw[mod].get("B")
        if a is None or b is None or a.shape[0] != rank or b.shape[1] != rank:
            raise InvalidAdapter(f"{w_path}: module {mod} no longer has rank-{rank} lora_A / lora_B weights")
        with one_intra_op_thread():
            out[mod] = (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
    return out


def load_score_head(path) -> dict[str, torch.Tensor] | None:
    """A reward adapter's score head: {"weight": [1, hidden], "bias": [1] (may be absent)}; None if there is none."""
    head = Path(path) / SCORE_HEAD_FILE
    if not head.is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(head))
