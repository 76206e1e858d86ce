"""Other codebases' checkpoints: the benign objects they carry, the state_dict inside, and
auto-detection of the architecture from tensor names and shapes.

Benign globals. Real checkpoints carry an `argparse.Namespace` of options (RepDistiller's
`*_last.pth`), numpy scalars and dtypes (`best_prec1`), numpy arrays and OrderedDicts. These are
allow-listed for torch's weights_only unpickler (`BENIGN_GLOBALS`): reconstructing them runs no
code of the file's choosing. Anything else is still refused, and nothing ever falls back to full
unpickling.

Detection. Every detectable architecture (kdprobe.models.registry.detectable_models) reads its
constructor arguments off the tensors (its `infer` rule; None = cannot be this family), is built
on the meta device (no memory, no init cost) and compared key by key and shape by shape. Exactly
one fitting network -> use it; several that are different networks -> an error listing them;
none -> the closest candidate and its first mismatching key with both shapes. Names that are
aliases of one canonical name compute the same function and count once.
"""
from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass, field

import numpy as np
import torch

from kdprobe.errors import KdprobeError
from kdprobe.files.torchfile import BENIGN_GLOBALS  # noqa: F401 (re-exported)
from kdprobe.models import create_model
from kdprobe.models.infer import generic_kwargs
from kdprobe.models.registry import canonical_name, detectable_models, factory, infer_kwargs, model_aliases


_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "net", "student", "network")
_NBT = "num_batches_tracked"


def to_plain(obj):
    """Namespaces, numpy scalars/arrays and tensors of one element -> plain JSON-able values."""
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, (np.generic, np.ndarray)) or (isinstance(obj, torch.Tensor) and obj.numel() <= 64):
        v = obj.tolist()
        return to_plain(v) if isinstance(v, list) else v
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


@dataclass(frozen=True)
class ForeignPayload:
    """What a foreign file holds: the state_dict (prefixes stripped), a pruned cfg, and its metadata."""

    state_dict: dict
    cfg: list | None = None
    info: dict = field(default_factory=dict)  # epoch, best accuracy, options, container keys


def strip_prefixes(sd: dict, path="the file") -> dict:
    """Drop DataParallel `module.` and torch.compile `_orig_mod.` prefixes; two keys that become one
    (`fc.bias` and `module.fc.bias`) are an error, never a silent override."""
    bad = next((k for k in sd if not isinstance(k, str)), None)
    if bad is not None:
        raise KdprobeError(f"{path}: its state_dict has a key {_show_key(bad)}, expected tensor names (strings); "
                           "the file is damaged or not a state_dict: re-save it with torch.save(model.state_dict())")
    out, origin = {}, {}
    for k, v in sd.items():
        name = k
        changed = True
        while changed:
            changed = False
            for p in ("module.", "_orig_mod."):
                if name.startswith(p):
                    name, changed = name[len(p):], True
        if name in out:
            raise KdprobeError(f"{path}: keys {origin[name]!r} and {k!r} are both {name!r} once the module./_orig_mod. "
                               "prefixes are dropped; expected one tensor per name: keep one of them and re-save")
        out[name], origin[name] = v, k
    return out


def _show_key(k) -> str:
    text = repr(k)
    return f"{type(k).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _is_state_dict(d) -> bool:
    return isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def unpack(obj: dict, path) -> ForeignPayload:
    """Find the state_dict in a foreign checkpoint dict: bare, or under model/state_dict/net/..."""
    sd, where = None, None
    for key in _CONTAINER_KEYS:
        if _is_state_dict(obj.get(key)):
            sd, where = obj[key], key
            break
    if sd is None and _is_state_dict(obj):
        sd = obj
    if sd is None:
        keys = ", ".join(map(str, list(obj)[:8]))
        raise KdprobeError(f"{path}: no state_dict found (top-level keys: {keys}); expected a state_dict, "
                           "{'model': ...} or {'state_dict': ...}; re-save it with torch.save(model.state_dict())")
    info: dict = {"container": where or "bare"}
    if where is not None:
        info["keys"] = sorted(str(k) for k in obj if k != where)[:20]
        for k in ("epoch", "best_acc", "best_prec1", "acc", "accuracy", "test_acc"):
            v = to_plain(obj.get(k)) if k in obj else None
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                info[k] = v
        for k in ("opt", "args", "config", "hparams"):
            if isinstance(obj.get(k), (argparse.Namespace, dict)):
                info["options"] = to_plain(obj[k])
                break
    cfg = obj.get("cfg") if where is not None else None
    cfg = to_plain(cfg) if isinstance(cfg, (list, tuple)) else None
    return ForeignPayload(strip_prefixes(sd, path), cfg, info)


