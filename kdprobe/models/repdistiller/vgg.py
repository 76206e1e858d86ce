"""RepDistiller's CIFAR VGGs with BatchNorm (models/vgg.py): vgg8, vgg11, vgg13, vgg16, vgg19.

Five blocks `block0..block4`, each a Sequential of conv3x3 (with bias) - BN - ReLU whose last
ReLU is left out (the forward applies it, so block outputs are pre-activations); max-pools
after blocks 0, 1, 2, and after block 3 only when the input is 64 pixels high (the
reference's rule); then ReLU, adaptive average pool, one Linear(512, classes). On 32x32
the last map is 4x4. Runs on any input of at least 8x8. This is not kdprobe's `vgg19_bn`
(Network Slimming layout: bias-free convs, different keys and pools).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdprobe.models.repdistiller._common import SourceNet, init_conv_bn, register

# conv widths per block, from the reference's cfg table (letters as in Simonyan & Zisserman)
CFGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],  # 'S'
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],  # 'A'
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],  # 'B'
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],  # 'D'
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],  # 'E'
}


def _block(widths: list[int], inp: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(inp, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        inp = w
    return nn.Sequential(*layers[:-1])  # the last ReLU is the forward's (keeps key indices as the reference)


class BlockVGG(SourceNet):
    def __init__(self, cfg: list[list[int]], num_classes: int, in_channels: int):
        super().__init__()
        inputs = [in_channels] + [c[-1] for c in cfg[:-1]]
        self.block0, self.block1, self.block2, self.block3, self.block4 = (_block(c, i) for c, i in zip(cfg, inputs))
        self.pool0, self.pool1, self.pool2, self.pool3 = (nn.MaxPool2d(2, 2) for _ in range(4))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.relu = nn.ReLU()  # the final ReLU as a module, so feature KD can hook the last map
        self.classifier = nn.Linear(512, num_classes)
        self.feature_layer, self.feature_channels = "relu", cfg[4][-1]
        init_conv_bn(self, linear_std=0.01)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU(block4), (N, 512, 4, 4) on 32x32."""
        h = x.shape[2]
        x = self.pool0(F.relu(self.block0(x)))
        x = self.pool1(F.relu(self.block1(x)))
        x = self.pool2(F.relu(self.block2(x)))
        x = F.relu(self.block3(x))
        if h == 64:  # the reference's rule: a fourth max-pool only for 64-pixel inputs
            x = self.pool3(x)
        return self.relu(self.block4(x))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        """Adaptive (global) average pool + classifier."""
        return self.classifier(torch.flatten(self.pool4(f), 1))


def _vgg(name: str):
    @register(name, "block0.0.weight", "classifier.weight")
    def factory(num_classes: int = 100, in_channels: int = 3) -> BlockVGG:
        return BlockVGG(CFGS[name], num_classes, in_channels)

    factory.__doc__ = f"RepDistiller {name} (vgg*_bn in its code): BN after every conv, conv widths {CFGS[name]}."
    return factory


vgg8, vgg11, vgg13, vgg16, vgg19 = (_vgg(n) for n in CFGS)
