"""The one error hierarchy of loraplex: every error a client may see derives from `LoraplexError`.

The base class carries what the edge needs to answer: `http_status`, the gRPC
status code name (`grpc_code`), OpenAI's error `type` (`error_type`) and the
offending field (`param`). The kinds below fix those four once per kind of
failure; the store's, the trainer's and the front ends' errors derive from a
kind, so both front ends map any of them with one `isinstance(e, LoraplexError)`
and never guess from attribute names or class names. Anything else that
escapes to the edge is a bug: logged with its stack trace, answered with a
generic 500 / INTERNAL.

It lives here, in the lowest layer (`adapters_store` imports nothing of ours),
so that every other package can import it without an upward dependency.
"""

from __future__ import annotations


class LoraplexError(Exception):
    """A request the server refuses or cannot serve; its class says how it is answered."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        """OpenAI's error shape."""
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


# --- kinds: each states its HTTP status, gRPC code and OpenAI type once ---------------------------------------


class InvalidArgument(LoraplexError):
    """A malformed body or a field with a wrong type or value (400 / INVALID_ARGUMENT)."""


class Unauthenticated(LoraplexError):
    http_status = 401
    grpc_code = "UNAUTHENTICATED"
    error_type = "authentication_error"


class PermissionDenied(LoraplexError):
    http_status = 403
    grpc_code = "PERMISSION_DENIED"
    error_type = "permission_error"


class NotFoundError(LoraplexError):
    http_status = 404
    grpc_code = "NOT_FOUND"
    error_type = "not_found_error"


class ConflictError(LoraplexError):
    http_status = 409
    grpc_code = "FAILED_PRECONDITION"
    error_type = "conflict_error"


class PayloadTooLarge(LoraplexError):
    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"
    error_type = "invalid_request_error"


class UnprocessableError(LoraplexError):
    """Well-formed but unusable here (an adapter that does not fit the base...): 422 / FAILED_PRECONDITION."""

    http_status = 422
    grpc_code = "FAILED_PRECONDITION"
    error_type = "unprocessable_entity_error"


class ResourceExhausted(LoraplexError):
    """A full queue or a quota: retry later (429 / RESOURCE_EXHAUSTED)."""

    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"
    error_type = "rate_limit_error"


class InternalError(LoraplexError):
    """The server failed (500 / INTERNAL); the message is generic, details are in the server log."""

    http_status = 500
    grpc_code = "INTERNAL"
    error_type = "server_error"


class ServiceUnavailable(LoraplexError):
    http_status = 503
    grpc_code = "UNAVAILABLE"
    error_type = "service_unavailable_error"


class DeadlineExceeded(LoraplexError):
    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"
    error_type = "timeout_error"


_KIND_BY_STATUS = {
    k.http_status: k
    for k in (
        InvalidArgument,
        Unauthenticated,
        PermissionDenied,
        NotFoundError,
        ConflictError,
        PayloadTooLarge,
        UnprocessableError,
        ResourceExhausted,
        InternalError,
        ServiceUnavailable,
        DeadlineExceeded,
    )
}


def kind_for_status(status: int) -> type[LoraplexError]:
    """The kind answering with HTTP `status` (for errors whose status is decided where they are raised)."""
    return _KIND_BY_STATUS.get(status, InvalidArgument)


# --- the store's errors ------------------------------------------------------------------------------------------


class StoreError(LoraplexError):
    """Anything the adapter store refuses; 400 unless a more specific kind says otherwise."""


class AdapterNotFound(StoreError, NotFoundError):
    pass


class InvalidAdapter(StoreError, UnprocessableError):
    pass


class AdapterPathForbidden(StoreError, PermissionDenied):
    pass


class AdapterConflict(StoreError, ConflictError):
    pass


class InvalidRequest(StoreError, InvalidArgument):
    pass


class StoreBusy(StoreError, ResourceExhausted):
    """Too many adapter registrations are copying files already; retry later."""


class StoreUnavailable(StoreError, ServiceUnavailable):
    """The store's object storage cannot be reached or refuses us (endpoint, credentials, bucket): 503."""
