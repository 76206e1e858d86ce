"""Self-describing checkpoints, and loading other codebases' checkpoints safely.

A kdprobe checkpoint is a dict of plain types and tensors only (so `weights_only=True`
loads it): format name and version, `arch` ({name, kwargs}: what `create_model` needs,
pruned widths included), `state_dict`, `meta` (recipe, full config, seed, dataset,
epochs, accuracies, teacher sha256, library versions, ...) and `extra` (state that is
not part of the plain model: a feature-KD regressor, pruning masks).

Foreign checkpoints (kdprobe.checkpoints.foreign): a bare state_dict, {'model': sd} (RepDistiller, also
with an argparse.Namespace of options), {'state_dict': sd, 'cfg': [...]} (rethinking-network-
pruning), with `module.` / `_orig_mod.` prefixes stripped; the architecture is the user's
--arch, or detected from the tensor names and shapes.
"""
from __future__ import annotations

import pickle
import platform
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from kdprobe.errors import KdprobeError
from kdprobe.checkpoints import foreign
from kdprobe.files.io import atomic_write_bytes, sha256_file, torch_bytes
from kdprobe.files.torchfile import CHECKPOINT_FORMAT, read_payload  # noqa: F401 (part of this module's API)
from kdprobe.models import create_model
from kdprobe.models.legacy import upgrade_arch  # old formats' arch names -> today's
from kdprobe.models.registry import canonical_name, names_code, weight_budget
from kdprobe.data.preprocess import MAX_SIDE

MAX_CHANNELS = 1024  # input channels a file may declare (hyperspectral images have a few hundred)

