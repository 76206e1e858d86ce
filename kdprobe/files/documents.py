"""The one envelope of every JSON document kdprobe writes (docs/units.md).

    {"kind": "eval" | "diversity" | "agreement" | ... | "study",
     "kdprobe_version": "0.1.0",
     ...                                  format_version, machine where they apply
     "units": UNITS,                      the unit rule, in one line
     "settings": {...},                   how the numbers were made
     "data": ...}                         the numbers: records, tables or a grid

`kdprobe eval --json`, the probes' --json, diversity, surplus, info, landscape/interpolate .json and a study's
summary.json all have it, and the API's .to_dict() returns the same document as the command writes.
"""
from __future__ import annotations

import math
from pathlib import Path

#: the unit rule every output follows (docs/units.md), as the documents state it
UNITS = ("accuracies, error rates, agreement, ECE and other rates are fractions 0-1 (0.9777, never 97.77); "
         "losses are mean cross-entropy in nats; intervals are [low, high] in the unit of their value")
KEYS = ("kind", "kdprobe_version", "units", "settings", "data")


def envelope(kind: str, settings, data, **extra) -> dict:
    """The document: kind, kdprobe_version, `extra` (format_version, machine, ...), units, settings, data."""
    from kdprobe.version import __version__

    return {"kind": kind, "kdprobe_version": __version__, **extra, "units": UNITS, "settings": settings,
            "data": data}


def is_envelope(doc) -> bool:
    """True when `doc` has every key of the envelope."""
    return isinstance(doc, dict) and all(k in doc for k in KEYS)


def json_ready(obj):
    """`obj` as plain JSON values: dict keys as text, tuples as lists, numpy / 0-d scalars as Python numbers,
    paths as text, nan and inf (not JSON) as None."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
