"""`kdprobe compare`: did a rerun of a study reproduce a summary, number for number?"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import ranged
from kdprobe.ranges import Range

O = typer.Option
_TOL = Range(float, 0.0)


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def compare(
    a: Annotated[Path, typer.Argument(metavar="STUDY_A", help="A study folder or its summary.json (e.g. the committed one).")],
    b: Annotated[Path, typer.Argument(metavar="STUDY_B", help="Another study folder or summary.json (e.g. your rerun).")],
    rtol: Annotated[Optional[float], O(help="Relative tolerance for numbers. Default: 0 (bit-equal, as the same seed "
                                            "on the same machine type gives) when both summaries record the same "
                                            "machine and torch, else 1e-4.", callback=ranged(_TOL, "--rtol"),
                                       show_default=False)] = None,
    atol: Annotated[Optional[float], O(help="Absolute tolerance for numbers. Default: 0 on the same machine type, "
                                            "else 1e-6.", callback=ranged(_TOL, "--atol"), show_default=False)] = None,
    show: Annotated[int, O(help="How many differences to list.", callback=ranged(Range(int, 0),
                                                                                  "--show"))] = 20,
):
    """Compare two study summaries number by number; exit 0 when they agree, 1 when they differ.

    Wall-clock times, creation dates, reuse of cells, the machine's paths (dataset, spec source, platform) and checkpoint sha256s (a KD student records its teacher's absolute path) are expected to change between runs: they are listed as notes, not as differences. Every number computed from the weights is compared.

    Numbers must be bit-equal when both summaries were computed on the same machine type (CPU capability, threads, torch version, GPU: versions.machine); across machine types float results differ by rounding, so a stated tolerance (rtol 1e-4, atol 1e-6) is applied and the output says so. A study that trains gives other weights on another machine type: expect differences then, within the run-to-run spread.
    """
    from kdprobe.studies.compare import compare as diff
    from kdprobe.studies.compare import gpu_reasons, load_summary

    sa, sb = load_summary(a), load_summary(b)
    for line in gpu_reasons(sa, sb):  # one or both ran on a GPU: what decides whether they can agree bit for bit
        typer.echo(f"gpu   {line}")
    d = diff(sa, sb, rtol=rtol, atol=atol)
    t = d.tolerance
    tol = "bit-equal" if t.bit_equal else f"rtol {t.rtol:g}, atol {t.atol:g}"
    typer.echo(t.describe())
    for path, x, y in d.notes[:show]:
        typer.echo(f"note  {path}: {_show(x)} -> {_show(y)} (expected to vary)")
    if len(d.notes) > show:
        typer.echo(f"note  ... and {len(d.notes) - show} more expected changes")
    for path, x, y in d.differences[:show]:
        typer.echo(f"DIFF  {path}: {_show(x)} != {_show(y)}")
    if len(d.differences) > show:
        typer.echo(f"DIFF  ... and {len(d.differences) - show} more")
    verdict = "the same" if d.equal else f"DIFFERENT in {len(d.differences):,} places"
    typer.echo(f"{a} vs {b}: {verdict} ({d.numbers:,} numbers and {d.strings:,} other values compared, {tol}; "
               f"largest number difference {d.max_abs:.3g} absolute, {d.max_rel:.3g} relative)")
    if not d.equal and t.why not in ("given", "same machine"):
        typer.echo("the machines differ: a study that trains gets other weights on another machine type (training "
                   "amplifies rounding), so its numbers agree only within their run-to-run spread; compare the "
                   "conclusions and intervals, or rerun on the machine type A records")
    if not d.equal:
        raise typer.Exit(1)
