"""Ensemble-perspective probe tables as self-contained offline HTML (plotly.js inlined; SVG traces only,
go.Scatter and go.Heatmap, never WebGL): ensemble-size curves and pair strips (agreement), reliability
diagrams (calibration), the CKA layer matrix or pair strips (cka), the sharpness strip plot."""
from __future__ import annotations

import math
import os

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from kdprobe.files.io import atomic_path
from kdprobe.writers.colors import method_colors

_JITTER = 0.12
UNBOUNDED = (-math.inf, math.inf)
#: what each metric can take: intervals are drawn (and tabled, kdprobe.writers.report_probes) clipped to it
BOUNDS = {"disagreement": (0.0, 1.0), "normalized_disagreement": (0.0, math.inf), "js": (0.0, math.log(2.0)),
          "sym_kl": (0.0, math.inf), "acc": (0.0, 1.0), "ece": (0.0, 1.0), "nll": (0.0, math.inf),
          "brier": (0.0, 2.0)}
#: axis titles with their units (rates are fractions, docs/units.md)
AXIS_TITLES = {"disagreement": "disagreement (fraction of samples)", "normalized_disagreement":
               "normalized disagreement (ratio)", "js": "Jensen-Shannon divergence (nats)",
               "sym_kl": "symmetric KL (nats)", "acc": "accuracy (fraction)", "ece": "ECE (fraction)",
               "nll": "NLL (nats)", "brier": "Brier score", "cka": "linear CKA (0-1)",
               "top_eigenvalue": "top Hessian eigenvalue", "trace": "Hessian trace"}


def _colors(groups, colors: dict | None) -> dict:
    return method_colors(groups, colors)


def _whiskers(mean, low, high, bounds) -> tuple:
    """(up, down) error-bar lengths of [low, high] clipped to `bounds`, as the tables clip them; None where
    undefined."""
    if mean is None or low is None or high is None or not all(map(math.isfinite, (mean, low, high))):
        return None, None
    lo, hi = bounds
    return min(high, hi) - mean, mean - max(low, lo)


def _strip(fig, row: int, col: int, cats: list[str], points: list[tuple[str, float, str]], summary: dict,
           ytitle: str, legend: bool = False, colors: dict | None = None, point_group=None, metric: str = "") -> None:
    """Jittered points per category and the category mean with its interval [low, high] as error bars, clipped
    to what the metric can take (BOUNDS) exactly as the tables clip it. summary: {category: (mean, low, high)}.
    Points are coloured by their method (point_group(category) names it; default the category itself)."""
    rng = np.random.default_rng(0)  # fixed jitter: the same tables always give the same file
    pos = {c: i for i, c in enumerate(cats)}
    pts = [(c, v, h) for c, v, h in points if v is not None and c in pos]
    point_group = point_group or (lambda c: c)
    palette = _colors([point_group(c) for c in cats], colors)
    fig.add_trace(go.Scatter(
        x=[pos[c] - 0.15 + rng.uniform(-_JITTER, _JITTER) for c, _, _ in pts], y=[v for _, v, _ in pts],
        mode="markers", marker=dict(size=7, opacity=0.75, color=[palette[point_group(c)] for c, _, _ in pts]),
        text=[h for _, _, h in pts], hovertemplate="%{text}<br>%{y:.4g}<extra></extra>", name="one checkpoint (or pair)",
        showlegend=legend), row=row, col=col)
    have = [c for c in cats if c in summary and summary[c][0] is not None]
    bounds = BOUNDS.get(metric, UNBOUNDED)
    bars = [_whiskers(*summary[c], bounds) for c in have]
    fig.add_trace(go.Scatter(
        x=[pos[c] + 0.15 for c in have], y=[summary[c][0] for c in have], mode="markers",
        marker=dict(symbol="diamond", size=11, color="black"), name="mean and its interval",
        error_y=dict(type="data", symmetric=False, array=[u for u, _ in bars], arrayminus=[d for _, d in bars],
                     visible=True), showlegend=legend,
        hovertemplate="mean %{y:.4g}<extra></extra>"), row=row, col=col)
    fig.update_xaxes(tickmode="array", tickvals=list(range(len(cats))), ticktext=cats, range=[-0.6, len(cats) - 0.4],
                     row=row, col=col)
    fig.update_yaxes(title_text=AXIS_TITLES.get(ytitle, ytitle), row=row, col=col)


