"""`kdprobe pipeline pruning`: every cell of one pruning-table row block, then its surplus.

Thin: parses the options, calls kdprobe.api.pipeline.pipeline (kdprobe.pipeline) and prints what it returns."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli import log_flags as lf
from cli import slurm_flags as sf
from cli.common import HELP_SETTINGS, KdprobeGroup, folder_interrupted, handle_errors, ranged, table
from cli.surplus import surplus_table
from kdprobe.api.pipeline import cell_line
from kdprobe.models.registry import WIDTH
from kdprobe.probes.surplus import VALUE_COLUMNS
from kdprobe.ranges import SEED, abbreviate

O = typer.Option

pipeline_app = typer.Typer(
    cls=KdprobeGroup, no_args_is_help=True, **HELP_SETTINGS,
    help="Multi-step experiments that train their own teachers, skip finished cells (re-run to resume) and "
         "write one results table.",
)


def _check_seeds(text: str) -> str:
    """--seeds at parse time: every item a seed in SEED's range (no 5,000-digit integer reaches int())."""
    items = [t.strip() for t in str(text).split(",")]
    if not all(t.isdigit() and len(t) <= 19 and SEED.ok(int(t)) for t in items):
        raise typer.BadParameter(f"expected seeds from 0 to 2**63-1 separated by commas (e.g. 0,1,2), got "
                                 f"{abbreviate(text)}")
    return text


