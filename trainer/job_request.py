"""What a client may ask of a fine-tuning job, and nothing more.

The OpenAI body of `POST /v1/fine_tuning/jobs` (model, files, suffix, seed, method, hyperparameters,
metadata) and our `loraplex` extension become one typed, bounded `JobRequest`; the JobManager then
builds the JobConfig itself. The split follows who runs what on whose machine:

- The operator owns everything that names a place or a program on the server: the method actually run
  (only `method.type` comes from the client, mapped to one of ours), datasets (a client names uploaded
  file ids), the base model, output paths, the device, process counts, the adapter's name (a job always
  creates a new `ft-...` name) and Python reward functions (registered with
  `loraplex serve --reward-function NAME=module:function`; a request can only name one by NAME).
- The client owns the training knobs in `API_KNOBS` / `ADAPTER_KNOBS`, an allow-list. Each knob takes
  its type and lower bound from JobConfig (so a YAML file and a request mean the same by a value) and
  gets here the upper bound a tenant may not exceed: a bound is what keeps one request from holding the
  trainer for a year or its memory for a terabyte.

Anything else is refused before any work, naming the key (`loraplex.method`), with no file touched:
an override cannot probe which server paths exist because no override is a path. Numbers are strict
(no `1e23` for an integer, no NaN) and every string must be encodable as UTF-8, so nothing stored can
later fail to be written back to a client.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from annotated_types import Le
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from loraplex.adapters_store.tenancy import QUALIFIED_NAME_PATTERN

from .config import DEFAULT_TARGETS, AdapterSpec, JobConfig

MAX_EPOCHS = 50  # OpenAI's bound on n_epochs
MAX_BATCH_SIZE = 256
MAX_LR_MULTIPLIER = 100.0
MAX_BETA = 10.0
MAX_SEED = 2**31 - 1  # OpenAI's seed range (0 ..= 2147483647)
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512  # OpenAI's metadata limits
MAX_SUFFIX = 40

# knob -> the largest value a client may ask for; None where JobConfig's type already bounds it (bools, literals)
API_KNOBS: dict[str, float | None] = {
    "sequence_len": 32768,
    "packing": None,
    "max_steps": 100_000,
    "learning_rate": 1.0,
    "lr_scheduler": None,
    "warmup_steps": 100_000,
    "weight_decay": 10.0,
    "max_grad_norm": 1e4,
    "gradient_accumulation_steps": 1024,
    "val_set_size": None,
    "eval_steps": 100_000,
    "save_steps": 100_000,
    "logging_steps": 100_000,
    "train_on_prompt": None,
    "gradient_checkpointing": None,
    "quantize": None,
    "loss_type": None,  # dpo
    # the reinforcement method (our GRPO); JobConfig refuses each on a method that does not use it, naming it
    "kl_coef": 100.0,
    "cliprange": 10.0,
    "ppo_epochs": 16,
    "mini_batch_size": 1024,
    "num_generations": 64,
    "response_length": 4096,
    "temperature": 10.0,
}
ADAPTER_KNOBS: dict[str, float | None] = {"r": 256, "alpha": 4096.0, "dropout": None, "use_rslora": None}
# JobConfig keys a client may not set, and what to use instead: named in the refusal so it is not read as a typo
OPERATOR_ONLY = "it belongs to the operator's job files (`loraplex train`)"
INSTEAD = {
    "method": "use 'method.type'",
    "datasets": "name uploaded files with 'training_file'",
    "validation_datasets": "name an uploaded file with 'validation_file'",
    "base_model": "use 'model'",
    "seed": "use the top-level 'seed'",
    "epochs": "use 'hyperparameters.n_epochs'",
    "micro_batch_size": "use 'hyperparameters.batch_size'",
    "beta": "use the dpo method's 'hyperparameters.beta'",
    "canary": "a job registers a new adapter name; split traffic with PUT /v1/routes/{name}",
    "reward": "Python reward functions are registered by the operator "
    "(`loraplex serve --reward-function NAME=module:function`)",
}


class _Api(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _knob_model(name: str, source: type[BaseModel], knobs: dict[str, float | None], **extra) -> type[BaseModel]:
    """A model of `knobs`: each field is `source`'s (type and lower bound) with the client's upper bound added."""
    fields = {}
    for k, most in knobs.items():
        f = source.model_fields[k]
        bounds = [*f.metadata, *([Le(most)] if most is not None else [])]
        fields[k] = (Annotated[(f.annotation, *bounds)] if bounds else f.annotation, None)
    return create_model(name, __base__=_Api, **fields, **extra)


Auto = Literal["auto"]
# a stored adapter, `name` or `name@3`, `tenant:name` once the tenancy layer has resolved a tenant's name
AdapterRef = Annotated[str, Field(pattern=rf"{QUALIFIED_NAME_PATTERN.removesuffix('$')}(@[0-9]{{1,9}})?$")]
TargetModules = Union[
    Literal["all-linear"],
    Annotated[list[Literal[tuple(DEFAULT_TARGETS)]], Field(min_length=1, max_length=len(DEFAULT_TARGETS))],
]
AdapterKnobs = _knob_model(
    "AdapterKnobs",
    AdapterSpec,
    ADAPTER_KNOBS,
    target_modules=(TargetModules | None, None),
    init_from=(AdapterRef | None, None),
)
LoraplexKnobs = _knob_model("LoraplexKnobs", JobConfig, API_KNOBS, adapter=(AdapterKnobs | None, None))


class Hyperparameters(_Api):
    n_epochs: Union[Auto, Annotated[int, Field(ge=1, le=MAX_EPOCHS)]] = "auto"
    batch_size: Union[Auto, Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)]] = "auto"
    learning_rate_multiplier: Union[Auto, Annotated[float, Field(gt=0, le=MAX_LR_MULTIPLIER)]] = "auto"


class DpoHyperparameters(Hyperparameters):
    beta: Union[Auto, Annotated[float, Field(gt=0, le=MAX_BETA)]] = "auto"


class Supervised(_Api):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Dpo(_Api):
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class Reinforcement(_Api):
    grader: dict  # checked by graders.check_grader (a python grader names an operator-registered function only)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


METHODS = {"supervised": "sft", "dpo": "dpo", "reinforcement": "grpo"}  # OpenAI method type -> the method it runs


class Method(_Api):
    type: Literal[tuple(METHODS)]
    supervised: Supervised | None = None
    dpo: Dpo | None = None
    reinforcement: Reinforcement | None = None

    def hyperparameters(self) -> dict:
        block = getattr(self, self.type)
        return {} if block is None else block.hyperparameters.model_dump(exclude_unset=True)


FileId = Annotated[str, Field(min_length=1, max_length=64)]


class JobRequest(_Api):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    training_file: FileId
    validation_file: FileId | None = None
    suffix: Annotated[str, Field(min_length=1, max_length=MAX_SUFFIX, pattern=r"^[A-Za-z0-9._-]+$")] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None  # the legacy top-level form; `method` wins where both name a value
    metadata: (
        Annotated[
            dict[
                Annotated[str, Field(max_length=MAX_METADATA_KEY)],
                Annotated[str, Field(max_length=MAX_METADATA_VALUE)],
            ],
            Field(max_length=MAX_METADATA_PAIRS),
        ]
        | None
    ) = None
    integrations: Annotated[list, Field(max_length=0)] | None = None  # none supported: refused rather than ignored
    loraplex: LoraplexKnobs | None = None

    def method_type(self) -> str:
        return self.method.type if self.method else "supervised"

    def hyperparameter_values(self) -> dict:
        """OpenAI hyperparameters as asked ("auto" where not given): the top-level form under the method's."""
        hp = self.hyperparameters.model_dump(exclude_unset=True) if self.hyperparameters else {}
        return {**hp, **(self.method.hyperparameters() if self.method else {})}

    def overrides(self) -> dict:
        """The `loraplex` knobs the client set (JobConfig keys; `adapter` a nested dict)."""
        return self.loraplex.model_dump(exclude_unset=True) if self.loraplex else {}


