"""What every RepDistiller network here shares: the features/head split, the reference's
pooling heads, and registration under `repdistiller:NAME` with an exact-shape `infer`."""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdprobe.errors import KdprobeError
from kdprobe.models.registry import register_model

PREFIX = "repdistiller:"


class SourceNet(nn.Module):
    """forward(x) == forward_head(forward_features(x)); subclasses set feature_layer/feature_channels."""

    feature_layer: str
    feature_channels: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def pool(self, f: torch.Tensor, kernel: int | None = None, ceil_mode: bool = False) -> torch.Tensor:
        """The reference head's average pool, flattened to (N, C); kernel None = adaptive (global).

        The reference pools a fixed window (AvgPool2d(8) etc.) that is global only on the feature
        map of a 32x32 image. Where it would not give one value per channel, the reference crashes
        or (WRN's view(-1, C)) silently mixes samples; we stop with a clear error instead.
        """
        if kernel is not None:
            h, w = f.shape[-2:]
            # output 1x1 with stride = kernel, no padding: k <= size < 2k, or size <= k in ceil mode
            one = (lambda s: 1 <= s <= kernel) if ceil_mode else (lambda s: kernel <= s < 2 * kernel)
            if not (one(h) and one(w)):
                name = getattr(self, "arch", {}).get("name", type(self).__name__)
                raise KdprobeError(
                    f"{name} expects 32x32 input images: its head averages a fixed {kernel}x{kernel} window "
                    f"(as the RepDistiller reference does), one value per channel only on a feature map of "
                    f"{1 if ceil_mode else kernel} to {kernel if ceil_mode else 2 * kernel - 1} pixels a side, "
                    f"got {h}x{w}; resize the images to 32x32 (--image-size 32)")
            f = F.avg_pool2d(f, kernel, ceil_mode=ceil_mode)
        else:
            f = F.adaptive_avg_pool2d(f, 1)
        return torch.flatten(f, 1)


def conv_bn(inp: int, out: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """A bias-free conv (same padding) and its BN, as every network here pairs them."""
    return nn.Conv2d(inp, out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(out)


def init_conv_bn(model: nn.Module, linear_std: float | None = None) -> None:
    """The reference's init: conv N(0, 2/(k*k*out)) (= Kaiming fan_out), BN 1/0, Linear N(0, std)/0 if given."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


def _shapes(sd: dict) -> dict[str, tuple[int, ...]]:
    # num_batches_tracked is absent from files written before torch 0.4.1 and carries no structure
    return {k: tuple(v.shape) for k, v in sd.items()
            if isinstance(v, torch.Tensor) and not k.endswith("num_batches_tracked")}


@lru_cache(maxsize=256)
def _skeleton(fn: Callable[..., nn.Module], num_classes: int, in_channels: int) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return _shapes(fn(num_classes=num_classes, in_channels=in_channels).state_dict())


def exact_infer(fn: Callable[..., nn.Module], stem_key: str, head_key: str) -> Callable[[dict], dict | None]:
    """infer(state_dict) for a fixed network: num_classes and in_channels off the head and stem,
    None unless every other key and shape is exactly this network's (so wrn_16_2 never fits wrn_40_2)."""

    def infer(sd: dict) -> dict | None:
        head, stem = sd.get(head_key), sd.get(stem_key)
        if not (isinstance(head, torch.Tensor) and head.dim() == 2 and isinstance(stem, torch.Tensor) and stem.dim() == 4):
            return None
        kw = {"num_classes": int(head.shape[0]), "in_channels": int(stem.shape[1])}
        if min(kw.values()) < 1 or _shapes(sd) != _skeleton(fn, **kw):
            return None
        return kw

    return infer


def register(name: str, stem_key: str, head_key: str):
    """Decorator: register `fn(num_classes=100, in_channels=3)` as repdistiller:NAME (lowercased)."""

    def deco(fn):
        register_model(PREFIX + name, infer=exact_infer(fn, stem_key, head_key))(fn)
        return fn

    return deco
