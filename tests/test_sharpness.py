"""Hessian probes against the explicit Hessian of a tiny model, finite differences, batching, and state."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from kdprobe.errors import KdprobeError
from kdprobe.probes.sharpness import HessianOperator, sharpness
from kdprobe.probes.spectral import hutchinson, lanczos, power_iteration, quadrature, slq_density


class TinyConvBN(nn.Module):
    """conv(1->2, 3x3) + BN + ReLU + mean pool + linear(2->3): 31 parameters, small enough for an explicit Hessian."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2), nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def _setup(seed=0, n=12):
    torch.manual_seed(seed)
    m = TinyConvBN().double()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 1.5)
        m.bn.weight.uniform_(0.5, 1.5)
    m.train()  # the probe must not care, nor change it
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return m, x, y


def _explicit_hessian(model, x, y):
    model = model.eval()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    buffers = dict(model.named_buffers())

    def loss(flat):
        params = {n: t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        return F.cross_entropy(functional_call(model, {**buffers, **params}, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat0), loss, flat0


def test_hvp_equals_explicit_hessian_and_finite_differences():
    m, x, y = _setup()
    H, loss, flat0 = _explicit_hessian(_setup()[0], x, y)
    op = HessianOperator(m, x, y, batch_size=5)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(op.hvp(v), H @ v, rtol=1e-10, atol=1e-12)
    for mode, keep in (("jvp", False), ("reuse", True)):  # forward-over-reverse, and graphs kept across calls
        other = HessianOperator(m, x, y, batch_size=5, mode=mode, keep_graphs=keep)
        assert torch.allclose(other.hvp(v), H @ v, rtol=1e-10, atol=1e-12)
        assert torch.allclose(other.hvp(2 * v), 2 * H @ v, rtol=1e-10, atol=1e-12)
    m.eval()
    op_train = HessianOperator(m, x, y, batch_size=12, bn="train")  # batch statistics: another function
    assert not torch.allclose(op_train.hvp(v), H @ v, rtol=1e-3)
    m.train()
    eps = 1e-5  # central difference of gradients, float64
    g = lambda f: torch.autograd.grad(loss(f.requires_grad_(True)), f)[0]  # noqa: E731
    fd = (g(flat0 + eps * v) - g(flat0 - eps * v)) / (2 * eps)
    assert torch.allclose(op.hvp(v), fd, rtol=1e-6, atol=1e-8)
    many = op.hvp_many(torch.stack([v, 2 * v, -v]))
    assert torch.allclose(many, torch.stack([H @ v, 2 * H @ v, -(H @ v)]), rtol=1e-10, atol=1e-12)
    assert op.loss() == pytest.approx(float(loss(flat0)), rel=1e-12)


def test_top_eigenvalues_and_trace_match_the_explicit_hessian():
    m, x, y = _setup()
    H, _, _ = _explicit_hessian(_setup()[0], x, y)
    ev = torch.linalg.eigvalsh(H)
    by_mag = ev[torch.argsort(ev.abs(), descending=True)]
    r = sharpness(m, x, y, top_k=2, iterations=2000, tol=1e-12, trace_samples=400, batch_size=4,
                  vectors_per_pass=8, seed=0, method="power", trace_method="hutchinson")
    assert r.top_eigenvalue == pytest.approx(float(by_mag[0]), rel=1e-6)
    assert r.eigenpairs[1].value == pytest.approx(float(by_mag[1]), rel=1e-4)
    assert r.eigenpairs[0].residual < 1e-4 * abs(r.top_eigenvalue) and r.eigenpairs[0].converged
    assert abs(r.trace - float(torch.trace(H))) < 4 * r.trace_se and len(r.trace_samples) == 400
    assert r.trace_se == pytest.approx(np.std(r.trace_samples, ddof=1) / math.sqrt(400))
    assert r.n_params == 31 and r.n_samples == 12


def test_hutchinson_samples_are_exact_quadratic_forms():
    H = torch.randn(9, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    H = H + H.T
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    s = hutchinson(lambda V: V @ H, 9, samples=7, chunk=3, generator=g1, dtype=torch.float64)
    from kdprobe.probes.spectral import rademacher

    vs = torch.cat([rademacher((c, 9), g2, torch.float64) for c in (3, 3, 1)])
    assert s == pytest.approx([float(v @ H @ v) for v in vs], rel=1e-12)
    assert set(vs.unique().tolist()) == {-1.0, 1.0}


def test_power_iteration_deflation_on_a_known_matrix():
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    lam = torch.tensor([5.0, -4.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    A = q @ torch.diag(lam) @ q.T
    pairs = power_iteration(lambda v: A @ v, 6, k=3, iterations=3000, tol=1e-14,
                            generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert [p.value for p in pairs] == pytest.approx([5.0, -4.0, 2.0], rel=1e-8)
    fixed = power_iteration(lambda v: A @ v, 6, k=1, iterations=7, tol=0.0, generator=torch.Generator().manual_seed(1),
                            dtype=torch.float64)
    assert fixed[0].iterations == 7 and not fixed[0].converged


def test_lanczos_quadrature_reproduces_moments_and_spectrum():
    H = torch.randn(8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    H = (H + H.T) / 2
    v0 = torch.randn(8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    nodes, w = quadrature(*lanczos(lambda v: H @ v, v0, 8))
    u = v0 / v0.norm()
    for j in range(6):  # Gauss quadrature with m nodes is exact for degree < 2m
        moment = float(u @ torch.linalg.matrix_power(H, j) @ u)
        assert float((w * nodes ** j).sum()) == pytest.approx(moment, rel=1e-8, abs=1e-10)
    assert nodes == pytest.approx(torch.linalg.eigvalsh(H).numpy(), rel=1e-8)
    d = slq_density(lambda v: H @ v, 8, steps=8, runs=2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert all(sum(ws) == pytest.approx(1.0) for ws in d.weights)
    assert float(np.sum(d.density) * (d.grid[1] - d.grid[0])) == pytest.approx(1.0)


def test_batching_invariance_seed_and_model_untouched():
    m, x, y = _setup()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.fc.bias.requires_grad_(False)  # a frozen parameter is not a variable of the Hessian
    r1 = sharpness(m, x, y, iterations=5, tol=0, trace_samples=5, batch_size=12, seed=3, trace_sketch=3)
    r2 = sharpness(m, x, y, iterations=5, tol=0, trace_samples=5, batch_size=5, seed=3, vectors_per_pass=2,
                   mode="jvp", trace_sketch=3)
    r3 = sharpness(m, x, y, iterations=5, tol=0, trace_samples=5, batch_size=7, seed=3, keep_graphs=True,
                   trace_sketch=3)
    assert r3.trace_samples == pytest.approx(r1.trace_samples, rel=1e-10)
    assert r3.top_eigenvalue == pytest.approx(r1.top_eigenvalue, rel=1e-10)
    assert r1.n_params == 28
    assert r2.top_eigenvalue == pytest.approx(r1.top_eigenvalue, rel=1e-10)
    assert r2.trace_samples == pytest.approx(r1.trace_samples, rel=1e-10)
    assert r1.eigenpairs[0].iterations == 5
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert m.training and m.bn.training and not m.fc.bias.requires_grad and m.conv.weight.requires_grad
    assert all(p.grad is None for p in m.parameters())
    t1 = sharpness(m, x, y, iterations=3, tol=0, trace_samples=3, batch_size=12, bn="train")
    t2 = sharpness(m, x, y, iterations=3, tol=0, trace_samples=3, batch_size=6, bn="train")
    assert t1.trace != pytest.approx(t2.trace, rel=1e-6)  # train-mode BN: the batch composition matters
    assert torch.equal(before["bn.running_mean"], m.bn.running_mean) and int(m.bn.num_batches_tracked) == 0
    with pytest.raises(KdprobeError, match="bn one of"):
        sharpness(m, x, y, bn="batch")
