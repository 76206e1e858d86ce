"""`kdprobe train --config FILE.toml` / `--print-config`: one training run as a TOML file, in the form of a study cell.

    seed = 0
    [train]                             # as a study spec's [train] (kdprobe.studies.spec)
    dataset = "digits"; data_dir = "data"; model = "resnet8b"; model_kwargs = { width = 0.5 }; preset = "fast"
    overrides = { epochs = 3 }          # any TrainConfig field without a key of its own (init and its arch too)
    [method]                            # as one [[methods]] entry of a study spec
    name = "kd-label"                   # optional: a label for the reader (the checkpoint records the method
                                        # its options give)
    augment = "standard"; distill = "label"; kd_settings = {}; generations = 0
    teacher = "runs/t.pt"               # a checkpoint path, or a list of them (an ensemble of teachers);
                                        # paths as on the command line (relative to the current folder)
    overrides = { temperature = 4.0 }   # any TrainConfig field, as [train]'s (this one wins where both set it)

Precedence, lowest first: the built-in defaults, the preset, the file, the options typed (kdprobe.api.training
passes only those, None meaning 'not typed'). Every mistake in a file is a one-line KdprobeError naming the file,
the key and the fix. Nothing read from a file chooses code to run: a python: model / teacher_arch / init_arch
in a file is refused unless the same value is typed on the command line. The output path is never in the file.

to_toml writes a run fully resolved (every setting with a value, the schedule included), so the file does not
depend on the preset's or the defaults' values, and reading what it wrote gives the same TrainConfig.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

from kdprobe.errors import KdprobeError
from kdprobe.files.io import read_text
from kdprobe.models.registry import names_code
from kdprobe.ranges import SEED, parse_toml
from kdprobe.studies.keys import _Keys
from kdprobe.studies.spec import _NAME_RE, _TRAIN
from trainers.config import (AUGMENTS, DISTILLS, GENERATIONS, PRESETS, RANGES, SCHEDULES, SUBSET_RULES, TrainConfig,
                             _check_milestones, flag, make_config)

_TOP = ("seed", "train", "method")
_METHOD = ("name", "augment", "distill", "teacher", "generations", "kd_settings", "overrides")
# TrainConfig fields with a key of their own in the file: not in overrides
_OWN_KEYS = {"model": "train.model", "model_kwargs": "train.model_kwargs", "dataset": "train.dataset",
             "data_dir": "train.data_dir", "preset": "train.preset", "augment": "method.augment",
             "distill": "method.distill", "teacher": "method.teacher", "extra_teachers": "method.teacher",
             "kd_settings": "method.kd_settings", "seed": "seed"}
_OVERRIDABLE = tuple(f.name for f in fields(TrainConfig) if f.name not in _OWN_KEYS)
# the overrides to_toml writes under [method] (the augmentation's and the distillation's); the rest go under [train]
_METHOD_FIELDS = ("cutmix_prob", "cutmix_beta", "alpha", "temperature", "beta", "teacher_arch", "teacher_arch_kwargs",
                  "feature_layer", "teacher_feature_layer")
_CHOICES = {"schedule": SCHEDULES, "subset_rule": SUBSET_RULES}
# values that would name code to run (kdprobe.models.registry.names_code): honoured only when typed
_CODE_FLAGS = {"model": "--model", "teacher_arch": "--teacher-arch", "init_arch": "--init-arch"}
_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "dict": dict, "tuple": list}
MILESTONES_WANT = "a list of epochs like [150, 180] or of fractions of the run below 1 like [0.5, 0.75]"


def _kind(annotation: str) -> type:
    """The TOML type of a TrainConfig field from its annotation ('int | None' -> int; TOML has no null). Every
    field has one type besides None (a field of two would stop this import, not pass unchecked)."""
    (kind,) = (_TYPES[t.strip()] for t in annotation.split("|") if t.strip() != "None")
    return kind


_KINDS = {f.name: _kind(f.type) for f in fields(TrainConfig)}
_WANT = {str: "a non-empty string", int: "a whole number", float: "a number", bool: "true or false",
         dict: "a table like { key = 1 }", list: "a list like [1, 2]"}


class _FileKeys(_Keys):
    """A table of a run file: the study spec's reader, telling the user to fix the file."""

    doc = "the file"


@dataclass(frozen=True)
class TrainFile:
    """What a run file sets: TrainConfig fields (flattened out of its tables), teachers and generations.

    keys: field -> the file's key that set it (for messages); teachers / generations: None where not set."""

    path: str
    fields: dict
    keys: dict
    teachers: tuple[str, ...] | None = None
    generations: int | None = None


@dataclass(frozen=True)
class TrainRun:
    """One run, resolved: its TrainConfig (a born-again chain: generation 1's), the teachers as given (a chain
    without one: none, generation 0 teaches) and the chain's length (0: one run)."""

    config: TrainConfig
    teachers: tuple[str, ...] = ()
    generations: int = 0


# ---- reading ----------------------------------------------------------------------------------------------

