"""Function-space agreement between two checkpoints (Fort, Hu, Lakshminarayanan 2019).

From the two predictive distributions p, q on the same N samples (float64, natural log):
- disagreement: fraction of samples whose top-1 predictions differ (argmax; ties go to the
  lowest class index, as torch.argmax does);
- normalized_disagreement: disagreement / ((err_a + err_b) / 2), Fort et al.'s normalization
  by the pair's error (two weak models disagree more by chance); nan when both errors are 0;
- sym_kl: the symmetric KL (Jeffreys divergence) KL(p||q) + KL(q||p), the sum, averaged over
  samples; unbounded;
- js: Jensen-Shannon divergence (KL(p||m) + KL(q||m)) / 2 with m = (p + q) / 2, averaged over
  samples; symmetric and in [0, log 2].
All are computed from log-probabilities (log m by logaddexp), so saturated softmaxes do not
produce 0 * log 0 = nan. The probe reads cached logits (kdprobe.probes.predictions): it never
runs a model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from kdprobe.errors import KdprobeError
from kdprobe.probes.pairs import Member, PairRecord, pairs_of

METRICS = ("disagreement", "normalized_disagreement", "sym_kl", "js")


@dataclass(frozen=True)
class Agreement:
    """How much two predictive distributions agree on N samples."""

    disagreement: float
    normalized_disagreement: float
    sym_kl: float
    js: float
    err_a: float
    err_b: float
    n: int

    def as_metrics(self) -> dict:
        """The pair metrics by plain name."""
        return {m: getattr(self, m) for m in METRICS}


def _xlogratio(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_k p_k (log p_k - log q_k) per sample; terms with p_k = 0 contribute 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=1)


def agreement(log_p: torch.Tensor, log_q: torch.Tensor, labels: torch.Tensor) -> Agreement:
    """Disagreement, normalized disagreement, symmetric KL and JS of two (N, C) log-probability tensors."""
    if log_p.shape != log_q.shape or log_p.dim() != 2 or labels.shape != log_p.shape[:1] or labels.numel() == 0:
        raise KdprobeError(f"expected two (N, C) predictions of one shape and N labels, got {tuple(log_p.shape)}, "
                           f"{tuple(log_q.shape)} and {tuple(labels.shape)}; use logits of the same samples")
    lp, lq = log_p.to(torch.float64).cpu(), log_q.to(torch.float64).cpu()
    y = labels.cpu()
    pa, pb = lp.argmax(dim=1), lq.argmax(dim=1)
    dis = float((pa != pb).to(torch.float64).mean())
    err_a, err_b = float((pa != y).to(torch.float64).mean()), float((pb != y).to(torch.float64).mean())
    mean_err = (err_a + err_b) / 2
    log_m = torch.logaddexp(lp, lq) - math.log(2.0)
    js = float(0.5 * (_xlogratio(lp, log_m) + _xlogratio(lq, log_m)).mean())
    sym = float((_xlogratio(lp, lq) + _xlogratio(lq, lp)).mean())
    return Agreement(dis, dis / mean_err if mean_err > 0 else math.nan, sym, min(max(js, 0.0), math.log(2.0)),
                     err_a, err_b, int(len(y)))


def pairwise_agreement(members: Sequence[Member], log_probs: Mapping[str, torch.Tensor],
                       labels: torch.Tensor) -> list[PairRecord]:
    """Agreement of every pair of members, from their cached log-probabilities (keyed by path)."""
    missing = [m.path for m in members if m.path not in log_probs]
    if missing:
        raise KdprobeError(f"expected predictions of every member, missing {missing[0]}; compute its logits first")
    out = []
    for a, b, kind, groups in pairs_of(members):
        r = agreement(log_probs[a.path], log_probs[b.path], labels)
        out.append(PairRecord(a.path, b.path, a.group, b.group, kind, groups, r.as_metrics()))
    return out
