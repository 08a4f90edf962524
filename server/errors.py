"""Typed errors of the front ends, mapped once to HTTP status / gRPC code / OpenAI error body.

Anything raised below the front ends that is not one of these (or a store
error, which carries its own mapping) is an internal error: logged with its
stack trace, answered with a generic 500 / INTERNAL, never leaked to a client.
"""
from __future__ import annotations


class ApiError(Exception):
    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


class BadRequest(ApiError):
    """A malformed body or a field with a wrong type or value (400 / INVALID_ARGUMENT)."""


class NotFound(ApiError):
    http_status = 404
    grpc_code = "NOT_FOUND"
    error_type = "not_found_error"


class Forbidden(ApiError):
    http_status = 403
    grpc_code = "PERMISSION_DENIED"
    error_type = "permission_error"


class Conflict(ApiError):
    http_status = 409
    grpc_code = "FAILED_PRECONDITION"
    error_type = "conflict_error"


class Unprocessable(ApiError):
    http_status = 422
    grpc_code = "FAILED_PRECONDITION"
    error_type = "unprocessable_entity_error"


class QueueFull(ApiError):
    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"
    error_type = "rate_limit_error"


class Unavailable(ApiError):
    http_status = 503
    grpc_code = "UNAVAILABLE"
    error_type = "service_unavailable_error"


def from_store_error(exc: Exception) -> ApiError:
    """Store errors carry http_status/grpc_code class attributes; wrap them keeping both."""
    err = ApiError(str(exc))
    err.http_status = getattr(exc, "http_status", 400)
    err.grpc_code = getattr(exc, "grpc_code", "INVALID_ARGUMENT")
    err.error_type = {403: "permission_error", 404: "not_found_error", 409: "conflict_error", 422: "unprocessable_entity_error"}.get(
        err.http_status, "invalid_request_error"
    )
    return err


def pydantic_error(exc) -> BadRequest:
    """A pydantic ValidationError as a 400 naming the first offending field."""
    errs = exc.errors()
    first = errs[0] if errs else {"loc": (), "msg": str(exc)}
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    msg = first.get("msg", "invalid value")
    return BadRequest(f"invalid field '{loc}': {msg}" if loc else f"invalid request: {msg}", param=loc or None)


class InternalError(ApiError):
    """The engine failed a request (500 / INTERNAL); the message is generic, details are in the server log."""

    http_status = 500
    grpc_code = "INTERNAL"
    error_type = "server_error"
