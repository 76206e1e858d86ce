"""What a study produced: plain frozen records that the report writer and summary.json share.

Paths inside are relative to the study folder, so the folder can be moved or archived whole.
Every number is the raw value or comes from kdprobe.stats (via diversity_table.summarize_groups);
nothing here computes. `to_dict` writes nan as None (strict JSON); `from_dict` reads it back,
so `to_dict(from_dict(d)) == d`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from kdprobe.probes.diversity_table import DiversitySettings, DiversityTable, GroupStats, ModelScore
from kdprobe.studies.ensemble_reading import Verdict
from kdprobe.probes.tables import ProbeTables
from kdprobe.probes.surplus import SurplusRow

FORMAT = "kdprobe-study"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CellRecord:
    """One trained checkpoint of the study (a method x seed cell)."""

    method: str
    seed: int
    path: str  # relative to the study folder: cells/<method>/seed<s>-<fingerprint>.pt
    fingerprint: str  # TrainConfig.fingerprint() with the teacher written as its cell path
    teacher: str | None  # relative path of the teacher cell
    test_acc: float  # last-epoch test accuracy (%), as the reference codes report
    best_acc: float
    epochs: int
    in_study: bool  # False: trained only as the teacher of another seed
    action: str  # trained | resumed | existing
    seconds: float | None  # wall time of this run's training (None when it existed)
    snapshots: tuple[str, ...] = ()  # relative paths of end-of-lr-stage checkpoints
    world_size: int = 1  # processes that trained it (torchrun / DDP)
    model: str = ""  # registry name plus non-default kwargs, e.g. resnet8b-width0.25
    dataset: str = ""  # as the checkpoint records it (image folders by absolute path)


@dataclass(frozen=True)
class LandscapeRecord:
    """One loss surface (Li et al. 2018): arrays [i][j] at (x_j, y_i), loss in nats, accuracy in %."""

    group: str  # figure it belongs to: "final" or "epoch E"
    method: str
    seed: int
    epoch: int
    checkpoint: str
    h5: str
    vtk: str
    xcoords: tuple[float, ...]
    ycoords: tuple[float, ...]
    loss: tuple[tuple[float, ...], ...]
    acc: tuple[tuple[float, ...], ...]
    samples: int
    split: str
    bn: str
    precision: str
    directions_seed: int
    include_bn: bool
    directions_sha256: str
    seconds: float | None


@dataclass(frozen=True)
class PruningBlock:
    """One pruning pipeline run (a row block of the paper's Table 1) and its surplus rows."""

    label: str  # model and setting, e.g. "resnet56b 40/70/90 skip B"
    folder: str
    surplus: tuple[SurplusRow, ...]
    files: dict  # name -> relative path (results.csv, surplus.csv, ...)
    results: tuple[dict, ...] = ()  # results.csv rows: model, setting, train_type, seed and the five accuracies
    cells_total: int = 0
    cells_run: int = 0  # trained or pruned by this invocation (the rest existed)


@dataclass(frozen=True)
class StudyResult:
    """Everything report.html and summary.json show."""

    name: str
    title: str
    scale: str | None
    source: str
    settings: dict  # the resolved spec
    versions: dict
    device: str
    created: str  # ISO time the report was made
    wall_seconds: float  # this invocation
    cells: tuple[CellRecord, ...]
    accuracy: tuple[GroupStats, ...]  # per method, unit = one checkpoint's last-epoch test accuracy
    accuracy_confidence: float
    accuracy_interval: str
    accuracy_reference: str | None
    diversity: DiversityTable | None
    landscapes: tuple[LandscapeRecord, ...]
    landscape_display: dict  # {"log": bool, "zmax": float | None, "directions": text}
    pruning: tuple[PruningBlock, ...]
    files: dict  # label -> relative path
    notes: tuple[str, ...] = field(default_factory=tuple)
    # ensemble-perspective probes: name -> kdprobe.probes.tables.ProbeTables (in summary.json: command, settings,
    # tables; the records `kdprobe agreement|calibration|cka|sharpness --json` write), and the verdicts from them
    probes: dict = field(default_factory=dict)
    verdicts: tuple[Verdict, ...] = field(default_factory=tuple)


def _plain(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def to_dict(result: StudyResult) -> dict:
    """JSON-ready dict (nan -> None), with a format tag."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **_plain(asdict(result))}


def _nan(v):
    return math.nan if v is None else v


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def _build(cls, d: dict, floats_nan: bool = False):
    kw = {}
    for f in fields(cls):
        if f.name not in d:
            continue
        v = _tuples(d[f.name])
        if floats_nan and f.type in ("float", float):
            v = _nan(v)
        kw[f.name] = v
    return cls(**kw)


def from_dict(d: dict) -> StudyResult:
    """Rebuild a StudyResult from `to_dict` output (e.g. json.load of summary.json)."""
    div = d.get("diversity")
    table = None if div is None else DiversityTable(
        DiversitySettings(**div["settings"]), tuple(_build(ModelScore, s) for s in div["scores"]),
        tuple(_build(GroupStats, g, True) for g in div["groups"]))
    kw = {f.name: _tuples(d[f.name]) for f in fields(StudyResult) if f.name in d}
    kw.update(
        settings=d["settings"], versions=d["versions"], landscape_display=d["landscape_display"], files=d["files"],
        cells=tuple(_build(CellRecord, c) for c in d["cells"]),
        accuracy=tuple(_build(GroupStats, g, True) for g in d["accuracy"]), diversity=table,
        landscapes=tuple(_build(LandscapeRecord, x) for x in d["landscapes"]),
        pruning=tuple(PruningBlock(**{**b, "surplus": tuple(_build(SurplusRow, r) for r in b["surplus"]),
                                      "results": tuple(b.get("results", ()))}) for b in d["pruning"]),
        probes={k: ProbeTables(**v) for k, v in d.get("probes", {}).items()},
        verdicts=tuple(_build(Verdict, v, True) for v in d.get("verdicts", ())))
    return StudyResult(**kw)
