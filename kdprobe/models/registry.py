"""One model registry: `create_model(name, **kwargs)` is the only way to build a model.

Every registered factory returns an nn.Module with
  forward_features(x) -> last feature map before pooling, shape (N, C, H, W)
  forward_head(f)     -> logits, shape (N, num_classes)
  forward(x)          == forward_head(forward_features(x))
  feature_channels    -> C of that feature map (feature KD builds its regressor from it)
and carries `model.arch = {"name": canonical_name, "kwargs": {...}}`, which is exactly
what a checkpoint stores to rebuild it (pruned widths included).
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch.nn as nn

from kdprobe.errors import KdprobeError

_FACTORIES: dict[str, Callable[..., nn.Module]] = {}
_ALIASES: dict[str, str] = {}


def register_model(name: str, *aliases: str):
    """Decorator: register `fn(num_classes, in_channels, **kw) -> nn.Module` under `name`."""

    def deco(fn):
        if name in _FACTORIES or name in _ALIASES:
            raise RuntimeError(f"model {name!r} registered twice")
        _FACTORIES[name] = fn
        for a in aliases:
            _ALIASES[a] = name
        return fn

    return deco


def canonical_name(name: str) -> str:
    """Resolve an alias (e.g. 'resnet56' -> 'resnet56b'); unknown names fail listing the known ones."""
    name = name.strip().lower()
    name = _ALIASES.get(name, name)
    if name not in _FACTORIES:
        known = ", ".join(list_models())
        raise KdprobeError(f"unknown model {name!r}; known models: {known}")
    return name


def list_models(include_aliases: bool = False) -> list[str]:
    """Names of all registered models (canonical; aliases optionally)."""
    names = sorted(_FACTORIES)
    if include_aliases:
        names += sorted(_ALIASES)
    return names


def model_aliases() -> dict[str, str]:
    """Alias -> canonical name."""
    return dict(_ALIASES)


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build a registered model; the result remembers how it was built in `model.arch`."""
    cname = canonical_name(name)
    if num_classes < 1 or in_channels < 1:
        raise KdprobeError(f"expected num_classes >= 1 and in_channels >= 1, got {num_classes}, {in_channels}")
    factory = _FACTORIES[cname]
    try:
        bound = inspect.signature(factory).bind(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except TypeError as e:  # unknown keyword: say which model rejected which argument
        raise KdprobeError(f"model {cname!r} does not accept these arguments: {e}") from None
    bound.apply_defaults()
    model = factory(*bound.args, **bound.kwargs)
    # Record every argument, defaults included: a later change of a factory default must not
    # silently rebuild an old checkpoint as a different network.
    model.arch = {"name": cname, "kwargs": dict(bound.arguments)}
    return model
