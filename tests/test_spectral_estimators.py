"""Lanczos eigenvalues, Hutch++ trace and the trace interval against a tiny model's explicit Hessian."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from kdprobe.errors import KdprobeError
from kdprobe.probes.sharpness import HessianOperator, sharpness
from kdprobe.probes.spectral import (deflated_hutchinson, hutchinson, hutchpp_sketch, lanczos_top, power_iteration,
                                     rademacher, trace_interval)
from kdprobe.stats import bootstrap_t_interval
from test_sharpness import _explicit_hessian, _setup


@pytest.fixture(scope="module")
def tiny():
    m, x, y = _setup()
    H, _, _ = _explicit_hessian(_setup()[0], x, y)
    return m, x, y, H


def _by_magnitude(H):
    ev = torch.linalg.eigvalsh(H)
    return ev[torch.argsort(ev.abs(), descending=True)]


def test_lanczos_matches_explicit_hessian_with_fewer_products_than_power(tiny):
    m, x, y, H = tiny
    want = _by_magnitude(H)
    op = HessianOperator(m, x, y, batch_size=5)
    run = lanczos_top(op.hvp, op.dim, k=3, steps=31, tol=1e-10, generator=torch.Generator().manual_seed(0),
                      dtype=torch.float64)
    assert [p.value for p in run.pairs] == pytest.approx(want[:3].tolist(), rel=1e-8)
    assert all(p.converged and p.residual < 1e-6 for p in run.pairs)
    q = run.basis
    assert torch.allclose(q @ q.T, torch.eye(len(q), dtype=q.dtype), atol=1e-10)  # orthonormal Krylov basis
    assert run.basis_trace == pytest.approx(float(torch.trace(q @ H @ q.T)), rel=1e-10)
    # equal accuracy (1e-3 relative on the top eigenvalue) for fewer products: what the method is for
    lz = HessianOperator(m, x, y, batch_size=12)
    top = lanczos_top(lz.hvp, lz.dim, k=1, steps=31, tol=1e-3, generator=torch.Generator().manual_seed(1),
                      dtype=torch.float64).pairs[0]
    pw = HessianOperator(m, x, y, batch_size=12)
    ptop = power_iteration(pw.hvp, pw.dim, k=1, iterations=500, tol=1e-6, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64)[0]
    assert abs(top.value - float(want[0])) <= 1e-3 * abs(float(want[0]))
    assert top.converged and lz.products == top.iterations < pw.products
    # the residual reported is ||H y - theta y|| of the Ritz vector: recompute it from the explicit Hessian
    a, b = run.alpha, run.beta
    t = np.diag(a) + np.diag(b, 1) + np.diag(b, -1)
    theta, s = np.linalg.eigh(t)
    i = int(np.argmax(np.abs(theta)))
    short = lanczos_top(lambda v: H @ v, 31, k=1, steps=4, tol=0, generator=torch.Generator().manual_seed(2),
                        dtype=torch.float64)
    ts = np.diag(short.alpha) + np.diag(short.beta, 1) + np.diag(short.beta, -1)
    th, sv = np.linalg.eigh(ts)
    j = int(np.argmax(np.abs(th)))
    yv = torch.from_numpy(sv[:, j]) @ short.basis
    assert short.pairs[0].residual == pytest.approx(float((H @ yv - th[j] * yv).norm()), rel=1e-6)
    assert short.pairs[0].iterations == 4 and not short.pairs[0].converged
    assert i >= 0


def test_lanczos_finds_repeated_eigenvalues_and_checks_arguments():
    A = torch.diag(torch.tensor([3.0, 3.0, 3.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    run = lanczos_top(lambda v: A @ v, 6, k=3, steps=6, tol=1e-8, generator=torch.Generator().manual_seed(1),
                      dtype=torch.float64)
    assert [p.value for p in run.pairs] == pytest.approx([3.0, 3.0, 3.0])  # one Krylov space sees 3 only once
    with pytest.raises(KdprobeError, match="expected 1 <= k"):
        lanczos_top(lambda v: A @ v, 6, k=7, generator=torch.Generator())


def test_hutchpp_samples_are_exact_unbiased_and_lower_variance(tiny):
    _, _, _, H = tiny
    tr, d = float(torch.trace(H)), H.shape[0]
    run = lanczos_top(lambda v: H @ v, d, k=1, steps=4, tol=0, generator=torch.Generator().manual_seed(0),
                      dtype=torch.float64)
    q = run.basis
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    s = deflated_hutchinson(lambda V: V @ H, d, basis=q, exact=run.basis_trace, samples=6, chunk=4, generator=g1,
                            dtype=torch.float64)
    vs = torch.cat([rademacher((c, d), g2, torch.float64) for c in (4, 2)])
    pv = vs - (vs @ q.T) @ q
    assert s == pytest.approx([float(v @ H @ v) for v in pv], rel=1e-10)  # (Pv)^T H (Pv), independently
    # exact variances (Rademacher: 2 (||B||_F^2 - sum diag(B)^2)): deflation removes most of it
    p = torch.eye(d, dtype=H.dtype) - q.T @ q
    b = p @ H @ p
    var_pp = 2 * (float((b * b).sum()) - float((torch.diagonal(b) ** 2).sum()))
    var_h = 2 * (float((H * H).sum()) - float((torch.diagonal(H) ** 2).sum()))
    assert var_pp < 0.6 * var_h  # 4 Lanczos directions of 31 halve it here
    many = deflated_hutchinson(lambda V: V @ H, d, basis=q, exact=run.basis_trace, samples=4000, chunk=1000,
                               generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    se = np.std(many, ddof=1) / math.sqrt(len(many))
    assert abs(run.basis_trace + np.mean(many) - tr) < 4 * se
    assert np.var(many, ddof=1) == pytest.approx(var_pp, rel=0.15)
    full = lanczos_top(lambda v: H @ v, d, k=1, steps=d, tol=0, generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64)  # a full basis: the trace is exact, the residual zero
    assert full.basis_trace == pytest.approx(tr, rel=1e-10)
    sq, ex = hutchpp_sketch(lambda V: V @ H, d, size=5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert torch.allclose(sq @ sq.T, torch.eye(5, dtype=H.dtype), atol=1e-10)
    assert ex == pytest.approx(float(torch.trace(sq @ H @ sq.T)), rel=1e-10)


def test_sharpness_lanczos_hutchpp_and_rtol_against_explicit_hessian(tiny):
    m, x, y, H = tiny
    want, tr = _by_magnitude(H), float(torch.trace(H))
    r = sharpness(m, x, y, top_k=2, iterations=31, tol=1e-9, trace_samples=200, trace_sketch=4, batch_size=5, seed=0)
    assert r.method == "lanczos" and r.trace_method == "hutch++" and r.trace_sketch >= 4
    assert [p.value for p in r.eigenpairs] == pytest.approx(want[:2].tolist(), rel=1e-7)
    assert r.trace_low <= tr <= r.trace_high and r.trace_low < r.trace < r.trace_high
    assert r.trace_vectors == 200 and r.eig_products == r.eigenpairs[0].iterations
    assert r.products == r.eig_products + 200
    assert np.mean(r.trace_samples) == pytest.approx(r.trace)
    fast = sharpness(m, x, y, iterations=31, trace_samples=200, trace_rtol=0.05, trace_sketch=4, batch_size=12)
    assert 10 <= fast.trace_vectors < 200 and fast.trace_se <= 0.05 * abs(fast.trace)
    assert abs(fast.trace - tr) < 4 * fast.trace_se
    old = sharpness(m, x, y, iterations=50, tol=1e-6, trace_samples=20, method="power", trace_method="hutchinson")
    assert old.method == "power" and old.trace_exact == 0.0 and old.trace_sketch == 0 and old.trace_vectors == 20
    pp = sharpness(m, x, y, iterations=50, trace_samples=20, method="power", trace_sketch=3, batch_size=12)
    assert pp.trace_sketch == 3 and pp.products == pp.eig_products + 6 + 20  # Hutch++'s 2 x sketch products
    with pytest.raises(KdprobeError, match="trace_method one of"):
        sharpness(m, x, y, trace_method="exact")
    with pytest.raises(KdprobeError, match="method one of"):
        sharpness(m, x, y, method="arnoldi")


def _coverage(H, tr, *, steps, n, seeds=200, confidence=0.95):
    d = H.shape[0]
    hits, one_se = [], []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        q, ex = None, 0.0
        if steps:
            run = lanczos_top(lambda v: H @ v, d, k=1, steps=steps, tol=0, generator=g, dtype=torch.float64)
            q, ex = run.basis, run.basis_trace
        s = deflated_hutchinson(lambda V: V @ H, d, basis=q, exact=ex, samples=n, chunk=n, generator=g,
                                dtype=torch.float64)
        ci = trace_interval([ex + v for v in s], confidence=confidence, seed=seed)
        hits.append(ci.low <= tr <= ci.high)
        mean, se = ex + np.mean(s), np.std(s, ddof=1) / math.sqrt(n)
        one_se.append(mean - se <= tr <= mean + se)  # "trace ± se", read as an interval
    return float(np.mean(hits)), float(np.mean(one_se))


def test_trace_interval_covers_the_exact_trace_about_95_percent(tiny):
    _, _, _, H = tiny
    tr = float(torch.trace(H))  # exact, from the explicit Hessian; its top eigenvalue is 56% of the trace
    for steps, n in ((3, 20), (0, 20)):  # Hutch++ (Lanczos-deflated) as sharpness runs it, and plain Hutchinson
        cover, naive = _coverage(H, tr, steps=steps, n=n)
        assert 0.91 <= cover <= 0.99, (steps, n, cover)  # binomial sd over 200 seeds: 1.5 points
        assert naive < 0.8  # the test can fail: a 1-se "interval" covers about 68%


def test_bootstrap_t_interval_flags_skew_and_small_samples():
    rng = np.random.default_rng(0)
    skewed = list(rng.lognormal(0.0, 1.5, 30))
    ci = bootstrap_t_interval(skewed)
    assert not ci.stable and "skewed" in ci.note and "30 samples" not in ci.note and "want >=" in ci.note
    assert ci.high - np.mean(skewed) > np.mean(skewed) - ci.low  # longer on the heavy side
    shifted = bootstrap_t_interval(skewed, offset=10.0)
    assert (shifted.low, shifted.high) == pytest.approx((ci.low + 10.0, ci.high + 10.0), rel=1e-12)
    normal = list(rng.normal(5, 1, 200))
    ok = bootstrap_t_interval(normal)
    assert ok.stable and ok.note == ""
    q = stats.t.ppf(0.975, 199) * np.std(normal, ddof=1) / math.sqrt(200)
    assert ok.low <= np.mean(normal) - q + 1e-12 and ok.high >= np.mean(normal) + q - 1e-12  # never narrower than t
    assert not bootstrap_t_interval([1.0, 2.0, 3.0]).stable
    assert bootstrap_t_interval([1.0, 2.0, 3.0]).note == "only 3 samples"
    assert math.isnan(bootstrap_t_interval([1.0]).low)
    assert bootstrap_t_interval(skewed, seed=3) == bootstrap_t_interval(skewed, seed=3)
    # the trace's interval is the generic one, its notes counted in random vectors
    assert trace_interval(skewed, exact=2.0, seed=3) == bootstrap_t_interval(skewed, offset=2.0, seed=3,
                                                                              unit="vectors")
    assert trace_interval([1.0, 2.0, 3.0]).note == "only 3 vectors"
    same = hutchinson(lambda V: V, 5, samples=3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert same == pytest.approx([5.0] * 3)
