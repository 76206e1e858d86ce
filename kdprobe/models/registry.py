"""One model registry: `create_model(name, **kwargs)` is the only way to build a model.

Names:
  resnet56a, vgg19_bn, ...        kdprobe's own architectures (static registrations)
  repdistiller:resnet8x4, ...     other codebases' architectures, named by source (static)
  torchvision:resnet18, python:pkg.mod:factory
                                  dynamic sources: a resolver turns the part after the prefix
                                  into a factory (see `register_source`)

Every model built here carries `model.arch = {"name": canonical_name, "kwargs": {...}}`,
which is exactly what a checkpoint stores to rebuild it (pruned widths included). kdprobe's
own families also provide forward_features(x) / forward_head(f) / feature_channels; every
model may name the module whose output is its last feature map before pooling in
`model.feature_layer` (a dotted module name, or NAME:in for its input; feature KD hooks it).

Auto-detection of foreign checkpoints (kdprobe.detect) needs, per family, a function that
reads the constructor's keyword arguments off a state_dict (`register_model(..., infer=fn)`),
and knows which names compute the same function (aliases share one canonical name).
"""
from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from kdprobe.errors import KdprobeError
from kdprobe.runtime.machine import available_memory
from kdprobe.ranges import Range

_FACTORIES: dict[str, Callable[..., nn.Module]] = {}
_ALIASES: dict[str, str] = {}
_INFER: dict[str, Callable[[dict], dict | None]] = {}
_UNDETECTABLE: set[str] = set()
_SOURCES: dict[str, "Source"] = {}


@dataclass(frozen=True)
class Source:
    """A dynamic family of names `PREFIX:REST` (e.g. torchvision:resnet18)."""

    prefix: str
    resolve: Callable[[str], Callable[..., nn.Module]]  # REST -> factory(num_classes, in_channels, **kw)
    canonical: Callable[[str], str]  # REST -> canonical REST (e.g. lowercased), raises KdprobeError if unknown
    names: Callable[[], list[str]]  # the REST values worth listing (may be empty: python:...)
    infer: Callable[[str, dict], dict | None] | None = None  # (REST, state_dict) -> kwargs
    detectable: Callable[[], list[str]] | None = None  # REST values auto-detection tries
    usage: str = ""  # how to write a name, for listings (e.g. "python:MODULE:FACTORY")
    runs_code: bool = False  # building imports code the name chooses: honoured only when the user typed it


def register_model(name: str, *aliases: str, infer: Callable[[dict], dict | None] | None = None,
                   detect: bool = True):
    """Decorator: register `fn(num_classes, in_channels, **kw) -> nn.Module` under `name`.

    infer(state_dict) -> kwargs (num_classes, widths, cfg, ...) read off the tensors, or None
    when the state_dict cannot be this family; detect=False keeps a name out of auto-detection
    (e.g. a kdprobe-only legacy variant that no foreign file can hold).
    """
    name = name.strip().lower()

    def deco(fn):
        if name in _FACTORIES or name in _ALIASES:
            raise RuntimeError(f"model {name!r} registered twice")
        _FACTORIES[name] = fn
        for a in aliases:
            _ALIASES[a.strip().lower()] = name
        if infer is not None:
            _INFER[name] = infer
        if not detect:
            _UNDETECTABLE.add(name)
        return fn

    return deco


def register_infer(name: str, fn: Callable[[dict], dict | None]) -> None:
    """Set the kwargs-inference rule of an already registered model (see register_model's infer)."""
    cname = canonical_name(name)
    if cname not in _FACTORIES:
        raise RuntimeError(f"register_infer: {name!r} is not a static registration")
    _INFER[cname] = fn


def register_alias(alias: str, name: str) -> None:
    """Add a name for an already registered model (another codebase's name for the same network)."""
    alias, name = alias.strip().lower(), name.strip().lower()
    if name not in _FACTORIES:
        raise RuntimeError(f"cannot alias {alias!r} to {name!r}: {name!r} is not registered (import order?)")
    if alias in _FACTORIES or alias in _ALIASES:
        raise RuntimeError(f"model {alias!r} registered twice")
    _ALIASES[alias] = name


def register_source(source: Source) -> None:
    """Register a dynamic name family (torchvision:NAME, python:MODULE:FACTORY)."""
    if source.prefix in _SOURCES:
        raise RuntimeError(f"source {source.prefix!r} registered twice")
    _SOURCES[source.prefix] = source


def _split_source(name: str) -> tuple[Source, str] | None:
    prefix, sep, rest = name.partition(":")
    src = _SOURCES.get(prefix.strip().lower()) if sep else None
    return (src, rest.strip()) if src is not None else None


