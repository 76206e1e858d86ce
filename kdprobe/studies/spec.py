"""Study specs: a small TOML file that names what to train (methods x seeds) and what to probe.

    name = "table6"                     # optional; default: the file name
    title = "..."                       # one line for the report
    default_scale = "digits"            # scale used when --scale is not given
    seeds = [0, 1, 2, 3, 4]
    [train]                             # shared by every cell
    dataset = "cifar10"; model = "resnet56"; model_kwargs = {}; preset = "repdistiller"
                                        # dataset "auto:cifar10": found at run time (kdprobe.studies.data_lookup)
    overrides = {}                      # any TrainConfig field (epochs, lr, train_subset, ...)
    [[methods]]                         # one per compared method; its name is the cell folder
    name = "kd-label"; augment = "standard"; distill = "label"
    teacher = "scratch"                 # the cell of method "scratch" with the same seed
    teacher_seed = 0                    # optional: always that seed's teacher instead
    ensemble = 3                        # optional (label/dkd): taught by the average of the teacher method's
                                        # cells of 3 study seeds, the student's own first, then the next ones
                                        # of `seeds` in order, cyclically
    generations = 3                     # optional: a born-again chain, methods NAME-gen1..NAME-gen3; gen 1 taught
                                        # by `teacher`, gen g by gen g-1 (each its own method in the report)
    kd_settings = {}                    # a KD family's settings that differ from its defaults (e.g. { beta = 6 })
    overrides = {}
    [diversity]  batch_size, runs, split, bn, output, variant, k, seed, confidence, interval, reference, methods
    [landscape]  methods, seeds, x, y, samples, split, bn, precision, seed, include_bn, at, log, zmax
    [agreement] [ensembles] [calibration] [cka] [sharpness]   the ensemble-perspective probes
                 (kdprobe.studies.spec_probes: split, samples, methods, reference, ..., and their own options)
    [[pruning]]  one table per pruning block (trainers.pipeline.PipelineSpec fields)
    [slurm]      how `--executor slurm` submits each cell: partition, account, qos, time, gpus_per_cell,
                 cpus_per_cell, mem_per_cell, array_parallelism, constraint, setup, extra = { KEY = VALUE }
                 (trainers.executors.SlurmOptions; flags win); not a study setting, so not in the summary
    [scales.NAME]                       # deep-merged over everything above by --scale NAME

Parsing is pure (no training, no data): every mistake is a KdprobeError naming the TOML key.
Values that only the training code can check (augment, distill, TrainConfig fields, pruning
fields) are checked by trainers.study when it plans the cells, again naming the key.
"""
from __future__ import annotations

import copy
import re
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from kdprobe.errors import KdprobeError
from kdprobe.studies.keys import _Keys, _name_list
from kdprobe.files.io import read_text
from kdprobe.ranges import (CONFIDENCE, MAX_BATCH, MAX_NESTING, PROBE_RANGES as P, SEED, Range, abbreviate,
                            check_extent, check_text, check_tree, parse_toml)

_TOP = ("name", "title", "default_scale", "seeds", "train", "methods", "diversity", "landscape", "agreement",
        "ensembles", "calibration", "cka", "sharpness", "pruning", "slurm", "scales")
_TRAIN = ("dataset", "data_dir", "model", "model_kwargs", "preset", "overrides")
_METHOD = ("name", "augment", "distill", "teacher", "teacher_seed", "ensemble", "generations", "kd_settings",
           "overrides")
MAX_ENSEMBLE, MAX_GENERATIONS = 64, 100
_DIVERSITY = {"batch_size": 128, "runs": 5, "split": "train", "bn": "eval", "output": "sum", "variant": "v1",
              "k": 1e-5, "seed": 0, "confidence": 0.99, "interval": "t", "reference": "scratch", "methods": None}
_LANDSCAPE = {"methods": None, "seeds": None, "x": "-1:1:51", "y": "-1:1:51", "samples": 2048, "split": "train",
              "bn": "eval", "precision": "fp32", "seed": 0, "include_bn": False, "at": "final", "log": False,
              "zmax": None}
