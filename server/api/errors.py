"""The front ends' names for the error kinds of `loraplex.adapters_store.errors`, and pydantic errors as 400s.

There is one hierarchy (`LoraplexError`, defined in the lowest layer so the
store and the trainer derive from it too); the names here are the ones the
front-end code reads best with. The edge (`app.py`, `grpc_server.py`) maps
with `isinstance(e, LoraplexError)`; anything else is an internal error,
logged with its stack trace and answered with a generic 500 / INTERNAL,
never leaked to a client.
"""

from __future__ import annotations

from loraplex.adapters_store.errors import (  # noqa: F401  (re-exported)
    ConflictError,
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    LoraplexError,
    NotFoundError,
    PayloadTooLarge,
    PermissionDenied,
    ResourceExhausted,
    ServiceUnavailable,
    Unauthenticated,
    UnprocessableError,
    kind_for_status,
)

ApiError = LoraplexError
BadRequest = InvalidArgument
NotFound = NotFoundError
Forbidden = PermissionDenied
Conflict = ConflictError
Unprocessable = UnprocessableError
QueueFull = ResourceExhausted
Unavailable = ServiceUnavailable


def internal() -> InternalError:
    return InternalError("internal server error")


def as_client_error(exc: BaseException) -> LoraplexError | None:
    """The error to answer with, or None for a bug (to be logged and answered as a generic internal error)."""
    return exc if isinstance(exc, LoraplexError) else None


def pydantic_error(exc, prefix: str = "") -> BadRequest:
    """A pydantic ValidationError as a 400 naming the first offending field (`prefix` + its dotted path)."""
    errs = exc.errors()
    first = errs[0] if errs else {"loc": (), "msg": str(exc)}
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    loc = f"{prefix}{loc}" if loc else prefix.rstrip(".")
    msg = first.get("msg", "invalid value")
    return BadRequest(f"invalid field '{loc}': {msg}" if loc else f"invalid request: {msg}", param=loc or None)
