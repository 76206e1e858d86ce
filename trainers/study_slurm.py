"""`kdprobe study SPEC --executor slurm` and `kdprobe pipeline pruning --executor slurm`: the cells as Slurm jobs.

The study plans its cells as always (trainers.study.plan_cells: content-named paths, teachers first) and
hands the ones not made yet to trainers.executors.SlurmExecutor, whose record OUT/slurm/submissions.json
lists every job. What a job runs is one cell: a CellJob (a study cell: trainers.loop.train to its path)
or a PipelineJob (a pruning-pipeline training plus the pruning of its result). A job is safe to run
twice: a cell whose file exists is skipped, an interrupted one resumes from its `.partial`, so a job
that Slurm requeues (preemption, SIGUSR2 before its time limit, `scontrol requeue`) ends with the same
checkpoint as one that was never interrupted.

Dependencies are Slurm's (afterok): a student waits for its teacher's job, a fine-tune for the job that
pruned its start, so everything is submitted at once and the submitter may go (--detach). Without
--detach it waits, showing each cell's state changes and the epochs the cells' logs (OUT.jsonl) report,
then runs the probes and writes the report in this process, exactly as the local executor does: the
numbers are the same whichever executor ran the cells. A failed cell stops the wait with its job id,
Slurm state, error and log; the jobs waiting for it are cancelled, the others go on, and running the
same command again collects what finished and submits the failed cells again (never a cell that is
pending, running or done: the record says so, even after a killed submitter).

Pruning pipelines: one job per training cell, the pruning of its result appended to the same job
(pruning takes seconds; a job of its own would wait in the queue for nothing), so per seed the chain is
scratch(+prune) -> {scratch_finetuned, kd-k(+prune), post_distill-k} -> {pre_distill-k, pre_post-k,
self_distill-k}: three waves of parallel jobs. The submitting process then runs the pipeline itself,
which finds every checkpoint made, checks each against its config and upstream hashes and writes
results.csv and the surplus table.

--nproc-per-cell K: K Slurm tasks per cell's job on one node; each task reads its rank from Slurm
(SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS) and sets what torchrun would (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so trainers.loop trains with DistributedDataParallel as under
`torchrun --nproc-per-node K` (gloo on CPU, NCCL with one GPU per rank).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from kdprobe.errors import Interrupted, KdprobeError
from trainers.executors import RECORD, SlurmExecutor, SlurmOptions, Task, TaskState, parse_slurm_pairs

EXECUTORS = ("local", "slurm")
# the option flags, by their SlurmOptions field (the CLI flag is --<field with - for _>); flags win over [slurm]
FLAGS = ("partition", "account", "qos", "time", "gpus_per_cell", "cpus_per_cell", "mem_per_cell",
         "array_parallelism", "constraint")
FOLDER = "slurm"  # OUT/slurm: the submission record, submitit's pickles and every job's log
POLL_S = 10.0  # how often the waiting submitter asks Slurm (squeue) and reads the cells' logs


# ---- options ---------------------------------------------------------------------------------------------

def check_executor(executor: str, flags: Mapping[str, Any], pairs: Sequence[str] = (), detach: bool = False,
                   jobs: int = 1) -> None:
    """--executor local|slurm, and no Slurm flag without --executor slurm (it would be silently ignored)."""
    if executor not in EXECUTORS:
        raise KdprobeError(f"expected --executor local or slurm, got {executor!r}")
    given = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None]
    given += ["--slurm"] if pairs else []
    given += ["--detach"] if detach else []
    if executor == "local" and given:
        raise KdprobeError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} with --executor slurm "
                           f"(cells as Slurm jobs); add --executor slurm or drop {'it' if len(given) == 1 else 'them'}")
    if executor == "slurm" and jobs != 1:
        raise KdprobeError(f"--jobs {jobs} is for --executor local; under Slurm every cell is its own job "
                           "(limit how many run at once with --array-parallelism N)")
    if executor == "slurm":  # before the study folder is made
        if importlib.util.find_spec("submitit") is None:
            raise KdprobeError("--executor slurm needs submitit: pip install 'kdprobe[slurm]'")
        if shutil.which("sbatch") is None:
            raise KdprobeError("--executor slurm: no sbatch on PATH; run on a Slurm login node (with SLURM_CONF set "
                               "if the cluster needs it), or use --executor local")


def slurm_options(table: Mapping[str, Any] | None, flags: Mapping[str, Any] | None = None,
                  pairs: Sequence[str] = (), nproc_per_cell: int = 1, where: str = "[slurm]") -> SlurmOptions:
    """The spec's [slurm] table with the flags given (not None) over it; --slurm KEY=VALUE pairs over its extra."""
    if table is not None and not isinstance(table, Mapping):
        raise KdprobeError(f"{where}: expected a table of Slurm options, got {table!r}")
    values = {str(k).replace("-", "_"): v for k, v in (table or {}).items()}
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    if pairs:
        extra = values.get("extra") or {}
        if not isinstance(extra, Mapping):
            raise KdprobeError(f"{where}.extra: expected a table of sbatch options (KEY = VALUE), got {extra!r}")
        values["extra"] = {**extra, **parse_slurm_pairs(pairs)}
    if nproc_per_cell > 1:
        values["tasks_per_cell"] = nproc_per_cell
    opts = SlurmOptions.from_mapping(values, where)
    if opts.gpus_per_cell and opts.tasks_per_cell > opts.gpus_per_cell:
        raise KdprobeError(f"--nproc-per-cell {opts.tasks_per_cell} with --gpus-per-cell {opts.gpus_per_cell}: each "
                           f"rank needs its own GPU; ask for --gpus-per-cell {opts.tasks_per_cell}")
    return opts


