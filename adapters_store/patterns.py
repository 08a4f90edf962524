"""PEFT's `rank_pattern` / `alpha_pattern` keys, matched without backtracking.

PEFT treats each key as a regular expression and gives a module the value of the first key for
which `re.match(rf"(.*\\.)?({key})$", module_path)` succeeds. Python's `re` backtracks: a key such
as `(.*.*)*Z` takes exponential time in the module path's length and holds the GIL throughout, so
one adapter_config.json froze the whole server. Here:

- Keys are compiled with RE2 (google-re2), whose matching time is linear in the input whatever the
  pattern, with PEFT's wrapper around them, so a match means what it means in PEFT. Features RE2
  cannot run in bounded time (backreferences, lookaround, atomic groups, possessive repeats) are
  refused.
- Keys that would make PEFT's own backtracking matcher blow up are refused as well (nested or
  alternated repeats, more than `MAX_REPEATS` repeats in one key), so every version the store
  keeps still loads in PEFT, on this server's trainer or anywhere else.
- Keys must also be valid for Python's `re` (what PEFT compiles), and their number and length are
  bounded.

Every refusal is an `InvalidAdapter` (422) naming the field and the key.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import re2

from .errors import InvalidAdapter

try:  # the parser of Python's own `re`: how PEFT reads a key
    from re import _constants as _sre_c, _parser as _sre_p
except ImportError:  # Python < 3.11
    import sre_constants as _sre_c  # type: ignore[no-redef]
    import sre_parse as _sre_p  # type: ignore[no-redef]

MAX_KEYS = 1024
MAX_KEY_CHARS = 512
MAX_REPEATS = 3  # repeats (`*`, `+`, `{m,n}` with n > 1) in one key: bounds PEFT's polynomial backtracking
_REPEATS = (_sre_c.MAX_REPEAT, _sre_c.MIN_REPEAT, getattr(_sre_c, "POSSESSIVE_REPEAT", _sre_c.MAX_REPEAT))
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # refusals are answered to the client, not logged to stderr by absl
_RE2_OPTIONS.max_mem = 1 << 20  # one compiled key; a larger program is refused


@dataclass(frozen=True)
class _Key:
    key: str
    regex: object  # a compiled RE2 regexp of PEFT's `(.*\.)?(key)$`
    value: object


class PatternTable:
    """One of PEFT's pattern dicts, checked and compiled; `lookup` is PEFT's `get_pattern_key` + `dict.get`."""

    def __init__(self, keys: list[_Key]):
        self._keys = keys

    def lookup(self, module: str, default):
        for k in self._keys:
            if k.regex.match(module):
                return k.value
        return default

    def __bool__(self) -> bool:
        return bool(self._keys)


def _refuse(field: str, key: str, why: str) -> InvalidAdapter:
    shown = repr(key) if len(key) <= 80 else repr(key[:77]) + "..."
    return InvalidAdapter(f"adapter_config.json {field} key {shown} {why}", param=f"{field}.{key[:80]}")


def _check_backtracking(field: str, key: str) -> None:
    """Refuses keys whose matching by a backtracking engine (PEFT's `re`) is not bounded by a small polynomial."""
    try:
        tree = _sre_p.parse(key)
    except re.error as e:
        raise _refuse(field, key, f"is not a valid regular expression: {e}") from None
    except (RecursionError, OverflowError, ValueError) as e:
        raise _refuse(field, key, f"is not a usable regular expression: {e}") from None
    repeats = 0

    def walk(items, under_repeat: bool) -> None:
        nonlocal repeats
        for op, av in items:
            if op in _REPEATS:
                lo, hi, sub = av
                if hi > 1:
                    if under_repeat:
                        raise _refuse(field, key, "nests a repeat inside a repeat (like (a*)*): a backtracking "
                                                  "matcher such as PEFT's can take exponential time on it")
                    repeats += 1
                    walk(sub, True)
                else:
                    walk(sub, under_repeat)
            elif op is _sre_c.BRANCH:
                if under_repeat:
                    raise _refuse(field, key, "repeats an alternation (like (a|ab)*): a backtracking matcher such as "
                                              "PEFT's can take exponential time on it")
                for alt in av[1]:
                    walk(alt, under_repeat)
            elif op is _sre_c.SUBPATTERN:
                walk(av[-1], under_repeat)
            elif op in (_sre_c.GROUPREF, _sre_c.GROUPREF_EXISTS, _sre_c.ASSERT, _sre_c.ASSERT_NOT) or \
                    op is getattr(_sre_c, "ATOMIC_GROUP", None):
                raise _refuse(field, key, "uses a backreference, lookaround or atomic group, which cannot be matched "
                                          "in bounded time")

    try:
        walk(tree.data if hasattr(tree, "data") else tree, False)
    except RecursionError:
        raise _refuse(field, key, "nests groups too deeply") from None
    if repeats > MAX_REPEATS:
        raise _refuse(field, key, f"has {repeats} repeats; at most {MAX_REPEATS} are accepted in one key "
                                  "(a backtracking matcher such as PEFT's slows down polynomially with each)")


def compile_patterns(raw, field: str, value_check) -> PatternTable:
    """`raw` (the JSON value of `field`) as a PatternTable; `value_check(field, key, value)` returns the
    value to use or raises InvalidAdapter. Null and {} mean no pattern."""
    if raw is None:
        return PatternTable([])
    if not isinstance(raw, dict):
        raise InvalidAdapter(f"adapter_config.json {field} must be an object mapping module-name patterns to values, "
                             f"got {type(raw).__name__}", param=field)
    if len(raw) > MAX_KEYS:
        raise InvalidAdapter(f"adapter_config.json {field} has {len(raw)} keys; at most {MAX_KEYS} are accepted",
                             param=field)
    out = []
    for key, value in raw.items():
        if not isinstance(key, str) or not key:
            raise InvalidAdapter(f"adapter_config.json {field} has an empty key", param=field)
        if len(key) > MAX_KEY_CHARS:
            raise _refuse(field, key, f"is {len(key)} characters long; at most {MAX_KEY_CHARS} are accepted")
        if "\0" in key or not key.isprintable():
            raise _refuse(field, key, "contains control characters")
        if "{," in key:  # Python reads {,n} as {0,n}, RE2 as literal text: the two would disagree
            raise _refuse(field, key, "uses {,n}; write {0,n}")
        v = value_check(field, key, value)
        _check_backtracking(field, key)
        try:
            rx = re2.compile(rf"(.*\.)?({key})$", _RE2_OPTIONS)
        except re2.error as e:
            why = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
            raise _refuse(field, key, f"cannot be matched in bounded time ({why})") from None
        out.append(_Key(key, rx, v))
    return PatternTable(out)


def compile_fullmatch(field: str, key) -> object:
    """A string-valued regex field (`target_modules` as a string: PEFT's `re.fullmatch`) under the same checks."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS or "\0" in key or not key.isprintable():
        raise InvalidAdapter(f"adapter_config.json {field} must be a printable regular expression of 1-{MAX_KEY_CHARS} "
                             "characters", param=field)
    if "{," in key:
        raise _refuse(field, key, "uses {,n}; write {0,n}")
    _check_backtracking(field, key)
    try:
        return re2.compile(rf"(?:{key})$", _RE2_OPTIONS)
    except re2.error as e:
        why = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise _refuse(field, key, f"cannot be matched in bounded time ({why})") from None


def rank_value(field: str, key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _refuse(field, key, f"maps to {value!r}; a rank must be a positive integer")
    return value


def finite_number(value) -> float | None:
    """`value` as a float when it is a JSON number that is finite as a float, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        f = float(value)
    except OverflowError:  # an integer past the float range
        return None
    return f if math.isfinite(f) else None


def alpha_value(field: str, key: str, value) -> float:
    f = finite_number(value)
    if f is None:
        raise _refuse(field, key, f"maps to {str(value)[:40]}; lora_alpha must be a finite number")
    return f
