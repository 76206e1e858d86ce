"""Distillation families beside label and feature KD: AT, FitNet, SP, RKD, PKT, CRD and DKD.

Each method's distillation term is a plain function of tensors (the formula, testable on its own)
and a small nn.Module that adds the student's cross-entropy and holds what the method trains or
keeps (FitNet's regressor, CRD's embedding heads and memory bank). The defaults are the reference
codebases' CIFAR-100 settings:

  RepDistiller  https://github.com/HobbitLong/RepDistiller   (commit b84f547c5db6a35318d4671d7d5c4de74c822403,
                distiller_zoo/*.py, crd/*.py, scripts/run_cifar_distill.sh, train_student.py, helper/loops.py)
  mdistiller    https://github.com/megvii-research/mdistiller (commit a08d46f10d6102bd6e3f258ca5ac880b020ea259,
                mdistiller/distillers/*.py, mdistiller/engine/cfg.py, configs/cifar100/*)

Both train every method as total = ce_weight * CE + weight * term (RepDistiller: -r 1 -a 0 -b weight; the
Hinton KL term off, which `kd_alpha` can switch on, e.g. RepDistiller's "CRD+KD" = crd with kd_alpha=1).

  method  term (paper)                                      weight  ce   taps (RepDistiller is_feat list index)
  at      sum over stages of mean (a_s - a_t)^2, a = L2-     1000    1    every stage output feat[1:-1]
          normalised mean_c f^p, p=2 (Zagoruyko & Komodakis,
          ICLR 2017)
  fitnet  MSE(R(f_s), f_t), R = conv + BN + ReLU regressor   100     1    hint_layer=2: the 2nd stage output
          (Romero et al., ICLR 2015)
  sp      ||rownorm(G_t) - rownorm(G_s)||_F^2 / b^2,         3000    1    last conv map feat[-2]
          G = F F^T (Tung & Mori, ICCV 2019)
  rkd     25 * distance + 50 * angle, smooth-L1 (Park et    1       1    pooled penultimate feat[-1]
          al., CVPR 2019)
  pkt     KL of cosine-similarity densities (Passalis &      30000   1    pooled penultimate feat[-1]
          Tefas, ECCV 2018)
  crd     NCE with a momentum memory bank: 128-d embeds,     0.8     1    pooled penultimate feat[-1]
          K=16384 negatives, T=0.07, momentum 0.5 (Tian
          et al., ICLR 2020)
  dkd     alpha*TCKD + beta*NCKD, alpha=1, beta=8, T=4,      1       1    logits
          warm-up min(epoch/20, 1) (Zhao et al., CVPR 2022)

Stated choices where kdprobe composes what the references do not:
- CutMix: every term is computed on the mixed batch both models saw; DKD, whose split depends on the
  label, is lam * DKD(y_a) + (1 - lam) * DKD(y_b) (like the mixed cross-entropy); CRD's positive is the
  sample whose index the batch slot carries (CutMix's base image).
- Feature layers are taken by forward hooks from any architecture (`layers_for`); a map whose spatial size
  differs between student and teacher is average-pooled down to the smaller one (AT), or regressed (FitNet).
- FitNet trains in one stage, as both reference codebases do (their train_student.py / FitNet distiller add
  the hint loss to the CE from the first step; no init stage). The paper's two-stage variant (hint-only
  training of the student up to the hint layer plus the regressor, then the whole student) is what a
  `PretrainStage` with `epochs` > 0 describes for the training loop (RepDistiller's --init_epochs default
  for its two-stage methods is 30); `parameters_up_to` names the parameters that stage trains.
- The distance terms are computed from the pairwise differences, not from |a|^2 + |b|^2 - 2ab as the
  references do: the same formula (same eps clamp on the squared distance) without the cancellation.
- Every term runs in float32 (or the inputs' float64) with autocast off; the teacher's inputs are detached.

tests/test_kd_families.py checks every term against a naive loop re-computation of the formula and against
the numbers RepDistiller's and mdistiller's own code gave on the same float64 tensors (value and gradient).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdprobe.errors import KdprobeError
from kdprobe.probes.features import feature_layer, hooked_forward, penultimate_layer
from trainers.augment import mixed_cross_entropy
from trainers.losses import match_spatial

REPDISTILLER_COMMIT = "b84f547c5db6a35318d4671d7d5c4de74c822403"
MDISTILLER_COMMIT = "a08d46f10d6102bd6e3f258ca5ac880b020ea259"


def _full(t: torch.Tensor) -> torch.Tensor:
    """float32 for half/bfloat16 inputs (autocast outputs); float32 and float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _maps(fs: Sequence[torch.Tensor], ft: Sequence[torch.Tensor], method: str) -> None:
    if len(fs) != len(ft) or not fs:
        raise KdprobeError(f"{method} pairs student and teacher layers one to one, got {len(fs)} student and "
                           f"{len(ft)} teacher maps; name as many teacher layers as student layers")
    for s, t in zip(fs, ft):
        if s.dim() != 4 or t.dim() != 4 or s.shape[0] != t.shape[0]:
            raise KdprobeError(f"{method} needs (N, C, H, W) maps of one batch, got {tuple(s.shape)} and "
                               f"{tuple(t.shape)}; tap convolutional layers")


