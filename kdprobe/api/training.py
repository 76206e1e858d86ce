"""kdprobe.train, kdprobe.prune and kdprobe.study: make checkpoints and run whole studies from Python.

    r = kdprobe.train(out="runs/scratch.pt", model="resnet8b", width=0.25, preset="fast", epochs=3)
    r.test_acc, r.to_frame()                 # last-epoch accuracy; the per-epoch log as rows
    p = kdprobe.prune("runs/scratch.pt", method="weight", remaining="0.5", out="runs/pruned.pt")
    s = kdprobe.study("demo", out="demo-out")    # a built-in study or a .toml path
    s.to_frame(), s.save("report.html")

Keyword arguments carry the CLI's option names and defaults (`--batch-size` is batch_size=); the
`kdprobe train`, `kdprobe prune` and `kdprobe study` commands parse their options, call these functions
and print what they return, so the same inputs give the same checkpoints and numbers from both.

This module is the one place the library calls the trainers (the `trainers` package: the training
loop, its recipes, studies), which sit above `kdprobe` and import it. Each function here imports them
only when it runs, so `import kdprobe` never loads them (nor typer, nor the CLI)."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

from kdprobe.api.results import checked_output, data_frame, suffix_of
from kdprobe.errors import KdprobeError
from kdprobe.files.documents import json_ready
from kdprobe.ranges import Range

__all__ = ["train", "train_config", "train_config_toml", "prune", "study", "list_studies", "TrainResult",
           "PruneResult", "StudyResult"]

JOBS = Range(int, 1, 256)  # `kdprobe study --jobs`: cells trained at once
NPROC_PER_CELL = Range(int, 1, 1024)  # `kdprobe study --nproc-per-cell`: torchrun processes per cell


# ---- shared helpers ---------------------------------------------------------------------------------------

def _write_json(doc: dict, path: Path) -> None:
    from kdprobe.files.io import atomic_write_text

    atomic_write_text(path, json.dumps(json_ready(doc), indent=1, allow_nan=False, default=str) + "\n")


def _write_figure(fig, path: Path) -> None:
    """A figure as a self-contained offline page (plotly.js inlined)."""
    from kdprobe.files.io import atomic_write_text

    atomic_write_text(path, fig.to_html(include_plotlyjs=True, full_html=True))


def _save_by_suffix(command: str, path, writers: dict, inputs: dict | None = None, figure=None) -> Path:
    """Write `path` with writers[kind] (kinds by suffix: .json, .csv, .html/.htm, .md), under the CLI's output
    rules: never over another kind of file, never over an input (the checkpoint itself). figure: a callable
    giving the result's plotly figure, so .pdf/.svg/.png write it as a static file (kdprobe.writers.static_figures)."""
    from kdprobe.api.results import FIGURE_SUFFIXES, save_figure
    from kdprobe.files.io import run_scope

    suffixes = {".json": "json", ".csv": "csv", ".html": "html", ".htm": "html", ".md": "text"}
    allowed = {s: k for s, k in suffixes.items() if k in writers}
    if figure is not None:
        allowed.update(FIGURE_SUFFIXES)
    kind = suffix_of(path, allowed, f"{command} result")
    if kind in FIGURE_SUFFIXES.values():
        return save_figure(figure(), path, command, inputs)
    with run_scope():
        out = checked_output(command, path, kind, inputs)
        writers[kind](out)
    return out


def _json_object(value, flag: str) -> dict | None:
    """A keyword-arguments option: None, a dict, or the CLI's JSON text (one-line error otherwise)."""
    if value is None:
        return None
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, str):
        from kdprobe.checkpoints.selection import json_kwargs

        return json_kwargs(value, flag)
    raise KdprobeError(f"expected {flag} as a dict or a JSON object like '{{\"width\": 0.5}}', got "
                       f"{type(value).__name__}")


def _milestones(value) -> tuple | None:
    """--milestones: the CLI's text ('150,180', '0.5,0.75') or a sequence of numbers; None = not given."""
    from trainers.config import MILESTONES_HELP, parse_milestones

    if value is None or isinstance(value, str):
        return parse_milestones(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                for v in value):
        return tuple(value) or None
    raise KdprobeError(f"expected --milestones as {MILESTONES_HELP}, got {value!r}")


def _arch_texts(value, flag: str):
    """--arch-kwargs for arch_choice: the CLI's JSON text(s), or a dict for every file."""
    if isinstance(value, dict):
        return json.dumps(value)
    if value is not None and not isinstance(value, (str, list, tuple)):
        raise KdprobeError(f"expected {flag} as a dict, JSON text or a list of FILE=JSON texts, got "
                           f"{type(value).__name__}")
    return value


