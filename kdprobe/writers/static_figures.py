"""Static figures (PDF, SVG, PNG) of every plotly figure kdprobe draws, rendered with matplotlib.

Why matplotlib (docs/figures.md): plotly's own static export (kaleido) drives a headless Chrome, which a
cluster node or a CI container seldom has and cannot download offline; matplotlib draws PDF, SVG and PNG
from Python alone. The static figure is made from the very plotly figure the HTML page shows
(`render(fig, path)`): the same traces, colours, axis titles, ranges and clipped error bars, so a table,
its HTML figure and its PDF can never disagree. What plotly shows on hover is left out; the figure's title
becomes the caption, printed under the plot (with a number in a study's figures/) and returned.

Supported: go.Scatter (lines, markers, error bars, per-point colours), go.Bar, go.Heatmap, go.Contour
(its levels as plotly draws them) and go.Surface (3-D) on make_subplots grids and overlaid second y axes.
Output is reproducible: no creation date in PDF or SVG files.
"""
from __future__ import annotations

import html
import os
import re
import textwrap
from pathlib import Path

import numpy as np

from kdprobe.errors import KdprobeError

FORMATS = ("pdf", "svg", "png")
DPI = 200  # PNG resolution (the PDF and SVG are vector files)
FONT_SIZE = 8
# plotly's default colour sequence (traces without a colour of their own take them in order, as in plotly)
PLOTLY_COLORS = ("#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A", "#19d3f3", "#FF6692", "#B6E880",
                 "#FF97FF", "#FECB52")
_DASH = {"dash": "--", "dot": ":", "dashdot": "-.", "longdash": (0, (8, 3)), "solid": "-", None: "-"}
_SYMBOL = {"diamond": "D", "circle": "o", "square": "s", "x": "x", "cross": "P", "triangle-up": "^"}


def parse_formats(text: str | None, option: str = "--figures") -> tuple[str, ...]:
    """'pdf,png' -> ('pdf', 'png'); None or '' -> (); anything else is a one-line error."""
    if not text:
        return ()
    got = [t.strip().lower().lstrip(".") for t in str(text).split(",") if t.strip()]
    bad = [t for t in got if t not in FORMATS]
    if bad or not got:
        raise KdprobeError(f"expected {option} as a comma-separated list of {', '.join(FORMATS)} (e.g. pdf,png), "
                           f"got {text!r}")
    return tuple(dict.fromkeys(got))


def plain(text) -> str:
    """Plotly's HTML-ish text as plain text: <br> -> newline, other tags dropped, entities decoded."""
    if text is None:
        return ""
    t = re.sub(r"<br\s*/?>", "\n", str(text))
    t = re.sub(r"<[^>]+>", "", t)
    return html.unescape(t).strip()


def caption_of(fig) -> str:
    """The figure's title (and its <sup> subtitle) as one caption sentence."""
    title = fig.layout.title.text if fig.layout.title else None
    lines = [ln.strip() for ln in plain(title).splitlines() if ln.strip()]
    return ". ".join(ln.rstrip(".") for ln in lines) + ("." if lines else "")


def _color(c):
    """A plotly colour (hex, rgb(), rgba(), a name) as something matplotlib takes; None stays None."""
    if c is None or isinstance(c, (list, tuple, np.ndarray)):
        return c
    m = re.fullmatch(r"rgba?\(([^)]*)\)", str(c).replace(" ", ""))
    if m:
        v = [float(x) for x in m.group(1).split(",")]
        return tuple([x / 255 for x in v[:3]] + ([v[3]] if len(v) > 3 else []))
    return c


def _cmap(scale):
    """A plotly colorscale (a name or [[pos, colour], ...]) as a matplotlib colormap."""
    from matplotlib import colormaps
    from matplotlib.colors import LinearSegmentedColormap

    if scale is None:
        return colormaps["viridis"]
    if isinstance(scale, str):
        name = scale.lower()
        return colormaps[name] if name in colormaps else colormaps["viridis"]
    stops = [(float(p), _color(c)) for p, c in scale]
    return LinearSegmentedColormap.from_list("plotly", stops)


