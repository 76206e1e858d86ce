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
from kdprobe.writers.landscape_vtk import _TINY, height

NO_WEBGL = "3-D view not drawn: this browser has no WebGL. The contour map shows the same surface."


def no_webgl_note(vtk_suffix: str | None = None) -> str:
    """The one-line note a browser without WebGL shows instead of the 3-D view, naming the VTK file written
    (.vtk or .vts), if any."""
    return NO_WEBGL + (f" The {vtk_suffix} file opens in ParaView." if vtk_suffix else "")


#: the reference plot_2D's contour levels (Li et al.'s loss-landscape plot_2D.py: vmin=0.1, vmax=10,
#: vlevel=0.5, in loss units): the basin gets the levels, the high plateau one colour
REFERENCE_VMIN, REFERENCE_VMAX, REFERENCE_VLEVEL = 0.1, 10.0, 0.5


def display_levels(loss, *, log: bool = False, zmax: float | None = None) -> dict:
    """Contour levels and colour range of a surface (or of a figure's surfaces together), as the reference
    plot_2D draws them: from 0.1 (or the lowest loss, if above it) to 10 (zmax when given; the highest loss if
    it stays below) every 0.5 nats, about 20 levels when the range is narrower; with log=True the same range in
    log(loss), 20 equal steps. Returns {start, end, size, vmax_loss, clipped}: the heights (log(loss) with log)
    of the first and last level, the step, the loss drawn in the top colour and above, and whether any point
    lies above it."""
    loss = np.asarray(loss, np.float64)
    finite = loss[np.isfinite(loss)]
    if finite.size == 0:
        finite = np.array([0.0, 1.0])
    lo, hi = float(finite.min()), float(finite.max())
    vmax = float(zmax) if zmax is not None else REFERENCE_VMAX
    top = min(hi, vmax) if hi > lo else lo + 1e-6
    bottom = lo if lo > REFERENCE_VMIN else min(REFERENCE_VMIN, top)
    if top <= bottom:  # the whole plane above 10: no clipping, every level in the data
        bottom, top = lo, hi if hi > lo else lo + 1e-6
    if log:
        start, end = (float(np.log(max(v, _TINY))) for v in (bottom, top))
        size = (end - start) / 20
    else:
        start, end = bottom, top
        size = REFERENCE_VLEVEL if (end - start) / REFERENCE_VLEVEL >= 8 else (end - start) / 20
    return {"start": start, "end": end, "size": size or 1e-6, "vmax_loss": top, "clipped": hi > top}
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