def _line_figure(rows: list[dict], x: str, panels: Sequence[tuple[str, Sequence[str]]], title: str):
    """Plotly figure: one panel per (y title, columns) side by side, a line per column over `x`."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[t for t, _ in panels])
    xs = [r[x] for r in rows]
    for j, (ytitle, cols) in enumerate(panels, 1):
        for c in cols:
            fig.add_trace(go.Scatter(x=xs, y=[r.get(c) for r in rows], mode="lines+markers", name=c), 1, j)
        fig.update_xaxes(title_text=x, row=1, col=j)
        fig.update_yaxes(title_text=ytitle, row=1, col=j)
    fig.update_layout(title=title, template="plotly_white", height=420)
    return fig


# ---- train ------------------------------------------------------------------------------------------------

HISTORY_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "test_images")


@dataclass(frozen=True, eq=False)
class TrainResult:
    """One training run's checkpoint and what it records.

    path: the checkpoint (`out`); log: its per-epoch log OUT.jsonl; action: trained, resumed (a killed
    run's OUT.partial was continued) or existing (OUT was there and overwrite was off: nothing was trained,
    and what it records is returned as it is, not checked against these options); resumed_from_epoch: the
    epoch (with fraction) a resumed run continued from; config: the trainers.config.TrainConfig the options
    made (the file's own is meta["config"]). The metrics are read from the checkpoint on first use:
    meta (its whole metadata), test_acc (last epoch, a fraction 0-1), best_acc, history (one record per epoch).
    generations: with train(generations=K), the TrainResult of every generation of the chain, first to last
    (this result is the last one's); empty for a single run."""

    path: Path
    action: str
    config: object = field(repr=False)
    resumed_from_epoch: float | None = None
    generations: tuple = field(default=(), repr=False)  # generations=K: every generation's TrainResult, in order

    @property
    def log(self) -> Path:
        """The per-epoch log OUT.jsonl (one JSON record per epoch)."""
        return self.path.with_suffix(".jsonl")

    @cached_property
    def meta(self) -> dict:
        """The checkpoint's metadata (config, dataset, input shape, history, accuracies, versions, ...)."""
        from kdprobe.checkpoints.format import read_payload

        meta = read_payload(self.path).get("meta")
        if not isinstance(meta, dict):
            raise KdprobeError(f"{self.path} records no metadata; expected a checkpoint written by kdprobe train")
        return meta

    @property
    def test_acc(self) -> float:
        """Last-epoch test accuracy (a fraction 0-1), as the reference codes report."""
        return self.meta["test_acc"]

    @property
    def best_acc(self) -> float:
        """Best per-epoch test accuracy (a fraction 0-1)."""
        return self.meta["best_acc"]

    @property
    def history(self) -> list[dict]:
        """One record per epoch: epoch, lr, train_loss, train_acc, test_loss, test_acc, test_images, and a KD
        run's loss terms averaged like train_loss (train_ce and train_kd for label KD, ...)."""
        return [dict(r) for r in self.meta.get("history", [])]

    @property
    def checkpoint(self):
        """The checkpoint loaded: kdprobe.load(path) (model in eval mode, on the CPU)."""
        from kdprobe.api.loading import load

        return load(self.path)

    def to_dict(self) -> dict:
        """What the run records, in kdprobe's JSON envelope (kind 'train', kdprobe_version, units; settings: the
        run's config; data: the path and log, the action, the final metrics and the checkpoint's metadata,
        history included); non-finite numbers as None."""
        from kdprobe.files.documents import envelope

        m = self.meta
        doc = {"path": str(self.path),
               "log": str(self.log), "action": self.action, "resumed_from_epoch": self.resumed_from_epoch,
               "method": m.get("method"), "test_acc": m.get("test_acc"), "best_acc": m.get("best_acc"),
               "best_epoch": m.get("best_epoch"), "train_acc": m.get("train_acc"), "meta": m}
        if self.generations:
            doc["generations"] = [{"generation": (g.meta.get("generation") or {}).get("generation"),
                                   "path": str(g.path), "action": g.action, "method": g.meta.get("method"),
                                   "test_acc": g.meta.get("test_acc"),
                                   "teacher_sha256": (g.meta.get("teacher") or {}).get("sha256")}
                                  for g in self.generations]
        return json_ready(envelope("train", m.get("config"), doc))

    def to_frame(self):
        """The per-epoch log as a pandas DataFrame, one row per epoch."""
        return data_frame(self.history, "train result")

    def figure(self):
        """Plotly figure of the per-epoch curves: train and test loss, train and test accuracy."""
        return _line_figure(self.history, "epoch", [("loss", ("train_loss", "test_loss")),
                                                    ("accuracy (fraction)", ("train_acc", "test_acc"))],
                            f"{self.meta.get('method')} {self.meta.get('config', {}).get('model', '')} "
                            f"seed {self.meta.get('seed')}")

    def save(self, path: str | os.PathLike) -> Path:
        """Write the run's record by suffix: .json (to_dict), .csv (the per-epoch log), .html (the figure) or
        .pdf/.svg/.png (the figure as a static file, as --figures writes them). The checkpoint itself is already
        at .path (this never copies or rewrites it). Files are written atomically; another kind of file, or the
        checkpoint, is never replaced. Returns the path."""
        from kdprobe.writers.probe_files import write_records_csv

        return _save_by_suffix("train", path, {"json": lambda p: _write_json(self.to_dict(), p),
                                               "csv": lambda p: write_records_csv(self.history, p),
                                               "html": lambda p: _write_figure(self.figure(), p)},
                               {"the checkpoint": self.path}, figure=self.figure)


def train(*, out: str | os.PathLike | None = None, config: str | os.PathLike | None = None, model: str | None = None,
          dataset: str | None = None, data_dir: str | os.PathLike | None = None, download: bool = False,
          seed: int | None = None, preset: str | None = None, epochs: int | None = None, batch_size: int | None = None,
          lr: float | None = None, schedule: str | None = None, milestones=None, weight_decay: float | None = None,
          nesterov: bool | None = None, augment: str | None = None, cutmix_prob: float | None = None,
          cutmix_beta: float | None = None, distill: str | None = None, teacher: str | os.PathLike | None = None,
          teacher_arch: str | None = None, teacher_arch_kwargs=None, feature_layer: str | None = None,
          teacher_feature_layer: str | None = None, image_size=None, alpha: float | None = None,
          temperature: float | None = None, beta: float | None = None, bn_sparsity: float | None = None,
          init: str | os.PathLike | None = None, init_arch: str | None = None, init_arch_kwargs=None,
          model_kwargs=None, width: float | None = None, train_subset: int | None = None, kd_settings=None,
          generations: int | None = None, device: str = "auto", deterministic: bool = True, overwrite: bool = False,
          quiet: bool = False, log: str | Sequence[str] | None = None, log_dir: str | os.PathLike | None = None,
          log_project: str | None = None, progress=None) -> TrainResult:
    """Train one model (scratch, CutMix, AutoAugment, label/feature KD, the KD families, fine-tuning) and save a
    checkpoint (or a born-again chain of them).

    out: the checkpoint to write (.pt); OUT.partial holds the resume state while it runs (a killed run
    continues from it when called again), OUT.jsonl the per-epoch log. An existing OUT is left alone
    (action 'existing') unless overwrite=True, which replaces it only once the new one is complete.
    config: a TOML file of the run, in the form of a study cell (`kdprobe train --print-config` writes one;
    docs/train.md#config-files). Every training option left at None ('not given') takes the file's value, else
    the preset's, else its built-in default (`kdprobe train --help` says each); a value given here wins over the
    file's. train_config(...) gives the resolved config, train_config_toml(...) the file, without training.
    model: registry name (`kdprobe models`), default resnet20; with init= the model comes from that
    checkpoint, so model/width/model_kwargs are refused. preset: fast, repdistiller, rnp, cutmix or finetune;
    explicit options (epochs, batch_size, lr, schedule, milestones, weight_decay, nesterov) override it.
    milestones: '150,180' or '0.5,0.75' (fractions of the run), or a sequence of numbers.
    model_kwargs / teacher_arch_kwargs / init_arch_kwargs: a dict or JSON text. image_size: N or 'native'.
    distill: none | label (Hinton KD: alpha, temperature) | feature (beta, feature_layer) | at | fitnet | sp | rkd |
    pkt | crd | dkd (trainers.kd_families, reference defaults; kd_settings: a dict or JSON text of the settings
    that differ, e.g. {"beta": 6} for dkd). teacher: its checkpoint, or a list of them: label KD and DKD then
    distil from the average of the teachers' probabilities (feature methods take one teacher).
    generations: K > 0 trains a born-again chain instead of one run: generation g is taught by generation g-1
    (same options and seed), generation 1 by `teacher`, or without one by a generation 0 trained from scratch;
    each generation is its own checkpoint OUT stem + "-gen{g}" (runs/ba.pt -> runs/ba-gen1.pt, ...), a finished
    one is kept, an interrupted one resumes from its .partial.
    Every other option is `kdprobe train`'s (None: not given, as above); `kdprobe train --help` says more.
    quiet: no progress bar (else a tqdm bar and a line per epoch on stderr); progress: your own
    trainers.loop.Progress instead. log: experiment trackers every epoch and the config also go to,
    'tensorboard', 'wandb', 'mlflow' or a list of them (trainers.trackers, docs/trackers.md), in log_dir (default
    logs/ next to OUT), the run named after OUT's stem, W&B project / MLflow experiment log_project (default
    kdprobe). Every option is checked before any file is touched.

    Returns a TrainResult: the checkpoint path, the action, and (read from the file) its metadata,
    last-epoch and best test accuracy and per-epoch history."""
    options = dict(locals())  # every keyword argument, as given (first: nothing else is a local yet)
    from kdprobe.data.datasets import load_dataset
    from kdprobe.files.io import run_scope
    from kdprobe.files.outputs import check_outputs
    from trainers.loop import log_path, partial_path, train as run_train
    from trainers.progress import TqdmProgress
    from trainers.trackers import default_dir, tracker_spec

    out = Path(out) if out is not None else None
    with run_scope():
        # Everything is checked before any file is touched: options (the whole config, the --config file, the
        # init checkpoint), output paths; the loop then loads data, model and teacher and checks them before
        # its first write. An existing OUT is only ever replaced by a complete one.
        run = _train_run(options, out)
        if out is None:
            raise KdprobeError("--out is missing: pass the checkpoint to write, --out RUN.pt (out= in Python), or "
                               "--print-config to print the run's config without training (kdprobe.train_config_toml)")
        config, teachers, generations = run.config, [Path(t) for t in run.teachers], run.generations
        outs = [out] if not generations else [generation_path(out, g) for g in range(0 if not teachers else 1,
                                                                                     generations + 1)]
        roles, keep = {}, []
        for o in outs:
            tag = "" if o == out else f" ({o.stem})"
            roles.update({f"--out{tag}": (o, "checkpoint"), f"its resume state OUT.partial{tag}": (partial_path(o), "partial"),
                          f"its log OUT.jsonl{tag}": (log_path(o), "jsonl")})
            keep += [f"--out{tag}", f"its resume state OUT.partial{tag}"]
        init = Path(config.init) if config.init else None
        check_outputs("train", roles, {"--teacher": teachers, "--init": init}, overwrite=overwrite, keep=keep)
        trackers = tracker_spec(log, log_dir, log_project, default_dir=default_dir(out), default_project="kdprobe",
                                run=out.stem)
        logged = (lambda path: None) if trackers is None else (lambda path: replace(trackers, run=path.stem))
        if generations:
            chain = born_again_configs(config, outs, given_teacher=bool(teachers))
            if download:
                load_dataset(config.dataset, config.data_dir, download=True)
            done = []
            for g, (cfg, path, record) in chain.items():
                if path.exists() and not overwrite:
                    _check_generation(g, path, cfg)
                    done.append(TrainResult(path, "existing", cfg))
                    continue
                res = run_train(cfg, path, device=device, progress=progress or TqdmProgress(not quiet),
                                overwrite=overwrite, deterministic=deterministic, record={"generation": record},
                                trackers=logged(path))
                r = res.resumed_from_epoch
                done.append(TrainResult(res.path, "trained" if r is None else "resumed", cfg, r))
            last = done[-1]
            return TrainResult(last.path, last.action, last.config, last.resumed_from_epoch, tuple(done))
        if out.exists() and not overwrite:
            return TrainResult(out, "existing", config)
        if download:
            load_dataset(config.dataset, config.data_dir, download=True)
        res = run_train(config, out, device=device, progress=progress or TqdmProgress(not quiet),
                        overwrite=overwrite, deterministic=deterministic, trackers=logged(out))
    resumed = res.resumed_from_epoch
    return TrainResult(res.path, "trained" if resumed is None else "resumed", config, resumed)


def train_config(config: str | os.PathLike | None = None, **options):
    """The trainers.config.TrainConfig that train(config=config, **options) trains, resolved without training
    and without touching a file (a --init checkpoint is read for its model).

    Takes train's keyword arguments (those of the run alone, like device or quiet, change no config and are
    ignored). Precedence, lowest first: the built-in defaults, the preset, the config file, the keywords given.
    A born-again chain (generations=K) gives generation 1's config; without a teacher that is taught by
    generation 0's checkpoint, named after out (so pass out= then)."""
    opts = _train_options(config, options)
    out = Path(opts["out"]) if opts["out"] is not None else None
    run = _train_run(opts, out)
    if run.generations and not run.teachers and out is None:
        raise KdprobeError(f"generations={run.generations} without a teacher: generation 1 is taught by generation "
                           "0's checkpoint, OUT-gen0.pt; pass out= to name it")
    return run.config


def train_config_toml(config: str | os.PathLike | None = None, **options) -> str:
    """The TOML file of the run train(config=config, **options) would train: what `kdprobe train --print-config`
    prints, fully resolved (every setting with a value, the schedule included, so it depends on no preset or
    default), in the form of a study cell; `kdprobe train --config FILE` and train(config=FILE) train it, and
    reading it gives the same TrainConfig (docs/train.md#config-files). Takes train's keyword arguments, as
    train_config does; nothing is trained or written."""
    from trainers.train_file import to_toml

    return to_toml(_train_run(_train_options(config, options), None))


def _train_options(config, options: dict) -> dict:
    """train's keyword arguments for train_config / train_config_toml; a name train does not take is a TypeError."""
    import inspect

    known = set(inspect.signature(train).parameters)
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}; expected train's: {', '.join(sorted(known))}")
    return {**{k: None for k in known}, **options, "config": config}


def _train_run(options: dict, out: Path | None):
    """train's keyword arguments -> trainers.train_file.TrainRun: the --config file read, the options given
    over it, the whole config checked (OUT names generation 0 of a chain without a teacher)."""
    from kdprobe.data.preprocess import parse_image_size
    from trainers.config import GENERATIONS
    from trainers.train_file import read_train_file, resolve_run

    o = options
    if o["generations"] is not None:
        GENERATIONS.check(o["generations"], "--generations")
    file = read_train_file(o["config"]) if o["config"] is not None else None
    json_options = {name: _json_object(o[name], flag) for name, flag in (
        ("model_kwargs", "--model-kwargs"), ("teacher_arch_kwargs", "--teacher-arch-kwargs"),
        ("init_arch_kwargs", "--init-arch-kwargs"), ("kd_settings", "--kd-settings"))}
    typed = dict(
        {k: o[k] for k in ("model", "dataset", "seed", "preset", "epochs", "batch_size", "lr", "schedule",
                           "weight_decay", "nesterov", "augment", "cutmix_prob", "cutmix_beta", "distill",
                           "teacher_arch", "feature_layer", "teacher_feature_layer", "alpha", "temperature", "beta",
                           "bn_sparsity", "init_arch", "train_subset")},
        **json_options, data_dir=_path_text(o["data_dir"]), init=_path_text(o["init"]),
        milestones=_milestones(o["milestones"]), image_size=parse_image_size(o["image_size"]))
    # a chain without a teacher: generation 1's is generation 0 (trained from scratch first); without OUT a
    # stand-in name lets the config be checked (to_toml writes the teachers given, never this one)
    gen0 = str(generation_path(out if out is not None else Path("OUT.pt"), 0))
    return resolve_run(typed, teachers=_teacher_paths(o["teacher"]), generations=o["generations"], width=o["width"],
                       file=file, chain_teacher=gen0)


def _path_text(value) -> str | None:
    """A path option as the config records it: the text of its Path (data/ -> data); None = not given."""
    return None if value is None else str(Path(value))


def _teacher_paths(value) -> list[Path]:
    """--teacher: None, one path, or a list of paths (an ensemble of teachers)."""
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, os.PathLike)) for v in value):
        return [Path(v) for v in value]
    raise KdprobeError(f"expected --teacher as a checkpoint path or a list of them, got {type(value).__name__}")