def read_train_file(path) -> TrainFile:
    """Read and check a run file (types, ranges, choices, key by key); the whole run is checked by resolve_run."""
    src = str(path)
    tree = parse_toml(read_text(Path(path), "TOML file"), src)  # syntax, nesting, digits, nan: one-line errors
    top = _FileKeys(src, "", tree, _TOP)
    out: dict = {}
    seed = top.ranged("seed", SEED, None)
    if seed is not None:
        out["seed"] = ("seed", seed)
    train = _FileKeys(src, "train", top.get("train", dict, {}, want="a table ([train])"), _TRAIN)
    method = _FileKeys(src, "method", top.get("method", dict, {}, want="a table ([method])"), _METHOD)
    out.update(_train_keys(train))
    out.update(_method_keys(method))
    for r in (train, method):  # [method].overrides wins over [train].overrides, as in a study
        out.update(_overrides(r))
    return TrainFile(src, {k: v for k, (_, v) in out.items()}, {k: key for k, (key, _) in out.items()},
                     _teachers(method), method.ranged("generations", GENERATIONS, None))


def _path(text: str | None) -> str | None:
    """A path as the command line records it: the text of its Path (runs/ -> runs)."""
    return None if text is None else str(Path(text))


def _set(r: _Keys, pairs) -> dict:
    """field -> (the file's key, value) for the (field, value) pairs whose value the table sets."""
    return {name: (r.key(name), value) for name, value in pairs if value is not None}


def _train_keys(r: _Keys) -> dict:
    return _set(r, (("dataset", r.get("dataset", str, None, check=bool, want="a non-empty string")),
                    ("data_dir", _path(r.get("data_dir", str, None, check=bool, want="a non-empty path"))),
                    ("model", r.get("model", str, None, check=bool, want="a model name (`kdprobe models`)")),
                    ("model_kwargs", r.get("model_kwargs", dict, None, want="a table of keyword arguments")),
                    ("preset", r.get("preset", str, None, choices=tuple(PRESETS)))))


def _method_keys(r: _Keys) -> dict:
    r.get("name", str, None, check=lambda s: bool(_NAME_RE.match(s)),
          want="a name of letters, digits, _ . + - (a label for the reader)")
    return _set(r, (("augment", r.get("augment", str, None, choices=AUGMENTS)),
                    ("distill", r.get("distill", str, None, choices=DISTILLS)),
                    ("kd_settings", r.get("kd_settings", dict, None, want="a table of the KD family's settings"))))


def _teachers(r: _Keys) -> tuple[str, ...] | None:
    v = r.get("teacher", (str, list), None, check=lambda t: bool(t) and all(isinstance(p, str) and p for p in
                                                                             (t if isinstance(t, list) else [t])),
              want="a teacher checkpoint's path, or a non-empty list of paths (an ensemble of teachers)")
    if v is None:
        return None
    return tuple(_path(p) for p in (v if isinstance(v, list) else [v]))


def _overrides(r: _Keys) -> dict:
    table = r.get("overrides", dict, {}, want="a table of TrainConfig fields")
    where = r.key("overrides")
    for k in table:
        if k in _OWN_KEYS:
            raise KdprobeError(f"{r.src}: {where}.{k}: set by its own key, {_OWN_KEYS[k]}; move it there")
    over = _FileKeys(r.src, where, table, _OVERRIDABLE)
    return _set(over, ((k, _field(over, k)) for k in table))


def _field(r: _Keys, k: str):
    """One TrainConfig field of an overrides table, checked against its declared range, choices or type."""
    if k in RANGES:
        return r.ranged(k, RANGES[k], None)
    if k in _CHOICES:
        return r.get(k, str, None, choices=_CHOICES[k])
    if k == "milestones":
        return tuple(r.get(k, list, None, check=_milestones_ok, want=MILESTONES_WANT))
    if k == "image_size":
        from kdprobe.data.preprocess import MAX_SIDE

        return r.get(k, int, None, check=lambda s: 0 <= s <= MAX_SIDE,
                     want=f"a side in pixels from 1 to {MAX_SIDE}, or 0 for the data's native size")
    kind = _KINDS[k]
    v = r.get(k, kind, None, check=bool if kind is str else None, want=_WANT[kind])
    return _path(v) if k == "init" else v


def _milestones_ok(ms: list) -> bool:
    if not all(isinstance(m, (int, float)) and not isinstance(m, bool) for m in ms):
        return False
    try:
        _check_milestones(ms)
    except KdprobeError:
        return False
    return True


# ---- resolving: defaults < preset < file < typed ---------------------------------------------------------