def _interval(row: dict) -> tuple:
    """(mean, low, high) of a summary record (low/high where it has them, else mean ± half_width)."""
    mean, hw = row.get("mean"), row.get("half_width")
    low, high = row.get("low"), row.get("high")
    if (low is None or high is None) and mean is not None and hw is not None:
        low, high = mean - hw, mean + hw
    return mean, low, high


def _level(st: dict) -> str:
    return f"{st.get('confidence', 0.99) * 100:g}% {st.get('interval', 't')}"


def _pair_strips(fig, row: int, tables, metrics: list[str], colors: dict | None = None) -> None:
    pairs, types = tables.table("pairs"), tables.table("pair_types")
    keys = [f"{p['pair_type']} {p['pair_groups']}" for p in pairs]
    cats = list(dict.fromkeys([t["key"] for t in types] + keys))  # the summary's order: reference type first
    # a pair's colour: its method (within), its student's (student-teacher); pairs between methods: grey
    group_of = {f"{p['pair_type']} {p['pair_groups']}": "between methods" if p["pair_type"] == "between" else
                str(p["pair_groups"]).split("->")[0] for p in pairs}
    colors = {"between methods": "#7F7F7F", **(colors or {})}
    for j, m in enumerate(metrics, start=1):
        pts = [(f"{p['pair_type']} {p['pair_groups']}", p.get(m), f"{p['a']}<br>{p['b']}") for p in pairs]
        summ = {t["key"]: _interval(t) for t in types if t["metric"] == m}
        _strip(fig, row, j, cats, pts, summ, m, legend=(j == 1), colors=colors,
               point_group=lambda c: group_of.get(c, c), metric=m)


def agreement_figure(tables, colors: dict | None = None) -> go.Figure:
    """Ensemble-size curves (ensemble vs member mean, per group) above pair-level agreement strips; a study's
    separate agreement or ensembles tables get only their own row."""
    metrics = ["acc", "nll", "ece"]
    curves, strips = bool(tables.table("ensembles")), bool(tables.table("pairs"))
    titles = (["ensemble accuracy", "ensemble NLL", "ensemble ECE"] if curves else []) + \
        (["disagreement", "normalized disagreement", "Jensen-Shannon"] if strips else [])
    n_rows = max(1, curves + strips)
    fig = make_subplots(rows=n_rows, cols=3, vertical_spacing=0.16, subplot_titles=titles)
    groups = list(dict.fromkeys(r["group"] for r in tables.table("ensembles")))
    palette = _colors(groups, colors)
    for g in groups:
        rows = [r for r in tables.table("ensembles") if r["group"] == g]
        for j, m in enumerate(metrics, start=1):
            k = [r["k"] for r in rows]
            fig.add_trace(go.Scatter(x=k, y=[r[m] for r in rows], mode="lines+markers", name=f"{g} ensemble",
                                     legendgroup=g, showlegend=j == 1, line=dict(color=palette[g]),
                                     hovertemplate=f"{g}, k=%{{x}}: %{{y:.4f}}<extra></extra>"), row=1, col=j)
            fig.add_trace(go.Scatter(x=k, y=[r[f"member_{m}"] for r in rows], mode="lines", name=f"{g} mean member",
                                     legendgroup=g, showlegend=j == 1, line=dict(color=palette[g], dash="dash"),
                                     hovertemplate=f"{g} members, k=%{{x}}: %{{y:.4f}}<extra></extra>"), row=1, col=j)
            fig.update_xaxes(title_text="ensemble size k (members)", dtick=1, row=1, col=j)
            fig.update_yaxes(title_text=AXIS_TITLES[m], row=1, col=j)
    if strips:
        _pair_strips(fig, 1 + curves, tables, ["disagreement", "normalized_disagreement", "js"], palette)
    st = tables.settings
    what = [s for s, on in (("top: mean over subsets of size k (solid) vs their members' mean (dashed)", curves),
                            (f"{'bottom' if curves else 'strips'}: one point per pair, diamond = mean over pairs with its "
                             f"{_level(st)} jackknife interval, clipped to what the metric can take as the table clips it "
                             "(unit = one checkpoint)", strips)) if on]
    fig.update_layout(template="plotly_white", height=450 * n_rows - 50 * (n_rows - 1), title=(
        f"{'Agreement and ensembles' if curves and strips else 'Ensembles' if curves else 'Agreement'} on "
        f"{st.get('dataset')} ({st.get('split')}, {st.get('samples_used')} samples)<br><sup>{'; '.join(what)}</sup>"))
    return fig