def generation_path(out, g: int) -> Path:
    """Generation g's checkpoint of a born-again chain written to `out`: runs/ba.pt -> runs/ba-gen{g}.pt."""
    out = Path(out)
    return out.with_name(f"{out.stem}-gen{g}{out.suffix}")


GENERATION_RULE = ("generation g is taught by generation g-1 with the same options and seed; generation 1 by the "
                   "given teacher(s), or without one by generation 0, trained from scratch (no KD)")


def born_again_configs(config, outs: list[Path], given_teacher: bool) -> dict:
    """generation -> (its TrainConfig, its checkpoint, what meta["generation"] records) for a chain whose files are
    `outs` (generation_path of each generation, generation 0 first when no teacher is given); `config` is
    generation 1's."""

    from kdprobe.models.registry import names_code

    first = 1 if given_teacher else 0
    own_arch = config.model if names_code(config.model) else None  # python: models rebuild under their name
    chain = {}
    for k, path in enumerate(outs):
        g = first + k
        if g == 0:
            cfg = replace(config, distill="none", teacher=None, extra_teachers=(), kd_settings={}, teacher_arch=None,
                          teacher_arch_kwargs={}, feature_layer=None, teacher_feature_layer=None)
        elif g == 1 and given_teacher:
            cfg = config
        else:
            cfg = replace(config, teacher=str(outs[k - 1]), extra_teachers=(), teacher_arch=own_arch,
                          teacher_arch_kwargs={}, teacher_feature_layer=config.feature_layer)
        chain[g] = (cfg, path, {"generation": g, "first": first, "last": first + len(outs) - 1, "rule": GENERATION_RULE,
                                "teacher": None if g == 0 else ("given" if g == 1 and given_teacher
                                                                else f"generation {g - 1}")})
    return chain


