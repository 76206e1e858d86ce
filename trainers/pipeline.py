"""The pruning pipeline: every cell of one row block of the paper's pruning table, resumable.

Cells per seed s (files under OUT/seed{s}/, named by phase):

  scratch.pt                initial training, no KD                      -> scratch unpruned
  scratch_pruned.pt         prune scratch.pt
  scratch_finetuned.pt      fine-tune scratch_pruned, no KD              -> scratch finetuned
  and for each KD type k:
  kd-{k}.pt                 initial training, KD from scratch.pt          -> k unpruned
  kd-{k}_pruned.pt          prune kd-{k}.pt
  pre_distill-{k}.pt        fine-tune kd-{k}_pruned, no KD                -> k finetuned (Pre-Distill)
  post_distill-{k}.pt       fine-tune scratch_pruned, KD from scratch.pt  -> k post_distill
  pre_post-{k}.pt           fine-tune kd-{k}_pruned, KD from scratch.pt   -> k pre_post
  self_distill-{k}.pt       fine-tune kd-{k}_pruned, KD from kd-{k}.pt    -> k self_distill

Teachers are trained here, never downloaded: the teacher is the unpruned scratch model of
the same seed, the same architecture as the student (as in the paper); Self-Distill uses
the unpruned KD student instead. Accuracies are each checkpoint's last-epoch test accuracy
(meta["test_acc"]), as the reference code reports. A cell whose checkpoint exists is
skipped after checking that it was made with the same configuration and from the same
upstream files (sha256), so re-running the command resumes; a killed training resumes
from its .partial file (trainers.loop).
"""
from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

from kdprobe.checkpoints.format import read_payload
from kdprobe.data.datasets import load_dataset
from kdprobe.errors import KdprobeError
from kdprobe.files.documents import envelope, json_ready
from kdprobe.files.io import atomic_write_text, sha256_file
from kdprobe.models import create_model
from kdprobe.models.registry import canonical_name, names_code
from kdprobe.probes.surplus import COLUMNS, SurplusRow, compute_surplus, read_results_csv
from kdprobe.pruning import l1_plan, ops as prune_ops, parse_skip, resnet_depth, slimming_plan
from kdprobe.writers.surplus_files import write_surplus_csv, write_surplus_json
from trainers import loop
from trainers.cells import check_cell, check_upstream, model_label
from trainers.config import KD_FAMILIES, TrainConfig, make_config

KD_TYPES = ("label", "feature") + KD_FAMILIES  # every distillation method of trainers.config.DISTILLS
# TrainConfig fields the pipeline sets itself; overrides may set any other field.
_OWNED = {"model", "model_kwargs", "dataset", "data_dir", "train_subset", "preset", "distill", "teacher",
          "teacher_arch", "init", "seed", "bn_sparsity", "extra_teachers", "kd_settings"}
RESULT_COLUMNS = COLUMNS[:3] + ("seed",) + COLUMNS[3:]  # kdprobe surplus ignores the extra seed column
TEACHER_NOTE = ("teacher = the unpruned scratch model of the same seed (seed{s}/scratch.pt), same architecture "
                "as the student, as in the paper; Self-Distill's teacher = the unpruned KD student (seed{s}/kd-{k}.pt)")