LANDSCAPE_AT = ("final", "lr-stages")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class TrainSpec:
    """Training settings every cell shares (TrainConfig fields; checked when cells are planned)."""

    dataset: str
    model: str
    model_kwargs: dict
    preset: str | None
    data_dir: str | None
    overrides: dict


@dataclass(frozen=True)
class MethodSpec:
    """One compared method: augmentation x distillation, and where its teacher comes from."""

    name: str
    augment: str = "standard"
    distill: str = "none"
    teacher: str | None = None  # name of another method: its cell of the same (or teacher_seed) seed
    teacher_seed: int | None = None
    overrides: dict | None = None
    ensemble: int | None = None  # taught by this many of the teacher method's cells (seeds rotated): an ensemble
    kd_settings: dict | None = None  # a KD family's settings (trainers.config.TrainConfig.kd_settings)
    generation: int | None = None  # made from `generations = K`: its place in the born-again chain (1..K)


@dataclass(frozen=True)
class DiversitySpec:
    """Settings of the Jacobian-correlation probe (see `kdprobe diversity --help`)."""

    batch_size: int
    runs: int
    split: str
    bn: str
    output: str
    variant: str
    k: float
    seed: int
    confidence: float
    interval: str
    reference: str | None
    methods: tuple[str, ...]


@dataclass(frozen=True)
class LandscapeSpec:
    """Which checkpoints get a loss surface (Li et al. 2018) and on which grid."""

    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    x: str
    y: str
    samples: int
    split: str
    bn: str
    precision: str
    seed: int  # seed of the Gaussian draw shared by every surface (normalized per model)
    include_bn: bool
    at: str  # final | lr-stages (the end of every lr stage of a step schedule)
    log: bool
    zmax: float | None


@dataclass(frozen=True)
class StudySpec:
    """A resolved study: one scale applied, every value checked."""

    name: str
    title: str
    scale: str | None
    source: str
    seeds: tuple[int, ...]
    train: TrainSpec | None  # None for a pruning-only study
    methods: tuple[MethodSpec, ...]
    diversity: DiversitySpec | None
    landscape: LandscapeSpec | None
    pruning: tuple[dict, ...]
    settings: dict  # the resolved TOML tree (JSON-ready), for the report and summary.json
    probes: dict = field(default_factory=dict)  # name -> kdprobe.studies.spec_probes.ProbeSpec, switched-on only
    slurm: dict = field(default_factory=dict)  # [slurm]: how `--executor slurm` submits cells (trainers.study_slurm)

    def method(self, name: str) -> MethodSpec:
        """The method called `name`."""
        return next(m for m in self.methods if m.name == name)


def builtin_specs() -> dict[str, Path]:
    """Built-in study specs shipped in kdprobe/studies: name -> file."""
    folder = resources.files("kdprobe") / "studies" / "specs"
    return {Path(str(p)).stem: Path(str(p)) for p in sorted(folder.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".toml")}


def read_spec(spec: str) -> tuple[dict, str, str]:
    """(TOML tree, source label, text) of a built-in name or a .toml path."""
    path = Path(spec)
    builtins = builtin_specs()
    if not path.is_file():
        if spec in builtins:
            path = builtins[spec]
        else:
            raise KdprobeError(f"expected a built-in study ({', '.join(builtins)}) or a .toml file, got {spec!r}; "
                               "see `kdprobe study --list`")
    text = read_text(path, "TOML file")  # a byte-order mark is fine, other encodings are one-line errors
    tree = parse_toml(text, str(path))  # syntax, nesting, digit counts, non-finite numbers: one-line errors
    tree.setdefault("name", path.stem)
    return tree, str(path), text