def canonical_name(name: str) -> str:
    """Resolve an alias (e.g. 'resnet56' -> 'resnet56b'); unknown names fail listing the known ones."""
    if not isinstance(name, str) or not name.strip():
        raise KdprobeError(f"expected a model name (see `kdprobe models`), got {name!r}")
    dyn = _split_source(name)
    if dyn is not None:
        src, rest = dyn
        return f"{src.prefix}:{src.canonical(rest)}"
    name = name.strip().lower()
    name = _ALIASES.get(name, name)
    if name not in _FACTORIES:
        known = ", ".join(list_models())
        prefixes = ", ".join(f"{p}:NAME" for p in sorted(_SOURCES))
        raise KdprobeError(f"unknown model {name!r}; known models: {known}" + (f"; and {prefixes}" if prefixes else ""))
    return name


def factory(name: str) -> Callable[..., nn.Module]:
    """The factory behind a (canonical or alias) name."""
    cname = canonical_name(name)
    dyn = _split_source(cname)
    return dyn[0].resolve(dyn[1]) if dyn is not None else _FACTORIES[cname]


def infer_kwargs(name: str, state_dict: dict) -> dict | None:
    """Constructor kwargs read off a state_dict by the family's own rule; None = cannot be this family."""
    cname = canonical_name(name)
    dyn = _split_source(cname)
    if dyn is not None:
        src, rest = dyn
        return src.infer(rest, state_dict) if src.infer is not None else {}
    fn = _INFER.get(cname)
    return fn(state_dict) if fn is not None else {}


def detectable_models() -> list[str]:
    """Canonical names auto-detection tries (static ones, then each source's list)."""
    names = [n for n in sorted(_FACTORIES) if n not in _UNDETECTABLE]
    for p, src in sorted(_SOURCES.items()):
        if src.detectable is not None:
            names += [f"{p}:{r}" for r in src.detectable()]
    return names


def names_code(name: str) -> bool:
    """True when building `name` imports and runs code that the name itself chooses (python:MODULE:FACTORY).

    Such a name is honoured only when the user typed it (--arch, --model, a spec they wrote); a name read
    from a file (a checkpoint's arch record) never is: see kdprobe.checkpoints.format.load_checkpoint. No import
    happens here."""
    if not isinstance(name, str):
        return False
    dyn = _split_source(name)
    return dyn is not None and dyn[0].runs_code


def list_models(include_aliases: bool = False) -> list[str]:
    """Names of all registered models (canonical; aliases optionally); dynamic sources not expanded."""
    names = sorted(_FACTORIES)
    if include_aliases:
        names += sorted(_ALIASES)
    return names


def list_sources() -> dict[str, list[str]]:
    """Dynamic sources: prefix -> the names worth listing."""
    return {p: list(src.names()) for p, src in sorted(_SOURCES.items())}


def source_usage(prefix: str) -> str:
    """How to write a name of a dynamic source, e.g. "python:MODULE:FACTORY"."""
    return _SOURCES[prefix].usage or f"{prefix}:NAME"


def model_aliases() -> dict[str, str]:
    """Alias -> canonical name."""
    return dict(_ALIASES)


# width multiplier of ResNets/VGG: > 0, and at most 10,000 (a ResNet-20 at width 10,000 would hold ~1e14
# weights: the memory check refuses far below that; the bound keeps the channel arithmetic in integers)
WIDTH = Range(float, 0, 10_000, low_open=True)
_COUNT = Range(int, 1)  # num_classes, in_channels


