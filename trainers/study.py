"""`kdprobe study`: train every cell of a study spec (methods x seeds), probe them, write the report.

Every cell is a checkpoint named by its content, DIR/cells/<method>/seed<s>-<fingerprint>.pt,
the fingerprint being TrainConfig.fingerprint() of the cell's config with the teacher written
as the teacher cell's own content-named path (so it covers the whole teacher chain and does
not depend on where DIR lives). A re-run skips cells whose file exists, continues interrupted
ones from their .partial state (trainers.loop), and a changed spec value gives new file names
(new cells) and leaves the old files alone. Probes and the report run after the training.
DIR/cells.sha256 records every cell file as it was made; a reused cell must still be that file
(trainers.study_hashes), so the report never mixes recorded numbers with other weights.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from kdprobe.checkpoints.format import read_payload
from kdprobe.data.datasets import load_dataset
from kdprobe.errors import KdprobeError
from kdprobe.files.io import atomic_write_text, output_lock
from kdprobe.models.registry import names_code
from kdprobe.studies.data_lookup import locate_data
from kdprobe.studies.spec import StudySpec
from trainers.cells import check_cell
from trainers.config import AUGMENTS, DISTILLS, TrainConfig, make_config
from trainers.distributed import plan_placement
from trainers.loop import Progress, log_path, partial_path, resolve_device, snapshot_path, train
from trainers.study_hashes import record_hashes, verify_hashes
from trainers.trackers import TrackerSpec
from trainers.trackers import prepare as prepare_trackers

# set by the study for every cell; a spec's overrides may set any other TrainConfig field
_OWNED = ("model", "model_kwargs", "dataset", "data_dir", "preset", "augment", "distill", "teacher", "seed", "init",
          "extra_teachers", "kd_settings")


class StudyProgress:
    """What the study reports while it runs; the CLI supplies a tqdm-backed one. This one is silent."""

    def note(self, text: str) -> None: ...  # one line, e.g. "[3/25] cell scratch seed 2 (skip: exists)"
    def plan(self, total_epochs: int) -> None: ...  # epochs left to train over all cells (the ETA's unit)
    def advance(self, epochs: int) -> None: ...
    def training(self, label: str) -> Progress: return Progress()  # a bar: a cell's training or a probe  # noqa: E704
    def close(self) -> None: ...


@dataclass(frozen=True)
class Cell:
    """One checkpoint to train: method x seed, its config and its content-named path."""

    method: str
    seed: int
    config: TrainConfig  # what trainers.loop.train runs (teacher as an absolute path)
    fingerprint: str  # of the config with the teacher as its relative cell path
    rel: str  # cells/<method>/seed<s>-<fingerprint>.pt
    teacher: str | None  # rel of the teacher cell (the first, for an ensemble)
    in_study: bool  # seed listed in the spec (else: only some other cell's teacher)
    snapshots: tuple[int, ...] = ()  # epochs whose checkpoint is kept too (end of each lr stage)
    extra_teachers: tuple[str, ...] = ()  # rels of an ensemble's other teacher cells

    @property
    def teachers(self) -> tuple[str, ...]:
        """Every teacher cell's rel, the first first."""
        return ((self.teacher,) if self.teacher else ()) + self.extra_teachers

    @property
    def label(self) -> str:
        return f"{self.method} seed {self.seed}"

    def path(self, out: Path) -> Path:
        return out / self.rel

    def snapshot_files(self, out: Path) -> list[Path]:
        return [snapshot_path(self.path(out), e) for e in self.snapshots]

    def done(self, out: Path) -> bool:
        return self.path(out).exists() and all(p.exists() for p in self.snapshot_files(out))


