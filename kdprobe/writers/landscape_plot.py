"""Interactive HTML for loss landscapes (plotly), self-contained: plotly.js is embedded,
so the file opens offline in any browser (about 4.5 MB each)."""
from __future__ import annotations

import os

import numpy as np

from kdprobe.io import atomic_write_text
from kdprobe.probes.landscape import LineResult, SurfaceResult
from kdprobe.writers.landscape_vtk import height


def _save(fig, path) -> None:
    atomic_write_text(path, fig.to_html(include_plotlyjs=True, full_html=True))


def _nan_to_none(a: np.ndarray) -> list:
    """plotly leaves gaps at None; a partial surface's unevaluated points are nan."""
    return np.where(np.isfinite(a), a, None).tolist()


def write_surface_html(result: SurfaceResult, path: str | os.PathLike, *, log: bool = False,
                       zmax: float | None = None, split: str = "train",
                       title: str = "kdprobe loss surface") -> None:
    """Contour map (left) and 3-D surface (right) of the loss; hover shows accuracy too."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    z = _nan_to_none(height(result.loss, log=log, zmax=zmax))
    acc = _nan_to_none(np.asarray(result.acc, np.float64))
    label = f"{'log ' if log else ''}{split} loss"
    x, y = np.asarray(result.xcoords).tolist(), np.asarray(result.ycoords).tolist()
    hover = "x=%{x:.3f}<br>y=%{y:.3f}<br>" + label + "=%{z:.4f}<br>acc=%{customdata:.2f}%<extra></extra>"
    fig = make_subplots(rows=1, cols=2, specs=[[{"type": "xy"}, {"type": "scene"}]],
                        subplot_titles=(f"{label} (contour)", f"{label} (surface)"))
    fig.add_trace(go.Contour(x=x, y=y, z=z, customdata=acc, hovertemplate=hover, ncontours=30,
                             colorscale="Viridis", colorbar=dict(title=label, x=0.45)), 1, 1)
    fig.add_trace(go.Surface(x=x, y=y, z=z, customdata=acc, hovertemplate=hover, colorscale="Viridis",
                             showscale=False), 1, 2)
    fig.update_xaxes(title_text="x (direction 1)", row=1, col=1)
    fig.update_yaxes(title_text="y (direction 2)", scaleanchor="x", row=1, col=1)
    fig.update_layout(title=title, scene=dict(xaxis_title="x", yaxis_title="y", zaxis_title=label),
                      height=650, width=1300)
    _save(fig, path)


def write_line_html(result: LineResult, path: str | os.PathLike, *, log: bool = False,
                    zmax: float | None = None, split: str = "train",
                    title: str = "kdprobe interpolation path") -> None:
    """Loss (left axis) and accuracy (right axis) along t; t=0 is A, t=1 is B."""
    import plotly.graph_objects as go

    t = np.asarray(result.coords).tolist()
    label = f"{'log ' if log else ''}{split} loss"
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=t, y=_nan_to_none(height(result.loss, log=log, zmax=zmax)),
                             mode="lines+markers", name=label))
    fig.add_trace(go.Scatter(x=t, y=_nan_to_none(np.asarray(result.acc, np.float64)), mode="lines+markers",
                             name=f"{split} accuracy (%)", yaxis="y2", line=dict(dash="dot")))
    fig.update_layout(title=title, xaxis_title="t  (theta = (1-t) A + t B)", yaxis_title=label,
                      yaxis2=dict(title="accuracy (%)", overlaying="y", side="right"), height=550)
    _save(fig, path)
