"""Compare two study summaries (summary.json) number by number: did a rerun reproduce a result?

Every number and string in the two files is compared at the same place in the tree, except what
is expected to change between runs of one study: wall-clock times (`seconds`, `wall_seconds`),
when it was made (`created`), whether a cell was trained or reused (`action`; a pruning block's
`cells_run`: how many of its cells this invocation made, none when Slurm jobs made them), where things live
on this machine (`source`, `dataset` strings, `versions.platform`), and checkpoint files'
`sha256` (a KD student records its teacher's absolute path as provenance, so the same weights
trained into another folder hash differently; every number computed from the weights is still
compared). Those are listed as notes, never as differences. Numbers are equal when
|a - b| <= atol + rtol * |b|.

The tolerance follows from the machines (kdprobe.runtime.machine: CPU model and instruction sets, ATen
CPU capability, threads, CUDA device; each summary records its own under versions.machine) and
the torch versions. Both the same: rtol = atol = 0, since the same seed on the same machine type
gives the same bits. Different, or not recorded on either side: CROSS_MACHINE_RTOL/ATOL, and the
result says so (float32 kernels of another vector width or thread count add in another order).
Given rtol/atol always win. The machine fields themselves are notes: they choose the tolerance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from kdprobe.errors import KdprobeError
from kdprobe.ranges import parse_json

#: keys whose values change from run to run by design (time, the machine's paths, reuse of cells, file hashes)
VARYING = frozenset({"created", "wall_seconds", "seconds", "action", "cells_run", "source", "dataset", "platform",
                     "sha256"})
#: where a summary says which machine it was computed on: notes (all under them), as they choose the tolerance
MACHINE_PATHS = frozenset({"device", "versions.machine", "versions.device_name"})

#: Tolerance between summaries of two machine types. The same weights probed with other float32 kernels differ
#: by rounding: u = 6e-8 per operation, and a probe's reductions over up to ~1e4 samples or features stay within
#: ~1e-5 relative (worst case n u, typically sqrt(n) u); 1e-4 leaves a margin, and atol covers numbers that are
#: ~0 (differences of equal means, p-values of 1e-12). Training amplifies rounding step by step, so a study that
#: trains on two machine types gives other weights: its numbers agree only within their run-to-run spread, and
#: compare then reports them as differences (read the conclusions with their intervals instead).
CROSS_MACHINE_RTOL = 1e-4
CROSS_MACHINE_ATOL = 1e-6


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    why: str  # "same machine", "machines differ", "machine not recorded", "given"
    machine_a: dict | None = None
    machine_b: dict | None = None

    @property
    def bit_equal(self) -> bool:
        return self.rtol == 0 and self.atol == 0

    def describe(self) -> str:
        """One line: which tolerance, and why."""
        from kdprobe.runtime.machine import describe

        tol = "bit-equal" if self.bit_equal else f"rtol {self.rtol:g}, atol {self.atol:g}"
        if self.why == "given":
            return f"numbers compared {tol} (as given)"
        if self.why == "same machine":
            return f"numbers compared {tol}: both ran on {describe(self.machine_a)}"
        return (f"numbers compared with {tol}, not bit-equal: {self.why} (A {describe(self.machine_a)}; "
                f"B {describe(self.machine_b)}), and float results are bit-reproducible only on the same machine "
                "type; pass --rtol 0 --atol 0 to ask for bit-equality anyway")


def _versions(summary) -> dict:
    v = summary.get("versions") if isinstance(summary, dict) else None
    return v if isinstance(v, dict) else {}


def choose_tolerance(a, b, rtol: float | None = None, atol: float | None = None) -> Tolerance:
    """Bit-equality when both summaries record the same machine type and torch; the cross-machine tolerance when
    they differ or either does not say; a given rtol/atol (the other then 0) wins over both."""
    from kdprobe.runtime.machine import machine_of, same_machine

    va, vb = _versions(a), _versions(b)
    ma, mb = machine_of(va), machine_of(vb)
    if rtol is not None or atol is not None:
        return Tolerance(rtol or 0.0, atol or 0.0, "given", ma, mb)
    device = [s.get("device") if isinstance(s, dict) else None for s in (a, b)]
    if same_machine(ma, mb, va.get("torch"), vb.get("torch")) and device[0] == device[1]:
        return Tolerance(0.0, 0.0, "same machine", ma, mb)
    why = "machine not recorded" if ma is None or mb is None else "machines differ"
    if ma is not None and mb is not None and ma == mb:
        why = "torch versions differ" if va.get("torch") != vb.get("torch") else "devices differ"
    return Tolerance(CROSS_MACHINE_RTOL, CROSS_MACHINE_ATOL, why, ma, mb)


@dataclass
class SummaryDiff:
    numbers: int = 0  # numbers compared
    strings: int = 0  # other leaves compared (strings, booleans, nulls)
    differences: list[tuple[str, object, object]] = field(default_factory=list)
    notes: list[tuple[str, object, object]] = field(default_factory=list)  # differing VARYING fields
    max_abs: float = 0.0
    max_rel: float = 0.0
    tolerance: Tolerance | None = None  # what was applied, and why
    tolerance: Tolerance | None = None  # what was applied, and why

    @property
    def equal(self) -> bool:
        return not self.differences


def load_summary(path: str | Path) -> dict:
    """summary.json from a path to it or to the study folder holding it, as one flat dict
    (kdprobe.studies.result.flat_summary: a format-1 file's accuracies converted to fractions)."""
    p = Path(path)
    if p.is_dir():
        p = p / "summary.json"
    if not p.is_file():
        raise KdprobeError(f"{p} does not exist; pass a study folder or its summary.json")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise KdprobeError(f"{p} is not valid JSON ({type(e).__name__}: {str(e)[:80]}); pass a study's summary.json") from None
    try:  # the shared parser: deep nesting and huge numbers are refused before json recurses; NaN is kept
        data = parse_json(text, str(p), finite=False)
    except KdprobeError as e:
        raise KdprobeError(f"{p} is not valid JSON ({str(e)[len(str(p)) + 2:]}); pass a study's summary.json") from None
    if not isinstance(data, dict) or data.get("format") != "kdprobe-study":
        raise KdprobeError(f"{p} is not a kdprobe study summary (no \"format\": \"kdprobe-study\"); pass a study's summary.json")
    from kdprobe.studies.result import flat_summary

    try:  # one form whatever the format: settings and data side by side, accuracies as fractions (docs/units.md)
        return flat_summary(data)
    except (KeyError, TypeError, AttributeError) as e:
        raise KdprobeError(f"{p} is not a complete kdprobe study summary ({type(e).__name__}: {str(e)[:80]}); pass a "
                           "study's summary.json") from None


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def compare(a, b, rtol: float | None = None, atol: float | None = None) -> SummaryDiff:
    """Walk two JSON trees side by side; see the module docstring for what counts as a difference and for the
    tolerance (None: chosen from the two summaries' machines by choose_tolerance)."""
    tol = choose_tolerance(a, b, rtol, atol)
    rtol, atol = tol.rtol, tol.atol
    out = SummaryDiff(tolerance=tol)

    def leaf(path: str, key: str, x, y, note: bool = False) -> None:
        if _is_number(x) and _is_number(y):
            out.numbers += 1
            if math.isnan(x) and math.isnan(y):
                return
            d = abs(x - y)
            same = x == y or d <= atol + rtol * abs(y)
            if note or key in VARYING:
                if not same:
                    out.notes.append((path, x, y))
                return
            if not math.isnan(d):
                out.max_abs = max(out.max_abs, d)
                if y != 0:
                    out.max_rel = max(out.max_rel, d / abs(y))
            if not same:
                out.differences.append((path, x, y))
            return
        out.strings += 1
        if x != y:
            (out.notes if note or key in VARYING else out.differences).append((path, x, y))

    def walk(path: str, key: str, x, y, note: bool = False) -> None:
        note = note or path in MACHINE_PATHS
        if isinstance(x, dict) and isinstance(y, dict):
            for k in list(x) + [k for k in y if k not in x]:
                p = f"{path}.{k}" if path else k
                if k not in x or k not in y:
                    quiet = note or k in VARYING or p in MACHINE_PATHS
                    (out.notes if quiet else out.differences).append((p, x.get(k, "<missing>"), y.get(k, "<missing>")))
                else:
                    walk(p, k, x[k], y[k], note)
        elif isinstance(x, list) and isinstance(y, list):
            if len(x) != len(y):
                (out.notes if note else out.differences).append((f"{path} (length)", len(x), len(y)))
            for i, (u, v) in enumerate(zip(x, y)):
                walk(f"{path}[{i}]", key, u, v, note)
        elif isinstance(x, (dict, list)) or isinstance(y, (dict, list)):
            (out.notes if note else out.differences).append((path, type(x).__name__, type(y).__name__))
        else:
            leaf(path, key, x, y, note)

    walk("", "", a, b)
    return out


def gpu_reasons(a, b) -> list[str]:
    """Why two summaries of which one or both ran on a GPU may differ: what holds on a GPU, and the recorded
    fields (GPU model, capability, torch, device) that differ between them; [] when neither ran on a GPU."""
    va, vb = (s.get("versions") if isinstance(s, dict) and isinstance(s.get("versions"), dict) else {} for s in (a, b))
    dev = [str(s.get("device", "")) if isinstance(s, dict) else "" for s in (a, b)]
    if not any(d.startswith("cuda") for d in dev):
        return []
    ma, mb = (v.get("machine") if isinstance(v.get("machine"), dict) else {} for v in (va, vb))
    fields = (("device", dev[0], dev[1]),
              ("GPU", ma.get("cuda", va.get("device_name")), mb.get("cuda", vb.get("device_name"))),
              ("compute capability", ma.get("cuda_capability"), mb.get("cuda_capability")),
              ("torch", va.get("torch"), vb.get("torch")), ("torchvision", va.get("torchvision"), vb.get("torchvision")))
    differ = [f"{name} {x} vs {y}" for name, x, y in fields if x != y]
    lines = ["GPU runs give the same bits only on the same GPU model with the same torch, CUDA and cuDNN, with "
             "deterministic kernels (kdprobe train's default; each checkpoint records it under meta.numerics, "
             "--no-deterministic lets cuDNN autotune and differs run to run) and the same --nproc-per-cell "
             "(ranks normalize BatchNorm over their own slice); probes run with TF32 off unless a landscape asked "
             "for tf32"]
    lines.append("these two differ in: " + "; ".join(differ) if differ else
                 "these two record the same device, GPU and versions: look for --no-deterministic, another "
                 "--nproc-per-cell or another CUDA/cuDNN build (not recorded in the summary)")
    return lines