def node_device(device: str) -> str:
    """--device for the cells' jobs: cuda:N names a GPU of this machine; a job sees only the GPUs Slurm gave it
    (its first is cuda), so cuda:N becomes cuda there. auto, cpu and cuda stay."""
    return "cuda" if str(device).startswith("cuda:") else str(device)


def job_name(name: str) -> str:
    """The Slurm job-name prefix of a study: kdprobe-<study name> in the characters Slurm keeps."""
    return "kdprobe-" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.-")[:40] or "study")


# ---- inside a job ----------------------------------------------------------------------------------------

def torchrun_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What torchrun would set for this Slurm task ({} for a job of one task): RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, MASTER_ADDR (this node: a cell's tasks share one) and MASTER_PORT (from the job id, so
    two cells on one node do not meet; a MASTER_PORT/MASTER_ADDR already set is kept)."""
    env = os.environ if environ is None else environ
    world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1")
    if world <= 1:
        return {}
    if int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or "1") != 1:
        raise KdprobeError("a cell's tasks must share one node (--nproc-per-cell K runs K tasks on one node); "
                           f"this job spans {env.get('SLURM_NNODES')} nodes")
    job = env.get("SLURM_JOB_ID", "0")
    return {"RANK": env.get("SLURM_PROCID", "0"), "WORLD_SIZE": str(world),
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"), "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": env.get("MASTER_PORT", str(20000 + int(job) % 20000 if job.isdigit() else 29500))}


def _job_setup(device: str) -> None:
    """Rank variables from Slurm, and on a CPU the cores Slurm gave the task (the local study uses one thread
    per cell; a cell with --cpus-per-cell 1 computes bit for bit as it does)."""
    os.environ.update(torchrun_env())
    import torch

    from trainers.loop import resolve_device

    if resolve_device(device).type == "cpu":
        torch.set_num_threads(max(1, int(os.environ.get("SLURM_CPUS_PER_TASK") or 1)))


def _job_info() -> dict:
    return {"job": os.environ.get("SLURM_JOB_ID"), "restarts": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
            "host": os.uname().nodename}


@dataclass(frozen=True)
class CellJob:
    """One study cell as a Slurm job: train `config` to `out` (resuming its .partial), unless it is made."""

    config: dict  # TrainConfig.to_dict()
    out: str
    device: str
    snapshots: tuple[int, ...] = ()
    trackers: dict | None = None  # trainers.trackers.TrackerSpec.to_dict() of the cell (kdprobe study --log)

    def __call__(self) -> dict:
        from trainers.config import TrainConfig
        from trainers.loop import partial_path, snapshot_path, train
        from trainers.trackers import TrackerSpec

        _job_setup(self.device)
        out = Path(self.out)
        if out.exists() and all(snapshot_path(out, e).exists() for e in self.snapshots):
            return {"action": "existing", "seconds": None, **_job_info()}
        action = "resumed" if partial_path(out).exists() else "trained"
        t0 = time.monotonic()
        res = train(TrainConfig.from_dict(self.config), out, device=self.device, snapshot_epochs=self.snapshots,
                    trackers=TrackerSpec.from_dict(self.trackers))
        return {"action": action, "seconds": round(time.monotonic() - t0, 3), "test_acc": res.test_acc,
                "resumed_from_epoch": res.resumed_from_epoch, **_job_info()}


@dataclass(frozen=True)
class PipelineJob:
    """Cells of a pruning pipeline as one Slurm job, in order: a training and the pruning of its result."""

    spec: Any  # trainers.pipeline.PipelineSpec
    out: str
    seed: int
    names: tuple[str, ...]
    device: str
    trackers: dict | None = None  # trainers.trackers.TrackerSpec.to_dict() (--log); each training logs its run
    run_prefix: str = ""

    def __call__(self) -> dict:
        from kdprobe.models.registry import names_code
        from kdprobe.pruning import ops as prune_ops
        from trainers import loop
        from trainers.pipeline import cell_config, cell_trackers, plan_cells
        from trainers.trackers import TrackerSpec

        _job_setup(self.device)
        out = Path(self.out)
        cells = {c.name: c for c in plan_cells(self.spec) if c.seed == self.seed}
        done = {}
        t0 = time.monotonic()
        for name in self.names:
            cell = cells[name]
            path = out / cell.file
            if path.exists():
                done[name] = "existing"
            elif cell.kind == "prune":  # as trainers.pipeline.run_pruning_pipeline prunes
                prune_ops.prune_checkpoint(path.with_name(f"{cell.source}.pt"), self.spec.method, self.spec.remaining,
                                           path, skip=self.spec.skip,
                                           arch=self.spec.model if names_code(self.spec.model) else None)
                done[name] = "pruned"
            else:
                resumed = loop.partial_path(path).exists()
                loop.train(cell_config(self.spec, cell, out), path, device=self.device,
                           trackers=cell_trackers(TrackerSpec.from_dict(self.trackers), cell, self.run_prefix))
                done[name] = "resumed" if resumed else "trained"
        return {"cells": done, "seconds": round(time.monotonic() - t0, 3), **_job_info()}


# ---- the tasks -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Planned:
    tasks: list[Task]
    logs: dict[str, list[Path]]  # task key -> the per-epoch logs (OUT.jsonl) of its trainings
    epochs: dict[str, int]  # task key -> epochs its trainings run in all


def _study_cell_tasks(cells, out: Path, device: str, trackers=None) -> _Planned:
    from trainers.loop import log_path
    from trainers.study import cell_trackers

    tasks, logs, epochs = [], {}, {}
    todo = {c.rel for c in cells if not c.done(out)}
    for c in cells:
        if c.rel not in todo:
            continue
        cell_log = cell_trackers(trackers, c)
        job = CellJob(c.config.to_dict(), str(c.path(out)), device, tuple(c.snapshots),
                      cell_log.to_dict() if cell_log else None)
        tasks.append(Task(c.rel, job, after=tuple(t for t in c.teachers if t in todo), label=f"cell {c.label}"))
        logs[c.rel], epochs[c.rel] = [log_path(c.path(out))], c.config.epochs
    return _Planned(tasks, logs, epochs)


def pipeline_tasks(spec, folder: Path, device: str, prefix: str = "", label: str = "", trackers=None,
                   run_prefix: str = "") -> _Planned:
    """One task per training cell of a pruning pipeline not made yet, with the pruning of its result; a task
    waits (after=) for the tasks that make its start (init) and its teacher. trackers: the --log TrackerSpec,
    each training's run named run_prefix + seedS/CELL (trainers.pipeline.cell_trackers)."""
    from trainers import loop
    from trainers.pipeline import cell_config, plan_cells

    folder = Path(folder)
    groups: dict[str, list] = {}
    maker: dict[tuple[int, str], str] = {}  # (seed, cell name) -> the key of the task that makes it
    for c in plan_cells(spec):
        key = f"{prefix}seed{c.seed}/{c.name}" if c.kind == "train" else maker[(c.seed, c.source)]
        groups.setdefault(key, []).append(c)
        maker[(c.seed, c.name)] = key
    todo = {k for k, cs in groups.items() if not all((folder / c.file).exists() for c in cs)}
    tasks, logs, epochs = [], {}, {}
    for key, cs in groups.items():
        if key not in todo:
            continue
        head = cs[0]
        after = sorted({maker[(head.seed, n)] for n in (head.source, head.teacher) if n} & todo)
        job = PipelineJob(spec, str(folder), head.seed, tuple(c.name for c in cs), device,
                          trackers.to_dict() if trackers is not None else None, run_prefix)
        tasks.append(Task(key, job, after=tuple(after), label=f"{label + ' ' if label else ''}{head.file}"))
        logs[key] = [loop.log_path(folder / head.file)]
        epochs[key] = cell_config(spec, head, folder).epochs
    return _Planned(tasks, logs, epochs)