def _vectors(f: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> (N, D): a pooled penultimate feature (N, D) or (N, D, 1, 1) flattened per sample."""
    if f.dim() < 2:
        raise KdprobeError(f"expected per-sample features (N, ...), got shape {tuple(f.shape)}")
    return f.reshape(f.shape[0], -1)


# ----------------------------------------------------------------------------------------------- AT
def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention of a map (N, C, H, W): mean over channels of f^p, flattened, L2-normalised per sample."""
    a = f.pow(p).mean(dim=1).reshape(f.shape[0], -1)
    return F.normalize(a, p=2.0, dim=1, eps=1e-12)


def at_loss(g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor], p: float = 2.0) -> torch.Tensor:
    """Attention transfer: sum over the paired maps of mean_{n, hw} (a_s - a_t)^2.

    A pair whose spatial sizes differ is compared at the smaller one (the larger map average-pooled to it,
    as RepDistiller's Attention.at_loss does for square maps); channels need not match."""
    _maps(g_s, g_t, "AT")
    total = None
    for s, t in zip(g_s, g_t):
        s, t = _full(s), _full(t.detach())
        hw = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
        d = attention_map(match_spatial(s, hw), p) - attention_map(match_spatial(t, hw), p)
        term = d.pow(2).mean()
        total = term if total is None else total + term
    return total


# ------------------------------------------------------------------------------------------- FitNet
class HintRegressor(nn.Module):
    """FitNet's regressor from the student's hint map to the teacher's: a conv chosen by the heights
    (student twice the teacher's: 3x3 stride 2; half: 4x4 stride-2 transposed conv; otherwise a conv of
    kernel (1 + Hs - Ht, 1 + Ws - Wt)), then BatchNorm and ReLU (RepDistiller/mdistiller ConvReg)."""

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], use_relu: bool = True):
        super().__init__()
        s, t = tuple(student_shape)[-3:], tuple(teacher_shape)[-3:]
        if len(s) != 3 or len(t) != 3:
            raise KdprobeError(f"FitNet needs (C, H, W) hint maps, got {tuple(student_shape)} and "
                               f"{tuple(teacher_shape)}; tap convolutional layers")
        (cs, hs, ws), (ct, ht, wt) = s, t
        if hs == 2 * ht:
            self.conv = nn.Conv2d(cs, ct, kernel_size=3, stride=2, padding=1)
        elif 2 * hs == ht:
            self.conv = nn.ConvTranspose2d(cs, ct, kernel_size=4, stride=2, padding=1)
        elif hs >= ht and ws >= wt:
            self.conv = nn.Conv2d(cs, ct, kernel_size=(1 + hs - ht, 1 + ws - wt))
        else:
            raise KdprobeError(f"FitNet's regressor cannot grow a {hs}x{ws} student map to the teacher's {ht}x{wt} "
                               "(only x2 up); tap a student layer of at least the teacher's size")
        self.bn = nn.BatchNorm2d(ct)
        self.use_relu = use_relu
        self.student_shape, self.teacher_shape = s, t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return F.relu(y) if self.use_relu else y


