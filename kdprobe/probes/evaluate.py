"""Loss and accuracy of a model on tensor-resident data (no augmentation)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdprobe.data.datasets import normalize
from kdprobe.runtime.precision import fp32_exact


@dataclass(frozen=True)
class EvalResult:
    """Mean cross-entropy loss and top-1 accuracy (a fraction, 0-1: docs/units.md) over n samples."""

    loss: float
    acc: float
    n: int


@torch.no_grad()
@fp32_exact()  # IEEE fp32 on every device (a GPU's convolutions default to TF32 on this torch build)
def evaluate(model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, mean, std,
             batch_size: int = 500) -> EvalResult:
    """Evaluate in eval mode on the model's device; restores the model's mode afterwards."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, correct, n = 0.0, 0, len(y)
    try:
        for i in range(0, n, batch_size):
            xb = normalize(x_uint8[i:i + batch_size].to(device), mean, std)
            yb = y[i:i + batch_size].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(xb)
            total_loss += float(F.cross_entropy(logits.float(), yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    return EvalResult(total_loss / max(n, 1), correct / max(n, 1), n)
