"""Reading kdprobe's own families' constructor arguments off a state_dict (for foreign files).

A rule returns the kwargs that rebuild the network (num_classes, in_channels, widths, pruned
cfg) or None when the tensors cannot belong to that family (wrong depth, other shortcut, a
key missing). Auto-detection (kdprobe.checkpoints.foreign) then builds each surviving candidate and
compares every key and shape, so a rule only has to be right, not complete.
"""
from __future__ import annotations

import re

import torch

from kdprobe.models.registry import list_models, register_infer
from kdprobe.models.vgg import POOL, VGG19_CFG


def generic_kwargs(sd: dict) -> dict:
    """num_classes from the last 2-D weight (the classifier), in_channels from the first 4-D weight."""
    kw = {}
    mats = [v for k, v in sd.items() if k.endswith("weight") and isinstance(v, torch.Tensor) and v.dim() == 2]
    convs = [v for k, v in sd.items() if k.endswith("weight") and isinstance(v, torch.Tensor) and v.dim() == 4]
    if mats:
        kw["num_classes"] = int(mats[-1].shape[0])
    if convs:
        kw["in_channels"] = int(convs[0].shape[1])
    return kw


def _shape(sd: dict, key: str, dim: int = 0) -> int | None:
    v = sd.get(key)
    return int(v.shape[dim]) if isinstance(v, torch.Tensor) and v.dim() > dim else None


def _resnet_rule(depth: int, shortcut: str):
    n = (depth - 2) // 6

    def infer(sd: dict) -> dict | None:
        stem, fc = _shape(sd, "conv1.weight"), _shape(sd, "fc.weight")
        if stem is None or fc is None:
            return None
        blocks = {s: {int(m.group(1)) for k in sd if (m := re.fullmatch(rf"layer{s}\.(\d+)\.conv1\.weight", k))}
                  for s in (1, 2, 3)}
        if any(blocks[s] != set(range(n)) for s in blocks) or "layer4.0.conv1.weight" in sd:
            return None
        has_proj = any(".downsample." in k or ".shortcut." in k for k in sd)
        if has_proj != (shortcut == "B"):
            return None
        width = stem / 16
        trunk = [_shape(sd, f"layer{s}.0.conv2.weight") for s in (1, 2, 3)]
        if trunk != [max(1, round(c * width)) for c in (16, 32, 64)]:
            return None
        kw = {"num_classes": fc, "in_channels": _shape(sd, "conv1.weight", 1)}
        if width != 1.0:
            kw["width"] = width
        cfg = [_shape(sd, f"layer{s}.{b}.conv1.weight") for s in (1, 2, 3) for b in range(n)]
        if cfg != [trunk[s] for s in range(3) for _ in range(n)]:
            kw["block_cfg"] = cfg
        return kw

    return infer


def _vgg19_infer(sd: dict) -> dict | None:
    convs = sorted((int(m.group(1)), v) for k, v in sd.items()
                   if (m := re.fullmatch(r"features\.(\d+)\.weight", k)) and v.dim() == 4)
    if not convs or _shape(sd, "classifier.weight") is None:
        return None
    cfg: list = []
    prev = None
    for idx, w in convs:
        if prev is not None and idx - prev == 4:  # conv, bn, relu, then a max-pool module
            cfg.append(POOL)
        elif prev is not None and idx - prev != 3:
            return None
        cfg.append(int(w.shape[0]))
        prev = idx
    kw = {"num_classes": _shape(sd, "classifier.weight"), "in_channels": int(convs[0][1].shape[1])}
    if cfg != VGG19_CFG:
        kw["cfg"] = cfg
    return kw


def _densenet_infer(sd: dict) -> dict | None:
    layers = {int(m.group(1)) for k in sd if (m := re.fullmatch(r"dense1\.(\d+)\.conv\.weight", k))}
    stem, fc = _shape(sd, "conv1.weight"), _shape(sd, "fc.weight")
    if not layers or stem is None or fc is None or any(".select." in k for k in sd):
        return None
    growth = _shape(sd, "dense1.0.conv.weight")
    kw = {"num_classes": fc, "in_channels": _shape(sd, "conv1.weight", 1), "depth": 3 * len(layers) + 4,
          "growth": growth}
    if stem != 2 * growth:
        kw["init_channels"] = stem
    return kw


def _pyramidnet_rule(fixed: tuple | None):
    """fixed = (depth, bottleneck) of a named PyramidNet, None for the generic factory."""

    def infer(sd: dict) -> dict | None:
        units = {int(m.group(1)) for k in sd if (m := re.fullmatch(r"layer1\.(\d+)\.conv1\.weight", k))}
        base, fc = _shape(sd, "conv1.weight"), _shape(sd, "fc.weight")
        if not units or base is None or fc is None or "bn_final.weight" not in sd:
            return None
        n, bottleneck = len(units), "layer1.0.conv3.weight" in sd
        depth = n * (9 if bottleneck else 6) + 2
        if fixed is not None and fixed != (depth, bottleneck):
            return None
        last = _shape(sd, f"layer3.{n - 1}.conv1.weight")
        kw = {"num_classes": fc, "in_channels": _shape(sd, "conv1.weight", 1), "alpha": float(last - base),
              "base_channels": base}
        if fixed is None:
            kw.update(depth=depth, bottleneck=bottleneck)
        return kw

    return infer


for _name in list_models():
    if m := re.fullmatch(r"resnet(\d+)([ab])", _name):
        register_infer(_name, _resnet_rule(int(m.group(1)), m.group(2).upper()))
register_infer("vgg19_bn", _vgg19_infer)
register_infer("densenet40", _densenet_infer)
register_infer("pyramidnet", _pyramidnet_rule(None))
register_infer("pyramidnet110", _pyramidnet_rule((110, False)))
register_infer("pyramidnet200", _pyramidnet_rule((200, True)))