# ---- submit, wait, collect -------------------------------------------------------------------------------

def _logged(paths: Iterable[Path]) -> int:
    n = 0
    for p in paths:
        try:
            n += sum(1 for line in p.read_text().splitlines() if line.strip())
        except OSError:
            pass
    return n


def _dependents(tasks: Sequence[Task], failed: set[str]) -> set[str]:
    """Keys of the tasks that wait, directly or through others, for a failed one."""
    out, changed = set(), True
    while changed:
        changed = False
        for t in tasks:
            if t.key not in out and t.key not in failed and any(d in failed or d in out for d in t.after):
                out.add(t.key)
                changed = True
    return out


def _failure(failed: list[TaskState], cancelled: set[str], going: int, out: Path, labels: dict) -> str:
    parts = [f"{len(failed)} Slurm job(s) failed: " + "; ".join(s.line() for s in failed)]
    if cancelled:
        names = ", ".join(labels[k] for k in sorted(cancelled))
        parts.append(f"cancelled {len(cancelled)} job(s) waiting for it ({names})")
    if going:
        parts.append(f"{going} other cell(s) go on as Slurm jobs (`kdprobe study status {out}`)")
    parts.append("fix the cause and run the same command again: finished cells are kept and collected, failed and "
                 "cancelled ones are submitted again")
    return "; ".join(parts)