def calibration_figure(tables, colors: dict | None = None) -> go.Figure:
    """Reliability diagrams per group (one line per checkpoint, the bins' sample counts on hover) and the ECE
    strip plot; the fitted temperatures in the title when they were fitted."""
    groups = list(dict.fromkeys(r["group"] for r in tables.table("checkpoints")))
    palette = _colors(groups, colors)
    n = len(groups) + 1
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"reliability: {g}" for g in groups] + ["ECE"])
    rel = tables.table("reliability")
    for gi, g in enumerate(groups):
        r, c = gi // cols + 1, gi % cols + 1
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(color="grey", dash="dot"),
                                 showlegend=False, hoverinfo="skip"), row=r, col=c)
        for ck in dict.fromkeys(b["checkpoint"] for b in rel if b["group"] == g):
            bins = [b for b in rel if b["checkpoint"] == ck and b["count"]]
            fig.add_trace(go.Scatter(
                x=[b["confidence"] for b in bins], y=[b["accuracy"] for b in bins], mode="lines+markers",
                line=dict(color=palette[g]), opacity=0.6, showlegend=False, text=[f"{b['count']} samples" for b in bins],
                hovertemplate=f"{ck}<br>confidence %{{x:.3f}}, accuracy %{{y:.3f}}<br>%{{text}}<extra></extra>"),
                row=r, col=c)
        fig.update_xaxes(title_text="confidence (mean top-class probability)", range=[0, 1], row=r, col=c)
        fig.update_yaxes(title_text="accuracy (fraction)", range=[0, 1], row=r, col=c)
    last = len(groups)
    summ = {s["group"]: _interval(s) for s in tables.table("groups") if s["metric"] == "ece"}
    pts = [(r["group"], r.get("ece"), r["checkpoint"]) for r in tables.table("checkpoints")]
    _strip(fig, last // cols + 1, last % cols + 1, groups, pts, summ, "ece", colors=palette, metric="ece")
    st = tables.settings
    fitted = [r.get("temperature") for r in tables.table("checkpoints") if isinstance(r.get("temperature"), (int, float))]
    temp = (f"; fitted temperatures {min(fitted):.3g} to {max(fitted):.3g} (table temperature)" if fitted else "")
    n_bins = sum(1 for b in rel if b["count"])
    fig.update_layout(template="plotly_white", height=420 * rows, title=(
        f"Calibration on {st.get('dataset')} ({st.get('split')}, {st.get('samples_used')} samples, {st.get('bins')} "
        f"equal-width bins, {n_bins} non-empty over all checkpoints){temp}<br><sup>one line per checkpoint (empty "
        f"bins left out); diamond = group mean with its {_level(st)} interval, clipped to [0, 1] as the table "
        f"clips it; unit = one checkpoint</sup>"))
    return fig


def cka_figure(tables, colors: dict | None = None) -> go.Figure:
    """The layer x layer CKA heatmap (two checkpoints) or pair-level CKA per pair type (a group)."""
    st = tables.settings
    layers = tables.table("layers")
    if layers:
        la = list(dict.fromkeys(r["layer_a"] for r in layers))
        lb = list(dict.fromkeys(r["layer_b"] for r in layers))
        z = [[next(r["cka"] for r in layers if r["layer_a"] == a and r["layer_b"] == b) for b in lb] for a in la]
        fig = go.Figure(go.Heatmap(z=z, x=lb, y=la, zmin=0, zmax=1, colorscale="Viridis", colorbar=dict(title="CKA"),
                                   hovertemplate="A %{y}<br>B %{x}<br>CKA %{z:.3f}<extra></extra>"))
        fig.update_layout(template="plotly_white", height=700, xaxis_title=f"B: {st.get('b')}",
                          yaxis_title=f"A: {st.get('a')}", yaxis=dict(autorange="reversed"),
                          title=f"Linear CKA, layer by layer ({st.get('estimator')} unbiased HSIC, "
                                f"{st.get('samples_used')} {st.get('split')} samples)")
        return fig
    fig = make_subplots(rows=1, cols=1)
    _pair_strips(fig, 1, tables, ["cka"], colors)
    fig.update_layout(template="plotly_white", height=550, title=(
        f"Linear CKA at {st.get('layer')} per pair type ({st.get('estimator')} unbiased HSIC)"
        f"<br><sup>one point per pair; diamond = mean over pairs with its {_level(st)} jackknife interval</sup>"))
    return fig


def sharpness_figure(tables, colors: dict | None = None) -> go.Figure:
    """Strip plots of the top eigenvalue and the trace per group, and SLQ densities when measured."""
    curves = tables.table("density_curve")
    cols = 3 if curves else 2
    fig = make_subplots(rows=1, cols=cols, subplot_titles=["top Hessian eigenvalue", "Hessian trace (Hutchinson)",
                                                           "eigenvalue density (SLQ)"][:cols])
    ck = tables.table("checkpoints")
    groups = list(dict.fromkeys(r["group"] for r in ck))
    palette = _colors(groups, colors)
    for j, m in enumerate(["top_eigenvalue", "trace"], start=1):
        summ = {s["group"]: _interval(s) for s in tables.table("groups") if s["metric"] == m}
        _strip(fig, 1, j, groups, [(r["group"], r.get(m), r["checkpoint"]) for r in ck], summ, m, legend=j == 1,
               colors=palette, metric=m)
    for path in dict.fromkeys(c["checkpoint"] for c in curves):
        pts = [c for c in curves if c["checkpoint"] == path]
        fig.add_trace(go.Scatter(x=[c["eigenvalue"] for c in pts], y=[c["density"] for c in pts], mode="lines",
                                 line=dict(color=palette.get(pts[0]["group"], "#7F7F7F")), name=path,
                                 showlegend=False,
                                 hovertemplate=f"{path}<br>%{{x:.4g}}: %{{y:.3g}}<extra></extra>"), row=1, col=3)
    if curves:
        top = max(c["density"] for c in curves)  # log axis over 6 decades below the peak (the tails underflow)
        fig.update_yaxes(type="log", range=[np.log10(top) - 6, np.log10(top) + 0.3], title_text="density",
                         row=1, col=3)
        fig.update_xaxes(title_text="eigenvalue", row=1, col=3)
    st = tables.settings
    fig.update_layout(template="plotly_white", height=520, title=(
        f"Sharpness of the training loss ({st.get('samples_used')} {st.get('split')} samples, bn={st.get('bn')})"
        f"<br><sup>one point per checkpoint; diamond = group mean with its {_level(st)} interval</sup>"))
    return fig


_FIGURES = {"agreement": agreement_figure, "ensembles": agreement_figure, "calibration": calibration_figure,
            "cka": cka_figure, "sharpness": sharpness_figure}


def _svg_only(fig: go.Figure) -> go.Figure:
    """Keep the template's defaults for the SVG trace types used here only: the page names no WebGL trace at all."""
    t = go.layout.Template(fig.layout.template)
    t.data = {k: v for k, v in t.data.to_plotly_json().items() if k in ("scatter", "heatmap")}
    fig.layout.template = t
    return fig


def probe_figure(tables, colors: dict | None = None) -> go.Figure:
    """The figure of a probe command's tables (agreement, ensembles, calibration, cka or sharpness); colors:
    {method: colour} (a study's, so one method has one colour in every figure; default: in order of appearance)."""
    return _svg_only(_FIGURES[tables.command](tables, colors))


def write_probe_html(tables, path: str | os.PathLike) -> None:
    """The command's figure as a self-contained offline page (plotly.js inlined)."""
    fig = probe_figure(tables)
    with atomic_path(path) as tmp:
        fig.write_html(str(tmp), include_plotlyjs=True, full_html=True)
