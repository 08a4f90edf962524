"""Tool calling: OpenAI `tools` rendered by the model's chat template, its output parsed back into `tool_calls`.

The model decides the format: the tools reach the prompt through transformers'
`apply_chat_template(tools=...)`, so a model fine-tuned on its own template
sees exactly what it was trained on (the trainer renders SFT records that
carry `tools` with the same call). Whether a template supports tools is found
by rendering a probe tool and looking for its name; a template that drops
`tools` is a 400 naming `tools`, never a silent ignore.

The output format is the Hermes one that Qwen2.5/Qwen3, Hermes and most
tool-tuned open models use (their templates spell it):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

`tool_choice: "required"` and a named function are enforced, not hoped for:
the whole answer is constrained by a grammar (`structured.py`) whose calls
are JSON objects with the function's name and arguments matching its
`parameters` schema. `"auto"` leaves the model free and parses what it wrote;
`"none"` renders no tools. `parallel_tool_calls: false` allows one call.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from .errors import BadRequest
from ..engine.structured import JSON_OPTIONS, lark_grammar, lark_literal

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL_RE = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CALL_CLOSE) + r"|$)", re.DOTALL)
_PROBE = "loraplex_probe_tool"


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


def check_tool_support(tokenizer) -> None:
    """400 naming `tools` unless the model's chat template renders tools in the Hermes format we parse."""
    probe = [{"type": "function", "function": {"name": _PROBE, "description": "probe",
                                               "parameters": {"type": "object", "properties": {}}}}]
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=probe, tokenize=False,
                                             add_generation_prompt=True)
    except Exception as e:
        raise BadRequest(f"the model's chat template cannot render tools: {e}", param="tools") from e
    if _PROBE not in text:
        raise BadRequest("the model's chat template has no tool support (it does not render `tools`); serve a model "
                         "whose template does, e.g. Qwen2.5 / Hermes style", param="tools")
    if CALL_OPEN not in (tokenizer.chat_template or ""):
        raise BadRequest("the model's chat template renders tools but not in the <tool_call> format loraplex parses",
                         param="tools")


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages (plain dicts, types already checked) -> the dicts HF chat templates read.

    Assistant `tool_calls` carry their arguments as objects (templates `tojson` them); a `tool` message needs
    the `tool_call_id` of an earlier call and gets that call's function `name` too."""
    out, names = [], {}
    for i, m in enumerate(messages):
        role = "system" if m["role"] == "developer" else m["role"]
        d = {"role": role, "content": _text(m.get("content"), f"messages.{i}.content")}
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for j, c in enumerate(m["tool_calls"]):
                p = f"messages.{i}.tool_calls.{j}"
                fn = c.get("function") or {}
                if not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise BadRequest(f"'{p}.function.name' is required", param=f"{p}.function.name")
                try:
                    args = json.loads(fn.get("arguments") or "{}")
                except (TypeError, json.JSONDecodeError) as e:
                    raise BadRequest(f"'{p}.function.arguments' is not valid JSON: {e}",
                                     param=f"{p}.function.arguments") from e
                names[c.get("id")] = fn["name"]
                calls.append({"id": c.get("id"), "type": "function",
                              "function": {"name": fn["name"], "arguments": args}})
            d["tool_calls"] = calls
        if role == "tool":
            tid = m.get("tool_call_id")
            if not tid:
                raise BadRequest(f"'messages.{i}.tool_call_id' is required for a tool message",
                                 param=f"messages.{i}.tool_call_id")
            if tid not in names:
                raise BadRequest(f"'messages.{i}.tool_call_id' {tid!r} answers no earlier assistant tool call",
                                 param=f"messages.{i}.tool_call_id")
            d["tool_call_id"] = tid
            d["name"] = names[tid]
        elif m.get("name"):
            d["name"] = m["name"]
        out.append(d)
    return out


