"""Static figures (kdprobe.writers.static_figures, issue 20 item 2): parsed formats, files that are what their
suffix says and reproducible, whiskers clipped as the tables clip them, plot_2D's contour levels, and the
output rule (a figure never replaces another kind of file)."""
from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import pytest
from plotly.subplots import make_subplots

from kdprobe.errors import KdprobeError
from kdprobe.writers.static_figures import caption_of, contour_levels, draw, parse_formats, render


def test_formats_are_parsed_or_refused():
    assert parse_formats("pdf, PNG,.svg,pdf") == ("pdf", "png", "svg") and parse_formats(None) == ()
    for bad in ("jpg", "pdf;png", ","):
        with pytest.raises(KdprobeError, match="pdf, svg, png"):
            parse_formats(bad)


def _figure():
    fig = make_subplots(rows=1, cols=2, subplot_titles=["left panel", "right panel"])
    fig.add_trace(go.Scatter(x=[1, 2, 3], y=[0.2, 0.5, 0.4], name="scratch", line=dict(color="#0072B2")), 1, 1)
    fig.add_trace(go.Bar(x=["a", "b"], y=[1.0, 2.0], name="kd"), 1, 2)
    fig.update_yaxes(title_text="accuracy (fraction)", row=1, col=1)
    fig.update_layout(title="A test figure<br><sup>with a subtitle</sup>")
    return fig


def test_pdf_svg_png_are_written_reproducibly_with_titles_legend_and_caption(tmp_path):
    fig = _figure()
    heads = {"pdf": b"%PDF-", "png": b"\x89PNG\r\n\x1a\n", "svg": b"<?xml"}
    for fmt, head in heads.items():
        assert render(fig, tmp_path / f"f.{fmt}").read_bytes().startswith(head)
    again = render(fig, tmp_path / "g.pdf").read_bytes()
    assert again == (tmp_path / "f.pdf").read_bytes()  # no creation date: same figure, same bytes
    drawn, caption = draw(fig)
    assert caption == caption_of(fig) == "A test figure. with a subtitle."
    axes = [a for a in drawn.axes if a.get_visible()]
    assert [a.get_title() for a in axes[:2]] == ["left panel", "right panel"]
    assert axes[0].get_ylabel() == "accuracy (fraction)"
    assert [t.get_text() for t in drawn.legends[0].get_texts()] == ["scratch", "kd"]
    assert any(caption in t.get_text().replace("\n", " ") for t in drawn.texts)
    with pytest.raises(KdprobeError, match="ending in .pdf, .svg, .png"):
        render(fig, tmp_path / "f.jpg")


def test_probe_whiskers_are_clipped_as_the_tables_clip_them():
    from kdprobe.writers.probe_plots import _strip

    fig = make_subplots(rows=1, cols=1)
    # a disagreement of 0.001 with a raw interval [-0.0025, 0.004]: the table prints [0.0000*, 0.0040]
    _strip(fig, 1, 1, ["within scratch"], [("within scratch", 0.001, "a<br>b")],
           {"within scratch": (0.001, -0.0025, 0.004)}, "disagreement", metric="disagreement")
    bar = fig.data[1].error_y
    assert list(bar.arrayminus) == [pytest.approx(0.001)] and list(bar.array) == [pytest.approx(0.003)]
    assert fig.data[1].y[0] - bar.arrayminus[0] >= 0.0  # the whisker stops at 0
    assert fig.layout.yaxis.title.text == "disagreement (fraction of samples)"


def test_contour_levels_follow_plot_2d():
    from kdprobe.writers.landscape_plot import contour_trace, display_levels

    loss = np.array([[0.05, 0.5, 5.0], [2.0, 40.0, 107.0]])
    lv = display_levels(loss)  # the reference: 0.1 to 10 every 0.5, the plateau above 10 in one colour
    assert (lv["start"], lv["end"], lv["size"], lv["clipped"]) == (0.1, 10.0, 0.5, True)
    narrow = display_levels(np.array([0.3, 0.4, 1.3]))  # no clipping, 20 levels over the range
    assert (narrow["start"], narrow["end"], narrow["clipped"]) == (0.3, 1.3, False)
    assert narrow["size"] == pytest.approx(0.05)
    log = display_levels(loss, log=True)
    assert (log["start"], log["end"]) == (pytest.approx(math.log(0.1)), pytest.approx(math.log(10.0)))
    assert display_levels(loss, zmax=50.0)["end"] == 50.0  # --zmax moves the top level
    t = contour_trace([0, 1, 2], [0, 1], loss, np.zeros_like(loss), lv, "loss (nats)")
    assert (t.zmin, t.zmax) == (0.1, 10.0)
    levels = contour_levels(t)  # what the static figure draws: plotly's own levels
    # np.arange(0.1, 10, 0.5) as plot_2D: 0.1, 0.6, ..., 9.6
    assert np.allclose(levels, np.arange(0.1, 10.0, 0.5))


def test_a_figure_never_replaces_another_kind_of_file(tmp_path):
    from kdprobe.api.results import save_figure
    from kdprobe.files.outputs import sniff

    table = tmp_path / "x.pdf"
    table.write_text("a,b\n1,2\n")
    with pytest.raises(KdprobeError, match="holds a CSV table"):
        save_figure(_figure(), table, "test")
    out = save_figure(_figure(), tmp_path / "y.png", "test")
    assert sniff(out) == "png" and sniff(render(_figure(), tmp_path / "y.svg")) == "svg"
    assert save_figure(_figure(), out, "test") == out  # a PNG may replace a PNG
