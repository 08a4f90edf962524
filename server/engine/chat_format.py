"""Conversations as the model's chat template renders them: one implementation for serving and for training.

The server renders a chat request's prompt, and the trainer an SFT record,
with `render_conversation(template_messages(...))`, so an adapter trained on
records that carry `tools` and assistant `tool_calls` is served exactly the
text it was trained on, and writes its calls in the format the server parses
them in. That format is the template's own, found by `tool_format`: which
marker the template spells its calls with.

Errors are `InvalidArgument` naming the field (`messages.2.tool_calls.0.function.name`): the server answers
them as 400s, the trainer prefixes them with the record's `file:line`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from loraplex.adapters_store.errors import InvalidArgument

_PROBE = "loraplex_probe_tool"


@dataclass(frozen=True)
class ToolFormat:
    """How a chat template spells an answer's tool calls.

    The calls are `lead call (sep call)* tail`, each call `prefix {"name": ..., <args_key>: {...}} suffix`.
    `close` is the text that ends one call (None: the calls run to the end of the answer); `at_start`: calls
    can only open an answer (Llama 3.1 answers a call as a bare JSON object)."""

    name: str
    marker: str  # what the template's text holds when it renders calls; also the first text of the calls
    lead: str
    prefix: str
    suffix: str
    sep: str
    tail: str
    args_key: str = "arguments"
    at_start: bool = False

    @property
    def close(self) -> str | None:
        return self.suffix or None


HERMES = ToolFormat("hermes", "<tool_call>", lead="", prefix="<tool_call>\n", suffix="\n</tool_call>", sep="\n",
                    tail="")
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]", lead="[TOOL_CALLS] [", prefix="", suffix="", sep=", ", tail="]")
LLAMA3_JSON = ToolFormat("llama3_json", '"parameters"', lead="", prefix="", suffix="", sep="; ", tail="",
                         args_key="parameters", at_start=True)
TOOL_FORMATS = (HERMES, MISTRAL, LLAMA3_JSON)  # the order they are looked for in a template


def tool_format(tokenizer) -> ToolFormat:
    """The tool-call format of the tokenizer's chat template; InvalidArgument naming `tools` when there is none
    we parse (a template that drops `tools`, one with a format we do not know, or a marker the detokenizer drops)."""
    probe = [{"type": "function", "function": {"name": _PROBE, "description": "probe",
                                               "parameters": {"type": "object", "properties": {}}}}]
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=probe, tokenize=False,
                                             add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - jinja raises anything a template author wrote
        raise InvalidArgument(f"the model's chat template cannot render tools: {e}", param="tools") from e
    if _PROBE not in text:
        raise InvalidArgument("the model's chat template has no tool support (it does not render `tools`); use a "
                              "model whose template does (Qwen2.5 / Hermes, Mistral or Llama 3.1 style)",
                              param="tools")
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    for fmt in TOOL_FORMATS:
        if fmt.marker in template:
            if fmt.marker in getattr(tokenizer, "all_special_tokens", ()):
                raise InvalidArgument(f"the model spells tool calls with the special token {fmt.marker!r}, which "
                                      "decoding drops; its calls could not be parsed", param="tools")
            return fmt
    raise InvalidArgument("the model's chat template renders tools but its call format is none loraplex parses "
                          f"({', '.join(f.name for f in TOOL_FORMATS)})", param="tools")


def check_tools(tools, param: str = "tools") -> list[dict]:
    """OpenAI tool definitions given as plain JSON (training records; the HTTP body has its pydantic model)."""
    if not isinstance(tools, list) or not tools:
        raise InvalidArgument(f"'{param}' must be a non-empty list of tools", param=param)
    names = []
    for i, t in enumerate(tools):
        p = f"{param}.{i}"
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or t.get("type", "function") != "function":
            raise InvalidArgument(f"'{p}' must be {{\"type\": \"function\", \"function\": {{...}}}}", param=p)
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidArgument(f"'{p}.function.name' is required", param=f"{p}.function.name")
        if fn["name"] in names:
            raise InvalidArgument(f"'{p}.function.name' {fn['name']!r} is given twice", param=f"{p}.function.name")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise InvalidArgument(f"'{p}.function.parameters' must be a JSON schema object",
                                  param=f"{p}.function.parameters")
        names.append(fn["name"])
    return [{"type": "function", "function": t["function"]} for t in tools]


def template_messages(messages: list[dict], tools: list[dict] | None = None, *, strict: bool = False) -> list[dict]:
    """OpenAI chat messages (plain dicts) -> the dicts HF chat templates read.

    Assistant `tool_calls` carry their arguments as objects (templates `tojson` them; OpenAI sends a JSON
    string, training records may hold either); a `tool` message needs the `tool_call_id` of an earlier call and
    gets that call's function `name` too. `strict` (training records): every call must name one of `tools`."""
    known = {t["function"]["name"] for t in tools or ()}
    out, names = [], {}
    for i, m in enumerate(messages):
        role = "system" if m["role"] == "developer" else m["role"]
        d = {"role": role, "content": _text(m.get("content"), f"messages.{i}.content")}
        if m.get("tool_calls") and role != "assistant":
            raise InvalidArgument(f"'messages.{i}.tool_calls' belongs to assistant messages",
                                  param=f"messages.{i}.tool_calls")
        if role == "assistant" and m.get("tool_calls"):
            if not isinstance(m["tool_calls"], list):
                raise InvalidArgument(f"'messages.{i}.tool_calls' must be a list", param=f"messages.{i}.tool_calls")
            calls = []
            for j, c in enumerate(m["tool_calls"]):
                p = f"messages.{i}.tool_calls.{j}"
                fn = c.get("function") if isinstance(c, dict) else None
                fn = fn if isinstance(fn, dict) else {}
                if not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise InvalidArgument(f"'{p}.function.name' is required", param=f"{p}.function.name")
                if strict and fn["name"] not in known:
                    raise InvalidArgument(
                        f"'{p}.function.name' {fn['name']!r} is not among the record's tools"
                        f" ({', '.join(sorted(known)) or 'it has none'})", param=f"{p}.function.name")
                args = _arguments(fn.get("arguments"), f"{p}.function.arguments", strict)
                names[c.get("id")] = fn["name"]
                calls.append({"id": c.get("id"), "type": "function",
                              "function": {"name": fn["name"], "arguments": args}})
            d["tool_calls"] = calls
        if role == "tool":
            tid = m.get("tool_call_id")
            if not tid:
                raise InvalidArgument(f"'messages.{i}.tool_call_id' is required for a tool message",
                                      param=f"messages.{i}.tool_call_id")
            if tid not in names:
                raise InvalidArgument(f"'messages.{i}.tool_call_id' {tid!r} answers no earlier assistant tool call",
                                      param=f"messages.{i}.tool_call_id")
            d["tool_call_id"] = tid
            d["name"] = names[tid]
        elif m.get("name"):
            d["name"] = m["name"]
        out.append(d)
    return out


def _arguments(args, param: str, strict: bool) -> dict:
    if isinstance(args, dict) and strict:
        return args
    if not strict and not args:
        return {}
    try:
        value = json.loads(args)
    except (TypeError, json.JSONDecodeError) as e:
        raise InvalidArgument(f"'{param}' is not valid JSON: {e}" if isinstance(args, str) else
                              f"'{param}' must be a JSON object or a string holding one", param=param) from e
    if strict and not isinstance(value, dict):
        raise InvalidArgument(f"'{param}' must hold a JSON object", param=param)
    return value


def _text(content, param: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for p in content if isinstance(content, list) else [None]:
        if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
            raise InvalidArgument(f"'{param}': only text parts are supported", param=param)
        parts.append(p["text"])
    return "".join(parts)


def render_conversation(tokenizer, messages: list[dict], tools: list[dict] | None = None, *,
                        add_generation_prompt: bool = False) -> str:
    """The prompt text of `messages` (as `template_messages` returns them) with `tools` shown, by the template."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - jinja raises anything a template author wrote (raise_exception)
        raise InvalidArgument(f"messages cannot be rendered with the model's chat template: {e}",
                              param="messages") from e
