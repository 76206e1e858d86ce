"""`kdprobe study SPEC --out DIR`: train every cell of a study (methods x seeds), probe them, write a report.

Thin: parses the options, calls kdprobe.api.training.study (kdprobe.study) and prints its tables."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli import log_flags as lf
from cli import slurm_flags as sf
from cli.common import folder_interrupted, ranged, table
from kdprobe.api.training import JOBS, NPROC_PER_CELL
from kdprobe.studies.spec import builtin_specs

O = typer.Option


def _f(v, fmt=".2f"):
    import math

    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _stats_table(groups, digits, conf, bounds):
    """Group rows with the interval's ends clipped to what the metric can take (marked *; files keep raw ends)."""
    from kdprobe.probes.diversity_table import clip_end

    rows = []
    for g in groups:
        (lo, c1), (hi, c2) = clip_end(g.low, bounds), clip_end(g.high, bounds)
        rows.append({"method": g.group, "n": f"{g.n_models}{'*' if g.uses_batch_values else ''}",
                     "mean ± std": f"{_f(g.mean, digits)} ± {_f(g.std, digits)}", "sem": _f(g.sem, digits),
                     f"{conf * 100:g}% CI": f"[{_f(lo, digits)}{'*' if c1 else ''}, "
                                            f"{_f(hi, digits)}{'*' if c2 else ''}]",
                     "p(Holm)": _f(g.p_holm, ".3g"), "g": _f(g.hedges_g, ".2f")})
    return table(rows)


def _verdict_table(verdicts):
    return table([{"probe": v.probe, "KD method": v.method, "compared": v.quantity, "KD": _f(v.value, ".4g"),
                   v.reference: _f(v.reference_value, ".4g"), "diff": _f(v.diff, "+.4g"),
                   "p(Holm)": _f(v.p_holm, ".3g"), "verdict": v.verdict} for v in verdicts])


def _list_specs() -> None:
    from kdprobe.api.training import list_studies

    typer.echo(table(list_studies()))
    typer.echo("run one with: kdprobe study NAME --out DIR [--scale digits|cifar10-cpu|paper]; a .toml path works too")


