"""One typed model of the generation parameters, with every bound and default stated once.

Both front ends fill `GenerationParams`: the HTTP bodies of /v1/chat/completions
and /v1/completions are subclasses of it (they add the wire-only fields), and the
gRPC front end validates the set fields of a `SamplingParams` message with it
(`from_proto`). So a bound (`n` up to 64, `temperature` in [0, 2], a seed every
choice's generator accepts...) and a default (temperature 1, top_p 1, 16 new
tokens for text prompts) exist once, and a request that one protocol refuses is
refused by the other with the same field named. `sampling()` turns the checked
fields into the engine's `SamplingParams` for choice i.

The fields that shape the answer (`response_format`, `logit_bias`, vLLM's
`guided_*` / `structured_outputs`) come from `structured_fields.AnswerFields`,
which turns them into one compiled grammar.

Nothing an engine step consumes is left unbounded: the engine thread must never
meet a value it cannot use (a seed `torch.Generator.manual_seed` rejects, a NaN
temperature), because such a value would fail the whole step, not one request.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .errors import pydantic_error
from ..engine.request import SamplingParams
from .structured_fields import AnswerFields

MAX_N = 64  # choices of one request
MAX_PROMPTS = 64  # prompts of one /v1/completions request
MAX_MESSAGES = 4096  # messages of one chat prompt
MAX_STOP = 16  # stop sequences
MAX_STOP_CHARS = 1024  # characters of one stop sequence
MAX_TOP_LOGPROBS = 20  # alternatives per token
MAX_TOKENS = 2**31 - 1  # a uint32 / int32 on the wire; the context length is the real limit, checked by the engine
MAX_TOP_K = 2**31 - 1  # larger than any vocabulary; the sampler clamps to the vocabulary
MAX_NAME_CHARS = 512  # a model name (`name@version`)
MAX_STICKY_KEY_CHARS = 512  # the `user` field, a session header or field
# A choice's generator is seeded with seed + i. int64, what gRPC carries and torch.Generator.manual_seed accepts
# (its range is [-2**63, 2**64 - 1]); `seed + n - 1` must stay inside it too.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (text and token-id prompts)
ChatRole = Literal["system", "developer", "user", "assistant", "tool"]
CHAT_ROLES = get_args(ChatRole)


def valid_text(v: str) -> str:
    """A str that can be encoded: JSON admits lone surrogates (`"\\ud800"`), tokenizers and encoders do not."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it holds a lone surrogate)") from None
    return v


Finite = dict(allow_inf_nan=False)
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]


class GenerationParams(AnswerFields):
    """The sampling fields of a generation request, as both front ends take them."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)  # None: the front end's default for the prompt kind
    temperature: float = Field(1.0, ge=0.0, le=2.0, **Finite)
    top_p: float = Field(1.0, gt=0.0, le=1.0, **Finite)
    top_k: int = Field(0, ge=-1, le=MAX_TOP_K)  # 0 and -1: off
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, **Finite)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, **Finite)
    logprobs: TopLogprobs | None = None  # None: no logprobs; k: each token's logprob and its k best alternatives
    ignore_eos: bool = False
    user: str | None = Field(None, max_length=MAX_STICKY_KEY_CHARS)  # the sticky-routing key

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        # OpenAI clients send `"temperature": null` for "not set": the default stated above, not a type error
        if isinstance(data, dict):
            return {
                k: v
                for k, v in data.items()
                if not (v is None and k in cls.model_fields and cls.model_fields[k].default is not None)
            }
        return data

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("stop", "user")
    @classmethod
    def _text(cls, v):
        if isinstance(v, list):
            for s in v:
                valid_text(s)
        elif isinstance(v, str):
            valid_text(v)
        return v

    @field_validator("seed")
    @classmethod
    def _seeds_in_range(cls, v, info: ValidationInfo):  # `n` is declared, so validated, before `seed`
        if v is not None and v + info.data.get("n", 1) - 1 > SEED_MAX:
            raise ValueError(f"seed + n - 1 must be at most {SEED_MAX} (choice i of n uses seed + i)")
        return v

    def logprob_count(self) -> int | None:
        """Alternatives per token to report, None for no logprobs (the chat body spells this differently)."""
        return self.logprobs

    def sampling(self, max_tokens: int, choice: int = 0, **extra) -> SamplingParams:
        """The engine's parameters for choice `choice` (seed + choice) with `max_tokens` new tokens; `extra`
        sets (or overrides, e.g. `stop`) engine fields the front end derived."""
        return SamplingParams(**{
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k if self.top_k > 0 else 0,
            "seed": None if self.seed is None else self.seed + choice,
            "stop": list(self.stop),
            "logprobs": self.logprob_count(),
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "ignore_eos": self.ignore_eos,
            **extra,
        })

    @classmethod
    def from_proto(cls, sp) -> "GenerationParams":
        """The set fields of a gRPC `SamplingParams` message, checked as an HTTP body is (errors: sampling.<field>)."""
        data = {f.name: (list(v) if f.name == "stop" else v) for f, v in sp.ListFields()}
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise pydantic_error(e, prefix="sampling.") from e
