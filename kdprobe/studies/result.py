"""What a study produced: plain frozen records that the report writer and summary.json share.

Paths inside are relative to the study folder, so the folder can be moved or archived whole.
Every number is the raw value or comes from kdprobe.stats (via diversity_table.summarize_groups);
nothing here computes. `to_dict` writes nan as None (strict JSON) in kdprobe's JSON envelope
(kdprobe.files.documents: kind "study", settings = the resolved spec, data = everything else);
`from_dict` reads it back, so `to_dict(from_dict(d)) == d`. Format 1 (summary.json before the unit
rule of docs/units.md: flat, accuracies in percent) is read too, its accuracies converted to fractions.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from kdprobe.files.documents import envelope, is_envelope, json_ready
from kdprobe.probes.diversity_table import DiversitySettings, DiversityTable, GroupStats, ModelScore
from kdprobe.studies.ensemble_reading import Verdict
from kdprobe.probes.tables import ProbeTables
from kdprobe.probes.surplus import SurplusRow

FORMAT = "kdprobe-study"
FORMAT_VERSION = 2  # 2: the JSON envelope, every accuracy a fraction (1: flat, accuracies in percent)


@dataclass(frozen=True)
class CellRecord:
    """One trained checkpoint of the study (a method x seed cell)."""

    method: str
    seed: int
    path: str  # relative to the study folder: cells/<method>/seed<s>-<fingerprint>.pt
    fingerprint: str  # TrainConfig.fingerprint() with the teacher written as its cell path
    teacher: str | None  # relative path of the teacher cell
    test_acc: float  # last-epoch test accuracy (a fraction 0-1), as the reference codes report
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
    """One loss surface (Li et al. 2018): arrays [i][j] at (x_j, y_i), loss in nats, accuracy a fraction."""

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


def to_dict(result: StudyResult) -> dict:
    """JSON-ready dict (nan -> None) in the envelope: kind "study", kdprobe_version, format, format_version, units,
    settings (the resolved spec) and data (every other field of the StudyResult)."""
    data = json_ready(asdict(result))
    settings = data.pop("settings")
    return envelope("study", settings, data, format=FORMAT, format_version=FORMAT_VERSION)


# format 1 (flat, percent): what held an accuracy, or a difference of accuracies, in percent
_V1_GROUP = ("mean", "std", "sem", "half_width", "low", "high")
_V1_SURPLUS = ("unpruned_scratch_mean", "unpruned_scratch_std", "finetuned_scratch_mean", "finetuned_scratch_std",
               "unpruned_kd_mean", "unpruned_kd_std", "self_distill_mean", "self_distill_std", "gain_unpruned",
               "gain_pruned", "surplus", "surplus_se")
_V1_RESULTS = ("unpruned", "finetuned", "post_distill", "pre_post", "self_distill")


def _percent(rec, keys):
    """A record with `keys` divided by 100 where they are numbers; anything that is not a record as it is
    (kdprobe compare reads summaries that may be damaged or hand-made)."""
    if not isinstance(rec, dict):
        return rec
    return {k: (v / 100.0 if k in keys and isinstance(v, (int, float)) and not isinstance(v, bool) else v)
            for k, v in rec.items()}


def _grid_percent(rows):
    if not isinstance(rows, list):
        return rows
    return [[v / 100.0 if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in row]
            if isinstance(row, list) else row for row in rows]


def _listed(v) -> list:
    return v if isinstance(v, list) else []


def upgraded(d: dict) -> dict:
    """A summary.json document in today's form (format 2, the envelope); a format-1 document (flat, accuracies
    in percent) is converted: cells' test_acc/best_acc, the accuracy groups' mean, std, sem, half_width, low
    and high, the surfaces' acc and the pruning blocks' accuracies, gains and surplus divided by 100 (the probes
    and verdicts held fractions already). kdprobe_version stays the one that made it. A flat document of
    format 2 (flat_summary's output) is wrapped again without conversion."""
    if is_envelope(d):
        return d
    flat = {k: v for k, v in d.items() if k not in ("format", "format_version", "kind", "kdprobe_version", "units")}
    if (d.get("format_version") or 1) >= 2:
        settings = flat.pop("settings", {})
        return envelope("study", settings, flat, format=FORMAT, format_version=FORMAT_VERSION)
    for key, keys in (("cells", ("test_acc", "best_acc")), ("accuracy", _V1_GROUP)):
        if isinstance(flat.get(key), list):
            flat[key] = [_percent(c, keys) for c in flat[key]]
    if isinstance(flat.get("landscapes"), list):
        flat["landscapes"] = [{**x, "acc": _grid_percent(x["acc"])} if isinstance(x, dict) and "acc" in x else x
                              for x in flat["landscapes"]]
    if isinstance(flat.get("pruning"), list):
        flat["pruning"] = [{**b, "surplus": [_percent(r, _V1_SURPLUS) for r in _listed(b.get("surplus"))],
                            "results": [_percent(r, _V1_RESULTS) for r in _listed(b.get("results"))]}
                           if isinstance(b, dict) else b for b in flat["pruning"]]
    settings = flat.pop("settings", {})
    out = envelope("study", settings, flat, format=FORMAT, format_version=FORMAT_VERSION)
    out["kdprobe_version"] = (flat.get("versions") or {}).get("kdprobe", "")
    return out


def flat_summary(d: dict) -> dict:
    """A summary.json document (either format) as one flat dict: settings and every data field side by side
    (what kdprobe compare walks)."""
    doc = upgraded(d)
    return {"format": doc.get("format"), "format_version": doc.get("format_version"), "settings": doc["settings"],
            **doc["data"]}


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
    """Rebuild a StudyResult from `to_dict` output (e.g. json.load of summary.json; format 1 is converted)."""
    d = flat_summary(d)
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
