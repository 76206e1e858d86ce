"""Training configuration: one frozen dataclass, saved whole into every checkpoint, plus presets.

A preset fills in the reference recipe's schedule; explicit options override it.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace

from kdprobe.errors import KdprobeError
from kdprobe.models.registry import check_model_kwargs
from kdprobe.ranges import FLOAT32_MAX, INT64_MAX, MAX_BATCH, SEED, Range

AUGMENTS = ("standard", "cutmix", "autoaugment", "none")
SUBSET_RULES = ("random", "balanced")
# the distillation families of trainers.kd_families (its METHODS registry, in that order; a test keeps them equal):
# named here so that reading a config does not import the loss code
KD_FAMILIES = ("at", "fitnet", "sp", "rkd", "pkt", "crd", "dkd")
DISTILLS = ("none", "label", "feature") + KD_FAMILIES
# methods that read only the teacher's logits: the ones several teachers (an ensemble) can teach
LOGIT_METHODS = ("label", "dkd")
# families that tap one layer of each model: --feature-layer / --teacher-feature-layer may name it
ONE_LAYER_FAMILIES = ("fitnet", "sp", "rkd", "pkt", "crd")
SCHEDULES = ("step", "cosine", "constant")
MAX_EPOCHS = 10_000  # the longest reference schedule is 300; a typo like 1e12 is refused, not planned

# The valid range of every numeric training option, declared once: TrainConfig checks it (so the
# CLI, study specs and the pruning pipeline all refuse the same values), and the CLI flags check it
# at parse time through cli.common.ranged(). Model kwargs (width) are checked by the model registry.
RANGES: dict[str, Range] = {
    "train_subset": Range(int, 1, 10**9, optional=True),  # images; more than the split = all of it
    "subset_seed": Range(int, 0, INT64_MAX, optional=True),
    "eval_subset": Range(int, 1, 10**9, optional=True),
    "epochs": Range(int, 1, MAX_EPOCHS),
    "batch_size": Range(int, 1, MAX_BATCH),
    # no useful lr is near 1, but a huge one is how a diverging run is provoked (the loop stops it with its
    # nan guard); beyond float32's range it cannot even be applied to the float32 weights
    "lr": Range(float, 0, FLOAT32_MAX, low_open=True),
    "momentum": Range(float, 0, 1, high_open=True),
    "weight_decay": Range(float, 0, 1),  # L2 factor; the references use 1e-4 to 5e-4
    "gamma": Range(float, 0, 1, low_open=True),
    "cutmix_prob": Range(float, 0, 1),
    "cutmix_beta": Range(float, 0, 1000, low_open=True),
    "alpha": Range(float, 0, 1),
    "temperature": Range(float, 0, 1000, low_open=True),  # KD softmax temperature (paper 4)
    "beta": Range(float, 0, 1e6, optional=True),  # feature KD weight (family defaults 500 to 2000)
    "bn_sparsity": Range(float, 0, 1),  # Network Slimming lambda (paper 1e-5 to 1e-4)
    "seed": SEED,
}
# `kdprobe train --generations K`: a born-again chain of K generations (0 = one run at OUT, no chain)
GENERATIONS = Range(int, 0, 100)
MILESTONES_HELP = "comma-separated epochs (150,180) or fractions of the run below 1 (0.5,0.75)"


def flag(name: str) -> str:
    """The CLI flag of a TrainConfig field: weight_decay -> --weight-decay."""
    return "--" + name.replace("_", "-")


def parse_milestones(text: str | None) -> tuple | None:
    """'150,180' -> (150, 180); '0.5,0.75' -> (0.5, 0.75); None/'' -> None (not given)."""
    if text is None or not text.strip():
        return None
    out = []
    for tok in text.split(","):
        tok = tok.strip()
        try:
            out.append(int(tok) if tok.lstrip("+").isdigit() else float(tok))
        except ValueError:
            raise KdprobeError(f"expected --milestones as {MILESTONES_HELP}, got {text!r}") from None
    _check_milestones(tuple(out))
    return tuple(out)


def _check_milestones(ms) -> None:
    for m in ms:
        whole = Range(float, 1, MAX_EPOCHS).ok(m) and float(m).is_integer()
        if not (whole or Range(float, 0, 1, low_open=True, high_open=True).ok(m)):
            raise KdprobeError(f"expected --milestones as {MILESTONES_HELP}, got {list(ms)} ({m!r} is neither a "
                               f"whole epoch from 1 to {MAX_EPOCHS:,} nor a fraction between 0 and 1)")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run's result (saved into the checkpoint)."""

    model: str = "resnet20"             # registry name, variant included (resnet20 = resnet20b)
    model_kwargs: dict = field(default_factory=dict)  # e.g. {"width": 0.25}
    dataset: str = "digits"             # digits | cifar10 | cifar100 | imagefolder:PATH
    data_dir: str | None = None         # folder of torchvision's CIFAR files
    train_subset: int | None = None     # train on a seeded subset of this many images (quick runs)
    subset_rule: str = "random"         # how train_subset picks: random | balanced (n // classes per class,
                                        # the first n % classes classes one more; kdprobe.data.datasets.TensorData.subset)
    subset_seed: int | None = None      # seed of the train_subset draw; None = the run's seed (a subset per seed)
    eval_subset: int | None = None      # test images (class-balanced, seed 0) evaluated after each epoch but the
                                        # last; the last epoch, and so test_acc, always on the whole test split
    preset: str | None = None           # name of the preset the schedule came from
    epochs: int = 15                    # passes over the training set
    batch_size: int = 64                # images per step (global batch)
    lr: float = 0.05                    # initial learning rate
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4          # L2 on all parameters, as the reference codes do
    schedule: str = "cosine"            # step | cosine | constant
    milestones: tuple = ()              # step schedule: epochs (ints) or fractions of epochs (<1)
    gamma: float = 0.1                  # step schedule: lr multiplier at each milestone
    augment: str = "standard"           # standard (crop pad 4 + flip) | cutmix | autoaugment | none
    cutmix_prob: float = 0.5            # per-batch probability of applying CutMix
    cutmix_beta: float = 1.0            # lambda ~ Beta(beta, beta)
    distill: str = "none"               # none | label | feature | at | fitnet | sp | rkd | pkt | crd | dkd
    teacher: str | None = None          # teacher checkpoint path (the first, with several teachers)
    teacher_arch: str | None = None     # architecture of a foreign teacher checkpoint
    alpha: float = 0.9                  # label KD: weight of the KL term
    temperature: float = 4.0            # label KD: softmax temperature T
    beta: float | None = None           # feature KD weight; None = per-architecture default
    bn_sparsity: float = 0.0            # Network Slimming: lambda of the L1 sub-gradient on BN scales
    init: str | None = None             # start from this checkpoint's weights (pruned ones included)
    seed: int = 0
    # added for other codebases' models (issue 11); left out of to_dict at their defaults (_LATER)
    teacher_arch_kwargs: dict = field(default_factory=dict)  # kwargs of a foreign teacher's architecture
    init_arch: str | None = None        # architecture of a foreign --init checkpoint (default: detected)
    init_arch_kwargs: dict = field(default_factory=dict)
    feature_layer: str | None = None    # feature KD: student module to tap (NAME or NAME:in); None = model's own
    teacher_feature_layer: str | None = None  # feature KD: teacher module to tap
    image_size: int | None = None       # side S (px) the student trains at; 0 = native; None = family default
    # added for the KD families (issue 22); left out of to_dict at their defaults (_LATER)
    kd_settings: dict = field(default_factory=dict)  # a KD family's settings that differ from its defaults
    extra_teachers: tuple = ()          # teachers after the first: label/DKD distil from the average probabilities

    def __post_init__(self):
        _check(self.augment in AUGMENTS, "augment", AUGMENTS, self.augment)
        _check(self.distill in DISTILLS, "distill", DISTILLS, self.distill)
        _check(self.schedule in SCHEDULES, "schedule", SCHEDULES, self.schedule)
        _check(self.subset_rule in SUBSET_RULES, "subset-rule", SUBSET_RULES, self.subset_rule)
        if self.train_subset is None and (self.subset_rule != "random" or self.subset_seed is not None):
            raise KdprobeError(f"--subset-rule {self.subset_rule} / --subset-seed {self.subset_seed} choose how "
                               "--train-subset picks its images, but no --train-subset was given; set it or drop them")
        for name, rng in RANGES.items():
            rng.check(getattr(self, name), flag(name))
        if not isinstance(self.milestones, (tuple, list)):
            raise KdprobeError(f"expected --milestones as {MILESTONES_HELP}, got {self.milestones!r}")
        _check_milestones(self.milestones)
        check_model_kwargs(self.model, self.model_kwargs)
        if self.distill != "none" and not self.teacher:
            raise KdprobeError(f"--distill {self.distill} needs a teacher: pass --teacher TEACHER.pt")
        if self.teacher and self.distill == "none":
            raise KdprobeError(f"--teacher {self.teacher} is used only for distillation, but --distill is none; "
                               f"pass --distill {'|'.join(DISTILLS[1:])}, or drop --teacher")
        if not isinstance(self.extra_teachers, (tuple, list)) or not all(isinstance(t, str) and t
                                                                        for t in self.extra_teachers):
            raise KdprobeError(f"expected the teachers after the first as a list of paths, got {self.extra_teachers!r}")
        if self.extra_teachers:
            if not self.teacher:
                raise KdprobeError("several teachers need the first one too: pass --teacher A.pt --teacher B.pt")
            if self.distill not in LOGIT_METHODS:
                raise KdprobeError(f"--distill {self.distill} with {1 + len(self.extra_teachers)} teachers: several "
                                   "teachers teach through the average of their probabilities, which only "
                                   f"{' and '.join(LOGIT_METHODS)} use; a feature method pairs one teacher's layers with "
                                   "the student's, so pass one --teacher")
            ks = self.kd_settings if isinstance(self.kd_settings, dict) else {}
            if self.distill == "dkd" and ks.get("kd_alpha", 0) and ks.get("kd_temperature", 4.0) != ks.get(
                    "temperature", 4.0):
                raise KdprobeError("dkd with several teachers and kd_alpha > 0: the teachers' average is formed at "
                                   "DKD's temperature, so set kd_temperature equal to temperature (or kd_alpha 0)")
        self._check_kd_settings()
        for flag_name, given, needs in (("--teacher-arch", self.teacher_arch, "teacher"),
                                        ("--teacher-arch-kwargs", self.teacher_arch_kwargs, "teacher"),
                                        ("--init-arch", self.init_arch, "init"),
                                        ("--init-arch-kwargs", self.init_arch_kwargs, "init")):
            if given and not getattr(self, needs):
                raise KdprobeError(f"{flag_name} describes the architecture of an --{needs} checkpoint, but no --{needs} "
                                   f"was given; pass --{needs} or drop {flag_name}")
        for flag_name, given in (("--feature-layer", self.feature_layer),
                                 ("--teacher-feature-layer", self.teacher_feature_layer)):
            if given and self.distill not in ("feature",) + ONE_LAYER_FAMILIES:
                raise KdprobeError(f"{flag_name} {given} is used only by feature KD and the KD families that tap one "
                                   f"layer ({', '.join(ONE_LAYER_FAMILIES)}), but --distill is {self.distill}; pass "
                                   f"one of those, or drop {flag_name}")
        for name in ("teacher_arch_kwargs", "init_arch_kwargs"):
            if not isinstance(getattr(self, name), dict):
                raise KdprobeError(f"expected {flag(name)} as a JSON object, got {getattr(self, name)!r}")
        if self.image_size is not None and (type(self.image_size) is not int or self.image_size < 0):
            raise KdprobeError(f"expected --image-size as a side in pixels (e.g. 224) or 'native', got {self.image_size!r}")

    def _check_kd_settings(self) -> None:
        """--kd-settings: a JSON object of the chosen family's settings (names and kinds; build checks the values)."""
        ks = self.kd_settings
        if not isinstance(ks, dict):
            raise KdprobeError(f"expected --kd-settings as a JSON object like '{{\"beta\": 6}}', got {ks!r}")
        if not ks:
            return
        if self.distill not in KD_FAMILIES:
            raise KdprobeError(f"--kd-settings sets a KD family's settings ({', '.join(KD_FAMILIES)}), but --distill "
                               f"is {self.distill}; label KD takes --alpha/--temperature, feature KD --beta")
        from trainers.kd_families import METHODS

        defaults = METHODS[self.distill].defaults
        for k, v in ks.items():
            if k not in defaults:
                raise KdprobeError(f"--kd-settings: {self.distill} has no setting {k!r}; its settings are "
                                   f"{', '.join(sorted(defaults))}")
            d = defaults[k]
            ok = (isinstance(v, bool) if isinstance(d, bool) else
                  isinstance(v, int) and not isinstance(v, bool) if isinstance(d, int) else
                  isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
            if not ok:
                kind = "true or false" if isinstance(d, bool) else "a whole number" if isinstance(d, int) else "a number"
                raise KdprobeError(f"--kd-settings: expected {self.distill}'s {k} as {kind} (default {d!r}), got {v!r}")

    @property
    def teachers(self) -> tuple[str, ...]:
        """Every teacher's path, the first (`teacher`) first; () without one."""
        return ((self.teacher,) if self.teacher else ()) + tuple(self.extra_teachers)

    @property
    def method(self) -> str:
        """Method label probes group by, derived from the options: scratch, cutmix, kd-label+cutmix, kd-dkd,
        kd-label+ens3 (an ensemble of 3 teachers), ..."""
        parts = [] if self.distill == "none" else [f"kd-{self.distill}"]
        if self.extra_teachers:
            parts.append(f"ens{1 + len(self.extra_teachers)}")
        if self.augment in ("cutmix", "autoaugment"):
            parts.append(self.augment)
        return "+".join(parts) or "scratch"

    def milestone_epochs(self) -> list[int]:
        """Milestones in epochs (fractions of the run resolved)."""
        return [int(round(m * self.epochs)) if m < 1 else int(m) for m in self.milestones]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        d["extra_teachers"] = list(self.extra_teachers)
        for k, default in _LATER.items():  # left out at their default: older configs keep their fingerprints
            if d[k] == default:
                del d[k]
        return d

    def fingerprint(self) -> str:
        """Short hash of the config: two runs with equal fingerprints are the same experiment."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        for k in ("milestones", "extra_teachers"):
            if k in d and isinstance(d[k], list):
                d[k] = tuple(d[k])
        return cls(**d)


# fields added after checkpoints and study cells were first fingerprinted, with their defaults
_LATER = {"subset_rule": "random", "subset_seed": None, "eval_subset": None,
          "teacher_arch_kwargs": {}, "init_arch": None, "init_arch_kwargs": {}, "feature_layer": None,
          "teacher_feature_layer": None, "image_size": None,
          "kd_settings": {}, "extra_teachers": []}


def _check(ok: bool, what: str, allowed, got):
    if not ok:
        raise KdprobeError(f"expected --{what} one of {', '.join(allowed)}; got {got!r}")


# Reference recipes (REFERENCE.md). Each value overrides the dataclass default.
PRESETS: dict[str, dict] = {
    # RepDistiller KD benchmark: 240 epochs, batch 64, lr 0.05 x0.1 at 150/180/210, wd 5e-4
    "repdistiller": dict(epochs=240, batch_size=64, lr=0.05, schedule="step", milestones=(150, 180, 210), weight_decay=5e-4),
    # rethinking-network-pruning: 160 epochs, batch 64, lr 0.1 x0.1 at 50% and 75%, wd 1e-4
    "rnp": dict(epochs=160, batch_size=64, lr=0.1, schedule="step", milestones=(0.5, 0.75), weight_decay=1e-4),
    # CutMix / PyramidNet code: 300 epochs, batch 64, lr 0.25 x0.1 at 150/225, nesterov, wd 1e-4
    "cutmix": dict(epochs=300, batch_size=64, lr=0.25, schedule="step", milestones=(150, 225), nesterov=True, weight_decay=1e-4),
    # fine-tuning after pruning (rethinking-network-pruning main_finetune.py): 40 epochs, constant lr 0.001, batch 64, wd 1e-4
    "finetune": dict(epochs=40, batch_size=64, lr=0.001, schedule="constant", milestones=(), weight_decay=1e-4),
    # quick runs on the embedded digits data (~10 s for a tiny ResNet on 2 cores)
    "fast": dict(epochs=15, batch_size=64, lr=0.05, schedule="cosine", milestones=(), weight_decay=5e-4),
}


def make_config(preset: str | None = None, **overrides) -> TrainConfig:
    """A config from a preset plus explicit overrides (None values mean 'not given')."""
    base: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise KdprobeError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
        base = dict(PRESETS[preset], preset=preset)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return replace(TrainConfig(), **base)
