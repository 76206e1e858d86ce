"""Parameter and multiply-accumulate counts, dense and effective (nonzero weights only)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


def count_params(model: nn.Module) -> int:
    """Number of parameters (BN running stats and other buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    """Number of nonzero parameters (what weight-level pruning reduces)."""
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


@torch.no_grad()
def layer_macs(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, int, float]]:
    """(module name, MACs, weight density) of every Conv2d and Linear on one zero input of `input_shape`.

    `input_shape` is (C, H, W) or (1, C, H, W). MACs count multiply-accumulates of the
    weights only (no bias, BN, activation or pooling), the usual convention of pruning
    papers: conv = out_elements * in_channels / groups * kh * kw, linear = in * out.
    The model's train/eval mode is restored; eval mode is used so BN buffers do not move.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1,) + shape
    ref = next(model.parameters())
    rows: list[tuple[str, int, float]] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(m, inp, out):
        w = m.weight
        if isinstance(m, nn.Conv2d):
            macs = out.numel() // out.shape[0] * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            macs = out.numel() // out.shape[-1] * m.in_features * m.out_features
        rows.append((names[m], int(macs), float(torch.count_nonzero(w)) / w.numel()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        model(torch.zeros(shape, device=ref.device, dtype=ref.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return rows


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates (MACs) of all conv and linear layers for one input of `input_shape`."""
    return sum(macs for _, macs, _ in layer_macs(model, input_shape))


def count_nonzero_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Effective MACs with zeroed weights skipped: each layer's MACs times its weight density."""
    return int(round(sum(macs * density for _, macs, density in layer_macs(model, input_shape))))
