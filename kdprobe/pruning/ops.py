"""Prune a checkpoint file into a new checkpoint file: the one entry point `kdprobe prune`
and the pruning pipeline share.

The pruned checkpoint keeps the source's metadata except its accuracies (they describe
the unpruned network; the source's test accuracy is kept as meta["pruning"]["source_test_acc"]
until the pruned network is fine-tuned), and adds meta["pruning"]: method, remaining,
skip, source path and sha256, and parameter / MAC counts before and after.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from kdprobe.checkpoints.format import load_checkpoint, save_checkpoint
from kdprobe.errors import KdprobeError
from kdprobe.data.preprocess import image_size_for
from kdprobe.pruning.flops import count_flops, count_nonzero, count_nonzero_flops, count_params
from kdprobe.pruning.l1 import l1_prune, parse_remaining, parse_skip, resnet_depth
from kdprobe.pruning.slimming import slimming_prune, slimming_record, slimming_was_trained
from kdprobe.pruning.weight import weight_prune

METHODS = ("l1", "slimming", "weight")

# Accuracy fields of the source describe the unpruned network, not the pruned one.
_STALE_KEYS = ("test_acc", "train_acc", "best_acc", "best_epoch", "history")

SIZE_LABELS = {"params": "params", "nonzero": "nonzero params", "flops": "MACs", "nonzero_flops": "nonzero MACs"}


@dataclass(frozen=True)
class PruneReport:
    """What one pruning did: sizes before/after (keys of SIZE_LABELS), meta["pruning"], warnings as text."""

    path: Path
    arch: str
    method: str
    before: dict
    after: dict
    info: dict
    warnings: tuple[str, ...] = ()


def check_prune_args(method: str, remaining: str | Sequence[float], skip: str | None = None) -> tuple[str, list[float]]:
    """Validate method/remaining/skip without touching a model; returns (method, fractions)."""
    method = str(method).strip().lower()
    if method not in METHODS:
        raise KdprobeError(f"expected --method one of {', '.join(METHODS)}, got {method!r}")
    text = remaining if isinstance(remaining, str) else ",".join(str(float(v)) for v in remaining)
    fractions = parse_remaining(text)
    if method != "l1" and len(fractions) != 1:
        raise KdprobeError(f"expected one --remaining value for {method} pruning, got {text!r}; "
                           "per-stage values are for l1")
    if method != "l1" and skip:
        raise KdprobeError(f"expected no --skip for {method} pruning, got {skip!r}; skip lists are for l1")
    if method == "l1" and len(fractions) not in (1, 3):
        raise KdprobeError(f"expected 1 or 3 --remaining values for l1 (one per stage), got {text!r}")
    return method, fractions


def sizes(model, input_shape) -> dict:
    """Parameter and MAC counts (all, and nonzero) at one input shape (C, H, W)."""
    return {"params": count_params(model), "nonzero": count_nonzero(model),
            "flops": count_flops(model, input_shape), "nonzero_flops": count_nonzero_flops(model, input_shape)}


def prune_checkpoint(src, method: str, remaining: str | Sequence[float], out, *, skip: str | None = None,
                     arch: str | None = None, arch_kwargs: dict | None = None) -> PruneReport:
    """Prune checkpoint `src` (kdprobe, or foreign: `arch` or detected) by `method` and write `out` atomically."""
    method, fractions = check_prune_args(method, remaining, skip)
    ck = load_checkpoint(src, arch=arch, arch_kwargs=arch_kwargs, finite=True)
    model, meta = ck.model, ck.meta
    if ck.extra.get("masks") and method != "weight":
        raise KdprobeError(f"{src} is weight-pruned (it has masks); expected a dense checkpoint for {method} "
                           "pruning; prune the unpruned checkpoint instead")
    side = image_size_for(model, meta)[0] or 32  # a foreign file records no shape: its family's size (CIFAR: 32)
    shape = meta.get("input_shape") or [model.arch["kwargs"].get("in_channels", 3), side, side]
    before = sizes(model, shape)
    info: dict = {"method": method}
    extra: dict = {}
    warnings: list[str] = []
    if method == "l1":
        fractions = fractions * 3 if len(fractions) == 1 else fractions
        skip_list = parse_skip(skip, depth=resnet_depth(model))
        pruned = l1_prune(model, fractions, skip_list)
        info.update(remaining=fractions, skip=[list(sb) for sb in skip_list],
                    block_cfg=pruned.arch["kwargs"]["block_cfg"])
    elif method == "slimming":
        if not slimming_was_trained(meta):
            warnings.append(f"{src} was not trained with --bn-sparsity > 0; Network Slimming expects sparse BN "
                            "scales, so this prunes by plain |gamma| and accuracy may drop a lot")
        record = slimming_record(model, fractions[0])  # the reference rule, and the layers the guard kept
        pruned = slimming_prune(model, fractions[0])
        info.update(remaining=fractions[0], skip=None, **record)
        if record["guarded_layers"]:
            warnings.append(f"{len(record['guarded_layers'])} layer(s) would lose every channel under the reference "
                            f"rule and keep their largest-|gamma| one: {', '.join(record['guarded_layers'][:4])}")
    else:
        pruned = model  # pruned in place: zeros plus masks the training loop re-applies
        extra["masks"] = {k: v.cpu() for k, v in weight_prune(pruned, fractions[0]).items()}
        info.update(remaining=fractions[0], skip=None)
    after = sizes(pruned, shape)
    info.update(source=str(src), source_sha256=ck.sha256, source_test_acc=meta.get("test_acc"),
                input_shape=list(shape), previous=meta.get("pruning"))
    for key in before:
        info[f"{key}_before"], info[f"{key}_after"] = before[key], after[key]
    new_meta = {k: v for k, v in meta.items() if k not in _STALE_KEYS}
    new_meta["pruning"] = info
    new_meta["made_by"] = "prune"  # --overwrite of another command never replaces this file, nor this one another's
    save_checkpoint(out, pruned, new_meta, extra or None)
    return PruneReport(Path(out), model.arch["name"], method, before, after, info, tuple(warnings))
