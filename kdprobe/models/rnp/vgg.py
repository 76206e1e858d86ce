"""`rnp-slimming:vgg19`: Network Slimming's CIFAR VGG (rethinking-network-pruning,
cifar/network-slimming/models/vgg.py).

Conv3x3 (no bias) + BN + ReLU per `cfg` entry, MaxPool2d(2, 2) per "M", all in one
Sequential named `feature`; then AvgPool2d(2) on the 2x2 map and `classifier` =
Linear(cfg[-1], classes). It computes what kdprobe's `vgg19_bn` computes, but its keys are
`feature.N.*` (not `features.N.*`), so it is its own name. Pools use ceil mode and the head
pools globally: identical to the reference on 32x32 inputs, and an 8x8 input keeps a 1x1 map
where the reference fails.

A pruned-and-fine-tuned file of this code (main_finetune.py) holds no `cfg`: `infer` reads
the widths off the conv tensors and the pool positions off the gaps in the Sequential's
indices (conv, BN, ReLU take 3 slots, a pool 1).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kdprobe.errors import KdprobeError
from kdprobe.models.registry import register_model
from kdprobe.models.rnp._common import dim, indices, init_like_reference, pool_linear
from kdprobe.models.vgg import POOL, VGG19_CFG, _check_cfg


class SlimmingVGG(nn.Module):
    """The reference's `vgg`: `feature` (conv-BN-ReLU and pools per cfg) then `classifier`."""

    def __init__(self, num_classes: int, in_channels: int, cfg: list[int | str]):
        super().__init__()
        if cfg[-1] == POOL:
            raise KdprobeError(f"expected cfg to end with a conv width (the classifier's input), got {cfg}")
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == POOL:
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:  # ReLU not in place: a hook on a BN sees its true output
                layers += [nn.Conv2d(c, v, 3, 1, 1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
        self.feature = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)
        self.cfg = list(cfg)
        self.feature_channels = c
        self.feature_layer = "feature"
        init_like_reference(self, bn_gamma=0.5, linear_std=0.01)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last conv-BN-ReLU map, (N, 512, 2, 2) on 32x32."""
        return self.feature(x)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return pool_linear(f, self.classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def infer_vgg19(sd: dict) -> dict | None:
    """num_classes, in_channels and (if not the default) cfg read off a state_dict; None if not this VGG-19."""
    idx = [i for i in indices(sd, r"feature\.(\d+)\.weight") if sd[f"feature.{i}.weight"].dim() == 4]
    classes = dim(sd, "classifier.weight")
    if len(idx) != sum(v != POOL for v in VGG19_CFG) or classes is None:
        return None
    cfg: list[int | str] = []
    prev = -3  # a conv at slot 0 follows nothing
    for i in idx:
        gap = i - prev - 3  # slots between two convs that are not the previous conv's BN, ReLU: pools
        if gap < 0:
            return None
        cfg += [POOL] * gap + [int(sd[f"feature.{i}.weight"].shape[0])]
        prev = i
    kw = {"num_classes": classes, "in_channels": dim(sd, f"feature.{idx[0]}.weight", 1)}
    if cfg != VGG19_CFG:
        kw["cfg"] = cfg
    return kw


@register_model("rnp-slimming:vgg19", infer=infer_vgg19)
def rnp_slimming_vgg19(num_classes: int = 10, in_channels: int = 3,
                       cfg: list[int | str] | None = None) -> SlimmingVGG:
    """Network Slimming's VGG-19 (keys feature.N, classifier); `cfg` gives pruned widths and pools."""
    return SlimmingVGG(num_classes, in_channels, _check_cfg(VGG19_CFG if cfg is None else cfg))