def _nums(v) -> np.ndarray:
    if v is None:
        return np.array([])
    return np.array([np.nan if x is None else x for x in np.asarray(v, dtype=object).ravel()], dtype=float).reshape(
        np.shape(v))


def _is_numeric(v) -> bool:
    try:
        _nums(v)
        return True
    except (TypeError, ValueError):
        return False


class _Cell:
    """One plotly subplot: its x axis name ('x', 'x2', ...), y axis, domains, and the matplotlib axes."""

    def __init__(self, xname, yname, xdom, ydom, scene=None):
        self.xname, self.yname, self.xdom, self.ydom, self.scene = xname, yname, xdom, ydom, scene
        self.ax = None
        self.used = False


def _axis_key(name: str, letter: str) -> str:
    """'x2' -> 'xaxis2'; 'x' -> 'xaxis'."""
    return f"{letter}axis{name[1:]}"


def _cells(fig) -> list[_Cell]:
    lay = fig.layout
    cells = []
    for key in sorted(k for k in lay.to_plotly_json() if re.fullmatch(r"xaxis\d*", k)):
        xa = lay[key]
        name = "x" + key[5:]
        yname = xa.anchor if xa.anchor and xa.anchor != "free" else "y" + key[5:]
        ya = lay[_axis_key(yname, "y")] if _axis_key(yname, "y") in lay.to_plotly_json() else None
        if ya is not None and ya.overlaying:  # a second y axis over another: not a cell of its own
            continue
        xdom = tuple(xa.domain) if xa.domain else (0.0, 1.0)
        ydom = tuple(ya.domain) if ya is not None and ya.domain else (0.0, 1.0)
        cells.append(_Cell(name, yname, xdom, ydom))
    for key in sorted(k for k in lay.to_plotly_json() if re.fullmatch(r"scene\d*", k)):
        sc = lay[key]
        dom = sc.domain
        cells.append(_Cell(None, None, tuple(dom.x or (0, 1)), tuple(dom.y or (0, 1)), scene=key))
    if not cells and any(t.type in ("scatter", "bar", "heatmap", "contour") for t in fig.data):
        cells.append(_Cell("x", "y", (0.0, 1.0), (0.0, 1.0)))
    return cells


def _grid(cells: list[_Cell]) -> tuple[int, int, dict]:
    """Rows and columns of the subplot grid from the domains, and each cell's (row, col)."""
    def groups(values):
        out = []
        for v in sorted(values):
            if not out or abs(v - out[-1]) > 0.02:
                out.append(v)
        return out

    cols = groups(c.xdom[0] for c in cells)
    rows = groups((-c.ydom[1] for c in cells))  # top row first
    where = {}
    for c in cells:
        col = min(range(len(cols)), key=lambda i: abs(cols[i] - c.xdom[0]))
        row = min(range(len(rows)), key=lambda i: abs(rows[i] + c.ydom[1]))
        where[id(c)] = (row, col)
    return len(rows), len(cols), where


