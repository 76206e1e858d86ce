"""`kdprobe prune`: L1 filter, Network Slimming or weight-level pruning of a checkpoint.

Thin: parses the options, calls kdprobe.api.training.prune (kdprobe.prune) and prints what it returns."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import Arch, ArchKwargs, table

O = typer.Option


def prune(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to prune (kdprobe, or foreign with --arch).")],
    method: Annotated[str, O(help="l1 (Li 2016; basic-block CIFAR ResNets: resnetXXa/b, rnp-l1:, repdistiller:resnet*) | "
                                  "slimming (Liu 2017; vgg19_bn, rnp-slimming:vgg19, CIFAR ResNets, densenet40) | "
                                  "weight (Han 2015; any model with Conv2d layers).")],
    remaining: Annotated[str, O(help="Fraction kept, in (0, 1]. l1: per stage '0.4,0.7,0.9' (one value = all stages); "
                                     "slimming: of the prunable channels; weight: of the conv weights.")],
    out: Annotated[Path, O(help="Where to write the pruned checkpoint.")],
    skip: Annotated[Optional[str], O(help="l1 only: blocks kept whole, 1-based stage.block ('1.8,1.9,2.1') or a "
                                          "preset for ResNet-56 and ResNet-110 (A, B, resnet56-B, resnet110-B).")] = None,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    overwrite: Annotated[bool, O(help="Replace an existing --out checkpoint (only a checkpoint; the new one is "
                                      "written completely before it replaces the old).")] = False,
):
    """Prune a checkpoint; structured methods write a physically smaller network, weight pruning writes masks."""
    from kdprobe.api.training import prune as run

    rep = run(checkpoint, method=method, remaining=remaining, out=out, skip=skip, arch=arch, arch_kwargs=arch_kwargs,
              overwrite=overwrite, note=lambda w: typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True))
    typer.echo(f"{rep.arch}: {rep.method} pruning, remaining {remaining}" + (f", skip {skip}" if skip else "")
               + (f", |gamma| threshold {rep.info['threshold']:.4g}" if "threshold" in rep.info else ""))
    typer.echo(size_table(rep))
    typer.echo(f"MACs at input {rep.info['input_shape']}; wrote {rep.path}")


def size_table(rep) -> str:
    """Before/after sizes of a PruneReport as a text table."""
    from kdprobe.pruning import SIZE_LABELS

    rows = [{"": SIZE_LABELS[k], "before": f"{rep.before[k]:,}", "after": f"{rep.after[k]:,}",
             "after/before": rep.after[k] / max(rep.before[k], 1)} for k in rep.before]
    return table(rows, digits=3)
