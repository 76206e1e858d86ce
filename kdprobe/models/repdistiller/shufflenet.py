"""RepDistiller's ShuffleNets (models/ShuffleNetv1.py, ShuffleNetv2.py; kuangliu's CIFAR layout).

Both: a 1x1 stem to 24 channels (no stride, no max-pool), three stride-2 stages, the
reference's fixed 4x4 average pool (global on the 4x4 map of a 32x32 image; needs 32x32
input), `linear`.

ShuffleV1 (groups 3, stage widths 240/480/960, 4/8/4 units): unit = grouped 1x1 (groups 1
when its input is the 24-channel stem) - BN - ReLU - channel shuffle - depthwise 3x3 - BN -
ReLU - grouped 1x1 - BN; stride-2 units concatenate a 3x3/2 average pool (padding 1, padded
zeros counted) of their input and produce width - input channels themselves; ReLU after the
sum or concatenation.

ShuffleV2 (net size 1: widths 116/232/464, 3/7/3 units, 1x1 conv to 1024): each stage is a
DownBlock (two stride-2 branches, concatenated) then BasicBlocks that split the channels in
half and transform the second half; channel shuffle (2 groups) after each; then conv2-BN-ReLU.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdprobe.models.repdistiller._common import SourceNet, conv_bn, register

STEM = 24


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, g*c, H, W) -> interleave the g groups: channel order g0c0, g1c0, ..., g0c1, ..."""
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


class UnitV1(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, groups: int):
        super().__init__()
        mid = int(out / 4)
        self.g1 = 1 if inp == STEM else groups  # the reference's rule: the first unit's input is not grouped
        self.conv1, self.bn1 = conv_bn(inp, mid, groups=self.g1)
        self.conv2, self.bn2 = conv_bn(mid, mid, 3, stride, groups=mid)
        self.conv3, self.bn3 = conv_bn(mid, out, groups=groups)
        self.stride = stride
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.g1)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        return F.relu(torch.cat([out, self.shortcut(x)], 1) if self.shortcut is not None else out + x)


class ShuffleNetV1(SourceNet):
    def __init__(self, widths: list[int], units: list[int], groups: int, num_classes: int, in_channels: int):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_channels, STEM)
        inp, stages = STEM, []
        for w, n in zip(widths, units):
            # the stride-2 unit makes w - inp channels; the pooled input fills the rest
            stages.append(nn.Sequential(*[UnitV1(inp if i == 0 else w, w - inp if i == 0 else w, 2 if i == 0 else 1, groups)
                                          for i in range(n)]))
            inp = w
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(inp, num_classes)
        self.feature_layer, self.feature_channels = "layer3", inp

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """layer3's output, (N, 960, 4, 4) on 32x32."""
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        """avg_pool2d(4) (global on 32x32 input) + linear."""
        return self.linear(self.pool(f, 4))


class DownBlock(nn.Module):
    """Stride-2 unit: left dw3x3/2-BN, 1x1-BN-ReLU; right 1x1-BN-ReLU, dw3x3/2-BN, 1x1-BN-ReLU."""

    def __init__(self, inp: int, out: int):
        super().__init__()
        mid = out // 2
        self.conv1, self.bn1 = conv_bn(inp, inp, 3, 2, groups=inp)
        self.conv2, self.bn2 = conv_bn(inp, mid)
        self.conv3, self.bn3 = conv_bn(inp, mid)
        self.conv4, self.bn4 = conv_bn(mid, mid, 3, 2, groups=mid)
        self.conv5, self.bn5 = conv_bn(mid, mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class SplitBlock(nn.Module):
    """Keep the first half of the channels, transform the rest (1x1-BN-ReLU, dw3x3-BN, 1x1-BN-ReLU)."""

    def __init__(self, channels: int):
        super().__init__()
        half = int(channels * 0.5)
        self.conv1, self.bn1 = conv_bn(half, half)
        self.conv2, self.bn2 = conv_bn(half, half, 3, groups=half)
        self.conv3, self.bn3 = conv_bn(half, half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, rest = x.tensor_split([int(x.shape[1] * 0.5)], 1)
        rest = F.relu(self.bn1(self.conv1(rest)))
        rest = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(rest)))))
        return channel_shuffle(torch.cat([keep, rest], 1), 2)


class ShuffleNetV2(SourceNet):
    def __init__(self, widths: list[int], units: list[int], num_classes: int, in_channels: int):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_channels, STEM)
        inp, stages = STEM, []
        for w, n in zip(widths[:3], units):
            stages.append(nn.Sequential(DownBlock(inp, w), *[SplitBlock(w) for _ in range(n)]))
            inp = w
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2, self.bn2 = conv_bn(inp, widths[3])
        self.relu = nn.ReLU()  # the final ReLU as a module, so feature KD can hook the last map
        self.linear = nn.Linear(widths[3], num_classes)
        self.feature_layer, self.feature_channels = "relu", widths[3]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU(BN(conv2(layer3))), (N, 1024, 4, 4) on 32x32."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.relu(self.bn2(self.conv2(x)))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        """avg_pool2d(4) (global on 32x32 input) + linear."""
        return self.linear(self.pool(f, 4))


# Both keep PyTorch's default init, as the reference does (it has no init code for them).
@register("ShuffleV1", "conv1.weight", "linear.weight")
def shufflev1(num_classes: int = 100, in_channels: int = 3) -> ShuffleNetV1:
    """RepDistiller ShuffleV1: groups 3, widths 240/480/960, units 4/8/4."""
    return ShuffleNetV1([240, 480, 960], [4, 8, 4], 3, num_classes, in_channels)


@register("ShuffleV2", "conv1.weight", "linear.weight")
def shufflev2(num_classes: int = 100, in_channels: int = 3) -> ShuffleNetV2:
    """RepDistiller ShuffleV2 (net size 1): widths 116/232/464, units 3/7/3, 1x1 conv to 1024."""
    return ShuffleNetV2([116, 232, 464, 1024], [3, 7, 3], num_classes, in_channels)
