"""A recipe = a batch transform (augmentation axis) + a loss (distillation axis).

The paper's point is that the two axes are orthogonal, so they are chosen independently:
any --augment with any --distill. When the student's batch is augmented (CutMix: mixed),
the teacher sees exactly that batch.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kdprobe.data import TensorData, normalize
from kdprobe.errors import KdprobeError
from trainers.augment import MixedBatch, auto_augment, cutmix, mixed_cross_entropy, random_crop_flip
from trainers.config import TrainConfig
from trainers.losses import FeatureRegressor, default_beta, feature_kd_loss, label_kd_loss


class Recipe:
    """Turns a raw uint8 batch into a loss for one training step."""

    def __init__(self, config: TrainConfig, model: nn.Module, teacher: nn.Module | None, data: TensorData):
        self.config, self.teacher, self.mean, self.std = config, teacher, data.mean, data.std
        self.crop_padding, self.hflip = data.crop_padding, data.hflip
        sample_shape = tuple(data.train_x.shape[1:])
        self.regressor: nn.Module | None = None
        self.beta = None
        if config.distill != "none" and teacher is None:
            raise KdprobeError(f"--distill {config.distill} needs --teacher")
        if teacher is not None:
            check_teacher(model, teacher, sample_shape)
        if config.distill == "feature":
            self.beta = config.beta if config.beta is not None else default_beta(model.arch["name"])
            device = next(model.parameters()).device
            was = model.training
            model.eval()  # a probe forward in train mode would move the BN running statistics
            with torch.no_grad():
                probe = torch.zeros((2, *sample_shape), device=device)
                s_feat, t_feat = model.forward_features(probe), teacher.forward_features(probe)
            model.train(was)
            self.regressor = FeatureRegressor(s_feat.shape[1], t_feat.shape[1],
                                              student_shape=tuple(s_feat.shape[1:]),
                                              teacher_shape=tuple(t_feat.shape[1:])).to(device)

    def parameters(self) -> list[nn.Parameter]:
        """Trainable parameters besides the student's (the feature-KD regressor)."""
        return list(self.regressor.parameters()) if self.regressor is not None else []

    def batch(self, x_uint8: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> MixedBatch:
        """Augment on the device: [AutoAugment] -> crop+flip -> normalize -> [CutMix]."""
        aug = self.config.augment
        if aug == "autoaugment":
            x_uint8 = auto_augment(x_uint8, gen)
        if aug != "none":
            x_uint8 = random_crop_flip(x_uint8, gen, padding=self.crop_padding, flip=self.hflip)
        x = normalize(x_uint8, self.mean, self.std)
        if aug == "cutmix":
            return cutmix(x, y, gen, prob=self.config.cutmix_prob, beta=self.config.cutmix_beta)
        return MixedBatch(x=x, y_a=y, y_b=y, lam=1.0)

    def student(self, model: nn.Module) -> "StudentStep":
        """The trainable part of one step (student + regressor) as one module, so DDP can wrap it."""
        return StudentStep(model, self.regressor)

    def loss(self, student: nn.Module, mb: MixedBatch) -> dict[str, torch.Tensor]:
        """Loss terms of one step; 'loss' is what is minimized, the rest is logged."""
        c = self.config
        feats, logits, projected = student(mb.x)
        if c.distill == "none":
            return {"loss": mixed_cross_entropy(logits, mb.y_a, mb.y_b, mb.lam), "logits": logits}
        with torch.no_grad():
            t_feats = self.teacher.forward_features(mb.x)
            t_logits = self.teacher.forward_head(t_feats) if c.distill == "label" else None
        if c.distill == "label":
            out = label_kd_loss(logits, t_logits, mb.y_a, mb.y_b, mb.lam, alpha=c.alpha, temperature=c.temperature)
        else:  # the regressor already ran inside the student step (so DDP syncs its gradients)
            out = feature_kd_loss(projected, t_feats, nn.Identity(), mb.y_a, mb.y_b, mb.lam, logits, beta=self.beta)
        out["logits"] = logits
        return out


class StudentStep(nn.Module):
    """forward(x) -> (feature map, logits, regressed feature map or None) in one call."""

    def __init__(self, model: nn.Module, regressor: nn.Module | None):
        super().__init__()
        self.model, self.regressor = model, regressor

    def forward(self, x):
        feats = self.model.forward_features(x)
        projected = self.regressor(feats) if self.regressor is not None else None
        return feats, self.model.forward_head(feats), projected


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
