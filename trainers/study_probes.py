"""The probes of a study, run on its trained cells: accuracy, diversity, the ensemble-perspective probes
(trainers.study_ensemble), landscapes, pruning/surplus.

Each step calls the library probe and writer that the single-purpose commands use
(kdprobe diversity / landscape / surplus); this module only picks the checkpoints, names
the files and collects the results into a kdprobe.studies.result.StudyResult.
"""
from __future__ import annotations

import hashlib
import json
import platform
import re
import time
from dataclasses import asdict, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from kdprobe.checkpoints.format import library_versions, load_checkpoint, read_payload
from kdprobe.runtime.machine import machine
from kdprobe.data.preprocess import fit_input
from kdprobe.data.datasets import load_dataset
from kdprobe.probes.diversity_table import DiversitySettings, DiversityTable, ModelScore, summarize_groups
from kdprobe.errors import KdprobeError
from kdprobe.studies.result import CellRecord, LandscapeRecord, PruningBlock, StudyResult
from kdprobe.studies.spec import StudySpec
from trainers.cells import model_label
from trainers.study_ensemble import ensemble_probes, spec_arch

SAVE_EVERY_S = 10.0  # partial landscape HDF5 saves (a killed study loses at most this much)
DIRECTIONS_NOTE = ("d1, d2 = the same seeded Gaussian draw for every checkpoint (seed {seed}), filter-normalized "
                   "to each checkpoint's own filters (Li et al. 2018), i.e. one random plane orientation, each "
                   "model's own scale; the directions are stored in every .h5 file")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _data(spec: StudySpec):
    return load_dataset(spec.train.dataset, spec.train.data_dir)


def _pipeline_spec(spec: StudySpec, i: int):
    from trainers.pipeline import PipelineSpec

    block = {k: v for k, v in spec.pruning[i].items() if k != "label"}
    block.setdefault("seeds", list(spec.seeds))
    allowed = {f.name for f in fields(PipelineSpec)}
    bad = sorted(set(block) - allowed)
    if bad:
        raise KdprobeError(f"{spec.source}: pruning[{i}].{bad[0]}: unknown key; expected one of "
                           f"{', '.join(sorted(allowed | {'label'}))}")
    block = {k: tuple(v) if isinstance(v, list) else v for k, v in block.items()}
    try:
        return PipelineSpec(**block)
    except KdprobeError as e:
        raise KdprobeError(f"{spec.source}: pruning[{i}]: {e}") from None


def check_probes(spec: StudySpec) -> None:
    """Settings that need the data or the pipeline, checked before any training (and the data loads)."""
    blocks = [_pipeline_spec(spec, i) for i in range(len(spec.pruning))]
    for source in dict.fromkeys((b.dataset, b.data_dir) for b in blocks):
        load_dataset(*source)  # an unknown or missing dataset fails now, not after the first cells
    if spec.train is None:
        return
    data = _data(spec)
    if spec.probes:
        _check_ensemble_probes(spec, data)
    d = spec.diversity
    if d is None:
        return
    x, _ = data.split(d.split)
    row = x[0].numel() * (data.num_classes if d.output == "full" else 1)
    if d.variant == "v1" and d.batch_size > row - 1:
        raise KdprobeError(f"{spec.source}: diversity.batch_size: expected at most {row - 1} for Jacobian rows of "
                           f"length {row} ({tuple(x.shape[1:])} inputs), got {d.batch_size}; the correlation "
                           "matrix would be singular")
    if d.batch_size > len(x):
        raise KdprobeError(f"{spec.source}: diversity.batch_size: expected at most the {len(x)} {d.split} images, "
                           f"got {d.batch_size}")


def _check_ensemble_probes(spec: StudySpec, data) -> None:
    """Probe settings that need the data or the model: the CKA layer exists, temperature scaling has 2 samples."""
    from kdprobe.models import create_model
    from kdprobe.probes.features import _module, penultimate_layer

    cka, cal = spec.probes.get("cka"), spec.probes.get("calibration")
    if cka is not None:
        model = create_model(spec.train.model, num_classes=data.num_classes, in_channels=data.in_channels,
                             **spec.train.model_kwargs)
        try:
            _module(model, cka.options["layer"] or penultimate_layer(model))
        except KdprobeError as e:
            raise KdprobeError(f"{spec.source}: cka.layer: {e}") from None
    if cal is not None and cal.options["temperature"] and (cal.samples or len(data.split(cal.split)[1])) < 2:
        raise KdprobeError(f"{spec.source}: calibration.samples: expected at least 2 samples for temperature "
                           f"scaling (a fit half and an evaluation half), got {cal.samples}")


