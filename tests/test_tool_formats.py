"""Tool-call formats detected from the chat template (Hermes, Mistral, Llama 3.1 JSON): the calls a template renders
parse back into the same calls, whole or streamed, and the forced-call grammar accepts exactly that spelling."""
from __future__ import annotations

import copy
import json

import pytest

from loraplex.server.api.errors import BadRequest
from loraplex.server.api.tools import (
    ToolStreamParser, check_tool_support, forced_call_grammar, parse_tool_calls, resolve_tool_choice,
    template_messages,
)
from loraplex.server.engine.chat_format import render_conversation

ADD = {"type": "function", "function": {"name": "add", "description": "Adds", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"],
    "additionalProperties": False}}}
CITY = {"type": "function", "function": {"name": "city_info", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

# A Mistral v0.3-style template: tools in [AVAILABLE_TOOLS], the calls as one JSON array after [TOOL_CALLS].
MISTRAL = """
{%- for m in messages %}
{%- if m.role == 'user' %}{% if tools and loop.first %}[AVAILABLE_TOOLS] {{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[INST] {{ m.content }}[/INST]
{%- elif m.role == 'assistant' and m.tool_calls %}{{ "[TOOL_CALLS] [" }}
{%- for c in m.tool_calls %}{{ {"name": c.function.name, "arguments": c.function.arguments} | tojson }}{% if not loop.last %}, {% endif %}{% endfor %}]<|im_end|>
{%- elif m.role == 'assistant' %}{{ m.content }}<|im_end|>
{%- elif m.role == 'tool' %}[TOOL_RESULTS] {{ {"content": m.content} | tojson }}[/TOOL_RESULTS]
{%- else %}{{ m.content }}
{%- endif %}{%- endfor %}
""".strip()

# A Llama 3.1-style template: a call is the whole answer, {"name": ..., "parameters": ...}; results in ipython turns.
LLAMA = """
{%- if tools %}<|im_start|>system
Answer a call as {"name": function name, "parameters": arguments}. Functions:
{% for t in tools %}{{ t | tojson }}
{% endfor %}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{% for c in m.tool_calls %}{{ '{"name": "' + c.function.name + '", "parameters": ' }}{{ c.function.arguments | tojson }}}{% if not loop.last %}; {% endif %}{% endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>ipython
{{ m.content }}<|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}
""".strip()

# Renders the tools, but calls in a spelling none of the formats is.
UNKNOWN = ("{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m.role }}: {{ m.content }}"
           "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }}{% endfor %}\n{% endfor %}")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from helpers import TOOL_CHAT_TEMPLATE, default_tokenizer_dir
    from transformers import AutoTokenizer

    out, base = {}, AutoTokenizer.from_pretrained(default_tokenizer_dir())
    for name, template in (("hermes", TOOL_CHAT_TEMPLATE), ("mistral", MISTRAL), ("llama3_json", LLAMA),
                           ("unknown", UNKNOWN), ("plain", None)):
        tok = copy.deepcopy(base)
        if template is not None:
            tok.chat_template = template
        out[name] = tok
    return out


def _calls(*pairs):
    return [{"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
            for i, (n, a) in enumerate(pairs)]


def _rendered_answer(tok, calls, content=None) -> str:
    """The text of an assistant turn with `calls` as the template renders it (what a model trained on it writes)."""
    msgs = [{"role": "user", "content": "Add 2 and 3, and tell me about Oslo."}]
    before = render_conversation(tok, template_messages(msgs), [ADD, CITY], add_generation_prompt=True)
    full = render_conversation(tok, template_messages(msgs + [{"role": "assistant", "content": content,
                                                               "tool_calls": calls}]), [ADD, CITY])
    assert full.startswith(before)
    return full[len(before):].split("<|im_end|>")[0]


FORMATS = ["hermes", "mistral", "llama3_json"]


@pytest.mark.parametrize("name", FORMATS)
def test_the_format_is_detected_from_the_template(tokenizers, name):
    assert check_tool_support(tokenizers[name]).name == name


@pytest.mark.parametrize("name,reason", [("plain", "no tool support"), ("unknown", "none loraplex parses")])
def test_a_template_without_a_known_format_is_a_400_naming_tools(tokenizers, name, reason):
    with pytest.raises(BadRequest, match=reason) as e:
        check_tool_support(tokenizers[name])
    assert e.value.param == "tools"


def _choice(tok, parallel=True, mode="auto"):
    c = resolve_tool_choice([ADD, CITY], mode, parallel)
    c.fmt = check_tool_support(tok)
    return c


@pytest.mark.parametrize("name", FORMATS)
def test_rendered_calls_parse_back_whole_and_streamed(tokenizers, name):
    tok = tokenizers[name]
    want = [("add", {"a": 2, "b": 3}), ("city_info", {"city": "Oslo"})]
    text = _rendered_answer(tok, _calls(*want))
    content, calls = parse_tool_calls(text, _choice(tok))
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == want
    p = ToolStreamParser(_choice(tok))
    shown = "".join(p.feed(ch) for ch in text) + p.finish()
    assert shown == "" and [(c.name, json.loads(c.arguments)) for c in p.calls] == want
    _, one = parse_tool_calls(text, _choice(tok, parallel=False))
    assert [c.name for c in one] == ["add"]


@pytest.mark.parametrize("name", FORMATS)
def test_text_answers_and_calls_of_unknown_tools_stay_content(tokenizers, name):
    tok = tokenizers[name]
    for text in ("The answer is 5.", "Sure {thing} here", _rendered_answer(tok, _calls(("mul", {"a": 1})))):
        content, calls = parse_tool_calls(text, _choice(tok))
        assert calls == [] and content == text
        p = ToolStreamParser(_choice(tok))
        assert "".join(p.feed(ch) for ch in text) + p.finish() == text and p.calls == []


def test_hermes_and_mistral_calls_may_follow_some_text(tokenizers):
    for name in ("hermes", "mistral"):
        tok = tokenizers[name]
        text = "Let me add.\n" + _rendered_answer(tok, _calls(("add", {"a": 1, "b": 1})))
        content, calls = parse_tool_calls(text, _choice(tok))
        assert content == "Let me add." and [c.name for c in calls] == ["add"], name


@pytest.fixture(scope="module")
def compiler(tokenizers):
    from loraplex.server.engine.structured import GrammarCompiler

    tok = tokenizers["hermes"]
    return GrammarCompiler(tok, [tok.eos_token_id], 49152)


@pytest.mark.parametrize("name", FORMATS)
def test_the_forced_call_grammar_accepts_the_templates_own_spelling(tokenizers, compiler, name):
    tok = tokenizers[name]

    def accepts(choice, text) -> bool:
        c = compiler.compile(forced_call_grammar(choice), "tool_choice")
        ids = tok.encode(text, add_special_tokens=False)
        return all(c.matcher.consume_token(t) for t in ids) and c.matcher.is_accepting()

    two = _rendered_answer(tok, _calls(("add", {"a": 2, "b": 3}), ("city_info", {"city": "Oslo"})))
    one = _rendered_answer(tok, _calls(("add", {"a": 2, "b": 3})))
    assert accepts(_choice(tok, mode="required"), two)
    assert accepts(_choice(tok, parallel=False, mode="required"), one)
    assert not accepts(_choice(tok, parallel=False, mode="required"), two)
    assert not accepts(_choice(tok, mode="required"), _rendered_answer(tok, _calls(("add", {"a": "x", "b": 3}))))
    named = resolve_tool_choice([ADD, CITY], {"type": "function", "function": {"name": "city_info"}}, None)
    named.fmt = check_tool_support(tok)
    assert not accepts(named, one)
