"""Random JSON Schemas of the shapes SaaS backends send: nested objects, arrays, enums, required and optional
fields, bounded numbers. Strings and arrays are bounded so a random tiny model's answer ends within the test's
token budget."""
from __future__ import annotations

import random


def _leaf(r: random.Random) -> dict:
    kind = r.choice(["string", "integer", "number", "boolean", "enum", "nullable", "int_enum"])
    if kind == "string":
        s = {"type": "string", "maxLength": r.randint(1, 8)}
        if r.random() < 0.3:
            s["minLength"] = 1
        return s
    if kind == "integer":
        lo = r.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + r.randint(0, 200)}
    if kind == "number":
        lo = r.choice([0, -1, 10])
        return {"type": "number", "minimum": lo, "maximum": lo + r.choice([1, 5, 100])}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": r.sample(["red", "green", "blue", "small", "large", "yes", "no", "maybe"], r.randint(2, 4))}
    if kind == "int_enum":
        return {"type": "integer", "enum": r.sample([1, 2, 3, 5, 8, 13], r.randint(2, 4))}
    return {"type": ["string", "null"], "maxLength": 4}


def _node(r: random.Random, depth: int) -> dict:
    roll = r.random()
    if depth <= 0 or roll < 0.45:
        return _leaf(r)
    if roll < 0.7:
        return {"type": "array", "items": _node(r, depth - 1), "minItems": r.randint(0, 1),
                "maxItems": r.randint(1, 3)}
    return _object(r, depth - 1)


def _object(r: random.Random, depth: int) -> dict:
    names = r.sample(["id", "name", "kind", "count", "score", "tags", "meta", "items", "ok", "price", "city", "note"],
                     r.randint(1, 4))
    props = {n: _node(r, depth) for n in names}
    required = [n for n in names if r.random() < 0.6]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def random_schemas(count: int, seed: int = 0) -> list[dict]:
    r = random.Random(seed)
    return [_object(r, r.randint(1, 3)) for _ in range(count)]
