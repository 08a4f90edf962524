"""Store errors; each carries its HTTP status and gRPC code so front ends map them in one place."""
from __future__ import annotations


class StoreError(Exception):
    http_status = 400
    grpc_code = "INVALID_ARGUMENT"

    def __init__(self, message: str = "", *, param: str | None = None):
        super().__init__(message)
        self.param = param


class AdapterNotFound(StoreError):
    http_status = 404
    grpc_code = "NOT_FOUND"


class InvalidAdapter(StoreError):
    http_status = 422
    grpc_code = "FAILED_PRECONDITION"


class AdapterPathForbidden(StoreError):
    http_status = 403
    grpc_code = "PERMISSION_DENIED"


class AdapterConflict(StoreError):
    http_status = 409
    grpc_code = "FAILED_PRECONDITION"


class InvalidRequest(StoreError):
    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class StoreBusy(StoreError):
    """Too many registrations are copying files already; retry later."""
    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"
