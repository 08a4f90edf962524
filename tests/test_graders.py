"""OpenAI's grader kinds as local rewards: values against hand-computed ones, and malformed graders refused naming the
field (a request's code is never run)."""

from __future__ import annotations

import pytest

from loraplex.trainer.graders import GraderError, check_grader, make_grader

ITEMS = [{"answer": "Paris", "meta": {"city": "paris"}}, {"answer": "Rome", "meta": {"city": "rome"}}]


def grade(spec, completions, items=ITEMS, **kw):
    return make_grader(spec, None, None, **kw)(["p"] * len(completions), completions, [[1]] * len(completions), items)


def test_string_check_operations():
    g = {"type": "string_check", "name": "x", "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}
    assert grade({**g, "operation": "eq"}, ["Paris", "rome"]) == [1.0, 0.0]
    assert grade({**g, "operation": "ne"}, ["Paris", "rome"]) == [0.0, 1.0]
    assert grade({**g, "operation": "like"}, ["It is Paris.", "It is rome."]) == [1.0, 0.0]
    assert grade({**g, "operation": "ilike"}, ["It is PARIS.", "It is rome."]) == [1.0, 1.0]
    nested = {**g, "operation": "eq", "reference": "{{item.meta.city}}", "input": "{{sample.output_json.city}}"}
    assert grade(nested, ['{"city": "paris"}', '{"city": "milan"}']) == [1.0, 0.0]
    with pytest.raises(KeyError, match="item has no field 'missing'"):
        grade({**g, "reference": "{{item.missing}}"}, ["a", "b"])


def test_text_similarity_and_multi():
    fuzzy = {
        "type": "text_similarity",
        "name": "f",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "evaluation_metric": "fuzzy_match",
    }
    exact, near = grade(fuzzy, ["Paris", "Rame"])
    assert exact == 1.0 and near == pytest.approx(0.75)
    bleu = grade({**fuzzy, "evaluation_metric": "bleu"}, ["Paris", "nothing alike"])
    assert bleu[0] == pytest.approx(1.0) and bleu[1] < 0.1
    rouge = grade({**fuzzy, "evaluation_metric": "rouge_1", "reference": "the cat sat"}, ["the cat", "a dog"])
    assert rouge[0] == pytest.approx(0.8) and rouge[1] == 0.0
    multi = {
        "type": "multi",
        "graders": {"eq": {**fuzzy, "type": "string_check", "operation": "eq"}, "fz": fuzzy},
        "calculate_output": "0.5 * eq + 0.5 * max(fz, 0.9)",
    }
    assert grade(multi, ["Paris", "Rame"]) == pytest.approx([1.0, 0.45])


@pytest.mark.parametrize(
    "spec,msg",
    [
        ({"type": "nope"}, "type"),
        ({"type": "string_check", "input": "x"}, "missing 'reference'"),
        ({"type": "string_check", "input": "x", "reference": "y", "operation": "regex"}, "operation"),
        ({"type": "text_similarity", "input": "x", "reference": "y", "evaluation_metric": "cosine"}, "cosine"),
        (
            {
                "type": "multi",
                "graders": {"a": {"type": "string_check", "input": "x", "reference": "y"}},
                "calculate_output": "__import__('os').system('true')",
            },
            "only numbers",
        ),
        (
            {
                "type": "multi",
                "graders": {"a": {"type": "string_check", "input": "x", "reference": "y"}},
                "calculate_output": "a + b",
            },
            "'b' is not one of the graders",
        ),
        ({"type": "python", "source": "def grade(s, i): return 1"}, "code in a request is never run"),
        ({"type": "python", "function": "mine"}, "no reward function 'mine' is registered"),
        ({"type": "score_model", "input": "x"}, "missing 'model'"),
    ],
)
def test_malformed_graders_are_refused_naming_the_field(spec, msg):
    with pytest.raises(GraderError, match=msg):
        check_grader(spec)


def test_python_grader_runs_only_a_registered_function():
    spec = {"type": "python", "function": "longer"}
    fns = {"longer": lambda sample, item: float(len(sample["output_text"]) > len(item["answer"]))}
    assert grade(spec, ["Parisian", "R"], functions=fns) == [1.0, 0.0]