FORMAT = CHECKPOINT_FORMAT
# 2: resnetXXa is Li et al.'s avgpool shortcut (models.legacy); 3: meta's accuracies (test_acc, train_acc,
# best_acc, the history's, the teacher's) are fractions 0-1, not percent (read_payload converts older files)
FORMAT_VERSION = 3


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A model rebuilt from a checkpoint (in eval mode) plus everything the file said about it."""

    model: nn.Module
    meta: dict
    path: Path
    sha256: str
    extra: dict = field(default_factory=dict)
    foreign: bool = False
    detection: "foreign.Detection | None" = None  # how a foreign file's architecture was found

    @property
    def method(self) -> str:
        return str(self.meta.get("method", "unknown"))

    @property
    def source(self) -> str:
        """Where the architecture came from: kdprobe (a kdprobe checkpoint), or for a foreign file the
        codebase its tensors matched (repdistiller, rnp-l1, torchvision, ...)."""
        return self.detection.source if self.detection is not None else "kdprobe"

    @property
    def inputs(self) -> dict:
        """What the model takes, as recorded: input_shape (C, H, W) or None, image_size (None: the data's own or
        the family default), normalization {mean, std} or None, and the dataset it was trained on."""
        norm = self.meta.get("normalization")
        shape = self.meta.get("input_shape")
        return {"dataset": self.meta.get("dataset"),
                "input_shape": tuple(shape) if isinstance(shape, (list, tuple)) else None,
                "image_size": self.meta.get("image_size"),
                "normalization": norm if isinstance(norm, dict) else None}

    def nonfinite(self) -> str | None:
        """Name of the first floating-point weight or buffer holding nan/inf, or None."""
        for k, v in self.model.state_dict().items():
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                return k
        return None

    def require_finite(self) -> "LoadedCheckpoint":
        """self, if every weight is finite; else a one-line error (a diverged run's weights give all-nan outputs)."""
        key = self.nonfinite()
        if key is not None:
            raise KdprobeError(f"{self.path} holds non-finite weights (nan/inf in {key}); expected finite weights: "
                               "use a checkpoint saved before the training diverged")
        return self

    def data_source(self, dataset: str | None = None, data_dir=None) -> tuple[str, object]:
        """(dataset name, data dir) to evaluate on: the given ones, else what the checkpoint recorded."""
        name = dataset or self.meta.get("dataset")
        if not name:
            raise KdprobeError(f"{self.path} records no dataset; pass --dataset")
        return name, data_dir or self.meta.get("data_dir")


def library_versions() -> dict:
    """Versions and the machine (kdprobe.runtime.machine: CPU, ATen capability, threads) that decide whether a result reproduces."""
    import torchvision

    from kdprobe.version import __version__ as _kdprobe_version
    from kdprobe.runtime.machine import machine

    # the same seed gives the same bits only with these versions on the same machine type
    return {"kdprobe": _kdprobe_version, "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "python": platform.python_version(), "machine": machine()}


def plain(obj):
    """Reduce metadata to the types weights_only=True accepts (str subclasses, numpy scalars, paths -> plain)."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, torch.Tensor) or obj is None or type(obj) in (bool, int, float, str):
        return obj
    if isinstance(obj, str):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / 0-d scalars
        return obj.item()
    if isinstance(obj, (int, float)):
        return int(obj) if isinstance(obj, int) else float(obj)
    return str(obj)


def save_checkpoint(path, model: nn.Module, meta: dict, extra: dict | None = None) -> Path:
    """Write a self-describing checkpoint atomically; returns the path."""
    arch = getattr(model, "arch", None)
    if arch is None:
        raise KdprobeError("expected a model built by kdprobe.create_model (it has no .arch); build it with create_model")
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": plain(arch), "state_dict": sd,
               "meta": plain(dict(meta, versions=meta.get("versions", library_versions()))), "extra": plain(extra or {})}
    # Serialized in memory: torch.save names the zip records after the file, so saving through a
    # temp file would make two identical checkpoints differ byte-wise; and a full disk then fails
    # in a plain write with a clear errno.
    path = Path(path)
    atomic_write_bytes(path, torch_bytes(payload))
    return path


def _show(v) -> str:
    text = " ".join(repr(v).split())
    return f"{type(v).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _tensor_dict(d) -> bool:
    return isinstance(d, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def check_payload(obj: dict, path) -> tuple[str, dict, dict, dict, dict]:
    """(arch name, arch kwargs, state_dict, meta, extra) of a kdprobe checkpoint payload, every field
    checked for its type, so a damaged file is one line naming the field, not a crash later."""
    def bad(field: str, want: str, got) -> KdprobeError:
        return KdprobeError(f"{path} is a damaged kdprobe checkpoint: {field} is {_show(got)}, expected {want}; "
                            "restore it from a copy or re-create it")

    version = obj.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise bad("format_version", "an integer >= 1", version)
    if version > FORMAT_VERSION:
        raise KdprobeError(f"{path} was written by a newer kdprobe (format {version}); upgrade kdprobe")
    arch = obj.get("arch")
    if not isinstance(arch, dict):
        raise bad("arch", "a dict {'name': ..., 'kwargs': {...}}", arch)
    name, kwargs = arch.get("name"), arch.get("kwargs", {})
    if not isinstance(name, str) or not name.strip():
        raise bad("arch.name", "a model name", name)
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise bad("arch.kwargs", "a dict of named model arguments", kwargs)
    sd = obj.get("state_dict")
    if not _tensor_dict(sd) or not sd:
        raise bad("state_dict", "a non-empty dict of name -> tensor", sd)
    meta, extra = obj.get("meta", {}), obj.get("extra", {})
    if not isinstance(meta, dict):
        raise bad("meta", "a dict", meta)
    if not isinstance(extra, dict):
        raise bad("extra", "a dict", extra)
    for key in ("masks", "regressor"):
        if key in extra and not _tensor_dict(extra[key]):
            raise bad(f"extra.{key}", "a dict of name -> tensor", extra[key])
    shape = meta.get("input_shape")
    if shape is not None and not (isinstance(shape, (list, tuple)) and len(shape) == 3 and all(
            isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= lim
            for d, lim in zip(shape, (MAX_CHANNELS, MAX_SIDE, MAX_SIDE)))):
        raise bad("meta.input_shape", f"[channels <= {MAX_CHANNELS}, height, width <= {MAX_SIDE}] of positive integers",
                  shape)
    size = meta.get("image_size")
    if size is not None and not (type(size) is int and 0 <= size <= MAX_SIDE):
        raise bad("meta.image_size", f"a side in pixels from 0 (native) to {MAX_SIDE}", size)
    for key in ("dataset", "method", "data_dir"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise bad(f"meta.{key}", "a string", meta[key])
    return name, dict(kwargs), sd, dict(meta), dict(extra)


def file_budget(path: Path) -> tuple[int, str]:
    """The most weight bytes a checkpoint file can justify: its tensors are stored uncompressed, so a model
    rebuilt from it is at most twice its size (16-bit weights loaded as float32), plus slack for tiny files."""
    size = path.stat().st_size
    return 2 * size + (16 << 20), f"the {size / 2**20:,.2f} MiB file {path.name}"


def _build(name: str, kwargs: dict, path) -> nn.Module:
    """create_model from a file's arch record (or the tensors' shapes), within what the file can justify;
    any failure is the file's, said in one line."""
    try:
        with weight_budget(*file_budget(Path(path))):
            return create_model(name, **kwargs)
    except KdprobeError as e:
        raise KdprobeError(f"{path}: cannot rebuild its model: {e}") from None
    except Exception as e:  # noqa: BLE001 - the kwargs come from the file: a factory that chokes on them
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise KdprobeError(f"{path} is a damaged kdprobe checkpoint: arch {name} with kwargs {_show(kwargs)} does "
                           f"not build ({type(e).__name__}: {why}); restore it from a copy or re-create it") from None


def load_state_into(model: nn.Module, sd: dict, source: str) -> None:
    """Load a state_dict strictly; on mismatch name the first offending key and shapes (or dtype)."""
    own = model.state_dict()
    junk = next((k for k, v in sd.items() if not isinstance(v, torch.Tensor)), None)
    if junk is not None:
        raise KdprobeError(f"{source}: state_dict entry {junk!r} is {_show(sd[junk])}, expected a tensor; the file is "
                           "damaged or not a checkpoint")
    # Keys match by name, never by position: equal shapes in equal order do not make equal roles
    # (a BN weight and bias have one shape: loading by order would swap them silently). Files from
    # PyTorch < 0.4.1 lack the BN step counters, which carry no weights.
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        def few(label, keys):
            more = f" and {len(keys) - 1} more ({', '.join(map(repr, keys[1:3]))}{', ...' if len(keys) > 3 else ''})"
            return f"{label} key {keys[0]!r}" + (more if len(keys) > 1 else "")
        what = "; ".join(few(label, keys) for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
        raise KdprobeError(f"{source} does not fit architecture {model.arch['name']}: {what} (keys match by name, "
                           "never by position); check --arch and its variant, or rename the file's keys")
    for k, v in own.items():
        if k in sd and tuple(sd[k].shape) != tuple(v.shape):
            raise KdprobeError(f"{source} does not fit architecture {model.arch['name']}: {k} is {tuple(sd[k].shape)} in the file but {tuple(v.shape)} in the model; check --arch, its variant and widths")
        if k in sd and v.is_floating_point() and not sd[k].is_floating_point():
            # loading would cast silently: integer "weights" are a damaged or mis-converted file
            raise KdprobeError(f"{source}: {k} is stored as {sd[k].dtype}, expected a floating-point tensor; the file "
                               "is damaged or was converted wrongly; re-create it")
    model.load_state_dict(sd, strict=False)


def refuse_code_from_file(name: str, arch: str | None, path, arch_flag: str = "--arch") -> None:
    """A file never chooses code: an architecture that imports a module by name (python:MODULE:FACTORY) is
    built only when the user named that same architecture (`arch`), never because a file recorded it."""
    if not names_code(name):
        return
    if arch is not None and names_code(arch) and canonical_name(arch) == canonical_name(name):
        return  # the user typed this very name: their explicit choice, as with --model python:...
    shown = " ".join(name.split())[:120]
    raise KdprobeError(f"{path} records the architecture {shown!r}, which would import and run that Python code; "
                       f"kdprobe never runs code a file names: if you trust it, pass {arch_flag} {shown} yourself")


def load_checkpoint(path, *, arch: str | None = None, arch_kwargs: dict | None = None,
                    map_location: str | torch.device = "cpu", finite: bool = False,
                    arch_flag: str = "--arch") -> LoadedCheckpoint:
    """Rebuild a model from a kdprobe or foreign checkpoint; the model comes back in eval mode.

    finite=True refuses weights holding nan/inf (commands whose outputs would be all-nan). A checkpoint
    whose architecture would import code (python:...) loads only with that same `arch` given by the
    user; `arch_flag` is the option the refusal tells them to use (--arch, --teacher-arch, ...)."""
    path = Path(path)
    obj = read_payload(path)
    if obj.get("format") == FORMAT:
        name, kwargs, sd, meta, extra = check_payload(obj, path)
        name, kwargs = upgrade_arch(name, kwargs, obj["format_version"])
        refuse_code_from_file(name, arch, path, arch_flag)
        if arch is not None and canonical_name(arch) != name:
            raise KdprobeError(f"{path} holds a {name}, not a {canonical_name(arch)}; drop --arch for kdprobe checkpoints")
        differ = sorted(k for k, v in (arch_kwargs or {}).items() if kwargs.get(k) != v)
        if differ:  # the file rebuilds its own model; kwargs that would say otherwise are a mistake
            raise KdprobeError(f"{path} holds a {name} built with {differ[0]}={kwargs.get(differ[0], '<none>')!r}, "
                               f"not {(arch_kwargs or {})[differ[0]]!r}; drop --arch-kwargs for kdprobe checkpoints")
        model = _build(name, kwargs, path)
        load_state_into(model, sd, str(path))
        foreign_file, detection = False, None
    else:
        payload = foreign.unpack(obj, path)
        det = (foreign.named(payload, arch, arch_kwargs, path) if arch is not None
               else foreign.detect(payload, path, arch_kwargs))
        model = _build(det.name, det.kwargs, path)
        load_state_into(model, payload.state_dict, str(path))
        meta = {"method": "foreign", "arch_source": det.source, "arch_detected": det.how == "detected",
                **{k: v for k, v in payload.info.items() if k != "options"}}
        if "options" in payload.info:
            meta["foreign_options"] = payload.info["options"]
        extra, foreign_file, detection = {}, True, det
    model.to(map_location).eval()
    ck = LoadedCheckpoint(model, meta, path, sha256_file(path), extra, foreign_file, detection)
    return ck.require_finite() if finite else ck
