"""The request fields that shape an answer, as both front ends take them, and the one place they become a grammar.

`response_format` (OpenAI: `text`, `json_object`, `json_schema`), the vLLM
extensions (`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`
and their newer spelling `structured_outputs: {json, regex, choice, grammar}`),
`tools` / `tool_choice` / `parallel_tool_calls` and `logit_bias` are typed
here; the shared request-parameter model includes them, so HTTP and gRPC
check them once. `answer_grammar` turns a request's fields into at most one
grammar (two constraints on one answer are a 400 naming the second), and
`compile_answer` compiles it on the request thread so a grammar the library
refuses is a 400 before anything is queued.
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import BadRequest
from ..engine.structured import (ANY_JSON_OBJECT, GrammarCompiler, TokenConstraint, choice_grammar, json_schema_grammar,
                         lark_grammar, regex_grammar)
from .tools import ToolChoice, calls_or_json_grammar, forced_call_grammar, resolve_tool_choice

MAX_LOGIT_BIAS = 1024  # entries of one logit_bias map
MAX_TOOLS = 128  # OpenAI's limit on functions per request
MAX_CHOICES = 256  # strings of one choice list
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function and schema names


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class JsonSchemaSpec(_Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=lambda: dict(ANY_JSON_OBJECT), alias="schema")
    strict: bool | None = None  # we always enforce the schema; strict only says OpenAI would too


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @field_validator("json_schema")
    @classmethod
    def _only_for_json_schema(cls, v, info):
        if v is not None and info.data.get("type") != "json_schema":
            raise ValueError("'json_schema' is only for type 'json_schema'")
        return v


class FunctionSpec(_Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` object: one of these at a time."""

    json_: Union[dict[str, Any], str, None] = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1, max_length=MAX_CHOICES)
    grammar: str | None = None
    json_object: bool | None = None


class AnswerFields(BaseModel):
    """The fields that shape an answer, mixed into the shared request-parameter model."""

    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: Union[dict[str, Any], str, None] = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=MAX_CHOICES)
    guided_grammar: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return v
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
        for k, b in v.items():
            if not k.lstrip("-").isdigit():
                raise ValueError(f"keys are token ids; {k!r} is not an integer")
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"bias of token {k} must be between -100 and 100")
        return v

    def logit_bias_ids(self, vocab_size: int) -> dict[int, float] | None:
        """logit_bias keyed by token id; an id outside the vocabulary is a 400 naming logit_bias."""
        if not self.logit_bias:
            return None
        out = {}
        for k, b in self.logit_bias.items():
            t = int(k)
            if not 0 <= t < vocab_size:
                raise BadRequest(f"'logit_bias' names token {t}, outside the vocabulary (0..{vocab_size - 1})",
                                 param="logit_bias")
            out[t] = float(b)
        return out


class ToolFields(BaseModel):
    """Chat-only: the tools the model may call."""

    tools: list[ToolSpec] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None

    def tool_choice_spec(self) -> ToolChoice | None:
        tools = [t.model_dump(by_alias=True, exclude_none=True) for t in self.tools] if self.tools else None
        choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, NamedToolChoice) else self.tool_choice
        return resolve_tool_choice(tools, choice, self.parallel_tool_calls)


def _schema_of(value, param: str) -> dict:
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise BadRequest(f"'{param}' is not valid JSON: {e}", param=param) from e
    return value


def answer_grammar(body: AnswerFields, tools: ToolChoice | None = None) -> tuple[str, str] | None:
    """(llguidance grammar, the field it comes from) for a request, or None when the answer is free."""
    found: list[tuple[str, str, dict | None]] = []  # (grammar, field, JSON schema when it is one)

    def json_of(schema, param):
        schema = _schema_of(schema, param)
        found.append((json_schema_grammar(schema, param), param, schema))

    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        json_of(ANY_JSON_OBJECT, "response_format")
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None:
            raise BadRequest("'response_format.json_schema' is required for type 'json_schema'",
                             param="response_format.json_schema")
        json_of(rf.json_schema.schema_, "response_format.json_schema.schema")
    so = body.structured_outputs or StructuredOutputs()
    for param, value in (("guided_json", body.guided_json), ("structured_outputs.json", so.json_)):
        if value is not None:
            json_of(value, param)
    if so.json_object:
        json_of(ANY_JSON_OBJECT, "structured_outputs.json_object")
    for param, value, build in (
        ("guided_regex", body.guided_regex, regex_grammar), ("structured_outputs.regex", so.regex, regex_grammar),
        ("guided_choice", body.guided_choice, choice_grammar),
        ("structured_outputs.choice", so.choice, choice_grammar),
        ("guided_grammar", body.guided_grammar, lark_grammar),
        ("structured_outputs.grammar", so.grammar, lark_grammar),
    ):
        if value is not None:
            found.append((build(value), param, None))
    if tools is not None and tools.forced:
        if found:
            raise BadRequest(f"'{found[0][1]}' cannot be combined with tool_choice {tools.mode!r}: the answer is a "
                             "tool call", param=found[0][1])
        return forced_call_grammar(tools), "tool_choice"
    if len(found) > 1:
        raise BadRequest(f"'{found[1][1]}' and '{found[0][1]}' both constrain the answer; give one", param=found[1][1])
    if not found:
        return None
    grammar, param, schema = found[0]
    if tools is not None and tools.mode == "auto":  # the answer is the schema's JSON, or tool calls
        if schema is None:
            raise BadRequest(f"'{param}' cannot be combined with tools; use a JSON schema", param=param)
        return calls_or_json_grammar(tools, schema), param
    return grammar, param


