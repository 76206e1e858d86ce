"""A study's figures, numbered: the plotly figures report.html shows, and the same figures as static files.

`study_figures(result)` lists them in the report's order (diversity, each ensemble-perspective probe, each
landscape group's contour maps and 3-D surfaces), each with its number, a file stem (fig01-diversity, ...)
and a caption; report.html prints the captions under its figures, `write_study_figures` writes
figures/figNN-KEY.pdf/.png (kdprobe.writers.static_figures) and figures/captions.md, and report.md embeds the
PNGs. One colour per method in every figure (kdprobe.writers.colors.study_colors).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

FOLDER = "figures"
DEFAULT_FORMATS = ("pdf", "png")


@dataclass(frozen=True)
class StudyFigure:
    number: int
    key: str  # diversity, agreement, calibration, ..., landscape-final, landscape-3d-final
    figure: object  # the plotly figure
    caption: str  # without the "Figure N." prefix

    @property
    def stem(self) -> str:
        return f"fig{self.number:02d}-{re.sub(r'[^A-Za-z0-9.+-]+', '-', self.key).strip('-')}"

    def path(self, fmt: str) -> str:
        """The figure's file, relative to the study folder (figures/fig01-diversity.png)."""
        return f"{FOLDER}/{self.stem}.{fmt}"

    @property
    def label(self) -> str:
        return f"Figure {self.number}."


def _landscape_caption(recs, display, levels, three_d: bool) -> str:
    first = recs[0]
    log = bool(display.get("log"))
    what = "3-D views of the" if three_d else "Contour maps of the"
    clip = (f" Levels and colours run from {'log ' if log else ''}loss {levels['start']:.3g} to {levels['end']:.3g}"
            f"{' (natural log of the loss in nats)' if log else ' nats'} as the reference plot_2D draws them"
            + (f"; loss above {levels['vmax_loss']:.3g} takes the top colour" if levels["clipped"] else "")
            + (" and the surfaces are cut there" if three_d and levels["clipped"] else "") + ".")
    return (f"{what} {first.split} loss (mean cross-entropy) around "
            f"{', '.join(f'{r.method} seed {r.seed}' for r in recs)} on a filter-normalized random plane "
            f"(Li et al. 2018), {len(first.ycoords)}×{len(first.xcoords)} points, {first.samples} {first.split} "
            f"samples, BN {first.bn}.{clip} One colour scale for all panels.")


def _surface_traces(rec, display):
    import numpy as np

    from kdprobe.writers.landscape_vtk import height

    return height(np.asarray(rec.loss, np.float64), log=bool(display.get("log")), zmax=display.get("zmax"))


def landscape_figures(recs, display):
    """One group's surfaces side by side: (contour maps (SVG) as one figure, the 3-D surfaces (WebGL) as a
    second, levels): both on one colour scale and one set of contour levels, the reference plot_2D's
    (kdprobe.writers.landscape_plot.display_levels over the group's surfaces together); each panel titled
    with its method, seed and epoch; the 3-D panels with titled axes and one colour bar."""
    import numpy as np
    from plotly.subplots import make_subplots

    from kdprobe.writers.landscape_plot import contour_trace, display_levels, height_label, scene_layout, surface_trace

    log = bool(display.get("log"))
    levels = display_levels(np.concatenate([np.asarray(r.loss, np.float64).ravel() for r in recs]), log=log,
                            zmax=display.get("zmax"))
    label = height_label(recs[0].split, log, levels)
    m = len(recs)
    titles = [f"{r.method} seed {r.seed} (epoch {r.epoch})" for r in recs]
    flat = make_subplots(rows=1, cols=m, subplot_titles=titles, horizontal_spacing=0.06)
    solid = make_subplots(rows=1, cols=m, specs=[[{"type": "scene"}] * m], subplot_titles=titles,
                          horizontal_spacing=0.02)
    for j, r in enumerate(recs, 1):
        h, acc = _surface_traces(r, display), np.asarray(r.acc, np.float64)
        # one scale by construction: the same levels (contours) and cmin/cmax (surfaces), one colour bar each
        flat.add_trace(contour_trace(r.xcoords, r.ycoords, h, acc, levels, label, showscale=j == m, name=r.method,
                                     log=log), 1, j)
        solid.add_trace(surface_trace(r.xcoords, r.ycoords, h, acc, levels, showscale=j == m, label=label,
                                      name=r.method, scene="scene" if j == 1 else f"scene{j}"), 1, j)
        flat.update_xaxes(title_text="x (direction 1)", row=1, col=j)
        flat.update_yaxes(title_text="y (direction 2)" if j == 1 else "", scaleanchor=f"x{'' if j == 1 else j}",
                          row=1, col=j)
        solid.update_layout({"scene" if j == 1 else f"scene{j}": scene_layout(levels, label)})
    flat.update_layout(height=400, margin=dict(l=50, r=20, t=50, b=40), template="plotly_white", showlegend=False)
    solid.update_layout(height=460, margin=dict(l=0, r=0, t=40, b=0), template="plotly_white", showlegend=False)
    return flat, solid, levels