def resolve_run(typed: dict, *, teachers=None, generations: int | None = None, width: float | None = None,
                file: TrainFile | None = None, chain_teacher: str | None = None) -> TrainRun:
    """The run that the typed options (TrainConfig fields; None = not typed) and the file describe.

    teachers / generations / width: --teacher (paths), --generations, --width as typed (None: not typed; --width
    sets model_kwargs' width). chain_teacher: the checkpoint that teaches generation 1 of a chain given no teacher
    (its generation 0). A --init checkpoint is read here for its model; nothing is written."""
    given = {k: v for k, v in typed.items() if v is not None}
    if file is not None:
        _refuse_code(file, given)
    merged = {**(file.fields if file else {}), **given}
    teachers = tuple(str(t) for t in teachers) if teachers else (file and file.teachers) or ()
    generations = generations if generations is not None else (file and file.generations) or 0
    _check_run(merged, given, file, width, generations)
    if width is not None:
        merged["model_kwargs"] = {**merged.get("model_kwargs", {}), "width": width}
    if merged.get("init"):
        merged["model"] = _init_model(merged)
    teacher = teachers[0] if teachers else chain_teacher if generations else None
    try:
        config = make_config(merged.pop("preset", None), **merged, teacher=teacher, extra_teachers=teachers[1:])
    except KdprobeError as e:
        raise KdprobeError(f"{file.path}: {e}" if file else str(e)) from None
    return TrainRun(config, teachers, generations)


def _refuse_code(file: TrainFile, given: dict) -> None:
    for name, flag_name in _CODE_FLAGS.items():
        v = file.fields.get(name)
        if names_code(v) and given.get(name) != v:
            raise KdprobeError(f"{file.path}: {file.keys[name]}: {v!r} names code to run (it imports a module and "
                               f"calls it), and no value read from a file may choose code; pass it on the command "
                               f"line instead: {flag_name} {v}")


def _where(name: str, given: dict, file: TrainFile | None) -> str:
    """Where a setting came from, for a message: its flag if typed, else the file's key."""
    return flag(name) if name in given or file is None else f"{file.keys[name]} of {file.path}"


def _check_run(merged: dict, given: dict, file: TrainFile | None, width, generations: int) -> None:
    """What no single TrainConfig can check: the model and an --init checkpoint, a born-again chain's options."""
    init = merged.get("init")
    if init:
        named = [_where(n, given, file) for n in ("model", "model_kwargs") if n in merged] + \
            (["--width"] if width is not None else [])
        if named:
            what = " and ".join(named)
            raise KdprobeError(f"--init {init} gives the model and its widths, so {what} would be recorded but not "
                               f"used; drop {what}")
    if generations and init:
        raise KdprobeError(f"--generations {generations} trains every generation from scratch, but --init {init} "
                           "gives starting weights; drop --init (or --generations)")
    if generations and merged.get("distill", "none") == "none":
        raise KdprobeError(f"--generations {generations} chains students each taught by the one before: pass "
                           "--distill label (or another KD method)")


def _init_model(merged: dict) -> str:
    """The registry name of the --init checkpoint's model (read, never run: its arch record chooses no code)."""
    from kdprobe.checkpoints.format import load_checkpoint

    return load_checkpoint(merged["init"], arch=merged.get("init_arch"), arch_kwargs=merged.get("init_arch_kwargs"),
                           finite=True, arch_flag="--init-arch").model.arch["name"]


# ---- writing ----------------------------------------------------------------------------------------------

HEADER = "# One `kdprobe train` run (docs/train.md#config-files): kdprobe train --config THIS.toml --out RUN.pt\n"


def to_toml(run: TrainRun) -> str:
    """The run file of `run`, fully resolved: every setting with a value, in the form read_train_file reads.
    None and empty tables are left out (TOML has no null; both mean 'not set')."""
    c = run.config
    train = {"dataset": c.dataset, "data_dir": c.data_dir}
    if not c.init:  # with --init the model comes from that checkpoint
        train.update(model=c.model, model_kwargs=c.model_kwargs)
    train["preset"] = c.preset
    teacher = list(run.teachers) if len(run.teachers) > 1 else run.teachers[0] if run.teachers else None
    method = {"name": c.method, "augment": c.augment, "distill": c.distill, "teacher": teacher,
              "kd_settings": c.kd_settings, "generations": run.generations}
    over = {k: getattr(c, k) for k in _OVERRIDABLE if getattr(c, k) is not None and getattr(c, k) != {}}
    tables = [_table("train", train),
              _table("train.overrides", {k: v for k, v in over.items() if k not in _METHOD_FIELDS}),
              _table("method", method),
              _table("method.overrides", {k: v for k, v in over.items() if k in _METHOD_FIELDS})]
    return HEADER + _line("seed", c.seed) + "".join("\n" + t for t in tables if t)


def _table(name: str, values: dict) -> str:
    lines = [_line(k, v) for k, v in values.items() if v is not None]
    return f"[{name}]\n" + "".join(lines) if lines else ""


def _line(key: str, value) -> str:
    return f"{_key(key)} = {_value(value)}\n"


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r", '"': '\\"', "\\": "\\\\"}


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _string(s: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    return '"' + "".join(_ESCAPES.get(ch) or (f"\\u{ord(ch):04X}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch)
                         for ch in s) + '"'


def _value(v) -> str:
    """One TOML value: bool, int, float (repr: the shortest text that reads back as the same float), str, a
    list (from a list or tuple) or an inline table."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):  # a config holds finite numbers only (TrainConfig's and the file's checks)
            raise ValueError(f"a TOML run file holds finite numbers, got {v!r}")
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(str(k))} = {_value(x)}" for k, x in v.items()) + " }" if v else "{}"
    raise TypeError(f"no TOML form for {type(v).__name__} {v!r}")