def run_tasks(planned: _Planned, out: Path, options: SlurmOptions, *, name: str, detach: bool, progress,
              poll_s: float | None = None) -> dict[str, Any] | None:
    """Submit what is not pending, running or done yet; then (unless detach) wait for every task with the
    progress display. Returns task key -> its job's result, or None when detached with work left."""
    tasks = planned.tasks
    if not tasks:
        return {}
    ex = SlurmExecutor(Path(out) / FOLDER, options, name=job_name(name))
    keys = [t.key for t in tasks]
    # a cell whose job finished but whose file is gone (deleted since): forget the job so it runs again
    ex.forget(keys)
    handles = ex.submit(tasks)
    new = [h for h in handles if h.new]
    kept = len(handles) - len(new)
    progress.note(f"slurm: {len(new)} cell(s) submitted" + (f", {kept} already submitted (collected, not "
                                                            f"submitted again)" if kept else "")
                  + f"; record and logs in {ex.folder}")
    if detach:
        return None
    progress.plan(max(0, sum(planned.epochs.values()) - sum(_logged(v) for v in planned.logs.values())))
    try:
        _wait(ex, tasks, planned, Path(out), progress, POLL_S if poll_s is None else poll_s)
    except KeyboardInterrupt:  # only the waiting stops
        raise Interrupted(f"the cells go on as Slurm jobs (`kdprobe study status {out}`)") from None
    results = {}
    for k in keys:
        try:
            results[k] = ex.result(k)
        except KdprobeError:
            results[k] = {}
    return results


