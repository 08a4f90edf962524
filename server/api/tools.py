"""Tool calling: OpenAI `tools` rendered by the model's chat template, its output parsed back into `tool_calls`.

The model decides the format: the tools reach the prompt through transformers'
`apply_chat_template(tools=...)` (`engine/chat_format.py`, which the trainer
renders SFT records with too), so a model fine-tuned on its own template sees
exactly what it was trained on. The call format is detected from the
template (`chat_format.tool_format`); a template that drops `tools`, or
spells calls in a format not parsed here, is a 400 naming `tools`, never a
silent ignore. The formats:

    hermes       <tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>   (Qwen2.5/Qwen3, Hermes, ...)
    mistral      [TOOL_CALLS] [{"name": "f", "arguments": {...}}, ...]
    llama3_json  {"name": "f", "parameters": {...}}; {...}                    (Llama 3.1/3.2, the whole answer)

`tool_choice: "required"` and a named function are enforced, not hoped for:
the whole answer is constrained by a grammar (`structured.py`) whose calls
are, in the template's format, JSON objects with the function's name and
arguments matching its `parameters` schema. `"auto"` leaves the model free
and parses what it wrote; `"none"` renders no tools.
`parallel_tool_calls: false` allows one call.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from .errors import BadRequest
from ..engine.chat_format import HERMES, ToolFormat, template_messages, tool_format  # noqa: F401 (re-exported)
from ..engine.structured import JSON_OPTIONS, lark_grammar, lark_literal

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"  # the Hermes format's tags


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as OpenAI sends it

    def openai(self, index: int | None = None) -> dict:
        d = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            d["index"] = index
        return d


def check_tool_support(tokenizer) -> ToolFormat:
    """The template's tool-call format; a 400 naming `tools` when it has none loraplex parses."""
    return tool_format(tokenizer)


@dataclass
class ToolChoice:
    """What the request allows: which tools the prompt shows, and whether a call is forced."""

    tools: list[dict]  # OpenAI tool objects rendered into the prompt ([] for "none")
    mode: str  # "auto" | "none" | "required" | "named"
    name: str | None = None
    parallel: bool = True
    fmt: ToolFormat = field(default=HERMES)  # the model's call format (`check_tool_support`)

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")


