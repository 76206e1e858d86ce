"""Linear CKA: the plain formula, a direct full-matrix unbiased HSIC, invariances, batching, hooks on any module."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from kdprobe import create_model
from kdprobe.errors import KdprobeError
from kdprobe.probes.pairs import Member
from kdprobe.probes.cka import CkaCache, batch_bounds, cka_matrix, linear_cka, pairwise_cka
from kdprobe.probes.features import default_layers, layer_features, penultimate_layer
from tolerance import network_rtol, sum_rtol


def _xy(n=60, p1=7, p2=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p1))
    y = x[:, :p2] @ rng.normal(size=(p2, p2)) + 0.8 * rng.normal(size=(n, p2))  # related, not identical
    return x, y


def _plain_cka(x, y):
    """Kornblith et al. 2019: centre, then ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)."""
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def _hsic1_full(K, L):
    """Song et al. 2012 unbiased HSIC with explicit n x n matrices and loops over the formula's terms."""
    n = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    one = np.ones(n)
    return (np.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * one @ K @ L @ one) / (n * (n - 3))


def _unbiased_cka_full(x, y):
    K, L = x @ x.T, y @ y.T
    return _hsic1_full(K, L) / math.sqrt(_hsic1_full(K, K) * _hsic1_full(L, L))


def test_plain_formula_and_full_matrix_unbiased_hsic():
    x, y = _xy()
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    assert linear_cka(tx, ty, biased=True) == pytest.approx(_plain_cka(x, y), rel=1e-12)
    assert linear_cka(tx, ty) == pytest.approx(_unbiased_cka_full(x, y), rel=1e-10)
    assert linear_cka(tx, ty, estimator="minibatch", batch_size=60) == pytest.approx(_unbiased_cka_full(x, y), rel=1e-10)
    # Nguyen et al.: sum the per-minibatch HSIC_1 terms, then normalize once
    num = sum(_hsic1_full(x[i:i + 20] @ x[i:i + 20].T, y[i:i + 20] @ y[i:i + 20].T) for i in range(0, 60, 20))
    dx = sum(_hsic1_full(x[i:i + 20] @ x[i:i + 20].T, x[i:i + 20] @ x[i:i + 20].T) for i in range(0, 60, 20))
    dy = sum(_hsic1_full(y[i:i + 20] @ y[i:i + 20].T, y[i:i + 20] @ y[i:i + 20].T) for i in range(0, 60, 20))
    assert linear_cka(tx, ty, estimator="minibatch", batch_size=20) == pytest.approx(num / math.sqrt(dx * dy), rel=1e-10)
    big_x, big_y = _xy(n=4000, seed=1)  # large n: unbiased and plain estimates agree closely
    assert linear_cka(torch.from_numpy(big_x), torch.from_numpy(big_y)) == pytest.approx(_plain_cka(big_x, big_y), abs=0.01)


def test_invariances_and_identity():
    x, y = _xy(seed=2)
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(7, 7)))
    base = linear_cka(torch.from_numpy(x), torch.from_numpy(y))
    rotated = linear_cka(torch.from_numpy(3.7 * x @ q), torch.from_numpy(y))
    assert rotated == pytest.approx(base, rel=1e-10)
    assert linear_cka(torch.from_numpy(x), torch.from_numpy(x)) == pytest.approx(1.0, rel=1e-12)
    assert linear_cka(torch.from_numpy(x), torch.from_numpy(2 * x @ q), estimator="minibatch", batch_size=16) == \
        pytest.approx(1.0, rel=1e-12)
    skew = np.diag([1.0, 10.0, 0.1, 1, 1, 1, 5.0])  # an invertible but not orthogonal map changes CKA
    assert abs(linear_cka(torch.from_numpy(x @ skew), torch.from_numpy(y)) - base) > 1e-3


class Tiny(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU())
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.body(x))


def _cka_rtol(a, b, x, layers=("body.1", "body.3", "head:in", "head")) -> float:
    """Bound on how far two evaluation orders move a linear CKA of a's and b's features on x.

    The features come out of the network with a relative error <= network_rtol (tests/tolerance.py) and the
    estimator's float64 sums over n samples add sum_rtol(n). CKA is the cosine of two centred Gram matrices; a
    relative change d of the features changes each Gram by 2d relative to the raw ||X||^2, which is
    (||X|| / ||X - mean||)^2 times more against the centred Gram, and a cosine moves by at most 2x the relative
    change of either side: 8 d (||X|| / ||X - mean||)^2 in all.
    """
    feats = [next(layer_features(m, x, list(layers), [(0, len(x))])) for m in (a, b)]
    centring = max(float(f.norm() / (f - f.mean(0)).norm()) for fs in feats for f in fs.values())
    d = max(network_rtol(a, x), network_rtol(b, x)) + sum_rtol(len(x), torch.float64)
    return 8 * d * centring ** 2


