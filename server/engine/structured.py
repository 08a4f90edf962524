"""Constrained decoding: a request's output format as a grammar, enforced as a token mask per step.

The grammar library is llguidance (`bench/structured_libs.py` compares it with
xgrammar and outlines-core on this workload; the README says why). A request
that asks for structure (`response_format`, a regex, a choice list, a forced
tool call) gets its grammar compiled on the request thread, *before* it is
queued: a schema the library cannot handle is a 400 naming the field, and the
engine thread never meets a grammar that might fail. Each sequence owns a
`TokenConstraint` (an `LLMatcher`: the parser state after the tokens it has
produced). At every step the engine asks `step_bitmask` for the allowed-token
bitmask of the constrained rows only (llguidance fills all of them at once on
its own threads, without the GIL), the sampler masks those rows' logits, and
the sampled token advances the matcher. Free rows are never touched, so a
request samples the same tokens whatever constrained neighbours share its
step, and constrained and free requests on different adapters run in one
forward pass.

JSON is generated compactly, with `json.dumps`'s separators (`", "`, `": "`)
and no other whitespace: free whitespace lets a weak model loop on newlines
forever, and every answer still parses the same.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from loraplex.adapters_store.errors import InvalidArgument

log = logging.getLogger("loraplex.structured")

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT = {"type": "object"}


def json_schema_grammar(schema: Any, param: str) -> str:
    """The llguidance grammar of JSON values matching `schema` (a dict). Type errors are a 400 naming `param`."""
    import llguidance

    if not isinstance(schema, dict):
        raise InvalidArgument(f"'{param}' must be a JSON Schema object", param=param)
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)


def regex_grammar(pattern: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_regex(pattern)


def lark_grammar(lark: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(lark)


def lark_literal(s: str) -> str:
    """A Lark string literal matching exactly `s` (JSON's escapes are Lark's)."""
    return json.dumps(s, ensure_ascii=False)


def choice_grammar(choices: list[str]) -> str:
    """Exactly one of `choices`."""
    return lark_grammar("start: " + " | ".join(lark_literal(c) for c in choices))


class GrammarCompiler:
    """One per served tokenizer: llguidance's view of the vocabulary, built once on first use."""

    def __init__(self, tokenizer, eos_token_ids: set[int] | list[int], vocab_size: int):
        self.hf_tokenizer = tokenizer
        self.eos_ids = sorted(eos_token_ids)
        self.vocab_size = vocab_size  # width of the model's logits (>= the tokenizer's vocabulary)
        self._lock = threading.Lock()
        self._tokenizer = None
        self._executor = None

    def _ll(self):
        with self._lock:
            if self._tokenizer is None:
                import llguidance
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=len(self.hf_tokenizer),
                                                               eos_token=self.eos_ids)
                self._executor = llguidance.LLExecutor()
            return self._tokenizer

    def warm(self) -> None:
        """Builds the tokenizer view now (start-up), not on the first constrained request."""
        self._ll()

    def compile(self, grammar: str, param: str) -> "TokenConstraint":
        """A fresh constraint for one sequence; a grammar llguidance refuses is a 400 naming `param`.

        Runs on a request thread (matcher construction drops the GIL), never on the engine thread."""
        import llguidance

        m = llguidance.LLMatcher(self._ll(), grammar, log_level=0)
        if m.is_error():
            raise InvalidArgument(f"'{param}' cannot be enforced: {_first_line(m.get_error())}", param=param)
        return TokenConstraint(m, self)


def _first_line(msg: str) -> str:
    msg = msg.strip()
    return msg if len(msg) <= 500 else msg[:500] + "..."


class TokenConstraint:
    """The grammar state of one sequence: which tokens may come next, advanced by each sampled token."""

    def __init__(self, matcher, compiler: GrammarCompiler):
        self.matcher = matcher
        self.compiler = compiler

    def copy(self) -> "TokenConstraint":
        """An independent state at the same position (for the choices of `n` > 1)."""
        return TokenConstraint(self.matcher.deep_copy(), self.compiler)

    def advance(self, token: int) -> bool:
        """Consumes the sampled token; True when the grammar is complete (nothing but EOS may follow)."""
        if not self.matcher.consume_token(token):
            log.warning("constrained sequence got a token its grammar refuses: %s", self.matcher.get_error())
            return True
        return self.matcher.is_stopped()


@dataclass
class StepMasks:
    """The constrained rows of one step: `rows` index the sampler's row list; `bitmask` [len(rows), ceil(V/32)]
    int32, bit j of word w allows token 32·w + j."""

    rows: list[int]
    bitmask: torch.Tensor
    seconds: float  # what filling the masks cost (the bench reports it per step)


def step_bitmask(constraints: list[tuple[int, TokenConstraint]]) -> StepMasks | None:
    """Allowed-token bitmasks of a step's constrained rows, filled in parallel by llguidance's own threads."""
    if not constraints:
        return None
    import llguidance.torch as lt

    t0 = time.perf_counter()
    comp = constraints[0][1].compiler
    bitmask = torch.full(((len(constraints)), (comp.vocab_size + 31) // 32), -1, dtype=torch.int32)
    by_compiler: dict[int, list] = {}
    for k, (_, c) in enumerate(constraints):
        by_compiler.setdefault(id(c.compiler), [c.compiler, []])[1].append((c.matcher, k))
    for compiler, pairs in by_compiler.values():
        compiler._ll()
        lt.fill_next_token_bitmask_par(compiler._executor, pairs, bitmask)
    return StepMasks([i for i, _ in constraints], bitmask, time.perf_counter() - t0)


_SHIFTS = torch.arange(32, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [K, V] fp32 (a copy the caller owns), bitmask [K, W] int32 -> logits with disallowed tokens at -inf."""
    k, v = logits.shape
    allowed = ((bitmask.unsqueeze(-1) >> _SHIFTS) & 1).view(k, -1).bool()  # [K, 32·W]
    if allowed.shape[1] < v:  # logits wider than the tokenizer's vocabulary: padding ids are never allowed
        allowed = torch.cat([allowed, allowed.new_zeros(k, v - allowed.shape[1])], dim=1)
    return logits.masked_fill_(~allowed[:, :v], float("-inf"))