def _cell_records(cells, out: Path, info: dict) -> list[CellRecord]:
    recs = []
    for c in cells:
        meta = read_payload(c.path(out))["meta"]
        recs.append(CellRecord(c.method, c.seed, c.rel, c.fingerprint, c.teacher, float(meta["test_acc"]),
                               float(meta["best_acc"]), int(meta["epochs"]), c.in_study,
                               info.get(c.rel, {}).get("action", "existing"), info.get(c.rel, {}).get("seconds"),
                               tuple(str(p.relative_to(out)) for p in c.snapshot_files(out)),
                               int(meta.get("world_size", 1)), model_label(c.config.model, c.config.model_kwargs),
                               str(meta.get("dataset", c.config.dataset))))
    return recs


def _accuracy(spec: StudySpec, records: list[CellRecord], confidence: float, interval: str):
    scores = [ModelScore.from_values(r.path, r.method, r.seed, [r.test_acc]) for r in records if r.in_study]
    if not scores:
        return (), None
    ref = "scratch" if any(s.group == "scratch" for s in scores) else None
    return tuple(summarize_groups(scores, reference=ref, confidence=confidence, interval=interval)), ref


def _diversity(spec: StudySpec, cells, out: Path, dev: torch.device, progress) -> tuple[DiversityTable, dict]:
    from kdprobe.probes.diversity import jacobian_scores, probe_batches
    from kdprobe.writers.diversity_files import write_diversity_csv, write_diversity_json
    from kdprobe.writers.diversity_plot import write_diversity_html

    d = spec.diversity
    data = _data(spec)
    batches = [b.to(dev) for b in probe_batches(data, d.split, d.runs, d.batch_size, d.seed)]
    chosen = [c for m in d.methods for c in cells if c.method == m and c.in_study]
    bar = progress.training("diversity")
    bar.start(len(chosen), 0, "diversity")
    scores = []
    try:
        for c in chosen:
            ck = load_checkpoint(c.path(out), map_location=dev, arch=spec_arch(spec))
            fit_input(ck.model, ck.meta, data)  # the input size/normalization the cell was trained with
            model = ck.model
            vals = jacobian_scores(model, batches, variant=d.variant, bn=d.bn, output=d.output, k=d.k)
            scores.append(ModelScore.from_values(c.rel, c.method, c.seed, vals))
            bar.step(1, {})
    finally:
        bar.close()
    ref = d.reference if d.reference in d.methods else None
    groups = summarize_groups(scores, reference=ref, confidence=d.confidence, interval=d.interval)
    settings = DiversitySettings(batch_size=d.batch_size, runs=d.runs, split=d.split, bn=d.bn, output=d.output,
                                 variant=d.variant, k=d.k, seed=d.seed, dataset=spec.train.dataset, group_by="method",
                                 reference=ref, confidence=d.confidence, interval=d.interval)
    table = DiversityTable(settings, tuple(scores), tuple(groups))
    files = {"diversity.csv": "diversity.csv", "diversity.json": "diversity.json", "diversity.html": "diversity.html"}
    write_diversity_csv(scores, groups, settings, out / "diversity.csv")
    write_diversity_json(scores, groups, settings, out / "diversity.json")
    write_diversity_html(table, out / "diversity.html")
    return table, files


def _surface(ck, x, y, xs, ys, ls, dirs, h5: Path, settings: dict, bar):
    """Compute (or finish, or reuse) one surface; the HDF5 file is saved every SAVE_EVERY_S seconds."""
    from kdprobe.probes.landscape import compute_surface
    from kdprobe.writers.landscape_h5 import read_surface_h5, write_surface_h5

    resume = None
    if h5.exists():
        try:
            old, attrs = read_surface_h5(h5)
            if all(str(attrs.get(k)) == str(v) for k, v in settings.items() if k != "checkpoint"):
                resume = old
        except KdprobeError:
            resume = None  # unreadable: start afresh (the file is replaced atomically below)
    if resume is not None and resume.complete:
        return resume, False
    last = [time.monotonic()]

    state = {"n": 0 if resume is None else int(resume.done.sum()), "latest": None}
    bar.step(state["n"], {})

    def save(partial):
        done = int(partial.done.sum())
        bar.step(done - state["n"], {})
        state.update(n=done, latest=partial)
        if time.monotonic() - last[0] >= SAVE_EVERY_S:
            write_surface_h5(partial, h5, split=ls.split, settings=settings)
            last[0] = time.monotonic()

    try:
        res = compute_surface(ck.model, x, y, xcoords=xs, ycoords=ys, directions=dirs, bn=ls.bn,
                              precision=ls.precision, resume=resume, progress=save)
    except BaseException:  # Ctrl-C or a crash: keep every finished point for the next run
        if state["latest"] is not None:
            write_surface_h5(state["latest"], h5, split=ls.split, settings=settings)
        raise
    write_surface_h5(res, h5, split=ls.split, settings=settings)
    return res, True


