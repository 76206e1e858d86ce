"""Self-describing checkpoints, and loading other codebases' checkpoints safely.

A kdprobe checkpoint is a dict of plain types and tensors only (so `weights_only=True`
loads it): format name and version, `arch` ({name, kwargs}: what `create_model` needs,
pruned widths included), `state_dict`, `meta` (recipe, full config, seed, dataset,
epochs, accuracies, teacher sha256, library versions, ...) and `extra` (state that is
not part of the plain model: a feature-KD regressor, pruning masks).

Foreign checkpoints load when the user names the architecture: a bare state_dict,
{'model': sd} (RepDistiller), {'state_dict': sd, 'cfg': [...]} (rethinking-network-
pruning), with `module.` / `_orig_mod.` prefixes stripped.
"""
from __future__ import annotations

import inspect
import io
import pickle
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from kdprobe.errors import KdprobeError
from kdprobe.models.legacy import upgrade_arch  # old formats' arch names -> today's
from kdprobe.models.registry import infer_kwargs  # a family's own kwargs rule for foreign files
from kdprobe.io import atomic_path, sha256_file
from kdprobe.models import create_model
from kdprobe.models.registry import canonical_name, factory

FORMAT = "kdprobe-checkpoint"
FORMAT_VERSION = 2  # 2: resnetXXa is Li et al.'s avgpool shortcut (models.legacy)


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A model rebuilt from a checkpoint (in eval mode) plus everything the file said about it."""

    model: nn.Module
    meta: dict
    path: Path
    sha256: str
    extra: dict = field(default_factory=dict)
    foreign: bool = False

    @property
    def method(self) -> str:
        return str(self.meta.get("method", "unknown"))

    def data_source(self, dataset: str | None = None, data_dir=None) -> tuple[str, object]:
        """(dataset name, data dir) to evaluate on: the given ones, else what the checkpoint recorded."""
        name = dataset or self.meta.get("dataset")
        if not name:
            raise KdprobeError(f"{self.path} records no dataset; pass --dataset")
        return name, data_dir or self.meta.get("data_dir")


def library_versions() -> dict:
    """Versions that decide whether a result reproduces."""
    import torchvision

    import kdprobe

    return {"kdprobe": kdprobe.__version__, "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "python": platform.python_version()}


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
    # Serialize to memory first: torch.save names the zip records after the file, so saving
    # through a temp file would make two identical checkpoints differ byte-wise.
    buf = io.BytesIO()
    torch.save(payload, buf)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return path


def read_payload(path) -> dict:
    """torch.load with weights_only=True and every failure turned into a one-line error."""
    path = Path(path)
    if not path.exists():
        raise KdprobeError(f"checkpoint {path} does not exist; check the path (or the glob)")
    if path.is_dir():
        raise KdprobeError(f"{path} is a folder, expected a checkpoint file (.pt)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "Unsupported" in ln or "global" in ln.lower()), lines[0] if lines else type(e).__name__)
        raise KdprobeError(
            f"refusing to load {path}: it holds Python objects that could run code on load "
            f"(weights_only=True rejected it: {first[:160]}); if you trust it, re-save its state_dict with plain torch.save"
        ) from None
    except Exception as e:  # noqa: BLE001 - any other failure of the unpickler means a foreign or broken file
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise KdprobeError(f"{path} is not a readable PyTorch checkpoint (corrupt, truncated or another format?): {why}") from None
    if not isinstance(obj, dict):
        raise KdprobeError(f"{path} holds a {type(obj).__name__}, expected a dict (a state_dict or a checkpoint dict)")
    return obj


def _strip_prefixes(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for p in ("module.", "_orig_mod."):
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def _foreign_state_dict(obj: dict, path: Path) -> tuple[dict, dict]:
    """Pick the state_dict out of a foreign checkpoint; returns (state_dict, hints)."""
    hints = {}
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(obj.get(key), dict):
            if isinstance(obj.get("cfg"), (list, tuple)):
                hints["cfg"] = list(obj["cfg"])
            return _strip_prefixes(obj[key]), hints
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _strip_prefixes(obj), hints
    raise KdprobeError(f"{path}: no state_dict found (keys: {', '.join(map(str, list(obj)[:8]))}); expected a state_dict, {{'model': ...}} or {{'state_dict': ...}}")


def _infer_kwargs(name: str, sd: dict, hints: dict) -> dict:
    """num_classes / in_channels from the tensors; a 'cfg' list to the factory's width argument."""
    rule = infer_kwargs(name, sd)
    if rule:  # the family's own rule reads everything (pruned widths too) off the tensors
        return rule
    weights = [v for k, v in sd.items() if k.endswith("weight")]
    convs = [w for w in weights if w.dim() == 4]
    linears = [w for w in weights if w.dim() == 2]
    kw = {}
    if linears:
        kw["num_classes"] = int(linears[-1].shape[0])
    if convs:
        kw["in_channels"] = int(convs[0].shape[1])
    params = inspect.signature(factory(name)).parameters
    if "cfg" in hints:
        kw["cfg" if "cfg" in params else "block_cfg"] = hints["cfg"]
    if convs and "width" in params and "cfg" not in hints:
        # a width multiplier shows in the stem: the file's first conv has width x the default filters
        default = create_model(name, **kw).state_dict()
        first = next(v for v in default.values() if v.dim() == 4)
        if first.shape[0] != convs[0].shape[0]:
            kw["width"] = convs[0].shape[0] / first.shape[0]
    return kw


