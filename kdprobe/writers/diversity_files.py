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


def diversity_records(scores, settings) -> list[dict]:
    """The rows --csv writes, as records: one per checkpoint per probe batch, the raw score plus every
    setting (the probe's seed as probe_seed); a missing model seed is None (a blank cell in the CSV)."""
    extra = _settings_columns(settings)
    return [{"checkpoint": s.path, "group": s.group, "model_seed": s.seed, "batch": b, "score": float(v), **extra}
            for s in scores for b, v in enumerate(s.values)]


def write_diversity_csv(scores, groups, settings, path: str | os.PathLike) -> None:
    """One row per checkpoint per probe batch: the raw score plus every setting as columns."""
    records = diversity_records(scores, settings)
    columns = _RAW_COLUMNS + list(_settings_columns(settings))
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            for r in records:
                w.writerow([r[c] for c in columns])  # a float as its repr (round-trip digits), None as a blank


def _nan_to_none(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def diversity_document(scores, groups, settings) -> dict:
    """The document --json writes (kdprobe.files.documents.envelope): kind "diversity", kdprobe_version, machine,
    probe, units, settings, data {models: every checkpoint's raw scores and mean, groups: the group statistics}
    (nan as None)."""
    from kdprobe.files.documents import envelope
    from kdprobe.runtime.machine import machine

    return _nan_to_none(envelope(
        "diversity", settings.as_dict(), {"models": [asdict(s) for s in scores], "groups": [asdict(g) for g in groups]},
        # the scores are bit-reproducible on this machine type only (kdprobe.runtime.machine)
        machine=machine(), probe="jacobian-correlation (Mellor et al. 2020)"))


def write_diversity_json(scores, groups, settings, path: str | os.PathLike) -> None:
    """Settings, every checkpoint's raw scores and mean, and the group statistics (nan written as null)."""
    atomic_write_text(path, json.dumps(diversity_document(scores, groups, settings), indent=2, allow_nan=False) + "\n")
