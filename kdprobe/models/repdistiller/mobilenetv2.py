"""RepDistiller's MobileNetV2 (models/mobilenetv2.py, `mobile_half`: expansion 6, width 0.5).

From "Knowledge Distillation via Route Constrained Optimization": a stride-2 3x3 stem
(`conv1`), seven groups of inverted residuals (`blocks.i.j.conv.0..7`: 1x1 expand - BN - ReLU,
3x3 depthwise - BN - ReLU, 1x1 project - BN; the expand conv is there even where the
expansion is 1), residual where stride 1 and widths equal; a 1x1 conv to 1280 (`conv2`), the
reference's AvgPool2d(2, ceil_mode=True), `classifier.0`. Widths are int(c * 0.5) as the
reference computes them: 16 stem, 8, 12, 16, 32, 48, 80, 160. The pool gives one value per
channel for inputs of 32x32 or smaller (it is global on 32x32: a 2x2 map).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kdprobe.models.repdistiller._common import SourceNet, conv_bn, init_conv_bn, register

# (channels, blocks, first stride) per group; the first group has expansion 1, the others T
SETTING = [(16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1)]


def conv_bn_relu(inp: int, out: int, kernel: int, stride: int) -> nn.Sequential:
    """Conv (no bias, same padding) - BN - ReLU, keys .0 / .1."""
    return nn.Sequential(*conv_bn(inp, out, kernel, stride), nn.ReLU())


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand: int):
        super().__init__()
        mid = inp * expand
        self.use_res_connect = stride == 1 and inp == out
        # expand, depthwise, project: keys conv.0/1 (ReLU 2), conv.3/4 (ReLU 5), conv.6/7
        self.conv = nn.Sequential(*conv_bn(inp, mid), nn.ReLU(), *conv_bn(mid, mid, 3, stride, mid), nn.ReLU(),
                                  *conv_bn(mid, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(SourceNet):
    def __init__(self, expand: int, width: float, num_classes: int, in_channels: int):
        super().__init__()
        inp = int(32 * width)
        self.conv1 = conv_bn_relu(in_channels, inp, 3, 2)
        self.blocks = nn.ModuleList()
        for g, (c, n, s) in enumerate(SETTING):
            out, layers = int(c * width), []
            for i in range(n):
                layers.append(InvertedResidual(inp, out, s if i == 0 else 1, expand if g > 0 else 1))
                inp = out
            self.blocks.append(nn.Sequential(*layers))
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = conv_bn_relu(inp, last, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        self.feature_layer, self.feature_channels = "conv2", last
        init_conv_bn(self, linear_std=0.01)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """conv2's output (1x1 conv-BN-ReLU to 1280), (N, 1280, 2, 2) on 32x32."""
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        return self.conv2(x)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        """AvgPool2d(2, ceil_mode=True) (global on 32x32 input) + classifier."""
        return self.classifier(self.pool(f, 2, ceil_mode=True))


@register("MobileNetV2", "conv1.0.weight", "classifier.0.weight")
def mobilenetv2(num_classes: int = 100, in_channels: int = 3) -> MobileNetV2:
    """RepDistiller MobileNetV2 (mobile_half): expansion 6, width multiplier 0.5."""
    return MobileNetV2(6, 0.5, num_classes, in_channels)
