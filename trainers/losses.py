"""Distillation losses: label KD (Hinton 2015) and normalized feature KD with a 1x1 regressor.

Both accept CutMix-style mixed targets (y_a, y_b, lam); with y_b=None or lam=1 they reduce
to plain cross-entropy targets. Teacher outputs are detached here, so a caller that forgot
`torch.no_grad()` still never updates the teacher.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdprobe.errors import KdprobeError
from trainers.augment import mixed_cross_entropy


def label_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  y_a: torch.Tensor, y_b: torch.Tensor | None = None, lam: float = 1.0, *,
                  alpha: float = 0.9, temperature: float = 4.0) -> dict[str, torch.Tensor]:
    """(1-alpha)*CE_mixed + alpha*T^2*KL(softmax(t/T) || softmax(s/T)), KL averaged over the batch.

    Returns {"loss": total, "ce": CE_mixed (unweighted), "kd": T^2*KL (unweighted by alpha)}.
    RepDistiller DistillKL: KL 'batchmean' scaled by T^2 so gradients keep their size across T.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise KdprobeError(f"expected student and teacher logits of one shape (N, K), got "
                           f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}; "
                           "use a teacher with the same classes")
    if not 0.0 <= alpha <= 1.0:
        raise KdprobeError(f"expected alpha in [0, 1], got {alpha}; use 0.9 (paper)")
    if not temperature > 0:
        raise KdprobeError(f"expected temperature > 0, got {temperature}; use 4 (paper)")
    ce = mixed_cross_entropy(student_logits, y_a, y_b, lam)
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach() / t, dim=1)
    # sum_k p_t (log p_t - log p_s), summed over classes and divided by N ('batchmean')
    kd = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)
    return {"loss": (1.0 - alpha) * ce + alpha * kd, "ce": ce, "kd": kd}


def ensemble_logits(teacher_logits, temperature: float) -> torch.Tensor:
    """Logits whose softmax at `temperature` is the average of the teachers' softmax at that temperature:
    T * log(mean_i softmax(z_i / T)) (Hinton et al. 2015's ensemble soft targets). One teacher: its logits,
    unchanged (so a single-teacher run computes exactly what it did before). Float32 (or float64) out."""
    zs = list(teacher_logits) if not isinstance(teacher_logits, torch.Tensor) else [teacher_logits]
    if len(zs) == 1:
        return zs[0]
    if any(z.shape != zs[0].shape or z.dim() != 2 for z in zs):
        raise KdprobeError(f"expected every teacher's logits of one shape (N, K), got {[tuple(z.shape) for z in zs]}; "
                           "use teachers trained on the same classes")
    t = float(temperature)
    full = [z.float() if z.dtype in (torch.float16, torch.bfloat16) else z for z in zs]
    logs = torch.stack([F.log_softmax(z.detach() / t, dim=1) for z in full])
    return t * (torch.logsumexp(logs, dim=0) - math.log(len(zs)))


