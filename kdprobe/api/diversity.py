"""Diversity, surplus and evaluation from Python: kdprobe.diversity, kdprobe.surplus and kdprobe.evaluate.

`diversity` and `evaluate` take checkpoints as paths or globs, `kdprobe.Checkpoint` objects or plain
`torch.nn.Module`s (then `dataset=` names their data), fit the dataset's images to every model (size,
normalization) and return a result with .to_dict() (the command's --json document), .to_frame() (its
--csv table), .save(path) (the command's writers, by suffix) and .figure() (plotly). Keyword arguments
are the CLI's options with the CLI's defaults; `kdprobe diversity|surplus|eval` call these functions."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from kdprobe.api.results import FIGURE_SUFFIXES, checked_output, data_frame, save_figure, suffix_of
from kdprobe.errors import KdprobeError
from kdprobe.probes.checkpoint_set import stderr_note

__all__ = ["DiversityResult", "EvaluationResult", "SurplusResult", "diversity", "evaluate", "surplus"]

_HTML = {".html": "html", ".htm": "html"}
_FILES = {".json": "json", ".csv": "csv", **_HTML, **FIGURE_SUFFIXES}


@contextmanager
def _placed(model, device):
    """The model on `device` for the block, then back where it was (a user's model stays on its device)."""
    first = next(model.parameters(), None)
    home = first.device if first is not None else None
    model.to(device)
    try:
        yield model
    finally:
        if home is not None:
            model.to(home)


def _write_html(figure, path) -> None:
    from kdprobe.files.io import atomic_path

    with atomic_path(path) as tmp:
        figure.write_html(str(tmp), include_plotlyjs=True, full_html=True)


# ---- diversity ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DiversityResult:
    """The result of kdprobe.diversity: the Jacobian-correlation score of every checkpoint and its group.

    table: the kdprobe.probes.diversity_table.DiversityTable: .settings (DiversitySettings: how the scores were
    measured, the reference group as resolved), .scores (one ModelScore per checkpoint: path, group, seed, the R
    raw per-batch values and their mean) and .groups (one GroupStats per group: mean, std, sem, interval, Welch
    p and its Holm adjustment, Hedges' g vs the reference, whether a lone checkpoint's batch values were used)."""

    table: object
    command: ClassVar[str] = "diversity"

    @property
    def settings(self):
        return self.table.settings

    @property
    def scores(self) -> tuple:
        return self.table.scores

    @property
    def groups(self) -> tuple:
        return self.table.groups

    def to_dict(self) -> dict:
        """The document --json writes: kdprobe_version, machine, probe, settings, models (raw scores) and groups."""
        from kdprobe.writers.diversity_files import diversity_document

        return diversity_document(self.scores, self.groups, self.settings)

    def to_frame(self, table: str = "scores"):
        """A pandas DataFrame: 'scores' (default) is the --csv table, one row per checkpoint per probe batch with
        every setting as columns; 'groups' is one row per group (the JSON's groups)."""
        from dataclasses import asdict

        from kdprobe.writers.diversity_files import diversity_records

        if table == "scores":
            return data_frame(diversity_records(self.scores, self.settings), "diversity result")
        if table == "groups":
            return data_frame([asdict(g) for g in self.groups], "diversity result")
        raise KdprobeError(f"diversity has no table {table!r}; it has scores, groups")

    def figure(self):
        """The plotly figure the --html page shows: every checkpoint's mean score, and each group's mean with
        its interval."""
        from kdprobe.writers.diversity_plot import diversity_figure

        return diversity_figure(self.table)

    def save(self, path: str | os.PathLike) -> Path:
        """Write by suffix: .json (as --json), .csv (the raw scores, as --csv), .html (the figure, as --html) or
        .pdf/.svg/.png (the figure as a static file, as --figures). Files are written atomically; another kind of
        file is never replaced."""
        from kdprobe.files.io import run_scope
        from kdprobe.writers.diversity_files import write_diversity_csv, write_diversity_json
        from kdprobe.writers.diversity_plot import write_diversity_html

        kind = suffix_of(path, _FILES, "DiversityResult")
        if kind in FIGURE_SUFFIXES.values():
            return save_figure(self.figure(), path, self.command)
        with run_scope():
            out = checked_output(self.command, path, kind)
            if kind == "json":
                write_diversity_json(self.scores, self.groups, self.settings, out)
            elif kind == "csv":
                write_diversity_csv(self.scores, self.groups, self.settings, out)
            else:
                write_diversity_html(self.table, out)
        return out


def diversity(checkpoints, *, runs: int = 5, batch_size: int = 128, split: str = "train", seed: int = 0,
              bn: str = "eval", output: str = "sum", variant: str = "v1", k: float = 1e-5, group_by: str = "method",
              reference: str | None = None, confidence: float = 0.99, interval: str = "t", device: str = "auto",
              dataset: str | None = None, data_dir=None, arch=None, arch_kwargs=None, image_size=None,
              note=None) -> DiversityResult:
    """The Jacobian-correlation score (Mellor et al. 2020; higher = more diverse) of every checkpoint, and per
    group the mean over its checkpoints with spread, interval and tests against the reference group.

    Every checkpoint is scored on the same `runs` probe batches of `batch_size` images drawn from `split` with
    `seed`; a checkpoint's unit value is the mean of its batch scores.
    checkpoints: paths or globs, kdprobe.Checkpoint objects or nn.Modules (with dataset=), all of one dataset.
    bn: eval | batch-frozen | train (BatchNorm during the probe; the model's state is restored afterwards).
    output: sum | full | pred (what is differentiated, v1). variant: v1 (eigenvalues of the Jacobian
    correlation, regularised by k) | v2 (log-determinant of the ReLU-code kernel).
    group_by: the metadata key naming a checkpoint's group. reference: the group others are tested against
    (Welch t, Holm-adjusted; Hedges' g); 'none' for no tests; default scratch where there is such a group.
    confidence / interval: the interval's level and quantile (t | normal). dataset / data_dir: the data to
    probe on (default: what the checkpoints recorded); arch / arch_kwargs / image_size as for kdprobe.load
    and the CLI. device: auto | cpu | cuda (one checkpoint on it at a time). note(text) receives remarks
    (default: printed to stderr).
    Returns a DiversityResult."""
    from tqdm import tqdm

    from kdprobe.checkpoints.inputs import check_model_data, require_distinct, same_data
    from kdprobe.data.datasets import load_dataset
    from kdprobe.data.preprocess import input_size_of, parse_image_size
    from kdprobe.probes.checkpoint_set import check_choice, collect_checkpoints, reference_or_none
    from kdprobe.probes.diversity import BN_MODES, OUTPUTS, VARIANTS, jacobian_scores, probe_batches
    from kdprobe.probes.diversity_table import DiversitySettings, DiversityTable, ModelScore, summarize_groups
    from kdprobe.ranges import MAX_BATCH, PROBE_RANGES, Range
    from kdprobe.runtime.devices import resolve_device
    from kdprobe.stats import INTERVALS

    note = note or stderr_note
    for name, value, allowed in (("--bn", bn, BN_MODES), ("--output", output, OUTPUTS), ("--variant", variant, VARIANTS),
                                 ("--interval", interval, INTERVALS), ("--split", split, ("train", "test"))):
        check_choice(name, value, allowed)
    for name, value in (("runs", runs), ("seed", seed), ("k", k), ("confidence", confidence)):
        PROBE_RANGES[name].check(value, f"--{name}")
    Range(int, 2, MAX_BATCH).check(batch_size, "--batch-size")
    ref = reference_or_none(reference)
    dev = resolve_device(device)
    size = parse_image_size(image_size)

    loaded = collect_checkpoints(checkpoints, arch=arch, arch_kwargs=arch_kwargs, dataset=dataset)
    unknown = [str(ck.path) for ck in loaded if not ck.meta.get("dataset")]
    if unknown and dataset is None:
        raise KdprobeError(f"expected every checkpoint to record its dataset, got none in {unknown[0]} (a foreign "
                           "file?); pass --dataset (and --data-dir) to probe it")
    require_distinct(loaded, "models")  # a copied file is not a second trained model
    first = loaded[0].meta
    # one dataset: equal content fingerprints (a moved folder is the same data), else equal names
    other = None if dataset is not None else next((ck for ck in loaded if same_data(ck.meta, first) is False or (
        same_data(ck.meta, first) is None and str(ck.meta["dataset"]) != str(first["dataset"]))), None)
    if other is not None:
        raise KdprobeError(f"expected checkpoints of one dataset, got {loaded[0].path} trained on "
                           f"{loaded[0].meta['dataset']} and {other.path} on {other.meta['dataset']} (other data); "
                           "probe each dataset separately")
    missing = [str(ck.path) for ck in loaded if ck.meta.get(group_by) is None]
    if missing:
        raise KdprobeError(f"expected metadata key {group_by!r} in every checkpoint, missing in {missing[0]}; "
                           f"pass another --group-by (e.g. method or seed)")
    names = sorted({str(ck.meta[group_by]) for ck in loaded})
    if reference is None:
        ref = "scratch" if "scratch" in names else None
    elif ref is not None and ref not in names:  # before any scoring
        raise KdprobeError(f"expected the reference group {ref!r} among the groups {names}; pass one of them with "
                           "--reference (or --reference none)")
    explicit = dataset is not None
    data = load_dataset(*loaded[0].data_source(dataset, data_dir))
    x_all, _ = data.split(split)
    fits = set()
    for ck in loaded:  # input shape, classes and data identity, before any scoring
        text = check_model_data(ck, data, explicit=explicit, image_size=size)
        if text:
            note(text)
        fits.add(input_size_of(ck.model))
    if len(fits) > 1:  # the scores are taken w.r.t. the stored images, but their models see other sizes
        note(f"note: the checkpoints take different image sizes ({', '.join(str(f or 'native') for f in fits)}); "
             "every Jacobian is taken w.r.t. the stored images")
    row = x_all[0].numel() * (data.num_classes if output == "full" else 1)
    if variant == "v1" and batch_size > row - 1:
        raise KdprobeError(f"expected --batch-size <= {row - 1} for Jacobian rows of length {row} "
                           f"({tuple(x_all.shape[1:])} inputs, --output {output}), got {batch_size}; the correlation "
                           f"matrix would be singular, so use --batch-size {min(row - 1, len(x_all))} or --output full")

    batches = [b.to(dev) for b in probe_batches(data, split, runs, batch_size, seed)]
    scores = []
    for ck in tqdm(loaded, desc="diversity", unit="ckpt", file=sys.stderr, dynamic_ncols=True):
        with _placed(ck.model, dev):  # one checkpoint on the device at a time
            vals = jacobian_scores(ck.model, batches, variant=variant, bn=bn, output=output, k=k)
        scores.append(ModelScore.from_values(str(ck.path), str(ck.meta[group_by]), ck.meta.get("seed"), vals))
    groups = summarize_groups(scores, reference=ref, confidence=confidence, interval=interval)
    settings = DiversitySettings(batch_size=batch_size, runs=runs, split=split, bn=bn, output=output, variant=variant,
                                 k=k, seed=seed, dataset=data.name, group_by=group_by, reference=ref,
                                 confidence=confidence, interval=interval)
    return DiversityResult(DiversityTable(settings, tuple(scores), tuple(groups)))


# ---- surplus --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SurplusResult:
    """The result of kdprobe.surplus: how much more KD gains after pruning, per (model, setting, KD type).

    rows: one kdprobe.probes.surplus.SurplusRow per (model, setting, KD type): the mean, std and n of its four
    inputs, gain_unpruned, gain_pruned, surplus and surplus_se (None where undefined). results: the runs read
    from the table (kdprobe.probes.surplus.ResultRow, accuracies as fractions 0-1). source: the table's path."""

    rows: tuple
    results: tuple = field(repr=False)
    source: Path
    command: ClassVar[str] = "surplus"

    @property
    def from_percent(self) -> bool:
        """True when the table held percents (0-100), converted to fractions (/100) like every kdprobe output."""
        return bool(self.results) and self.results[0].from_percent

    def to_dict(self) -> dict:
        """The document --json writes: format, version, formula, spread and rows (undefined values None)."""
        from kdprobe.writers.surplus_files import surplus_document

        return surplus_document(self.rows)

    def to_frame(self):
        """The --csv table as a pandas DataFrame, one row per (model, setting, KD type); values at full
        precision (the CSV rounds them to 10 significant digits), undefined ones missing."""
        from kdprobe.writers.surplus_files import surplus_records

        return data_frame(surplus_records(self.rows), "surplus result")

    def figure(self):
        """A plotly bar chart of the surplus ± se per (model, setting), one colour per KD type (the command
        draws none; .save('x.html') writes it)."""
        from kdprobe.writers.surplus_files import surplus_figure

        return surplus_figure(self.rows)

    def save(self, path: str | os.PathLike) -> Path:
        """Write by suffix: .json (as --json), .csv (as --csv), .html (the figure) or .pdf/.svg/.png (the figure
        as a static file). Files are written atomically; another kind of file is never replaced, nor the input
        table."""
        from kdprobe.files.io import run_scope
        from kdprobe.writers.surplus_files import write_surplus_csv, write_surplus_html, write_surplus_json

        kind = suffix_of(path, _FILES, "SurplusResult")
        if kind in FIGURE_SUFFIXES.values():
            return save_figure(self.figure(), path, self.command, {"RESULTS_CSV": self.source})
        with run_scope():
            out = checked_output(self.command, path, kind, {"RESULTS_CSV": self.source})
            {"json": write_surplus_json, "csv": write_surplus_csv, "html": write_surplus_html}[kind](self.rows, out)
        return out


def surplus(results_csv: str | os.PathLike, *, note=None) -> SurplusResult:
    """The surplus of knowledge distillation after pruning, averaged over runs:
    (SelfDistill - Finetuned_scratch) - (Unpruned_KD - Unpruned_scratch), with its standard error.

    results_csv: a UTF-8 CSV with header model,setting,train_type,unpruned,finetuned,post_distill,pre_post,
    self_distill, one row per run (extra columns are ignored; # starts a comment line). Accuracies as fractions
    (0-1, docs/units.md); a file in percent (0-100) is converted (note(text) is told; default: stderr), a mix is
    refused. Gains and the surplus come back as fractions too (0.0123 = 1.23 accuracy points).
    Returns a SurplusResult; a table without any KD row is a KdprobeError."""
    from kdprobe.probes.surplus import compute_surplus, read_results_csv

    note = note or stderr_note
    results = read_results_csv(results_csv)
    rows = compute_surplus(results)
    if not rows:
        raise KdprobeError(f"expected at least one KD row (train_type other than scratch) in {results_csv}, got none")
    if results[0].from_percent:
        note(f"note: the accuracies in {results_csv} are percents (some exceed 1), so they were divided by 100: "
             "kdprobe writes every accuracy as a fraction (0-1)")
    return SurplusResult(tuple(rows), tuple(results), Path(results_csv))


# ---- evaluation -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvaluationResult:
    """The result of kdprobe.evaluate: loss and accuracy of each checkpoint.

    rows: one dict per checkpoint in order: checkpoint (its path, or moduleN), method, seed, dataset, and per
    split evaluated {split}_loss (mean cross-entropy, nats), {split}_acc (top-1, a fraction 0-1) and
    {split}_images (how many were evaluated). split: test, train or both."""

    rows: tuple
    split: str
    command: ClassVar[str] = "eval"

    def records(self) -> list[dict]:
        """One record per checkpoint (copies): the --csv table."""
        return [dict(r) for r in self.rows]

    def to_dict(self) -> dict:
        """The document --json writes (kdprobe.files.documents.envelope): kind "eval", kdprobe_version, units,
        settings {split, augmentation, bn}, data (one record per checkpoint, as records())."""
        from kdprobe.files.documents import envelope

        return envelope("eval", {"split": self.split, "augmentation": "none", "bn": "eval"}, self.records())

    def to_frame(self):
        """The --csv table as a pandas DataFrame, one row per checkpoint."""
        return data_frame(self.records(), "evaluation result")

    def figure(self):
        """A plotly bar chart of each checkpoint's accuracy per split evaluated (the command draws none;
        .save('x.html') writes it)."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for s in (("test", "train") if self.split == "both" else (self.split,)):
            fig.add_trace(go.Bar(x=[r["checkpoint"] for r in self.rows], y=[r[f"{s}_acc"] for r in self.rows],
                                 name=f"{s} accuracy", customdata=[r[f"{s}_loss"] for r in self.rows],
                                 hovertemplate="%{x}<br>acc %{y:.4f}<br>loss %{customdata:.4f}<extra></extra>"))
        fig.update_layout(title="Accuracy per checkpoint (no augmentation, BN in eval mode)", barmode="group",
                          template="plotly_white", yaxis_title="top-1 accuracy (fraction correct)",
                          xaxis_title="checkpoint")
        return fig

    def save(self, path: str | os.PathLike) -> Path:
        """Write by suffix: .json (as --json), .csv (as --csv), .html (the figure) or .pdf/.svg/.png (the figure
        as a static file). Files are written atomically; another kind of file is never replaced, nor an evaluated
        checkpoint."""
        import json

        from kdprobe.files.io import atomic_write_text, run_scope
        from kdprobe.writers.probe_files import write_records_csv

        kind = suffix_of(path, _FILES, "EvaluationResult")
        inputs = {"CHECKPOINTS": [r["checkpoint"] for r in self.rows if Path(r["checkpoint"]).exists()]}
        if kind in FIGURE_SUFFIXES.values():
            return save_figure(self.figure(), path, self.command, inputs)
        with run_scope():
            out = checked_output(self.command, path, kind, inputs)
            if kind == "json":
                atomic_write_text(out, json.dumps(self.to_dict(), indent=2, default=str) + "\n")
            elif kind == "csv":
                write_records_csv(self.records(), out)
            else:
                _write_html(self.figure(), out)
        return out


def evaluate(checkpoints, *, split: str = "test", dataset: str | None = None, data_dir=None, arch=None,
             arch_kwargs=None, image_size=None, device: str = "auto", note=None) -> EvaluationResult:
    """Mean cross-entropy loss and top-1 accuracy (a fraction 0-1) of each checkpoint on its dataset (no augmentation,
    BatchNorm in eval mode).

    checkpoints: paths or globs, kdprobe.Checkpoint objects or nn.Modules (with dataset=); they may come from
    different datasets (each is evaluated on its own, unless dataset= names one for all). split: test | train |
    both. dataset / data_dir / arch / arch_kwargs / image_size: as for the CLI. device: auto | cpu | cuda (one
    checkpoint on it at a time). Every checkpoint is loaded and checked against its data before any runs;
    note(text) receives remarks (default: printed to stderr).
    Returns an EvaluationResult."""
    from tqdm import tqdm

    from kdprobe.checkpoints.inputs import check_model_data
    from kdprobe.data.datasets import load_dataset
    from kdprobe.data.preprocess import parse_image_size
    from kdprobe.probes.checkpoint_set import collect_checkpoints
    from kdprobe.probes.evaluate import evaluate as run_eval
    from kdprobe.runtime.devices import resolve_device

    note = note or stderr_note
    if split not in ("test", "train", "both"):
        raise KdprobeError(f"expected --split test, train or both; got {split!r}")
    dev = resolve_device(device)
    size = parse_image_size(image_size)
    loaded = collect_checkpoints(checkpoints, arch=arch, arch_kwargs=arch_kwargs, dataset=dataset)
    cache, todo = {}, []
    for ck in loaded:  # every checkpoint is checked against its data before any evaluation runs
        name, ddir = ck.data_source(dataset, data_dir)
        key = (name, str(ddir))
        if key not in cache:
            cache[key] = load_dataset(name, ddir)
        text = check_model_data(ck, cache[key], explicit=dataset is not None, image_size=size)
        if text:
            note(text)
        todo.append((ck, cache[key]))
    rows = []
    for ck, data in tqdm(todo, desc="eval", unit="ckpt", file=sys.stderr, dynamic_ncols=True, disable=len(todo) < 2):
        row = {"checkpoint": str(ck.path), "method": ck.method, "seed": ck.meta.get("seed"), "dataset": data.name}
        with _placed(ck.model, dev):
            for s in (("test", "train") if split == "both" else (split,)):
                x, y = data.split(s)
                r = run_eval(ck.model, x, y, data.mean, data.std)
                row[f"{s}_loss"], row[f"{s}_acc"], row[f"{s}_images"] = r.loss, r.acc, r.n
        rows.append(row)
    return EvaluationResult(tuple(rows), split)
