"""The versioned adapter store: PEFT adapters on disk, a SQLite registry, validation, routes."""
from .errors import AdapterConflict, AdapterNotFound, AdapterPathForbidden, InvalidAdapter, InvalidRequest, StoreError
from .peft_format import AdapterManifest, BaseModelSpec, load_adapter_weights, load_score_head, validate_adapter_dir
from .store import AdapterStore, AdapterVersion, Route, RouteChange, StoreEvent

__all__ = [
    "AdapterConflict", "AdapterManifest", "AdapterNotFound", "AdapterPathForbidden", "AdapterStore", "AdapterVersion",
    "BaseModelSpec", "InvalidAdapter", "InvalidRequest", "Route", "RouteChange", "StoreError", "StoreEvent",
    "load_adapter_weights", "load_score_head", "validate_adapter_dir",
]
