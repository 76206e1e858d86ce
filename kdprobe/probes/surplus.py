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
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

from kdprobe.errors import KdprobeError
from kdprobe.files.io import read_text
from kdprobe.stats import summarize

KEY_COLUMNS = ("model", "setting", "train_type")
VALUE_COLUMNS = ("unpruned", "finetuned", "post_distill", "pre_post", "self_distill")
COLUMNS = KEY_COLUMNS + VALUE_COLUMNS
SCRATCH = "scratch"


@dataclass(frozen=True)
class ResultRow:
    """One run of the results table; values are accuracies as fractions (0-1, docs/units.md) or None where
    blank."""

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
    from_percent: bool = False  # the file held percents (0-100); values here are /100


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


# a plain decimal number: ASCII digits, optional sign, fraction and exponent. Python's float()
# also takes "7_1", "inf", "nan", " ٧ " (other scripts' digits): none of those is an accuracy.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _cell(text: str, column: str, where: str) -> float | None:
    t = (text or "").strip()
    if not t:
        return None
    if not _NUMBER.fullmatch(t):
        raise KdprobeError(f"{where}: expected a number (an accuracy, 0-1 or %) in column {column!r}, got {t!r}; "
                           "write plain digits like 0.7123 or 71.23, or leave the cell blank if it was not measured")
    v = float(t)
    if not 0.0 <= v <= 100.0:
        raise KdprobeError(f"{where}: expected an accuracy between 0 and 1 (or 0 and 100 in percent) in column "
                           f"{column!r}, got {t}; "
                           "fix the value")
    return v


def _csv_rows(path: Path):
    """(line number, fields) of every non-blank, non-comment line; CSV errors become one line."""
    # comment lines are blanked before parsing, so a quote inside a comment cannot open a field
    text = "".join("\n" if ln.lstrip().startswith("#") else ln
                   for ln in read_text(path, "CSV file").splitlines(keepends=True))
    reader = csv.reader(io.StringIO(text, newline=""))
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            why = str(e)
            if "field limit" in why:
                why = f"a field longer than {csv.field_size_limit():,} characters"
            raise KdprobeError(f"{path}:{reader.line_num}: expected a results table, got {why}; "
                               "check that this is the right file") from None
        if any(c.strip() for c in cells):
            yield reader.line_num, cells


def _header(path: Path, rows) -> tuple[int, dict[str, int]]:
    first = next(rows, None)
    if first is None:
        raise KdprobeError(f"{path}:1: expected a header line {','.join(COLUMNS)}, got an empty file")
    line, header = first[0], [h.strip().lower() for h in first[1]]
    seen: dict[str, int] = {}
    for i, h in enumerate(header):
        if h and h in seen:
            raise KdprobeError(f"{path}:{line}: expected each column once, got {h!r} as fields {seen[h] + 1} and "
                               f"{i + 1}; remove one of them")
        seen.setdefault(h, i)
    missing = [c for c in COLUMNS if c not in seen]
    if missing:
        raise KdprobeError(f"{path}:{line}: expected columns {','.join(COLUMNS)}, "
                           f"missing {', '.join(missing)}; fix the header line")
    return len(header), seen


def _unit(path: Path, values: list[tuple[float, int, str]]) -> bool:
    """True when the file holds percents (a value above 1): they are then divided by 100. A file mixing
    fractions and percents is refused, naming one value of each kind."""
    percent = next(((v, ln, c) for v, ln, c in values if v > 1.0), None)
    fraction = next(((v, ln, c) for v, ln, c in values if 0.0 < v < 1.0), None)
    if percent and fraction:
        (vf, lf, cf), (vp, lp, cp) = fraction, percent
        raise KdprobeError(f"{path}:{lf}: expected accuracies in one unit, got {cf}={vf:g} here (a fraction?) but "
                           f"{cp}={vp:g} on line {lp} (a percent); write every accuracy as a fraction (0-1)")
    return percent is not None


def read_results_csv(path: str | Path) -> list[ResultRow]:
    """Parse and check a results table; any problem is a KdprobeError naming file and line.

    UTF-8 (a byte-order mark is fine); lines starting with # are comments. Values are accuracies
    as fractions (0-1, what kdprobe writes), plain decimal numbers; a file in percent (some value
    above 1) is converted to fractions (ResultRow.from_percent says so); a file that mixes the
    two is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise KdprobeError(f"expected a results CSV file, got {path} (not a file); check the path")
    rows = _csv_rows(path)
    width, pos = _header(path, rows)
    parsed: list[tuple[int, list[str], dict]] = []
    for line, cells in rows:
        where = f"{path}:{line}"
        if len(cells) < width:
            raise KdprobeError(f"{where}: expected {width} comma-separated fields, got {len(cells)}; "
                               "keep blank cells as empty fields (,,)")
        key = [cells[pos[c]].strip() for c in KEY_COLUMNS]
        if not all(key):
            raise KdprobeError(f"{where}: expected model, setting and train_type to be filled, got {key}")
        vals = {c: _cell(cells[pos[c]], c, where) for c in VALUE_COLUMNS}
        key[2] = key[2].lower()
        if key[2] == SCRATCH:
            extra = [c for c in ("post_distill", "pre_post", "self_distill") if vals[c] is not None]
            if extra:
                raise KdprobeError(f"{where}: expected a scratch row to fill only unpruned and finetuned, "
                                   f"got values in {', '.join(extra)}; those belong to a KD row")
        parsed.append((line, key, vals))
    percent = _unit(path, [(v, ln, c) for ln, _, vals in parsed for c, v in vals.items() if v is not None])
    out = []
    for line, key, vals in parsed:
        if percent:
            vals = {c: None if v is None else v / 100.0 for c, v in vals.items()}
        out.append(ResultRow(*key, **vals, line=line, source=str(path), from_percent=percent))
    scratch = {(r.model, r.setting) for r in out if r.train_type == SCRATCH}
    for r in out:
        if r.train_type != SCRATCH and (r.model, r.setting) not in scratch:
            raise KdprobeError(f"{r.source}:{r.line}: expected a scratch row for model {r.model!r} and setting "
                               f"{r.setting!r} (the baseline of this {r.train_type} row), got none; add it")
    return out


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
