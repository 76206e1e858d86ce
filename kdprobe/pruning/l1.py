"""L1-norm filter pruning of CIFAR ResNets (Li et al. 2016, "Pruning Filters for Efficient ConvNets").

Only the first conv of each basic block is pruned, so the residual trunk keeps its
16/32/64 channels (times `width`). A filter's score is sum|W| over its (in, kh, kw)
weights; each block keeps floor(C * remaining[stage]) of its C filters (at least 1), the
highest-scoring ones (ties: the lower filter index wins). The new network is built
physically smaller through `block_cfg`: conv1 rows, bn1 entries (with running stats) and
conv2 input columns of the kept filters are copied, everything else whole.

Skip lists name blocks as 1-based (stage, block), as the paper does. The reference code
(rethinking-network-pruning, cifar/l1-norm-pruning/res56prune.py and res110prune.py)
instead numbers convs 1-based in module order, with the stem conv as 1 and no shortcut
convs (option A); so block b of stage s of a net with n blocks per stage has its first
conv at reference id 2 * ((s - 1) * n + b - 1) + 2. Its lists map as:
  ResNet-56  "A" [16, 20, 38, 54]          -> (1,8) (2,1) (3,1) (3,9)
  ResNet-56  "B" [16, 18, 20, 34, 38, 54]  -> (1,8) (1,9) (2,1) (2,8) (3,1) (3,9)
  ResNet-110 "A" [36]                      -> (1,18)
  ResNet-110 "B" [36, 38, 74]              -> (1,18) (2,1) (3,1)
(the paper's own remaining ratios: 56-A 0.9,0.9,0.9; 56-B 0.4,0.7,0.9; 110-A 0.5,1,1;
110-B 0.5,0.6,0.7). The stage and block numbers do not depend on the shortcut option.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from kdprobe.errors import KdprobeError
from kdprobe.pruning._surgery import RESNETS, arch_of, floor_count, is_cifar_resnet, rebuild_resnet_inner, resnet_blocks

Block = tuple[int, int]  # (stage, block), both 1-based

SKIP_PRESETS: dict[str, tuple[Block, ...]] = {
    "resnet56-A": ((1, 8), (2, 1), (3, 1), (3, 9)),
    "resnet56-B": ((1, 8), (1, 9), (2, 1), (2, 8), (3, 1), (3, 9)),
    "resnet110-A": ((1, 18),),
    "resnet110-B": ((1, 18), (2, 1), (3, 1)),
}


def parse_remaining(text: str) -> list[float]:
    """Parse "0.4,0.7,0.9" (or one value) into fractions, each in (0, 1]."""
    parts = [p.strip() for p in str(text).split(",")]
    out = []
    for p in parts:
        try:
            v = float(p)
        except ValueError:
            v = float("nan")
        if not 0.0 < v <= 1.0:  # also rejects nan
            raise KdprobeError(
                f"expected --remaining as fractions in (0, 1] separated by commas (e.g. 0.4,0.7,0.9), got {text!r}; "
                "give the fraction of channels/weights to keep, not a percentage"
            )
        out.append(v)
    return out


def _skip_error(what: str, depth: int | None, got: str) -> KdprobeError:
    """A refused --skip, listing what a ResNet of this depth accepts (presets only where the paper has them)."""
    if depth is None:
        return KdprobeError(f"expected {what} as a preset ({', '.join(SKIP_PRESETS)}, or A/B with the model's depth) "
                            f"or 1-based stage.block items like 1.8,1.9,2.1, got {got}")
    n = (depth - 2) // 6
    example = "1.8,1.9,2.1" if n >= 9 else ",".join(f"{s}.1" for s in (1, 2))
    items = f"1-based stage.block items (stage 1..3, block 1..{n}; e.g. {example})"
    presets = [k for k in SKIP_PRESETS if k.startswith(f"resnet{depth}-")]
    if presets:
        return KdprobeError(f"expected {what} as A, B ({', '.join(presets)}) or {items}, got {got}")
    return KdprobeError(f"expected {what} as {items}, got {got}; the presets A/B are the paper's for ResNet-56 and "
                        "ResNet-110 only")


def parse_skip(text: str | None, depth: int | None = None) -> list[Block]:
    """Parse a skip list: "" / "none", a preset ("B" with `depth`, or "resnet56-B"), or "1.8,1.9,2.1"."""
    if text is None or str(text).strip().lower() in ("", "none"):
        return []
    t = str(text).strip()
    shown = repr(t) if len(t) <= 60 else repr(t[:57] + "...")
    what = "--skip" if depth is None else f"--skip for this ResNet-{depth}"
    if t.upper() in ("A", "B"):
        if depth is None:
            raise KdprobeError(f"expected a model depth to resolve skip preset {t!r}, got none; name it fully, e.g. resnet56-{t.upper()}")
        t = f"resnet{depth}-{t.upper()}"
        if t not in SKIP_PRESETS:
            raise _skip_error(what, depth, shown)
    key = next((k for k in SKIP_PRESETS if k.lower() == t.lower()), None)
    if key is not None:
        preset_depth = int(key[len("resnet"):key.index("-")])
        if depth is not None and depth != preset_depth:
            raise _skip_error(what, depth, f"{key} (a preset for ResNet-{preset_depth})")
        return list(SKIP_PRESETS[key])
    out = []
    for item in t.split(","):
        s, dot, b = item.strip().partition(".")
        # at most 6 digits each: no network has a million blocks, and int() of 5,000 digits raises ValueError
        if not (dot and s.isdigit() and b.isdigit() and len(s) <= 6 and len(b) <= 6 and int(s) >= 1 and int(b) >= 1):
            raise _skip_error(what, depth, shown)
        out.append((int(s), int(b)))
    return out


def _check_resnet(model: nn.Module, method: str) -> None:
    if not is_cifar_resnet(model):
        name = getattr(model, "arch", {}).get("name", type(model).__name__)
        raise KdprobeError(f"{method} pruning supports {RESNETS}; got {name} (use --method slimming or weight)")


def resnet_depth(model: nn.Module) -> int:
    """Depth 6n+2 of a CIFAR ResNet."""
    _check_resnet(model, "l1")
    return 6 * model.blocks_per_stage + 2


def l1_keep_indices(weight: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices (ascending) of the `n_keep` filters of a conv weight with the largest sum|W|."""
    score = weight.detach().abs().flatten(1).sum(1)
    order = torch.sort(score, descending=True, stable=True).indices  # stable: ties keep the lower index
    return torch.sort(order[:n_keep]).values