def pruning(
    out: Annotated[Path, O("--out", "-o", help="Folder for every checkpoint (seed{s}/{cell}.pt), results.csv, "
                                              "surplus.csv/.json and pipeline.json. Re-running resumes.")],
    model: Annotated[str, O(help="Registry name: resnet56 (=resnet56b), resnet56a, resnet110, vgg19_bn, densenet40, "
                                 "resnet8a (tiny), ...")] = "resnet56",
    width: Annotated[Optional[float], O(help="Width multiplier (> 0; tiny models for quick runs).", callback=ranged(WIDTH))] = None,
    dataset: Annotated[str, O(help="digits (embedded, offline), cifar10, cifar100 (paper), or imagefolder:PATH.")] = "digits",
    data_dir: Annotated[Optional[Path], O(help="Folder with torchvision's CIFAR files.")] = None,
    train_subset: Annotated[Optional[int], O(help="Train on a seeded subset of this many images (quick runs).",
                                             callback=ranged("train_subset"))] = None,
    method: Annotated[str, O(help="l1 (Li 2016, CIFAR ResNets) | slimming (Liu 2017) | weight (Han 2015).")] = "l1",
    remaining: Annotated[str, O(help="Fraction kept, in (0, 1]; l1: per stage (paper ResNet-56: 0.4,0.7,0.9 or "
                                     "0.5,0.6,0.7); slimming: of prunable channels; weight: of conv weights.")] = "0.4,0.7,0.9",
    skip: Annotated[Optional[str], O(help="l1 only: blocks kept whole, stage.block list or preset A/B.")] = None,
    distill: Annotated[str, O(help="KD types, comma list: label (Hinton), feature, at, fitnet, sp, rkd, pkt, crd, dkd (docs/kd-methods.md); each gets its own row.")] = "label",
    kd_settings: Annotated[Optional[str], O(help="Settings of the KD families that differ from their defaults, a JSON object per method: '{\"dkd\": {\"beta\": 2}}'.", metavar="JSON")] = None,
    seeds: Annotated[str, O(help="Seeds, comma list (e.g. 0,1,2): each seed runs every cell; the surplus "
                                 "averages over seeds.", callback=_check_seeds)] = "0",
    preset: Annotated[str, O(help="Schedule of the initial trainings: rnp (pruning reference, 160 epochs, lr 0.1), "
                                  "repdistiller, cutmix, fast.")] = "rnp",
    epochs: Annotated[Optional[int], O(help="Initial trainings: epochs (default: the preset's).",
                                       callback=ranged("epochs"))] = None,
    lr: Annotated[Optional[float], O(help="Initial trainings: learning rate (default: the preset's).",
                                     callback=ranged("lr"))] = None,
    batch_size: Annotated[Optional[int], O(help="Initial trainings: images per step (default: the preset's).",
                                           callback=ranged("batch_size"))] = None,
    finetune_epochs: Annotated[Optional[int], O(help="Fine-tuning epochs (>= 1; default 40, constant lr 0.001, "
                                                     "batch 64, as the reference).", callback=ranged("epochs"))] = None,
    bn_sparsity: Annotated[Optional[float], O(help="L1 lambda on BN scales in ALL initial trainings (default: "
                                                   "slimming 1e-4 VGG, 1e-5 ResNet/DenseNet; else 0).",
                                              callback=ranged("bn_sparsity"))] = None,
    device: Annotated[str, O(help="auto | cpu | cuda | cuda:N.")] = "auto",
    quiet: Annotated[bool, O(help="No progress bars or per-epoch lines (cell lines and tables still print).")] = False,
    executor: sf.Executor = "local",
    partition: sf.Partition = None,
    account: sf.Account = None,
    qos: sf.Qos = None,
    time: sf.Time = None,
    gpus_per_cell: sf.GpusPerCell = None,
    cpus_per_cell: sf.CpusPerCell = None,
    mem_per_cell: sf.MemPerCell = None,
    array_parallelism: sf.ArrayParallelism = None,
    constraint: sf.Constraint = None,
    slurm: sf.Slurm = None,
    detach: sf.Detach = False,
    log: lf.Log = None,
    log_dir: lf.LogDir = None,
    log_project: lf.LogProject = None,
):
    """Train scratch and KD teachers, prune, fine-tune (Scratch, Pre-Distill, Post-Distill, Pre-Post, Self-Distill),
    write results.csv and the surplus table. Cells whose checkpoints exist are skipped, so re-running resumes."""
    from kdprobe.api.pipeline import pipeline as run

    try:
        res = run(out=out, model=model, width=width, dataset=dataset, data_dir=data_dir, train_subset=train_subset,
                  method=method, remaining=remaining, skip=skip, distill=distill, kd_settings=kd_settings, seeds=seeds,
                  preset=preset, epochs=epochs, lr=lr, batch_size=batch_size, finetune_epochs=finetune_epochs,
                  bn_sparsity=bn_sparsity, device=device, quiet=quiet, executor=executor, slurm=slurm, detach=detach,
                  log=log, log_dir=log_dir, log_project=log_project, note=typer.echo, on_event=_print_event,
                  **sf.flags(partition, account, qos, time, gpus_per_cell, cpus_per_cell, mem_per_cell,
                             array_parallelism, constraint))
    except KeyboardInterrupt as e:
        raise folder_interrupted(e, out) from None
    if res is None:  # --executor slurm --detach: the cells run as Slurm jobs
        from trainers.study_slurm import status

        typer.echo(status(out))
        return
    typer.echo(f"\nresults: {res.model} {res.setting}, test accuracy as a fraction (last epoch)")
    typer.echo(results_table(res.rows))
    typer.echo("\nsurplus:")
    typer.echo(surplus_table(res.surplus))
    typer.echo(f"\nwrote {', '.join(p.name for p in res.files.values())} in {res.out}")
    if log:
        from trainers.trackers import default_dir, where_logged

        typer.echo(where_logged(log, log_dir, default_dir(res.out, folder=True)))


pipeline_app.command("pruning")(handle_errors(pruning))


def _print_event(e) -> None:
    """A cell's warnings (stderr, yellow) and its line (kdprobe.api.pipeline.cell_line)."""
    for w in e.warnings:
        typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
    typer.echo(cell_line(e))


def results_table(rows) -> str:
    """Per-seed results rows plus, with several seeds, a mean ± std row per train type."""
    from kdprobe.stats import summarize

    shown = [{"train_type": r["train_type"], "seed": r["seed"], **{c: r.get(c) for c in VALUE_COLUMNS}} for r in rows]
    types = list(dict.fromkeys(r["train_type"] for r in rows))
    for t in types:
        group = [r for r in rows if r["train_type"] == t]
        if len(group) < 2:
            continue
        mean = {"train_type": t, "seed": f"mean (n={len(group)})"}
        for c in VALUE_COLUMNS:
            vals = [r[c] for r in group if r.get(c) is not None]
            if vals:
                s = summarize(vals)
                mean[c] = f"{s.mean:.4f} ± {s.std:.4f}"
        shown.append(mean)
    return table(shown, digits=4)
