"""kdprobe.info: what a checkpoint holds (architecture, size in parameters and MACs, nonzeros, recipe,
provenance), as `kdprobe info` shows it."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kdprobe.checkpoints.format import LoadedCheckpoint

__all__ = ["CheckpointInfo", "info"]


@dataclass(frozen=True)
class CheckpointInfo:
    """A loaded checkpoint and its size: params, nonzero_params, macs, nonzero_macs (multiply-accumulates of
    one image of input_shape), and the first weight holding nan/inf (None when all are finite)."""

    checkpoint: LoadedCheckpoint
    size: dict
    nonfinite: str | None

    def to_dict(self) -> dict:
        """The document `kdprobe info --json` writes (kdprobe.files.documents.envelope): kind "info", settings
        {path}, data {path, sha256, arch, detection, size, nonfinite, meta, extra}. meta's accuracies are fractions
        (a file written before checkpoint format 3 recorded percent: they are converted on reading)."""
        from kdprobe.files.documents import envelope

        ck, det = self.checkpoint, self.checkpoint.detection
        detection = None if det is None else {"name": det.name, "how": det.how, "source": det.source,
                                              "same_function": list(det.same_function)}
        return envelope("info", {"path": str(ck.path)}, {
            "path": str(ck.path), "sha256": ck.sha256, "arch": ck.model.arch, "detection": detection,
            "size": self.size, "nonfinite": self.nonfinite, "meta": dict(ck.meta), "extra": sorted(ck.extra)})

    def save(self, path: str | os.PathLike) -> Path:
        """Write to_dict() as JSON (atomically; another kind of file is never replaced)."""
        import json

        from kdprobe.api.results import checked_output, suffix_of
        from kdprobe.files.io import atomic_write_text, run_scope

        suffix_of(path, {".json": "json"}, "info")
        with run_scope():
            out = checked_output("info", path, "json", {"CHECKPOINT": self.checkpoint.path})
            atomic_write_text(out, json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        return out


def info(checkpoint, *, arch=None, arch_kwargs=None) -> CheckpointInfo:
    """Load a checkpoint (a path, or a kdprobe.Checkpoint) and measure its size at its input shape (the recorded
    one, else the family's image size). Non-finite weights are reported in .nonfinite, not refused: this is
    how one finds out what is wrong with a file. arch / arch_kwargs: as for kdprobe.load (NAME or FILE=NAME)."""
    from kdprobe.checkpoints.format import load_checkpoint
    from kdprobe.checkpoints.selection import arch_choice
    from kdprobe.data.preprocess import image_size_for
    from kdprobe.pruning import count_flops, count_nonzero, count_nonzero_flops, count_params

    if isinstance(checkpoint, LoadedCheckpoint):
        ck = checkpoint
    else:
        archs = arch_choice(arch, arch_kwargs)
        archs.check_used([Path(checkpoint)])
        ck = load_checkpoint(checkpoint, **archs.for_path(checkpoint))
    m, meta = ck.model, ck.meta
    side = image_size_for(m, meta)[0] or 32  # a foreign file records no size: its family's (CIFAR: 32)
    shape = meta.get("input_shape") or [m.arch["kwargs"].get("in_channels", 3), side, side]
    size = {"params": count_params(m), "nonzero_params": count_nonzero(m),
            "macs": count_flops(m, shape), "nonzero_macs": count_nonzero_flops(m, shape), "input_shape": shape}
    return CheckpointInfo(ck, size, ck.nonfinite())
