"""Weight-level magnitude pruning (Han et al. 2015) with masks that survive fine-tuning.

One global ranking of |w| over the weights of every Conv2d (stem, block and shortcut
convs; not the classifier Linear, not BN, not biases); the `remaining` fraction with the
largest magnitude is kept, the rest are set to zero. Masks are plain bool tensors keyed
by state_dict name, so a checkpoint stores them in its "extra" dict and the model's own
state_dict keeps its ordinary keys (torch.nn.utils.prune would rename them to
`weight_orig` / `weight_mask` and break plain loading). The training loop calls
`apply_masks` after every optimizer step; for element-wise optimizers (SGD with momentum
and weight decay, Adam) that gives the same network as prune's reparametrization.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kdprobe.errors import KdprobeError
from kdprobe.pruning._surgery import floor_count


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict name -> weight Parameter of every Conv2d, in module order."""
    return {f"{name}.weight" if name else "weight": m.weight
            for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@torch.no_grad()
def weight_prune(model: nn.Module, remaining: float) -> dict[str, torch.Tensor]:
    """Zero all but the `remaining` fraction largest-|w| conv weights in place; return the bool masks."""
    remaining = float(remaining)
    if not 0.0 < remaining <= 1.0:
        raise KdprobeError(f"expected remaining in (0, 1] (fraction of conv weights kept), got {remaining}")
    weights = prunable_weights(model)
    if not weights:
        raise KdprobeError(f"expected a model with Conv2d layers to prune, got {type(model).__name__} with none")
    flat = torch.cat([w.detach().abs().flatten().float().cpu() for w in weights.values()])
    n_keep = max(1, floor_count(flat.numel(), remaining))
    # A stable sort makes ties deterministic: among equal |w| the earlier weight (module
    # order, then row-major position) is kept.
    order = torch.sort(flat, descending=True, stable=True).indices
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:n_keep]] = True
    masks, start = {}, 0
    for name, w in weights.items():
        m = keep[start:start + w.numel()].view_as(w).to(w.device)
        start += w.numel()
        masks[name] = m
        w.masked_fill_(~m, 0)
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Re-zero the masked weights in place (call after every optimizer step)."""
    params = dict(model.named_parameters())
    for name, m in masks.items():
        p = params.get(name)
        if p is None or p.shape != m.shape:
            got = "no such parameter" if p is None else f"shape {tuple(p.shape)}"
            raise KdprobeError(
                f"expected a mask for parameter {name!r} of shape {tuple(m.shape)}, got {got}; "
                "masks must come from weight_prune on this architecture"
            )
        if m.device != p.device:  # moved model: keep the mask next to its weight from now on
            m = m.to(p.device)
            masks[name] = m
        p.masked_fill_(~m.bool(), 0)


def mask_density(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of masked-in weights over all masked tensors."""
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / max(total, 1)
