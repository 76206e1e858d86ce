"""kdprobe.pipeline: the pruning pipeline of `kdprobe pipeline pruning` from Python, and its result.

    r = kdprobe.pipeline(out="runs/digits-l1", model="resnet8a", width=0.5, remaining="0.4,0.7,0.9",
                         seeds="0,1", preset="fast", epochs=2, finetune_epochs=1, quiet=True)
    r.to_frame()                    # results.csv's rows: one per seed and train type
    r.to_frame("surplus"), r.to_frame("cells"), r.save("pipeline.html")

Keyword arguments carry the command's option names and defaults (`--finetune-epochs` is finetune_epochs=);
the command parses its options, calls this function and prints what it returns, so the same inputs give
the same checkpoints and numbers from both. Like kdprobe.api.training, this module imports the trainers
(and trackers, Slurm) only when a function runs, so `import kdprobe` never loads them."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from kdprobe.api.results import FIGURE_SUFFIXES, checked_output, data_frame, save_figure, suffix_of
from kdprobe.errors import KdprobeError
from kdprobe.probes.surplus import VALUE_COLUMNS
from kdprobe.ranges import SEED, abbreviate

__all__ = ["pipeline", "PipelineResult", "PipelineCell", "cell_line"]

TABLES = ("results", "surplus", "cells")  # PipelineResult.table names; the first is the default
_SAVE_SUFFIXES = {".json": "json", ".csv": "csv", ".html": "html", ".htm": "html"}


# ---- the result ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PipelineCell:
    """One checkpoint the pipeline made or found.

    name: its file stem (scratch, kd-label_pruned, self_distill-label, ...); seed; phase: scratch, kd, prune,
    finetune, pre_distill, post_distill, pre_post or self_distill; train_type: its results row (scratch or
    the KD type); column: the results column it fills (None for pruned checkpoints); path: the checkpoint
    (OUT/seedS/NAME.pt); sha256: its hash; test_acc: its last-epoch test accuracy (a fraction 0-1; None for
    pruned checkpoints, which are not evaluated); action: trained, pruned or skipped (it existed and was
    checked to be this cell's); seconds: the time this run spent on it; source: the cell it starts from
    (pruned from or fine-tuned from); distill: its KD loss (none or the KD type); teacher: its teacher cell;
    pruning: parameters and MACs before and after, for pruned cells."""

    name: str
    seed: int
    phase: str
    train_type: str
    column: str | None
    path: Path
    sha256: str
    test_acc: float | None
    action: str
    seconds: float
    source: str | None = None
    distill: str = "none"
    teacher: str | None = None
    pruning: dict | None = field(default=None, repr=False)

    @property
    def file(self) -> str:
        """The checkpoint relative to the pipeline folder: seedS/NAME.pt (as pipeline.json names it)."""
        return f"seed{self.seed}/{self.name}.pt"

    def record(self) -> dict:
        """The cell as one flat row of the cells table (the path as text, the pruning sizes as columns)."""
        p = self.pruning or {}
        return {"seed": self.seed, "name": self.name, "phase": self.phase, "train_type": self.train_type,
                "column": self.column, "file": self.file, "path": str(self.path), "sha256": self.sha256,
                "test_acc": self.test_acc, "action": self.action, "seconds": self.seconds, "source": self.source,
                "distill": self.distill, "teacher": self.teacher,
                **{k: p.get(k) for k in ("params_before", "params_after", "flops_before", "flops_after")}}


@dataclass(frozen=True, eq=False)
class PipelineResult:
    """A finished pruning pipeline: its folder and what it wrote there.

    out: the folder (seedS/*.pt, results.csv, surplus.csv, surplus.json, pipeline.json); cells: every cell
    (PipelineCell) in the order they ran; rows: the results.csv rows (dicts: model, setting, train_type, seed
    and the accuracies unpruned, finetuned, post_distill, pre_post, self_distill as fractions 0-1, None where
    the train type has none); surplus: one kdprobe.probes.surplus.SurplusRow per KD type (averaged over
    seeds, with its standard error); files: label -> path of each table file; warnings: what pruning
    remarked, as 'seedS/CELL.pt: text'; document: pipeline.json as written; spec: the
    trainers.pipeline.PipelineSpec the options made."""

    out: Path
    cells: tuple[PipelineCell, ...] = field(repr=False)
    rows: tuple[dict, ...] = field(repr=False)
    surplus: tuple = field(repr=False)
    files: dict = field(repr=False)
    document: dict = field(repr=False)
    spec: object = field(default=None, repr=False)
    warnings: tuple[str, ...] = ()

    @property
    def model(self) -> str:
        """The model column: registry name plus non-default kwargs (resnet8a-width0.25)."""
        return self.document["settings"]["model"]

    @property
    def setting(self) -> str:
        """Percent remaining as the paper's tables write it: '40/70/90', '50' (+ ' skip B')."""
        return self.document["settings"]["setting"]

    def tables(self) -> dict[str, list[dict]]:
        """Every table by name: results (results.csv's rows), surplus (surplus.csv's, at full precision) and
        cells (one row per checkpoint)."""
        from kdprobe.writers.surplus_files import surplus_records

        return {"results": [dict(r) for r in self.rows], "surplus": surplus_records(self.surplus),
                "cells": [c.record() for c in self.cells]}

    def table(self, name: str | None = None) -> list[dict]:
        """The records of one table: results (default), surplus or cells."""
        name = TABLES[0] if name is None else name
        if name not in TABLES:
            raise KdprobeError(f"a pipeline result has no table {name!r}; it has {', '.join(TABLES)}")
        return self.tables()[name]

    def to_dict(self) -> dict:
        """pipeline.json's document (kdprobe's JSON envelope, kind 'pipeline': the spec and settings under
        settings, every cell's phase, path, sha256, accuracy, source, teacher and pruning sizes under data)."""
        return json.loads(json.dumps(self.document))  # a copy: the result stays as the file is

    def to_frame(self, table: str | None = None):
        """One table as a pandas DataFrame: results (default; one row per seed and train type), surplus (one
        row per KD type) or cells (one row per checkpoint)."""
        return data_frame(self.table(table), "pipeline result")

    def figure(self):
        """Plotly figure in two panels: the test accuracy of each train type (scratch, each KD type) in each
        results column (unpruned, finetuned, post_distill, pre_post, self_distill; bars: the mean over seeds,
        error bars ± the sample std where there are several), and the surplus per KD type (± its standard
        error), all as fractions 0-1."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        from kdprobe.stats import summarize

        def plain(v):
            return None if v is None or v != v else float(v)  # nan (one seed: no spread) -> None

        seeds = sorted({r["seed"] for r in self.rows})
        fig = make_subplots(rows=1, cols=2, column_widths=[0.7, 0.3],
                            subplot_titles=[f"test accuracy (mean over {len(seeds)} seed{'s' * (len(seeds) > 1)}"
                                            f"{' ± std' if len(seeds) > 1 else ''})", "surplus ± se"])
        types = list(dict.fromkeys(r["train_type"] for r in self.rows))
        for c in VALUE_COLUMNS:  # one colour per results column, bars grouped by train type (the table's rows)
            values = {t: [r[c] for r in self.rows if r["train_type"] == t and r.get(c) is not None] for t in types}
            stats = {t: summarize(v) for t, v in values.items() if v}
            if not stats:
                continue
            fig.add_trace(go.Bar(x=list(stats), y=[s.mean for s in stats.values()], name=c, legendgroup=c,
                                 error_y=dict(type="data", array=[plain(s.std) for s in stats.values()],
                                              visible=len(seeds) > 1),
                                 customdata=[s.n for s in stats.values()],
                                 hovertemplate="%{x}: %{y:.4f} (n=%{customdata})<extra>%{fullData.name}</extra>"),
                          1, 1)
        kd = list(self.surplus)
        fig.add_trace(go.Bar(x=[s.kd_type for s in kd], y=[plain(s.surplus) for s in kd], name="surplus",
                             marker_color="#7f7f7f", showlegend=False,
                             error_y=dict(type="data", array=[plain(s.surplus_se) for s in kd],
                                          visible=any(plain(s.surplus_se) is not None for s in kd)),
                             hovertemplate="%{x}: surplus %{y:+.4f}<extra></extra>"), 1, 2)
        fig.update_yaxes(title_text="test accuracy (fraction)", row=1, col=1)
        fig.update_yaxes(title_text="surplus (fraction)", row=1, col=2)
        fig.update_xaxes(title_text="train type", row=1, col=1)
        fig.update_xaxes(title_text="KD type", row=1, col=2)
        fig.update_layout(title=f"{self.model} {self.setting}: pruning pipeline<br><sup>surplus = (self_distill - "
                                f"finetuned_scratch) - (unpruned_kd - unpruned_scratch)</sup>",
                          template="plotly_white", barmode="group", height=440, legend_title="results column")
        return fig

    def save(self, path: str | os.PathLike, *, table: str | None = None) -> Path:
        """Write by suffix: .json (to_dict, as pipeline.json), .csv (one table: results by default, as results.csv;
        surplus as surplus.csv; or cells), .html (the figure) or .pdf/.svg/.png (the figure as a static file).
        Atomic; another kind of file is never replaced, nor a file the pipeline wrote in its folder. Returns
        the path."""
        from kdprobe.files.io import atomic_write_text, run_scope

        kind = suffix_of(path, {**_SAVE_SUFFIXES, **FIGURE_SUFFIXES}, "pipeline result")
        inputs = {f"the pipeline's {p.name}": p for p in self.files.values()}
        if kind in FIGURE_SUFFIXES.values():
            return save_figure(self.figure(), path, "pipeline", inputs)
        if kind == "csv":
            self.table(table)  # an unknown table name is an error, not an empty file
        with run_scope():
            out = checked_output("pipeline", path, kind, inputs)
            if kind == "json":
                atomic_write_text(out, json.dumps(self.document, indent=2, allow_nan=False) + "\n")
            elif kind == "html":
                atomic_write_text(out, self.figure().to_html(include_plotlyjs=True, full_html=True))
            elif (table or TABLES[0]) == "results":
                from trainers.pipeline import write_results_csv

                write_results_csv(list(self.rows), out)
            elif table == "surplus":
                from kdprobe.writers.surplus_files import write_surplus_csv

                write_surplus_csv(self.surplus, out)
            else:
                from kdprobe.writers.probe_files import write_records_csv

                write_records_csv(self.table(table), out)
        return out


# ---- what the command prints for each cell -------------------------------------------------------------------

def cell_line(e) -> str:
    """The line `kdprobe pipeline pruning` prints for a trainers.pipeline.CellEvent: '[i/n] seed S CELL: training
    (...) ...' as a cell starts, its accuracy (or pruned size) and time when done, 'skip (exists, ...)' for a
    cell whose checkpoint was there."""
    c, head = e.cell, f"[{e.index}/{e.total}] seed {e.cell.seed} {e.cell.name}"
    if e.stage == "start":
        how = (f"from {c.source}" if c.source else "from random init") + (
            f", {c.distill} KD from {c.teacher}" if c.teacher else "")
        return f"{head}: training ({how}) ..." if e.action == "train" else f"{head}: pruning {c.source} ..."
    r = e.record
    if r.pruning:
        what = f"params {r.pruning['params_before']:,} -> {r.pruning['params_after']:,}"
    else:
        what = f"test acc {r.test_acc:.2%}"
    if e.action == "skip":
        return f"{head}: skip (exists, {what})"
    return f"{' ' * len(head)}  {what} ({r.seconds:.1f} s)"


def _stderr_events(quiet: bool) -> Callable:
    """pipeline()'s default on_event: warnings always, the cell lines unless quiet, on stderr."""
    def show(e) -> None:
        for w in e.warnings:
            print(f"warning: {w}", file=sys.stderr)
        if not quiet:
            print(cell_line(e), file=sys.stderr)

    return show


# ---- checking the options -----------------------------------------------------------------------------------

def _seeds(value) -> tuple[int, ...]:
    """--seeds: the CLI's text ('0,1,2'), one seed or a sequence of them; each in SEED's range."""
    if isinstance(value, str):
        items = [t.strip() for t in value.split(",")]
        if all(t.isdigit() and len(t) <= 19 and SEED.ok(int(t)) for t in items):
            return tuple(int(t) for t in items)
    else:
        items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
        if isinstance(items, (list, tuple)) and items and all(SEED.ok(v) for v in items):
            return tuple(int(v) for v in items)
    raise KdprobeError(f"expected --seeds as seeds from 0 to 2**63-1 separated by commas (e.g. 0,1,2) or a list of "
                       f"them, got {abbreviate(str(value))}")


def _text_list(value, flag: str) -> str:
    """--distill: the CLI's comma text, or a sequence of names."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    raise KdprobeError(f"expected {flag} as a comma list or a list of names, got {value!r}")


def _kd_settings(value) -> dict:
    """--kd-settings: None, a dict, or the CLI's JSON text."""
    if value is None:
        return {}
    if isinstance(value, str):
        from kdprobe.ranges import parse_json

        return parse_json(value, "--kd-settings")
    return value  # PipelineSpec checks its form (a dict of KD method -> a dict of settings)


def _check_numbers(width, train_subset, epochs, lr, batch_size, finetune_epochs, bn_sparsity) -> None:
    """The numeric options against the ranges the command checks them with at parse time."""
    from kdprobe.models.registry import WIDTH
    from trainers.config import RANGES

    for value, rng, flag in ((width, WIDTH, "--width"), (train_subset, RANGES["train_subset"], "--train-subset"),
                             (epochs, RANGES["epochs"], "--epochs"), (lr, RANGES["lr"], "--lr"),
                             (batch_size, RANGES["batch_size"], "--batch-size"),
                             (finetune_epochs, RANGES["epochs"], "--finetune-epochs"),
                             (bn_sparsity, RANGES["bn_sparsity"], "--bn-sparsity")):
        if value is not None:
            rng.check(value, flag)


# ---- the pipeline -------------------------------------------------------------------------------------------

def pipeline(*, out: str | os.PathLike, model: str = "resnet56", width: float | None = None, dataset: str = "digits",
             data_dir: str | os.PathLike | None = None, train_subset: int | None = None, method: str = "l1",
             remaining: str = "0.4,0.7,0.9", skip: str | None = None, distill: str | Sequence[str] = "label",
             kd_settings=None, seeds: str | int | Sequence[int] = "0", preset: str = "rnp", epochs: int | None = None,
             lr: float | None = None, batch_size: int | None = None, finetune_epochs: int | None = None,
             bn_sparsity: float | None = None, device: str = "auto", quiet: bool = False, executor: str = "local",
             partition: str | None = None, account: str | None = None, qos: str | None = None,
             time: str | int | None = None, gpus_per_cell: int | None = None, cpus_per_cell: int | None = None,
             mem_per_cell: str | None = None, array_parallelism: int | None = None, constraint: str | None = None,
             slurm: str | Sequence[str] | None = None, detach: bool = False, log: str | Sequence[str] | None = None,
             log_dir: str | os.PathLike | None = None, log_project: str | None = None,
             note: Callable[[str], None] | None = None,
             on_event: Callable[[object], None] | None = None) -> PipelineResult | None:
    """Run (or resume) one row block of the paper's pruning table: train scratch and KD teachers, prune them,
    fine-tune (Scratch, Pre-Distill, Post-Distill, Pre-Post, Self-Distill), then write results.csv, surplus.csv,
    surplus.json and pipeline.json in `out`. Cells whose checkpoints exist are checked and skipped, so calling
    it again resumes (a changed setting is refused: pick a new out).

    out: the folder (OUT/seedS/CELL.pt). model / width: registry name and width multiplier (resnet8a, width
    0.25: tiny). dataset: digits (embedded), cifar10, cifar100 (data_dir: torchvision's files) or
    imagefolder:PATH; train_subset: train on a seeded subset of this many images. method: l1 | slimming |
    weight; remaining: the fraction kept ('0.4,0.7,0.9': per stage for l1); skip: l1 blocks kept whole (A/B or
    stage.block items). distill: KD types, each its own results row ('label,feature' or a list; label, feature,
    at, fitnet, sp, rkd, pkt, crd, dkd); kd_settings: a dict or JSON text of each KD method's settings that
    differ, {"dkd": {"beta": 2}}. seeds: '0,1,2', one seed or a list: every seed runs every cell, the surplus
    averages over them. preset: the initial trainings' schedule (rnp, repdistiller, cutmix, fast), epochs /
    lr / batch_size over it; finetune_epochs: fine-tuning epochs (default 40, constant lr 0.001, batch 64);
    bn_sparsity: L1 lambda on BN scales in every initial training (default: slimming 1e-4 VGG, 1e-5 others;
    else 0). device: auto | cpu | cuda | cuda:N.
    quiet: no progress bars and (by default) no cell lines. note(text) receives the plan line ('pipeline:
    MODEL, ... -> OUT') once every option is checked (default: stderr, unless quiet); on_event(event) each
    trainers.pipeline.CellEvent as cells start and finish (default: cell_line(event) on stderr unless quiet,
    and pruning's warnings).
    executor: local, or slurm: every training (with the pruning of its result) a Slurm job through submitit
    (docs/cluster.md), with partition, account, qos, time, gpus_per_cell, cpus_per_cell, mem_per_cell,
    array_parallelism, constraint and slurm ('KEY=VALUE' sbatch options, one or a list); the tables are then
    written here. detach: return None once the jobs are submitted (`kdprobe study status OUT` shows them;
    calling again collects them and writes the tables).
    log: experiment trackers every training cell also logs to, 'tensorboard', 'wandb', 'mlflow' or a list
    (docs/trackers.md): one run per cell, named OUT-NAME/seedS/CELL, in log_dir (default OUT/logs), W&B project /
    MLflow experiment log_project (default kdprobe). Every option is checked before any file is touched.

    Returns a PipelineResult: the folder, the cells, the results and surplus rows (.to_frame(), .save(),
    .figure()); None when detached with cells left to run."""
    from kdprobe.files.io import run_scope
    from kdprobe.files.outputs import check_outputs
    from trainers import progress, study_slurm
    from trainers.pipeline import PipelineSpec, run_pruning_pipeline
    from trainers.trackers import default_dir, tracker_spec

    _check_numbers(width, train_subset, epochs, lr, batch_size, finetune_epochs, bn_sparsity)
    seed_list = _seeds(seeds)
    note = note or ((lambda text: None) if quiet else (lambda text: print(text, file=sys.stderr)))
    on_event = on_event or _stderr_events(quiet)
    out = Path(out)
    pairs = [slurm] if isinstance(slurm, str) else list(slurm or ())
    flags = dict(partition=partition, account=account, qos=qos, time=time, gpus_per_cell=gpus_per_cell,
                 cpus_per_cell=cpus_per_cell, mem_per_cell=mem_per_cell, array_parallelism=array_parallelism,
                 constraint=constraint)
    with run_scope():
        check_outputs("pipeline", {"--out": (out, "folder")})
        overrides = {k: v for k, v in (("epochs", epochs), ("lr", lr), ("batch_size", batch_size)) if v is not None}
        spec = PipelineSpec(model=model, model_kwargs={"width": width} if width is not None else {}, dataset=dataset,
                            data_dir=str(data_dir) if data_dir else None, train_subset=train_subset, method=method,
                            remaining=remaining, skip=skip, distill=_text_list(distill, "--distill"),
                            seeds=seed_list, preset=preset, train_overrides=overrides,
                            finetune_overrides={"epochs": finetune_epochs} if finetune_epochs is not None else {},
                            bn_sparsity=bn_sparsity, kd_settings=_kd_settings(kd_settings))
        trackers = tracker_spec(log, log_dir, log_project, default_dir=default_dir(out, folder=True),
                                default_project="kdprobe", run=out.name)
        study_slurm.check_executor(executor, flags, pairs, detach)
        options = (study_slurm.slurm_options(None, flags, pairs, where="slurm options") if executor == "slurm"
                   else None)
        note(f"pipeline: {spec.model_label}, {spec.method} pruning {spec.setting}, KD {','.join(spec.distill)}, "
             f"seeds {','.join(map(str, spec.seeds))}, bn_sparsity {spec.resolved_bn_sparsity:g} -> {out}")
        # executor slurm: each training (with the pruning of its result) a Slurm job; the run below then finds
        # every checkpoint made, checks it and writes the tables
        if executor == "slurm" and not study_slurm.run_pipeline_slurm(
                spec, out, options, device=device, detach=detach, progress=progress.TqdmStudyProgress(not quiet),
                trackers=trackers):
            return None
        res = run_pruning_pipeline(spec, out, device=device,
                                   progress_factory=lambda cell: progress.TqdmProgress(not quiet),
                                   on_event=on_event, trackers=trackers, run_prefix=f"{out.name}/")
    cells = tuple(PipelineCell(r.cell.name, r.cell.seed, r.cell.phase, r.cell.train_type, r.cell.column, r.path,
                               r.sha256, r.test_acc, r.action, r.seconds, r.cell.source, r.cell.distill, r.cell.teacher,
                               None if r.pruning is None else dict(r.pruning)) for r in res.cells)
    document = json.loads(res.files["pipeline_json"].read_text(encoding="utf-8"))
    return PipelineResult(res.out_dir, cells, tuple(dict(r) for r in res.rows), tuple(res.surplus), dict(res.files),
                          document, spec, tuple(res.warnings))
