"""Diversity results as files: CSV of every raw per-batch score, JSON of everything."""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict

from kdprobe.files.io import atomic_path, atomic_write_text

_RAW_COLUMNS = ["checkpoint", "group", "model_seed", "batch", "score"]


def _settings_columns(settings) -> dict:
    d = settings.as_dict()
    d["probe_seed"] = d.pop("seed")  # "seed" alone would be mistaken for the checkpoint's training seed
    return d


def write_diversity_csv(scores, groups, settings, path: str | os.PathLike) -> None:
    """One row per checkpoint per probe batch: the raw score plus every setting as columns."""
    extra = _settings_columns(settings)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(_RAW_COLUMNS + list(extra))
            for s in scores:
                for b, v in enumerate(s.values):
                    w.writerow([s.path, s.group, "" if s.seed is None else s.seed, b, repr(float(v))]
                               + list(extra.values()))


def _nan_to_none(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def write_diversity_json(scores, groups, settings, path: str | os.PathLike) -> None:
    """Settings, every checkpoint's raw scores and mean, and the group statistics (nan written as null)."""
    from kdprobe.version import __version__
    from kdprobe.runtime.machine import machine

    doc = {
        "kdprobe_version": __version__,
        "machine": machine(),  # the scores are bit-reproducible on this machine type only (kdprobe.runtime.machine)
        "probe": "jacobian-correlation (Mellor et al. 2020)",
        "settings": settings.as_dict(),
        "models": [asdict(s) for s in scores],
        "groups": [asdict(g) for g in groups],
    }
    atomic_write_text(path, json.dumps(_nan_to_none(doc), indent=2, allow_nan=False) + "\n")
