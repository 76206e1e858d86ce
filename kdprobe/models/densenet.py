"""DenseNet-40 (Huang et al. 2017) for CIFAR, as used by Network Slimming (Liu et al. 2017).

Growth k = 12, no bottleneck, no compression: a 3x3 stem conv to 2k channels, three dense
blocks of (depth - 4) / 3 layers (each BN-ReLU-Conv3x3 adding k channels to the
concatenation), transitions BN-ReLU-Conv1x1 (same width)-AvgPool2, a final BN-ReLU, global
average pool, Linear. CIFAR-10: 1,059,298 parameters (the DenseNet paper rounds this to
1.0M; Network Slimming's table says 1.02M, which no counting convention we tried gives:
convs + Linear alone are 1.04M).

`selection` (optional) is Network Slimming's channel selection: for every BN layer in
forward order (the dense layers, the 2 transitions, the final BN; 3n + 3 entries) the
sorted input-channel indices it keeps, or null for all. A slimmed DenseNet is rebuilt from
it; the concatenated trunk itself keeps all channels, as in the reference.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdprobe.errors import KdprobeError
from kdprobe.models.registry import register_model


class BNReLUConv(nn.Module):
    """Optional input-channel selection, then BN-ReLU-Conv (k x k, same padding, no bias)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, keep: list[int] | None):
        super().__init__()
        # Not persistent: the indices are structure (in model.arch), not weights.
        self.register_buffer("keep", None if keep is None else torch.tensor(keep, dtype=torch.long),
                             persistent=False)
        n = in_ch if keep is None else len(keep)
        self.bn = nn.BatchNorm2d(n)
        self.conv = nn.Conv2d(n, out_ch, kernel, 1, kernel // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keep is not None:
            x = x.index_select(1, self.keep)
        return self.conv(F.relu(self.bn(x)))


class DenseLayer(BNReLUConv):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, super().forward(x)], 1)


class Transition(BNReLUConv):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(super().forward(x), 2, ceil_mode=True)  # ceil: odd sizes (7x7) keep a border


def _check_selection(selection, widths: list[int]) -> list[list[int] | None]:
    """`selection[i]` must be None or sorted unique indices in [0, widths[i]), at least one."""
    if selection is None:
        return [None] * len(widths)
    if not isinstance(selection, (list, tuple)) or len(selection) != len(widths):
        got = len(selection) if isinstance(selection, (list, tuple)) else repr(selection)
        raise KdprobeError(f"expected selection with {len(widths)} entries (one per BN layer), got {got}")
    out: list[list[int] | None] = []
    for i, (sel, w) in enumerate(zip(selection, widths)):
        if sel is None:
            out.append(None)
            continue
        idx = [int(j) for j in sel]
        if not idx or idx != sorted(set(idx)) or idx[0] < 0 or idx[-1] >= w:
            raise KdprobeError(f"expected selection[{i}] to be sorted unique indices in [0, {w}) "
                               f"(at least one), got {list(sel)}; a layer must keep a channel")
        out.append(idx)
    return out


class DenseNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, depth: int = 40, growth: int = 12,
                 init_channels: int | None = None, selection=None):
        super().__init__()
        if depth < 7 or (depth - 4) % 3 != 0:
            raise KdprobeError(f"expected a DenseNet depth of 3n+4 (7, 10, ..., 40), got {depth}")
        if growth < 1:
            raise KdprobeError(f"expected growth >= 1, got {growth}")
        n = (depth - 4) // 3
        c0 = 2 * growth if init_channels is None else int(init_channels)
        # Input width of every BN layer in forward order: dense layers, transitions, final.
        widths, c = [], c0
        for b in range(3):
            widths += [c + j * growth for j in range(n)]
            c += n * growth
            if b < 2:
                widths.append(c)
        widths.append(c)
        keep = _check_selection(selection, widths)
        self.conv1 = nn.Conv2d(in_channels, c0, 3, 1, 1, bias=False)
        blocks, i = [], 0
        for b in range(3):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(widths[i], growth, 3, keep[i]))
                i += 1
            blocks.append(nn.Sequential(*layers))
            if b < 2:  # compression 1: the transition keeps the trunk width
                blocks.append(Transition(widths[i], widths[i], 1, keep[i]))
                i += 1
        self.dense1, self.trans1, self.dense2, self.trans2, self.dense3 = blocks
        self.register_buffer("keep_final", None if keep[i] is None else torch.tensor(keep[i], dtype=torch.long),
                             persistent=False)
        self.feature_channels = widths[i] if keep[i] is None else len(keep[i])
        self.bn = nn.BatchNorm2d(self.feature_channels)
        self.relu = nn.ReLU()  # a module, so feature KD can hook the map after the final BN-ReLU
        self.feature_layer = "relu"
        self.fc = nn.Linear(self.feature_channels, num_classes)
        self.bn_widths = widths  # unselected input width of each BN layer, for slimming code
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # N(0, 2/(k*k*out)) as in the slimming reference
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 0.5)  # slimming reference's gamma start
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Map after the final BN+ReLU, before pooling: (N, 456, 8, 8) on 32x32 for DenseNet-40."""
        x = self.conv1(x)
        x = self.dense3(self.trans2(self.dense2(self.trans1(self.dense1(x)))))
        if self.keep_final is not None:
            x = x.index_select(1, self.keep_final)
        return self.relu(self.bn(x))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        """Global average pool + Linear."""
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(f, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model("densenet40")
def densenet40(num_classes: int = 10, in_channels: int = 3, depth: int = 40, growth: int = 12,
               init_channels: int | None = None, selection=None) -> DenseNet:
    """DenseNet-40 (k=12, no bottleneck/compression); depth/growth override it for tiny models."""
    return DenseNet(num_classes, in_channels, depth, growth, init_channels, selection)
