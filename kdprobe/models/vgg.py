"""VGG-19 with BatchNorm in the CIFAR layout of Network Slimming (Liu et al. 2017).

Sixteen conv3x3 (pad 1, no bias) + BN + ReLU layers with four 2x2 max-pools, then a global
average pool and one Linear layer: 20.04M parameters on CIFAR-10, as the paper reports.

`cfg` is the per-layer channel list with "M" marking a max-pool; Network Slimming rebuilds
a slimmed network from it, so it is exactly what the checkpoint stores (plain JSON).

Small inputs: the four max-pools would take an 8x8 input (sklearn digits) to 0x0. We use
`ceil_mode=True`, which is static (no data-dependent branches, so the model traces and
compiles the same on any device) and changes nothing on even sizes: 32->16->8->4->2 exactly
as the reference, while 8->4->2->1->1 keeps a 1x1 map instead of failing.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdprobe.errors import KdprobeError
from kdprobe.models.registry import register_model

POOL = "M"  # marker of a 2x2 max-pool in `cfg`

# Network Slimming's default VGG-19 configuration (channels per conv layer).
VGG19_CFG: list[int | str] = [64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL,
                              512, 512, 512, 512, POOL, 512, 512, 512, 512]


def _check_cfg(cfg) -> list[int | str]:
    """Validate a layer list: positive ints and "M" markers, at least one conv."""
    if not isinstance(cfg, (list, tuple)):
        raise KdprobeError(f"expected cfg as a list of channel counts and 'M' markers, got {cfg!r}")
    out: list[int | str] = []
    for v in cfg:
        if v == POOL:
            out.append(POOL)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and int(v) == v and v >= 1:
            out.append(int(v))
        else:
            raise KdprobeError(f"expected cfg entries to be positive ints or 'M', got {v!r} in {list(cfg)}; "
                               "fix the layer list")
    if not any(v != POOL for v in out):
        raise KdprobeError(f"expected cfg to contain at least one conv width, got {list(cfg)}")
    return out


class SlimVGG(nn.Module):
    """Plain conv-BN-ReLU stack described by `cfg`; `features` holds the layers in order."""

    def __init__(self, num_classes: int, in_channels: int, cfg: list[int | str]):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == POOL:
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:  # ReLU not in place: hooks on a BN (slimming, feature probes) see its true output
                layers += [nn.Conv2d(c, v, 3, 1, 1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)
        self.feature_channels = c
        self.feature_layer = "features"  # its output is the last conv-BN-ReLU map (feature KD hooks it)
        self.cfg = list(cfg)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # N(0, 2/(k*k*out)) as in the slimming reference
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                # gamma = 0.5, the slimming reference's start for the L1-on-gamma sparsity run
                nn.init.constant_(m.weight, 0.5)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last conv-BN-ReLU map before pooling, (N, C, H, W); (N, 512, 2, 2) on 32x32."""
        return self.features(x)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        """Global average pool + Linear (the reference's AvgPool2d(2) on its 2x2 map)."""
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(f, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model("vgg19_bn", "vgg19")
def vgg19_bn(num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
             cfg: list[int | str] | None = None) -> SlimVGG:
    """VGG-19-BN (Network Slimming CIFAR layout); `cfg` (used as given) overrides `width`."""
    if cfg is None:
        if not width > 0:
            raise KdprobeError(f"expected width > 0, got {width}")
        cfg = [v if v == POOL else max(1, round(v * width)) for v in VGG19_CFG]
    return SlimVGG(num_classes, in_channels, _check_cfg(cfg))