def resolve_tool_choice(tools: list[dict] | None, tool_choice, parallel: bool | None) -> ToolChoice | None:
    """Checks `tools` / `tool_choice` / `parallel_tool_calls` together; None when the request has no tools."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise BadRequest("'tool_choice' is only allowed when 'tools' are given", param="tool_choice")
        if parallel is not None:
            raise BadRequest("'parallel_tool_calls' is only allowed when 'tools' are given",
                             param="parallel_tool_calls")
        return None
    names = [t["function"]["name"] for t in tools]
    for i, n in enumerate(names):
        if names.index(n) != i:
            raise BadRequest(f"'tools.{i}.function.name' {n!r} is given twice", param=f"tools.{i}.function.name")
    par = True if parallel is None else parallel
    if tool_choice is None or tool_choice == "auto":
        return ToolChoice(tools, "auto", parallel=par)
    if tool_choice == "none":
        return ToolChoice([], "none", parallel=par)
    if tool_choice == "required":
        return ToolChoice(tools, "required", parallel=par)
    name = tool_choice["function"]["name"]
    if name not in names:
        raise BadRequest(f"'tool_choice' names function {name!r}, which is not among 'tools' ({', '.join(names)})",
                         param="tool_choice")
    return ToolChoice(tools, "named", name=name, parallel=False)


def _call_rules(choice: ToolChoice, names: list[str] | None = None) -> list[str]:
    """Lark rules `call` (one tool call of one of `names`, arguments per its `parameters`) and its alternatives."""
    f = choice.fmt
    fns = [t["function"] for t in choice.tools if names is None or t["function"]["name"] in names]
    alts = []
    for k, fn in enumerate(fns):
        schema = {"type": "object", "properties": {"name": {"const": fn["name"]},
                                                   f.args_key: fn.get("parameters") or {"type": "object"}},
                  "required": ["name", f.args_key], "additionalProperties": False, "x-guidance": JSON_OPTIONS}
        alts.append(f"fn{k}: %json {json.dumps(schema)}")
    body = " | ".join(f"fn{k}" for k in range(len(fns)))
    return [f"call: {_lit(f.prefix)} ({body}) {_lit(f.suffix)}", *alts]


def _lit(text: str) -> str:
    return lark_literal(text) if text else ""


def _calls_rule(choice: ToolChoice) -> str:
    f = choice.fmt
    more = f" ({lark_literal(f.sep)} call)*" if choice.parallel else ""
    return f"calls: {_lit(f.lead)} call{more} {_lit(f.tail)}"


def forced_call_grammar(choice: ToolChoice) -> str:
    """The llguidance grammar of an answer that is only tool calls (one, or several when parallel is allowed)."""
    names = [choice.name] if choice.mode == "named" else None
    return lark_grammar("\n".join(["start: calls", _calls_rule(choice), *_call_rules(choice, names)]))


def calls_or_json_grammar(choice: ToolChoice, schema: dict) -> str:
    """`tool_choice: auto` with a response format: tool calls, or a JSON answer matching `schema`."""
    answer = json.dumps({**schema, "x-guidance": JSON_OPTIONS})
    rules = ["start: calls | answer", _calls_rule(choice), *_call_rules(choice), f"answer: %json {answer}"]
    return lark_grammar("\n".join(rules))


def _call_of(obj, known: set[str], args_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in known:
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models quote the arguments object
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(new_call_id(), obj["name"], json.dumps(args, ensure_ascii=False))


def _json_values(text: str, sep: str) -> list | None:
    """The JSON values of `text` written one after another, `sep` (stripped) between them; None if it is not."""
    dec, out, i, sep = json.JSONDecoder(), [], 0, sep.strip()
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            return out or None
        if out and sep:
            if not text.startswith(sep, i):
                return None
            i += len(sep)
            while i < len(text) and text[i].isspace():
                i += 1
        try:
            v, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        out.append(v)


def _parse_calls(body: str, fmt: ToolFormat, known: set[str]) -> list[ToolCall] | None:
    """The calls in `body` (the text of a Hermes block, or everything from a Mistral/Llama call's start), or
    None when it is not entirely well-formed calls of known tools."""
    if fmt.lead:
        body = body.strip()
        if not body.startswith(fmt.marker):
            return None
        body = body[len(fmt.marker):]
    values = _json_values(body, fmt.sep)
    if values is None:
        return None
    if fmt.lead and len(values) == 1 and isinstance(values[0], list):
        values = values[0]  # Mistral: one JSON array of calls
    calls = [_call_of(v, known, fmt.args_key) for v in values]
    return None if not calls or None in calls else calls


def parse_tool_calls(text: str, choice: ToolChoice) -> tuple[str | None, list[ToolCall]]:
    """A whole answer -> (content, calls). Text that is not a well-formed call of a known tool stays content."""
    p = ToolStreamParser(choice)
    content = p.feed(text) + p.finish()
    return (content or None) if p.calls else content, p.calls


class ToolStreamParser:
    """Splits a growing answer into content and tool calls, as the stream arrives.

    `feed` returns the content that is safe to show now: text that might be
    the start of a call is held back until it is not, and a call is held
    until its end (Hermes: the closing tag; otherwise the end of the answer)
    and then appended to `calls` whole, so a streamed answer yields exactly
    the calls of the same answer parsed at once. Whitespace-only content is
    held too and dropped when a call follows (OpenAI answers calls without
    content). With `parallel_tool_calls: false` calls after the first are
    dropped."""

    def __init__(self, choice: ToolChoice):
        self.known = {t["function"]["name"] for t in choice.tools}
        self.parallel = choice.parallel
        self.fmt = choice.fmt
        self.calls: list[ToolCall] = []
        self._buf = ""  # text not yet classified
        self._ws = ""  # whitespace-only content held back
        self._out = ""  # content ready to show
        self._started = False  # some content has been shown (a Llama call can only open the answer)

    def _open(self) -> str:
        return "{" if self.fmt.at_start else self.fmt.marker

    def feed(self, text: str) -> str:
        self._buf += text
        opener = self._open()
        while True:
            if self.fmt.at_start and self._started:
                self._content(self._buf)
                self._buf = ""
                break
            i = self._buf.find(opener)
            if self.fmt.at_start and i >= 0 and self._buf[:i].strip():
                i = -1  # text came first: this answer is content
            if i < 0:
                keep = 0 if self.fmt.at_start and self._buf.strip() else _partial_suffix(self._buf, opener)
                if self.fmt.at_start and not self._buf.strip():
                    keep = len(self._buf)
                self._content(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                break
            self._content(self._buf[:i])
            self._buf = self._buf[i:]
            close = self.fmt.close
            j = self._buf.find(close) if close else -1
            if j < 0:
                break  # held until the call closes, or the answer ends
            self._call(self._buf[: j + len(close)])
            self._buf = self._buf[j + len(close):]
        out, self._out = self._out, ""
        return out

    def finish(self) -> str:
        """The end of the answer: an unclosed call is parsed as it stands; held text is released."""
        if self._buf.startswith(self._open()):
            self._call(self._buf)
        else:
            self._content(self._buf)
        self._buf = ""
        if not self.calls:
            self._out += self._ws
        self._ws = ""
        out, self._out = self._out, ""
        return out

    def _content(self, text: str) -> None:
        text = self._ws + text
        body = text.rstrip()
        self._out += body
        self._started = self._started or bool(body)
        self._ws = text[len(body):]  # trailing whitespace waits: it is dropped if a call follows

    def _call(self, raw: str) -> None:
        f = self.fmt
        if f.close:  # a Hermes block: its tags around one JSON object
            inner = raw[len(f.marker):]
            inner = inner[: -len(f.close)] if inner.endswith(f.close) else inner
            calls = _parse_calls(inner, f, self.known)
        else:
            calls = _parse_calls(raw, f, self.known)
        if calls is None:
            self._content(raw)  # not calls of known tools: the model's text, shown as it is
            return
        for call in calls:
            if self.parallel or not self.calls:
                self.calls.append(call)
        self._ws = ""


def _partial_suffix(s: str, tag: str) -> int:
    """Length of the longest suffix of `s` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(s)), 0, -1):
        if s.endswith(tag[:n]):
            return n
    return 0