def l1_plan(model: nn.Module, remaining: Sequence[float], skip: Sequence[Block] | None = None) -> list[torch.Tensor]:
    """Kept conv1 filter indices of every block, in block order (the decision without the surgery)."""
    _check_resnet(model, "l1")
    remaining = [float(r) for r in remaining]
    if len(remaining) != 3 or not all(0.0 < r <= 1.0 for r in remaining):
        raise KdprobeError(f"expected 3 remaining fractions in (0, 1], one per stage, got {remaining}")
    n = model.blocks_per_stage
    skip = {tuple(int(v) for v in sb) for sb in (skip or [])}
    for s, b in sorted(skip):
        if not (1 <= s <= 3 and 1 <= b <= n):
            raise KdprobeError(
                f"expected skip blocks as 1-based (stage, block) with stage 1..3 and block 1..{n}, got ({s}, {b}); "
                f"this {arch_of(model)[0]} has {n} blocks per stage"
            )
    keep = []
    for s, b, _, block in resnet_blocks(model):
        w = block.conv1.weight
        c = w.shape[0]
        n_keep = c if (s, b) in skip else max(1, floor_count(c, remaining[s - 1]))
        keep.append(l1_keep_indices(w, n_keep))
    return keep


def l1_prune(model: nn.Module, remaining: Sequence[float], skip: Sequence[Block] | None = None) -> nn.Module:
    """Li et al. 2016 filter pruning: a new, physically smaller ResNet (its .arch carries block_cfg)."""
    return rebuild_resnet_inner(model, l1_plan(model, remaining, skip))