def _landscapes(spec: StudySpec, cells, out: Path, dev: torch.device, progress) -> list[LandscapeRecord]:
    from kdprobe.probes.landscape import make_directions, parse_grid
    from kdprobe.probes.landscape_eval import resolve_precision
    from kdprobe.writers.landscape_vtk import height, write_surface_vtk

    ls = spec.landscape
    data = _data(spec)
    x, y = data.head(ls.split, ls.samples)
    x, y, n = x.to(dev), y.to(dev), len(y)
    xs, ys = parse_grid(ls.x), parse_grid(ls.y)
    key = {"x": ls.x, "y": ls.y, "samples": n, "split": ls.split, "bn": ls.bn,
           "precision": resolve_precision(ls.precision, dev), "seed": ls.seed, "include_bn": ls.include_bn}
    tag = "ls" + _digest(key)
    todo = []
    for m in ls.methods:
        for c in cells:
            if c.method == m and c.seed in ls.seeds and c.in_study:
                stages = [(e, p) for e, p in zip(c.snapshots, c.snapshot_files(out))] + [(c.config.epochs,
                                                                                          c.path(out))]
                for k, (epoch, path) in enumerate(stages, 1):
                    group = "final" if ls.at == "final" else f"end of lr stage {k}"
                    todo.append((group, c, epoch, path))
    bar = progress.training("landscapes")
    bar.start(len(todo) * xs.size * ys.size, 0, f"landscapes ({len(todo)} x {ys.size}x{xs.size} points)")
    records, surfaces = [], []
    try:
        for group, c, epoch, path in todo:
            ck = load_checkpoint(path, map_location=dev, arch=spec_arch(spec))
            fit_input(ck.model, ck.meta, data)
            dirs = make_directions(ck.model, seed=ls.seed, include_bn=ls.include_bn)
            h5 = out / "landscapes" / c.method / f"{c.method}-{path.stem}-{tag}.h5"  # the method in the name too
            vtk = h5.with_suffix(".vtk")
            settings = dict(key, checkpoint=str(path.relative_to(out)), checkpoint_sha256=ck.sha256,
                            directions_sha256=dirs.fingerprint(), dataset=spec.train.dataset,
                            method=c.method, reference="Li et al. 2018, filter-normalized")
            t0 = time.monotonic()
            res, fresh = _surface(ck, x, y, xs, ys, ls, dirs, h5, settings, bar)
            surfaces.append((res, vtk, path))
            if not fresh:
                bar.step(xs.size * ys.size, {})
            records.append(LandscapeRecord(
                group, c.method, c.seed, epoch, str(path.relative_to(out)), str(h5.relative_to(out)),
                str(vtk.relative_to(out)), tuple(map(float, res.xcoords)), tuple(map(float, res.ycoords)),
                tuple(tuple(map(float, r)) for r in res.loss), tuple(tuple(map(float, r)) for r in res.acc),
                int(res.num_samples), ls.split, res.bn, res.precision, ls.seed, ls.include_bn, dirs.fingerprint(),
                round(time.monotonic() - t0, 3) if fresh else None))
    finally:
        bar.close()
    # every .vtk of the study on one height scale (recorded in each file), so they compare in ParaView
    heights = [height(r.loss, log=ls.log, zmax=ls.zmax) for r, _, _ in surfaces]
    shared = (min(float(np.nanmin(h)) for h in heights), max(float(np.nanmax(h)) for h in heights)) if heights else None
    for res, vtk, path in surfaces:
        write_surface_vtk(res, vtk, log=ls.log, zmax=ls.zmax, title=f"kdprobe {ls.split} loss {path.name}",
                          height_range=shared)
    return records


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")


