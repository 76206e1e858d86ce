"""A recipe = a batch transform (augmentation axis) + a loss (distillation axis).

The paper's point is that the two axes are orthogonal, so they are chosen independently:
any --augment with any --distill. When the student's batch is augmented (CutMix: mixed),
the teacher sees exactly that batch (through its own input hook, if it takes another size).

Models need nothing but `forward`: label KD compares logits; feature KD taps one named module of
each model with a forward hook (`--feature-layer`, `--teacher-feature-layer`; default
`model.feature_layer`, else kdprobe.probes.features.traced_feature_layer's rule), pools the
larger map down to the smaller one's HxW, then maps student channels to teacher channels with
a 1x1 conv regressor; so any two architectures with the same classes can be distilled.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kdprobe.data.datasets import TensorData, normalize
from kdprobe.errors import KdprobeError
from kdprobe.data.preprocess import input_size_of, random_resized_crop_flip
from kdprobe.probes.features import FeatureTap, feature_layer
from trainers.augment import MixedBatch, auto_augment, cutmix, mixed_cross_entropy, random_crop_flip
from trainers.config import TrainConfig
from trainers.losses import FeatureRegressor, default_beta, feature_kd_loss, label_kd_loss, match_spatial


class Recipe:
    """Turns a raw uint8 batch into a loss for one training step."""

    def __init__(self, config: TrainConfig, model: nn.Module, teacher: nn.Module | None, data: TensorData):
        self.config, self.teacher, self.mean, self.std = config, teacher, data.mean, data.std
        self.crop_padding, self.hflip = data.crop_padding, data.hflip
        # the student's image size (kdprobe.data.preprocess.fit_input put it on the model): None = the
        # data's own size and the CIFAR crop; S = the ImageNet recipe, RandomResizedCrop to S
        self.image_size = input_size_of(model)
        sample_shape = tuple(data.train_x.shape[1:])
        self.regressor: nn.Module | None = None
        self.beta, self.taps, self.feature = None, (), None
        if config.distill != "none" and teacher is None:
            raise KdprobeError(f"--distill {config.distill} needs --teacher")
        if teacher is not None:
            check_teacher(model, teacher, sample_shape)
        if config.distill == "feature":
            self._feature_kd(model, teacher, sample_shape)

    def _feature_kd(self, model: nn.Module, teacher: nn.Module, sample_shape: tuple) -> None:
        """Tap both models' feature layers, size the regressor and the common spatial size."""
        c = self.config
        device = next(model.parameters()).device
        probe = torch.zeros((2, *sample_shape), device=device)
        if self.image_size is not None:  # the student trains on S x S crops: probe at that size
            probe = torch.zeros((2, sample_shape[0], self.image_size, self.image_size), device=device)
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
        """Trainable parameters besides the student's (the feature-KD regressor)."""
        return list(self.regressor.parameters()) if self.regressor is not None else []

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
        return StudentStep(model, self.regressor, self.taps[0] if self.taps else None, hw)

    def loss(self, student: nn.Module, mb: MixedBatch) -> dict[str, torch.Tensor]:
        """Loss terms of one step; 'loss' is what is minimized, the rest is logged."""
        c = self.config
        logits, projected = student(mb.x)
        if c.distill == "none":
            return {"loss": mixed_cross_entropy(logits, mb.y_a, mb.y_b, mb.lam), "logits": logits}
        with torch.no_grad():
            t_logits = self.teacher(mb.x)
        if c.distill == "label":
            out = label_kd_loss(logits, t_logits, mb.y_a, mb.y_b, mb.lam, alpha=c.alpha, temperature=c.temperature)
        else:  # the regressor already ran inside the student step (so DDP syncs its gradients)
            t_feats = match_spatial(self.taps[1].take(), projected.shape[-2:])
            out = feature_kd_loss(projected, t_feats, nn.Identity(), mb.y_a, mb.y_b, mb.lam, logits, beta=self.beta)
        out["logits"] = logits
        return out

    def close(self) -> None:
        """Remove the feature taps' hooks from the models."""
        for tap in self.taps:
            tap.close()


class StudentStep(nn.Module):
    """forward(x) -> (logits, regressed feature map or None) in one call; the map comes from a hook."""

    def __init__(self, model: nn.Module, regressor: nn.Module | None, tap: FeatureTap | None = None,
                 hw: tuple[int, int] | None = None):
        super().__init__()
        self.model, self.regressor = model, regressor
        self.tap, self.hw = tap, hw

    def forward(self, x):
        logits = self.model(x)
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
