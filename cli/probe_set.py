"""What `kdprobe agreement|cka|calibration|sharpness` share on the command line: their options, the output
check before any work, terminal tables and writing the files (the probing itself is kdprobe.api.probes)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import Arch, ArchKwargs, DataDir, Dataset, ImageSize, in_range  # noqa: F401 (re-exported)

O = typer.Option

Split = Annotated[str, O(help="Probe on this split: test | train (no augmentation).")]
Samples = Annotated[int, O(help="Use the first N examples of the split, in dataset order (image folders are served "
                                "in a fixed shuffled order); 0 = the whole split.", callback=in_range("samples"))]
GroupBy = Annotated[str, O(help="Checkpoint metadata key that names a checkpoint's group (e.g. method, seed).")]
Reference = Annotated[Optional[str], O(help="Group the others are tested against; 'none' for no tests. Default: "
                                           "scratch when there is such a group (not for foreign files alone), else "
                                           "no tests.")]
Confidence = Annotated[float, O(help="Confidence level of the intervals, in (0, 1).", callback=in_range("confidence"))]
Interval = Annotated[str, O(help="t = Student t quantile (the honest default for a few checkpoints); normal = z.")]
Csv = Annotated[Optional[Path], O(help="Write the main table as CSV (see the README for which).")]
Json = Annotated[Optional[Path], O(help="Write every table as one JSON document (schema in the README).")]
Html = Annotated[Optional[Path], O(help="Write an offline interactive figure (plotly inlined, no WebGL).")]
Figures = Annotated[Optional[str], O(help="Also write the figure as static files: a comma-separated list of pdf, "
                                         "svg, png (e.g. pdf,png), drawn with matplotlib (no browser needed), "
                                         "caption under the plot. Named after --html, else --json, else --csv "
                                         "(a.html -> a.pdf); else COMMAND.pdf in the current folder.")]
Device = Annotated[str, O(help="auto | cpu | cuda.")]
Seed = Annotated[int, O(help="Seed of every random draw of the probe (same seed, same device: same result).",
                         callback=in_range("seed"))]
BatchSize = Annotated[int, O(help="Samples per forward pass.", callback=in_range("batch_size"))]


def figure_paths(command: str, figures: str | None, named=(), suffixes=("",)) -> list[Path]:
    """The static figure files --figures asks for: STEM{suffix}.{fmt} per suffix (a command with two figures, the
    landscape's contour and 3-D, names the second '-3d') and format, STEM from the first of `named` given (its
    suffix dropped), else the command's name in the current folder."""
    from kdprobe.writers.static_figures import parse_formats

    formats = parse_formats(figures)
    base = next((Path(p) for p in named if p), None)
    stem = base.with_suffix("") if base is not None else Path(command)
    return [stem.with_name(f"{stem.name}{suf}.{fmt}") for suf in suffixes for fmt in formats]


def figure_outputs(paths) -> dict:
    """check_outputs roles for figure paths: {'--figures pdf': (path, 'pdf'), ...}."""
    return {f"--figures {p.name}": (p, p.suffix[1:].lower()) for p in paths}


def write_figures(figs, paths) -> list[Path]:
    """Render each plotly figure to its static files (paths grouped per figure, formats in order)."""
    from kdprobe.writers.static_figures import render

    per = len(paths) // max(len(figs), 1)
    out = [render(f, p) for k, f in enumerate(figs) for p in paths[k * per:(k + 1) * per]]
    return out


def check_set_outputs(command: str, patterns, outputs: tuple = (None, None, None), figures=()) -> None:
    """Refuse (and lock) the --csv/--json/--html (and --figures) outputs before any checkpoint is loaded."""
    from kdprobe.files.outputs import check_outputs
    from kdprobe.probes.checkpoint_set import checkpoint_paths

    csv, json, html = outputs
    check_outputs(command, {"--csv": (csv, "csv"), "--json": (json, "json"), "--html": (html, "html"),
                            **figure_outputs(figures)}, {"CHECKPOINTS": checkpoint_paths(patterns)})


def fmt_ci(mean, half_width, digits: int = 4) -> str:
    """'mean ± half-width' for a table cell ('-' parts when undefined)."""
    if mean is None or (isinstance(mean, float) and not math.isfinite(mean)):
        return "-"
    hw = "-" if half_width is None or not math.isfinite(half_width) else f"{half_width:.{digits}f}"
    return f"{mean:.{digits}f} ± {hw}"


def fmt_p(p) -> str:
    """A p-value cell ('-' when there is no test)."""
    return "-" if p is None or not math.isfinite(p) else f"{p:.3g}"


def write_outputs(tables, csv_table: str, csv: Path | None, json: Path | None, html: Path | None,
                  figures=()) -> list[Path]:
    """Write the requested files (figures: the static figure paths of figure_paths); returns what was written."""
    from kdprobe.writers.probe_files import write_probe_csv, write_probe_json
    from kdprobe.writers.probe_plots import write_probe_html

    written = []
    if csv:
        write_probe_csv(tables, csv_table, csv)
        written.append(csv)
    if json:
        write_probe_json(tables, json)
        written.append(json)
    if html:
        write_probe_html(tables, html)
        written.append(html)
    if figures:
        from kdprobe.writers.probe_plots import probe_figure

        written += write_figures([probe_figure(tables)], list(figures))
    if written:
        typer.echo("wrote " + ", ".join(str(p) for p in written))
    return written


def group_table(group_rows: list[dict], metrics: list[str], digits: int = 4, tested: int = 1) -> list[dict]:
    """Terminal rows: one per group, 'mean ± CI' per metric; p(Holm) and g after each of the first `tested` metrics."""
    out = {}
    for r in group_rows:
        if r["metric"] not in metrics:
            continue
        row = out.setdefault(r["group"], {"group": r["group"], "n": r["n"]})
        row[r["metric"]] = fmt_ci(r["mean"], r["half_width"], digits)
        if r["metric"] in metrics[:tested]:
            suffix = "" if tested == 1 else f" {r['metric']}"
            row[f"p(Holm){suffix}"] = fmt_p(r["p_holm"])
            row[f"g{suffix}"] = "-" if r["hedges_g"] is None else f"{r['hedges_g']:.2f}"
    return list(out.values())


def pair_type_table(type_rows: list[dict], metrics: list[str], digits: int = 4) -> list[dict]:
    """Terminal rows: one per pair type, 'mean ± CI' per metric, then the test of the first metric vs the reference."""
    out = {}
    for r in type_rows:
        if r["metric"] not in metrics:
            continue
        row = out.setdefault(r["key"], {"pair type": r["key"], "pairs": r["n_pairs"], "ckpts": r["n_checkpoints"]})
        row[r["metric"]] = fmt_ci(r["mean"], r["half_width"], digits)
        if r["metric"] == metrics[0]:
            row["p(Holm)"] = fmt_p(r["p_holm"])
    return list(out.values())