def load_state_into(model: nn.Module, sd: dict, source: str) -> None:
    """Load a state_dict strictly; on mismatch name the first offending key and shapes."""
    own = model.state_dict()
    if set(own) != set(sd):
        # Other codebases name layers differently; if the tensors line up one-to-one by
        # order and shape, the mapping is unambiguous.
        own_t = [(k, v) for k, v in own.items() if not k.endswith("num_batches_tracked")]
        src_t = [(k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked")]
        if len(own_t) == len(src_t) and all(a.shape == b.shape for (_, a), (_, b) in zip(own_t, src_t)):
            sd = {ka: vb for (ka, _), (_, vb) in zip(own_t, src_t)}
        else:
            missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
            unexpected = [k for k in sd if k not in own]
            what = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}" if unexpected else ""
            if what:
                raise KdprobeError(f"{source} does not fit architecture {model.arch['name']}: {what}; check --arch and its variant")
    for k, v in own.items():
        if k in sd and tuple(sd[k].shape) != tuple(v.shape):
            raise KdprobeError(f"{source} does not fit architecture {model.arch['name']}: {k} is {tuple(sd[k].shape)} in the file but {tuple(v.shape)} in the model; check --arch, its variant and widths")
    model.load_state_dict(sd, strict=False)


def load_checkpoint(path, *, arch: str | None = None, arch_kwargs: dict | None = None,
                    map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild a model from a kdprobe or foreign checkpoint; the model comes back in eval mode."""
    path = Path(path)
    obj = read_payload(path)
    if obj.get("format") == FORMAT:
        if obj.get("format_version", 0) > FORMAT_VERSION:
            raise KdprobeError(f"{path} was written by a newer kdprobe (format {obj['format_version']}); upgrade kdprobe")
        name, kwargs = upgrade_arch(obj["arch"]["name"], obj["arch"]["kwargs"], obj.get("format_version", 0))
        if arch is not None and canonical_name(arch) != name:
            raise KdprobeError(f"{path} holds a {name}, not a {canonical_name(arch)}; drop --arch for kdprobe checkpoints")
        model = create_model(name, **kwargs)
        load_state_into(model, obj["state_dict"], str(path))
        meta, extra, foreign = dict(obj.get("meta", {})), dict(obj.get("extra", {})), False
    else:
        if arch is None:
            raise KdprobeError(f"{path} is not a kdprobe checkpoint (no architecture recorded); name its architecture "
                               "with --arch (--teacher-arch for a teacher), e.g. --arch resnet56a")
        name = canonical_name(arch)
        sd, hints = _foreign_state_dict(obj, path)
        kwargs = {**_infer_kwargs(name, sd, hints), **(arch_kwargs or {})}
        model = create_model(name, **kwargs)
        load_state_into(model, sd, str(path))
        meta = {"method": "foreign", "foreign_keys": sorted(k for k in obj if not isinstance(obj[k], torch.Tensor))[:20]}
        for k in ("epoch", "best_acc", "acc", "accuracy"):
            if isinstance(obj.get(k), (int, float)):
                meta[k] = float(obj[k])
        extra, foreign = {}, True
    model.to(map_location).eval()
    return LoadedCheckpoint(model, meta, path, sha256_file(path), extra, foreign)