def pruning_block(spec: StudySpec, i: int, out: Path):
    """(PipelineSpec, folder, label) of the spec's pruning block i: where its cells live, whichever executor
    makes them (trainers.study_slurm submits them to Slurm before the probes find them there)."""
    ps = _pipeline_spec(spec, i)
    folder = out / "pruning" / f"{_slug(ps.model_label)}-{_slug(ps.setting)}-{_digest(asdict(ps))}"
    return ps, folder, spec.pruning[i].get("label") or f"{ps.model_label} {ps.setting}"


def _pruning(spec: StudySpec, out: Path, device: str, progress, trackers=None) -> list[PruningBlock]:
    from trainers.pipeline import run_pruning_pipeline

    blocks = []
    for i in range(len(spec.pruning)):
        ps, folder, label = pruning_block(spec, i, out)

        def event(e, label=label):
            if e.stage == "start" or e.action == "skip":
                what = "skip: exists" if e.action == "skip" else e.action
                progress.note(f"[{e.index}/{e.total}] pruning {label}: {e.cell.file} ({what})")

        res = run_pruning_pipeline(ps, folder, device=device, on_event=event,
                                   progress_factory=lambda c, label=label: progress.training(f"{label} {c.file}"),
                                   trackers=trackers, run_prefix=f"{out.name}/pruning/{folder.name}/")
        files = {k: str(Path(p).resolve().relative_to(out)) for k, p in res.files.items()}
        results = tuple({k: v for k, v in (r if isinstance(r, dict) else asdict(r)).items()
                         if k not in ("line", "source")} for r in res.rows)
        run = sum(c.action != "skipped" for c in res.cells)
        blocks.append(PruningBlock(label, str(folder.relative_to(out)), tuple(res.surplus), files, results,
                                   len(res.cells), run))
    return blocks


def _versions(dev: torch.device) -> dict:
    import h5py
    import plotly
    import scipy

    v = dict(library_versions(), numpy=np.__version__, scipy=scipy.__version__, plotly=plotly.__version__,
             h5py=h5py.__version__, platform=platform.platform())
    v["machine"] = machine(dev)  # where the probes ran (the CUDA device too): kdprobe compare's tolerance follows it
    v["device_name"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or "cpu")
    return v


def assemble(spec: StudySpec, out: Path, cells, info: dict, dev: torch.device, progress, t0: float,
             device: str = "auto", trackers=None) -> StudyResult:
    """Run the spec's probes on the trained cells and collect every number into a StudyResult (trackers: the
    study's --log, for the trainings of its pruning blocks, which run here)."""
    records = _cell_records(cells, out, info)
    conf, interval = (spec.diversity.confidence, spec.diversity.interval) if spec.diversity else (0.99, "t")
    accuracy, acc_ref = _accuracy(spec, records, conf, interval)
    files = {"summary.json": "summary.json", "cells.csv": "cells.csv", "spec.toml": "spec.toml",
             "report.md": "report.md"}
    diversity = None
    if spec.diversity is not None:
        diversity, more = _diversity(spec, cells, out, dev, progress)
        files.update(more)
    probes, verdicts, more = ensemble_probes(spec, cells, out, dev, progress)
    files.update(more)
    landscapes = _landscapes(spec, cells, out, dev, progress) if spec.landscape is not None else []
    if landscapes:
        files["landscapes.html"] = "landscapes.html"
    pruning = _pruning(spec, out, device, progress, trackers) if spec.pruning else []
    ls = spec.landscape
    display = {} if ls is None else {"log": ls.log, "zmax": ls.zmax, "directions": DIRECTIONS_NOTE.format(seed=ls.seed)}
    notes = []
    if any(c.teacher for c in cells):
        notes.append("a KD cell's teacher is the named method's cell of the same seed (unless teacher_seed is set); "
                     "student and teacher of one seed share the initialization seed and the data order")
    if any(c.extra_teachers for c in cells):
        notes.append("an ensemble-taught cell (ensemble = K) distils from the average of the probabilities of the "
                     "teacher method's cells of K seeds: its own, then the study's next seeds in order, cyclically")
    if any(m.generation for m in spec.methods):
        notes.append("a born-again chain (generations = K) is K methods NAME-gen1..NAME-genK: generation 1 is taught "
                     "by the named teacher, generation g by generation g-1 of the same seed")
    return StudyResult(
        spec.name, spec.title, spec.scale, spec.source, spec.settings, _versions(dev), str(dev),
        datetime.now(timezone.utc).isoformat(timespec="seconds"), round(time.monotonic() - t0, 3), tuple(records),
        accuracy, conf, interval, acc_ref, diversity, tuple(landscapes), display, tuple(pruning), files,
        tuple(notes), probes, verdicts)