def _cell_config(spec: StudySpec, i: int, seed: int, teacher: str | None, extra: tuple[str, ...] = ()) -> TrainConfig:
    t, m = spec.train, spec.methods[i]
    names = {f.name for f in fields(TrainConfig)}
    for where, over in (("train.overrides", t.overrides), (f"methods[{i}].overrides", m.overrides or {})):
        for k in over:
            if k in _OWNED or k not in names:
                why = "is set by the study" if k in _OWNED else "is not a TrainConfig field"
                raise KdprobeError(f"{spec.source}: {where}.{k}: {why}; expected one of "
                                   f"{', '.join(sorted(names - set(_OWNED)))}")
    for k, allowed in (("augment", AUGMENTS), ("distill", DISTILLS)):
        if getattr(m, k) not in allowed:
            raise KdprobeError(f"{spec.source}: methods[{i}].{k}: expected one of {', '.join(allowed)}, "
                               f"got {getattr(m, k)!r}")
    if (m.distill != "none") != (m.teacher is not None):
        raise KdprobeError(f"{spec.source}: methods[{i}].teacher: expected a teacher method exactly when distill "
                           f"is not 'none', got distill {m.distill!r} and teacher {m.teacher!r}; "
                           "e.g. distill = \"label\" with teacher = \"scratch\"")
    over = {**t.overrides, **(m.overrides or {})}
    if "milestones" in over:
        over["milestones"] = tuple(over["milestones"])
    try:
        return make_config(t.preset, **over, model=t.model, model_kwargs=dict(t.model_kwargs), dataset=t.dataset,
                           data_dir=t.data_dir, augment=m.augment, distill=m.distill, teacher=teacher, seed=seed,
                           extra_teachers=tuple(extra), kd_settings=dict(m.kd_settings or {}),
                           # the spec (typed by the user) names the model: a python: teacher cell is theirs
                           **({"teacher_arch": t.model} if teacher and names_code(t.model) else {}))
    except (KdprobeError, TypeError) as e:
        raise KdprobeError(f"{spec.source}: methods[{i}] ({m.name}) with train: {e}") from None


def _snapshots(spec: StudySpec, method: str, seed: int, config: TrainConfig) -> tuple[int, ...]:
    ls = spec.landscape
    if ls is None or ls.at != "lr-stages" or method not in ls.methods or seed not in ls.seeds:
        return ()
    stages = tuple(sorted({e for e in config.milestone_epochs() if 0 < e < config.epochs}))
    if config.schedule != "step" or not stages:
        raise KdprobeError(f"{spec.source}: landscape.at: expected a step schedule with milestones inside the run "
                           f"for at = 'lr-stages', got schedule {config.schedule!r} with milestones "
                           f"{list(config.milestones)} over {config.epochs} epochs; set train.overrides.schedule/"
                           "milestones or use at = 'final'")
    return stages


def ensemble_seeds(seeds: tuple[int, ...], seed: int, k: int) -> list[int]:
    """The seeds of an ensemble-taught student's k teacher cells: its own seed first, then the study's seeds that
    follow it in `seeds`, cyclically (seeds [0, 1, 2], k 3: seed 1 is taught by the teachers of seeds 1, 2, 0)."""
    order = list(seeds)
    if seed in order:
        i = order.index(seed)
        return (order[i:] + order[:i])[:k]
    return ([seed] + order)[:k]  # a student of a seed outside the study (someone's teacher): its own, then the study's


def plan_cells(spec: StudySpec, out: Path) -> list[Cell]:
    """Every cell of the study, teachers before their students; configs validated, nothing trained."""
    out, spec = Path(out).resolve(), locate_data(spec)
    cells: dict[tuple[str, int], Cell] = {}
    index = {m.name: i for i, m in enumerate(spec.methods)}

    def make(name: str, seed: int, in_study: bool) -> Cell:
        if (name, seed) in cells:
            return cells[(name, seed)]
        m = spec.methods[index[name]]
        teachers: list[str] = []
        if m.teacher is not None:
            tseeds = [seed if m.teacher_seed is None else m.teacher_seed]
            if m.ensemble:
                tseeds = ensemble_seeds(spec.seeds, seed, m.ensemble)
            teachers = [make(m.teacher, ts, ts in spec.seeds).rel for ts in tseeds]
        teacher, extra = (teachers[0] if teachers else None), tuple(teachers[1:])
        key = _cell_config(spec, index[name], seed, teacher, extra)  # fingerprinted with the relative teacher paths
        fp = key.fingerprint()
        runnable = replace(key, teacher=str(out / teacher), extra_teachers=tuple(str(out / e) for e in extra)) \
            if teacher else key
        cell = Cell(name, seed, runnable, fp, f"cells/{name}/seed{seed}-{fp}.pt", teacher, in_study,
                    _snapshots(spec, name, seed, runnable), extra)
        cells[(name, seed)] = cell  # inserted after its teacher: dict order is a valid training order
        return cell

    for m in spec.methods:
        for s in spec.seeds:
            make(m.name, s, True)
    return list(cells.values())


def _files(cell: Cell, out: Path) -> list[Path]:
    return [p for p in (cell.path(out), *cell.snapshot_files(out)) if p.exists()]


