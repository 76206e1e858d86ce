"""The ensemble-perspective probes of a study, run on its trained cells: agreement, ensembles,
calibration, CKA and sharpness, with the ensemble-reading verdict of each.

The tables are built by kdprobe.probes.sets, as `kdprobe agreement|calibration|cka|sharpness`
build them, so a study's numbers are those the commands give for the same checkpoints (paths
relative to the study folder, group = the spec's method name). Agreement, ensembles and
calibration read one logit cache per sample set (split, samples, forward batch): with the
built-in specs that is one forward pass per checkpoint for all three.
"""
from __future__ import annotations

from pathlib import Path

import torch

from kdprobe.checkpoints.format import load_checkpoint, read_payload
from kdprobe.models.registry import names_code
from kdprobe.studies.ensemble_reading import verdicts
from kdprobe.files.io import sha256_file
from kdprobe.probes.pairs import Member
from kdprobe.probes.sets import AGREEMENT_NOTES, CALIBRATION_NOTES, PAIR_UNIT, agreement_part, calibration_part, \
    cka_group_part, group_ensembles, sharpness_part, temperature_note
from kdprobe.probes.tables import ProbeTables, ensemble_tables
from kdprobe.studies.spec import StudySpec
from kdprobe.studies.spec_probes import ProbeSpec


def spec_arch(spec: StudySpec) -> str | None:
    """The spec's model when it is user code (python:...): the user typed it, so its cells may rebuild it."""
    return spec.train.model if names_code(spec.train.model) else None


def _member(cell, out: Path) -> Member:
    meta = read_payload(cell.path(out)).get("meta") or {}
    teacher = meta.get("teacher") if isinstance(meta.get("teacher"), dict) else {}
    return Member(cell.rel, cell.method, sha256_file(cell.path(out)), teacher.get("sha256"), cell.seed)


def _samples(data, p: ProbeSpec):
    x, y = data.split(p.split)
    n = len(y) if p.samples == 0 else min(p.samples, len(y))
    return x[:n], y[:n]


class _Run:
    """What every probe of one study shares: data, members, logit caches, the progress display."""

    def __init__(self, spec: StudySpec, cells, out: Path, dev: torch.device, progress):
        from kdprobe.data.datasets import load_dataset

        self.spec, self.out, self.dev, self.progress = spec, out, dev, progress
        self.data = load_dataset(spec.train.dataset, spec.train.data_dir)
        self.cells = {c.rel: c for c in cells if c.in_study}
        self._members: dict[str, Member] = {}
        self.caches: dict[tuple, object] = {}

    def members(self, p: ProbeSpec) -> list[Member]:
        out = []
        for m in p.methods:  # method order of the spec, seeds in order: the tables' order
            for c in self.cells.values():
                if c.method == m:
                    if c.rel not in self._members:
                        self._members[c.rel] = _member(c, self.out)
                    out.append(self._members[c.rel])
        return out

    def model(self, rel: str):
        from kdprobe.data.preprocess import fit_input

        ck = load_checkpoint(self.cells[rel].path(self.out), map_location=self.dev, arch=spec_arch(self.spec))
        fit_input(ck.model, ck.meta, self.data)  # the input size/normalization the cell was trained with
        return ck.model

    def each(self, label: str, members: list[Member]):
        """Yield (member, model on the device) with a progress bar."""
        bar = self.progress.training(label)
        bar.start(len(members), 0, label)
        try:
            for m in members:
                yield m, self.model(m.path)
                bar.step(1, {})
        finally:
            bar.close()

    def logits(self, p: ProbeSpec, members: list[Member]):
        """The shared LogitCache of p's sample set, holding every member's logits (one forward pass each)."""
        from kdprobe.probes.predictions import LogitCache

        key = (p.split, p.samples, p.options["batch_size"])
        if key not in self.caches:
            x, y = _samples(self.data, p)
            self.caches[key] = LogitCache(x, y, mean=self.data.mean, std=self.data.std,
                                          batch_size=p.options["batch_size"])
        cache = self.caches[key]
        todo = [m for m in members if m.path not in cache]
        for m, model in self.each(f"logits ({p.split})", todo):
            cache.get(m.path, model)
        return cache

    def settings(self, p: ProbeSpec, members: list[Member], n: int) -> dict:
        return {"dataset": self.spec.train.dataset, "split": p.split, "samples": p.samples, "samples_used": int(n),
                "group_by": "method", "methods": list(p.methods), "reference": p.reference,
                "confidence": p.confidence, "interval": p.interval, "seed": p.seed, "alpha": p.alpha,
                "checkpoints": len(members)}


def _agreement(run: _Run, p: ProbeSpec, members: list[Member]) -> ProbeTables:
    cache = run.logits(p, members)
    lp = {m.path: cache[m.path].log_probs() for m in members}
    part = agreement_part(members, lp, cache.labels, bins=p.options["bins"], reference=p.reference,
                          confidence=p.confidence, interval=p.interval)
    settings = {**run.settings(p, members, len(cache.labels)), **p.options, "forward_passes": cache.forward_passes,
                **AGREEMENT_NOTES}
    return ProbeTables("agreement", settings, part)


