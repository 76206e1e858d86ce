"""Interactive HTML for loss landscapes (plotly), self-contained: plotly.js is embedded,
so the file opens offline in any browser (about 4.5 MB each).

The 2-D views (contour maps) are SVG and draw in every browser. The 3-D surface needs WebGL,
and plotly replaces a whole figure by "WebGL is not supported" when it is missing, so the 3-D
view is always a separate figure whose script first tests for WebGL and, without it, leaves a
one-line note instead; the contour map above it is drawn either way.
"""
from __future__ import annotations

import html
import json
import os

import numpy as np

from kdprobe.files.io import atomic_write_text
from kdprobe.probes.landscape import LineResult, SurfaceResult
from kdprobe.writers.landscape_vtk import height

NO_WEBGL = ("3-D view not drawn: this browser has no WebGL. The contour map shows the same surface; "
            "the .vtk file opens in ParaView.")
# Plotly's own WebGL test (gl3d): a throwaway canvas must hand out a webgl context
_GUARD = """<div id="{id}" class="kd-webgl"></div><script type="text/javascript">(function () {{
  var el = document.getElementById("{id}"), ok = false;
  try {{ var c = document.createElement("canvas");
         ok = !!(window.WebGLRenderingContext && (c.getContext("webgl") || c.getContext("experimental-webgl"))); }}
  catch (e) {{ ok = false; }}
  if (!ok) {{ el.innerHTML = "<p class='note kd-no-webgl'>{note}</p>"; return; }}
  el.className = "plotly-graph-div kd-webgl";
  var fig = {fig};
  Plotly.newPlot(el, fig.data, fig.layout, {config});
}})();</script>"""


def figure_div(fig) -> str:
    """An SVG figure (contour, heatmap, scatter) as a <div> for a page that already loads plotly.js."""
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"responsive": True})


def webgl_figure_div(fig, div_id: str) -> str:
    """A WebGL figure (3-D surface) as a <div> that is drawn only where WebGL works, else a note."""
    return _GUARD.format(id=html.escape(div_id, quote=True), note=html.escape(NO_WEBGL), fig=fig.to_json(),
                         config=json.dumps({"responsive": True}))


def page(title: str, body: str) -> str:
    """A whole offline HTML page: plotly.js inlined once, then `body`."""
    from plotly.offline import get_plotlyjs

    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>{body}</body></html>\n")


def _save(fig, path) -> None:
    atomic_write_text(path, fig.to_html(include_plotlyjs=True, full_html=True))


def _nan_to_none(a: np.ndarray) -> list:
    """plotly leaves gaps at None; a partial surface's unevaluated points are nan."""
    return np.where(np.isfinite(a), a, None).tolist()


def surface_figures(result: SurfaceResult, *, log: bool = False, zmax: float | None = None, split: str = "train",
                    title: str = "kdprobe loss surface"):
    """(contour, surface): the two plotly figures of a surface's HTML page, the contour map (SVG) and the 3-D
    surface (WebGL); height = loss clipped at zmax, then log with log=True; unevaluated points are gaps."""
    import plotly.graph_objects as go

    z = _nan_to_none(height(result.loss, log=log, zmax=zmax))
    acc = _nan_to_none(np.asarray(result.acc, np.float64))
    label = f"{'log ' if log else ''}{split} loss"
    x, y = np.asarray(result.xcoords).tolist(), np.asarray(result.ycoords).tolist()
    hover = "x=%{x:.3f}<br>y=%{y:.3f}<br>" + label + "=%{z:.4f}<br>acc=%{customdata:.2f}%<extra></extra>"
    contour = go.Figure(go.Contour(x=x, y=y, z=z, customdata=acc, hovertemplate=hover, ncontours=30,
                                   colorscale="Viridis", colorbar=dict(title=label)))
    contour.update_layout(title=f"{title}: {label} (contour)", xaxis_title="x (direction 1)",
                          yaxis=dict(title="y (direction 2)", scaleanchor="x"), height=650, width=760)
    surface = go.Figure(go.Surface(x=x, y=y, z=z, customdata=acc, hovertemplate=hover, colorscale="Viridis",
                                   showscale=False))
    surface.update_layout(title=f"{label} (3-D surface)", height=650, width=760,
                          scene=dict(xaxis_title="x", yaxis_title="y", zaxis_title=label))
    return contour, surface


def write_surface_html(result: SurfaceResult, path: str | os.PathLike, *, log: bool = False,
                       zmax: float | None = None, split: str = "train",
                       title: str = "kdprobe loss surface") -> None:
    """Contour map (SVG, drawn everywhere) and, as a separate figure below it, the 3-D surface (WebGL)."""
    contour, surface = surface_figures(result, log=log, zmax=zmax, split=split, title=title)
    atomic_write_text(path, page(title, figure_div(contour) + webgl_figure_div(surface, "kd-surface-3d")))


def line_figure(result: LineResult, *, log: bool = False, zmax: float | None = None, split: str = "train",
                title: str = "kdprobe interpolation path"):
    """The plotly figure of a path's HTML page: loss (left axis) and accuracy (right axis) along t."""
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
    return fig


def write_line_html(result: LineResult, path: str | os.PathLike, *, log: bool = False,
                    zmax: float | None = None, split: str = "train",
                    title: str = "kdprobe interpolation path") -> None:
    """Loss (left axis) and accuracy (right axis) along t; t=0 is A, t=1 is B."""
    _save(line_figure(result, log=log, zmax=zmax, split=split, title=title), path)
