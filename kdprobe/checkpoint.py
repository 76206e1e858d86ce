"""Self-describing checkpoints, and loading other codebases' checkpoints safely.

A kdprobe checkpoint is a dict of plain types and tensors only (so `weights_only=True`
loads it): format name and version, `arch` ({name, kwargs}: what `create_model` needs,
pruned widths included), `state_dict`, `meta` (recipe, full config, seed, dataset,
epochs, accuracies, teacher sha256, library versions, ...) and `extra` (state that is
not part of the plain model: a feature-KD regressor, pruning masks).

Foreign checkpoints (kdprobe.foreign): a bare state_dict, {'model': sd} (RepDistiller, also
with an argparse.Namespace of options), {'state_dict': sd, 'cfg': [...]} (rethinking-network-
pruning), with `module.` / `_orig_mod.` prefixes stripped; the architecture is the user's
--arch, or detected from the tensor names and shapes.
"""
from __future__ import annotations

import io
import pickle
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from kdprobe.errors import KdprobeError
from kdprobe.models.legacy import upgrade_arch  # old formats' arch names -> today's
from kdprobe.io import atomic_path, sha256_file
from kdprobe import foreign
from kdprobe.models import create_model
from kdprobe.models.registry import canonical_name

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
    detection: "foreign.Detection | None" = None  # how a foreign file's architecture was found

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
        # benign objects real checkpoints carry (argparse.Namespace, numpy scalars) are allow-listed;
        # everything else is still refused by the weights_only unpickler, never run
        with torch.serialization.safe_globals(foreign.BENIGN_GLOBALS):
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
        meta, extra, foreign_file, detection = dict(obj.get("meta", {})), dict(obj.get("extra", {})), False, None
    else:
        payload = foreign.unpack(obj, path)
        det = (foreign.named(payload, arch, arch_kwargs, path) if arch is not None
               else foreign.detect(payload, path, arch_kwargs))
        model = create_model(det.name, **det.kwargs)
        load_state_into(model, payload.state_dict, str(path))
        meta = {"method": "foreign", "arch_source": det.source, "arch_detected": det.how == "detected",
                **{k: v for k, v in payload.info.items() if k != "options"}}
        if "options" in payload.info:
            meta["foreign_options"] = payload.info["options"]
        extra, foreign_file, detection = {}, True, det
    model.to(map_location).eval()
    return LoadedCheckpoint(model, meta, path, sha256_file(path), extra, foreign_file, detection)