def _check_generation(g: int, path: Path, config) -> None:
    """A kept generation must be this chain's: its config, and its teachers the files there now (trainers.cells)."""
    from kdprobe.checkpoints.format import read_payload
    from trainers.cells import check_cell

    teachers = [Path(t) for t in config.teachers]
    upstream = {"teachers": teachers} if teachers and all(t.exists() for t in teachers) else None
    check_cell(f"generation {g}", path, read_payload(path), config, upstream=upstream)


# ---- prune ------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class PruneResult:
    """One pruning of a checkpoint, written to `path`.

    arch: the architecture pruned; method: l1, slimming or weight; remaining, skip: as given; before /
    after: parameter and MAC counts (keys params, nonzero, flops, nonzero_flops; SIZE_LABELS names them)
    at the recorded input shape; info: what the pruned checkpoint records under meta["pruning"] (source,
    its sha256 and test accuracy, fractions, the l1 block widths or the slimming threshold, ...); warnings:
    remarks as text. Pruning does not evaluate: accuracy is the source's recorded one (fine-tune the
    pruned checkpoint with kdprobe.train(init=...) to measure it after)."""

    path: Path
    arch: str
    method: str
    remaining: str
    skip: str | None
    before: dict
    after: dict
    info: dict = field(repr=False)
    warnings: tuple[str, ...] = ()

    @property
    def checkpoint(self):
        """The pruned checkpoint loaded: kdprobe.load(path) (model in eval mode, on the CPU)."""
        from kdprobe.api.loading import load

        return load(self.path)

    def rows(self) -> list[dict]:
        """One row per step: 'before' (the source) and 'after' (the pruned network), with its sizes and test
        accuracy (the source's recorded one; None after, where nothing was measured)."""
        return [{"step": "before", **self.before, "test_acc": self.info.get("source_test_acc")},
                {"step": "after", **self.after, "test_acc": None}]

    def to_dict(self) -> dict:
        """What the command records, in kdprobe's JSON envelope (kind 'prune'; settings: the source, arch,
        method, remaining, skip; data: the path, sizes before/after, the pruning record of the checkpoint and
        the warnings)."""
        from kdprobe.files.documents import envelope

        settings = {"source": self.info.get("source"), "arch": self.arch, "method": self.method,
                    "remaining": self.remaining, "skip": self.skip}
        return json_ready(envelope("prune", settings, {"path": str(self.path), "before": self.before,
                                                       "after": self.after, "pruning": self.info,
                                                       "warnings": list(self.warnings)}))

    def to_frame(self):
        """rows() as a pandas DataFrame: step (before, after), params, nonzero, flops, nonzero_flops, test_acc."""
        return data_frame(self.rows(), "prune result")

    def figure(self):
        """Plotly bar figure of the sizes before and after (parameters and MACs, all and nonzero; log scale),
        with the source's test accuracy in the title."""
        import plotly.graph_objects as go

        from kdprobe.pruning import SIZE_LABELS

        keys = list(self.before)
        fig = go.Figure([go.Bar(name=step, x=[SIZE_LABELS[k] for k in keys], y=[sizes[k] for k in keys])
                         for step, sizes in (("before", self.before), ("after", self.after))])
        acc = self.info.get("source_test_acc")
        fig.update_layout(barmode="group", yaxis_type="log", template="plotly_white", height=420,
                          title=f"{self.arch}: {self.method} pruning, remaining {self.remaining}"
                                + (f" (source test accuracy {acc:.2%})" if isinstance(acc, (int, float)) else ""))
        return fig

    def save(self, path: str | os.PathLike) -> Path:
        """Write the pruning's record by suffix: .json (to_dict), .csv (rows()), .html (the figure) or
        .pdf/.svg/.png (the figure as a static file). The pruned checkpoint itself is already at .path (never
        copied or rewritten here). Returns the path."""
        from kdprobe.writers.probe_files import write_records_csv

        return _save_by_suffix("prune", path, {"json": lambda p: _write_json(self.to_dict(), p),
                                               "csv": lambda p: write_records_csv(self.rows(), p),
                                               "html": lambda p: _write_figure(self.figure(), p)},
                               {"the checkpoint": self.path}, figure=self.figure)