def _wait(ex: SlurmExecutor, tasks: Sequence[Task], planned: _Planned, out: Path, progress, poll_s: float) -> None:
    """Poll until every task is done (progress: state changes and logged epochs); raise on the first failure."""
    keys = [t.key for t in tasks]
    labels = {t.key: t.name for t in tasks}
    seen_epochs = {k: _logged(planned.logs.get(k, ())) for k in keys}
    seen: dict[str, tuple] = {}
    said_error = ""
    while True:
        states = ex.poll()
        mine = {k: states[k] for k in keys if k in states}
        for k, s in mine.items():
            sig = (s.state, s.job_id, s.slurm_state)
            if seen.get(k) != sig:
                seen[k] = sig
                progress.note(f"slurm: {s.line()}")
            n = _logged(planned.logs.get(k, ()))
            if n > seen_epochs[k]:
                progress.advance(n - seen_epochs[k])
            seen_epochs[k] = max(seen_epochs[k], n)
        if ex.last_error and ex.last_error != said_error:
            said_error = ex.last_error
            progress.note(f"slurm: cannot ask Slurm just now ({said_error}); trying again")
        failed = [s for s in mine.values() if s.state == "failed"]
        if failed:
            bad = {s.key for s in failed}
            waiting = {k for k in _dependents(tasks, bad) if not mine.get(k) or not mine[k].finished}
            if waiting:
                ex.cancel(waiting)
            going = sum(1 for k, s in mine.items() if not s.finished and k not in waiting)
            raise KdprobeError(_failure(failed, waiting, going, out, labels))
        if len(mine) == len(keys) and all(s.state == "done" for s in mine.values()):
            return
        time.sleep(poll_s)


def train_cells_slurm(spec, cells, out: Path, options: SlurmOptions | None, *, device: str = "auto",
                      detach: bool = False, progress=None, nproc_per_cell: int = 1,
                      trackers=None) -> dict[str, dict] | None:
    """trainers.study's train step under Slurm: every cell not made yet and every pruning block's cells as jobs.
    Returns rel -> {"action", "seconds"} like train_cells, or None when --detach left cells running.
    options None: the spec's [slurm] table (with nproc_per_cell tasks per cell). trackers: the study's --log
    (trainers.trackers.TrackerSpec): each cell's job logs its own run."""
    from trainers.study import StudyProgress
    from trainers.study_probes import pruning_block

    out, progress = Path(out).resolve(), progress or StudyProgress()
    options = options if options is not None else slurm_options(spec.slurm, nproc_per_cell=nproc_per_cell)
    planned = _study_cell_tasks(cells, out, node_device(device), trackers)
    for i in range(len(spec.pruning)):  # the pruning blocks' cells too; the probes then find them made
        ps, folder, label = pruning_block(spec, i, out)
        _check_pipeline(ps, folder)
        p = pipeline_tasks(ps, folder, node_device(device), prefix=f"pruning/{folder.name}/", label=f"pruning {label}:",
                           trackers=trackers, run_prefix=f"{out.name}/pruning/{folder.name}/")
        planned.tasks.extend(p.tasks)
        planned.logs.update(p.logs)
        planned.epochs.update(p.epochs)
    for k, c in enumerate(cells, 1):
        if c.done(out):
            progress.note(f"[{k}/{len(cells)}] cell {c.label} -> {c.rel} (skip: exists)")
    results = run_tasks(planned, out, options, name=spec.name, detach=detach, progress=progress)
    if results is None:
        return None
    missing = [c for c in cells if not c.done(out)]
    if missing:  # a job said done, but its file is not (yet) visible here: a filesystem the nodes do not share?
        raise KdprobeError(f"cell {missing[0].label}: its Slurm job finished but {missing[0].path(out)} is not there; "
                           f"the study folder must be on a filesystem the compute nodes share")
    info = {}
    for c in cells:
        r = results.get(c.rel) or {}
        info[c.rel] = ({"action": r["action"], "seconds": r.get("seconds")} if r.get("action") in ("trained", "resumed")
                       else {"action": "existing", "seconds": None})
    return info