class RequestRefused(ValueError):
    """A job body refused before any work; `param` is the offending field's dotted path."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


def _loc(parts) -> str:
    """A pydantic error location as the body's dotted path, without the union-member tags pydantic adds."""
    names = (JobRequest, Method, Supervised, Dpo, DpoHyperparameters, Reinforcement, LoraplexKnobs, AdapterKnobs)
    known = {f for m in names for f in m.model_fields}
    return ".".join(str(p) for p in parts if isinstance(p, int) or p in known)[:200]


def lone_surrogate(obj) -> str | None:
    """The dotted path of the first string (or key) in decoded JSON `obj` that is not valid Unicode (a lone surrogate,
    which `json.loads` accepts from `"\\ud800"` but nothing can write back as UTF-8), else None. Iterative: any
    depth."""
    todo = [("", obj)]
    while todo:
        path, x = todo.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif isinstance(x, dict):
            for k, v in x.items():
                todo.append((path, k))
                todo.append((f"{path}.{k}" if path else str(k), v))
        elif isinstance(x, list):
            todo.extend((f"{path}.{i}", v) for i, v in enumerate(x))
    return None


def _precheck(body: dict) -> None:
    """Refusals the model alone would word vaguely: JobConfig keys a client may not set (it says only 'unknown key'),
    a method block that does not match `method.type`."""
    method = body.get("method")
    if isinstance(method, dict) and method.get("type") in METHODS:
        for other in METHODS:
            if other != method["type"] and method.get(other) is not None:
                raise RequestRefused(f"'method.{other}' given with method type {method['type']!r}", f"method.{other}")
    if "canary" in body:
        raise RequestRefused(
            "'canary' cannot be used here: a fine-tuning job registers a new adapter name, which takes all of its "
            "traffic; split traffic between versions with PUT /v1/routes/{name}",
            "canary",
        )
    if body.get("integrations"):
        raise RequestRefused(
            "'integrations' are not supported by this server (metrics are in the job's events and result file)",
            "integrations",
        )
    knobs = body.get("loraplex")
    if not isinstance(knobs, dict):
        return
    for k in knobs:
        if k not in LoraplexKnobs.model_fields and k in JobConfig.model_fields:
            raise RequestRefused(
                f"'loraplex.{k}' cannot be set through the fine-tuning API: {INSTEAD.get(k, OPERATOR_ONLY)}",
                f"loraplex.{k}",
            )
    adapter = knobs.get("adapter")
    if isinstance(adapter, dict):
        for k in adapter:
            if k == "name":
                raise RequestRefused(
                    "'loraplex.adapter.name' cannot be set through the fine-tuning API: a job always creates a new "
                    "adapter name (`ft-<suffix>-...`, see `suffix`)",
                    "loraplex.adapter.name",
                )


