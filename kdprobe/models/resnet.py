"""CIFAR ResNets of depth 6n+2 (He et al. 2016), in both shortcut variants.

Option A (`resnetXXa`, alias `rnp-l1:resnetXX`): parameter-free shortcut exactly as in the
pruning reference code (Eric-mingjie/rethinking-network-pruning, cifar/l1-norm-pruning/
models/resnet.py, `downsample_basic_block`): where a block changes shape, AvgPool2d(2, 2),
then zero channels appended after the existing ones, built from `x.data`, so NO gradient
flows through that downsampled shortcut (the identity shortcuts of the other blocks pass
gradient as usual). `shortcut_a="avgpool"` records this in `model.arch`.
`resnetXXa-subsample` (`shortcut_a="subsample"`): kdprobe's earlier option A, stride-2
subsample `x[:, :, ::2, ::2]` + zero channels, gradient through the shortcut. Checkpoints of
kdprobe format 1 named resnetXXa were trained with it and load as it (models.legacy).
Both pool/subsample so that odd sizes (7x7) keep the conv's ceil(H/2) output size; the
reference's floor-mode pool fails there, and on even sizes ceil mode changes nothing.
Option B (`resnetXXb`, alias `resnetXX`): 1x1 conv + BN projection where the shape
changes, as in the KD reference code (RepDistiller).

`block_cfg` gives the width of the first conv of every basic block (3n entries); L1
filter pruning rebuilds a smaller network from it while the residual trunk keeps
16/32/64 channels (times `width`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdprobe.errors import KdprobeError
from kdprobe.models.registry import register_model


SHORTCUTS_A = ("avgpool", "subsample")  # option A variants: reference (Li et al.) / kdprobe format 1


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, mid: int, planes: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut_kind = shortcut
        self.stride, self.pad = stride, planes - in_planes
        self.downsample = None
        if shortcut == "B" and (stride != 1 or in_planes != planes):
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            return self.downsample(x)
        if self.stride == 1 and self.pad == 0:
            return x  # identity: gradient flows (the reference's `residual = x`)
        if self.shortcut_kind == "avgpool":
            # Li et al.: AvgPool2d(2, 2) then cat([x.data, zeros]) -> detached, no gradient
            x = F.avg_pool2d(x.detach(), self.stride, self.stride, ceil_mode=True)
        elif self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad > 0:  # zero channels after the existing ones, as cat((x, zeros), dim=1)
            x = F.pad(x, (0, 0, 0, 0, 0, self.pad))
        return x

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self._shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, in_channels: int, shortcut: str,
                 width: float = 1.0, block_cfg: list[int] | None = None):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise KdprobeError(f"expected a CIFAR ResNet depth of 6n+2 (8, 20, 56, ...), got {depth}")
        n = (depth - 2) // 6
        stages = [max(1, round(c * width)) for c in (16, 32, 64)]
        if block_cfg is None:
            block_cfg = [stages[s] for s in range(3) for _ in range(n)]
        block_cfg = [int(c) for c in block_cfg]
        if len(block_cfg) != 3 * n or min(block_cfg) < 1:
            raise KdprobeError(f"expected block_cfg of {3 * n} positive widths for depth {depth}, got {block_cfg}")
        self.conv1 = nn.Conv2d(in_channels, stages[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stages[0])
        blocks, in_planes = [], stages[0]
        for s in range(3):
            layer = []
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                layer.append(BasicBlock(in_planes, block_cfg[s * n + b], stages[s], stride, shortcut))
                in_planes = stages[s]
            blocks.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3 = blocks
        self.fc = nn.Linear(stages[2], num_classes)
        self.feature_channels = stages[2]
        self.feature_layer = "layer3"  # the module whose output forward_features returns (feature KD hooks it)
        self.blocks_per_stage = n
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, f):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(f, 1), 1))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _make(depth: int, shortcut: str):
    def factory(num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                block_cfg: list[int] | None = None):
        return CifarResNet(depth, num_classes, in_channels, shortcut, width, block_cfg)

    factory.__doc__ = f"CIFAR ResNet-{depth}, shortcut option {shortcut}."
    return factory


def _make_a(depth: int, default: str):
    # resnetXXa takes either variant; resnetXXa-subsample only its own (its name says which)
    allowed = SHORTCUTS_A if default == "avgpool" else (default,)

    def factory(num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                block_cfg: list[int] | None = None, shortcut_a: str = default):
        if shortcut_a not in allowed:
            raise KdprobeError(f"expected shortcut_a in {allowed}, got {shortcut_a!r}; "
                               f"resnet{depth}a builds either option-A variant")
        return CifarResNet(depth, num_classes, in_channels, shortcut_a, width, block_cfg)

    factory.__doc__ = f"CIFAR ResNet-{depth}, shortcut option A ({default})."
    return factory


for _d in (8, 14, 20, 32, 44, 56, 110):
    register_model(f"resnet{_d}a", f"rnp-l1:resnet{_d}")(_make_a(_d, "avgpool"))
    register_model(f"resnet{_d}a-subsample", detect=False)(_make_a(_d, "subsample"))
    register_model(f"resnet{_d}b", f"resnet{_d}")(_make(_d, "B"))
