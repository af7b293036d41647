"""One `create_model(name, **kwargs)` entry for every architecture (timm-style registry).

Builders register themselves with `@register_model("name")`; `cpsam.models` imports every model
module so that the registry is full as soon as `cpsam.models` is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

ModelBuilder = Callable[..., nn.Module]
_F = TypeVar("_F", bound=ModelBuilder)
_BUILDERS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[_F], _F]:
    """Decorator that registers a builder `fn(**kwargs) -> nn.Module` under `name`."""

    def decorator(fn: _F) -> _F:
        if name in _BUILDERS:
            raise ValueError(f"model name {name!r} is registered twice")
        _BUILDERS[name] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    """Names accepted by `create_model`, sorted."""
    return sorted(_BUILDERS)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered as `name` with random (or builder-default) weights.

    Every model class exposes `model_name` (a registry name) and `model_kwargs()` such that
    `create_model(m.model_name, **m.model_kwargs())` rebuilds its architecture (checkpoints use it).
    Raises ValueError naming the known models when `name` is unknown.
    """
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None
    return builder(**kwargs)