def test_layer_matrix_from_hooks_and_batching():
    a, b = Tiny(0), Tiny(1)
    a.train()
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    assert default_layers(a) == ["body.1", "body.3", "head:in", "head"] and penultimate_layer(a) == "head:in"
    r1 = cka_matrix(a, b, x, batch_size=7, estimator="exact")
    r2 = cka_matrix(a, b, x, batch_size=50, estimator="exact")
    # exact: the batch size does not matter, up to rounding. The float32 features themselves differ with it
    # (BLAS picks other kernels for 7 rows than for 50, and other ones again per CPU), so the bound follows
    # the features' dtype; in float64 the same check is 1e-11-tight and finds any batch-dependent estimator.
    tol32 = _cka_rtol(a, b, x)
    assert np.abs(np.subtract(r1.values, r2.values)).max() <= tol32 < 1e-3
    a64, b64, x64 = copy.deepcopy(a).double(), copy.deepcopy(b).double(), x.double()
    d1 = cka_matrix(a64, b64, x64, batch_size=7, estimator="exact")
    d2 = cka_matrix(a64, b64, x64, batch_size=50, estimator="exact")
    assert np.abs(np.subtract(d1.values, d2.values)).max() <= _cka_rtol(a64, b64, x64) < 1e-10
    mini = cka_matrix(a64, b64, x64, batch_size=7, estimator="minibatch")  # a batch-dependent estimator is caught
    assert np.abs(np.subtract(mini.values, d2.values)).max() > 1e3 * _cka_rtol(a64, b64, x64)
    with torch.no_grad():  # "head:in" = body output (float64: the hooks' batches of 7 vs one call on all 50)
        fa, fb = a64.body(x64), b64.body(x64)
    assert d1.values[2][2] == pytest.approx(linear_cka(fa, fb), rel=0, abs=_cka_rtol(a64, b64, x64))
    assert r1.values[1][2] == pytest.approx(r1.values[1][1], rel=1e-12)  # body.3 output is head's input
    same = cka_matrix(a, a, x, layers_a=["body.1", "head"], layers_b=["body.1", "head"], estimator="minibatch",
                      batch_size=16)
    assert same.values[0][0] == pytest.approx(1.0) and same.values[1][1] == pytest.approx(1.0)
    assert same.estimator == "minibatch" and r1.estimator == "exact"
    assert a.training and all(not m._forward_hooks and not m._forward_pre_hooks for m in a.modules())
    assert torch.is_grad_enabled()  # two interleaved feature generators must not leave grad mode off
    with pytest.raises(KdprobeError, match="names include"):
        cka_matrix(a, b, x, layers_a=["nope"])


def test_group_cache_on_registry_models_one_pass_each():
    models = {}
    for s in range(3):
        torch.manual_seed(s)
        models[f"m{s}"] = create_model("resnet8b", num_classes=10, in_channels=1, width=0.25).eval()
    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    members = [Member(k, "g") for k in models]
    calls = []
    for m in models.values():
        m.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    for est in ("exact", "minibatch"):
        cache = CkaCache(x, estimator=est, batch_size=16)
        calls.clear()
        for k, m in models.items():
            cache.add(k, m)
        assert calls == [16, 16, 8] * 3  # one pass over the samples per checkpoint, nothing more
        pairs = pairwise_cka(members, cache)
        assert cache.forward_passes == 3 and len(pairs) == 3 and cache.layers["m0"] == "fc:in"
        direct = cka_matrix(models["m0"], models["m1"], x, layers_a=["fc:in"], layers_b=["fc:in"], estimator=est,
                            batch_size=16).values[0][0]
        assert pairs[0].metrics["cka"] == pytest.approx(direct, rel=1e-9)


def test_batch_bounds_merge_small_tail():
    assert batch_bounds(10, 4) == [(0, 4), (4, 10)]
    assert batch_bounds(12, 4) == [(0, 4), (4, 8), (8, 12)]
    with pytest.raises(KdprobeError, match="at least 4"):
        batch_bounds(10, 3)
