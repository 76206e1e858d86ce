"""A study's report: one self-contained, offline HTML page (plotly.js inlined once), summary.json, cells.csv.

Pure writers: they take a kdprobe.studies.result.StudyResult and format it; every number shown
was computed by the study (kdprobe.stats via summarize_groups, the probes). Landscape figures
put each group's surfaces side by side (contour above, 3-D below) on one colour scale: the
minimum and maximum of the group's displayed heights.
"""
from __future__ import annotations

import csv
import html
import io
import json
import math
import os

import numpy as np

from kdprobe.files.io import atomic_write_text
from kdprobe.writers.html import _e, _f, _link, _table
from kdprobe.probes.diversity_table import ACCURACY_BOUNDS, clip_end, score_bounds
from kdprobe.studies.result import StudyResult, to_dict
from kdprobe.writers.landscape_plot import figure_div

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1400px;color:#222;
padding:0 16px}
h1{font-size:1.6em;margin-bottom:0}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0 4px;font-size:.92em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}td:last-child{white-space:normal;min-width:15em}
.note{color:#555;font-size:.9em;max-width:1100px}
pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:.85em;max-height:420px}
nav a{margin-right:14px}.scroll{overflow-x:auto}code{background:#f3f3f3;padding:0 3px}
.caption{font-size:.9em;max-width:1100px;margin:2px 0 18px}.kd-static{display:none}
"""


_SCALE = "Viridis"


def _stats_rows(groups, digits: str, bounds=(-math.inf, math.inf)) -> tuple[list[list[str]], bool]:
    """Table rows, and whether any displayed interval end was clipped to `bounds` (the files keep raw ends)."""
    rows, clipped = [], False
    for g in groups:
        n = f"{g.n_models}{'*' if g.uses_batch_values else ''}"
        (low, c1), (high, c2) = clip_end(g.low, bounds), clip_end(g.high, bounds)
        clipped |= c1 or c2
        rows.append([_e(g.group), n, f"{_f(g.mean, digits)} ± {_f(g.std, digits)}", _f(g.sem, digits),
                     _f(g.half_width, digits), f"[{_f(low, digits)}{'*' if c1 else ''}, {_f(high, digits)}"
                     f"{'*' if c2 else ''}]", _f(g.p_holm, ".3g"), _f(g.hedges_g, ".2f")])
    return rows, clipped


def _clip_note(clipped: bool, bounds: tuple[float, float], what: str) -> str:
    if not clipped:
        return ""
    lo, hi = (f"{b:g}" if math.isfinite(b) else "" for b in bounds)
    return (f" Interval ends marked * are clipped to what {what} can take ([{lo or '−∞'}, {hi or '∞'}]): mean ± "
            "quantile × sem went past it, a sign that the normal/t interval fits these few values poorly; "
            "summary.json keeps the raw ends.")


def _stats_header(conf: float, interval: str, ref) -> list[str]:
    return ["method", "n", "mean ± std", "sem", f"± {conf * 100:g}% {'t' if interval == 't' else 'z'}", "interval",
            "p (Holm)", "g"]


def _stats_note(conf: float, interval: str, ref) -> str:
    q = "the Student t quantile" if interval == "t" else "the normal quantile"
    tests = (f"p: Welch two-sided vs {_e(ref)}, Holm-adjusted over the methods; g: Hedges' g vs {_e(ref)}"
             if ref else "no tests (no reference group)")
    return f"± = {q} at {conf * 100:g}% × sem; {tests}."


def _accuracy(r: StudyResult) -> str:
    if not r.accuracy:
        return ""
    values = {}
    for c in r.cells:
        if c.in_study:
            values.setdefault(c.method, []).append(c.test_acc)
    stats_rows, clipped = _stats_rows(r.accuracy, ".4f", ACCURACY_BOUNDS)
    rows = [row + [", ".join(_f(v, ".4f") for v in values.get(g.group, []))] for row, g in zip(stats_rows, r.accuracy)]
    return ("<h2 id='accuracy'>Test accuracy</h2>"
            + _table(_stats_header(r.accuracy_confidence, r.accuracy_interval, r.accuracy_reference)
                     + ["per seed"], rows)
            + "<p class='note'>Last-epoch test accuracy of each checkpoint, a fraction (0-1; as the reference codes "
              "report it, in percent, ×100); "
              "unit = one independently trained model (seed); std is the sample standard deviation, sem = std/√n; "
              + _stats_note(r.accuracy_confidence, r.accuracy_interval, r.accuracy_reference)
              + " n with * = one model: no spread." + _clip_note(clipped, ACCURACY_BOUNDS, "an accuracy") + "</p>")


def _figures(r: StudyResult, figs: dict | None) -> dict:
    """{key: StudyFigure} of the report's numbered figures (kdprobe.writers.report_figures), built once."""
    if figs is not None:
        return figs
    from kdprobe.writers.report_figures import study_figures

    return {f.key: f for f in study_figures(r)}


def _diversity(r: StudyResult, figs: dict | None = None) -> str:
    from kdprobe.writers.report_figures import figure_block

    t = r.diversity
    if t is None:
        return ""
    s = t.settings
    links = " · ".join(_link(p) for p in ("diversity.csv", "diversity.json", "diversity.html") if p in r.files)
    bounds = score_bounds(s.variant, s.batch_size)
    rows, clipped = _stats_rows(t.groups, ".3f", bounds)
    return ("<h2 id='diversity'>Representation diversity</h2>"
            + _table(_stats_header(s.confidence, s.interval, s.reference), rows)
            + f"<p class='note'>Jacobian-correlation score {s.variant} (Mellor et al. 2020; higher = more diverse) "
              f"on {_e(s.dataset)}: N = {s.batch_size} inputs per batch, {s.runs} batches per checkpoint "
              f"(split {_e(s.split)}, probe seed {s.seed}), bn = {_e(s.bn)}, output = {_e(s.output)}, "
              f"k = {s.k:g}. Unit = one checkpoint (its mean over the batches); "
              f"{_stats_note(s.confidence, s.interval, s.reference)}"
              f"{_clip_note(clipped, bounds, f'a v1 score at N = {s.batch_size}')} Files: {links}</p>"
            + figure_div(_figures(r, figs)["diversity"].figure) + figure_block(_figures(r, figs)["diversity"]))


def _landscape_figure(recs, display, key: str, numbered: tuple | None = None):
    """The group's two figures as HTML: the contour maps, then the 3-D surfaces behind a WebGL test whose note
    names the .vtk files; numbered: their (contour, 3-D) StudyFigures, whose captions go under them."""
    from kdprobe.writers.landscape_plot import display_levels, no_webgl_note, webgl_figure_div
    from kdprobe.writers.report_figures import figure_block, landscape_figures

    if numbered is None:
        flat, solid, levels = landscape_figures(recs, display)
        blocks = ("", "")
    else:
        flat, solid = numbered[0].figure, numbered[1].figure
        levels = display_levels(np.concatenate([np.asarray(r.loss, np.float64).ravel() for r in recs]),
                                log=bool(display.get("log")), zmax=display.get("zmax"))
        blocks = tuple(figure_block(f) for f in numbered)
    suffix = os.path.splitext(recs[0].vtk)[1] or ".vtk"
    return (figure_div(flat) + blocks[0] + webgl_figure_div(solid, f"kd-3d-{key}", no_webgl_note(suffix)) + blocks[1],
            levels["start"], levels["end"])


def _landscapes(r: StudyResult, figs: dict | None = None) -> str:
    if not r.landscapes:
        return ""
    d = r.landscape_display
    extra = "; height = log(loss)" if d.get("log") else ""
    if d.get("zmax"):
        extra += f"; loss clipped at {d['zmax']:g} for display (the files keep every value)"
    parts = ["<h2 id='landscapes'>Loss landscapes</h2>",
             f"<p class='note'>Li et al. 2018: loss at θ + x·d1 + y·d2. {_e(d.get('directions', ''))}. "
             f"Each figure: one colour scale and one z range shared by all its panels{extra}.</p>"]
    groups: dict[str, list] = {}
    for rec in r.landscapes:
        groups.setdefault(rec.group, []).append(rec)
    for k, (name, recs) in enumerate(groups.items()):
        f = _figures(r, figs)
        div, zmin, zmax = _landscape_figure(recs, d, str(k), (f[f"landscape-{name}"], f[f"landscape-3d-{name}"]))
        first = recs[0]
        parts.append(f"<h3>{_e(name)}</h3><p class='note'>{len(first.ycoords)}×{len(first.xcoords)} grid, "
                     f"{first.samples} {first.split} samples, bn = {_e(first.bn)}, precision {first.precision}; "
                     f"contour levels and colour scale {zmin:.4g} to {zmax:.4g}"
                     f"{' (log loss)' if d.get('log') else ' (loss, nats)'}, as the reference plot_2D draws them "
                     f"(levels from loss 0.1 to 10; higher loss in the top colour).</p>{div}")
    rows = []
    for rec in r.landscapes:
        loss = np.asarray(rec.loss, np.float64)
        ci, cj = int(np.argmin(np.abs(rec.ycoords))), int(np.argmin(np.abs(rec.xcoords)))
        rows.append([_e(rec.group), _e(rec.method), str(rec.seed), str(rec.epoch), _f(float(loss[ci, cj]), ".4f"),
                     _f(float(np.nanmin(loss)), ".4f"), _f(float(np.nanmax(loss)), ".4f"), _link(rec.checkpoint),
                     _link(rec.h5), _link(rec.vtk)])
    parts.append(_table(["group", "method", "seed", "epoch", "centre loss", "min loss", "max loss", "checkpoint",
                         "HDF5", "VTK"], rows))
    return "".join(parts)


def _pruning(r: StudyResult) -> str:
    if not r.pruning:
        return ""
    parts = ["<h2 id='surplus'>Pruning and surplus</h2><p class='note'>surplus = (self_distill − "
             "finetuned_scratch) − (unpruned_kd − unpruned_scratch); se = √(sum of the four squared standard "
             "errors). Zero: the two gains just add up.</p>"]
    for b in r.pruning:
        rows = [[_e(s.kd_type), f"{_f(s.unpruned_scratch_mean)} ({s.unpruned_scratch_n})",
                 f"{_f(s.finetuned_scratch_mean)} ({s.finetuned_scratch_n})",
                 f"{_f(s.unpruned_kd_mean)} ({s.unpruned_kd_n})", f"{_f(s.self_distill_mean)} ({s.self_distill_n})",
                 _f(s.gain_unpruned, "+.4f"), _f(s.gain_pruned, "+.4f"),
                 f"{_f(s.surplus, '+.4f')} ± {_f(s.surplus_se, '.4f')}"] for s in b.surplus]
        links = " · ".join(_link(p) for p in b.files.values())
        cols = ("unpruned", "finetuned", "post_distill", "pre_post", "self_distill")
        res = _table(["train type", "seed"] + [c.replace("_", " ") for c in cols],
                     [[_e(x.get("train_type")), _e(x.get("seed", "–"))] + [_f(x.get(c), ".4f") for c in cols]
                      for x in b.results]) if b.results else ""
        parts.append(f"<h3>{_e(b.label)}</h3>" + _table(
            ["KD", "scratch unpruned (n)", "scratch fine-tuned (n)", "KD unpruned (n)", "Self-Distill (n)",
             "gain unpruned", "gain pruned", "surplus ± se"], rows)
            + f"<p class='note'>Test accuracy (a fraction, last epoch) of every run; finetuned of a KD row = "
              "Pre-Distill. "
              f"{b.cells_total} pipeline cells under {_link(b.folder)}. Files: {links}</p>" + res)
    return "".join(parts)


def _cells(r: StudyResult) -> str:
    if not r.cells:
        return ""
    rows = [[_e(c.method), str(c.seed), _f(c.test_acc, ".4f"), _f(c.best_acc, ".4f"), str(c.epochs), str(c.world_size),
             _e(c.action), _f(c.seconds, ".1f"), _link(c.path), _link(c.teacher),
             " ".join(_link(s) for s in c.snapshots) or "–", "" if c.in_study else "teacher only"] for c in r.cells]
    return ("<h2 id='cells'>Cells</h2>" + _table(
        ["method", "seed", "test acc (last)", "best acc", "epochs", "processes", "this run", "seconds", "checkpoint",
         "teacher", "lr-stage snapshots", ""], rows)
        + "<p class='note'>File names carry the fingerprint of the training configuration (the teacher written as "
          "its own content-named file), so a changed setting makes a new cell instead of reusing an old one.</p>")


def _flat(v) -> str:
    """A versions entry as text: the machine record (a dict) as 'cpu ..., cpu_capability AVX512, threads 2'."""
    return ", ".join(f"{k} {_flat(x)}" for k, x in v.items()) if isinstance(v, dict) else str(v)


def _settings(r: StudyResult) -> str:
    vers = _table(["library", "version"], [[_e(k), _e(_flat(v))] for k, v in r.versions.items()])
    files = " · ".join(_link(p) for p in r.files.values())
    notes = "".join(f"<li>{_e(n)}</li>" for n in r.notes)
    return (f"<h2 id='settings'>Settings</h2>{'<ul class=note>' + notes + '</ul>' if notes else ''}"
            f"<p class='note'>Spec {_e(r.source)}, scale {_e(r.scale or 'as written')}, device {_e(r.device)}. "
            f"Files: {files}</p>"
            f"<pre>{_e(json.dumps(r.settings, indent=2, default=str))}</pre>{vers}")


def report_html(result: StudyResult) -> str:
    """The whole report page as a string (plotly.js inlined once, only when there is a figure)."""
    from plotly.offline import get_plotlyjs

    from kdprobe.writers.report_probes import probes_html, verdicts_html

    r = result
    figs = _figures(r, None)  # every figure once, numbered in the report's order
    body = [_accuracy(r), _diversity(r, figs), verdicts_html(r), probes_html(r, figs), _landscapes(r, figs),
            _pruning(r), _cells(r), _settings(r)]
    nav = " ".join(f"<a href='#{k}'>{v}</a>" for k, v, b in (
        ("accuracy", "accuracy", r.accuracy), ("diversity", "diversity", r.diversity),
        ("reading", "ensemble reading", r.verdicts), *((k, k, True) for k in r.probes),
        ("landscapes", "landscapes", r.landscapes), ("surplus", "surplus", r.pruning), ("cells", "cells", r.cells),
        ("settings", "settings", True)) if b)
    has_figure = bool(r.landscapes) or r.diversity is not None or bool(r.probes)
    script = f"<script type='text/javascript'>{get_plotlyjs()}</script>" if has_figure else ""
    head = (f"<meta charset='utf-8'><title>kdprobe study {_e(r.name)}</title><style>{_CSS}</style>{script}")
    n_cells = len(r.cells) + sum(b.cells_total for b in r.pruning)
    top = (f"<h1>kdprobe study: {_e(r.name)}</h1><p>{_e(r.title)}</p>"
           f"<p class='note'>scale {_e(r.scale or 'as written')} · {n_cells} cells · device {_e(r.device)} "
           f"({_e(r.versions.get('device_name', ''))}) · made {_e(r.created)} · this run {r.wall_seconds:.1f}s · "
           f"kdprobe {_e(r.versions.get('kdprobe', ''))}, "
           f"torch {_e(r.versions.get('torch', ''))}</p><nav>{nav}</nav>")
    return f"<!DOCTYPE html><html lang='en'><head>{head}</head><body>{top}{''.join(body)}</body></html>\n"


def write_report(result: StudyResult, path: str | os.PathLike) -> None:
    """report.html: settings, versions, accuracy, diversity, ensemble probes and verdicts, landscapes, surplus,
    links to every file."""
    atomic_write_text(path, report_html(result))


def write_landscape_page(result: StudyResult, path: str | os.PathLike) -> None:
    """landscapes.html: only the report's loss-landscape section (contours on one scale, 3-D below), a page
    small enough to share or screenshot."""
    from kdprobe.writers.landscape_plot import page

    body = (f"<style>{_CSS}</style><h1>kdprobe study {_e(result.name)}: loss landscapes</h1>"
            f"<p class='note'>scale {_e(result.scale or 'as written')} · {_e(result.title)}</p>{_landscapes(result)}")
    atomic_write_text(path, page(f"kdprobe study {result.name}: loss landscapes", body))


def write_summary_json(result: StudyResult, path: str | os.PathLike) -> None:
    """summary.json: every number of the study (nan as null); kdprobe.studies.result.from_dict reads it back."""
    atomic_write_text(path, json.dumps(to_dict(result), indent=1, allow_nan=False) + "\n")


def write_cells_csv(result: StudyResult, path: str | os.PathLike) -> None:
    """cells.csv: one row per trained checkpoint (method, seed, model, dataset, accuracies, file, teacher)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = ["method", "seed", "model", "dataset", "test_acc", "best_acc", "epochs", "in_study", "path", "fingerprint",
            "teacher"]
    w.writerow(cols)
    for c in result.cells:
        w.writerow([c.method, c.seed, c.model, c.dataset, repr(c.test_acc), repr(c.best_acc), c.epochs, c.in_study,
                    c.path, c.fingerprint, c.teacher or ""])
    atomic_write_text(path, buf.getvalue())