def verify_existing(cells: list[Cell], out: Path, data_fingerprint: str | None) -> None:
    """Refuse any file at a cell's path that is not that cell (trainers.cells.check_cell, shared with the
    pruning pipeline): architecture, config, data fingerprint, and the teacher chain where the teacher
    cell's file exists (a student is checked against the sha256 it recorded for its teacher)."""
    out = Path(out).resolve()
    for cell in cells:
        teachers = [out / t for t in cell.teachers]
        upstream = {"teachers": teachers} if teachers and all(t.exists() for t in teachers) else None
        for f in _files(cell, out):
            check_cell(f"cell {cell.label}", f, read_payload(f), cell.config, data_fingerprint=data_fingerprint,
                       upstream=upstream)


def _done_epochs(cell: Cell, out: Path) -> int:
    p = partial_path(cell.path(out))
    if not p.exists():
        return 0
    try:
        return int(read_payload(p).get("epoch", 0))
    except KdprobeError:
        return 0


class _EpochForwarder(Progress):
    """The cell's own bar, plus one outer-bar tick per finished epoch."""

    def __init__(self, inner: Progress, study: StudyProgress):
        self.inner, self.study = inner, study

    def start(self, total_steps, done_steps, desc):
        self.inner.start(total_steps, done_steps, desc)

    def step(self, n, postfix):
        self.inner.step(n, postfix)

    def epoch(self, record):
        self.inner.epoch(record)
        self.study.advance(1)

    def close(self):
        self.inner.close()


def _status(k: int, n: int, cell: Cell, out: Path) -> str:
    head = f"[{k}/{n}] cell {cell.label} -> {cell.rel}"
    if cell.done(out):
        return head + " (skip: exists)"
    done = _done_epochs(cell, out)
    why = f"resume after epoch {done}" if done else ("resume" if partial_path(cell.path(out)).exists() else "train")
    if cell.path(out).exists():
        why = "retrain: lr-stage snapshots missing"
    return head + f" ({why}{', teacher ' + ' + '.join(cell.teachers) if cell.teacher else ''})"


def cell_trackers(trackers: TrackerSpec | None, cell: Cell) -> TrackerSpec | None:
    """The study's trackers (--log) for one cell: its run named STUDY/METHOD/seedS (STUDY: trackers.run, the study
    folder's name), tagged with method, seed and file."""
    if trackers is None:
        return None
    return trackers.named(f"{trackers.run}/{cell.method}/seed{cell.seed}", method=cell.method, seed=cell.seed,
                          cell=cell.rel)


def train_cells(cells: list[Cell], out: Path, *, device: str = "auto", jobs: int = 1, nproc_per_cell: int = 1,
                progress: StudyProgress | None = None, trackers: TrackerSpec | None = None) -> dict[str, dict]:
    """Train the cells that do not exist yet; returns rel -> {"action", "seconds"} for every cell.

    jobs > 1: that many cells at once, each in its own process; nproc_per_cell > 1: each cell
    under `torchrun --nproc-per-node K` (DistributedDataParallel inside trainers.loop). trackers: every
    trained cell also logs there (cell_trackers); cells that exist already are not logged again.
    """
    out, progress = Path(out).resolve(), progress or StudyProgress()
    todo = [c for c in cells if not c.done(out)]
    progress.plan(sum(c.config.epochs - _done_epochs(c, out) for c in todo))
    info = {c.rel: {"action": "existing", "seconds": None} for c in cells if c.done(out)}
    if (jobs > 1 and len(todo) > 1) or (nproc_per_cell > 1 and todo):
        for k, c in enumerate(cells, 1):
            if c.done(out):
                progress.note(_status(k, len(cells), c, out))
        info.update(_train_parallel(todo, out, device, jobs, progress, nproc_per_cell, trackers))
        return info
    for k, cell in enumerate(cells, 1):
        progress.note(_status(k, len(cells), cell, out))
        if cell.done(out):
            continue
        action = "resumed" if partial_path(cell.path(out)).exists() else "trained"
        t0 = time.monotonic()
        res = train(cell.config, cell.path(out), device=device, snapshot_epochs=cell.snapshots,
                    progress=_EpochForwarder(progress.training(cell.label), progress),
                    trackers=cell_trackers(trackers, cell))
        record_hashes([cell], out)
        info[cell.rel] = {"action": action, "seconds": round(time.monotonic() - t0, 3)}
        progress.note(f"      {cell.label}: test accuracy {res.test_acc:.2%} (last epoch), "
                      f"{info[cell.rel]['seconds']:.1f}s")
    return info