def _ensembles(run: _Run, p: ProbeSpec, members: list[Member]) -> ProbeTables:
    cache = run.logits(p, members)
    lp = {m.path: cache[m.path].log_probs() for m in members}
    o = p.options
    ens, tests = group_ensembles(members, lp, cache.labels, reference=p.reference, max_subsets=o["max_subsets"],
                                 seed=p.seed, bins=o["bins"], confidence=p.confidence, interval=p.interval)
    settings = {**run.settings(p, members, len(cache.labels)), **o, "forward_passes": cache.forward_passes,
                **AGREEMENT_NOTES}
    return ProbeTables("ensembles", settings, ensemble_tables(ens, tests))


def _calibration(run: _Run, p: ProbeSpec, members: list[Member]) -> ProbeTables:
    cache = run.logits(p, members)
    o = p.options
    part, _ = calibration_part(members, {m.path: cache[m.path].logits for m in members}, cache.labels,
                               bins=o["bins"], adaptive=o["adaptive"], classwise=o["classwise"],
                               temperature=o["temperature"], seed=p.seed, reference=p.reference,
                               confidence=p.confidence, interval=p.interval)
    settings = {**run.settings(p, members, len(cache.labels)), **o, **CALIBRATION_NOTES,
                "temperature_split": temperature_note(o["temperature"]), "forward_passes": cache.forward_passes}
    return ProbeTables("calibration", settings, part)


def _cka(run: _Run, p: ProbeSpec, members: list[Member]) -> ProbeTables:
    from kdprobe.probes.cka import CkaCache
    from kdprobe.probes.features import NormalizedImages

    x, y = _samples(run.data, p)
    cache = CkaCache(NormalizedImages(x, run.data.mean, run.data.std), estimator=p.options["estimator"],
                     batch_size=p.options["batch_size"])
    for m, model in run.each("cka features", members):
        cache.add(m.path, model, p.options["layer"])
    part = cka_group_part(members, cache, reference=p.reference, confidence=p.confidence, interval=p.interval)
    settings = {**run.settings(p, members, len(y)), **p.options, "layer": p.options["layer"] or
                "penultimate (input of the last Linear)", "estimator": cache.estimator, "bn": "eval",
                "kernel": "linear", "hsic": "unbiased (Song et al. 2012)", "forward_passes": cache.forward_passes,
                "pair_unit": PAIR_UNIT}
    return ProbeTables("cka", settings, part)


def _sharpness(run: _Run, p: ProbeSpec, members: list[Member]) -> ProbeTables:
    from kdprobe.probes.features import NormalizedImages
    from kdprobe.probes.sharpness import sharpness

    x8, y = _samples(run.data, p)
    x = NormalizedImages(x8, run.data.mean, run.data.std)[:]
    o = p.options
    results = []
    for _, model in run.each("sharpness", members):
        results.append(sharpness(model, x, y, top_k=o["top_k"], iterations=o["iterations"],
                                 tol=o["tol"], trace_samples=o["trace_samples"], density=o["density"],
                                 lanczos_steps=o["lanczos_steps"], density_runs=o["density_runs"], bn=o["bn"],
                                 batch_size=o["batch_size"], vectors_per_pass=o["vectors_per_pass"], mode=o["hvp"],
                                 seed=p.seed))
    part = sharpness_part(members, results, reference=p.reference, confidence=p.confidence, interval=p.interval)
    settings = {**run.settings(p, members, len(y)), **o, "loss": "mean cross-entropy",
                "variables": "every parameter with requires_grad"}
    return ProbeTables("sharpness", settings, part)


_RUNNERS = {"agreement": _agreement, "ensembles": _ensembles, "calibration": _calibration, "cka": _cka,
            "sharpness": _sharpness}


def ensemble_probes(spec: StudySpec, cells, out: Path, dev: torch.device, progress) -> tuple[dict, tuple, dict]:
    """Run the spec's switched-on probes: (name -> ProbeTables, verdicts, files written as <probe>.json/.html)."""
    from kdprobe.writers.probe_files import write_probe_json
    from kdprobe.writers.probe_plots import write_probe_html

    if not spec.probes:
        return {}, (), {}
    run = _Run(spec, cells, out, dev, progress)
    results, found, files = {}, [], {}
    for name, p in spec.probes.items():
        tables = _RUNNERS[name](run, p, run.members(p))
        results[name] = tables
        kd = [m for m in p.methods if spec.method(m).distill != "none"]
        found += verdicts(name, tables.tables, kd, p.reference, p.alpha)
        write_probe_json(tables, out / f"{name}.json")
        write_probe_html(tables, out / f"{name}.html")
        files.update({f"{name}.json": f"{name}.json", f"{name}.html": f"{name}.html"})
    return results, tuple(found), files