def _text(content, param: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for p in content:
        if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
            raise BadRequest(f"'{param}': only text parts are supported", param=param)
        parts.append(p["text"])
    return "".join(parts)


@dataclass
class ToolChoice:
    """What the request allows: which tools the prompt shows, and whether a call is forced."""

    tools: list[dict]  # OpenAI tool objects rendered into the prompt ([] for "none")
    mode: str  # "auto" | "none" | "required" | "named"
    name: str | None = None
    parallel: bool = True

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
    fns = [t["function"] for t in choice.tools if names is None or t["function"]["name"] in names]
    alts = []
    for k, fn in enumerate(fns):
        schema = {"type": "object", "properties": {"name": {"const": fn["name"]},
                                                   "arguments": fn.get("parameters") or {"type": "object"}},
                  "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": JSON_OPTIONS}
        alts.append(f"fn{k}: %json {json.dumps(schema)}")
    body = " | ".join(f"fn{k}" for k in range(len(fns)))
    return [f"call: {lark_literal(CALL_OPEN + chr(10))} ({body}) {lark_literal(chr(10) + CALL_CLOSE)}", *alts]


def _calls_rule(choice: ToolChoice) -> str:
    return 'calls: call ("\\n" call)*' if choice.parallel else "calls: call"


def forced_call_grammar(choice: ToolChoice) -> str:
    """The llguidance grammar of an answer that is only tool calls (one, or several when parallel is allowed)."""
    names = [choice.name] if choice.mode == "named" else None
    return lark_grammar("\n".join(["start: calls", _calls_rule(choice), *_call_rules(choice, names)]))


def calls_or_json_grammar(choice: ToolChoice, schema: dict) -> str:
    """`tool_choice: auto` with a response format: tool calls, or a JSON answer matching `schema`."""
    answer = json.dumps({**schema, "x-guidance": JSON_OPTIONS})
    rules = ["start: calls | answer", _calls_rule(choice), *_call_rules(choice), f"answer: %json {answer}"]
    return lark_grammar("\n".join(rules))


def _parse_one(body: str, known: set[str]) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in known:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models quote the arguments object
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(new_call_id(), obj["name"], json.dumps(args, ensure_ascii=False))


def parse_tool_calls(text: str, choice: ToolChoice) -> tuple[str | None, list[ToolCall]]:
    """A whole answer -> (content, calls). Text that is not a well-formed call of a known tool stays content."""
    p = ToolStreamParser(choice)
    content = p.feed(text) + p.finish()
    return (content or None) if p.calls else content, p.calls


class ToolStreamParser:
    """Splits a growing answer into content and tool calls, as the stream arrives.

    `feed` returns the content that is safe to show now: text that might be
    the start of `<tool_call>` is held back until it is not, and a call is
    held until its closing tag (or the end of the answer) and then appended
    to `calls` whole, so a streamed answer yields exactly the calls of the
    same answer parsed at once. Whitespace-only content is held too and
    dropped when a call follows (OpenAI answers calls without content). With
    `parallel_tool_calls: false` calls after the first are dropped."""

    def __init__(self, choice: ToolChoice):
        self.known = {t["function"]["name"] for t in choice.tools}
        self.parallel = choice.parallel
        self.calls: list[ToolCall] = []
        self._buf = ""  # text not yet classified
        self._ws = ""  # whitespace-only content held back
        self._out = ""  # content ready to show

    def feed(self, text: str) -> str:
        self._buf += text
        while True:
            i = self._buf.find(CALL_OPEN)
            if i < 0:
                keep = _partial_suffix(self._buf, CALL_OPEN)
                self._content(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                break
            self._content(self._buf[:i])
            self._buf = self._buf[i:]
            j = self._buf.find(CALL_CLOSE)
            if j < 0:
                break
            self._call(self._buf[: j + len(CALL_CLOSE)])
            self._buf = self._buf[j + len(CALL_CLOSE):]
        out, self._out = self._out, ""
        return out

    def finish(self) -> str:
        """The end of the answer: an unclosed call is parsed as it stands; held text is released."""
        if self._buf.startswith(CALL_OPEN):
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
        self._ws = text[len(body):]  # trailing whitespace waits: it is dropped if a call follows

    def _call(self, raw: str) -> None:
        m = _CALL_RE.match(raw)
        call = _parse_one(m.group(1), self.known) if m else None
        if call is None:
            self._content(raw)  # not a call of a known tool: the model's text, shown as it is
        elif self.parallel or not self.calls:
            self.calls.append(call)
            self._ws = ""


def _partial_suffix(s: str, tag: str) -> int:
    """Length of the longest suffix of `s` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(s)), 0, -1):
        if s.endswith(tag[:n]):
            return n
    return 0