@dataclass(frozen=True)
class PipelineSpec:
    """One row block of the pruning table: model, data, pruning method and the KD types to compare."""

    model: str = "resnet56"             # registry name (resnet56 = resnet56b)
    model_kwargs: dict = field(default_factory=dict)  # e.g. {"width": 0.25}
    dataset: str = "digits"             # digits | cifar10 | cifar100 | imagefolder:PATH (paper: CIFAR-100)
    data_dir: str | None = None
    train_subset: int | None = None     # train on a seeded subset of this many images (quick runs)
    method: str = "l1"                  # l1 | slimming | weight
    remaining: str = "0.4,0.7,0.9"      # fractions kept; l1: per stage
    skip: str | None = None             # l1: blocks kept whole (e.g. "B")
    distill: tuple = ("label",)         # KD types, each gets a row: label | feature | at | fitnet | ... | dkd
    kd_settings: dict = field(default_factory=dict)  # per KD family, its settings that differ: {"dkd": {"beta": 2}}
    seeds: tuple = (0,)
    preset: str = "rnp"                 # initial trainings (pruning reference: 160 epochs, lr 0.1)
    train_overrides: dict = field(default_factory=dict)     # e.g. {"epochs": 2, "lr": 0.05}
    finetune_preset: str = "finetune"   # 40 epochs, constant lr 0.001, batch 64 (reference)
    finetune_overrides: dict = field(default_factory=dict)  # e.g. {"epochs": 1}
    bn_sparsity: float | None = None    # None: slimming 1e-4 VGG / 1e-5 others, else 0; used by ALL initial trainings

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (normalize a frozen instance)
        set_("model", canonical_name(self.model))
        distill = self.distill.split(",") if isinstance(self.distill, str) else self.distill
        set_("distill", tuple(dict.fromkeys(d.strip().lower() for d in distill if d.strip())))
        if not self.distill or any(d not in KD_TYPES for d in self.distill):
            raise KdprobeError(f"expected --distill as KD types from {', '.join(KD_TYPES)} (comma list), "
                               f"got {','.join(self.distill) or 'none'}")
        seeds = self.seeds.split(",") if isinstance(self.seeds, str) else self.seeds
        try:
            set_("seeds", tuple(dict.fromkeys(int(s) for s in seeds)))
        except (TypeError, ValueError):
            raise KdprobeError(f"expected --seeds as integers separated by commas (e.g. 0,1,2), got {seeds!r}") from None
        if not self.seeds:
            raise KdprobeError("expected at least one seed, got none; pass --seeds 0")
        set_("data_dir", None if self.data_dir is None else str(self.data_dir))
        method, _ = prune_ops.check_prune_args(self.method, self.remaining, self.skip)
        set_("method", method)
        for what, d in (("train_overrides", self.train_overrides), ("finetune_overrides", self.finetune_overrides)):
            bad = sorted(set(d) & _OWNED) + sorted(set(d) - {f.name for f in fields(TrainConfig)})
            if bad:
                raise KdprobeError(f"expected {what} to set training options only, got {', '.join(bad)}; "
                                   f"the pipeline sets {', '.join(sorted(_OWNED))} itself")
        if not isinstance(self.kd_settings, dict) or not all(isinstance(v, dict) for v in self.kd_settings.values()):
            raise KdprobeError(f"expected --kd-settings as a JSON object of KD method -> its settings, like "
                               f"'{{\"dkd\": {{\"beta\": 2}}}}', got {self.kd_settings!r}")
        stray = sorted(set(self.kd_settings) - set(self.distill))
        if stray:
            raise KdprobeError(f"--kd-settings names {stray[0]!r}, which is not among the KD types "
                               f"{','.join(self.distill)}; add it to --distill or drop its settings")
        if self.bn_sparsity is not None and self.bn_sparsity < 0:
            raise KdprobeError(f"expected --bn-sparsity >= 0, got {self.bn_sparsity}")

    @property
    def fractions(self) -> list[float]:
        return prune_ops.check_prune_args(self.method, self.remaining, self.skip)[1]

    @property
    def resolved_bn_sparsity(self) -> float:
        """Network Slimming lambda (Liu 2017): 1e-4 VGG, 1e-5 ResNet/DenseNet; 0 for other methods."""
        if self.bn_sparsity is not None:
            return float(self.bn_sparsity)
        if self.method != "slimming":
            return 0.0
        return 1e-4 if self.model.startswith("vgg") else 1e-5

    @property
    def setting(self) -> str:
        """Percent remaining as the paper's tables write it: '40/70/90', '50' (+ ' skip B')."""
        text = "/".join(f"{v * 100:.6g}" for v in self.fractions)
        return text + (f" skip {self.skip}" if self.skip else "")

    @property
    def model_label(self) -> str:
        """The `model` column: registry name, plus non-default kwargs (resnet8a-width0.25)."""
        return model_label(self.model, self.model_kwargs)


@dataclass(frozen=True)
class Cell:
    """One checkpoint the pipeline makes: how (kind, source, distill, teacher) and which result it fills."""

    seed: int
    name: str                 # file stem: scratch, kd-label_pruned, post_distill-label, ...
    phase: str                # scratch | kd | prune | finetune | pre_distill | post_distill | pre_post | self_distill
    kind: str                 # train | prune
    train_type: str           # results row: scratch or the KD type
    column: str | None        # results column it fills (None: pruned checkpoints)
    source: str | None = None  # cell it starts from (prune source, fine-tune init)
    distill: str = "none"     # KD loss in this cell
    teacher: str | None = None

    @property
    def file(self) -> str:
        return f"seed{self.seed}/{self.name}.pt"