@dataclass(frozen=True)
class Detection:
    """The architecture a foreign state_dict was matched to, and how."""

    name: str  # canonical registry name
    kwargs: dict  # what create_model needs (read off the tensors, plus the user's --arch-kwargs)
    how: str  # "named" (--arch) or "detected"
    same_function: tuple[str, ...] = ()  # other names of this very network (aliases)

    @property
    def source(self) -> str:
        """Where the architecture comes from: kdprobe, repdistiller, rnp-l1, torchvision, python, ..."""
        return self.name.split(":", 1)[0] if ":" in self.name else "kdprobe"


def arch_kwargs(name: str, sd: dict, cfg: list | None = None, given: dict | None = None) -> dict | None:
    """Constructor kwargs for `name` from the tensors (family rule over the generic one), the file's
    cfg and the user's kwargs (which win); None when the family's rule says it cannot be this one."""
    rule = infer_kwargs(name, sd)
    if rule is None:
        return None
    kw = {**generic_kwargs(sd), **rule}
    params = inspect.signature(factory(name)).parameters
    if cfg is not None and not any(k in kw for k in ("cfg", "block_cfg")):
        for k in ("cfg", "block_cfg"):
            if k in params:
                kw[k] = cfg
                break
    kw = {k: v for k, v in kw.items() if k in params or any(p.kind == p.VAR_KEYWORD for p in params.values())}
    return {**kw, **(given or {})}


def _compare(own: dict, sd: dict) -> tuple[int, str | None]:
    """(number of keys that agree in name and shape, first disagreement described) of model vs file."""
    agree, first = 0, None
    for k, v in own.items():
        if k not in sd:
            if not k.endswith(_NBT):  # files from PyTorch < 0.4.1 lack these counters
                first = first or f"key {k!r} {tuple(v.shape)} is missing from the file"
            continue
        if tuple(sd[k].shape) != tuple(v.shape):
            first = first or f"{k} is {tuple(sd[k].shape)} in the file but {tuple(v.shape)} in the model"
            continue
        agree += 1
    extra = [k for k in sd if k not in own]
    if extra and first is None:
        first = f"the file has key {extra[0]!r} {tuple(sd[extra[0]].shape)} that the model lacks"
    return agree, first


def structure(model) -> tuple:
    """What decides a network's function besides its weights: every module's class and public settings.

    Two registry names whose models have equal structure (e.g. a generic factory at the defaults
    of a named one) compute the same function, so detection does not call them ambiguous.
    """
    out = []
    for name, m in model.named_modules():
        attrs = {k: repr(v) for k, v in vars(m).items() if not k.startswith("_") and k not in ("arch", "training")}
        out.append((name, f"{type(m).__module__}.{type(m).__qualname__}", tuple(sorted(attrs.items()))))
    return tuple(out)


def build_meta(name: str, kwargs: dict):
    """Build a model on the meta device (no memory): for comparing keys and shapes only."""
    with torch.device("meta"):
        return create_model(name, **kwargs)


_SIGS: dict[str, dict[str, tuple]] = {}  # (name, kwargs) -> {key: shape}, this process
_SIG_FILE: list = []  # [path of the on-disk cache, dirty flag]


def _sig_cache_path():
    """Signatures depend on the model code and library versions: the cache file is named by both."""
    import hashlib
    from pathlib import Path

    import torchvision

    from kdprobe.version import __version__ as _kdprobe_version
    from kdprobe.data.datasets import cache_dir

    h = hashlib.sha256(f"{_kdprobe_version}|{torch.__version__}|{torchvision.__version__}".encode())
    for f in sorted((Path(__file__).resolve().parents[1] / "models").rglob("*.py")):  # kdprobe/models
        h.update(f.read_bytes())
    return cache_dir() / f"arch-signatures-{h.hexdigest()[:16]}.json"


def _load_sigs() -> None:
    import json

    if _SIG_FILE:
        return
    path = _sig_cache_path()
    _SIG_FILE[:] = [path, False]
    try:
        for k, v in json.loads(path.read_text()).items():
            _SIGS.setdefault(k, {kk: tuple(vv) for kk, vv in v.items()})
    except (OSError, ValueError, AttributeError):
        pass  # no cache yet, or a damaged one: it is rebuilt as candidates are built