def _check_pipeline(spec, out: Path) -> None:
    """Before submitting: every cell's config validates, and an existing file of another configuration is refused
    now (as trainers.pipeline.run_pruning_pipeline checks before its first cell), not after the jobs ran."""
    from trainers import pipeline

    cells = pipeline.plan_cells(spec)
    for c in cells:
        if c.kind == "train":
            pipeline.cell_config(spec, c, out)
    pipeline._precheck(spec, cells, out, pipeline.prune_expectation(spec))


def run_pipeline_slurm(spec, out: Path, options: SlurmOptions, *, device: str = "auto", detach: bool = False,
                       progress=None, trackers=None) -> bool:
    """`kdprobe pipeline pruning --executor slurm`: every cell not made yet as jobs; True once all are made (the
    caller then runs the pipeline, which finds them and writes the tables), False when detached with work left."""
    from trainers.study import StudyProgress

    out, progress = Path(out).resolve(), progress or StudyProgress()
    _check_pipeline(spec, out)
    planned = pipeline_tasks(spec, out, node_device(device), trackers=trackers, run_prefix=f"{out.name}/")
    try:
        return run_tasks(planned, out, options, name=f"pipeline-{spec.model_label}", detach=detach,
                         progress=progress) is not None
    finally:
        progress.close()


def status(out) -> str:
    """`kdprobe study status OUT`: one line per cell submitted to Slurm (pending, running, done, failed, with its
    job id and, when running or failed, its log), and whether the report is written."""
    out = Path(out)
    if not (out / FOLDER / RECORD).exists():
        raise KdprobeError(f"{out} has no Slurm submissions ({out / FOLDER / RECORD} is missing); "
                           "`kdprobe study SPEC --out DIR --executor slurm` submits a study's cells")
    ex = SlurmExecutor(out / FOLDER)
    states = ex.poll()
    counts = ", ".join(f"{n} {w}" for w in ("pending", "running", "done", "failed")
                       if (n := sum(s.state == w for s in states.values()))) or "no cells"
    note = f" (Slurm did not answer: {ex.last_error}; states as last seen)" if ex.last_error else ""
    lines = [f"{len(states)} cell(s) submitted to Slurm: {counts}{note}", *(s.line() for s in states.values())]
    # a study writes report.html, a pruning pipeline results.csv
    report = next((p for p in (out / "report.html", out / "results.csv") if p.exists()), None)
    if states and all(s.state == "done" for s in states.values()):
        lines.append(f"report: {report}" if report is not None else
                     "every cell is done: run the same command again (kdprobe study or pipeline) to collect them "
                     "and write the report")
    elif any(s.state == "failed" for s in states.values()):
        lines.append("fix what failed (see its log) and run the same command again: it submits the "
                     "failed cells again and collects the others")
    else:
        lines.append("the report is written once every cell is done: run the same command again "
                     "(it collects, never submits twice), or without --detach to wait")
    return "\n".join(lines)
