"""`name@version` references and version numbers as clients write them: one parser for every front end.

A version is a positive decimal number written with the ASCII digits 0-9 only. `str.isdigit` and
`int()` also accept other scripts' digits (`int('١') == 1`, and `'²'.isdigit()` is true while
`int('²')` raises), so a check built from them let `a1@١` delete version 1 and `a1@²` answer 500.
Versions are bounded by what the gRPC API can carry (uint32).
"""
from __future__ import annotations

import re

from .errors import InvalidRequest

MAX_VERSION = 2**32 - 1
_VERSION = re.compile(r"[0-9]{1,10}", re.ASCII)


def parse_version(text, *, param: str = "version", what: str = "version") -> int:
    """The version number `text` names (a str of ASCII digits, or an int); InvalidRequest otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        v = text
    elif isinstance(text, str) and _VERSION.fullmatch(text):
        v = int(text)
    else:
        raise InvalidRequest(f"{what} {_shown(text)} is not an integer written with the digits 0-9", param=param)
    if not 1 <= v <= MAX_VERSION:
        raise InvalidRequest(f"{what} {v} is not a positive integer up to {MAX_VERSION}", param=param)
    return v


def parse_ref(ref, *, param: str = "model") -> tuple[str, int | None]:
    """`name` or `name@version` -> (name, version or None); InvalidRequest for a malformed version.

    The name is returned as written: whether it exists (404) is the store's business."""
    if not isinstance(ref, str):
        raise InvalidRequest(f"{param} must be a string", param=param)
    name, sep, ver = ref.partition("@")
    if not sep:
        return name, None
    return name, parse_version(ver, param=param, what=f"{param} {_shown(ref)}: version")


def _shown(text) -> str:
    s = repr(text)
    return s if len(s) <= 40 else s[:37] + "..."
