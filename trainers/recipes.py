"""A recipe = a batch transform (augmentation axis) + a loss (distillation axis).

The paper's point is that the two axes are orthogonal, so they are chosen independently:
any --augment with any --distill. When the student's batch is augmented (CutMix: mixed),
the teacher sees exactly that batch (through its own input hook, if it takes another size).

Models need nothing but `forward`: label KD compares logits; feature KD taps one named module of
each model with a forward hook (`--feature-layer`, `--teacher-feature-layer`; default
`model.feature_layer`, else kdprobe.probes.features.traced_feature_layer's rule), pools the
larger map down to the smaller one's HxW, then maps student channels to teacher channels with
a 1x1 conv regressor; so any two architectures with the same classes can be distilled.

The KD families (trainers.kd_families: at, fitnet, sp, rkd, pkt, crd, dkd) tap the layers their role names
(`layers_for`, the same rule for student and teacher; fitnet/sp/rkd/pkt/crd take --feature-layer /
--teacher-feature-layer for their one layer), are built from the per-sample shapes of a probe forward, and run
inside the student step (their heads are trained with the student; their state, CRD's memory bank included,
is part of the step's state_dict and so of OUT.partial). With several teachers, label KD and DKD distil from
the average of the teachers' probabilities at the loss's temperature (`ensemble_logits`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kdprobe.data.datasets import TensorData, normalize
from kdprobe.errors import KdprobeError
from kdprobe.data.preprocess import input_size_of, random_resized_crop_flip
from kdprobe.probes.features import FeatureTap, feature_layer
from trainers.augment import MixedBatch, auto_augment, cutmix, mixed_cross_entropy, random_crop_flip
from trainers.config import KD_FAMILIES, TrainConfig
from trainers.losses import (FeatureRegressor, default_beta, ensemble_logits, feature_kd_loss, label_kd_loss,
                             match_spatial)

CRD_MAX_K = 16384  # RepDistiller's nce_k; capped at the fewest negatives a sample has (see Recipe._family)


class Recipe:
    """Turns a raw uint8 batch into a loss for one training step."""

    def __init__(self, config: TrainConfig, model: nn.Module, teacher, data: TensorData):
        # teacher: one module, a list of them (an ensemble: label KD and DKD), or None
        teachers = [] if teacher is None else list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
        self.teachers = teachers
        teacher = teachers[0] if teachers else None
        self.config, self.teacher, self.mean, self.std = config, teacher, data.mean, data.std
        self.crop_padding, self.hflip = data.crop_padding, data.hflip
        # the student's image size (kdprobe.data.preprocess.fit_input put it on the model): None = the
        # data's own size and the CIFAR crop; S = the ImageNet recipe, RandomResizedCrop to S
        self.image_size = input_size_of(model)
        sample_shape = tuple(data.train_x.shape[1:])
        self.regressor: nn.Module | None = None
        self.beta, self.taps, self.feature = None, (), None
        self.method: nn.Module | None = None  # a KD family's module (trainers.kd_families.KDMethod)
        self.kd: dict | None = None  # what the checkpoint records about it (meta["kd"])
        self.teacher_taps: list[FeatureTap] = []
        self.student_taps: list[FeatureTap] = []
        self.sampler = None  # CRD's ContrastSampler
        if config.distill != "none" and teacher is None:
            raise KdprobeError(f"--distill {config.distill} needs --teacher")
        for t in teachers:
            check_teacher(model, t, sample_shape)
        if config.distill == "feature":
            self._feature_kd(model, teacher, sample_shape)
        elif config.distill in KD_FAMILIES:
            self._family(model, teacher, sample_shape, data)

    def _probe(self, model: nn.Module, sample_shape: tuple) -> torch.Tensor:
        device = next(model.parameters()).device
        if self.image_size is not None:  # the student trains on S x S crops: probe at that size
            return torch.zeros((2, sample_shape[0], self.image_size, self.image_size), device=device)
        return torch.zeros((2, *sample_shape), device=device)

    def _family(self, model: nn.Module, teacher: nn.Module, sample_shape: tuple, data: TensorData) -> None:
        """Tap the layers the family's role names on both models, size and build its module from one probe
        forward, and (CRD) the contrast sampler over the training labels."""
        from trainers.kd_families import METHODS, ContrastSampler, layers_for

        c, spec = self.config, METHODS[self.config.distill]
        device = next(model.parameters()).device
        probe = self._probe(model, sample_shape)
        names = []
        for who, m, given in (("student", model, c.feature_layer), ("teacher", teacher, c.teacher_feature_layer)):
            if given:  # fitnet/sp/rkd/pkt/crd take one layer: the one named (TrainConfig refuses it for others)
                feature_layer(m, probe, given)  # one-line error for an unknown name
                names.append([given])
            else:
                names.append(layers_for(spec.layers, m, probe))
        self.student_taps = [FeatureTap(model, n) for n in names[0]]
        self.teacher_taps = [FeatureTap(teacher, n) for n in names[1]]
        was = model.training
        model.eval()  # a probe forward in train mode would move the BN running statistics
        try:
            with torch.no_grad():
                model(probe)
                s_feats = [t.take() for t in self.student_taps]
                teacher(probe)
                t_feats = [t.take() for t in self.teacher_taps]
        finally:
            model.train(was)
        if len(names[0]) != len(names[1]):
            raise KdprobeError(f"{spec.name} pairs student and teacher layers one to one, but the student has "
                               f"{len(names[0])} ({', '.join(names[0])}) and the teacher {len(names[1])} "
                               f"({', '.join(names[1])}); use models with as many stages")
        s_shapes = [list(f.shape[1:]) for f in s_feats]
        t_shapes = [list(f.shape[1:]) for f in t_feats]
        n_data = len(data.train_y)
        settings = {**spec.defaults, **c.kd_settings}
        if spec.needs_index and "k" not in c.kd_settings:
            # RepDistiller draws 16384 negatives of the other classes without replacement (CIFAR-100: 49,500 of
            # them per sample); a small training set has fewer, so K is capped at the fewest negatives any sample
            # has: still every negative once per anchor, without replacement, as at CIFAR scale
            counts = torch.bincount(data.train_y.reshape(-1).long().cpu())
            fewest = int(n_data - counts[counts > 0].max()) if n_data else 0
            settings["k"] = max(1, min(CRD_MAX_K, fewest))
        own = {k: v for k, v in settings.items() if k in c.kd_settings or k == "k" and spec.needs_index}
        self.method = spec.build(s_shapes, t_shapes, n_data, **own).to(device)
        if spec.needs_index:
            self.sampler = ContrastSampler(data.train_y, k=int(settings["k"]))
        self.kd = {"method": spec.name, "paper": spec.paper, "reference": spec.reference, "settings": settings,
                   "given": dict(c.kd_settings), "student_layers": names[0], "teacher_layers": names[1],
                   "student_shapes": s_shapes, "teacher_shapes": t_shapes,
                   **({"n_data": n_data, "k_rule": f"min({CRD_MAX_K}, fewest negatives of a sample) unless set"}
                      if spec.needs_index else {}),
                   **({"warmup_epoch": "epoch counted from 1 (the first epoch weighs 1/warmup)"}
                      if spec.needs_epoch else {}),
                   **({"notes": spec.notes} if spec.notes else {})}

    def _feature_kd(self, model: nn.Module, teacher: nn.Module, sample_shape: tuple) -> None:
        """Tap both models' feature layers, size the regressor and the common spatial size."""
        c = self.config
        device = next(model.parameters()).device
        probe = self._probe(model, sample_shape)
        names = (feature_layer(model, probe, c.feature_layer), feature_layer(teacher, probe, c.teacher_feature_layer))
        self.taps = (FeatureTap(model, names[0]), FeatureTap(teacher, names[1]))
        was = model.training
        model.eval()  # a probe forward in train mode would move the BN running statistics
        try:
            with torch.no_grad():
                model(probe)
                s_feat = self.taps[0].take()
                teacher(probe)
                t_feat = self.taps[1].take()
        finally:
            model.train(was)
        for who, name, f, flag in (("student", names[0], s_feat, "--feature-layer"),
                                   ("teacher", names[1], t_feat, "--teacher-feature-layer")):
            if f.dim() != 4:  # e.g. a ViT's tokens (N, L, D): no map for a 1x1 regressor
                raise KdprobeError(f"feature KD needs a (N, C, H, W) map, but the {who}'s layer {name} gives "
                                   f"{tuple(f.shape)}; pass {flag} NAME of a convolutional layer, or use --distill label")
        hw = (min(s_feat.shape[2], t_feat.shape[2]), min(s_feat.shape[3], t_feat.shape[3]))
        self.regressor = FeatureRegressor(s_feat.shape[1], t_feat.shape[1]).to(device)
        t_name = teacher.arch["name"] if hasattr(teacher, "arch") else ""
        if c.beta is not None:
            self.beta = c.beta
        else:  # the loss lives in the teacher's feature space: its family's beta, else the student's
            try:
                self.beta = default_beta(t_name)
            except KdprobeError:
                self.beta = default_beta(model.arch["name"])
        self.feature = {"student_layer": names[0], "teacher_layer": names[1],
                        "student_map": list(s_feat.shape[1:]), "teacher_map": list(t_feat.shape[1:]),
                        "compared_at": list(hw), "beta": self.beta,
                        "adapt": "adaptive average pooling of the larger map to the smaller HxW, then a 1x1 conv "
                                 "regressor from student to teacher channels"}

    def parameters(self) -> list[nn.Parameter]:
        """Trainable parameters besides the student's (the feature-KD regressor, a family's heads)."""
        extra = self.regressor if self.regressor is not None else self.method
        return list(extra.parameters()) if extra is not None else []

    @property
    def ensemble(self) -> dict | None:
        """What the checkpoint records about several teachers (None with one)."""
        if len(self.teachers) < 2:
            return None
        t = self.config.temperature if self.config.distill == "label" else self.method.temperature
        return {"teachers": len(self.teachers), "temperature": t,
                "rule": "the teachers' softmax at the loss's temperature averaged (Hinton et al. 2015); the "
                        "student distils from that average as from one teacher's probabilities"}

    def batch(self, x_uint8: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> MixedBatch:
        """Augment on the device: [AutoAugment] -> crop+flip (or RandomResizedCrop+flip) -> normalize -> [CutMix]."""
        aug = self.config.augment
        if aug == "autoaugment":
            x_uint8 = auto_augment(x_uint8, gen)
        if aug != "none":
            if self.image_size is not None:
                x_uint8 = random_resized_crop_flip(x_uint8, self.image_size, gen, flip=self.hflip)
            else:
                x_uint8 = random_crop_flip(x_uint8, gen, padding=self.crop_padding, flip=self.hflip)
        x = normalize(x_uint8, self.mean, self.std)  # without augmentation the model's input hook resizes
        if aug == "cutmix":
            return cutmix(x, y, gen, prob=self.config.cutmix_prob, beta=self.config.cutmix_beta)
        return MixedBatch(x=x, y_a=y, y_b=y, lam=1.0)

    def student(self, model: nn.Module) -> "StudentStep":
        """The trainable part of one step (student + regressor) as one module, so DDP can wrap it."""
        hw = tuple(self.feature["compared_at"]) if self.feature else None
        return StudentStep(model, self.regressor, self.taps[0] if self.taps else None, hw, self.method,
                           self.student_taps)

    def _teacher_logits(self, x: torch.Tensor, temperature: float) -> torch.Tensor:
        return ensemble_logits([t(x) for t in self.teachers], temperature)

    def loss(self, student: nn.Module, mb: MixedBatch, *, index: torch.Tensor | None = None,
             epoch: int | None = None, gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Loss terms of one step; 'loss' is what is minimized, the rest is logged.

        index: the batch's dataset indices (CRD's positives; its contrast indices are drawn from `gen`, the
        run's generator); epoch: counted from 1 (DKD's warm-up)."""
        c = self.config
        if self.method is not None:
            with torch.no_grad():
                t_logits = self._teacher_logits(mb.x, getattr(self.method, "temperature", c.temperature))
                t_feats = [t.take() for t in self.teacher_taps]
            contrast = None
            if self.sampler is not None:
                if index is None:
                    raise KdprobeError("CRD needs the batch's dataset indices")
                contrast = self.sampler.draw(index, gen)
            kd = {"teacher_logits": t_logits, "teacher_feats": t_feats, "y_a": mb.y_a, "y_b": mb.y_b,
                  "lam": mb.lam, "index": index, "contrast_index": contrast, "epoch": epoch}
            logits, out = student(mb.x, kd)
            return {**out, "logits": logits}
        logits, projected = student(mb.x)
        if c.distill == "none":
            return {"loss": mixed_cross_entropy(logits, mb.y_a, mb.y_b, mb.lam), "logits": logits}
        with torch.no_grad():
            t_logits = self._teacher_logits(mb.x, c.temperature)
        if c.distill == "label":
            out = label_kd_loss(logits, t_logits, mb.y_a, mb.y_b, mb.lam, alpha=c.alpha, temperature=c.temperature)
        else:  # the regressor already ran inside the student step (so DDP syncs its gradients)
            t_feats = match_spatial(self.taps[1].take(), projected.shape[-2:])
            out = feature_kd_loss(projected, t_feats, nn.Identity(), mb.y_a, mb.y_b, mb.lam, logits, beta=self.beta)
        out["logits"] = logits
        return out

    def close(self) -> None:
        """Remove the feature taps' hooks from the models."""
        for tap in (*self.taps, *self.student_taps, *self.teacher_taps):
            tap.close()


class StudentStep(nn.Module):
    """forward(x) -> (logits, regressed feature map or None) in one call; the map comes from a hook.

    With a KD family's module: forward(x, kd) -> (logits, the method's loss terms), kd holding the teacher's
    logits and tapped features, the targets, and CRD's indices / DKD's epoch (trainers.kd_families.KDBatch);
    the method's heads run here, inside what DistributedDataParallel wraps."""

    def __init__(self, model: nn.Module, regressor: nn.Module | None, tap: FeatureTap | None = None,
                 hw: tuple[int, int] | None = None, method: nn.Module | None = None, taps=()):
        super().__init__()
        self.model, self.regressor = model, regressor
        self.tap, self.hw = tap, hw
        if method is not None:  # a submodule only when there is one: label/feature runs keep their state keys
            self.method = method
        self.taps = list(taps)

    def forward(self, x, kd: dict | None = None):
        logits = self.model(x)
        method = self._modules.get("method")
        if method is not None:
            from trainers.kd_families import KDBatch

            feats = [t.take() for t in self.taps]
            return logits, method(KDBatch(student_logits=logits, student_feats=feats, **kd))
        if self.regressor is None:
            return logits, None
        return logits, self.regressor(match_spatial(self.tap.take(), self.hw))


def check_teacher(student: nn.Module, teacher: nn.Module, sample_shape: tuple[int, ...]) -> None:
    """Fail before training when teacher and student disagree on classes or input shape."""
    device = next(student.parameters()).device
    probe = torch.zeros((2, *sample_shape), device=device)
    was = student.training
    student.eval()
    try:
        with torch.no_grad():
            s_out = student(probe)
            try:
                t_out = teacher(probe)
            except RuntimeError as e:
                raise KdprobeError(f"the teacher cannot take this dataset's inputs {tuple(sample_shape)}: {str(e).splitlines()[0][:120]}; use a teacher trained on the same data") from None
    finally:
        student.train(was)
    if s_out.shape != t_out.shape:
        raise KdprobeError(f"teacher predicts {t_out.shape[1]} classes but the student {s_out.shape[1]}; use a teacher trained on the same dataset")
