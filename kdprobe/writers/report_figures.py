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


def study_figures(result) -> list[StudyFigure]:
    """Every figure of the study's report, numbered in the report's order."""
    from kdprobe.writers.colors import study_colors
    from kdprobe.writers.diversity_plot import diversity_figure
    from kdprobe.writers.probe_plots import probe_figure
    from kdprobe.writers.report import landscape_figures
    from kdprobe.writers.report_probes import _readable
    from kdprobe.writers.static_figures import caption_of

    colors = study_colors(result.settings)
    out: list[tuple[str, object, str]] = []
    if result.diversity is not None:
        fig = diversity_figure(result.diversity, colors)
        out.append(("diversity", fig, caption_of(fig)))
    for name, tables in result.probes.items():
        shown, _ = _readable(tables)
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