def readable(tables, most: int = 8):
    """(tables for the figure, how many pair types it leaves out): with more than `most` pair types the
    between-method ones go (within and student-teacher pairs carry the ensemble reading)."""
    from kdprobe.probes.tables import ProbeTables

    keys = list(dict.fromkeys(r["key"] for r in tables.table("pair_types")))
    between = [k for k in keys if k.startswith("between ")]
    if len(keys) <= most or not between:
        return tables, 0
    kept = {**tables.tables, "pairs": [p for p in tables.table("pairs") if p["pair_type"] != "between"],
            "pair_types": [t for t in tables.table("pair_types") if t["pair_type"] != "between"]}
    return ProbeTables(tables.command, tables.settings, kept), len(between)


def study_figures(result) -> list[StudyFigure]:
    """Every figure of the study's report, numbered in the report's order."""
    from kdprobe.writers.colors import study_colors
    from kdprobe.writers.diversity_plot import diversity_figure
    from kdprobe.writers.probe_plots import probe_figure
    from kdprobe.writers.static_figures import caption_of

    colors = study_colors(result.settings)
    out: list[tuple[str, object, str]] = []
    if result.diversity is not None:
        fig = diversity_figure(result.diversity, colors)
        out.append(("diversity", fig, caption_of(fig)))
    for name, tables in result.probes.items():
        shown, _ = readable(tables)
        fig = probe_figure(shown, colors)
        out.append((name, fig, caption_of(fig)))
    groups: dict[str, list] = {}
    for rec in result.landscapes:
        groups.setdefault(rec.group, []).append(rec)
    for group, recs in groups.items():
        flat, solid, levels = landscape_figures(recs, result.landscape_display)
        out.append((f"landscape-{group}", flat, _landscape_caption(recs, result.landscape_display, levels, False)))
        out.append((f"landscape-3d-{group}", solid, _landscape_caption(recs, result.landscape_display, levels, True)))
    return [StudyFigure(i, key, fig, cap) for i, (key, fig, cap) in enumerate(out, 1)]


def figure_block(fig: StudyFigure) -> str:
    """The numbered caption under a figure in report.html, with the PNG's path for report.md."""
    from kdprobe.writers.html import _e

    return (f"<div class='kd-static' data-png='{_e(fig.path('png'))}' data-label='{_e(fig.label)}'></div>"
            f"<p class='caption'><b>{fig.label}</b> {_e(fig.caption)}</p>")


def write_study_figures(result, folder: str | os.PathLike, formats=DEFAULT_FORMATS) -> list[Path]:
    """figures/figNN-KEY.<fmt> for every figure and format, and figures/captions.md (the numbered captions);
    returns the paths written. Files are written atomically."""
    from kdprobe.files.io import atomic_write_text
    from kdprobe.writers.colors import study_colors
    from kdprobe.writers.static_figures import render

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    colors = study_colors(result.settings)
    written, lines = [], [f"# Figures of study {result.name}", ""]
    for f in study_figures(result):
        for fmt in formats:
            written.append(render(f.figure, folder / f"{f.stem}.{fmt}", caption=f"{f.label} {f.caption}",
                                  colors=colors))
        lines += [f"**{f.label}** {f.caption}", "", " · ".join(f"[{fmt}]({f.stem}.{fmt})" for fmt in formats), ""]
    atomic_write_text(folder / "captions.md", "\n".join(lines))
    written.append(folder / "captions.md")
    return written
