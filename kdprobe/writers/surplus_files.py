"""Write surplus rows (kdprobe.probes.surplus.SurplusRow) as CSV, JSON or a figure; no computation here."""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Sequence

from kdprobe.files.io import atomic_path, atomic_write_text
from kdprobe.probes.surplus import SurplusRow

FORMULA = "surplus = (self_distill - finetuned_scratch) - (unpruned_kd - unpruned_scratch)"
SPREAD = "surplus_se = sqrt(sum of the squared standard errors (std/sqrt(n)) of the four means), independent runs assumed"


def _plain(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def write_surplus_csv(rows: Sequence, path: str | Path) -> None:
    """One line per (model, setting, KD type); blank where undefined; floats to 10 significant digits."""
    names = [f.name for f in fields(SurplusRow)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(names)
    for r in rows:
        d = asdict(r)
        w.writerow(["" if _plain(d[n]) is None else format(d[n], ".10g") if isinstance(d[n], float) else d[n]
                    for n in names])
    atomic_write_text(path, buf.getvalue())


def surplus_records(rows: Sequence) -> list[dict]:
    """The rows --csv writes, as records at full precision (the CSV rounds floats to 10 significant digits);
    undefined values are None."""
    return [{k: _plain(v) for k, v in asdict(r).items()} for r in rows]


def surplus_document(rows: Sequence) -> dict:
    """The document --json writes (kdprobe.files.documents.envelope): kind "surplus", kdprobe_version,
    format_version 2 (1 was in percent and had no envelope), units, settings {formula, spread}, data (one record
    per row, accuracies and gains as fractions); undefined values are None."""
    from kdprobe.files.documents import envelope

    return envelope("surplus", {"formula": FORMULA, "spread": SPREAD}, surplus_records(rows), format_version=2)


def write_surplus_json(rows: Sequence, path: str | Path) -> None:
    """surplus_document as JSON; undefined values are null."""
    atomic_write_text(path, json.dumps(surplus_document(rows), indent=2) + "\n")


def surplus_figure(rows: Sequence):
    """Bars of the surplus per (model, setting), one colour per KD type, with ± one standard error; a row
    whose surplus is undefined has no bar."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for kd in dict.fromkeys(r.kd_type for r in rows):  # KD types in table order
        mine = [r for r in rows if r.kd_type == kd]
        fig.add_trace(go.Bar(
            x=[f"{r.model} {r.setting}" for r in mine], y=[_plain(r.surplus) for r in mine], name=kd,
            error_y=dict(type="data", array=[_plain(r.surplus_se) for r in mine], visible=True),
            customdata=[[_plain(r.gain_pruned), _plain(r.gain_unpruned)] for r in mine],
            hovertemplate="surplus %{y:+.4f}<br>gain pruned %{customdata[0]:+.4f}, unpruned %{customdata[1]:+.4f}"
                          "<extra>%{fullData.name}</extra>"))
    fig.update_layout(title=f"KD surplus after pruning<br><sup>{FORMULA}; error bars: ± se</sup>",
                      template="plotly_white", barmode="group", yaxis_title="surplus (fraction of test images)",
                      xaxis_title="model, setting", legend_title="KD type")
    return fig


def write_surplus_html(rows: Sequence, path: str | Path) -> None:
    """The surplus figure as a self-contained offline page (plotly.js inlined)."""
    with atomic_path(path) as tmp:
        surplus_figure(rows).write_html(str(tmp), include_plotlyjs=True, full_html=True)