def _epochs_logged(cell: Cell, out: Path) -> int:
    try:
        return len(log_path(cell.path(out)).read_text().splitlines())
    except OSError:
        return 0


def _command(job: Path, nproc: int) -> list[str]:
    cell = ["-m", "trainers.study", "--cell", str(job)]
    if nproc <= 1:
        return [sys.executable, *cell]
    # --standalone: a private rendezvous on a free port, so several cells can run at once
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cell]


def _train_parallel(todo: list[Cell], out: Path, device: str, jobs: int, progress: StudyProgress,
                    nproc: int = 1, trackers: TrackerSpec | None = None) -> dict:
    """Up to `jobs` cells at once, each `python -m trainers.study --cell JOB.json` (log next to the cell)."""
    dev = resolve_device(device)
    threads = max(1, (os.cpu_count() or 1) // (jobs * nproc)) if dev.type == "cpu" else 0
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    placement = plan_placement(device, jobs, nproc)  # a child sees only its GPUs and asks for placement.child_device
    slots = placement.slots
    free = list(range(jobs))
    pending, running, info = list(todo), {}, {}
    seen = {c.rel: _epochs_logged(c, out) for c in todo}
    failed = None
    try:
        while pending or running:
            ready = [c for c in pending if all((out / t).exists() for t in c.teachers)]
            while ready and len(running) < jobs and failed is None:
                c = ready.pop(0)
                pending.remove(c)
                job = c.path(out).with_suffix(".job.json")
                job.parent.mkdir(parents=True, exist_ok=True)
                cell_log = cell_trackers(trackers, c)
                job.write_text(json.dumps({"config": c.config.to_dict(), "out": str(c.path(out)),
                                           "device": placement.child_device,
                                           "threads": threads, "snapshots": list(c.snapshots),
                                           "trackers": cell_log.to_dict() if cell_log else None}))
                log = open(c.path(out).with_suffix(".log"), "a")
                action = "resumed" if partial_path(c.path(out)).exists() else "trained"
                slot = free.pop(0)
                cenv = env if slots[slot] is None else dict(env, CUDA_VISIBLE_DEVICES=slots[slot])
                proc = subprocess.Popen(_command(job, nproc), env=cenv, stdout=log, stderr=subprocess.STDOUT)
                running[c.rel] = (c, proc, log, time.monotonic(), action, slot)
                progress.note(f"[{len(info) + len(running)}/{len(todo)} to train] cell {c.label} -> {c.rel} "
                              f"({action}, subprocess {proc.pid}, log {c.path(out).with_suffix('.log').name})")
            time.sleep(0.5)
            for rel, (c, proc, log, t0, action, slot) in list(running.items()):
                now = _epochs_logged(c, out)
                progress.advance(now - seen[rel])
                seen[rel] = now
                rc = proc.poll()
                if rc is None:
                    continue
                log.close()
                del running[rel]
                free.append(slot)
                if rc != 0:
                    failed = failed or f"cell {c.label} failed (exit {rc}); see {c.path(out).with_suffix('.log')}"
                    continue
                info[rel] = {"action": action, "seconds": round(time.monotonic() - t0, 3)}
                record_hashes([c], out)
                progress.note(f"done: cell {c.label} in {info[rel]['seconds']:.1f}s")
            if failed and not running:
                raise KdprobeError(failed + "; fix it and run the same command again to resume")
            if not running and pending and not any(all((out / t).exists() for t in c.teachers) for c in pending):
                raise KdprobeError(f"cells {[c.label for c in pending]} wait for teachers that were not trained")
    finally:
        for c, proc, log, *_ in running.values():  # Ctrl-C or an error: stop the children, keep their partials
            proc.terminate()
            proc.wait()
            log.close()
    return info


def _cell_main(job_file: str) -> int:
    """Subprocess entry: train one cell from its job file (written by _train_parallel)."""
    job = json.loads(Path(job_file).read_text())
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    cfg = TrainConfig.from_dict(job["config"])
    res = train(cfg, job["out"], device=job["device"], snapshot_epochs=tuple(job["snapshots"]),
                trackers=TrackerSpec.from_dict(job.get("trackers")))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank runs this; one reports
        print(f"{cfg.method} seed {cfg.seed}: test accuracy {res.test_acc:.2%} -> {res.path}", flush=True)
        Path(job_file).unlink(missing_ok=True)
    return 0


def run_study(spec: StudySpec, out, *, device: str = "auto", jobs: int = 1, nproc_per_cell: int = 1,
              spec_text: str | None = None, progress: StudyProgress | None = None, executor: str = "local",
              slurm=None, detach: bool = False, figures: str = "pdf,png", trackers: TrackerSpec | None = None):
    """Train (or resume) every cell, run the spec's probes, write summary.json and report.html (and the static
    figures, `figures`: 'pdf,png', ... or 'none', in figures/).

    executor "slurm": the cells run as Slurm jobs (trainers.study_slurm; slurm: its SlurmOptions, default the
    spec's [slurm]); detach: return None right after submitting while cells are left to run. trackers: the
    cells' trainings also log to TensorBoard / W&B / MLflow (trainers.trackers; one run per cell, cell_trackers)."""
    from kdprobe.writers.report import write_cells_csv, write_landscape_page, write_report, write_summary_json
    from kdprobe.writers.report_figures import write_study_figures
    from kdprobe.writers.static_figures import parse_formats
    from kdprobe.writers.report_markdown import write_report_markdown
    from trainers.study_probes import assemble, check_probes

    formats = () if figures == "none" else parse_formats(figures, "figures")  # a typo fails before any training

    if jobs < 1 or nproc_per_cell < 1:
        raise KdprobeError(f"expected --jobs >= 1 and --nproc-per-cell >= 1, got {jobs} and {nproc_per_cell}")
    out, progress, spec = Path(out).resolve(), progress or StudyProgress(), locate_data(spec)
    t0 = time.monotonic()
    dev = resolve_device(device)
    if (jobs > 1 or nproc_per_cell > 1) and executor == "local":  # an impossible placement fails now
        plan_placement(device, jobs, nproc_per_cell)
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        # tiny models on a few cores: one intra-op thread per process is several times faster
        # (no oversubscription); parallelism comes from --jobs instead
        torch.set_num_threads(1)
    locks = ExitStack()
    try:
        cells = plan_cells(spec, out)
        check_probes(spec)  # the data and every probe setting: a mistake fails now, before DIR is made
        locks.enter_context(output_lock(folders=(out,), command="study"))  # one study per folder at a time
        out.mkdir(parents=True, exist_ok=True)
        if spec_text is not None:
            atomic_write_text(out / "spec.toml", spec_text)
        existing = [c for c in cells if _files(c, out)]
        if existing:  # before any training: every file already there must be its cell, and the file recorded
            verify_existing(existing, out, load_dataset(spec.train.dataset, spec.train.data_dir).fingerprint)
            verify_hashes(existing, out)
        if trackers is not None:
            prepare_trackers(trackers)  # a shared MLflow store is made once, before cells log to it at once
        if executor == "slurm":  # cells (and pruning blocks) as Slurm jobs; None: detached, cells still to run
            from trainers.study_slurm import train_cells_slurm

            info = train_cells_slurm(spec, cells, out, slurm, device=device, detach=detach, progress=progress,
                                     nproc_per_cell=nproc_per_cell, trackers=trackers)
            if info is None:
                return None
        else:
            info = train_cells(cells, out, device=device, jobs=jobs, nproc_per_cell=nproc_per_cell,
                               progress=progress, trackers=trackers) if cells else {}
        # a reused cell whose teacher was (re)trained just now: its recorded teacher sha256 must match
        verify_existing([c for c in existing if c.teacher], out, None)
        verify_hashes(cells, out)  # what the probes read is what the accuracy table's numbers came with
        result = assemble(spec, out, cells, info, dev, progress, t0, device, trackers=trackers)
        write_cells_csv(result, out / "cells.csv")
        write_summary_json(result, out / "summary.json")
        write_report(result, out / "report.html")
        if formats:  # before report.md, which embeds the PNGs
            write_study_figures(result, out / "figures", formats)
        write_report_markdown(result, out / "report.md")
        if result.landscapes:
            write_landscape_page(result, out / "landscapes.html")
        return result
    finally:
        locks.close()
        torch.set_num_threads(threads)
        progress.close()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--cell":
        sys.exit(_cell_main(sys.argv[2]))
    sys.exit("usage: python -m trainers.study --cell JOB.json  (kdprobe study runs this for --jobs > 1)")