def parse_job_request(body) -> JobRequest:
    """The request body as a JobRequest, or RequestRefused naming the first offending field."""
    if not isinstance(body, dict):
        raise RequestRefused("the request body must be a JSON object", None)
    bad = lone_surrogate(body)
    if bad is not None:
        raise RequestRefused(f"field '{bad[:200]}' holds a lone surrogate (not valid Unicode)", bad[:200] or None)
    _precheck(body)
    try:
        return JobRequest.model_validate(body)
    except ValidationError as e:
        errs = e.errors()
        first = errs[0]
        if first.get("type") == "extra_forbidden":
            *where, key = first["loc"]
            where = _loc(where)
            loc = f"{where}.{key}" if where else str(key)
            allowed = {"loraplex": LoraplexKnobs, "loraplex.adapter": AdapterKnobs}.get(where)
            hint = f" (allowed: {', '.join(allowed.model_fields)})" if allowed else ""
            raise RequestRefused(f"unknown field '{loc[:200]}'{hint}", loc[:200]) from None
        loc = _loc(first.get("loc", ()))
        # a union ("auto" or a bounded number) reports one error per member: say what the number must be
        msgs = [
            str(x.get("msg", "invalid value")).removeprefix("Value error, ")
            for x in errs
            if _loc(x.get("loc", ())) == loc or _loc(x.get("loc", ())).startswith(loc + ".")
        ]
        shown = [m for m in msgs if m != "Input should be 'auto'"]
        msg = "; ".join(dict.fromkeys(shown or msgs)) + (" (or 'auto')" if shown != msgs else "")
        raise RequestRefused(f"invalid field '{loc}': {msg}" if loc else msg, loc or None) from None