def _bind(cname: str, fn, num_classes, in_channels, kwargs: dict) -> inspect.BoundArguments:
    _COUNT.check(num_classes, "num_classes")
    _COUNT.check(in_channels, "in_channels")
    if not all(isinstance(k, str) for k in kwargs):
        raise KdprobeError(f"expected model arguments named by strings, got {sorted(map(repr, kwargs))}")
    try:
        bound = inspect.signature(fn).bind(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except TypeError as e:  # unknown keyword: say which model rejected which argument
        raise KdprobeError(f"model {cname!r} does not accept these arguments: {e}") from None
    if "width" in bound.arguments:
        WIDTH.check(bound.arguments["width"], f"the width of {cname}")
    return bound


def check_model_kwargs(name: str, kwargs: dict) -> None:
    """Check a model name and its keyword arguments (unknown names, width range) without building it."""
    cname = canonical_name(name)
    if not isinstance(kwargs, dict):
        raise KdprobeError(f"expected model kwargs as a table/dict, got {kwargs!r}")
    clash = sorted({"num_classes", "in_channels"} & set(kwargs))
    if clash:
        raise KdprobeError(f"expected model kwargs without {', '.join(clash)} (the dataset sets them), got {kwargs}")
    _bind(cname, factory(cname), 10, 3, kwargs)


class _SkipInit(TorchFunctionMode):
    """On the meta device, skip in-place initializers: counting parameters needs shapes, not values
    (and meta-device random init would import torch._dynamo, seconds per process)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        t = args[0] if args else kwargs.get("tensor", kwargs.get("input"))
        if name.endswith("_") and not name.endswith("__") and isinstance(t, torch.Tensor) and t.is_meta:
            return t
        return func(*args, **kwargs)


# (bytes, why) a model built now may take at most, besides free memory: set while a file's record is
# rebuilt, so a few kilobytes that declare 10^8 classes cannot make kdprobe allocate gigabytes.
_BUDGET: ContextVar[tuple[int, str] | None] = ContextVar("kdprobe_weight_budget", default=None)


@contextmanager
def weight_budget(nbytes: int, why: str):
    """Within this block, create_model refuses a model whose weights and buffers exceed `nbytes` (`why` says
    where the bound comes from, e.g. "what the 96 KB file holds")."""
    token = _BUDGET.set((int(nbytes), why))
    try:
        yield
    finally:
        _BUDGET.reset(token)


def _check_size(cname: str, fn, bound: inspect.BoundArguments) -> None:
    """Refuse a model whose weights alone would not fit in free memory (e.g. width 2000), or exceed the budget
    of the file it is rebuilt from, before allocating: it is first built on the meta device (no memory)."""
    free, budget = available_memory(), _BUDGET.get()
    if free is None and budget is None:
        return
    try:
        with torch.device("meta"), _SkipInit():
            m = fn(*bound.args, **bound.kwargs)
        n = sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))
    except Exception:  # noqa: BLE001 - a factory that cannot build on meta: the real build will say
        return
    kw = {k: v for k, v in bound.arguments.items() if k not in ("in_channels",) and v is not None}
    shown = " ".join(repr(kw).split())[:200]
    if budget is not None and n > budget[0]:
        raise KdprobeError(f"model {cname} with {shown} would need {_size(n)} of weights, more than {budget[1]} can "
                           f"justify ({_size(budget[0])}); the file's architecture record is damaged or hostile: "
                           "re-create the checkpoint")
    if free is not None and n > free:
        raise KdprobeError(f"model {cname} with {shown} would need {_size(n)} for its weights alone, more than the "
                           f"{_size(free)} of memory free now; expected a smaller width/size")


def _size(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build a registered model; the result remembers how it was built in `model.arch`."""
    cname = canonical_name(name)
    fn = factory(cname)
    bound = _bind(cname, fn, num_classes, in_channels, kwargs)
    bound.apply_defaults()
    _check_size(cname, fn, bound)
    try:
        model = fn(*bound.args, **bound.kwargs)
    except KdprobeError:
        raise
    except (OverflowError, MemoryError, TypeError, ValueError, RuntimeError) as e:  # arguments it cannot build
        kw = {k: v for k, v in bound.arguments.items() if k not in ("num_classes", "in_channels")}
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise KdprobeError(f"model {cname} with {' '.join(repr(kw).split())[:200]} cannot be built "
                           f"({type(e).__name__}: {why}); check its arguments (widths, cfg)") from None
    if not isinstance(model, nn.Module):
        raise KdprobeError(f"model {cname} was built as a {type(model).__name__}, expected a torch.nn.Module")
    lazy = next((n for n, p in model.named_parameters() if nn.parameter.is_lazy(p)), None)
    if lazy is not None:  # shapes unknown until a first forward: no size check, no state_dict to match
        raise KdprobeError(f"model {cname} has an uninitialized lazy parameter {lazy!r} (nn.LazyLinear, "
                           "nn.LazyConv2d, ...); expected a model with known shapes: use nn.Linear/nn.Conv2d, or "
                           "run one forward pass inside the factory before returning the model")
    # Record every argument, defaults included: a later change of a factory default must not
    # silently rebuild an old checkpoint as a different network. A factory's **kwargs
    # (torchvision:, python:) are recorded flat, so create_model(name, **kwargs) rebuilds it.
    recorded = dict(bound.arguments)
    for p in inspect.signature(fn).parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            recorded.update(recorded.pop(p.name, {}))
    model.arch = {"name": cname, "kwargs": recorded}
    return model