def _remaining_text(value) -> str:
    """--remaining as the CLI's text: '0.5', '0.4,0.7,0.9' (a number or a sequence of numbers is written so)."""
    if isinstance(value, str):
        return value
    numbers = [value] if isinstance(value, (int, float)) else value
    if isinstance(numbers, (list, tuple)) and numbers and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        return ",".join(f"{float(v):g}" for v in numbers)
    raise KdprobeError(f"expected --remaining as a fraction in (0, 1] or one per stage ('0.4,0.7,0.9' or a list "
                       f"of numbers), got {value!r}")


def prune(checkpoint: str | os.PathLike, *, method: str, remaining: str | float | Sequence[float],
          out: str | os.PathLike, skip: str | None = None, arch=None, arch_kwargs=None, overwrite: bool = False,
          note: Callable[[str], None] | None = None) -> PruneResult:
    """Prune a checkpoint; structured methods write a physically smaller network, weight pruning writes masks.

    checkpoint: kdprobe's, or another codebase's (arch= names its architecture where detection cannot).
    method: l1 (Li 2016; basic-block CIFAR ResNets) | slimming (Liu 2017; BN-scale channels) | weight
    (Han 2015; any model with Conv2d layers). remaining: the fraction kept in (0, 1]; for l1 one value or
    one per stage ('0.4,0.7,0.9' or a sequence). skip: l1 only, blocks kept whole ('1.8,1.9' or a preset
    A, B, resnet56-B, resnet110-B). arch / arch_kwargs: `kdprobe prune --arch/--arch-kwargs` (NAME, a dict or
    JSON text). out: the pruned checkpoint; an existing one is replaced only with overwrite=True (and only
    a checkpoint `prune` made). note(text) receives warnings (default: printed to stderr).

    Returns a PruneResult: the path, sizes before and after, the pruning record and the warnings."""
    from kdprobe.checkpoints.selection import arch_choice
    from kdprobe.files.io import run_scope
    from kdprobe.files.outputs import check_outputs
    from kdprobe.pruning import prune_checkpoint

    note = note or (lambda text: print(f"warning: {text}", file=sys.stderr))
    checkpoint, out = Path(checkpoint), Path(out)
    text = _remaining_text(remaining)
    with run_scope():
        archs = arch_choice(arch, _arch_texts(arch_kwargs, "--arch-kwargs"))
        archs.check_used([checkpoint])
        check_outputs("prune", {"--out": (out, "checkpoint")}, {"CHECKPOINT": checkpoint}, overwrite=overwrite)
        rep = prune_checkpoint(checkpoint, method, text, out, skip=skip, **archs.for_path(checkpoint))
    for w in rep.warnings:
        note(w)
    return PruneResult(rep.path, rep.arch, rep.method, text, skip, dict(rep.before), dict(rep.after), dict(rep.info),
                       tuple(rep.warnings))