def study(
    spec: Annotated[Optional[str], typer.Argument(help=f"Built-in study name ({', '.join(builtin_specs())}; see "
                                                       "--list) or a path to a study .toml file.")] = None,
    out: Annotated[Optional[Path], O("--out", "-o", help="Study folder: cells/, landscapes/, pruning/, "
                                                         "report.html, summary.json. Re-running resumes.")] = None,
    scale: Annotated[Optional[str], O(help="Which [scales.NAME] of the spec to apply: digits (tiny models on the "
                                           "embedded digits data, minutes on a CPU), cifar10-cpu (real CIFAR-10, "
                                           "a small ResNet on a class-balanced subset: under an hour per study on "
                                           "2 CPU cores) or paper (CIFAR, ResNet-56, paper schedules: GPU). "
                                           "Default: the spec's default_scale (digits for the built-ins).")] = None,
    set_: Annotated[Optional[list[str]], O("--set", help="Override one spec value, KEY=VALUE with a dotted key "
                                                         "(TOML value), e.g. --set train.overrides.epochs=3 "
                                                         "--set train.data_dir=/data/cifar; repeatable.")] = None,
    dataset: Annotated[Optional[str], O(help="Dataset of every cell ([train] and every [[pruning]] block), e.g. "
                                             "imagefolder:PATH (a folder or .tar.gz of train/<class>/ and "
                                             "test/<class>/ images) or cifar10 with --data-dir. The cifar10-cpu "
                                             "scales say auto:cifar10: $KDPROBE_CIFAR10, else "
                                             "../shared/data/cifar10-jpeg.tar.gz next to the working directory or "
                                             "the repository.")] = None,
    data_dir: Annotated[Optional[str], O(help="Folder of torchvision's CIFAR files, for every cell (as "
                                              "--set train.data_dir=DIR, also for [[pruning]] blocks).")] = None,
    list_: Annotated[bool, O("--list", help="List the built-in studies and exit.")] = False,
    device: Annotated[str, O(help="auto | cpu | cuda | cuda:N (cells and probes).")] = "auto",
    jobs: Annotated[int, O(help="Cells trained at once, each in its own process (`python -m trainers.study "
                                "--cell`); on one GPU several small cells fit. On CPU each process uses "
                                "cores/jobs threads; --jobs 1 uses one thread (fastest for tiny models).",
                                callback=ranged(JOBS))] = 1,
    nproc_per_cell: Annotated[int, O(help="Train each cell under `torchrun --standalone --nproc-per-node K` "
                                          "(DistributedDataParallel; global batch and lr as in the spec). With "
                                          "--jobs J and at least J*K GPUs, every cell gets its own K GPUs. "
                                          "--executor slurm: K Slurm tasks in each cell's job, ranks from "
                                          "Slurm's environment.",
                                     callback=ranged(NPROC_PER_CELL))] = 1,
    quiet: Annotated[bool, O(help="No progress bars or per-cell lines.")] = False,
    figures: Annotated[str, O(help="Static figures in DIR/figures/ (numbered, captions.md; report.md embeds the "
                                   "PNGs): a comma-separated list of pdf, svg, png, or none.")] = "pdf,png",
    log: lf.Log = None,
    log_dir: lf.LogDir = None,
    log_project: lf.LogProject = None,
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
    folder: Annotated[Optional[Path], typer.Argument(help="With `kdprobe study status OUT`: the study folder whose "
                                                          "Slurm cells to show.", show_default=False)] = None,
):
    """Run a whole study: train every method x seed cell (content-named, resumable), then accuracy, diversity,
    ensemble-perspective (agreement, ensembles, calibration, CKA, sharpness, with the ensemble-reading verdicts),
    landscape and surplus probes, and write DIR/report.html (offline) and DIR/summary.json."""
    from kdprobe.api.training import study as run
    from kdprobe.errors import KdprobeError

    if list_:
        _list_specs()
        return
    if spec == "status":  # `kdprobe study status OUT`: the state of each cell submitted with --executor slurm
        from trainers.study_slurm import status

        if (folder or out) is None:
            raise KdprobeError("expected a study folder: `kdprobe study status OUT`")
        typer.echo(status(folder or out))
        return
    if folder is not None:
        raise KdprobeError(f"unexpected argument {str(folder)!r}: give the study folder with --out "
                           "(only `kdprobe study status OUT` takes a second argument)")
    if spec is None or out is None:
        raise KdprobeError("expected a study and --out, e.g. `kdprobe study table6 --out runs/t6`; "
                           "`kdprobe study --list` shows the built-in studies")
    try:
        done = run(spec, out=out, scale=scale, set=set_, dataset=dataset, data_dir=data_dir, device=device, jobs=jobs,
                   nproc_per_cell=nproc_per_cell, quiet=quiet, note=typer.echo, figures=figures, executor=executor,
                   slurm=slurm, log=log, log_dir=log_dir, log_project=log_project,
                   detach=detach, **sf.flags(partition, account, qos, time, gpus_per_cell, cpus_per_cell,
                                             mem_per_cell, array_parallelism, constraint))
    except KeyboardInterrupt as e:
        raise folder_interrupted(e, out) from None
    if done is None:  # --detach: the cells run as Slurm jobs
        from trainers.study_slurm import status

        typer.echo(status(out))
        return
    res = done.record

    from kdprobe.probes.diversity_table import ACCURACY_BOUNDS, score_bounds

    trained = sum(c.action != "existing" for c in res.cells)
    clip = "; * = interval end clipped to what the metric can take"
    if res.accuracy:
        typer.echo(f"\nTest accuracy (fraction correct, last epoch; unit = one seed; CI {res.accuracy_interval} "
                   f"quantile{clip})")
        typer.echo(_stats_table(res.accuracy, ".4f", res.accuracy_confidence, ACCURACY_BOUNDS))
    if res.diversity is not None:
        s = res.diversity.settings
        typer.echo(f"\nDiversity (Mellor et al. {s.variant}, N={s.batch_size}, {s.runs} batches, split {s.split}, "
                   f"bn {s.bn}; higher = more diverse{clip})")
        typer.echo(_stats_table(res.diversity.groups, ".3f", s.confidence, score_bounds(s.variant, s.batch_size)))
    if res.verdicts:
        typer.echo(f"\nThe ensemble reading ({', '.join(res.probes)}; p Holm-adjusted over the KD methods of a "
                   f"probe, alpha {res.verdicts[0].alpha:g}; tables and figures in the report)")
        typer.echo(_verdict_table(res.verdicts))
    elif res.probes:
        typer.echo(f"\nEnsemble-perspective probes: {', '.join(res.probes)} (no verdict: no reference or KD method)")
    if res.landscapes:
        typer.echo(f"\nLandscapes: {len(res.landscapes)} surfaces "
                   f"({len(res.landscapes[0].ycoords)}x{len(res.landscapes[0].xcoords)}) under "
                   f"{Path(out) / 'landscapes'}")
    for b in res.pruning:
        typer.echo(f"\nSurplus, {b.label}")
        typer.echo(table([{"kd": r.kd_type, "gain unpruned": _f(r.gain_unpruned, "+.2f"),
                           "gain pruned": _f(r.gain_pruned, "+.2f"),
                           "surplus ± se": f"{_f(r.surplus, '+.2f')} ± {_f(r.surplus_se)}"} for r in b.surplus]))
    total = len(res.cells) + sum(b.cells_total for b in res.pruning)
    trained += sum(b.cells_run for b in res.pruning)
    typer.echo(f"\n{total} cells ({trained} made now, {total - trained} existing) in {res.wall_seconds:.1f}s")
    typer.echo(f"report: {Path(out) / 'report.html'}   summary: {Path(out) / 'summary.json'}")
    if log:
        from trainers.trackers import default_dir, where_logged

        typer.echo(where_logged(log, log_dir, default_dir(Path(out), folder=True)))