def parse_set(item: str) -> tuple[list[str], object]:
    """'a.b.c=VALUE' -> (['a','b','c'], value); VALUE is read as TOML (2, 0.5, "x", [1, 2]) or else a string."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise KdprobeError(f"expected --set KEY=VALUE (e.g. train.overrides.epochs=3), got {abbreviate(item)}")
    parts = key.strip().split(".")  # each part one level of the spec's tables
    if len(parts) > MAX_NESTING:
        raise KdprobeError(f"expected --set KEY with at most {MAX_NESTING} dotted parts, got {len(parts):,}; "
                           "name a key of the spec")
    key = key.strip()
    what = f"--set {key if len(key) <= 60 else key[:57] + '...'}"
    check_text(value, what, toml=True)  # before tomllib recurses or converts a 5,000-digit integer
    try:
        v = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        v = value.strip()
    return parts, check_tree(v, what)


def _apply_set(tree: dict, parts: list[str], value) -> None:
    node, where = tree, []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where.append(part)
        if isinstance(node, list):  # methods / pruning blocks: pick by name or index
            hit = [e for e in node if isinstance(e, dict) and e.get("name") == part]
            if not hit and part.isdigit() and int(part) < len(node):
                hit = [node[int(part)]]
            if not hit or last:
                raise KdprobeError(f"--set {'.'.join(parts)}: expected a name or index of {'.'.join(where[:-1])}, "
                                   f"got {part!r}")
            node = hit[0]
        elif last:
            node[part] = value
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise KdprobeError(f"--set {'.'.join(parts)}: {'.'.join(where)} is a value, not a table")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _int_list(r: _Keys, k: str, default=None) -> tuple[int, ...] | None:
    v = r.get(k, list, default, want="a list of integers like [0, 1, 2]")
    if v is None:
        return None
    if not v or not all(SEED.ok(s) for s in v) or len(set(v)) != len(v):
        r.fail(k, f"a non-empty list of distinct seeds like [0, 1, 2] (each {SEED.describe()})", v)
    return tuple(v)


def _parse_train(src: str, t) -> TrainSpec:
    r = _Keys(src, "train", t, _TRAIN)
    return TrainSpec(r.get("dataset", str, "digits"), r.get("model", str, required=True),
                     dict(r.get("model_kwargs", dict, {})), r.get("preset", str, None), r.get("data_dir", str, None),
                     dict(r.get("overrides", dict, {})))


def _parse_methods(src: str, items, n_seeds: int = 1) -> tuple[MethodSpec, ...]:
    if not isinstance(items, list) or not all(isinstance(m, dict) for m in items):
        raise KdprobeError(f"{src}: methods: expected an array of tables ([[methods]]), got {items!r}")
    out: list[MethodSpec] = []
    for i, m in enumerate(items):
        r = _Keys(src, f"methods[{i}]", m, _METHOD)
        name = r.get("name", str, required=True, check=lambda s: bool(_NAME_RE.match(s)),
                     want="a name of letters, digits, _ . + - (it names a folder)")
        teacher, teacher_seed = r.get("teacher", str, None), r.get("teacher_seed", int, None)
        ensemble = r.get("ensemble", int, None, check=lambda k: 2 <= k <= min(n_seeds, MAX_ENSEMBLE),
                         want=f"a number of teachers from 2 to the study's {n_seeds} seeds (each teacher is the "
                              "teacher method's cell of one seed)")
        gens = r.get("generations", int, None, check=lambda k: 1 <= k <= MAX_GENERATIONS,
                     want=f"a number of generations from 1 to {MAX_GENERATIONS}")
        if (ensemble is not None or gens is not None) and teacher is None:
            r.fail("teacher", "the method whose cells teach the ensemble / generation 1", None)
        if ensemble is not None and teacher_seed is not None:
            r.fail("teacher_seed", "no teacher_seed with ensemble (the ensemble's seeds follow the student's)",
                   teacher_seed)
        kd = dict(r.get("kd_settings", dict, {}))
        base = MethodSpec(name, r.get("augment", str, "standard"), r.get("distill", str, "none"), teacher,
                          teacher_seed, dict(r.get("overrides", dict, {})), ensemble, kd)
        chain = [base] if gens is None else [
            replace(base, name=f"{name}-gen{g}", generation=g, teacher=teacher if g == 1 else f"{name}-gen{g - 1}",
                    teacher_seed=teacher_seed if g == 1 else None, ensemble=ensemble if g == 1 else None)
            for g in range(1, gens + 1)]
        for one in chain:
            if any(o.name == one.name for o in out):
                r.fail("name", "a name used by one method only (generations add NAME-gen1, NAME-gen2, ...)", one.name)
            out.append(one)
    names = [m.name for m in out]
    for i, m in enumerate(out):
        if m.teacher is not None and m.teacher not in names:
            raise KdprobeError(f"{src}: methods[{i}].teacher: expected the name of another method "
                               f"({', '.join(names)}), got {m.teacher!r}")
        seen, cur = {m.name}, m  # a teacher chain must end at a method without a teacher
        while cur.teacher is not None:
            if cur.teacher in seen:
                raise KdprobeError(f"{src}: methods[{i}].teacher: expected a teacher chain without cycles, "
                                   f"got one through {cur.teacher!r}")
            seen.add(cur.teacher)
            cur = next(o for o in out if o.name == cur.teacher)
    return tuple(out)


def _parse_diversity(src: str, t, names: tuple[str, ...]) -> DiversitySpec:
    from kdprobe.probes.diversity import BN_MODES, OUTPUTS, VARIANTS
    from kdprobe.stats import INTERVALS

    r, d = _Keys(src, "diversity", t, tuple(_DIVERSITY)), _DIVERSITY
    ref = r.get("reference", str, d["reference"])
    ref = None if ref.lower() == "none" else ref
    if ref is not None and ref not in names:
        r.fail("reference", f"one of the methods ({', '.join(names)}) or 'none'", ref)
    return DiversitySpec(
        r.ranged("batch_size", Range(int, 2, MAX_BATCH), d["batch_size"]), r.ranged("runs", P["runs"], d["runs"]),
        r.get("split", str, d["split"], choices=("train", "test")), r.get("bn", str, d["bn"], choices=BN_MODES),
        r.get("output", str, d["output"], choices=OUTPUTS), r.get("variant", str, d["variant"], choices=VARIANTS),
        r.ranged("k", P["k"], d["k"]), r.ranged("seed", SEED, d["seed"]),
        r.ranged("confidence", CONFIDENCE, d["confidence"]),
        r.get("interval", str, d["interval"], choices=INTERVALS), ref, _name_list(r, "methods", names))


def _parse_landscape(src: str, t, names: tuple[str, ...], seeds: tuple[int, ...]) -> LandscapeSpec:
    from kdprobe.probes.landscape import parse_grid
    from kdprobe.probes.landscape_eval import BN_MODES, PRECISIONS

    r, d = _Keys(src, "landscape", t, tuple(_LANDSCAPE)), _LANDSCAPE
    ls_seeds = _int_list(r, "seeds") or seeds[:1]
    if not set(ls_seeds) <= set(seeds):
        r.fail("seeds", f"seeds of the study ({list(seeds)})", list(ls_seeds))
    grids = {}
    for k in ("x", "y"):
        grids[k] = r.get(k, str, d[k], want="a range min:max:num like '-1:1:51'")
        try:
            check_extent(grids[k], "the grid")  # first: numpy warns on stderr about a linspace to 1e308
            parse_grid(grids[k])
        except KdprobeError as e:
            raise KdprobeError(f"{src}: landscape.{k}: {e}") from None
    zmax = r.ranged("zmax", P["zmax"], None)
    return LandscapeSpec(
        _name_list(r, "methods", names), ls_seeds, grids["x"], grids["y"],
        r.ranged("samples", P["samples"], d["samples"]),
        r.get("split", str, d["split"], choices=("train", "test")), r.get("bn", str, d["bn"], choices=BN_MODES),
        r.get("precision", str, d["precision"], choices=PRECISIONS), r.ranged("seed", SEED, d["seed"]),
        r.get("include_bn", bool, d["include_bn"]), r.get("at", str, d["at"], choices=LANDSCAPE_AT),
        r.get("log", bool, d["log"]), zmax)


def _override_data(tree: dict, dataset: str | None, data_dir: str | None) -> None:
    """--dataset / --data-dir: the dataset of [train] and of every [[pruning]] block."""
    over = {k: v for k, v in (("dataset", dataset), ("data_dir", data_dir)) if v is not None}
    if not over:
        return
    tables = ([tree["train"]] if isinstance(tree.get("train"), dict) else []) + \
        [b for b in tree.get("pruning", []) if isinstance(b, dict)]
    for t in tables:
        t.update(over)


def resolve_spec(tree: dict, scale: str | None = None, sets=(), source: str = "spec", *,
                 dataset: str | None = None, data_dir: str | None = None) -> StudySpec:
    """Apply `scale` (or the spec's default_scale), `--set` items and --dataset/--data-dir to a TOML tree, then
    check it. `auto:cifar10` stays as written (kdprobe.studies.data_lookup.locate_data finds it when the study runs)."""
    tree = copy.deepcopy(tree)
    top = _Keys(source, "", tree, _TOP)
    scales = top.get("scales", dict, {})
    scale = scale if scale is not None else top.get("default_scale", str, None)
    if scale is not None:
        if scale not in scales:
            have = ", ".join(scales) or "none"
            raise KdprobeError(f"{source}: scales: expected --scale one of the spec's scales ({have}), got {scale!r}")
        _Keys(source, f"scales.{scale}", scales[scale], [k for k in _TOP if k not in ("scales", "default_scale")])
        tree = _merge(tree, scales[scale])
    for item in sets:
        _apply_set(tree, *parse_set(item))
    _override_data(tree, dataset, data_dir)
    # where the cells ran ([slurm]) is no setting of the study: the same study gives the same summary either way
    settings = {k: v for k, v in tree.items() if k not in ("scales", "slurm")}
    top = _Keys(source, "", tree, _TOP)
    seeds = _int_list(top, "seeds", [0])
    methods = _parse_methods(source, top.get("methods", list, []), len(seeds))
    pruning = top.get("pruning", list, [], want="an array of tables ([[pruning]])")
    if not all(isinstance(b, dict) for b in pruning):
        top.fail("pruning", "an array of tables ([[pruning]])", pruning)
    if not methods and not pruning:
        raise KdprobeError(f"{source}: methods: expected at least one [[methods]] (or [[pruning]]) table, got none")
    names = tuple(m.name for m in methods)
    if "train" in tree:
        train = _parse_train(source, tree["train"])
    elif methods:
        raise KdprobeError(f"{source}: train: missing; add a [train] table (dataset, model, preset)")
    else:
        train = None
    div = tree.get("diversity")
    land = tree.get("landscape")
    if (div is not None or land is not None) and not methods:
        raise KdprobeError(f"{source}: methods: expected [[methods]] for the diversity/landscape probes, got none")
    from kdprobe.studies.spec_probes import parse_probes

    return StudySpec(
        str(top.get("name", str, "study")), str(top.get("title", str, "")), scale, source, seeds, train, methods,
        None if div is None else _parse_diversity(source, div, names),
        None if land is None else _parse_landscape(source, land, names, seeds),
        tuple(dict(b) for b in pruning), settings, parse_probes(source, tree, names),
        dict(top.get("slurm", dict, {}, want="a table of Slurm options ([slurm])")))


def load_spec(spec: str, scale: str | None = None, sets=(), *, dataset: str | None = None,
              data_dir: str | None = None) -> tuple[StudySpec, str]:
    """Read a built-in name or .toml path and resolve it; returns (spec, the file's text)."""
    tree, source, text = read_spec(spec)
    return resolve_spec(tree, scale, sets, source=source, dataset=dataset, data_dir=data_dir), text