@dataclass(frozen=True)
class CellRecord:
    """A finished cell: where its checkpoint is, its hash and accuracy, and what this run did."""

    cell: Cell
    path: Path
    sha256: str
    test_acc: float | None    # last-epoch test accuracy (a fraction, 0-1); None for pruned checkpoints
    action: str               # trained | pruned | skipped
    seconds: float
    pruning: dict | None = None  # params/MACs before and after, for pruned cells


@dataclass(frozen=True)
class CellEvent:
    """Reported to `on_event` as cells start (stage 'start') and finish ('done'; skips only 'done')."""

    index: int                # 1-based
    total: int
    cell: Cell
    action: str               # train | prune | skip
    stage: str                # start | done
    record: CellRecord | None = None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class PipelineResult:
    """All cells, the results.csv rows (dicts, seed included) and the surplus rows."""

    out_dir: Path
    cells: tuple[CellRecord, ...]
    rows: tuple[dict, ...]
    surplus: tuple[SurplusRow, ...]
    files: dict
    warnings: tuple[str, ...] = ()


def plan_cells(spec: PipelineSpec) -> list[Cell]:
    """Every cell of the pipeline, in the order they run (upstream cells first)."""
    out = []
    for s in spec.seeds:
        out += [Cell(s, "scratch", "scratch", "train", "scratch", "unpruned"),
                Cell(s, "scratch_pruned", "prune", "prune", "scratch", None, source="scratch"),
                Cell(s, "scratch_finetuned", "finetune", "train", "scratch", "finetuned", source="scratch_pruned")]
        for k in spec.distill:
            kd, pr = f"kd-{k}", f"kd-{k}_pruned"
            out += [Cell(s, kd, "kd", "train", k, "unpruned", distill=k, teacher="scratch"),
                    Cell(s, pr, "prune", "prune", k, None, source=kd),
                    Cell(s, f"pre_distill-{k}", "pre_distill", "train", k, "finetuned", source=pr),
                    Cell(s, f"post_distill-{k}", "post_distill", "train", k, "post_distill", source="scratch_pruned",
                         distill=k, teacher="scratch"),
                    Cell(s, f"pre_post-{k}", "pre_post", "train", k, "pre_post", source=pr, distill=k, teacher="scratch"),
                    Cell(s, f"self_distill-{k}", "self_distill", "train", k, "self_distill", source=pr, distill=k,
                         teacher=kd)]
    return out


def cell_config(spec: PipelineSpec, cell: Cell, out_dir: Path) -> TrainConfig:
    """The TrainConfig of a training cell (absolute teacher/init paths under out_dir)."""
    path = lambda name: str(out_dir / f"seed{cell.seed}" / f"{name}.pt") if name else None  # noqa: E731
    common = dict(model=spec.model, model_kwargs=dict(spec.model_kwargs), dataset=spec.dataset, data_dir=spec.data_dir,
                  train_subset=spec.train_subset, seed=cell.seed, distill=cell.distill, teacher=path(cell.teacher),
                  kd_settings=dict(spec.kd_settings.get(cell.distill, {})))
    if names_code(spec.model):  # the user typed this python: model; its own cells rebuild under that name
        common.update({"teacher_arch": spec.model} if cell.teacher else {})
    if cell.source is None:  # initial training: the sparsity term goes into every row alike
        return make_config(spec.preset, **spec.train_overrides, **common, bn_sparsity=spec.resolved_bn_sparsity)
    # fine-tuning has no sparsity term: it only serves to pick channels before pruning (reference --refine runs)
    if names_code(spec.model):
        common["init_arch"] = spec.model
    return make_config(spec.finetune_preset, **spec.finetune_overrides, **common, init=path(cell.source),
                       bn_sparsity=0.0)


