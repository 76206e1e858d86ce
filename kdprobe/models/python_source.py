"""`python:package.module:factory`: the user's own model, built by their own code.

Naming this architecture IMPORTS AND RUNS that module (the user's explicit choice, like
`python -c "import package.module"`), then calls `factory(num_classes=..., **kwargs)`, adding
`in_channels=...` only when the factory has a parameter of that name. The module is looked
up on sys.path, and in the current directory when it is not found there. Names are kept as
written (module paths are case-sensitive); these models are never auto-detected.

A file never chooses code: a checkpoint whose recorded architecture is `python:...` is refused
unless the user names the same architecture (`--arch python:MODULE:FACTORY`); see
`registry.names_code` and `kdprobe.checkpoints.format.load_checkpoint`.
"""
from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

import torch.nn as nn

from kdprobe.errors import KdprobeError
from kdprobe.models.registry import Source, register_source

_DOTTED = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*"
USAGE = "python:MODULE:FACTORY"


def _canonical(rest: str) -> str:
    rest = rest.strip()
    if not re.fullmatch(rf"{_DOTTED}:{_DOTTED}", rest):
        raise KdprobeError(f"expected {USAGE} (e.g. python:mypackage.models:build_net), got python:{rest}; "
                           "name an importable module, a colon, and the function or class that builds the model")
    return rest


def _is_the_module(module: str, e: ModuleNotFoundError) -> bool:
    """True when `module` itself (or a parent package) is missing, not something it imports."""
    return bool(e.name) and (module == e.name or module.startswith(e.name + "."))


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if not _is_the_module(module, e):
            raise
        cwd = str(Path.cwd())
        if cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)  # `kdprobe` run as a script does not search the current directory
        try:
            return importlib.import_module(module)
        finally:
            sys.path.remove(cwd)


def load_factory(rest: str):
    """Import MODULE and return its FACTORY attribute (dotted attributes allowed)."""
    module, _, attr = _canonical(rest).partition(":")
    try:
        obj = _import(module)
    except ModuleNotFoundError as e:
        if not _is_the_module(module, e):  # found, but it imports something missing
            raise KdprobeError(f"importing {module!r} for python:{rest} failed: ModuleNotFoundError: {e}") from e
        raise KdprobeError(f"cannot import {module!r} for python:{rest} ({e}); put it on PYTHONPATH or run "
                           "kdprobe from the folder that holds it") from e
    except Exception as e:  # noqa: BLE001 - the user's module failed while importing: one line, cause kept
        raise KdprobeError(f"importing {module!r} for python:{rest} failed: {type(e).__name__}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise KdprobeError(f"module {module!r} has no attribute {attr!r} (python:{rest}); check the name after the colon")
        obj = getattr(obj, part)
    if not callable(obj):
        raise KdprobeError(f"python:{rest} is a {type(obj).__name__}, expected a function or class that builds the model")
    return obj


def _resolve(rest: str):
    def factory(num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
        fn = load_factory(rest)
        call = dict(kwargs, num_classes=num_classes)
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):  # no introspectable signature: pass what the contract says
            params = {}
        if "in_channels" in params:
            call["in_channels"] = in_channels
        if params:
            try:
                inspect.signature(fn).bind(**call)
            except TypeError as e:
                raise KdprobeError(f"python:{rest} does not accept {sorted(call)}: {e}; it must take "
                                   "num_classes=... (and any --arch-kwargs you pass)") from None
        try:
            model = fn(**call)
        except Exception as e:  # noqa: BLE001 - the user's factory failed: one line, cause kept
            raise KdprobeError(f"python:{rest}({', '.join(f'{k}={v!r}' for k, v in call.items())}) raised "
                               f"{type(e).__name__}: {e}") from e
        if not isinstance(model, nn.Module):
            raise KdprobeError(f"python:{rest} returned a {type(model).__name__}, expected a torch.nn.Module")
        return model

    factory.__doc__ = f"The user's model: {rest}(num_classes=..., **kwargs)."
    return factory


register_source(Source(prefix="python", resolve=_resolve, canonical=_canonical, names=lambda: [], usage=USAGE,
                       runs_code=True))
