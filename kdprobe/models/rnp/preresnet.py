"""`rnp-slimming:preresnet164`: Network Slimming's pre-activation bottleneck ResNet
(rethinking-network-pruning, cifar/network-slimming/models/preresnet.py).

Depth 9n+2 (164 -> n = 18). Stem: one conv3x3 to 16 channels (no BN after it). Each
bottleneck: bn1 (all `inplanes` channels) -> select -> ReLU -> conv1 1x1 -> bn2 -> ReLU ->
conv2 3x3 (stride 2 at the first block of stages 2 and 3) -> bn3 -> ReLU -> conv3 1x1 to
4 x planes; plus the input, through `downsample` (a lone 1x1 conv, no BN) in the first block
of every stage. After the last stage: bn -> select -> ReLU -> pool -> fc.

`cfg` (9n+1 entries, the reference's): per block [channels select keeps, conv1 out, conv2
out], then the channels the final select keeps (= fc input). Slimming prunes exactly these;
the trunk (conv3 outputs, downsample convs, the BNs before a select) keeps 64/128/256.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdprobe.errors import KdprobeError
from kdprobe.models.registry import register_model
from kdprobe.models.rnp._common import ChannelSelection, check_widths, dim, indices, init_like_reference, pool_linear

PLANES = (16, 32, 64)  # bottleneck widths per stage; outputs are 4x these


def default_cfg(n: int) -> list[int]:
    """The reference's unpruned cfg for n blocks per stage."""
    cfg = []
    for s, p in enumerate(PLANES):
        first_in = 16 if s == 0 else 4 * PLANES[s - 1]
        cfg += [first_in, p, p] + [4 * p, p, p] * (n - 1)
    return cfg + [4 * PLANES[-1]]


class PreBottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, cfg: list[int], stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.select = ChannelSelection(inplanes, cfg[0])
        self.conv1 = nn.Conv2d(cfg[0], cfg[1], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cfg[1])
        self.conv2 = nn.Conv2d(cfg[1], cfg[2], 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cfg[2])
        self.conv3 = nn.Conv2d(cfg[2], 4 * planes, 1, bias=False)
        self.downsample = None
        if stride != 1 or inplanes != 4 * planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, 4 * planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.select(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + (x if self.downsample is None else self.downsample(x))


class SlimmingPreResNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, depth: int, cfg: list[int] | None):
        super().__init__()
        if depth < 11 or (depth - 2) % 9 != 0:
            raise KdprobeError(f"expected a pre-ResNet depth of 9n+2 (11, 20, ..., 164), got {depth}")
        n = (depth - 2) // 9
        cfg = default_cfg(n) if cfg is None else check_widths(cfg, 9 * n + 1, f"pre-ResNet-{depth}")
        self.cfg = list(cfg)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        inplanes, stages = 16, []
        for s, planes in enumerate(PLANES):
            blocks = []
            for b in range(n):
                i = 3 * (s * n + b)
                blocks.append(PreBottleneck(inplanes, planes, cfg[i:i + 3], 2 if s > 0 and b == 0 else 1))
                inplanes = 4 * planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(inplanes)
        self.select = ChannelSelection(inplanes, cfg[-1])
        self.relu = nn.ReLU()  # a module (the reference's `relu`) so feature KD can hook its output
        self.fc = nn.Linear(cfg[-1], num_classes)
        self.feature_channels = cfg[-1]
        self.feature_layer = "relu"
        init_like_reference(self, bn_gamma=0.5)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """bn -> select -> ReLU after the last stage: (N, 256, 8, 8) on 32x32 unpruned."""
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.relu(self.select(self.bn(x)))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return pool_linear(f, self.fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def infer_preresnet(sd: dict) -> dict | None:
    """num_classes, in_channels, depth and (if pruned) cfg read off a state_dict; None if not this family."""
    blocks = indices(sd, r"layer1\.(\d+)\.conv3\.weight")
    n = len(blocks)
    if (not n or blocks != list(range(n)) or "select.indexes" not in sd or "layer1.0.select.indexes" not in sd
            or dim(sd, "fc.weight") is None or dim(sd, "conv1.weight") != 16 or "bn1.weight" in sd):
        return None
    cfg = []
    for s in (1, 2, 3):
        for b in range(n):
            c1, c2 = dim(sd, f"layer{s}.{b}.conv1.weight", 1), dim(sd, f"layer{s}.{b}.conv2.weight", 1)
            c3 = dim(sd, f"layer{s}.{b}.conv3.weight", 1)
            if None in (c1, c2, c3):
                return None
            cfg += [c1, c2, c3]
    cfg.append(dim(sd, "fc.weight", 1))
    kw = {"num_classes": dim(sd, "fc.weight"), "in_channels": dim(sd, "conv1.weight", 1)}
    if 9 * n + 2 != 164:
        kw["depth"] = 9 * n + 2
    if cfg != default_cfg(n):
        kw["cfg"] = cfg
    return kw


@register_model("rnp-slimming:preresnet164", infer=infer_preresnet)
def rnp_slimming_preresnet164(num_classes: int = 10, in_channels: int = 3, depth: int = 164,
                              cfg: list[int] | None = None) -> SlimmingPreResNet:
    """Network Slimming's pre-activation bottleneck ResNet-164 with channel selections; depth overrides it."""
    return SlimmingPreResNet(num_classes, in_channels, depth, cfg)
