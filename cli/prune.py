"""`kdprobe prune`: L1 filter, Network Slimming or weight-level pruning of a checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import table

O = typer.Option

# Accuracy fields of the source describe the unpruned network; the pruned one keeps them
# only under meta["pruning"]["source_test_acc"] until it is evaluated or fine-tuned.
_STALE_KEYS = ("test_acc", "train_acc", "best_acc", "best_epoch", "history")


def prune(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to prune (kdprobe, or foreign with --arch).")],
    method: Annotated[str, O(help="l1 (Li 2016, CIFAR ResNets) | slimming (Liu 2017) | weight (Han 2015).")],
    remaining: Annotated[str, O(help="Fraction kept, in (0, 1]. l1: per stage '0.4,0.7,0.9' (one value = all stages); "
                                     "slimming: of the prunable channels; weight: of the conv weights.")],
    out: Annotated[Path, O(help="Where to write the pruned checkpoint.")],
    skip: Annotated[Optional[str], O(help="l1 only: blocks kept whole, 1-based stage.block ('1.8,1.9,2.1') or a "
                                          "preset (A, B, resnet56-B, resnet110-B).")] = None,
    arch: Annotated[Optional[str], O(help="Architecture of a foreign checkpoint (e.g. resnet56a).")] = None,
):
    """Prune a checkpoint; structured methods write a physically smaller network, weight pruning writes masks."""
    from kdprobe.checkpoint import load_checkpoint, save_checkpoint
    from kdprobe.errors import KdprobeError
    from kdprobe.pruning import (METHODS, count_flops, count_nonzero, count_nonzero_flops, count_params, l1_prune,
                                 parse_remaining, parse_skip, resnet_depth, slimming_plan, slimming_prune,
                                 slimming_was_trained, weight_prune)

    method = method.strip().lower()
    if method not in METHODS:
        raise KdprobeError(f"expected --method one of {', '.join(METHODS)}, got {method!r}")
    fractions = parse_remaining(remaining)
    if method != "l1" and len(fractions) != 1:
        raise KdprobeError(f"expected one --remaining value for {method} pruning, got {remaining!r}; "
                           "per-stage values are for l1")
    if method != "l1" and skip:
        raise KdprobeError(f"expected no --skip for {method} pruning, got {skip!r}; skip lists are for l1")
    if method == "l1" and len(fractions) not in (1, 3):
        raise KdprobeError(f"expected 1 or 3 --remaining values for l1 (one per stage), got {remaining!r}")

    ck = load_checkpoint(checkpoint, arch=arch)
    model, meta = ck.model, ck.meta
    name = model.arch["name"]
    if ck.extra.get("masks") and method != "weight":
        raise KdprobeError(f"{checkpoint} is weight-pruned (it has masks); expected a dense checkpoint for {method} "
                           "pruning; prune the unpruned checkpoint instead")
    shape = meta.get("input_shape") or [model.arch["kwargs"].get("in_channels", 3), 32, 32]
    before = _sizes(model, shape, count_params, count_nonzero, count_flops, count_nonzero_flops)
    info: dict = {"method": method}
    extra: dict = {}
    if method == "l1":
        fractions = fractions * 3 if len(fractions) == 1 else fractions
        skip_list = parse_skip(skip, depth=resnet_depth(model))
        pruned = l1_prune(model, fractions, skip_list)
        info.update(remaining=fractions, skip=[list(sb) for sb in skip_list],
                    block_cfg=pruned.arch["kwargs"]["block_cfg"])
    elif method == "slimming":
        if not slimming_was_trained(meta):
            typer.secho(f"warning: {checkpoint} was not trained with --bn-sparsity > 0; Network Slimming expects "
                        "sparse BN scales, so this prunes by plain |gamma| and accuracy may drop a lot",
                        fg=typer.colors.YELLOW, err=True)
        plan, threshold = slimming_plan(model, fractions[0])
        pruned = slimming_prune(model, fractions[0])
        kept = sum(int(v.numel()) for v in plan.values())
        info.update(remaining=fractions[0], skip=None, threshold=threshold, channels_kept=kept,
                    channels_prunable=_prunable_count(model))
    else:
        pruned = model  # pruned in place: zeros plus masks
        extra["masks"] = {k: v.cpu() for k, v in weight_prune(pruned, fractions[0]).items()}
        info.update(remaining=fractions[0], skip=None)
    after = _sizes(pruned, shape, count_params, count_nonzero, count_flops, count_nonzero_flops)
    info.update(source=str(checkpoint), source_sha256=ck.sha256, source_test_acc=meta.get("test_acc"),
                input_shape=list(shape), previous=meta.get("pruning"))
    for key in before:
        info[f"{key}_before"], info[f"{key}_after"] = before[key], after[key]
    new_meta = {k: v for k, v in meta.items() if k not in _STALE_KEYS}
    new_meta["pruning"] = info
    save_checkpoint(out, pruned, new_meta, extra or None)

    label = {"params": "params", "nonzero": "nonzero params", "flops": "MACs", "nonzero_flops": "nonzero MACs"}
    rows = [{"": label[k], "before": f"{before[k]:,}", "after": f"{after[k]:,}",
             "after/before": after[k] / max(before[k], 1)} for k in before]
    typer.echo(f"{name}: {method} pruning, remaining {remaining}" + (f", skip {skip}" if skip else "")
               + (f", |gamma| threshold {info['threshold']:.4g}" if "threshold" in info else ""))
    typer.echo(table(rows, digits=3))
    typer.echo(f"MACs at input {list(shape)}; wrote {out}")


def _sizes(model, shape, count_params, count_nonzero, count_flops, count_nonzero_flops) -> dict:
    return {"params": count_params(model), "nonzero": count_nonzero(model),
            "flops": count_flops(model, shape), "nonzero_flops": count_nonzero_flops(model, shape)}


def _prunable_count(model) -> int:
    from kdprobe.pruning import prunable_bns

    return sum(bn.weight.numel() for _, bn in prunable_bns(model))
