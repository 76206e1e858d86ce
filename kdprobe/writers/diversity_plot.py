"""Diversity table as a self-contained, offline plotly HTML page (plotly.js inlined)."""
from __future__ import annotations

import math
import os

import numpy as np
import plotly.graph_objects as go

from kdprobe.probes.diversity_table import score_bounds
from kdprobe.files.io import atomic_path

_JITTER = 0.12  # half-width of the horizontal jitter of model points, in category units


def _finite_or_none(x: float):
    return None if x is None or not math.isfinite(x) else x


def diversity_figure(table, colors: dict | None = None) -> go.Figure:
    """Strip plot of per-checkpoint scores with group means +- the confidence half-width; colors: {method:
    colour} (a study's, kdprobe.writers.colors), default in order of the groups."""
    from kdprobe.writers.colors import method_colors

    st = table.settings
    names = [g.group for g in table.groups]
    palette = method_colors(names, colors)
    pos = {g: i for i, g in enumerate(names)}
    rng = np.random.default_rng(0)  # fixed: the same table always gives the same file
    fig = go.Figure()
    for g in table.groups:
        models = [s for s in table.scores if s.group == g.group]
        x = pos[g.group] + rng.uniform(-_JITTER, _JITTER, len(models)) - 0.15
        fig.add_trace(go.Scatter(
            x=x, y=[s.mean for s in models], mode="markers", name=f"{g.group} checkpoints",
            marker=dict(size=8, opacity=0.75, color=palette[g.group]), legendgroup=g.group,
            text=[f"{s.path}<br>seed {s.seed}<br>batches: " + ", ".join(f"{v:.2f}" for v in s.values)
                  for s in models],
            hovertemplate="%{text}<br>mean %{y:.3f}<extra></extra>",
        ))
    level = f"{st.confidence * 100:g}% {'Student t' if st.interval == 't' else 'normal'}"
    # bars never reach past what a score can take (v1: at most -N); the files keep the raw half-widths
    lo, hi = score_bounds(st.variant, st.batch_size)
    up = [_finite_or_none(min(g.mean + g.half_width, hi) - g.mean) for g in table.groups]
    down = [_finite_or_none(g.mean - max(g.mean - g.half_width, lo)) for g in table.groups]
    clipped = any(math.isfinite(g.half_width) and g.mean + g.half_width > hi for g in table.groups)
    fig.add_trace(go.Scatter(
        x=[pos[g.group] + 0.15 for g in table.groups], y=[g.mean for g in table.groups], mode="markers",
        name=f"group mean ± {level} half-width", marker=dict(symbol="diamond", size=12, color="black"),
        error_y=dict(type="data", symmetric=False, array=up, arrayminus=down, visible=True),
        text=[f"n={g.n_models}{' (batch values)' if g.uses_batch_values else ''}<br>"
              f"p(Holm)={g.p_holm:.3g}, g={g.hedges_g:.2f}" for g in table.groups],
        hovertemplate="mean %{y:.3f}<br>%{text}<extra></extra>",
    ))
    ticks = [f"{g.group}<br>n={g.n_models}{'*' if g.uses_batch_values else ''}" for g in table.groups]
    n_models = len(table.scores)
    title = (f"Jacobian-correlation score {st.variant} (Mellor et al. 2020), {n_models} checkpoints"
             f"<br><sup>N={st.batch_size} inputs × {st.runs} batches, split={st.split}, bn={st.bn}, "
             f"output={st.output}, k={st.k:g}, probe seed {st.seed}; error bars: {level}</sup>")
    fig.update_layout(
        title=title, template="plotly_white", yaxis_title=f"Jacobian-correlation score {st.variant} (higher = more diverse)",
        xaxis=dict(tickmode="array", tickvals=list(range(len(names))), ticktext=ticks,
                   range=[-0.6, len(names) - 0.4]),
    )
    notes = []
    if any(g.uses_batch_values for g in table.groups):
        notes.append("* one checkpoint: spread over its probe batches, not over models")
    if clipped:
        notes.append(f"bars end at {hi:g}, the highest score a v1 correlation matrix of N={st.batch_size} can give "
                     "(mean + half-width went past it)")
    if notes:
        fig.add_annotation(text="<br>".join(notes), xref="paper", yref="paper", x=0, y=-0.15, showarrow=False,
                           font=dict(size=11), align="left")
    return fig


def write_diversity_html(table, path: str | os.PathLike) -> None:
    """The diversity figure as a self-contained offline page (plotly.js inlined)."""
    with atomic_path(path) as tmp:
        diversity_figure(table).write_html(str(tmp), include_plotlyjs=True, full_html=True)
