"""PyramidNet (Han et al. 2017, "Deep Pyramidal Residual Networks") for CIFAR.

Additive widening: the k-th of the 3n residual units has width round(16 + alpha * k / 3n)
(times 4 at the output of a bottleneck unit), so the width grows by alpha over the whole
network instead of doubling at each stage. Units are BN-Conv3x3-BN-ReLU-Conv3x3-BN (basic)
or BN-Conv1x1-BN-ReLU-Conv3x3-BN-ReLU-Conv1x1-BN (bottleneck, 4x expansion). The shortcut
has no parameters: 2x2 average pool (ceil mode) where the unit has stride 2, then zero
channels appended at the end up to the unit's width; this is the layout of the CutMix
reference code (clovaai/CutMix-PyTorch), whose PyramidNet-200 (alpha 240) has 26.8M
parameters on CIFAR-100, as this one does (26,844,952).

Depth: 6n+2 for basic units (110 -> n = 18), 9n+2 for bottleneck units (200 -> n = 22).
Rounding uses Python's round() (half to even) like the reference; for the named
configurations no width lands on a .5 tie, so the choice does not matter there.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdprobe.errors import KdprobeError
from kdprobe.models.registry import register_model


class PyramidUnit(nn.Module):
    """One pyramidal residual unit; `out_channels` = width (basic) or 4 x width (bottleneck)."""

    def __init__(self, in_ch: int, width: int, stride: int, bottleneck: bool):
        super().__init__()
        self.bottleneck, self.stride = bottleneck, stride
        self.bn1 = nn.BatchNorm2d(in_ch)
        if bottleneck:
            self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=False)
            self.bn4 = nn.BatchNorm2d(4 * width)
            self.out_channels = 4 * width
        else:
            self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(width)
            self.out_channels = width
        if self.out_channels < in_ch:
            raise KdprobeError(f"expected unit widths that never shrink (alpha >= 0), got {in_ch} -> "
                               f"{self.out_channels}; use alpha >= 0")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.bn1(x))  # no ReLU before the first conv (PyramidNet, Fig. 6)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.bn3(out)
        if self.bottleneck:
            out = self.bn4(self.conv3(F.relu(out)))
        short = x
        if self.stride != 1:  # ceil mode: matches the conv's output size on odd inputs too
            short = F.avg_pool2d(short, 2, self.stride, ceil_mode=True)
        pad = out.shape[1] - short.shape[1]
        if pad > 0:  # zero channels appended after the existing ones
            short = F.pad(short, (0, 0, 0, 0, 0, pad))
        return out + short


class PyramidNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, depth: int, alpha: float,
                 bottleneck: bool, base_channels: int = 16):
        super().__init__()
        per = 9 if bottleneck else 6
        if depth < per + 2 or (depth - 2) % per != 0:
            kind = "bottleneck: 9n+2 (11, 20, ..., 200)" if bottleneck else "basic: 6n+2 (8, 14, ..., 110)"
            raise KdprobeError(f"expected a PyramidNet depth of {kind}, got {depth}")
        if base_channels < 1:
            raise KdprobeError(f"expected base_channels >= 1, got {base_channels}")
        n = (depth - 2) // per
        self.conv1 = nn.Conv2d(in_channels, base_channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channels)  # no ReLU here: every unit starts with BN
        stages, c, k = [], base_channels, 0
        for s in range(3):
            units = []
            for b in range(n):
                k += 1
                width = int(round(base_channels + alpha * k / (3 * n)))
                units.append(PyramidUnit(c, width, 2 if (s > 0 and b == 0) else 1, bottleneck))
                c = units[-1].out_channels
            stages.append(nn.Sequential(*units))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn_final = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()  # a module, so feature KD can hook the map after the final BN-ReLU
        self.fc = nn.Linear(c, num_classes)
        self.feature_channels = c
        self.feature_layer = "relu"
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # N(0, 2/(k*k*out)) as in the reference
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Map after the final BN+ReLU, before pooling: (N, C, 8, 8) on 32x32."""
        x = self.bn1(self.conv1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.relu(self.bn_final(x))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        """Global average pool + Linear."""
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(f, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# Named configurations (depth, alpha, bottleneck).
PYRAMIDNET110 = (110, 64, False)
PYRAMIDNET200 = (200, 240, True)


@register_model("pyramidnet")
def pyramidnet(num_classes: int = 10, in_channels: int = 3, depth: int = PYRAMIDNET110[0],
               alpha: float = PYRAMIDNET110[1], bottleneck: bool = PYRAMIDNET110[2],
               base_channels: int = 16) -> PyramidNet:
    """Any CIFAR PyramidNet: depth, widening alpha, basic or bottleneck units."""
    return PyramidNet(num_classes, in_channels, depth, alpha, bool(bottleneck), base_channels)


@register_model("pyramidnet110")
def pyramidnet110(num_classes: int = 10, in_channels: int = 3, alpha: float = PYRAMIDNET110[1],
                  base_channels: int = 16) -> PyramidNet:
    """PyramidNet-110, basic units, alpha 64 (alpha/base_channels shrink it for tests)."""
    return PyramidNet(num_classes, in_channels, PYRAMIDNET110[0], alpha, PYRAMIDNET110[2], base_channels)


@register_model("pyramidnet200")
def pyramidnet200(num_classes: int = 10, in_channels: int = 3, alpha: float = PYRAMIDNET200[1],
                  base_channels: int = 16) -> PyramidNet:
    """PyramidNet-200, bottleneck units, alpha 240 (the CutMix reference's CIFAR-100 model)."""
    return PyramidNet(num_classes, in_channels, PYRAMIDNET200[0], alpha, PYRAMIDNET200[2], base_channels)
