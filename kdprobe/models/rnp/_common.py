"""Pieces shared by the rethinking-network-pruning architectures (Liu et al. 2019 code).

ChannelSelection is Network Slimming's `channel_selection`: it follows a BatchNorm whose
channels the residual/dense trunk must keep, and passes on only the channels whose entry
of `indexes` is nonzero. `indexes` is in the state_dict (the reference makes it an
nn.Parameter that never receives a gradient; here it is a buffer, same key and values), so a
pruned file says which channels survive; a fresh model built from a pruned `cfg` selects the
first k channels until a state_dict is loaded.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdprobe.errors import KdprobeError


class ChannelSelection(nn.Module):
    """Keep the input channels whose `indexes` entry is nonzero (Network Slimming)."""

    def __init__(self, num_channels: int, n_keep: int | None = None):
        super().__init__()
        k = num_channels if n_keep is None else int(n_keep)
        if not 1 <= k <= num_channels:
            raise KdprobeError(f"expected a channel selection keeping 1..{num_channels} channels, got {k}; "
                               "fix cfg (a layer must keep a channel and cannot grow)")
        mask = torch.zeros(num_channels)
        mask[:k] = 1.0
        self.register_buffer("indexes", mask)
        # The kept indices as a long tensor: derived from `indexes` when a state_dict is loaded,
        # so forward needs no data-dependent nonzero() (no host sync per call on a GPU).
        self.register_buffer("keep", torch.arange(k), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "indexes" in state_dict and not self.indexes.is_meta:
            self.refresh(prefix)

    def refresh(self, where: str = "") -> None:
        """Recompute the kept indices after `indexes` was changed in place."""
        keep = torch.nonzero(self.indexes).flatten()
        if keep.numel() != self.keep.numel():
            raise KdprobeError(f"{where}indexes selects {keep.numel()} channels but the next layer takes "
                               f"{self.keep.numel()}; the file's cfg and its channel selections disagree, "
                               "pass the cfg of this file")
        self.keep = keep.to(self.keep.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.keep)


def init_like_reference(model: nn.Module, bn_gamma: float, linear_std: float | None = None) -> None:
    """The reference initialization: conv N(0, 2/(k*k*out)), BN gamma const and beta 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, bn_gamma)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


def pool_linear(f: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """Global average pool + Linear: the reference's fixed AvgPool2d(8) / AvgPool2d(2) on the
    8x8 / 2x2 final map of a 32x32 input, and defined for every other input size."""
    return linear(torch.flatten(F.adaptive_avg_pool2d(f, 1), 1))


def check_widths(cfg, n: int, what: str) -> list[int]:
    """`cfg` as n positive ints (JSON lists arrive as lists of ints or floats)."""
    if not isinstance(cfg, (list, tuple)) or len(cfg) != n:
        got = f"{len(cfg)} entries" if isinstance(cfg, (list, tuple)) else repr(cfg)
        raise KdprobeError(f"expected cfg of {n} channel counts for {what}, got {got}; pass the file's cfg")
    out = []
    for v in cfg:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < 1:
            raise KdprobeError(f"expected cfg entries to be positive ints for {what}, got {v!r}")
        out.append(int(v))
    return out


def dim(sd: dict, key: str, d: int = 0) -> int | None:
    """Size of dimension d of sd[key], None when absent or of lower rank."""
    v = sd.get(key)
    return int(v.shape[d]) if isinstance(v, torch.Tensor) and v.dim() > d else None


def indices(sd: dict, pattern: str) -> list[int]:
    """Sorted integers captured by `pattern` (one group) over the keys, e.g. r"layer1\\.(\\d+)\\.conv1\\.weight"."""
    return sorted({int(m.group(1)) for k in sd if (m := re.fullmatch(pattern, k))})
