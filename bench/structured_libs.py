"""Which grammar library constrains our decoding: llguidance, xgrammar and outlines-core side by side.

For each library, with the embedded model's tokenizer (SmolLM2, 49152 tokens):
the one-off tokenizer set-up, the compile time of each schema of a realistic
structured-output workload (cold: a fresh compiler per library run, schemas in
the same order), and the time to compute one step's token mask while walking a
valid instance of each schema token by token (the cost the engine pays per
constrained row per step). Prints one table; the README quotes it.

    pip install llguidance xgrammar outlines-core    # the last two only for this comparison
    python bench/structured_libs.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SCHEMAS = {
    "json_object": ({"type": "object"}, {"ok": True, "n": 3}),
    "person": (
        {"type": "object", "properties": {
            "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "email": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        }, "required": ["name", "age"], "additionalProperties": False},
        {"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry"]},
    ),
    "order": (
        {"type": "object", "properties": {
            "id": {"type": "string"},
            "status": {"enum": ["pending", "shipped", "delivered", "cancelled"]},
            "items": {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
                "sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1},
                "price": {"type": "number", "minimum": 0}}, "required": ["sku", "qty", "price"],
                "additionalProperties": False}},
            "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                         "zip": {"type": "string"}},
                        "required": ["city"], "additionalProperties": False},
        }, "required": ["id", "status", "items"], "additionalProperties": False},
        {"id": "A-17", "status": "shipped", "items": [{"sku": "X1", "qty": 2, "price": 9.5},
                                                      {"sku": "Y22", "qty": 1, "price": 120}],
         "address": {"city": "Paris", "zip": "75001"}},
    ),
    "classify": (
        {"type": "object", "properties": {"label": {"enum": ["positive", "negative", "neutral"]},
                                          "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                                          "reasons": {"type": "array", "items": {"type": "string"}}},
         "required": ["label", "confidence"], "additionalProperties": False},
        {"label": "positive", "confidence": 0.87, "reasons": ["friendly tone"]},
    ),
    "weather_tool": (
        {"type": "object", "properties": {"location": {"type": "string"},
                                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                                          "days": {"type": "integer", "minimum": 1, "maximum": 14}},
         "required": ["location"], "additionalProperties": False},
        {"location": "Lyon, France", "unit": "celsius", "days": 3},
    ),
}


def _tokens(tok, instance) -> list[int]:
    return tok.encode(json.dumps(instance, separators=(", ", ": ")), add_special_tokens=False)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.lg, self.lt = llguidance, llguidance.torch
        self.tokenizer = llguidance.hf.from_tokenizer(tok, n_vocab=len(tok))

    def compile(self, schema):
        g = self.lg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": True})
        m = self.lg.LLMatcher(self.tokenizer, g)
        assert not m.is_error(), m.get_error()
        return m

    def walk(self, m, ids, vocab):
        mask = self.lt.allocate_token_bitmask(1, vocab)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            self.lt.fill_next_token_bitmask(m, mask, 0)
            times.append(time.perf_counter() - t0)
            assert m.consume_token(t), m.get_error()
        return times


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok):
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
        self.compiler = xgr.GrammarCompiler(self.info, cache_enabled=False)

    def compile(self, schema):
        return self.xgr.GrammarMatcher(self.compiler.compile_json_schema(json.dumps(schema)))

    def walk(self, m, ids, vocab):
        mask = self.xgr.allocate_token_bitmask(1, vocab)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(mask)
            times.append(time.perf_counter() - t0)
            assert m.accept_token(t)
        return times


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok):
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        self.oc, self.regex_of = outlines_core, build_regex_from_schema
        # byte-level BPE token strings back to the bytes they stand for (GPT-2's printable-byte alphabet)
        bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        cs, n = bs[:], 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        dec = {chr(c): b for b, c in zip(bs, cs)}
        vocab: dict[bytes, list[int]] = {}
        special = set(tok.all_special_ids)
        for s, i in tok.get_vocab().items():
            if i in special:
                continue
            vocab.setdefault(bytes(dec[c] for c in s), []).append(i)
        self.vocab = outlines_core.Vocabulary(tok.eos_token_id, vocab)

    def compile(self, schema):
        return self.oc.Guide(self.oc.Index(self.regex_of(json.dumps(schema), r"[ ]?"), self.vocab))

    def walk(self, g, ids, vocab):
        mask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            g.write_mask_into(mask.data_ptr(), mask.numel(), 4)
            times.append(time.perf_counter() - t0)
            g.advance(t)
        return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--libs", default="llguidance,xgrammar,outlines-core")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from loraplex.adapters_store.base_model import resolve_base_model

    tok = AutoTokenizer.from_pretrained(resolve_base_model("default"))
    vocab = len(tok)
    libs = {c.name: c for c in (LLGuidance, XGrammar, OutlinesCore)}
    rows = []
    for name in args.libs.split(","):
        cls = libs[name]
        __import__({"llguidance": "llguidance.hf", "xgrammar": "xgrammar", "outlines-core": "outlines_core"}[name])
        t0 = time.perf_counter()  # set-up without the import
        lib = cls(tok)
        setup = time.perf_counter() - t0
        compiles: dict[str, list[float]] = {k: [] for k in SCHEMAS}
        masks: list[float] = []
        for _ in range(args.repeats):
            lib = cls(tok) if name == "xgrammar" else lib  # xgrammar's compiler caches; a fresh one per repeat
            for key, (schema, inst) in SCHEMAS.items():
                try:
                    t0 = time.perf_counter()
                    m = lib.compile(schema)
                    compiles[key].append(time.perf_counter() - t0)
                    masks += lib.walk(m, _tokens(tok, inst), vocab)
                except Exception as e:  # a library that cannot handle a schema of the workload is a finding
                    compiles[key].append(float("nan"))
                    print(f"{name} {key}: {type(e).__name__}: {str(e)[:200]}")
        rows.append((name, setup, {k: statistics.median(v) for k, v in compiles.items()}, masks))
    print(f"\nvocab {vocab}; mask = one step's allowed-token bitmask for one sequence; {args.repeats} repeats\n")
    print("| library | tokenizer set-up s | " + " | ".join(f"compile {k} ms" for k in SCHEMAS)
          + " | mask p50 µs | mask p99 µs | mask max µs |")
    print("| --- " * (len(SCHEMAS) + 5) + "|")
    for name, setup, comp, masks in rows:
        ms = sorted(masks) or [float("nan")]
        p = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))] * 1e6  # noqa: E731
        print(f"| {name} | {setup:.2f} | " + " | ".join(f"{comp[k] * 1e3:.1f}" for k in SCHEMAS)
              + f" | {p(0.5):.0f} | {p(0.99):.0f} | {ms[-1] * 1e6:.0f} |")


if __name__ == "__main__":
    main()
