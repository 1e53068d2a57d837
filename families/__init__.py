"""Model families: the model table (:mod:`families.registry`) and one adapter per architecture.

``adapter_for(transformer)`` picks the adapter of a transformer module (or class name); stages ask it
everything that is architecture-specific (see :mod:`families.base`). Adding an architecture: one adapter
module here and one line in :data:`ADAPTERS`; adding a model of a known architecture: one registry entry.
"""

from __future__ import annotations

from typing import Any

from common.errors import UserError
from families.base import FamilyAdapter
from families.flux import FluxAdapter
from families.flux2 import Flux2Adapter
from families.sd3 import SD3Adapter

ADAPTERS: dict[str, FamilyAdapter] = {a.name: a for a in (SD3Adapter(), FluxAdapter(), Flux2Adapter())}


def get_adapter(name: str) -> FamilyAdapter:
    if name not in ADAPTERS:
        raise UserError(f"unknown model family {name!r}; known: {', '.join(ADAPTERS)}")
    return ADAPTERS[name]


def published_configs() -> dict[str, tuple[FamilyAdapter, dict[str, Any]]]:
    """Every published transformer config the adapters carry, by name (``sd3-medium``, ``flux.1-dev``, ...):
    ``{name: (adapter, config)}``; configs are diffusers ``from_config`` keyword arguments without ``sample_size``."""
    return {name: (a, dict(cfg)) for a in ADAPTERS.values() for name, cfg in a.published_configs.items()}


def published_config(name: str) -> tuple[FamilyAdapter, dict[str, Any]]:
    """``(adapter, config)`` of one published transformer config; one-line :class:`UserError` for an unknown name."""
    known = published_configs()
    if name not in known:
        raise UserError(f"unknown published config {name!r}; choose from {', '.join(sorted(known))}")
    return known[name]


def adapter_for(model: Any) -> FamilyAdapter:
    """The adapter of a transformer module, class or class name; one-line :class:`UserError` otherwise."""
    cls = model if isinstance(model, str) else (model.__name__ if isinstance(model, type) else type(model).__name__)
    for a in ADAPTERS.values():
        if a.transformer_class == cls:
            return a
    known = ", ".join(a.transformer_class for a in ADAPTERS.values())
    raise UserError(f"no model family handles {cls}; supported transformers: {known}")
