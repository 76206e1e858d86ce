"""Compare two study summaries (summary.json) number by number: did a rerun reproduce a result?

Every number and string in the two files is compared at the same place in the tree, except what
is expected to change between runs of one study: wall-clock times (`seconds`, `wall_seconds`),
when it was made (`created`), whether a cell was trained or reused (`action`), where things live
on this machine (`source`, `dataset` strings, `versions.platform`), and checkpoint files'
`sha256` (a KD student records its teacher's absolute path as provenance, so the same weights
trained into another folder hash differently; every number computed from the weights is still
compared). Those are listed as notes, never as differences. Numbers are equal when
|a - b| <= atol + rtol * |b| (both 0 by default: the same seed on the same machine type gives
the same bits).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from kdprobe.errors import KdprobeError

#: keys whose values change from run to run by design (time, the machine's paths, reuse of cells, file hashes)
VARYING = frozenset({"created", "wall_seconds", "seconds", "action", "source", "dataset", "platform", "sha256"})


@dataclass
class SummaryDiff:
    numbers: int = 0  # numbers compared
    strings: int = 0  # other leaves compared (strings, booleans, nulls)
    differences: list[tuple[str, object, object]] = field(default_factory=list)
    notes: list[tuple[str, object, object]] = field(default_factory=list)  # differing VARYING fields
    max_abs: float = 0.0
    max_rel: float = 0.0

    @property
    def equal(self) -> bool:
        return not self.differences


def load_summary(path: str | Path) -> dict:
    """summary.json from a path to it or to the study folder holding it."""
    p = Path(path)
    if p.is_dir():
        p = p / "summary.json"
    if not p.is_file():
        raise KdprobeError(f"{p} does not exist; pass a study folder or its summary.json")
    try:
        data = json.loads(p.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KdprobeError(f"{p} is not valid JSON ({type(e).__name__}: {str(e)[:80]}); pass a study's summary.json") from None
    if not isinstance(data, dict) or data.get("format") != "kdprobe-study":
        raise KdprobeError(f"{p} is not a kdprobe study summary (no \"format\": \"kdprobe-study\"); pass a study's summary.json")
    return data


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def compare(a, b, rtol: float = 0.0, atol: float = 0.0) -> SummaryDiff:
    """Walk two JSON trees side by side; see the module docstring for what counts as a difference."""
    out = SummaryDiff()

    def leaf(path: str, key: str, x, y) -> None:
        if _is_number(x) and _is_number(y):
            out.numbers += 1
            if math.isnan(x) and math.isnan(y):
                return
            d = abs(x - y)
            same = x == y or d <= atol + rtol * abs(y)
            if key in VARYING:
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
            (out.notes if key in VARYING else out.differences).append((path, x, y))

    def walk(path: str, key: str, x, y) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in list(x) + [k for k in y if k not in x]:
                p = f"{path}.{k}" if path else k
                if k not in x or k not in y:
                    (out.notes if k in VARYING else out.differences).append(
                        (p, x.get(k, "<missing>"), y.get(k, "<missing>")))
                else:
                    walk(p, k, x[k], y[k])
        elif isinstance(x, list) and isinstance(y, list):
            if len(x) != len(y):
                out.differences.append((f"{path} (length)", len(x), len(y)))
            for i, (u, v) in enumerate(zip(x, y)):
                walk(f"{path}[{i}]", key, u, v)
        elif isinstance(x, (dict, list)) or isinstance(y, (dict, list)):
            out.differences.append((path, type(x).__name__, type(y).__name__))
        else:
            leaf(path, key, x, y)

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
