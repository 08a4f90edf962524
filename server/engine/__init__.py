"""The inference engine: tensors and steps, no HTTP (DESIGN.md, "Repository layout")."""

from .core import Engine, EngineConfig

__all__ = ["Engine", "EngineConfig"]
