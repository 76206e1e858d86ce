"""Write surplus rows (kdprobe.probes.surplus.SurplusRow) as CSV or JSON; no computation here."""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Sequence

from kdprobe.files.io import atomic_write_text
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


def write_surplus_json(rows: Sequence, path: str | Path) -> None:
    """{"formula", "spread", "rows": [...]}; undefined values are null."""
    doc = {"format": "kdprobe-surplus", "version": 1, "formula": FORMULA, "spread": SPREAD,
           "rows": [{k: _plain(v) for k, v in asdict(r).items()} for r in rows]}
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
