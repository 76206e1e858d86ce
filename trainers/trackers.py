"""Experiment trackers: a training run's per-epoch metrics and full config, also in TensorBoard, W&B or MLflow.

`kdprobe train --log tensorboard` (and `kdprobe study --log ...`) opens one `RunLog` per training run. The
loop hands it every finished epoch (the record OUT.jsonl gets, with the epoch's seconds) before it saves its
resume state, and the resume state keeps where each tracker stands, so a killed and resumed run continues
the same tracker run without gaps or doubled epochs:

- tensorboard: event files in LOG_DIR/tensorboard/RUN (torch.utils.tensorboard). A start that continues a
  run writes a purge marker at the first epoch it logs, so TensorBoard hides what a killed process wrote
  from there on; a fresh start purges from step 0, so a retrained OUT never mixes with the old run.
- wandb: an offline run in LOG_DIR/wandb/offline-run-* (upload later with `wandb sync`); WANDB_MODE=online
  in the environment logs to the server instead. A resumed run reopens its id.
- mlflow: a run in the SQLite store LOG_DIR/mlflow.db (artifacts in LOG_DIR/mlartifacts); MLFLOW_TRACKING_URI
  in the environment names another store or server. A resumed run continues its run id.

Metric names are the same in all three (METRICS): loss/train, loss/test, accuracy/train, accuracy/test (a
fraction 0-1, as everywhere in kdprobe), lr, the KD runs' loss terms as loss/train_<term> (loss/train_kd, ...),
and time/epoch_seconds; the step is the epoch (1-based). The config is the run's TrainConfig plus where it
writes: TensorBoard shows it under Text and HParams, W&B as the run config, MLflow as params (flattened,
dotted keys) and the artifact config.json.

The trackers are optional extras (`pip install 'kdprobe[tensorboard]'`, `[wandb]`, `[mlflow]`); asking for
one that is not installed fails before anything is trained. Only rank 0 of a torchrun run logs.
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from kdprobe.errors import KdprobeError

TRACKERS = ("tensorboard", "wandb", "mlflow")
#: each tracker's imports (MLflow's SQLite store needs SQLAlchemy and Alembic, which mlflow-skinny leaves out)
_PACKAGES = {"tensorboard": ("tensorboard",), "wandb": ("wandb",), "mlflow": ("mlflow", "sqlalchemy", "alembic")}
#: history record key -> tracker metric name (the KD terms train_<term> map to loss/train_<term>)
METRICS = {"train_loss": "loss/train", "test_loss": "loss/test", "train_acc": "accuracy/train",
           "test_acc": "accuracy/test", "lr": "lr", "seconds": "time/epoch_seconds"}
NOT_METRICS = ("epoch", "test_images")


def parse_log(values) -> tuple[str, ...]:
    """--log: None, one name, or several (repeated or comma-separated) -> the trackers, each once, in order.
    A name that is not a tracker, or a tracker whose package is missing, fails with the fix."""
    if values is None:
        return ()
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise KdprobeError(f"expected --log as tracker names ({', '.join(TRACKERS)}), got {values!r}")
    kinds: list[str] = []
    for v in values:
        for name in filter(None, (p.strip().lower() for p in v.split(","))):
            if name not in TRACKERS:
                raise KdprobeError(f"--log {name}: expected one of {', '.join(TRACKERS)} (repeat --log or separate "
                                   "them with commas to log to several)")
            if name not in kinds:
                kinds.append(name)
    for name in kinds:
        _require(name)
    return tuple(kinds)


def tracker_spec(log, log_dir, log_project, *, default_dir: Path, default_project: str, run: str,
                 group: str | None = None) -> TrackerSpec | None:
    """The --log, --log-dir and --log-project options as a TrackerSpec (None without --log), checked: tracker
    names and packages, a log folder that is not a file, a project name that is not empty."""
    kinds = parse_log(log)
    if not kinds:
        if log_dir is not None or log_project is not None:
            given = "--log-dir" if log_dir is not None else "--log-project"
            raise KdprobeError(f"{given} says where trackers write, but no --log names one; add --log tensorboard "
                               f"(or wandb, mlflow), or drop {given}")
        return None
    folder = Path(log_dir if log_dir is not None else default_dir).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise KdprobeError(f"--log-dir {folder} is a file; pass a folder (it is made when missing)")
    project = default_project if log_project is None else str(log_project).strip()
    if not project:
        raise KdprobeError("--log-project is empty; pass a name (W&B project, MLflow experiment)")
    return TrackerSpec(kinds, str(folder), project, run, group)


def default_dir(out: Path, folder: bool = False) -> Path:
    """Where the trackers write without --log-dir: logs/ next to checkpoint OUT, or inside folder OUT (a study's or a
    pipeline's)."""
    out = Path(out)
    return out / "logs" if folder else out.parent / "logs"


def where_logged(log, log_dir, default: Path) -> str:
    """The line a command prints after logging with --log: each tracker, and how to open what it wrote."""
    folder = Path(log_dir if log_dir is not None else default)
    uri = _mlflow_uri(folder)
    how = {"tensorboard": f"tensorboard --logdir {folder / 'tensorboard'}",
           "wandb": (f"wandb sync {folder / 'wandb'}/offline-run-*" if _wandb_mode() == "offline"
                     else f"wandb: {_wandb_mode()} (WANDB_MODE)"),
           "mlflow": f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else f"mlflow: {uri}"}
    return "trackers: " + "; ".join(how[k] for k in parse_log(log))


def _wandb_mode() -> str:
    """W&B's mode: offline unless the user's environment asks for another (WANDB_MODE=online)."""
    return os.environ.get("WANDB_MODE") or "offline"


def _mlflow_uri(folder: Path) -> str:
    """MLflow's tracking store: the user's MLFLOW_TRACKING_URI, else the SQLite file FOLDER/mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(folder) / 'mlflow.db'}"


def _require(kind: str) -> None:
    import importlib.util

    missing = [m for m in _PACKAGES[kind] if importlib.util.find_spec(m) is None]
    if missing:
        raise KdprobeError(f"--log {kind} needs the {' and '.join(missing)} package{'s' * (len(missing) > 1)}, "
                           f"not installed here: pip install 'kdprobe[{kind}]'")


def metrics_of(record: dict) -> dict[str, float]:
    """One epoch's record (trainers.loop's history record, plus seconds) as tracker metrics (METRICS)."""
    out = {}
    for key, value in record.items():
        if key in NOT_METRICS or value is None:
            continue
        name = METRICS.get(key) or (f"loss/{key}" if key.startswith("train_") else None)
        if name is not None:
            out[name] = float(value)
    return out


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Nested dicts -> dotted keys (lists and None as their JSON text), for MLflow params and TensorBoard's HParams."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


@dataclass(frozen=True)
class TrackerSpec:
    """Where and how one run logs. kinds: TRACKERS names; dir: the log folder (absolute); project: W&B project
    and MLflow experiment; run: the run's name (TensorBoard's subfolder); group: W&B group (a study's name)
    and an MLflow tag; tags: more MLflow tags / W&B config entries (a study cell's method and seed)."""

    kinds: tuple[str, ...]
    dir: str
    project: str
    run: str
    group: str | None = None
    tags: tuple[tuple[str, str], ...] = ()

    def named(self, run: str, **tags) -> "TrackerSpec":
        """This spec for one of several runs (a study's cells): its name and its tags (method, seed, file)."""
        return TrackerSpec(self.kinds, self.dir, self.project, run, self.group,
                           tuple((k, str(v)) for k, v in tags.items()))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict | None) -> "TrackerSpec | None":
        """A spec that crossed a process boundary (a study's job file); kinds are checked against TRACKERS."""
        if not d:
            return None
        kinds = tuple(d["kinds"])
        if not set(kinds) <= set(TRACKERS):
            raise KdprobeError(f"unknown trackers {sorted(set(kinds) - set(TRACKERS))}; expected {', '.join(TRACKERS)}")
        return cls(kinds, str(d["dir"]), str(d["project"]), str(d["run"]), d.get("group"),
                   tuple((str(k), str(v)) for k, v in d.get("tags", ())))


class RunLog:
    """The trackers of one training run (see the module docstring). start() once, epoch() per finished epoch,
    state() for the resume state, close(ok) at the end."""

    def __init__(self, spec: TrackerSpec):
        self.spec = spec
        self.sinks = [_SINKS[k](spec) for k in spec.kinds]
        self.failed: dict[str, dict] = {}  # kind -> its state when it failed (kept in the resume state)

    def start(self, config: dict, history: list[dict], saved: dict | None) -> None:
        """Open every tracker; log the config (a fresh tracker run) and the epochs of `history` it lacks.
        saved: what state() returned into the resume state of the run being continued (None: none)."""
        saved = saved or {}
        opened = []
        try:
            for sink in self.sinks:
                sink.start(config, history, saved.get(sink.kind))
                opened.append(sink)
        except Exception:
            for sink in opened:
                sink.close(False)
            raise

    def epoch(self, record: dict) -> None:
        """Log one finished epoch. A tracker that fails (a locked store, a full disk) is said once and dropped for
        the rest of the run instead of stopping the training: OUT.jsonl keeps every epoch, and its resume state
        still says how far it got, so a resumed run fills the gap."""
        for sink in list(self.sinks):
            try:
                sink.epoch(record)
            except Exception as e:
                self.sinks.remove(sink)
                self.failed[sink.kind] = sink.state()
                _say(f"--log {sink.kind}: logging epoch {record.get('epoch')} failed ({error_line(e)}); this run logs "
                     f"no more epochs there (OUT.jsonl has them all; a resumed run fills the gap)")

    def state(self) -> dict:
        return {**self.failed, **{sink.kind: sink.state() for sink in self.sinks}}

    def close(self, ok: bool) -> None:
        """End every tracker run (ok: the training finished); a tracker that fails to close is said, not raised, as
        the checkpoint is already written (or another error is on its way)."""
        for sink in self.sinks:
            try:
                sink.close(ok)
            except Exception as e:
                _say(f"--log {sink.kind}: closing its run failed ({error_line(e)})")


def error_line(e: Exception) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _say(text: str) -> None:
    import sys

    print(f"warning: {text}", file=sys.stderr, flush=True)


class _Sink:
    kind = ""

    def __init__(self, spec: TrackerSpec):
        self.spec, self.logged, self.where = spec, 0, None

    def continues(self, saved: dict | None) -> bool:
        """True when `saved` is this tracker's state of the run being resumed, in the same place."""
        return bool(saved) and saved.get("where") == self.where

    def start(self, config: dict, history: list[dict], saved: dict | None) -> None:
        """Open the tracker run (a new one, or the one `saved` says it continues), then log the epochs of
        `history` it does not hold yet."""
        self.logged = self.open(config, saved)
        for record in history[self.logged:]:
            self.epoch(record)

    def open(self, config: dict, saved: dict | None) -> int:
        """Open the run and return how many epochs of the history it holds already (0 for a new run)."""
        raise NotImplementedError

    def epoch(self, record: dict) -> None:
        raise NotImplementedError

    def state(self) -> dict:
        return {"where": self.where, "logged": self.logged}

    def close(self, ok: bool) -> None:
        raise NotImplementedError


class _TensorBoard(_Sink):
    kind = "tensorboard"

    def open(self, config, saved):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        folder = Path(self.spec.dir) / "tensorboard" / self.spec.run
        self.where = str(folder)
        _claim(folder, config.get("checkpoint"))
        first = int(saved["logged"]) if self.continues(saved) else 0
        # purge_step: TensorBoard hides this folder's earlier events from that step on (a killed process's last
        # epoch, or a whole earlier run of the same OUT)
        self.writer = SummaryWriter(str(folder), purge_step=first + 1 if first else 0, flush_secs=10 ** 6)
        if not first:
            self.writer.add_text("config", "```json\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)
            for summary in hparams(flatten(config), {"accuracy/test": 0.0, "loss/test": 0.0}):
                self.writer.file_writer.add_summary(summary)
        return first

    def epoch(self, record):
        for name, value in metrics_of(record).items():
            self.writer.add_scalar(name, value, record["epoch"])
        self.writer.flush()  # on disk at once: a kill loses nothing logged
        self.logged = max(self.logged, int(record["epoch"]))

    def close(self, ok):
        self.writer.close()


def _claim(folder: Path, checkpoint: str | None) -> None:
    """TensorBoard shows a folder's events as one run: one checkpoint's run per folder (FOLDER/kdprobe-run.json
    says whose). Another checkpoint's run there is refused, never mixed into it or hidden by a purge."""
    from kdprobe.files.io import atomic_write_text

    marker = folder / "kdprobe-run.json"
    try:
        theirs = json.loads(marker.read_text()).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        theirs = None
    if theirs and checkpoint and theirs != checkpoint:
        raise KdprobeError(f"--log tensorboard: {folder} holds the run of {theirs}; this run ({checkpoint}) would mix "
                           "with it there: pass another --log-dir, or give the checkpoint another name")
    if theirs is None:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, json.dumps({"checkpoint": checkpoint}) + "\n")


class _Wandb(_Sink):
    kind = "wandb"

    def open(self, config, saved):
        import wandb

        folder = Path(self.spec.dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.where = str(folder)
        cont = self.continues(saved)
        self.id = saved["id"] if cont else uuid.uuid4().hex[:12]
        self.run = wandb.init(mode=_wandb_mode(), dir=str(folder), project=self.spec.project, group=self.spec.group,
                              name=self.spec.run, id=self.id, resume="allow", reinit="create_new",
                              config={**config, **dict(self.spec.tags)},
                              settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        return int(saved["logged"]) if cont else 0

    def epoch(self, record):
        self.run.log(metrics_of(record), step=int(record["epoch"]))
        self.logged = max(self.logged, int(record["epoch"]))

    def state(self):
        return dict(super().state(), id=self.id)

    def close(self, ok):
        self.run.finish(exit_code=0 if ok else 1)


class _Mlflow(_Sink):
    kind = "mlflow"

    def open(self, config, saved):
        from mlflow.entities import Param

        self.client, self.where, exp_id = _mlflow_experiment(self.spec)
        client = self.client
        self.run_id = saved["run_id"] if self.continues(saved) and _run_exists(client, saved["run_id"]) else None
        first = int(saved["logged"]) if self.run_id else 0
        if self.run_id is None:
            tags = {"kdprobe.run": self.spec.run, **({"kdprobe.group": self.spec.group} if self.spec.group else {}),
                    **{f"kdprobe.{k}": v for k, v in self.spec.tags}}
            self.run_id = client.create_run(exp_id, run_name=self.spec.run, tags=tags).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(self.run_id, params=params[i:i + 100])
            client.log_text(self.run_id, json.dumps(config, indent=1, default=str), "config.json")
        else:
            client.update_run(self.run_id, status="RUNNING")
        # what the store already holds: a killed process may have logged one epoch past its resume state
        self.stored = max((m.step for m in client.get_metric_history(self.run_id, "accuracy/test")), default=0)
        return first

    def epoch(self, record):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(record["epoch"])
        if step <= self.stored:  # logged by the killed process already (the same numbers: a resumed run repeats it)
            self.logged = max(self.logged, step)
            return
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics_of(record).items()])
        self.logged = max(self.logged, step)

    def state(self):
        return dict(super().state(), run_id=self.run_id)

    def close(self, ok):
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "KILLED")


def _mlflow_experiment(spec: TrackerSpec):
    """(client, tracking URI, experiment id) of spec.project, made when missing: its artifacts beside the store
    (not in the current directory); another process that made it first is fine."""
    for name in ("mlflow", "alembic"):  # table creation notes on every first use of a store
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    folder = Path(spec.dir)
    uri = _mlflow_uri(folder)
    if uri.startswith("sqlite:"):
        folder.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(spec.project)
    if exp is None:
        try:
            return client, uri, client.create_experiment(
                spec.project, artifact_location=(folder / "mlartifacts").resolve().as_uri())
        except Exception:
            exp = client.get_experiment_by_name(spec.project)
            if exp is None:
                raise
    return client, uri, exp.experiment_id


def _run_exists(client, run_id: str) -> bool:
    try:
        client.get_run(run_id)
        return True
    except Exception:
        return False


_SINKS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow}


def prepare(spec: TrackerSpec) -> None:
    """Before a study starts cells in parallel: make the shared MLflow store and experiment once, so the cells'
    processes only add runs to it (creating the tables from several processes at once races)."""
    if "mlflow" in spec.kinds:
        _mlflow_experiment(spec)
