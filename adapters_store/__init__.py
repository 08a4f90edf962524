"""The versioned adapter store: PEFT adapters on disk, a SQLite registry, validation, routes.

`AdapterStore` is the entry point (see `store.py` for the on-disk layout and the guarantees);
`peft_format.py` documents what an adapter directory must hold, including reward adapters.
"""
from .errors import AdapterConflict, AdapterNotFound, AdapterPathForbidden, InvalidAdapter, InvalidRequest, StoreError
from .peft_format import (
    REWARD_KIND, SCORE_HEAD_FILE, AdapterManifest, BaseModelSpec, load_adapter_weights, load_score_head, validate_adapter_dir,
)
from .store import AdapterStore, AdapterVersion, Route, RouteChange, StoreEvent

__all__ = [
    "AdapterConflict", "AdapterManifest", "AdapterNotFound", "AdapterPathForbidden", "AdapterStore", "AdapterVersion",
    "BaseModelSpec", "InvalidAdapter", "InvalidRequest", "REWARD_KIND", "Route", "RouteChange", "SCORE_HEAD_FILE",
    "StoreError", "StoreEvent", "load_adapter_weights", "load_score_head", "validate_adapter_dir",
]
