"""RepDistiller's CIFAR ResNets (models/resnet.py) and its ResNet50 (models/resnetv2.py).

resnet8 ... resnet110 ([16, 16, 32, 64] filters): the stem has as many filters as stage 1,
so this is exactly kdprobe's option-B `resnetXb` (same state_dict keys and shapes, same
blocks: conv-BN-ReLU-conv-BN, + 1x1 conv-BN projection where the shape changes, ReLU after
the sum). They are registered as aliases (`repdistiller:resnet56` -> `resnet56b`), so
auto-detection sees one network, not two. The one difference is off the reference's input
size: the reference pools with AvgPool2d(8), which is global only on 32x32 images (and
fails below); kdprobe's pools globally at any size. Tested equal at 32x32.

resnet8x4 / resnet32x4 ([32, 64, 128, 256]): the stem (32) is narrower than stage 1 (64),
so layer1.0 has a projection; a network of its own here, with the reference's fixed 8x8
pool (needs 32x32 input).

ResNet50: the 4-stage bottleneck ResNet of kuangliu's pytorch-cifar (3x3 stride-1 stem,
no max-pool, [3, 4, 6, 3] blocks of width 64..512 x 4, projections named `shortcut`),
adaptive average pool, `linear` classifier; runs at any input size.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdprobe.errors import KdprobeError
from kdprobe.models.registry import register_alias
from kdprobe.models.repdistiller._common import PREFIX, SourceNet, conv_bn, init_conv_bn, register
from kdprobe.models.resnet import BasicBlock  # the reference's basic block (option B), shared


class StemResNet(SourceNet):
    """CIFAR ResNet 6n+2 whose stem width (filters[0]) may differ from stage 1 (filters[1]).

    block_cfg (3n widths, optional): the inner width of every basic block, as L1 filter pruning and
    Network Slimming leave it (kdprobe.pruning); the residual trunk keeps filters[1:]."""

    def __init__(self, depth: int, filters: list[int], num_classes: int, in_channels: int,
                 block_cfg: list[int] | None = None):
        super().__init__()
        n = (depth - 2) // 6
        mids = [int(c) for c in block_cfg] if block_cfg is not None else [p for p in filters[1:] for _ in range(n)]
        if len(mids) != 3 * n or min(mids) < 1:
            raise KdprobeError(f"expected block_cfg of {3 * n} positive widths for depth {depth}, got {block_cfg}")
        self.conv1, self.bn1 = conv_bn(in_channels, filters[0], 3)
        inp, stages = filters[0], []
        for s, planes in enumerate(filters[1:]):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(inp, mids[s * n + b], planes, 2 if s > 0 and b == 0 else 1, "B"))
                inp = planes
            stages.append(nn.Sequential(*blocks))
        self.blocks_per_stage = n
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(filters[3], num_classes)
        self.feature_layer, self.feature_channels = "layer3", filters[3]
        init_conv_bn(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """layer3's output, (N, 4*64, 8, 8) on 32x32."""
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        """AvgPool2d(8) (global on 32x32 input) + fc."""
        return self.fc(self.pool(f, 8))


def _stem_resnet(depth: int, name: str):
    @register(name, "conv1.weight", "fc.weight")
    def factory(num_classes: int = 100, in_channels: int = 3, block_cfg: list[int] | None = None) -> StemResNet:
        return StemResNet(depth, [32, 64, 128, 256], num_classes, in_channels, block_cfg)

    factory.__doc__ = f"RepDistiller {name}: CIFAR ResNet-{depth}, filters [32, 64, 128, 256]."
    return factory


resnet8x4 = _stem_resnet(8, "resnet8x4")
resnet32x4 = _stem_resnet(32, "resnet32x4")

for _d in (8, 14, 20, 32, 44, 56, 110):
    register_alias(f"{PREFIX}resnet{_d}", f"resnet{_d}b")


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 (x4), BN after each, ReLU after the sum; projection `shortcut`."""

    def __init__(self, inp: int, planes: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(inp, planes)
        self.conv2, self.bn2 = conv_bn(planes, planes, 3, stride)
        self.conv3, self.bn3 = conv_bn(planes, 4 * planes)
        self.shortcut = nn.Sequential()  # empty = identity, as the reference (no keys)
        if stride != 1 or inp != 4 * planes:
            self.shortcut = nn.Sequential(*conv_bn(inp, 4 * planes, 1, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class BottleneckResNet(SourceNet):
    """Four stages of bottlenecks (widths 64, 128, 256, 512; expansion 4), CIFAR stem."""

    def __init__(self, num_blocks: list[int], num_classes: int, in_channels: int):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_channels, 64, 3)
        inp, stages = 64, []
        for s, (planes, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            blocks = []
            for b in range(n):
                blocks.append(Bottleneck(inp, planes, 2 if s > 0 and b == 0 else 1))
                inp = 4 * planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(inp, num_classes)
        self.feature_layer, self.feature_channels = "layer4", inp
        init_conv_bn(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """layer4's output, (N, 2048, 4, 4) on 32x32."""
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        """Adaptive (global) average pool + linear."""
        return self.linear(self.pool(f))


@register("ResNet50", "conv1.weight", "linear.weight")
def resnet50(num_classes: int = 100, in_channels: int = 3) -> BottleneckResNet:
    """RepDistiller ResNet50 (resnetv2.py): bottleneck blocks [3, 4, 6, 3], CIFAR stem."""
    return BottleneckResNet([3, 4, 6, 3], num_classes, in_channels)
