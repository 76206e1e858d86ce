"""Shared surgery: rebuild a registry model with new widths and copy the kept slices over.

Every pruning method here ends the same way: decide which channels survive, build a fresh
model through `create_model` with the smaller widths in its kwargs (so the checkpoint's
`arch` alone rebuilds it), and copy each tensor of the old state_dict, sliced along the
pruned dimensions, into the new one.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kdprobe.errors import KdprobeError
from kdprobe.models import create_model
from kdprobe.models.resnet import CifarResNet


def arch_of(model: nn.Module) -> tuple[str, dict]:
    """The registry name and kwargs a model was built with; fails for models built by hand."""
    arch = getattr(model, "arch", None)
    if not isinstance(arch, dict) or "name" not in arch:
        raise KdprobeError(
            f"expected a model built by kdprobe.models.create_model (with .arch), got {type(model).__name__}; "
            "build it with create_model or load it with load_checkpoint"
        )
    return arch["name"], dict(arch.get("kwargs", {}))


def is_cifar_resnet(model: nn.Module) -> bool:
    """True for the basic-block CIFAR ResNets with a `block_cfg`: kdprobe's option A and B (= rnp-l1:resnetXX,
    repdistiller:resnet8 ... resnet110) and repdistiller:resnet8x4 / resnet32x4."""
    from kdprobe.models.repdistiller.resnet import StemResNet

    return isinstance(model, (CifarResNet, StemResNet))


RESNETS = "CIFAR ResNets with basic blocks (resnetXXa/b, rnp-l1:resnetXX, repdistiller:resnet8 ... resnet110, resnet8x4, resnet32x4)"


def resnet_blocks(model: CifarResNet) -> list[tuple[int, int, str, nn.Module]]:
    """(stage, block, state_dict prefix, BasicBlock) for every block; stage and block are 1-based."""
    out = []
    for s, layer in enumerate((model.layer1, model.layer2, model.layer3), start=1):
        for b, block in enumerate(layer, start=1):
            out.append((s, b, f"layer{s}.{b - 1}.", block))
    return out


def floor_count(total: int, fraction: float) -> int:
    """floor(total * fraction), with a 1e-9 tolerance so 0.7 of 10 is 7 and not 6 (float error)."""
    return int(total * fraction + 1e-9)


def rebuild(model: nn.Module, new_kwargs: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """Build `model.arch["name"]` with `new_kwargs`, load `state`, match the old device, dtype and mode."""
    name, _ = arch_of(model)
    new = create_model(name, **new_kwargs)
    missing, unexpected = new.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    ref = next(model.parameters(), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    new.train(model.training)
    return new


def rebuild_resnet_inner(model: CifarResNet, keep: list[torch.Tensor]) -> nn.Module:
    """Keep channels `keep[i]` of the inner width of block i: conv1 rows, bn1 entries, conv2 columns.

    The residual trunk (stem, conv2 outputs, bn2, shortcuts, fc) is copied whole, so a
    pruned block computes exactly what the old block computed with the dropped channels'
    post-BN-ReLU activations set to zero.
    """
    blocks = resnet_blocks(model)
    assert len(keep) == len(blocks)
    _, kwargs = arch_of(model)
    kwargs["block_cfg"] = [int(k.numel()) for k in keep]
    src = model.state_dict()
    state = dict(src)
    for (_, _, p, _), idx in zip(blocks, keep):
        idx = idx.to(device=src[p + "conv1.weight"].device, dtype=torch.long)
        state[p + "conv1.weight"] = src[p + "conv1.weight"].index_select(0, idx)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            state[p + "bn1." + stat] = src[p + "bn1." + stat].index_select(0, idx)
        state[p + "conv2.weight"] = src[p + "conv2.weight"].index_select(1, idx)
    return rebuild(model, kwargs, state)