def webgl_figure_div(fig, div_id: str, note: str = NO_WEBGL) -> str:
    """A WebGL figure (3-D surface) as a <div> that is drawn only where WebGL works, else `note`."""
    return _GUARD.format(id=html.escape(div_id, quote=True), note=html.escape(note), fig=fig.to_json(),
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


def height_label(split: str, log: bool, levels: dict) -> str:
    """The colour bar's and z axis's title: what the height is, in which unit, and where it is clipped."""
    what = f"log({split} loss / nats)" if log else f"{split} loss (nats)"
    return what + (f", clipped at loss {levels['vmax_loss']:.3g}" if levels["clipped"] else "")


def contour_trace(x, y, h, acc, levels: dict, label: str, *, showscale: bool = True, name: str = "", log=False):
    """A go.Contour of heights h on the plot_2D levels (display_levels), the colour range clipped to them."""
    import plotly.graph_objects as go

    hover = "x=%{x:.3f}<br>y=%{y:.3f}<br>height=%{z:.4f}<br>acc=%{customdata:.4f}<extra></extra>"
    return go.Contour(x=list(x), y=list(y), z=_nan_to_none(h), customdata=_nan_to_none(acc), hovertemplate=hover,
                      colorscale="Viridis", zauto=False, zmin=levels["start"], zmax=levels["end"], name=name,
                      contours=dict(start=levels["start"], end=levels["end"], size=levels["size"],
                                    showlabels=not log, labelfont=dict(size=9, color="white")),
                      line=dict(width=0.5), showscale=showscale, colorbar=dict(title=dict(text=label, side="right")))


def surface_trace(x, y, h, acc, levels: dict, *, showscale: bool = False, label: str = "", name: str = "",
                  scene: str = "scene"):
    """A go.Surface of heights h clipped at the top level (so the basin keeps its shape), colours as the
    contour's."""
    import plotly.graph_objects as go

    z = np.minimum(np.asarray(h, np.float64), levels["end"])
    hover = "x=%{x:.3f}<br>y=%{y:.3f}<br>height=%{z:.4f}<br>acc=%{customdata:.4f}<extra></extra>"
    return go.Surface(x=list(x), y=list(y), z=_nan_to_none(z), customdata=_nan_to_none(acc), hovertemplate=hover,
                      colorscale="Viridis", cauto=False, cmin=levels["start"], cmax=levels["end"], name=name,
                      showscale=showscale, scene=scene,
                      colorbar=dict(title=dict(text=label, side="right"), len=0.8, x=1.0))


def scene_layout(levels: dict, label: str) -> dict:
    """A 3-D panel's axes: titled x, y and z, the z range of the clipped heights, a camera far enough out
    that the corners and the labels stay inside the frame."""
    return dict(xaxis=dict(title="x (direction 1)", nticks=5), yaxis=dict(title="y (direction 2)", nticks=5),
                zaxis=dict(title=label, nticks=4, range=[levels["start"], levels["end"]]),
                aspectmode="manual", aspectratio=dict(x=1, y=1, z=0.7),
                camera=dict(eye=dict(x=1.55, y=1.55, z=1.0)))


def surface_figures(result: SurfaceResult, *, log: bool = False, zmax: float | None = None, split: str = "train",
                    title: str = "kdprobe loss surface"):
    """(contour, surface): the two plotly figures of a surface's HTML page, the contour map (SVG) and the 3-D
    surface (WebGL); height = loss clipped at zmax, then log with log=True; contour levels and colours as the
    reference plot_2D draws them (display_levels); unevaluated points are gaps."""
    import plotly.graph_objects as go

    h = height(result.loss, log=log, zmax=zmax)
    levels = display_levels(result.loss, log=log, zmax=zmax)
    label = height_label(split, log, levels)
    acc = np.asarray(result.acc, np.float64)
    contour = go.Figure(contour_trace(result.xcoords, result.ycoords, h, acc, levels, label, log=log))
    contour.update_layout(title=f"{title}: contour map", xaxis_title="x (direction 1, filter-normalized)",
                          yaxis=dict(title="y (direction 2, filter-normalized)", scaleanchor="x"), height=650,
                          width=760, template="plotly_white")
    surface = go.Figure(surface_trace(result.xcoords, result.ycoords, h, acc, levels, showscale=True, label=label))
    surface.update_layout(title="3-D surface (heights clipped as the contour map's)", height=650, width=760,
                          scene=scene_layout(levels, label), margin=dict(l=10, r=10, t=60, b=10))
    return contour, surface


def write_surface_html(result: SurfaceResult, path: str | os.PathLike, *, log: bool = False,
                       zmax: float | None = None, split: str = "train",
                       title: str = "kdprobe loss surface", vtk_suffix: str | None = None) -> None:
    """Contour map (SVG, drawn everywhere) and, as a separate figure below it, the 3-D surface (WebGL); without
    WebGL a note names the VTK file written with it (vtk_suffix: '.vtk', '.vts' or None)."""
    contour, surface = surface_figures(result, log=log, zmax=zmax, split=split, title=title)
    atomic_write_text(path, page(title, figure_div(contour)
                                 + webgl_figure_div(surface, "kd-surface-3d", no_webgl_note(vtk_suffix))))


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
                             name=f"{split} accuracy", yaxis="y2", line=dict(dash="dot")))
    fig.update_layout(title=title, xaxis_title="t  (θ = (1 − t)·A + t·B)",
                      yaxis_title=f"log({split} loss / nats)" if log else f"{split} loss (nats)",
                      yaxis2=dict(title="accuracy (fraction correct)", overlaying="y", side="right", range=[0, 1]),
                      height=550, template="plotly_white", legend=dict(orientation="h", y=-0.18))
    return fig


def write_line_html(result: LineResult, path: str | os.PathLike, *, log: bool = False,
                    zmax: float | None = None, split: str = "train",
                    title: str = "kdprobe interpolation path") -> None:
    """Loss (left axis) and accuracy (right axis) along t; t=0 is A, t=1 is B."""
    _save(line_figure(result, log=log, zmax=zmax, split=split, title=title), path)