def hint_loss(regressed: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """FitNet's hint: mean over all elements of (R(f_s) - f_t)^2."""
    if regressed.shape != f_t.shape:
        raise KdprobeError(f"FitNet compares the regressed student map with the teacher's, got "
                           f"{tuple(regressed.shape)} and {tuple(f_t.shape)}; build the regressor from these shapes")
    return (_full(regressed) - _full(f_t.detach())).pow(2).mean()


# ----------------------------------------------------------------------------------------------- SP
def sp_loss(g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> torch.Tensor:
    """Similarity preserving: sum over the paired layers of ||rownorm(F_t F_t^T) - rownorm(F_s F_s^T)||_F^2 / b^2,
    F the (b, everything) flattened features; rows L2-normalised."""
    if len(g_s) != len(g_t) or not g_s:
        raise KdprobeError(f"SP pairs student and teacher layers one to one, got {len(g_s)} and {len(g_t)}")
    total = None
    for s, t in zip(g_s, g_t):
        s, t = _vectors(_full(s)), _vectors(_full(t.detach()))
        if s.shape[0] != t.shape[0]:
            raise KdprobeError(f"SP needs one batch, got {s.shape[0]} and {t.shape[0]} samples")
        b = s.shape[0]
        gs = F.normalize(s @ s.t(), p=2.0, dim=1, eps=1e-12)
        gt = F.normalize(t @ t.t(), p=2.0, dim=1, eps=1e-12)
        term = (gt - gs).pow(2).sum() / (b * b)
        total = term if total is None else total + term
    return total


# ---------------------------------------------------------------------------------------------- RKD
def _rkd_geometry(e: torch.Tensor, squared: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(distances normalised by their mean over the positive entries (B, B), angles (B, B, B)) of (B, D) points.

    diff[i, j] = e_j - e_i; d_ij = sqrt(max(|diff_ij|^2, eps)) off the diagonal, 0 on it;
    angle[i, j, k] = <unit(e_j - e_i), unit(e_k - e_i)> (a zero difference gives a zero unit vector)."""
    b = e.shape[0]
    diff = e.unsqueeze(0) - e.unsqueeze(1)
    sq = diff.pow(2).sum(dim=2).clamp_min(eps)
    eye = torch.eye(b, dtype=torch.bool, device=e.device)
    if squared:
        d = sq.masked_fill(eye, 0.0)
    else:  # sqrt of 1 on the diagonal, then 0: no infinite derivative there whatever eps is
        d = sq.masked_fill(eye, 1.0).sqrt().masked_fill(eye, 0.0)
    positive = (d > 0).sum()
    d = d / (d.sum() / positive)
    unit = F.normalize(diff, p=2.0, dim=2, eps=1e-12)
    angle = torch.bmm(unit, unit.transpose(1, 2))
    return d, angle


def rkd_loss(f_s: torch.Tensor, f_t: torch.Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0,
             eps: float = 1e-12, squared: bool = False) -> dict[str, torch.Tensor]:
    """Relational KD on flattened features: {'loss': w_d * distance + w_a * angle, 'distance', 'angle'},
    each part a smooth-L1 (beta 1) mean over all B^2 distance / B^3 angle entries."""
    s, t = _vectors(_full(f_s)), _vectors(_full(f_t.detach()))
    if s.shape[0] != t.shape[0] or s.shape[0] < 2:
        raise KdprobeError(f"RKD needs one batch of at least 2 samples, got {s.shape[0]} and {t.shape[0]}")
    with torch.no_grad():
        d_t, a_t = _rkd_geometry(t, squared, eps)
    d_s, a_s = _rkd_geometry(s, squared, eps)
    dist = F.smooth_l1_loss(d_s, d_t, reduction="mean", beta=1.0)
    ang = F.smooth_l1_loss(a_s, a_t, reduction="mean", beta=1.0)
    return {"loss": distance_weight * dist + angle_weight * ang, "distance": dist, "angle": ang}


# ---------------------------------------------------------------------------------------------- PKT
def _cosine_density(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows of (cos + 1) / 2 between samples, each row scaled to sum 1 (x / (|x| + eps); NaN entries -> 0)."""
    u = x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
    u = torch.where(torch.isnan(u), torch.zeros_like(u), u)
    k = (u @ u.t() + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer: mean over the B^2 pairs of p_t * log((p_t + eps) / (p_s + eps)),
    p the row-normalised cosine-similarity densities of the flattened features."""
    s, t = _vectors(_full(f_s)), _vectors(_full(f_t.detach()))
    if s.shape[0] != t.shape[0]:
        raise KdprobeError(f"PKT needs one batch, got {s.shape[0]} and {t.shape[0]} samples")
    p_s, p_t = _cosine_density(s, eps), _cosine_density(t, eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


# ---------------------------------------------------------------------------------------------- DKD
def dkd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor, alpha: float = 1.0,
             beta: float = 8.0, temperature: float = 4.0) -> dict[str, torch.Tensor]:
    """Decoupled KD: {'loss': alpha * TCKD + beta * NCKD, 'tckd', 'nckd'}, both T^2-scaled and batch-averaged.

    TCKD = KL([p_t, 1 - p_t]^teacher || [p_t, 1 - p_t]^student), p_t the target class's probability at T;
    NCKD = KL of the distributions over the non-target classes alone (softmax of their logits / T)."""
    s, t = _full(logits_s), _full(logits_t.detach())
    if s.shape != t.shape or s.dim() != 2 or s.shape[1] < 2:
        raise KdprobeError(f"DKD needs student and teacher logits of one shape (N, K>=2), got {tuple(s.shape)} "
                           f"and {tuple(t.shape)}")
    n, k = s.shape
    gt = F.one_hot(target.reshape(-1), k).bool()
    zs, zt = s / temperature, t / temperature

    def binary_log(z):
        lse = torch.logsumexp(z, dim=1)
        z_gt = z.masked_select(gt)
        z_other = torch.logsumexp(z.masked_fill(gt, float("-inf")), dim=1)
        return torch.stack([z_gt - lse, z_other - lse], dim=1)

    lb_s, lb_t = binary_log(zs), binary_log(zt)
    tckd = (lb_t.exp() * (lb_t - lb_s)).sum() / n * temperature ** 2
    ln_s = F.log_softmax(zs.masked_select(~gt).reshape(n, k - 1), dim=1)
    ln_t = F.log_softmax(zt.masked_select(~gt).reshape(n, k - 1), dim=1)
    nckd = (ln_t.exp() * (ln_t - ln_s)).sum() / n * temperature ** 2
    return {"loss": alpha * tckd + beta * nckd, "tckd": tckd, "nckd": nckd}


def dkd_warmup(epoch: float, warmup: float = 20.0) -> float:
    """DKD's weight ramp min(epoch / warmup, 1), epoch counted from 1 as mdistiller's trainer does
    (the first epoch weighs 1/20); warmup 0 disables it."""
    if warmup <= 0:
        return 1.0
    if epoch < 0:
        raise KdprobeError(f"expected an epoch counted from 1, got {epoch}")
    return min(float(epoch) / float(warmup), 1.0)


# ---------------------------------------------------------------------------------------------- CRD
class CRDEmbed(nn.Module):
    """CRD's head: a linear map to the embedding size, then each row divided by its L2 norm."""

    def __init__(self, dim_in: int, dim_out: int = 128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(_vectors(x))
        return y / y.pow(2).sum(dim=1, keepdim=True).sqrt()


class CRDMemory(nn.Module):
    """CRD's memory bank: one (n_data, dim) bank per model, filled U(-s, s), s = 1 / sqrt(dim / 3).

    Scores of the student's embedding v_s against the teacher bank rows contrast_index[b] (the positive
    first, then K negatives): exp(<m_t, v_s> / T) / Z_s, and the teacher's v_t against the student bank
    likewise with Z_t. Z is fixed at the first call to mean(exp(.)) * n_data (the references' rule) and kept
    in a buffer, so a checkpoint resumes with it. After scoring, the rows of the batch's own indices move:
    m <- normalise(momentum * m + (1 - momentum) * v) (no gradient)."""

    def __init__(self, dim: int, n_data: int, k: int = 16384, temperature: float = 0.07, momentum: float = 0.5,
                 generator: torch.Generator | None = None):
        super().__init__()
        if n_data < 2 or k < 1 or dim < 1:
            raise KdprobeError(f"CRD needs a training set of at least 2 samples and K >= 1 negatives, got "
                               f"n_data={n_data}, K={k}")
        self.n_data, self.k, self.temperature, self.momentum = n_data, k, temperature, momentum
        bound = 1.0 / math.sqrt(dim / 3.0)
        for name in ("memory_s", "memory_t"):
            self.register_buffer(name, torch.rand(n_data, dim, generator=generator) * (2 * bound) - bound)
        self.register_buffer("z_s", torch.tensor(-1.0, dtype=torch.float64))
        self.register_buffer("z_t", torch.tensor(-1.0, dtype=torch.float64))
        self._z_known = False  # whether z_s/z_t were checked since construction or the last load_state_dict

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._z_known = False

    def scores(self, v_s: torch.Tensor, v_t: torch.Tensor, contrast_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(out_s, out_t), each (B, K+1): the normalised exp-scores of each anchor against the other model's bank."""
        b = v_s.shape[0]
        if contrast_index.shape != (b, self.k + 1):
            raise KdprobeError(f"CRD expected contrast indices (B, K+1) = ({b}, {self.k + 1}), got "
                               f"{tuple(contrast_index.shape)}")
        rows_t = self.memory_t[contrast_index].to(v_s.dtype)  # (B, K+1, dim), no gradient into the bank
        rows_s = self.memory_s[contrast_index].to(v_t.dtype)
        e_s = torch.exp(torch.einsum("bkd,bd->bk", rows_t, v_s) / self.temperature)
        e_t = torch.exp(torch.einsum("bkd,bd->bk", rows_s, v_t) / self.temperature)
        if not self._z_known:  # one host sync on the first step (and after loading), none after
            with torch.no_grad():
                if self.z_s.item() < 0:  # the product in the scores' dtype, as the references round it
                    self.z_s.fill_((e_s.mean() * self.n_data).item())
                if self.z_t.item() < 0:
                    self.z_t.fill_((e_t.mean() * self.n_data).item())
            self._z_known = True
        return e_s / self.z_s.to(e_s.dtype), e_t / self.z_t.to(e_t.dtype)

    @torch.no_grad()
    def update(self, v_s: torch.Tensor, v_t: torch.Tensor, index: torch.Tensor) -> None:
        """Momentum update of the batch's rows of both banks, each row renormalised to unit length."""
        m = self.momentum
        for bank, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
            row = bank[index] * m + v.detach().to(bank.dtype) * (1.0 - m)
            bank[index] = row / row.pow(2).sum(dim=1, keepdim=True).sqrt()


def nce_loss(scores: torch.Tensor, n_data: int, eps: float = 1e-7) -> torch.Tensor:
    """CRD's NCE loss (paper eq. 18) on (B, K+1) scores, the positive first, noise P_n = 1/n_data:
    -(sum_b log(P_b / (P_b + K P_n + eps)) + sum_{b,k} log(K P_n / (P_bk + K P_n + eps))) / B."""
    b, m = scores.shape[0], scores.shape[1] - 1
    k_pn = m / float(n_data)
    pos, neg = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(pos / (pos + k_pn + eps))
    log_d0 = torch.log(k_pn / (neg + k_pn + eps))
    return -(log_d1.sum() + log_d0.sum()) / b


class CRDLoss(nn.Module):
    """Contrastive representation distillation: embed both pooled features (trainable heads), score them
    against the memory bank, update the bank, and return nce(student anchor) + nce(teacher anchor)."""

    def __init__(self, student_dim: int, teacher_dim: int, n_data: int, feat_dim: int = 128, k: int = 16384,
                 temperature: float = 0.07, momentum: float = 0.5, generator: torch.Generator | None = None):
        super().__init__()
        self.embed_s = CRDEmbed(student_dim, feat_dim)
        self.embed_t = CRDEmbed(teacher_dim, feat_dim)
        self.memory = CRDMemory(feat_dim, n_data, k, temperature, momentum, generator)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, index: torch.Tensor,
                contrast_index: torch.Tensor) -> dict[str, torch.Tensor]:
        v_s = self.embed_s(_full(f_s))
        v_t = self.embed_t(_full(f_t.detach()))
        out_s, out_t = self.memory.scores(v_s, v_t, contrast_index)
        self.memory.update(v_s, v_t, index)
        loss_s, loss_t = nce_loss(out_s, self.memory.n_data), nce_loss(out_t, self.memory.n_data)
        return {"loss": loss_s + loss_t, "nce_s": loss_s, "nce_t": loss_t}


class ContrastSampler:
    """CRD's contrast indices for a batch (RepDistiller's CIFAR100InstanceSample): column 0 the positive
    (mode 'exact': the sample itself; 'relax': a random sample of its class), then K negatives drawn
    uniformly from the samples of the other classes, without replacement unless K exceeds their count."""

    def __init__(self, labels: torch.Tensor, k: int = 16384, mode: str = "exact"):
        if mode not in ("exact", "relax"):
            raise KdprobeError(f"expected CRD mode 'exact' or 'relax', got {mode!r}")
        self.labels, self.k, self.mode = labels.reshape(-1).long(), k, mode
        self._on: dict[torch.device, torch.Tensor] = {}

    def draw(self, index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, K+1) indices into the training set for the batch whose dataset indices are `index`."""
        labels = self._on.get(index.device)
        if labels is None:  # copied to the batch's device once
            labels = self._on[index.device] = self.labels.to(index.device)
        y = labels[index]
        same = labels.unsqueeze(0) == y.unsqueeze(1)  # (B, n)
        out = torch.empty(index.shape[0], self.k + 1, dtype=torch.long, device=index.device)
        if self.mode == "exact":
            out[:, 0] = index
        else:
            out[:, 0] = torch.multinomial(same.float(), 1, generator=generator).squeeze(1)
        other = ~same
        short = other.sum(dim=1) < self.k
        for rows, replace in ((~short, False), (short, True)):
            if rows.any():
                w = other[rows].float()
                if (w.sum(dim=1) == 0).any():
                    raise KdprobeError("CRD needs samples of at least two classes for negatives")
                out[rows, 1:] = torch.multinomial(w, self.k, replacement=replace, generator=generator)
        return out


# -------------------------------------------------------------------------------- methods (CE + term)
@dataclass
class KDBatch:
    """What one step hands a method: both models' logits, the (possibly CutMix-mixed) targets, the hooked
    features in the order of the method's `layers` role, and for CRD the batch's dataset indices and
    contrast indices, for DKD the epoch (counted from 1)."""
    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    y_a: torch.Tensor
    y_b: torch.Tensor | None = None
    lam: float | torch.Tensor = 1.0
    student_feats: Sequence[torch.Tensor] = ()
    teacher_feats: Sequence[torch.Tensor] = ()
    index: torch.Tensor | None = None
    contrast_index: torch.Tensor | None = None
    epoch: float | None = None


class KDMethod(nn.Module):
    """total = ce_weight * CE_mixed + weight * term [+ kd_alpha * T^2 KL(teacher || student) at kd_temperature].

    forward returns {'loss', 'ce', 'kd' (weight * term, with any warm-up), 'kd_raw' (term), method parts}."""

    name = ""

    def __init__(self, *, weight: float, ce_weight: float = 1.0, kd_alpha: float = 0.0, kd_temperature: float = 4.0):
        super().__init__()
        if not weight >= 0 or not ce_weight >= 0 or not kd_alpha >= 0 or not kd_temperature > 0:
            raise KdprobeError(f"{self.name}: expected weights >= 0 and a temperature > 0, got weight={weight}, "
                               f"ce_weight={ce_weight}, kd_alpha={kd_alpha}, kd_temperature={kd_temperature}")
        self.weight, self.ce_weight = float(weight), float(ce_weight)
        self.kd_alpha, self.kd_temperature = float(kd_alpha), float(kd_temperature)

    def term(self, b: KDBatch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def factor(self, b: KDBatch) -> float:
        """Multiplier of the weighted term at this step (1; DKD's warm-up)."""
        return 1.0

    def forward(self, b: KDBatch) -> dict[str, torch.Tensor]:
        dev = b.student_logits.device.type
        with torch.autocast(dev, enabled=False):
            logits = _full(b.student_logits)
            ce = mixed_cross_entropy(logits, b.y_a, b.y_b, b.lam)
            parts = self.term(b)
            raw = parts.pop("loss")
            kd = raw * (self.weight * self.factor(b))
            loss = self.ce_weight * ce + kd
            out = {"ce": ce, "kd": kd, "kd_raw": raw, **parts}
            if self.kd_alpha > 0:
                t = self.kd_temperature
                kl = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(_full(b.teacher_logits.detach()) / t, dim=1),
                              reduction="batchmean", log_target=True) * (t * t)
                loss = loss + self.kd_alpha * kl
                out["kl"] = kl
        out["loss"] = loss
        return out


class ATMethod(KDMethod):
    name = "at"

    def __init__(self, *, p: float = 2.0, weight: float = 1000.0, **kw):
        super().__init__(weight=weight, **kw)
        self.p = p

    def term(self, b):
        return {"loss": at_loss(b.student_feats, b.teacher_feats, self.p)}


class FitNetMethod(KDMethod):
    name = "fitnet"

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], *, weight: float = 100.0,
                 use_relu: bool = True, **kw):
        super().__init__(weight=weight, **kw)
        self.regressor = HintRegressor(student_shape, teacher_shape, use_relu)

    def term(self, b):
        (fs,), (ft,) = _one(b, "FitNet")
        return {"loss": hint_loss(self.regressor(_full(fs)), ft)}


class SPMethod(KDMethod):
    name = "sp"

    def __init__(self, *, weight: float = 3000.0, **kw):
        super().__init__(weight=weight, **kw)

    def term(self, b):
        return {"loss": sp_loss(b.student_feats, b.teacher_feats)}


class RKDMethod(KDMethod):
    name = "rkd"

    def __init__(self, *, weight: float = 1.0, distance_weight: float = 25.0, angle_weight: float = 50.0,
                 eps: float = 1e-12, squared: bool = False, **kw):
        super().__init__(weight=weight, **kw)
        self.distance_weight, self.angle_weight, self.eps, self.squared = distance_weight, angle_weight, eps, squared

    def term(self, b):
        (fs,), (ft,) = _one(b, "RKD")
        return rkd_loss(fs, ft, self.distance_weight, self.angle_weight, self.eps, self.squared)


class PKTMethod(KDMethod):
    name = "pkt"

    def __init__(self, *, weight: float = 30000.0, eps: float = 1e-7, **kw):
        super().__init__(weight=weight, **kw)
        self.eps = eps

    def term(self, b):
        (fs,), (ft,) = _one(b, "PKT")
        return {"loss": pkt_loss(fs, ft, self.eps)}


class CRDMethod(KDMethod):
    name = "crd"

    def __init__(self, student_dim: int, teacher_dim: int, n_data: int, *, weight: float = 0.8, feat_dim: int = 128,
                 k: int = 16384, temperature: float = 0.07, momentum: float = 0.5,
                 generator: torch.Generator | None = None, **kw):
        super().__init__(weight=weight, **kw)
        self.crd = CRDLoss(student_dim, teacher_dim, n_data, feat_dim, k, temperature, momentum, generator)

    def term(self, b):
        (fs,), (ft,) = _one(b, "CRD")
        if b.index is None or b.contrast_index is None:
            raise KdprobeError("CRD needs the batch's dataset indices and contrast indices (ContrastSampler.draw)")
        return self.crd(fs, ft, b.index, b.contrast_index)


class DKDMethod(KDMethod):
    name = "dkd"

    def __init__(self, *, weight: float = 1.0, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 warmup: float = 20.0, **kw):
        super().__init__(weight=weight, **kw)
        self.alpha, self.beta, self.temperature, self.warmup = alpha, beta, temperature, warmup

    def factor(self, b):
        if self.warmup > 0 and b.epoch is None:
            raise KdprobeError("DKD's warm-up needs the epoch (counted from 1); pass it, or warmup=0")
        return dkd_warmup(b.epoch if b.epoch is not None else 1.0, self.warmup)

    def term(self, b):
        a = dkd_loss(b.student_logits, b.teacher_logits, b.y_a, self.alpha, self.beta, self.temperature)
        lam = b.lam
        if b.y_b is None or (not isinstance(lam, torch.Tensor) and lam == 1.0):
            return a
        o = dkd_loss(b.student_logits, b.teacher_logits, b.y_b, self.alpha, self.beta, self.temperature)
        return {key: lam * a[key] + (1.0 - lam) * o[key] for key in a}


def _one(b: KDBatch, method: str):
    if len(b.student_feats) != 1 or len(b.teacher_feats) != 1:
        raise KdprobeError(f"{method} takes one student and one teacher layer, got {len(b.student_feats)} and "
                           f"{len(b.teacher_feats)}")
    return b.student_feats, b.teacher_feats


# ------------------------------------------------------------------------------------ layers by hooks
_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)


@torch.no_grad()
def stage_layers(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The rule for AT's (and FitNet's) stages on a model that names none (`model.stage_layers`).

    In forward order before the final nn.Linear, the modules that output (N, C, H, W) maps of at least 2x2
    (pooling modules skipped; a squeeze-excitation's 1x1 maps too) fall into runs, one per spatial size in order of its first appearance. Of each run: the last
    module that no enclosing module started during the run and left for a later run (so `block1`, not
    `block2.layer.0.relu1`, the pre-activation the next stage computes before its strided conv), else the
    run's last module. The first run's pick is dropped when it is a leaf module (a stem conv/BN/ReLU) and two
    runs follow, as RepDistiller drops its feat[0]. A CIFAR ResNet gives [layer1, layer2, layer3], a WRN
    [block1, block2, relu]: RepDistiller's feat[1:-1]. A functional ReLU (F.relu in forward) is invisible to
    hooks: the map before it is taken. Models whose 4-D tensors are not NCHW (ConvNeXt's channels-last
    blocks) need their stages named."""
    own = getattr(model, "stage_layers", None)
    if isinstance(own, (list, tuple)) and own and all(isinstance(n, str) for n in own):
        return list(own)
    names = {m: n for n, m in model.named_modules() if n}
    runs: list[list[str]] = []  # per spatial size, in order of first appearance: its map modules in finish order
    run_of: dict[tuple, int] = {}
    start_run: dict[str, int] = {}  # the newest run when a module first started (-1: before any map)
    finish_run: dict[str, int] = {}  # ... when it last finished
    linear = [False]

    def pre(m, args):
        start_run.setdefault(names[m], len(runs) - 1)

    def post(m, out):
        if linear[0]:
            return
        if isinstance(m, nn.Linear):
            linear[0] = True
            return
        if isinstance(out, torch.Tensor) and out.dim() == 4 and not isinstance(m, _POOLS) and min(out.shape[2:]) > 1:
            size = tuple(out.shape[2:])
            if size not in run_of:
                run_of[size] = len(runs)
                runs.append([])
            runs[run_of[size]].append(names[m])  # a branch back at an earlier size (shuffle units) joins that run
        finish_run[names[m]] = len(runs) - 1

    handles = [h for m in names for h in (m.register_forward_pre_hook(pre),
                                         m.register_forward_hook(lambda m, a, o: post(m, o)))]
    hooked_forward(model, x, handles)
    if not runs:
        raise KdprobeError("found no module that outputs a (N, C, H, W) map before the classifier; name the layers")
    # a classifier that is not last (a torchvision model's final Linear inside a Sequential): modules still
    # running when it ran finish after every run
    last = len(runs)

    def clean(name: str, r: int) -> bool:
        parts = name.split(".")
        for i in range(1, len(parts)):
            a = ".".join(parts[:i])
            if start_run.get(a, -1) == r and finish_run.get(a, last) > r:
                return False
        return True

    mods = dict(model.named_modules())
    picks = []
    for r, members in enumerate(runs):
        inside = [n for n in members if clean(n, r)]
        picks.append(inside[-1] if inside else members[-1])
    if len(picks) >= 3 and not list(mods[picks[0]].children()):
        picks = picks[1:]
    return picks


LAYER_ROLES = ("stages", "hint", "last_map", "penultimate")


def layers_for(role: str | None, model: nn.Module, x: torch.Tensor) -> list[str]:
    """Layer names (for kdprobe.probes.features.FeatureTap) a method's role takes from a model:
    'stages' every stage output (AT), 'hint' the 2nd stage output (FitNet, RepDistiller hint_layer=2 counted
    with the stem as 0), 'last_map' the last map before pooling (SP; feature KD's layer), 'penultimate' the
    final nn.Linear's input (RKD, PKT, CRD); None (DKD) takes none."""
    if role is None:
        return []
    if role == "stages":
        return stage_layers(model, x)
    if role == "hint":
        stages = stage_layers(model, x)
        if len(stages) < 2:
            raise KdprobeError(f"FitNet's hint is the 2nd stage output, but the model has stages {stages}; name it")
        return [stages[1]]
    if role == "last_map":
        return [feature_layer(model, x)]
    if role == "penultimate":
        return [penultimate_layer(model)]
    raise KdprobeError(f"expected a layer role in {LAYER_ROLES}, got {role!r}")


@torch.no_grad()
def parameters_up_to(model: nn.Module, layer: str, x: torch.Tensor) -> list[str]:
    """Names of the parameters of the modules that finish no later than `layer` in a forward pass on x (the
    part of the student FitNet's hint stage trains); 'NAME:in' stops where NAME starts."""
    name, _, where = layer.partition(":")
    mods = dict(model.named_modules())
    if name not in mods:
        raise KdprobeError(f"expected a module name of the model, got {name!r}")
    order: list[str] = []
    inv = {m: n for n, m in mods.items()}
    handles = [m.register_forward_hook(lambda m, a, o: order.append(inv[m])) for m in mods.values()]
    if where == "in":
        handles.append(mods[name].register_forward_pre_hook(lambda m, a: order.append("\0stop")))
    hooked_forward(model, x, handles)
    stop = order.index("\0stop") if where == "in" else order.index(name) + 1
    before = set(order[:stop])
    return [f"{m}.{p}" if m else p for m in mods if m in before for p, _ in mods[m].named_parameters(recurse=False)]


# ------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class PretrainStage:
    """A stage before the main training: `epochs` epochs (0 = none, the references' FitNet) minimising
    `loss` alone over `trains` (the student's parameters up to the hint layer and the regressor), same
    optimiser settings as the main stage (RepDistiller helper/pretrain.py init())."""
    epochs: int = 0
    loss: str = "hint"
    trains: str = "student up to the hint layer (parameters_up_to) + the regressor"


@dataclass(frozen=True)
class MethodSpec:
    """A method: `build(student_shapes, teacher_shapes, n_data, **overrides)` makes its KDMethod;
    `layers` the role (layers_for) whose hooked features it takes (None: logits only);
    `shapes` whether build needs those features' per-sample shapes (trainable heads);
    `trainable` whether the method module has parameters for the optimiser (method.parameters());
    `needs_index` the batch's dataset indices + ContrastSampler contrast indices and n_data;
    `needs_epoch` the epoch from 1 (DKD's warm-up); `pretrain` an optional stage (FitNet)."""
    name: str
    factory: Callable[..., KDMethod]
    defaults: Mapping[str, float]
    layers: str | None
    paper: str
    reference: str
    shapes: bool = False
    trainable: bool = False
    needs_index: bool = False
    needs_epoch: bool = False
    pretrain: PretrainStage | None = None
    notes: str = ""

    def build(self, student_shapes: Sequence[Sequence[int]] = (), teacher_shapes: Sequence[Sequence[int]] = (),
              n_data: int | None = None, **overrides) -> KDMethod:
        unknown = sorted(set(overrides) - set(self.defaults) - ({"generator"} if self.name == "crd" else set()))
        if unknown:
            raise KdprobeError(f"{self.name} has no setting {unknown[0]!r}; its settings are {sorted(self.defaults)}")
        kw = {**self.defaults, **overrides}
        if self.shapes and (not student_shapes or not teacher_shapes):
            raise KdprobeError(f"{self.name} sizes its trainable heads from the hooked features: pass the student's "
                               "and the teacher's per-sample feature shapes")
        if self.name == "fitnet":
            return self.factory(student_shapes[0], teacher_shapes[0], **kw)
        if self.name == "crd":
            if n_data is None:
                raise KdprobeError("CRD needs n_data, the number of training samples (its memory bank's rows)")
            return self.factory(_flat(student_shapes[0]), _flat(teacher_shapes[0]), n_data, **kw)
        return self.factory(**kw)


def _flat(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


_RD, _MD = f"RepDistiller@{REPDISTILLER_COMMIT[:7]}", f"mdistiller@{MDISTILLER_COMMIT[:7]}"
_COMMON = {"ce_weight": 1.0, "kd_alpha": 0.0, "kd_temperature": 4.0}

METHODS: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec("at", ATMethod, {**_COMMON, "weight": 1000.0, "p": 2.0}, "stages",
               "Zagoruyko & Komodakis, Paying More Attention to Attention, ICLR 2017",
               f"{_RD} distiller_zoo/AT.py (-b 1000); {_MD} distillers/AT.py (AT.P 2, FEAT_WEIGHT 1000)"),
    MethodSpec("fitnet", FitNetMethod, {**_COMMON, "weight": 100.0, "use_relu": True}, "hint",
               "Romero et al., FitNets: Hints for Thin Deep Nets, ICLR 2015",
               f"{_RD} distiller_zoo/FitNet.py + models/util.py ConvReg (-b 100, hint_layer 2); "
               f"{_MD} distillers/FitNet.py (HINT_LAYER 2, FEAT_WEIGHT 100)",
               shapes=True, trainable=True, pretrain=PretrainStage(epochs=0),
               notes="one stage as both references; PretrainStage(epochs=30) for the paper's hint stage"),
    MethodSpec("sp", SPMethod, {**_COMMON, "weight": 3000.0}, "last_map",
               "Tung & Mori, Similarity-Preserving Knowledge Distillation, ICCV 2019",
               f"{_RD} distiller_zoo/SP.py (-b 3000, feat[-2]); {_MD} distillers/SP.py (FEAT_WEIGHT 3000)"),
    MethodSpec("rkd", RKDMethod, {**_COMMON, "weight": 1.0, "distance_weight": 25.0, "angle_weight": 50.0,
                                  "eps": 1e-12, "squared": False}, "penultimate",
               "Park, Kim, Lu & Cho, Relational Knowledge Distillation, CVPR 2019",
               f"{_RD} distiller_zoo/RKD.py (w_d 25, w_a 50, -b 1); {_MD} distillers/RKD.py"),
    MethodSpec("pkt", PKTMethod, {**_COMMON, "weight": 30000.0, "eps": 1e-7}, "penultimate",
               "Passalis & Tefas, Learning Deep Representations with Probabilistic Knowledge Transfer, ECCV 2018",
               f"{_RD} distiller_zoo/PKT.py (-b 30000); {_MD} distillers/PKT.py (FEAT_WEIGHT 30000)"),
    MethodSpec("crd", CRDMethod, {**_COMMON, "weight": 0.8, "feat_dim": 128, "k": 16384, "temperature": 0.07,
                                  "momentum": 0.5}, "penultimate",
               "Tian, Krishnan & Isola, Contrastive Representation Distillation, ICLR 2020",
               f"{_RD} crd/criterion.py + crd/memory.py (-b 0.8, feat_dim 128, nce_k 16384, nce_t 0.07, nce_m 0.5, "
               f"mode exact); {_MD} distillers/CRD.py",
               shapes=True, trainable=True, needs_index=True,
               notes="memory bank and Z constants are buffers of the method module (checkpoint them)"),
    MethodSpec("dkd", DKDMethod, {**_COMMON, "weight": 1.0, "alpha": 1.0, "beta": 8.0, "temperature": 4.0,
                                  "warmup": 20.0}, None,
               "Zhao, Cui, Song, Qiu & Liang, Decoupled Knowledge Distillation, CVPR 2022",
               f"{_MD} distillers/DKD.py + engine/cfg.py (ALPHA 1, BETA 8, T 4, WARMUP 20; configs/cifar100/dkd "
               "use BETA 2 for res56/res110 teachers, 6 for VGG13/WRN-40-2; ImageNet BETA 0.5, T 1, WARMUP 1)",
               needs_epoch=True),
)}


def build(name: str, student_shapes: Sequence[Sequence[int]] = (), teacher_shapes: Sequence[Sequence[int]] = (),
          n_data: int | None = None, **overrides) -> KDMethod:
    """The KDMethod named `name` with the reference defaults, `overrides` replacing some of them."""
    if name not in METHODS:
        raise KdprobeError(f"expected a KD method in {sorted(METHODS)}, got {name!r}")
    return METHODS[name].build(student_shapes, teacher_shapes, n_data, **overrides)
