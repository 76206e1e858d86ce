"""kdprobe.load and kdprobe.load_dataset: a checkpoint from any supported source, a dataset by name."""
from __future__ import annotations

import os

from kdprobe.checkpoints.format import LoadedCheckpoint as Checkpoint
from kdprobe.data.datasets import TensorData as Dataset

__all__ = ["Checkpoint", "Dataset", "load", "load_dataset"]


def load(path: str | os.PathLike, *, arch: str | None = None, arch_kwargs: dict | None = None,
         device: str = "cpu") -> Checkpoint:
    """Load a checkpoint: kdprobe's own format, or another codebase's file (RepDistiller, the RNP pruning
    code, torchvision, a bare state_dict) whose architecture is detected from its tensors, as the CLI does.

    arch / arch_kwargs name the architecture where detection cannot (the CLI's --arch / --arch-kwargs); an
    architecture that runs code (`python:MODULE:FACTORY`) loads only when you pass it here yourself.
    Returns a `kdprobe.Checkpoint`: `.model` (in eval mode, on `device`), `.meta`, `.path`, `.sha256`,
    `.source` (kdprobe or the codebase detected) and `.inputs` (the input shape, image size and
    normalization it records). The file is read with torch.load(weights_only=True)."""
    from kdprobe.checkpoints.format import load_checkpoint
    from kdprobe.runtime.devices import resolve_device

    if arch_kwargs is not None and not isinstance(arch_kwargs, dict):
        from kdprobe.errors import KdprobeError

        raise KdprobeError(f"expected arch_kwargs as a dict like {{'depth': 20}}, got {type(arch_kwargs).__name__}")
    return load_checkpoint(path, arch=arch, arch_kwargs=arch_kwargs, map_location=resolve_device(device))


def load_dataset(name: str = "digits", data_dir: str | os.PathLike | None = None, *, download: bool = False
                 ) -> Dataset:
    """A dataset by name: digits (embedded, the default), cifar10 / cifar100 (from data_dir, download=True to
    fetch them), or an image folder / archive path (train/ and test/ class folders). Returns a
    `kdprobe.Dataset`: uint8 images (`train_x`, `test_x`), labels, `mean`/`std` and `num_classes`;
    `.split('test')` gives (images, labels)."""
    from kdprobe.data.datasets import load_dataset as load_named

    return load_named(name, data_dir, download=download)
