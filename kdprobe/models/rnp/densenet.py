"""`rnp-slimming:densenet40`: Network Slimming's DenseNet-40 (rethinking-network-pruning,
cifar/network-slimming/models/densenet.py).

Growth 12, no bottleneck, compression 1 (the reference's defaults): a 3x3 stem conv to
2 x growth channels, three dense blocks of n = (depth - 4) / 3 layers, each
bn1 (all input channels) -> select -> ReLU -> conv1 3x3 to `growth`, concatenated to its
input; transitions bn1 -> select -> ReLU -> conv1 1x1 (same width) -> avg-pool 2; then
bn -> select -> ReLU -> pool -> fc. Keys: `dense1.0.bn1.*`, `dense1.0.select.indexes`,
`dense1.0.conv1.weight`, `trans1.*`, `bn.*`, `select.indexes`, `fc.*`.

`cfg` (3n+3 entries, the reference's): the channels each select keeps, in forward order
(dense layers of block 1, trans1, block 2, trans2, block 3, final). Unlike the reference's
default cfg formula (right only for depth 40 with growth 12), the default here is computed
for any depth and growth. The transition pool uses ceil mode (identical on even sizes; 7x7
inputs keep a border).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdprobe.errors import KdprobeError
from kdprobe.models.registry import register_model
from kdprobe.models.rnp._common import ChannelSelection, check_widths, dim, indices, init_like_reference, pool_linear


class SelectConv(nn.Module):
    """bn1 over all input channels, select `keep` of them, ReLU, conv1 (k x k, same padding)."""

    def __init__(self, inplanes: int, keep: int, out: int, kernel: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.select = ChannelSelection(inplanes, keep)
        self.conv1 = nn.Conv2d(keep, out, kernel, 1, kernel // 2, bias=False)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(F.relu(self.select(self.bn1(x))))


class DenseLayer(SelectConv):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x, self.branch(x)), 1)


class Transition(SelectConv):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.branch(x), 2, ceil_mode=True)


def bn_widths(depth: int, growth: int) -> list[int]:
    """Input width of every select in forward order (= the unpruned cfg)."""
    n, c, out = (depth - 4) // 3, 2 * growth, []
    for b in range(3):
        out += [c + j * growth for j in range(n)]
        c += n * growth
        out.append(c)  # trans1, trans2, then the final bn
    return out


class SlimmingDenseNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, depth: int, growth: int, cfg: list[int] | None):
        super().__init__()
        if depth < 7 or (depth - 4) % 3 != 0:
            raise KdprobeError(f"expected a DenseNet depth of 3n+4 (7, 10, ..., 40), got {depth}")
        if growth < 1:
            raise KdprobeError(f"expected growth >= 1, got {growth}")
        n, widths = (depth - 4) // 3, bn_widths(depth, growth)
        cfg = widths if cfg is None else check_widths(cfg, 3 * n + 3, f"DenseNet-{depth}")
        self.cfg = list(cfg)
        self.conv1 = nn.Conv2d(in_channels, 2 * growth, 3, 1, 1, bias=False)
        parts, i = [], 0
        for b in range(3):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(widths[i], cfg[i], growth, 3))
                i += 1
            parts.append(nn.Sequential(*layers))
            if b < 2:
                parts.append(Transition(widths[i], cfg[i], widths[i], 1))
                i += 1
        self.dense1, self.trans1, self.dense2, self.trans2, self.dense3 = parts
        self.bn = nn.BatchNorm2d(widths[i])
        self.select = ChannelSelection(widths[i], cfg[i])
        self.relu = nn.ReLU()  # a module (the reference's `relu`) so feature KD can hook its output
        self.fc = nn.Linear(cfg[i], num_classes)
        self.feature_channels = cfg[i]
        self.feature_layer = "relu"
        init_like_reference(self, bn_gamma=0.5)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """bn -> select -> ReLU after the last dense block: (N, 456, 8, 8) on 32x32 unpruned."""
        x = self.trans1(self.dense1(self.conv1(x)))
        x = self.dense3(self.trans2(self.dense2(x)))
        return self.relu(self.select(self.bn(x)))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return pool_linear(f, self.fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def infer_densenet(sd: dict) -> dict | None:
    """num_classes, in_channels, depth, growth and (if pruned) cfg read off a state_dict; None if not this family."""
    layers = indices(sd, r"dense1\.(\d+)\.conv1\.weight")
    n, growth, stem = len(layers), dim(sd, "dense1.0.conv1.weight"), dim(sd, "conv1.weight")
    if (not n or layers != list(range(n)) or "dense1.0.select.indexes" not in sd or "select.indexes" not in sd
            or growth is None or stem != 2 * growth or dim(sd, "fc.weight") is None):
        return None
    keys = ([f"dense1.{j}.conv1.weight" for j in range(n)] + ["trans1.conv1.weight"]
            + [f"dense2.{j}.conv1.weight" for j in range(n)] + ["trans2.conv1.weight"]
            + [f"dense3.{j}.conv1.weight" for j in range(n)])
    cfg = [dim(sd, k, 1) for k in keys] + [dim(sd, "fc.weight", 1)]
    if None in cfg:
        return None
    depth = 3 * n + 4
    kw = {"num_classes": dim(sd, "fc.weight"), "in_channels": dim(sd, "conv1.weight", 1)}
    if (depth, growth) != (40, 12):
        kw.update(depth=depth, growth=growth)
    if cfg != bn_widths(depth, growth):
        kw["cfg"] = cfg
    return kw


@register_model("rnp-slimming:densenet40", infer=infer_densenet)
def rnp_slimming_densenet40(num_classes: int = 10, in_channels: int = 3, depth: int = 40, growth: int = 12,
                            cfg: list[int] | None = None) -> SlimmingDenseNet:
    """Network Slimming's DenseNet-40 (k=12) with channel selections; depth/growth override it for tiny models."""
    return SlimmingDenseNet(num_classes, in_channels, depth, growth, cfg)