def _save_sigs() -> None:
    import json

    from kdprobe.files.io import atomic_write_text

    if _SIG_FILE and _SIG_FILE[1]:
        try:
            atomic_write_text(_SIG_FILE[0], json.dumps({k: {kk: list(vv) for kk, vv in v.items()} for k, v in _SIGS.items()}))
            _SIG_FILE[1] = False
        except (OSError, KdprobeError):
            pass  # a cache that cannot be written only costs time


def signature(name: str, kwargs: dict) -> dict[str, tuple]:
    """{state_dict key: shape} of `name` built with `kwargs`, cached (building big models costs seconds)."""
    import json

    _load_sigs()
    key = json.dumps([name, kwargs], sort_keys=True, default=str)
    if key not in _SIGS:
        _SIGS[key] = {k: tuple(v.shape) for k, v in build_meta(name, kwargs).state_dict().items()}
        _SIG_FILE[1] = True
    return _SIGS[key]


def _jaccard(a, b) -> float:
    a, b = {k for k in a if not k.endswith(_NBT)}, {k for k in b if not k.endswith(_NBT)}
    return len(a & b) / max(len(a | b), 1)


def detect(payload: ForeignPayload, path, given: dict | None = None) -> Detection:
    """Match a foreign state_dict against every detectable architecture (see module docstring)."""
    sd = payload.state_dict
    fits: dict[str, dict] = {}
    shapes: dict[tuple, str] = {}  # structure -> first canonical name that has it
    best = (-1.0, None, None)  # (fraction agreeing, name, first mismatch)
    for name in detectable_models():
        try:
            kw = arch_kwargs(name, sd, payload.cfg, given)
            rejected = kw is None  # the family's rule says no; still scored, to name the closest
            default = signature(name, {})  # the factory's defaults: one build per name, ever
            if rejected or (set(kw) <= {"num_classes", "in_channels"} and _jaccard(default, sd) < 0.5):
                own = default  # classes/channels never rename tensors: unlike names rule it out unbuilt
                rejected = True
            else:
                own = signature(name, kw)
        except (KdprobeError, TypeError, ValueError, RuntimeError, IndexError, KeyError):
            continue  # these tensors cannot parameterize that family
        agree, first = _compare({k: torch.empty(0).new_empty(v, device="meta") for k, v in own.items()}, sd)
        if rejected and first is None:
            first = "its family rule rejects these tensors"
        if first is None:
            model = build_meta(name, kw)
            key, cname = structure(model), canonical_name(name)
            # names whose networks are equal are one fit; keep the most specific name (fewest kwargs)
            if key not in shapes or len(kw) < len(fits[shapes[key]]):
                fits.pop(shapes.get(key), None)
                shapes[key] = cname
                fits[cname] = kw
        elif agree:  # a candidate sharing no tensor at all is no hint
            frac = agree / max(len(own), len(sd))
            if frac > best[0]:
                best = (frac, name, first)
    _save_sigs()
    if len(fits) == 1:
        (name, kw), = fits.items()
        aliases = tuple(sorted(a for a, c in model_aliases().items() if c == name))
        return Detection(name, kw, "detected", aliases)
    if len(fits) > 1:
        names = sorted(fits)
        raise KdprobeError(f"{path} fits {len(names)} architectures that compute different functions: "
                           f"{', '.join(names)}; pass --arch with the one it was trained as (e.g. --arch {names[0]})")
    if best[1] is None:
        raise KdprobeError(f"{path}: no known architecture has these tensor names; name it with --arch "
                           "(see `kdprobe models`; python:MODULE:FACTORY for your own class)")
    raise KdprobeError(f"{path} matches no known architecture; closest is {best[1]} ({best[0]:.0%} of tensors agree): "
                       f"{best[2]}; pass --arch (and --arch-kwargs) if it is another variant")


def _generic_for(name: str, sd: dict, given: dict | None, cfg: list | None = None) -> dict:
    params = inspect.signature(factory(name)).parameters
    kw = generic_kwargs(sd)
    key = next((k for k in ("cfg", "block_cfg") if k in params), None)
    if cfg is not None and key is not None:
        kw[key] = cfg
    return {k: v for k, v in {**kw, **(given or {})}.items() if k in params}


def named(payload: ForeignPayload, arch: str, given: dict | None, path) -> Detection:
    """The user's --arch, with kwargs read off the tensors where the family knows how."""
    name = canonical_name(arch)
    kw = arch_kwargs(name, payload.state_dict, payload.cfg, given)
    if kw is None:  # the family's rule rejects these tensors: build generically so loading names the mismatch
        kw = _generic_for(name, payload.state_dict, given, payload.cfg)
    return Detection(name, kw, "named")