def _apply_axis(ax, spec, which: str) -> None:
    """Title, type, range, ticks and direction of one plotly axis on a matplotlib axes."""
    if spec is None:
        return
    set_label = ax.set_xlabel if which == "x" else ax.set_ylabel
    title = plain(spec.title.text) if spec.title and spec.title.text else ""
    if title:
        set_label(title)
    if spec.type == "log":
        (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    rng = spec.range
    if rng is not None and all(r is not None for r in rng):
        lo, hi = (10 ** float(r) for r in rng) if spec.type == "log" else (float(r) for r in rng)
        (ax.set_xlim if which == "x" else ax.set_ylim)(lo, hi)
    if spec.tickmode == "array" and spec.tickvals is not None:
        vals = list(spec.tickvals)
        texts = [plain(t) for t in spec.ticktext] if spec.ticktext is not None else None
        long = which == "x" and texts and len(texts) > 2 and max(len(t) for t in texts) > 10
        if long:  # long category names side by side overlap: slanted, one word per line
            texts = [t.replace(" ", "\n", 1) for t in texts]
            ax.set_xticks(vals, texts, rotation=30, ha="right", rotation_mode="anchor", fontsize=FONT_SIZE - 1.5)
        else:
            (ax.set_xticks if which == "x" else ax.set_yticks)(vals, texts)
    elif spec.dtick is not None and spec.type != "log":
        from matplotlib.ticker import MultipleLocator

        (ax.xaxis if which == "x" else ax.yaxis).set_major_locator(MultipleLocator(float(spec.dtick)))
    if spec.autorange == "reversed":
        (ax.invert_xaxis if which == "x" else ax.invert_yaxis)()


class _Legend:
    def __init__(self):
        self.handles, self.labels = [], []

    def add(self, handle, trace):
        name = plain(trace.name) if trace.name else ""
        if not name or trace.showlegend is False or name in self.labels:
            return
        self.handles.append(handle)
        self.labels.append(name)


def _scatter(ax, t, color, legend: _Legend) -> None:
    x = t.x if t.x is not None else list(range(len(t.y or ())))
    cats = not _is_numeric(x)
    xs = np.arange(len(x)) if cats else _nums(x)
    ys = _nums(t.y)
    if cats:
        ax.set_xticks(xs, [str(v) for v in x])
    mode = t.mode or "lines+markers"
    alpha = t.opacity if t.opacity is not None else None
    line_color = _color(t.line.color) if t.line and t.line.color else color
    handle = None
    if "lines" in mode:
        (handle,) = ax.plot(xs, ys, color=line_color, linestyle=_DASH.get(t.line.dash if t.line else None, "-"),
                            linewidth=(t.line.width or 2) * 0.6 if t.line else 1.2, alpha=alpha, zorder=2)
    if "markers" in mode:
        mk = t.marker
        mcolor = mk.color if mk and mk.color is not None else line_color
        if isinstance(mcolor, (list, tuple, np.ndarray)):
            mcolor = [_color(c) for c in mcolor]
        else:
            mcolor = _color(mcolor)
        size = float(mk.size) if mk and mk.size is not None and not isinstance(mk.size, (list, tuple)) else 6.0
        symbol = _SYMBOL.get(mk.symbol if mk else None, "o")
        malpha = mk.opacity if mk and mk.opacity is not None else alpha
        sc = ax.scatter(xs, ys, s=(size * 0.75) ** 2, c=mcolor if isinstance(mcolor, list) else None,
                        color=None if isinstance(mcolor, list) else mcolor, marker=symbol, alpha=malpha,
                        linewidths=0, zorder=3)
        handle = handle or sc
    err = t.error_y
    if err is not None and err.visible and err.array is not None:
        up = _nums(err.array)
        down = _nums(err.arrayminus) if err.symmetric is False and err.arrayminus is not None else up
        ecolor = _color(err.color) if err.color else (mcolor if "markers" in mode and not isinstance(mcolor, list)
                                                      else line_color)
        ax.errorbar(xs, ys, yerr=np.vstack([np.nan_to_num(down), np.nan_to_num(up)]), fmt="none", ecolor=ecolor,
                    elinewidth=1.0, capsize=3, zorder=2.5)
    if handle is not None:
        legend.add(handle, t)


def _bars(ax, traces, colors, legend: _Legend) -> None:
    cats = list(dict.fromkeys(str(v) for t in traces for v in (t.x or ())))
    n = len(traces)
    width = 0.8 / max(n, 1)
    for k, (t, color) in enumerate(zip(traces, colors)):
        pos = np.array([cats.index(str(v)) for v in t.x]) - 0.4 + width * (k + 0.5)
        ys = _nums(t.y)
        bar_color = _color(t.marker.color) if t.marker and isinstance(t.marker.color, str) else color
        yerr = None
        if t.error_y is not None and t.error_y.visible and t.error_y.array is not None:
            yerr = np.nan_to_num(_nums(t.error_y.array))
        h = ax.bar(pos, np.nan_to_num(ys), width=width, color=bar_color, yerr=yerr, capsize=3)
        legend.add(h, t)
    ax.set_xticks(range(len(cats)), cats, rotation=20 if max((len(c) for c in cats), default=0) > 12 else 0,
                  ha="right" if max((len(c) for c in cats), default=0) > 12 else "center")


def _colorbar(fig, mappable, ax, t) -> None:
    if t.showscale is False:
        return
    cb = fig.colorbar(mappable, ax=ax, shrink=0.9)
    title = t.colorbar.title.text if t.colorbar and t.colorbar.title else None
    if title:
        cb.set_label(plain(title))


def _heatmap(fig, ax, t) -> None:
    z = _nums(t.z)
    xs, ys = list(t.x) if t.x is not None else list(range(z.shape[1])), list(t.y) if t.y is not None else list(
        range(z.shape[0]))
    im = ax.imshow(z, aspect="auto", cmap=_cmap(t.colorscale), vmin=t.zmin, vmax=t.zmax, origin="lower",
                   interpolation="nearest")
    if not _is_numeric(xs):
        ax.set_xticks(range(len(xs)), [str(v) for v in xs], rotation=90, fontsize=FONT_SIZE - 2)
    if not _is_numeric(ys):
        ax.set_yticks(range(len(ys)), [str(v) for v in ys], fontsize=FONT_SIZE - 2)
    _colorbar(fig, im, ax, t)


def contour_levels(t) -> np.ndarray | None:
    """The levels plotly draws for a go.Contour: contours.start/end/size when given, else None (automatic)."""
    c = t.contours
    if c is not None and c.start is not None and c.end is not None and c.size:
        n = int(np.floor((float(c.end) - float(c.start)) / float(c.size) + 1e-9))  # levels up to end, as plotly
        return float(c.start) + float(c.size) * np.arange(n + 1)
    return None


def _contour(fig, ax, t, shared: dict) -> None:
    z = np.ma.masked_invalid(_nums(t.z))
    x, y = _nums(t.x), _nums(t.y)
    levels = contour_levels(t)
    if levels is None:
        lo, hi = (t.zmin, t.zmax) if t.zmin is not None and t.zmax is not None else (z.min(), z.max())
        levels = np.linspace(float(lo), float(hi), int(t.ncontours or 15) + 1)
    cmap = _cmap(t.colorscale)
    vmin = t.zmin if t.zmin is not None else levels[0]
    vmax = t.zmax if t.zmax is not None else levels[-1]
    cs = ax.contourf(x, y, z, levels=levels, cmap=cmap, vmin=vmin, vmax=vmax, extend="both")
    ax.contour(x, y, z, levels=levels, colors="k", linewidths=0.25, alpha=0.5)
    shared.setdefault("contour", (cs, t))
    if t.showscale is not False:
        shared["scale"] = (cs, t)


def _surface(ax, t, scene) -> None:
    z = np.ma.masked_invalid(_nums(t.z))
    x, y = _nums(t.x), _nums(t.y)
    X, Y = np.meshgrid(x, y)
    vmin = t.cmin if t.cmin is not None else float(z.min())
    vmax = t.cmax if t.cmax is not None else float(z.max())
    ax.plot_surface(X, Y, z.filled(np.nan), cmap=_cmap(t.colorscale), vmin=vmin, vmax=vmax, linewidth=0,
                    antialiased=True, rstride=1, cstride=1)
    for name, axis in (("x", scene.xaxis), ("y", scene.yaxis), ("z", scene.zaxis)):
        title = plain(axis.title.text) if axis is not None and axis.title and axis.title.text else ""
        getattr(ax, f"set_{name}label")(title, labelpad=2)
        if axis is not None and axis.range is not None and all(r is not None for r in axis.range):
            getattr(ax, f"set_{name}lim")(*axis.range)
    ax.tick_params(labelsize=FONT_SIZE - 2, pad=0)
    ax.view_init(elev=30, azim=-60)
    ax.set_box_aspect((1, 1, 0.7), zoom=0.85)  # zoomed out a little: the corners and labels stay in the frame


def _subplot_titles(fig, cells: list[_Cell]) -> list[str]:
    """Assign make_subplots' title annotations to their cells; return the other annotations' text."""
    rest = []
    for a in fig.layout.annotations or ():
        if a.xref == "paper" and a.yref == "paper" and a.x is not None and a.y is not None and a.text:
            hit = next((c for c in cells if abs((c.xdom[0] + c.xdom[1]) / 2 - a.x) < 0.03
                        and abs(c.ydom[1] - a.y) < 0.03), None)
            if hit is not None:
                hit.title = plain(a.text)
                continue
        if a.text:
            rest.append(plain(a.text))
    return rest


def draw(fig, *, caption: str | None = None, colors: dict | None = None, width: float | None = None):
    """A matplotlib Figure drawn from a plotly figure (see the module doc), and the caption text used.
    caption: the caption (default: the plotly title); width: inches (default 3.4 per subplot column, at most
    7.2: a two-column paper page)."""
    import matplotlib
    from matplotlib.figure import Figure

    import mpl_toolkits.mplot3d  # noqa: F401 - registers the 3-D projection

    cells = _cells(fig)
    nrows, ncols, where = _grid(cells) if cells else (1, 1, {})
    width = width or min(7.2, 3.4 * ncols + 0.6)
    any3d = any(c.scene for c in cells)
    height = 2.6 * nrows + (0.6 if any3d else 0.0)
    notes = _subplot_titles(fig, cells)
    text = caption if caption is not None else caption_of(fig)
    if notes:
        text = (text + " " + " ".join(n.replace("\n", " ") for n in notes)).strip()
    wrapped = "\n".join(textwrap.wrap(text, width=int(width * 17))) if text else ""
    cap_h = 0.135 * (wrapped.count("\n") + 1) + 0.1 if wrapped else 0.0
    out = Figure(figsize=(width, height + cap_h), layout="constrained")
    with matplotlib.rc_context({"font.size": FONT_SIZE, "axes.titlesize": FONT_SIZE + 1,
                                "axes.labelsize": FONT_SIZE, "legend.fontsize": FONT_SIZE - 1}):
        gs = out.add_gridspec(nrows, ncols)
        for c in cells:
            r, k = where.get(id(c), (0, 0))
            c.ax = out.add_subplot(gs[r, k], projection="3d" if c.scene else None)
        by_x = {c.xname: c for c in cells if c.xname}
        by_scene = {c.scene: c for c in cells if c.scene}
        legend, shared, twins = _Legend(), {}, {}
        auto = iter(PLOTLY_COLORS * 100)
        colors = colors or {}
        bars: dict[str, list] = {}
        for t in fig.data:
            own = None
            if t.type in ("scatter", "bar"):
                own = (t.line.color if t.type == "scatter" and t.line and t.line.color else None) or (
                    t.marker.color if t.marker and isinstance(t.marker.color, str) else None)
                own = own or colors.get(plain(t.legendgroup or t.name or ""))
            color = _color(own) if own else next(auto)
            if t.type == "surface":
                cell = by_scene.get(t.scene or "scene")
                if cell is not None:
                    _surface(cell.ax, t, fig.layout[cell.scene])
                    cell.used = True
                continue
            cell = by_x.get(t.xaxis or "x")
            if cell is None:
                continue
            cell.used = True
            ax = cell.ax
            yname = t.yaxis or "y"
            if yname != cell.yname:  # an overlaid second y axis
                if yname not in twins:
                    twins[yname] = ax.twinx()
                    _apply_axis(twins[yname], fig.layout[_axis_key(yname, "y")], "y")
                ax = twins[yname]
            if t.type == "scatter":
                _scatter(ax, t, color, legend)
            elif t.type == "bar":
                bars.setdefault(cell.xname, []).append((t, color))
            elif t.type == "heatmap":
                _heatmap(out, ax, t)
            elif t.type == "contour":
                _contour(out, ax, t, shared.setdefault(cell.xname, {}))
        for xname, items in bars.items():
            _bars(by_x[xname].ax, [t for t, _ in items], [c for _, c in items], legend)
        contour_axes = [by_x[x].ax for x, s in shared.items() if s]
        scale = next((s["scale"] for s in shared.values() if "scale" in s), None)
        if scale is not None:
            cs, t = scale
            _colorbar(out, cs, contour_axes, t)
        for c in cells:
            if not c.used:
                c.ax.set_visible(False)
                continue
            if c.scene is None:
                _apply_axis(c.ax, fig.layout[_axis_key(c.xname, "x")], "x")
                _apply_axis(c.ax, fig.layout[_axis_key(c.yname, "y")], "y")
                ya = fig.layout[_axis_key(c.yname, "y")]
                if ya.scaleanchor:
                    c.ax.set_aspect("equal", adjustable="box")
                c.ax.grid(True, linewidth=0.3, alpha=0.5)
            if getattr(c, "title", None):
                c.ax.set_title(c.title.replace("\n", " "))
        if legend.labels:  # as many columns as fit the width (about 16 characters of legend text per inch)
            ncols = len(legend.labels)
            while ncols > 1 and max(map(len, legend.labels)) * ncols + 5 * ncols > width * 16:
                ncols -= 1
            out.legend(legend.handles, legend.labels, loc="outside upper center", ncols=ncols, frameon=False)
        if wrapped:
            out.get_layout_engine().set(rect=(0, cap_h / (height + cap_h), 1, 1 - cap_h / (height + cap_h)))
            out.text(0.01, 0.01, wrapped, ha="left", va="bottom", fontsize=FONT_SIZE - 0.5)
    return out, text


def render(fig, path: str | os.PathLike, *, caption: str | None = None, colors: dict | None = None,
           width: float | None = None) -> Path:
    """Write the plotly figure `fig` as a static file, the kind by the path's suffix (.pdf, .svg, .png), atomically.
    Returns the path."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from kdprobe.files.io import atomic_path

    path = Path(path)
    kind = path.suffix.lower().lstrip(".")
    if kind not in FORMATS:
        raise KdprobeError(f"expected a figure path ending in {', '.join('.' + f for f in FORMATS)}, got {path.name!r}")
    drawn, _ = draw(fig, caption=caption, colors=colors, width=width)
    FigureCanvasAgg(drawn)
    metadata = {"pdf": {"CreationDate": None}, "svg": {"Date": None}, "png": {}}[kind]
    # TrueType fonts in PDF (journals refuse Type 3); SVG text as paths (looks the same without the font)
    with matplotlib.rc_context({"pdf.fonttype": 42}), atomic_path(path) as tmp, open(tmp, "wb") as f:
        drawn.savefig(f, format=kind, dpi=DPI, metadata=metadata)
    return path


def render_all(fig, stem: str | os.PathLike, formats, **kw) -> list[Path]:
    """render() once per format: STEM.pdf, STEM.png, ...; returns the paths written."""
    stem = Path(stem)
    return [render(fig, stem.with_name(f"{stem.name}.{fmt}"), **kw) for fmt in formats]
