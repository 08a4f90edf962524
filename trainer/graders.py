"""OpenAI's reinforcement fine-tuning graders, run locally as GRPO rewards.

A grader scores one sampled completion against its dataset record. Kinds
(OpenAI's shapes, so a job body written for OpenAI works here):

- `string_check`: `input` and `reference` templates compared with
  `operation` `eq` | `ne` | `like` (substring) | `ilike` (substring, any case) -> 1.0 or 0.0.
- `text_similarity`: `evaluation_metric` `fuzzy_match` (rapidfuzz), `bleu`
  (sacrebleu, 0..1), `rouge_1` .. `rouge_5`, `rouge_l` (rouge-score F1).
  `gleu`, `meteor` and `cosine` (an embedding model) are refused, named.
- `score_model`: `model` is a reward adapter registered in the store (a
  `method: reward` job makes one); it scores `input` (messages, templated)
  or, without `input`, the prompt followed by the completion. `range`
  clamps the score.
- `multi`: `graders` by name and `calculate_output`, an arithmetic formula
  over their names (+ - * / **, min, max, abs, sqrt, log, exp, floor, ceil),
  evaluated over a parsed syntax tree, never with `eval`.
- `python`: only `{"type": "python", "function": NAME}` where NAME is a
  function the operator registered on the server; code (`source`) or an
  import path in a request is refused.

Templates are `{{sample.output_text}}`, `{{sample.output_json.<key>}}` and
`{{item.<field>}}` (the prompt's record, dotted paths into nested fields).
`check_grader` validates a spec without loading anything, so the API refuses
a malformed grader when the job is created; a template naming a field the
data lacks fails the job's probe call, before training.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from typing import Callable

from loraplex.adapters_store.errors import InvalidArgument

GRADER_TYPES = ("string_check", "text_similarity", "score_model", "multi", "python")
STRING_OPS = ("eq", "ne", "like", "ilike")
METRICS = ("fuzzy_match", "bleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l")
_TEMPLATE = re.compile(r"\{\{\s*(sample|item)\.([A-Za-z0-9_.]+)\s*\}\}")


class GraderError(InvalidArgument, ValueError):
    """A grader spec that cannot run, with the offending field in its message."""


def _need(spec: dict, key: str, where: str, kind=str):
    if key not in spec:
        raise GraderError(f"{where}: missing '{key}'")
    if not isinstance(spec[key], kind):
        raise GraderError(f"{where}.{key}: must be a {getattr(kind, '__name__', kind)}")
    return spec[key]


def check_grader(spec, where: str = "grader", registered: Callable[[str], bool] | None = None) -> None:
    """Refuses a malformed grader (GraderError naming the field); `registered(name)` says whether the operator
    registered a python grader function of that name (None: none are)."""
    if not isinstance(spec, dict):
        raise GraderError(f"{where}: must be an object")
    kind = spec.get("type")
    if kind not in GRADER_TYPES:
        raise GraderError(f"{where}.type: {kind!r} is not one of {list(GRADER_TYPES)}")
    if kind == "string_check":
        _need(spec, "input", where), _need(spec, "reference", where)
        if spec.get("operation", "eq") not in STRING_OPS:
            raise GraderError(f"{where}.operation: {spec.get('operation')!r} is not one of {list(STRING_OPS)}")
    elif kind == "text_similarity":
        _need(spec, "input", where), _need(spec, "reference", where)
        metric = spec.get("evaluation_metric", "fuzzy_match")
        if metric not in METRICS:
            raise GraderError(
                f"{where}.evaluation_metric: {metric!r} is not supported here (supported: "
                f"{list(METRICS)}; gleu, meteor and cosine are not)"
            )
        _metric_fn(metric)  # a missing library is reported now
    elif kind == "score_model":
        _need(spec, "model", where)
        if "input" in spec and not (
            isinstance(spec["input"], list)
            and all(isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in spec["input"])
        ):
            raise GraderError(f"{where}.input: must be a list of messages with 'role' and string 'content'")
        rng = spec.get("range")
        if rng is not None and not (
            isinstance(rng, list)
            and len(rng) == 2
            and all(isinstance(x, (int, float)) for x in rng)
            and rng[0] < rng[1]
        ):
            raise GraderError(f"{where}.range: must be [low, high] with low < high")
    elif kind == "multi":
        graders = _need(spec, "graders", where, dict)
        if not graders:
            raise GraderError(f"{where}.graders: needs at least one grader")
        for name, g in graders.items():
            if not name.isidentifier():
                raise GraderError(
                    f"{where}.graders: {name!r} must be a plain identifier (it names a formula variable)"
                )
            check_grader(g, f"{where}.graders.{name}", registered)
        _formula(_need(spec, "calculate_output", where), set(graders), f"{where}.calculate_output")
    elif kind == "python":
        if "source" in spec or "image_tag" in spec:
            raise GraderError(
                f"{where}: python graders run only functions the operator registered on the server "
                "(loraplex serve --reward-function NAME=module:function); code in a request is never run: "
                'send {"type": "python", "function": "NAME"}'
            )
        name = _need(spec, "function", where)
        if registered is None or not registered(name):
            raise GraderError(f"{where}.function: no reward function {name!r} is registered on this server")


# --- templates ---------------------------------------------------------------------------------------------------
def render(template: str, sample: dict, item: dict) -> str:
    def sub(m):
        root = {"sample": sample, "item": item}[m[1]]
        v = root
        for part in m[2].split("."):
            if isinstance(v, dict) and part in v:
                v = v[part]
            elif isinstance(v, list) and part.isdigit() and int(part) < len(v):
                v = v[int(part)]
            else:
                raise KeyError(f"template {m[0]!r}: the {m[1]} has no field {m[2]!r}")
        return v if isinstance(v, str) else json.dumps(v)

    return _TEMPLATE.sub(sub, template)


def _sample(text: str) -> dict:
    s = {"output_text": text}
    try:
        s["output_json"] = json.loads(text)
    except ValueError:
        pass
    return s


# --- metrics -----------------------------------------------------------------------------------------------------
def _metric_fn(metric: str) -> Callable[[str, str], float]:
    try:
        if metric == "fuzzy_match":
            from rapidfuzz import fuzz

            return lambda a, b: fuzz.ratio(a, b) / 100.0
        if metric == "bleu":
            from sacrebleu.metrics import BLEU

            bleu = BLEU(effective_order=True)
            return lambda a, b: bleu.sentence_score(a, [b]).score / 100.0
        from rouge_score import rouge_scorer

        key = "rougeL" if metric == "rouge_l" else f"rouge{metric[-1]}"
        scorer = rouge_scorer.RougeScorer([key])
        return lambda a, b: scorer.score(b, a)[key].fmeasure
    except ImportError as e:
        raise GraderError(f"text_similarity {metric} needs {e.name}: pip install 'loraplex[graders]'") from None


# --- formulas ----------------------------------------------------------------------------------------------------
_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_FUNCS = {
    "min": min,
    "max": max,
    "abs": abs,
    "sqrt": math.sqrt,
    "log": math.log,
    "exp": math.exp,
    "floor": math.floor,
    "ceil": math.ceil,
}


def _formula(text: str, names: set[str], where: str) -> Callable[[dict], float]:
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise GraderError(f"{where}: {text!r} is not a formula") from None

    def check(n):
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)) and not isinstance(n.value, bool):
            return
        if isinstance(n, ast.Name):
            if n.id not in names:
                raise GraderError(f"{where}: {n.id!r} is not one of the graders {sorted(names)}")
            return
        if isinstance(n, ast.BinOp) and type(n.op) in _BINOPS:
            return check(n.left), check(n.right)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd)):
            return check(n.operand)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _FUNCS and not n.keywords:
            for a in n.args:
                check(a)
            return
        raise GraderError(f"{where}: only numbers, grader names, + - * / **, and {sorted(_FUNCS)} are allowed")

    check(tree)

    def ev(n, env):
        if isinstance(n, ast.Constant):
            return float(n.value)
        if isinstance(n, ast.Name):
            return env[n.id]
        if isinstance(n, ast.BinOp):
            return _BINOPS[type(n.op)](ev(n.left, env), ev(n.right, env))
        if isinstance(n, ast.UnaryOp):
            v = ev(n.operand, env)
            return -v if isinstance(n.op, ast.USub) else v
        return float(_FUNCS[n.func.id](*[ev(a, env) for a in n.args]))

    return lambda env: float(ev(tree, env))


# --- building ----------------------------------------------------------------------------------------------------
Scorer = Callable[[list[str], list[str], list[list[int]], list[dict]], list[float]]


def make_grader(spec: dict, rollout, store_dir, functions: dict[str, Callable] | None = None) -> Scorer:
    """The grader as a reward: fn(prompts, completions, token sequences, items) -> scores.

    `functions`: the operator's registered python grader functions by name, each called as f(sample, item) -> float.
    """
    check_grader(spec, registered=(lambda n: n in functions) if functions else None)
    kind = spec["type"]
    if kind == "string_check":
        op = spec.get("operation", "eq")

        def one(text, item):
            a, b = render(spec["input"], _sample(text), item), render(spec["reference"], _sample(text), item)
            hit = {"eq": a == b, "ne": a != b, "like": b in a, "ilike": b.lower() in a.lower()}[op]
            return 1.0 if hit else 0.0
    elif kind == "text_similarity":
        fn = _metric_fn(spec.get("evaluation_metric", "fuzzy_match"))

        def one(text, item):
            return float(
                fn(render(spec["input"], _sample(text), item), render(spec["reference"], _sample(text), item))
            )
    elif kind == "python":
        f = functions[spec["function"]]

        def one(text, item):
            return float(f(_sample(text), item))
    elif kind == "multi":
        subs = {name: make_grader(g, rollout, store_dir, functions) for name, g in spec["graders"].items()}
        formula = _formula(spec["calculate_output"], set(subs), "calculate_output")

        def many(prompts, comps, seqs, items):
            got = {name: g(prompts, comps, seqs, items) for name, g in subs.items()}
            return [formula({n: v[i] for n, v in got.items()}) for i in range(len(comps))]

        return many
    else:  # score_model
        from .rl import reward_adapter_scorer

        score, _ = reward_adapter_scorer(spec["model"], rollout, store_dir)
        lo, hi = spec.get("range") or (-math.inf, math.inf)
        tok = rollout.tokenizer

        def many(prompts, comps, seqs, items):
            if "input" in spec:
                seqs = []
                for text, item in zip(comps, items):
                    msgs = [
                        {"role": m["role"], "content": render(m["content"], _sample(text), item)}
                        for m in spec["input"]
                    ]
                    seqs.append(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
            return [min(hi, max(lo, s)) for s in score(seqs)]

        return many

    return lambda prompts, comps, seqs, items: [one(c, it) for c, it in zip(comps, items)]
