"""`rnp-weight:resnet56`, `rnp-weight:resnet110`: the CIFAR ResNet of the weight-level pruning
code (rethinking-network-pruning, cifar/weight-level/models/cifar/resnet.py).

That code checks depth 6n+2 but picks the block by depth: Bottleneck from depth 54 on,
BasicBlock below. So its "ResNet-56" and "ResNet-110" (the paper's weight-pruned ResNet-110)
are bottleneck networks of n = 9 / 18 blocks per stage, three convs each: conv1 1x1 -> bn1
-> ReLU -> conv2 3x3 (stride 2 at the first block of stages 2, 3) -> bn2 -> ReLU -> conv3 1x1
to 4 x planes -> bn3, plus the input through `downsample` (1x1 conv + BN) in the first block
of every stage, then ReLU. Stem conv3x3 + bn1 + ReLU to 16; planes 16/32/64; fc from 256.
Below depth 54 the code builds kdprobe's `resnetXXb` (1x1-conv + BN shortcuts), not listed here.

`width` scales the planes (tiny test models); 1.0 is the reference.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdprobe.errors import KdprobeError
from kdprobe.models.registry import register_model
from kdprobe.models.rnp._common import dim, indices, init_like_reference, pool_linear


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * planes)
        self.downsample = None
        if stride != 1 or inplanes != 4 * planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, 4 * planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(4 * planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class WeightLevelResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, in_channels: int, width: float):
        super().__init__()
        if not width > 0:
            raise KdprobeError(f"expected width > 0, got {width}")
        n = (depth - 2) // 6
        planes = [max(1, round(c * width)) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        inplanes, stages = planes[0], []
        for s, p in enumerate(planes):
            blocks = []
            for b in range(n):
                blocks.append(Bottleneck(inplanes, p, 2 if s > 0 and b == 0 else 1))
                inplanes = 4 * p
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(inplanes, num_classes)
        self.feature_channels = inplanes
        self.feature_layer = "layer3"
        self.blocks_per_stage = n
        init_like_reference(self, bn_gamma=1.0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the last stage: (N, 256, 8, 8) on 32x32."""
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return pool_linear(f, self.fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _infer(depth: int):
    n = (depth - 2) // 6

    def infer(sd: dict) -> dict | None:
        """num_classes, in_channels, width read off a state_dict; None unless a depth-`depth` bottleneck ResNet."""
        stem, classes = dim(sd, "conv1.weight"), dim(sd, "fc.weight")
        if (stem is None or classes is None or "bn1.weight" not in sd or "layer1.0.downsample.1.weight" not in sd
                or any(indices(sd, rf"layer{s}\.(\d+)\.conv3\.weight") != list(range(n)) for s in (1, 2, 3))):
            return None
        kw = {"num_classes": classes, "in_channels": dim(sd, "conv1.weight", 1)}
        if stem != 16:
            kw["width"] = stem / 16
        return kw

    return infer


def _make(depth: int):
    def factory(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> WeightLevelResNet:
        return WeightLevelResNet(depth, num_classes, in_channels, width)

    factory.__doc__ = f"Weight-level pruning code's CIFAR ResNet-{depth} (bottleneck blocks, as that code builds it)."
    return factory


for _d in (56, 110):
    register_model(f"rnp-weight:resnet{_d}", infer=_infer(_d))(_make(_d))
