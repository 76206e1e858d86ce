"""RepDistiller's Wide ResNets (models/wrn.py): wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2.

WRN-d-k (Zagoruyko & Komodakis 2016), pre-activation: a 3x3 stem to 16 channels, three
groups of (d-4)/6 blocks of width 16k, 32k, 64k (`block{1,2,3}.layer.{i}`), each block
BN-ReLU-conv3x3-BN-ReLU-conv3x3; where the width changes the shortcut is a 1x1 conv
(`convShortcut`) applied to the block's *pre-activated* input, else the identity on the raw
input. Then BN-ReLU, the reference's fixed 8x8 average pool (needs 32x32 input), `fc`.
Dropout is 0 in every model_dict entry, so there is none here.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kdprobe.models.repdistiller._common import SourceNet, init_conv_bn, register


class WideBlock(nn.Module):
    """Pre-activation basic block; key names as the reference (bn1, conv1, bn2, conv2, convShortcut)."""

    def __init__(self, inp: int, out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inp)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.convShortcut = nn.Conv2d(inp, out, 1, stride, bias=False) if inp != out else None  # noqa: N815 (key name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        # identity: the raw input; projection: the pre-activated input (as the reference)
        return (x if self.convShortcut is None else self.convShortcut(act)) + out


class NetworkBlock(nn.Module):
    """A group of blocks; exists so the keys read `blockN.layer.i` as in the reference."""

    def __init__(self, n: int, inp: int, out: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(inp if i == 0 else out, out, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(SourceNet):
    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int):
        super().__init__()
        n, widths = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_layer, self.feature_channels = "relu", widths[3]
        init_conv_bn(self)
        nn.init.zeros_(self.fc.bias)  # the reference zeroes the Linear bias, keeps its default weight

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU(BN(block3)), (N, 64k, 8, 8) on 32x32."""
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.relu(self.bn1(x))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        """avg_pool2d(8) (global on 32x32 input) + fc."""
        return self.fc(self.pool(f, 8))


def _wrn(depth: int, widen: int):
    name = f"wrn_{depth}_{widen}"

    @register(name, "conv1.weight", "fc.weight")
    def factory(num_classes: int = 100, in_channels: int = 3) -> WideResNet:
        return WideResNet(depth, widen, num_classes, in_channels)

    factory.__doc__ = f"RepDistiller {name}: WRN-{depth}-{widen}."
    return factory


wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2 = (_wrn(d, k) for d, k in ((16, 1), (16, 2), (40, 1), (40, 2)))
