"""Training configuration: one frozen dataclass, saved whole into every checkpoint, plus presets.

A preset fills in the reference recipe's schedule; explicit options override it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace

from kdprobe.errors import KdprobeError

AUGMENTS = ("standard", "cutmix", "autoaugment", "none")
DISTILLS = ("none", "label", "feature")
SCHEDULES = ("step", "cosine", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run's result (saved into the checkpoint)."""

    model: str = "resnet20"             # registry name, variant included (resnet20 = resnet20b)
    model_kwargs: dict = field(default_factory=dict)  # e.g. {"width": 0.25}
    dataset: str = "digits"             # digits | cifar10 | cifar100 | imagefolder:PATH
    data_dir: str | None = None         # folder of torchvision's CIFAR files
    train_subset: int | None = None     # train on a seeded subset of this many images (quick runs)
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
    distill: str = "none"               # none | label | feature
    teacher: str | None = None          # teacher checkpoint path
    teacher_arch: str | None = None     # architecture of a foreign teacher checkpoint
    alpha: float = 0.9                  # label KD: weight of the KL term
    temperature: float = 4.0            # label KD: softmax temperature T
    beta: float | None = None           # feature KD weight; None = per-architecture default
    bn_sparsity: float = 0.0            # Network Slimming: lambda of the L1 sub-gradient on BN scales
    init: str | None = None             # start from this checkpoint's weights (pruned ones included)
    seed: int = 0

    def __post_init__(self):
        _check(self.augment in AUGMENTS, "augment", AUGMENTS, self.augment)
        _check(self.distill in DISTILLS, "distill", DISTILLS, self.distill)
        _check(self.schedule in SCHEDULES, "schedule", SCHEDULES, self.schedule)
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise KdprobeError(f"expected epochs >= 1, batch_size >= 1, lr > 0; got {self.epochs}, {self.batch_size}, {self.lr}")
        if self.distill != "none" and not self.teacher:
            raise KdprobeError(f"--distill {self.distill} needs a teacher: pass --teacher TEACHER.pt")
        if not 0.0 <= self.alpha <= 1.0 or self.temperature <= 0:
            raise KdprobeError(f"expected 0 <= alpha <= 1 and temperature > 0, got {self.alpha}, {self.temperature}")
        if not 0.0 <= self.cutmix_prob <= 1.0 or self.cutmix_beta <= 0:
            raise KdprobeError(f"expected 0 <= cutmix_prob <= 1 and cutmix_beta > 0, got {self.cutmix_prob}, {self.cutmix_beta}")

    @property
    def method(self) -> str:
        """Method label probes group by, derived from the options: scratch, cutmix, kd-label+cutmix, ..."""
        parts = [] if self.distill == "none" else [f"kd-{self.distill}"]
        if self.augment in ("cutmix", "autoaugment"):
            parts.append(self.augment)
        return "+".join(parts) or "scratch"

    def milestone_epochs(self) -> list[int]:
        """Milestones in epochs (fractions of the run resolved)."""
        return [int(round(m * self.epochs)) if m < 1 else int(m) for m in self.milestones]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    def fingerprint(self) -> str:
        """Short hash of the config: two runs with equal fingerprints are the same experiment."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "milestones" in d:
            d["milestones"] = tuple(d["milestones"])
        return cls(**d)


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