def prune_expectation(spec: PipelineSpec) -> dict:
    """What meta["pruning"] of a pruned cell must say; planning on a fresh net fails now, not after training."""
    m = create_model(spec.model, **spec.model_kwargs)
    fr = spec.fractions
    if spec.method == "l1":
        fr = fr * 3 if len(fr) == 1 else fr
        skip = parse_skip(spec.skip, depth=resnet_depth(m))
        l1_plan(m, fr, skip)
        return {"method": "l1", "remaining": fr, "skip": [list(b) for b in skip]}
    if spec.method == "slimming":
        slimming_plan(m, fr[0])
    return {"method": spec.method, "remaining": fr[0], "skip": None}


def _check_prune(path: Path, meta: dict, want: dict) -> None:
    info = meta.get("pruning") or {}
    for k, v in want.items():
        if info.get(k) != v:
            raise KdprobeError(f"{path} exists but was pruned with {k}={info.get(k)!r}, expected {k}={v!r} for this "
                               f"pipeline; use a new --out or delete {path}")


def _existing(spec: PipelineSpec, cell: Cell, path: Path, out_dir: Path, prune_want: dict, upstream_too: bool,
              data_fp: str | None = None) -> dict:
    """Meta of an existing cell checkpoint after checking it is this cell's (trainers.cells); raises otherwise."""
    payload = read_payload(path)
    label = f"cell {cell.file}"
    if cell.kind == "prune":
        meta = payload.get("meta") if isinstance(payload.get("meta"), dict) else {}
        _check_prune(path, meta, prune_want)
        if upstream_too:
            check_upstream(label, path, "source", (meta.get("pruning") or {}).get("source_sha256"),
                           path.with_name(f"{cell.source}.pt"))
        return meta
    upstream = {role: path.with_name(f"{name}.pt") for role, name in (("teacher", cell.teacher), ("init", cell.source))
                if name} if upstream_too else None
    return check_cell(label, path, payload, cell_config(spec, cell, out_dir), data_fingerprint=data_fp,
                      upstream=upstream)


def _precheck(spec: PipelineSpec, cells: list[Cell], out_dir: Path, prune_want: dict) -> None:
    """Before any work: every existing checkpoint / partial state belongs to this spec."""
    data_fp = None
    for cell in cells:
        path = out_dir / cell.file
        if path.exists():
            if data_fp is None and cell.kind == "train":  # the data is loaded only when a cell already exists
                data_fp = load_dataset(spec.dataset, spec.data_dir).fingerprint
            _existing(spec, cell, path, out_dir, prune_want, upstream_too=False, data_fp=data_fp)
        elif cell.kind == "train" and loop.partial_path(path).exists():
            if not loop.partial_matches(cell_config(spec, cell, out_dir), path):
                raise KdprobeError(f"{loop.partial_path(path)} is a partial run of another configuration; "
                                   "delete it or use a new --out")


def run_pruning_pipeline(spec: PipelineSpec, out_dir, *, device: str = "auto",
                         progress_factory: Callable[[Cell], loop.Progress] | None = None,
                         on_event: Callable[[CellEvent], None] | None = None, trackers=None,
                         run_prefix: str = "") -> PipelineResult:
    """Run (or resume) every cell of `spec` under out_dir; write results.csv, surplus.csv/.json, pipeline.json.
    trackers: a trainers.trackers.TrackerSpec: each training cell logs its run, named run_prefix + seedS/CELL."""
    out_dir = Path(out_dir).resolve()
    loop.resolve_device(device)  # a missing GPU fails now, not after the first cell
    prune_want = prune_expectation(spec)
    cells = plan_cells(spec)
    for c in cells:
        if c.kind == "train":
            cell_config(spec, c, out_dir)  # every TrainConfig validates before any training
    _precheck(spec, cells, out_dir, prune_want)
    emit = on_event or (lambda e: None)
    records: list[CellRecord] = []
    warnings: list[str] = []
    for i, cell in enumerate(cells, 1):
        path, t0, info, warn = out_dir / cell.file, time.monotonic(), None, ()
        if path.exists():
            meta, action = _existing(spec, cell, path, out_dir, prune_want, upstream_too=True), "skipped"
        elif cell.kind == "prune":
            emit(CellEvent(i, len(cells), cell, "prune", "start"))
            rep = prune_ops.prune_checkpoint(path.with_name(f"{cell.source}.pt"), spec.method, spec.remaining, path,
                                             skip=spec.skip, arch=spec.model if names_code(spec.model) else None)
            meta, action, warn = read_payload(path)["meta"], "pruned", rep.warnings
        else:
            emit(CellEvent(i, len(cells), cell, "train", "start"))
            progress = progress_factory(cell) if progress_factory else None
            loop.train(cell_config(spec, cell, out_dir), path, device=device, progress=progress,
                       trackers=cell_trackers(trackers, cell, run_prefix))
            meta, action = read_payload(path)["meta"], "trained"
        if cell.kind == "prune":
            p = meta.get("pruning") or {}
            info = {k: p.get(k) for k in ("params_before", "params_after", "flops_before", "flops_after")}
        acc = None if cell.kind == "prune" else float(meta["test_acc"])
        rec = CellRecord(cell, path, sha256_file(path), acc, action, round(time.monotonic() - t0, 3), info)
        records.append(rec)
        warnings += [f"{cell.file}: {w}" for w in warn]
        emit(CellEvent(i, len(cells), cell, "skip" if action == "skipped" else cell.kind, "done", rec, tuple(warn)))
    return _write_outputs(spec, out_dir, records, tuple(warnings))


