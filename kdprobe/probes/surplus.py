"""Surplus: how much more KD gains on a pruned-and-fine-tuned network than on the unpruned one.

    surplus = (SelfDistill - Finetuned_scratch) - (Unpruned_KD - Unpruned_scratch)
            =  gain_pruned                       -  gain_unpruned

(REFERENCE.md "Surplus"; zero means the two gains just add up). Input is a results table,
one row per trained run (seed):

    model,setting,train_type,unpruned,finetuned,post_distill,pre_post,self_distill

`train_type` is `scratch` or a KD type (`label`, `feature`, ...). A scratch row fills
`unpruned` and `finetuned` only; a KD row may fill all five, its `finetuned` being the
Pre-Distill result (KD in the initial training only). Blank cells mean "not measured".
Rows with the same (model, setting, train_type) are repeated runs: each column is averaged
with its spread from `kdprobe.stats.summarize`. The surplus' standard error treats the four
means as independent: se = sqrt(se_us^2 + se_fs^2 + se_uk^2 + se_sd^2), se = std/sqrt(n);
it is undefined (None) when any of the four has fewer than 2 runs. Runs that share a seed
are positively correlated, so this is a conservative (too wide) estimate.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from kdprobe.errors import KdprobeError
from kdprobe.stats import summarize

KEY_COLUMNS = ("model", "setting", "train_type")
VALUE_COLUMNS = ("unpruned", "finetuned", "post_distill", "pre_post", "self_distill")
COLUMNS = KEY_COLUMNS + VALUE_COLUMNS
SCRATCH = "scratch"


@dataclass(frozen=True)
class ResultRow:
    """One run of the results table; values are accuracies (%) or None where blank."""

    model: str
    setting: str
    train_type: str
    unpruned: float | None
    finetuned: float | None
    post_distill: float | None
    pre_post: float | None
    self_distill: float | None
    line: int  # 1-based line number in the source file (error messages)
    source: str = ""


@dataclass(frozen=True)
class SurplusRow:
    """Surplus of one (model, setting, KD type), with the mean, std and n of its four inputs."""

    model: str
    setting: str
    kd_type: str
    unpruned_scratch_mean: float | None
    unpruned_scratch_std: float | None
    unpruned_scratch_n: int
    finetuned_scratch_mean: float | None
    finetuned_scratch_std: float | None
    finetuned_scratch_n: int
    unpruned_kd_mean: float | None
    unpruned_kd_std: float | None
    unpruned_kd_n: int
    self_distill_mean: float | None
    self_distill_std: float | None
    self_distill_n: int
    gain_unpruned: float | None  # mean(unpruned_kd) - mean(unpruned_scratch)
    gain_pruned: float | None  # mean(self_distill) - mean(finetuned_scratch)
    surplus: float | None  # gain_pruned - gain_unpruned
    surplus_se: float | None  # sqrt of the sum of the four squared standard errors


def _cell(text: str, column: str, where: str) -> float | None:
    t = (text or "").strip()
    if not t:
        return None
    try:
        v = float(t)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise KdprobeError(f"{where}: expected a number (accuracy in %) in column {column!r}, got {t!r}; "
                           "leave the cell blank if it was not measured")
    return v


def read_results_csv(path: str | Path) -> list[ResultRow]:
    """Parse and check a results table; any problem is a KdprobeError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise KdprobeError(f"expected a results CSV file, got {path} (not a file); check the path")
    rows: list[ResultRow] = []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise KdprobeError(f"{path}:1: expected a header line {','.join(COLUMNS)}, got an empty file")
        header = [h.strip().lower() for h in header]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise KdprobeError(f"{path}:{reader.line_num}: expected columns {','.join(COLUMNS)}, "
                               f"missing {', '.join(missing)}; fix the header line")
        pos = {c: header.index(c) for c in COLUMNS}
        for cells in reader:
            line = reader.line_num
            where = f"{path}:{line}"
            if not any(c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
                continue  # blank line or comment
            if len(cells) < len(header):
                raise KdprobeError(f"{where}: expected {len(header)} comma-separated fields, got {len(cells)}; "
                                   "keep blank cells as empty fields (,,)")
            key = [cells[pos[c]].strip() for c in KEY_COLUMNS]
            if not all(key):
                raise KdprobeError(f"{where}: expected model, setting and train_type to be filled, got {key}")
            vals = {c: _cell(cells[pos[c]], c, where) for c in VALUE_COLUMNS}
            train_type = key[2].lower()
            if train_type == SCRATCH:
                extra = [c for c in ("post_distill", "pre_post", "self_distill") if vals[c] is not None]
                if extra:
                    raise KdprobeError(f"{where}: expected a scratch row to fill only unpruned and finetuned, "
                                       f"got values in {', '.join(extra)}; those belong to a KD row")
            rows.append(ResultRow(key[0], key[1], train_type, **vals, line=line, source=str(path)))
    scratch = {(r.model, r.setting) for r in rows if r.train_type == SCRATCH}
    for r in rows:
        if r.train_type != SCRATCH and (r.model, r.setting) not in scratch:
            raise KdprobeError(f"{r.source}:{r.line}: expected a scratch row for model {r.model!r} and setting "
                               f"{r.setting!r} (the baseline of this {r.train_type} row), got none; add it")
    return rows


def _stats(values: list[float]) -> tuple[float | None, float | None, float | None, int]:
    """(mean, std, sem, n) with None where undefined (no values; std/sem for n < 2)."""
    if not values:
        return None, None, None, 0
    s = summarize(values)
    fin = (lambda v: v if math.isfinite(v) else None)
    return s.mean, fin(s.std), fin(s.sem), s.n


def compute_surplus(rows: list[ResultRow]) -> list[SurplusRow]:
    """One SurplusRow per (model, setting, KD type), in order of first appearance."""
    groups: dict[tuple[str, str, str], list[ResultRow]] = {}
    for r in rows:
        groups.setdefault((r.model, r.setting, r.train_type), []).append(r)
    out = []
    for (model, setting, kd), kd_rows in groups.items():
        if kd == SCRATCH:
            continue
        base = groups.get((model, setting, SCRATCH), [])
        col = (lambda rs, c: [getattr(r, c) for r in rs if getattr(r, c) is not None])
        us = _stats(col(base, "unpruned"))
        fs = _stats(col(base, "finetuned"))
        uk = _stats(col(kd_rows, "unpruned"))
        sd = _stats(col(kd_rows, "self_distill"))
        gain_u = None if uk[0] is None or us[0] is None else uk[0] - us[0]
        gain_p = None if sd[0] is None or fs[0] is None else sd[0] - fs[0]
        surplus = None if gain_u is None or gain_p is None else gain_p - gain_u
        sems = [us[2], fs[2], uk[2], sd[2]]
        se = None if surplus is None or any(v is None for v in sems) else math.sqrt(sum(v * v for v in sems))
        out.append(SurplusRow(model, setting, kd, us[0], us[1], us[3], fs[0], fs[1], fs[3],
                              uk[0], uk[1], uk[3], sd[0], sd[1], sd[3], gain_u, gain_p, surplus, se))
    return out