def compile_answer(compiler: GrammarCompiler, body: AnswerFields,
                   tools: ToolChoice | None = None) -> TokenConstraint | None:
    """The request's compiled constraint (call on a worker thread: the first call builds the vocabulary view)."""
    g = answer_grammar(body, tools)
    return None if g is None else compiler.compile(*g)


class CalledFunction(_Strict):
    name: str
    arguments: str = "{}"


class MessageToolCall(_Strict):
    """An earlier assistant turn's call, as OpenAI clients send it back."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ToolMessageFields(BaseModel):
    """What a chat message adds for tool calling: an assistant's calls, a tool result's call id."""

    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    # what an assistant turn echoed back from an earlier answer may carry; not rendered into the prompt
    refusal: str | None = None
    annotations: list | None = None
    audio: Any = None
    function_call: Any = None


def grpc_answer(compiler: GrammarCompiler, request,
                vocab_size: int) -> tuple[TokenConstraint | None, dict[int, float] | None]:
    """A gRPC GenerateRequest's `output_format` and `logit_bias`, checked as HTTP's are (fields named as gRPC spells
    them) -> (compiled constraint, logit bias by token id)."""
    from pydantic import ValidationError

    kind = request.output_format.WhichOneof("kind") if request.HasField("output_format") else None
    so = None
    if kind is not None:
        v = getattr(request.output_format, kind)
        so = {"json_object": True} if kind == "json_object" else {"choice": list(v.values)} if kind == "choice" else \
            {"json" if kind == "json_schema" else kind: v}
    try:
        bias = {str(k): v for k, v in request.logit_bias.items()} or None
        fields = AnswerFields(structured_outputs=so, logit_bias=bias)
    except ValidationError as e:
        bad_bias = any(err["loc"][:1] == ("logit_bias",) for err in e.errors())
        where = "logit_bias" if bad_bias else f"output_format.{kind}"
        raise BadRequest(f"'{where}': {e.errors()[0]['msg']}", param=where) from e
    try:
        return compile_answer(compiler, fields), fields.logit_bias_ids(vocab_size)
    except BadRequest as e:
        where = "logit_bias" if e.param == "logit_bias" else f"output_format.{kind}"
        raise BadRequest(e.message.replace(f"'{e.param}'", f"'{where}'"), param=where) from e


# OpenAI request fields that mean nothing on a self-hosted server (accepted, no effect; the README's table says so)
NO_EFFECT = ("store", "metadata", "service_tier", "prompt_cache_key", "prompt_cache_retention", "safety_identifier")
# OpenAI request fields we cannot honour: a 400 naming the field when set
REFUSED = {
    "audio": "audio output is not supported",
    "functions": "the deprecated 'functions' are not supported; use 'tools'",
    "function_call": "the deprecated 'function_call' is not supported; use 'tool_choice'",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "the served models have no reasoning-effort setting",
    "verbosity": "the served models have no verbosity setting",
    "web_search_options": "web search is not available",
}


class PlatformFields(BaseModel):
    """OpenAI's platform fields, each accepted with no effect or refused by name (never silently dropped)."""

    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None
    modalities: list[str] | None = None
    audio: Any = None
    functions: Any = None
    function_call: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None

    def refuse_unsupported(self) -> None:
        for name, why in REFUSED.items():
            if getattr(self, name) is not None:
                raise BadRequest(f"'{name}': {why}", param=name)
        if self.modalities is not None and self.modalities != ["text"]:
            raise BadRequest("'modalities': only [\"text\"] is supported", param="modalities")