def cell_trackers(trackers, cell: Cell, run_prefix: str = ""):
    """The pipeline's trackers for one training cell: its run named run_prefix + seedS/NAME (None without)."""
    if trackers is None:
        return None
    return trackers.named(f"{run_prefix}seed{cell.seed}/{cell.name}", cell=cell.name, seed=cell.seed,
                          phase=cell.phase)


def _results_rows(spec: PipelineSpec, records: list[CellRecord]) -> list[dict]:
    rows: dict[tuple, dict] = {}
    for r in records:
        if r.cell.column is None:
            continue
        key = (r.cell.seed, r.cell.train_type)
        row = rows.setdefault(key, {"model": spec.model_label, "setting": spec.setting,
                                    "train_type": r.cell.train_type, "seed": r.cell.seed})
        row[r.cell.column] = r.test_acc
    return list(rows.values())


def write_results_csv(rows: list[dict], path: Path) -> None:
    """results.csv in the `kdprobe surplus` format plus a seed column; floats written exactly (repr)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(RESULT_COLUMNS)
    for r in rows:
        w.writerow(["" if r.get(c) is None else repr(r[c]) if isinstance(r[c], float) else r[c] for c in RESULT_COLUMNS])
    atomic_write_text(path, buf.getvalue())


def _write_outputs(spec: PipelineSpec, out_dir: Path, records: list[CellRecord], warnings: tuple) -> PipelineResult:
    files = {k: out_dir / n for k, n in (("results_csv", "results.csv"), ("surplus_csv", "surplus.csv"),
                                         ("surplus_json", "surplus.json"), ("pipeline_json", "pipeline.json"))}
    rows = _results_rows(spec, records)
    write_results_csv(rows, files["results_csv"])
    surplus = compute_surplus(read_results_csv(files["results_csv"]))  # read back: what `kdprobe surplus` sees
    write_surplus_csv(surplus, files["surplus_csv"])
    write_surplus_json(surplus, files["surplus_json"])
    # no times or run actions in pipeline.json: a resumed run writes the same file. The JSON envelope of every
    # kdprobe document (kdprobe.files.documents): what was asked under settings, the cells under data.
    settings = {"spec": asdict(spec), "model": spec.model_label, "setting": spec.setting,
                "bn_sparsity": spec.resolved_bn_sparsity, "teacher": TEACHER_NOTE,
                "accuracy": "last-epoch test accuracy (a fraction, 0-1), meta['test_acc'] of each checkpoint"}
    cells = [{"seed": r.cell.seed, "name": r.cell.name, "phase": r.cell.phase, "train_type": r.cell.train_type,
              "column": r.cell.column, "path": r.cell.file, "sha256": r.sha256, "test_acc": r.test_acc,
              "source": r.cell.source, "distill": r.cell.distill, "teacher": r.cell.teacher, "pruning": r.pruning}
             for r in records]
    doc = envelope("pipeline", settings, {"cells": cells, "files": {k: p.name for k, p in files.items()}},
                   format="kdprobe-pipeline", format_version=2)
    atomic_write_text(files["pipeline_json"], json.dumps(json_ready(doc), indent=2, allow_nan=False) + "\n")
    return PipelineResult(out_dir, tuple(records), tuple(rows), tuple(surplus), files, warnings)