# ---- study ------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class StudyResult:
    """A whole study: its folder and everything its report and summary.json show.

    out: the study folder (cells/, report.html, report.md, summary.json, cells.csv, ...); record: the
    kdprobe.studies.result.StudyResult the report is made from (cells, accuracy, diversity, probes,
    verdicts, landscapes, pruning blocks). table(name) gives its tables as flat records: cells (the
    results table, one row per trained checkpoint, as cells.csv), accuracy (per method), diversity and
    diversity_scores, verdicts, answers (per KD method: does it behave like an ensemble in these probes, the
    verdicts tallied), surplus and pruning_results (pruning blocks), and PROBE.TABLE for each
    ensemble-perspective probe (e.g. agreement.pairs)."""

    out: Path
    record: object = field(repr=False)

    @property
    def name(self) -> str:
        """The study's name (a built-in's, or the .toml file's stem)."""
        return self.record.name

    @property
    def files(self) -> dict[str, Path]:
        """label -> path of every file the study wrote (report, summary, tables, figures)."""
        return {k: self.out / v for k, v in self.record.files.items()}

    @property
    def main(self) -> str:
        """The results table: cells, or pruning_results for a study of pruning blocks only."""
        return "cells" if self.record.cells or not self.record.pruning else "pruning_results"

    def tables(self) -> dict[str, list[dict]]:
        """Every table of the study by name (see the class docstring)."""
        r = self.record
        cells = [{"method": c.method, "seed": c.seed, "model": c.model, "dataset": c.dataset, "test_acc": c.test_acc,
                  "best_acc": c.best_acc, "epochs": c.epochs, "in_study": c.in_study, "path": c.path,
                  "fingerprint": c.fingerprint, "teacher": c.teacher, "action": c.action, "seconds": c.seconds,
                  "world_size": c.world_size, "snapshots": " ".join(c.snapshots)} for c in r.cells]
        out = {"cells": cells, "accuracy": [asdict(g) for g in r.accuracy]}
        if r.diversity is not None:
            out["diversity"] = [asdict(g) for g in r.diversity.groups]
            out["diversity_scores"] = [asdict(s) for s in r.diversity.scores]
        if r.verdicts:
            from kdprobe.studies.ensemble_reading import method_answers

            out["verdicts"] = [asdict(v) for v in r.verdicts]
            out["answers"] = [{k: ", ".join(v) if isinstance(v, tuple) else v for k, v in asdict(a).items()}
                              for a in method_answers(r.verdicts)]
        if r.pruning:
            out["surplus"] = [{"block": b.label, **asdict(s)} for b in r.pruning for s in b.surplus]
            out["pruning_results"] = [{"block": b.label, **row} for b in r.pruning for row in b.results]
        for probe, t in r.probes.items():
            for name in t.tables:
                out[f"{probe}.{name}"] = t.table(name)
        return out

    def table(self, name: str | None = None) -> list[dict]:
        """The records of one table (the results table by default)."""
        name = name or self.main
        tables = self.tables()
        if name not in tables:
            raise KdprobeError(f"study {self.name} has no table {name!r}; it has {', '.join(tables)}")
        return tables[name]

    def to_dict(self) -> dict:
        """The document summary.json holds (every number of the study, nan as None)."""
        from kdprobe.studies.result import to_dict

        return to_dict(self.record)

    def to_frame(self, table: str | None = None):
        """One table as a pandas DataFrame (the results table, one row per checkpoint, by default)."""
        return data_frame(self.table(table), f"study {self.name} result")

    def figures(self) -> dict:
        """The plotly figures the report shows, by section: diversity, then each probe's. (The loss-landscape
        sections are contour and 3-D pages of their own: landscapes.html and the .h5/.vtk files.)"""
        from kdprobe.writers.diversity_plot import diversity_figure
        from kdprobe.writers.probe_plots import probe_figure
        from kdprobe.writers.report_probes import _readable

        figs = {}
        if self.record.diversity is not None:
            figs["diversity"] = diversity_figure(self.record.diversity)
        for probe, t in self.record.probes.items():
            figs[probe] = probe_figure(_readable(t)[0])  # as the report draws it (many pair types thinned)
        return figs

    def figure(self, section: str | None = None):
        """The plotly figure the report shows for one section (diversity or a probe's name); the first the
        report shows by default."""
        figs = self.figures()
        if not figs:
            raise KdprobeError(f"study {self.name}'s report shows no diversity or probe figure; see "
                               f"{self.out / 'report.html'} and .to_frame()")
        if section is None:
            return next(iter(figs.values()))
        if section not in figs:
            raise KdprobeError(f"study {self.name} has no figure {section!r}; it has {', '.join(figs)}")
        return figs[section]

    def save(self, path: str | os.PathLike, *, table: str | None = None) -> Path:
        """Write through the study's own writers, by suffix: .json (summary.json), .html (report.html), .md
        (report.md) or .csv (the results table as cells.csv, or the table named). Atomic; another kind of
        file is never replaced. Returns the path."""
        from kdprobe.writers.probe_files import write_records_csv
        from kdprobe.writers.report import write_cells_csv, write_report, write_summary_json
        from kdprobe.writers.report_markdown import write_report_markdown

        if Path(path).suffix.lower() == ".csv":
            self.table(table)  # an unknown table name is an error, not an empty file

        def csv(p):
            if (table or self.main) == "cells":
                write_cells_csv(self.record, p)
            else:
                write_records_csv(self.table(table), p)

        return _save_by_suffix("study", path, {"json": lambda p: write_summary_json(self.record, p),
                                               "html": lambda p: write_report(self.record, p),
                                               "text": lambda p: write_report_markdown(self.record, p),
                                               "csv": csv})