def check_shapes(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> None:
    """Raise KdprobeError unless both maps are (N, C, H, W) with the same N, H and W."""
    if student_feat.dim() != 4 or teacher_feat.dim() != 4:
        raise KdprobeError(f"expected feature maps (N, C, H, W), got {tuple(student_feat.shape)} "
                           f"and {tuple(teacher_feat.shape)}; pass --feature-layer / --teacher-feature-layer naming "
                           "a layer that outputs a convolutional map (or use --distill label)")
    s, t = student_feat.shape, teacher_feat.shape
    if s[0] != t[0] or s[2:] != t[2:]:
        raise KdprobeError(f"expected student and teacher maps with equal batch and HxW, got "
                           f"student {tuple(s)} and teacher {tuple(t)}; bring them to one size first "
                           "(match_spatial)")


def match_spatial(feat: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """A map brought to spatial size hw by adaptive average pooling (unchanged when it already is hw).

    Feature KD between architectures whose last maps differ in size (resnet32x4 8x8 vs ShuffleV1
    4x4) pools the larger map down to the smaller one, per dimension, before the 1x1 regressor;
    pooling and a 1x1 conv commute, so pooling the student before regressing is the same as after."""
    return feat if tuple(feat.shape[-2:]) == tuple(hw) else F.adaptive_avg_pool2d(feat, hw)


class FeatureRegressor(nn.Module):
    """R: a plain 1x1 conv (no bias, no BN) mapping student channels to teacher channels."""

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        if student_channels < 1 or teacher_channels < 1:
            raise KdprobeError(f"expected positive channel counts, got {student_channels} -> "
                               f"{teacher_channels}; tap layers that output feature maps")
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a student map (N, Cs, H, W) to (N, Ct, H, W)."""
        if x.dim() != 4 or x.shape[1] != self.student_channels:
            raise KdprobeError(f"expected a student map (N, {self.student_channels}, H, W), got "
                               f"{tuple(x.shape)}; build the regressor from the student's channels")
        return self.conv(x)


def feature_kd_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor,
                    regressor: nn.Module, y_a: torch.Tensor, y_b: torch.Tensor | None,
                    lam: float, student_logits: torch.Tensor, *, beta: float,
                    reduction: str = "mean") -> dict[str, torch.Tensor]:
    """CE_mixed + beta * L1(phi_T/||phi_T||_2 - R(phi_S)/||R(phi_S)||_2), norms per sample.

    The L2 norm of each sample is over its flattened map (C*H*W). Reduction of the L1 term
    (a choice the paper leaves open): 'mean' (default) averages |difference| over all
    N*C*H*W elements, which is what makes the paper's beta (500 for ResNets, growing with
    HxWxC) put both terms at about the same size at the first step; 'sum_per_sample' sums
    over C, H, W and averages over the batch (= 'mean' * C*H*W), for codebases that do that.
    Returns {"loss", "ce", "feat" (= beta * feat_raw), "feat_raw"}.
    """
    if reduction not in ("mean", "sum_per_sample"):
        raise KdprobeError(f"expected reduction 'mean' or 'sum_per_sample', got {reduction!r}; "
                           "use 'mean' (kdprobe default)")
    if not beta >= 0:
        raise KdprobeError(f"expected beta >= 0, got {beta}; see default_beta(arch)")
    projected = regressor(student_feat)
    check_shapes(projected, teacher_feat)
    if projected.shape != teacher_feat.shape:
        raise KdprobeError(f"expected the regressor to output the teacher's shape "
                           f"{tuple(teacher_feat.shape)}, got {tuple(projected.shape)}; "
                           "build it with the teacher's feature_channels")
    n = projected.shape[0]
    # eps guards an all-zero map (e.g. a dead ReLU output); it gives a zero vector, not NaN
    s = F.normalize(projected.reshape(n, -1), p=2, dim=1, eps=1e-12)
    t = F.normalize(teacher_feat.detach().reshape(n, -1), p=2, dim=1, eps=1e-12)
    diff = (t - s).abs()
    raw = diff.mean() if reduction == "mean" else diff.sum(dim=1).mean()
    ce = mixed_cross_entropy(student_logits, y_a, y_b, lam)
    feat = beta * raw
    return {"loss": ce + feat, "ce": ce, "feat": feat, "feat_raw": raw}


_BETAS = (("resnet", 500.0), ("preresnet", 500.0), ("wrn", 500.0), ("wide_resnet", 500.0), ("resnext", 500.0),
          ("vgg", 1500.0), ("densenet", 1000.0))  # the paper's values (ResNets 500, VGG 1500, DenseNet-40 1000)


def default_beta(arch_name: str) -> float:
    """Feature-KD weight from the paper by family: 500 ResNets (wide, pre-activation and source-named ones too),
    1500 VGG, 1000 DenseNet and PyramidNet-110, 2000 PyramidNet-200; a source prefix (repdistiller:) is ignored."""
    name = arch_name.strip().lower().rpartition(":")[2]
    m = re.match(r"pyramidnet[_-]?(\d+)", name)
    if m:
        # paper: 1000 for depth 110, 2000 for depth 200; deeper than 110 -> the 200 value
        return 1000.0 if int(m.group(1)) <= 110 else 2000.0
    for prefix, beta in _BETAS:
        if name.startswith(prefix):
            return beta
    raise KdprobeError(f"expected an arch of family resnet*, wrn*, vgg*, densenet* or pyramidnet<depth> for the "
                       f"default feature-KD weight, got {arch_name!r}; pass --beta (it should make both loss terms "
                       "about equal at the first step; both are logged)")
