"""Calibration metrics against a small example worked by hand, scipy, and temperature-scaling properties."""
import math

import numpy as np
import pytest
import torch
from scipy import optimize

from kdprobe.errors import KdprobeError
from kdprobe.probes.calibration import (
    adaptive_ece,
    calibration,
    classwise_ece,
    fit_temperature,
    metrics,
    top_label_ece,
)

# Five samples, two classes, no confidence on a bin edge (edges are multiples of 1/15):
#   p = [.90 .10] y=0 conf .90 right  -> bin 13 (0.8667, 0.9333]
#   p = [.85 .15] y=1 conf .85 wrong  -> bin 12 (0.8, 0.8667]
#   p = [.30 .70] y=1 conf .70 right  -> bin 10 (0.6667, 0.7333]
#   p = [.65 .35] y=0 conf .65 right  -> bin  9 (0.6, 0.6667]
#   p = [.92 .08] y=1 conf .92 wrong  -> bin 13
P = torch.tensor([[0.90, 0.10], [0.85, 0.15], [0.30, 0.70], [0.65, 0.35], [0.92, 0.08]], dtype=torch.float64)
Y = torch.tensor([0, 1, 1, 0, 1])
LOGP = P.log()


def test_hand_worked_example():
    m = metrics(LOGP, Y)
    assert m.acc == pytest.approx(3 / 5)
    # bin 13 holds two samples: acc 1/2, conf 0.91 -> 2/5 * 0.41; the others one each
    assert m.ece == pytest.approx((2 * 0.41 + 0.85 + 0.30 + 0.35) / 5, abs=1e-12)
    assert m.nll == pytest.approx(-(math.log(0.9) + math.log(0.15) + math.log(0.7) + math.log(0.65)
                                    + math.log(0.08)) / 5, abs=1e-12)
    # Brier, sum over classes: 0.02 + 2*0.85^2 + 2*0.3^2 + 2*0.35^2 + 2*0.92^2
    assert m.brier == pytest.approx((0.02 + 1.445 + 0.18 + 0.245 + 2 * 0.92 ** 2) / 5, abs=1e-12)
    ece, bins = top_label_ece(LOGP, Y)
    assert len(bins) == 15 and [b.count for b in bins] == [0] * 9 + [1, 1, 0, 1, 2, 0]
    assert bins[13].accuracy == pytest.approx(0.5) and bins[13].confidence == pytest.approx(0.91)
    assert math.isnan(bins[0].accuracy) and bins[13].lower == pytest.approx(13 / 15)


def test_adaptive_and_classwise_by_hand():
    # sorted confidences .65 .70 .85 | .90 .92 (3 + 2): |2 - 2.2| + |1 - 1.82| over 5
    assert adaptive_ece(LOGP, Y, bins=2) == pytest.approx((0.2 + 0.82) / 5, abs=1e-12)
    # class 0: p0 <= .5: {.3} target 0 -> .3; > .5: {.9 .85 .65 .92} targets 2 of 4, sum p 3.32 -> 1.32
    # class 1 mirrors it (two classes): both .324
    assert classwise_ece(LOGP, Y, bins=2) == pytest.approx(1.62 / 5, abs=1e-12)


def test_bin_edge_belongs_to_lower_bin():
    lp = torch.tensor([[0.5, 0.5], [0.8, 0.2]], dtype=torch.float64).log()  # 0.5 = edge of 2 bins
    _, bins = top_label_ece(lp, torch.tensor([0, 0]), bins=2)
    assert [b.count for b in bins] == [1, 1]


def _np_nll(z, y, t):
    s = z / t
    s = s - s.max(axis=1, keepdims=True)
    return float(-(s[np.arange(len(y)), y] - np.log(np.exp(s).sum(axis=1))).mean())


def test_temperature_matches_scipy_and_lowers_fit_nll():
    g = torch.Generator().manual_seed(0)
    z = 3.0 * torch.randn(400, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (400,), generator=g)
    y[:200] = z[:200].argmax(1)  # partly informative, overconfident logits
    t, at_bound = fit_temperature(z, y)
    ref = optimize.minimize_scalar(lambda tt: _np_nll(z.numpy(), y.numpy(), tt), bounds=(0.01, 100),
                                   method="bounded", options={"xatol": 1e-10})
    assert not at_bound and t == pytest.approx(ref.x, rel=1e-5)
    r = calibration(z, y, temperature=True, seed=3)
    fit = r.temperature
    assert fit.fit_n == 200 and fit.eval_n == 200 and fit.fit_nll_after < fit.fit_nll_before
    assert fit.before.acc == fit.after.acc  # a temperature never changes the argmax


def test_temperature_is_one_for_calibrated_logits():
    g = torch.Generator().manual_seed(1)
    z = 2.0 * torch.randn(20000, 4, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)  # labels drawn from the model itself
    t, _ = fit_temperature(z, y)
    assert t == pytest.approx(1.0, abs=0.04)


def test_temperature_bound_when_all_correct():
    z = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    t, at_bound = fit_temperature(z, torch.tensor([0, 1]))
    assert at_bound and t == 0.01


def test_errors_are_one_line():
    with pytest.raises(KdprobeError, match="labels in"):
        metrics(LOGP, torch.tensor([0, 1, 2, 0, 1]))
    with pytest.raises(KdprobeError, match="at least 1 bin"):
        metrics(LOGP, Y, bins=0)
    with pytest.raises(KdprobeError, match="at least 2 samples"):
        calibration(LOGP[:1], Y[:1], temperature=True)