def list_studies() -> list[dict]:
    """The built-in studies: one record each with its name, scales, default scale and title."""
    from kdprobe.studies.spec import builtin_specs, read_spec

    rows = []
    for name, path in builtin_specs().items():
        tree, _, _ = read_spec(str(path))
        rows.append({"study": name, "scales": ", ".join(tree.get("scales", {})) or "-",
                     "default": tree.get("default_scale", "-"), "title": tree.get("title", "")})
    return rows


def study(name_or_spec: str | os.PathLike, *, out: str | os.PathLike, scale: str | None = None,
          set: str | Sequence[str] | None = None, dataset: str | None = None, data_dir: str | os.PathLike | None = None,
          device: str = "auto", jobs: int = 1, nproc_per_cell: int = 1, quiet: bool = False,
          note: Callable[[str], None] | None = None, progress=None, executor: str = "local",
          partition: str | None = None, account: str | None = None, qos: str | None = None,
          time: str | int | None = None, gpus_per_cell: int | None = None, cpus_per_cell: int | None = None,
          mem_per_cell: str | None = None, array_parallelism: int | None = None, constraint: str | None = None,
          slurm: str | Sequence[str] | None = None, detach: bool = False, figures: str = "pdf,png",
          log: str | Sequence[str] | None = None, log_dir: str | os.PathLike | None = None,
          log_project: str | None = None) -> StudyResult | None:
    """Run a whole study: train every method x seed cell (content-named, resumable), then its probes
    (accuracy, diversity, agreement, ensembles, calibration, CKA, sharpness with the ensemble-reading
    verdicts, landscapes, surplus), and write DIR/report.html, report.md, summary.json and cells.csv.

    name_or_spec: a built-in study (list_studies(): table6, table7, demo, pruning-l1, kd-families) or a .toml path.
    out: the study folder; running again resumes (finished cells are reused, never retrained).
    scale: which [scales.NAME] of the spec (digits, cifar10-cpu, paper; default its default_scale).
    set: 'KEY=VALUE' overrides with dotted keys and TOML values (e.g. 'train.overrides.epochs=3'), one
    or a list. dataset / data_dir: the data of every cell. device: auto | cpu | cuda | cuda:N.
    jobs: cells trained at once (each in its own process); nproc_per_cell: torchrun processes per cell.
    quiet: no progress bars or per-cell lines (else on stderr); progress: your own
    trainers.study.StudyProgress instead. note(text) receives the plan line ('study NAME (scale S): ...')
    before any training (default: stderr, unless quiet). The spec and every cell's config are checked
    before the folder is made.
    executor: local (this machine) or slurm: every cell a Slurm job through submitit (docs/cluster.md), with
    partition, account, qos, time (per cell: minutes or 1:30:00), gpus_per_cell, cpus_per_cell, mem_per_cell,
    array_parallelism, constraint and slurm ('KEY=VALUE' sbatch options, one or a list) over the spec's
    [slurm] table; nproc_per_cell K: K Slurm tasks per cell. detach: return None once the cells are
    submitted (`kdprobe study status OUT` shows them; calling again collects them and writes the report).
    figures: the static figures written to DIR/figures/ (numbered, captions.md; report.md embeds the PNGs), a
    comma-separated list of pdf, svg, png, or "none".
    log: experiment trackers the cells' trainings also log to, 'tensorboard', 'wandb', 'mlflow' or a list of
    them (trainers.trackers, docs/trackers.md): one run per trained cell, named METHOD/seedS, in log_dir
    (default OUT/logs), W&B project / MLflow experiment log_project (default the study's name).

    Returns a StudyResult: the folder, the record its report shows, its tables (.to_frame()) and figures."""
    from kdprobe.files.io import run_scope
    from kdprobe.files.outputs import check_outputs
    from kdprobe.studies.spec import load_spec
    from trainers.progress import TqdmStudyProgress
    from trainers.study import plan_cells, run_study
    from trainers.trackers import default_dir, tracker_spec

    JOBS.check(jobs, "--jobs")
    NPROC_PER_CELL.check(nproc_per_cell, "--nproc-per-cell")
    if note is None:
        note = (lambda text: None) if quiet else (lambda text: print(text, file=sys.stderr))
    sets = [set] if isinstance(set, str) else list(set or ())
    out = Path(out)
    with run_scope():
        check_outputs("study", {"--out": (out, "folder")})
        resolved, text = load_spec(str(name_or_spec), scale, sets, dataset=dataset,
                                   data_dir=str(data_dir) if data_dir is not None else None)
        plan_cells(resolved, out)  # every cell's config (ranges, model kwargs) checked before DIR is made
        trackers = tracker_spec(log, log_dir, log_project, default_dir=default_dir(out, folder=True),
                                default_project=resolved.name,
                                run=out.resolve().name, group=resolved.name)
        options = _slurm_options(resolved, executor, dict(partition=partition, account=account, qos=qos, time=time,
                                 gpus_per_cell=gpus_per_cell, cpus_per_cell=cpus_per_cell, mem_per_cell=mem_per_cell,
                                 array_parallelism=array_parallelism, constraint=constraint), slurm, detach, jobs,
                                 nproc_per_cell)
        what = (f"{len(resolved.methods)} methods x {len(resolved.seeds)} seeds" if resolved.methods else
                f"{len(resolved.pruning)} pruning blocks x {len(resolved.seeds)} seeds")
        note(f"study {resolved.name} (scale {resolved.scale or 'as written'}): {what} -> {out}")
        record = run_study(resolved, out, device=device, jobs=jobs, nproc_per_cell=nproc_per_cell, spec_text=text,
                           progress=progress or TqdmStudyProgress(not quiet), executor=executor, slurm=options,
                           detach=detach, figures=figures, trackers=trackers)
    return None if record is None else StudyResult(out, record)


def _slurm_options(spec, executor: str, flags: dict, pairs, detach: bool, jobs: int, nproc_per_cell: int):
    """study(executor=...): the SlurmOptions of `--executor slurm` (the spec's [slurm], flags over it), else None."""
    from trainers.study_slurm import check_executor, slurm_options

    pairs = [pairs] if isinstance(pairs, str) else list(pairs or ())
    check_executor(executor, flags, pairs, detach, jobs)
    return slurm_options(spec.slurm, flags, pairs, nproc_per_cell) if executor == "slurm" else None
