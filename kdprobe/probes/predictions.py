"""One forward pass per checkpoint: logits (and labels) on a fixed sample set, computed once and shared.

Agreement, ensembles and calibration only need each checkpoint's predictive distribution on
the split, so a command computes every checkpoint's logits once (`LogitCache`) and every
probe reads them: pairs and ensembles never run a model again. Logits are kept on the CPU
in float32 (10,000 CIFAR images x 100 classes = 4 MB per checkpoint); metrics are computed
from them in float64.

The forward pass runs in eval mode (BN running statistics), fp32, no autocast, in fixed
batches, and restores the model's train/eval flags afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable

import torch
import torch.nn as nn

from kdprobe.data.datasets import normalize
from kdprobe.errors import KdprobeError
from kdprobe.runtime.precision import fp32_exact
from kdprobe.probes.features import model_device


@dataclass(frozen=True, eq=False)
class Logits:
    """A checkpoint's logits on N samples, with the labels they are scored against."""

    logits: torch.Tensor  # (N, C) float32, CPU
    labels: torch.Tensor  # (N,) int64, CPU

    def log_probs(self) -> torch.Tensor:
        """log softmax in float64, (N, C)."""
        return torch.log_softmax(self.logits.to(torch.float64), dim=1)


@torch.no_grad()
@fp32_exact()  # IEEE fp32 on every device (a GPU's convolutions default to TF32 on this torch build)
def model_logits(model: nn.Module, x: torch.Tensor, *, mean=None, std=None, batch_size: int = 500) -> torch.Tensor:
    """Logits of `model` on x in eval mode, fp32, batch by batch; x uint8 (normalized here with mean/std) or float."""
    if batch_size < 1:
        raise KdprobeError(f"expected batch_size >= 1, got {batch_size}")
    if x.dtype == torch.uint8 and (mean is None or std is None):
        raise KdprobeError("expected mean and std with uint8 images (the dataset's normalization), got none")
    dev = model_device(model)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    out = []
    try:
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(dev)
            xb = normalize(xb, mean, std) if xb.dtype == torch.uint8 else xb.float()
            z = model(xb)
            if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != xb.shape[0]:
                got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
                raise KdprobeError(f"expected the model to return logits of shape (N, classes), got {got}")
            z = z.float().cpu()
            bad = ~torch.isfinite(z).all(dim=1)
            if bool(bad.any()):  # finite weights, non-finite outputs: every metric of it would be nan or dropped
                raise KdprobeError(f"the model's outputs are nan/inf on {int(bad.sum())} of the {len(z)} samples "
                                   f"{i}..{i + len(z) - 1} (first: sample {i + int(bad.nonzero()[0, 0])}) although its "
                                   "weights are finite; expected finite logits: check the checkpoint with kdprobe "
                                   "eval, or probe another one")
            out.append(z)
    finally:
        for m, flag in modes:
            m.training = flag
    if not out:
        raise KdprobeError("expected at least one sample, got an empty split; raise --samples")
    return torch.cat(out)


class LogitCache:
    """Logits of each checkpoint on one sample set, computed on first request (one forward pass each)."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor, *, mean=None, std=None, batch_size: int = 500):
        if len(x) != len(labels) or len(x) == 0:
            raise KdprobeError(f"expected as many labels as images (and at least one), got {len(x)} and {len(labels)}")
        self.x, self.labels = x, labels.detach().to("cpu", torch.int64)
        self.mean, self.std, self.batch_size = mean, std, batch_size
        self._store: dict[Hashable, Logits] = {}
        self.forward_passes = 0  # how many models were run (tests check it equals the number of checkpoints)

    def get(self, key: Hashable, model: nn.Module | Callable[[], nn.Module]) -> Logits:
        """The cached logits for key; runs `model` (or the model a zero-argument loader returns) only once."""
        if key not in self._store:
            m = model if isinstance(model, nn.Module) else model()
            try:
                z = model_logits(m, self.x, mean=self.mean, std=self.std, batch_size=self.batch_size)
            except KdprobeError as e:
                raise KdprobeError(f"{key}: {e}") from None
            self.forward_passes += 1
            self._store[key] = Logits(z, self.labels)
        return self._store[key]

    def __getitem__(self, key: Hashable) -> Logits:
        return self._store[key]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._store

    def __len__(self) -> int:
        return len(self._store)
