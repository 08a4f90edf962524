"""Training job configuration: the YAML file (Axolotl-style) and the OpenAI fine-tuning API both become a JobConfig.

Unknown keys and wrong types are refused before any work starts, with the
offending key named (`JobConfigError`).
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Literal, Union

import yaml
from loraplex.adapters_store.errors import InvalidArgument
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loraplex.adapters_store.tenancy import QUALIFIED_NAME_PATTERN

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# On CPUs with AVX512-BF16, importing bitsandbytes (peft does, for every job) tries an optional kernel from the
# Hugging Face Hub and warns when it is absent; bitsandbytes' built-in CPU kernels are used then, so it is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

BNB_MIN_VERSION = "0.46.1"  # transformers' minimum; 4-bit training on CPU tested with 0.46.1, 0.48.2 and 0.50.2


class JobConfigError(InvalidArgument, ValueError):
    pass


@functools.lru_cache(maxsize=None)
def bnb_4bit_problem(device: str) -> str | None:
    """Why bitsandbytes cannot train nf4 layers on `device`, or None when it can (tried: a tiny forward and backward)."""
    import importlib.metadata

    import torch
    from packaging.version import Version

    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return f"needs the bitsandbytes package: pip install 'loraplex[qlora]' (bitsandbytes>={BNB_MIN_VERSION})"
    if Version(version) < Version(BNB_MIN_VERSION):
        return f"needs bitsandbytes>={BNB_MIN_VERSION} (installed: {version})"
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import quantize_4bit

        w = torch.linspace(-1, 1, 64 * 64, device=device).reshape(64, 64)
        x = torch.linspace(-1, 1, 2 * 64, device=device).reshape(2, 64).requires_grad_()
        q, state = quantize_4bit(w, quant_type="nf4")
        bnb.matmul_4bit(x, q.t(), quant_state=state).sum().backward()
    except Exception as e:  # noqa: BLE001 - any failure means "cannot", and the reason is reported
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return f"cannot run on device '{device}' with bitsandbytes {version}: {type(e).__name__}: {first}"
    return None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdapterSpec(_Strict):
    name: str = Field(pattern=QUALIFIED_NAME_PATTERN)  # `tenant:name` for a tenant's job (adapters_store/tenancy.py)
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    use_rslora: bool = False
    init_from: str | None = None  # an adapter in the store ("name" or "name@3") to continue training from


class DatasetSpec(_Strict):
    """One dataset: a local JSONL / JSON / CSV / Parquet file or a hub dataset id (`org/name`), loaded with `datasets`.

    Axolotl-style field mapping for chat data: `field_messages` names the column holding the conversation,
    `message_property_mappings` maps our `role` / `content` to the record's keys (e.g. `{role: from, content: value}`),
    `roles_to_train` lists the roles whose turns carry the loss (default: assistant)."""
    path: str
    format: Literal["auto", "text", "chat", "prompt_completion", "alpaca", "sharegpt", "preference"] = "auto"
    name: str | None = None  # hub dataset configuration
    split: str = "train"
    revision: str | None = None
    field_messages: str | None = None
    message_property_mappings: dict[str, str] | None = None
    roles_to_train: list[str] | None = None

    @field_validator("message_property_mappings")
    @classmethod
    def _mappings(cls, v):
        if v is not None and not set(v) <= {"role", "content"}:
            raise ValueError(f"keys must be 'role' and/or 'content', got {sorted(v)}")
        return v


# Knobs that belong to some methods only: which methods use each, and its default there. Each is None unless the
# job's method uses it, so a knob of another method (kl_coef on an SFT job) is refused, naming it, instead of ignored.
METHOD_KNOBS: dict[str, tuple[tuple[str, ...], object]] = {
    "packing": (("sft",), True),
    "train_on_prompt": (("sft",), False),
    "examples_per_step": (("sft", "dpo", "reward"), None),
    "beta": (("dpo",), 0.1),
    "loss_type": (("dpo",), "sigmoid"),
    "reward": (("ppo", "grpo"), None),
    "kl_coef": (("ppo", "grpo"), 0.05),
    "cliprange": (("ppo", "grpo"), 0.2),
    "cliprange_value": (("ppo",), 0.2),
    "vf_coef": (("ppo",), 0.1),
    "ppo_epochs": (("ppo", "grpo"), 2),
    "mini_batch_size": (("ppo", "grpo"), 8),
    "num_rollouts": (("ppo", "grpo"), 16),
    "num_generations": (("grpo",), 4),
    "response_length": (("ppo", "grpo"), 32),
    "temperature": (("ppo", "grpo"), 1.0),
    "gamma": (("ppo",), 1.0),
    "lam": (("ppo",), 0.95),
}


class JobConfig(_Strict):
    base_model: str = "default"
    adapter: AdapterSpec
    method: Literal["sft", "dpo", "reward", "ppo", "grpo"] = "sft"
    datasets: list[DatasetSpec] = Field(min_length=1)
    validation_datasets: list[DatasetSpec] = Field(default_factory=list)
    sequence_len: int = Field(1024, ge=8)
    epochs: float = Field(1, gt=0)
    max_steps: int | None = Field(None, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    # Axolotl meaning: an optimizer step is micro_batch_size rows x gradient_accumulation_steps (a packed row holds
    # several examples). examples_per_step (the OpenAI API's batch_size) instead fixes the examples of every step,
    # packed or not; micro_batch_size then only bounds the rows of one forward pass.
    micro_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    examples_per_step: int | None = Field(None, ge=1)
    val_set_size: float = Field(0.0, ge=0, lt=1)
    eval_steps: int | None = Field(None, ge=1)
    save_steps: int = Field(50, ge=1)
    logging_steps: int = Field(1, ge=1)
    seed: int = 42
    quantize: Literal["4bit"] | None = None
    gradient_checkpointing: bool = True  # recompute activations in backward: far less memory for ~25% more compute
    output_dir: str | None = None
    canary: int | None = Field(None, ge=1, le=99)  # percent of traffic for the new version
    num_processes: int = Field(1, ge=1)  # in all, over every machine
    distributed: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    # several machines: each runs `loraplex train JOB --machine-rank R` with the same file; machine 0 registers
    num_machines: int = Field(1, ge=1)
    machine_rank: int = Field(0, ge=0)
    main_process_ip: str | None = None  # machine 0's address, reachable from the others
    main_process_port: int | None = Field(None, ge=1, le=65535)
    device: str | None = None
    # method-specific knobs (METHOD_KNOBS): None unless the method uses them
    packing: bool | None = None
    train_on_prompt: bool | None = None
    beta: float | None = Field(None, gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge"] | None = None
    # "module:function", {"regex": ...}, {"contains": ...}, {"exact": ...}, {"adapter": "name[@v]"}, {"grader": {...}}
    reward: Union[str, dict, None] = None
    kl_coef: float | None = Field(None, ge=0)
    cliprange: float | None = Field(None, gt=0)
    cliprange_value: float | None = Field(None, gt=0)
    vf_coef: float | None = Field(None, ge=0)
    ppo_epochs: int | None = Field(None, ge=1)
    mini_batch_size: int | None = Field(None, ge=1)
    num_rollouts: int | None = Field(None, ge=1)  # prompts per step
    num_generations: int | None = Field(None, ge=2)  # GRPO group size
    response_length: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, gt=0)
    gamma: float | None = Field(None, ge=0, le=1)
    lam: float | None = Field(None, ge=0, le=1)

    @field_validator("datasets", "validation_datasets", mode="before")
    @classmethod
    def _paths(cls, v):
        if isinstance(v, list):
            return [{"path": x} if isinstance(x, str) else x for x in v]
        return v

    @model_validator(mode="after")
    def _check(self):
        for key, (methods, default) in METHOD_KNOBS.items():
            if self.method in methods:
                if getattr(self, key) is None:
                    setattr(self, key, default)
            elif getattr(self, key) is not None:
                hint = " (its examples per step are num_rollouts)" if key == "examples_per_step" else ""
                raise ValueError(f"'{key}' is a setting of method {'/'.join(methods)}; method: {self.method} does "
                                 f"not use it{hint}: remove it")
        if self.num_machines > 1:
            if self.num_processes % self.num_machines:
                raise ValueError(f"num_processes: {self.num_processes} (in all) must be a multiple of num_machines: "
                                 f"{self.num_machines} (each machine runs as many)")
            if self.main_process_ip is None or self.main_process_port is None:
                raise ValueError("num_machines > 1 needs main_process_ip and main_process_port: machine 0's address and a "
                                 "free port the other machines can reach")
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"machine_rank: {self.machine_rank} must be below num_machines: {self.num_machines}")
        if self.quantize == "4bit":
            if self.method in ("ppo", "grpo"):
                raise ValueError(f"quantize: 4bit is not supported for method: {self.method} (its rollout engine reads the base "
                                 "weights unquantized); use it with sft, dpo or reward")
            problem = bnb_4bit_problem(self.resolved_device())
            if problem:
                raise ValueError(f"quantize: 4bit {problem}")
        return self

    def resolved_device(self) -> str:
        """`device`, else cuda where this machine has it, else cpu."""
        import torch

        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def target_modules(self) -> list[str] | str:
        return "all-linear" if self.adapter.target_modules == "all-linear" else list(self.adapter.target_modules)


DATA_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")


def is_hub_dataset(path: str) -> bool:
    """`org/name[@revision]` naming a hub dataset: not a local path, and not spelled like a data file."""
    from loraplex.adapters_store.hub import is_hub_id

    return is_hub_id(path) and Path(path).suffix.lower() not in DATA_FILE_SUFFIXES


def _format_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        kind = err.get("type", "")
        if kind == "extra_forbidden":
            parts.append(f"unknown key '{loc}'")
        elif not loc:  # a check across fields names its keys in its own message
            parts.append(str(err.get("msg", "")).removeprefix("Value error, "))
        else:
            parts.append(f"'{loc}': {err.get('msg')}")
    return "; ".join(parts)


def parse_config(data: dict, base_dir: Path | None = None) -> JobConfig:
    if not isinstance(data, dict):
        raise JobConfigError("the job file must be a mapping of keys to values")
    try:
        cfg = JobConfig.model_validate(data)
    except ValidationError as e:
        raise JobConfigError(f"invalid job config: {_format_error(e)}") from None
    for d in list(cfg.datasets) + list(cfg.validation_datasets):
        p = Path(d.path).expanduser()
        if base_dir is not None and not p.is_absolute():  # relative to the working directory, else to the job file
            local = p.resolve() if p.exists() else (base_dir / p).resolve()
            if local.exists() or not is_hub_dataset(d.path):
                d.path = str(local)
        if not Path(d.path).is_file() and not is_hub_dataset(d.path):
            raise JobConfigError(f"dataset file not found: {d.path} (nor a hub dataset id org/name)")
    return cfg


def load_config(path, overrides: dict | None = None) -> JobConfig:
    """The job file at `path`, with top-level `overrides` (the command line's) over its keys."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise JobConfigError(f"job file not found: {p}") from None
    except yaml.YAMLError as e:
        raise JobConfigError(f"{p}: not valid YAML: {e}") from None
    if overrides and isinstance(data, dict):
        data = {**data, **overrides}
    return parse_config(data, p.parent)
