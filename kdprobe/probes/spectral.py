"""Matrix-free spectral estimates of a symmetric operator v -> A v on flat vectors.

- `power_iteration`: the top-k eigenvalues (largest in magnitude) by power iteration with
  deflation (each iterate is Gram-Schmidt orthogonalized against the eigenvectors already
  found), as PyHessian (Yao et al. 2020) does; stops when the relative change of the Rayleigh
  quotient falls below `tol` (0 = always `iterations` steps) and reports the residual
  ||A v - lambda v|| at the last evaluated unit vector v.
- `hutchinson`: tr(A) ~ mean over Rademacher v of v^T A v, with every sample kept and the
  standard error std(ddof=1)/sqrt(n).
- `lanczos` / `slq_density`: stochastic Lanczos quadrature (Ghorbani, Krishnan, Xiao 2019):
  m Lanczos steps with full reorthogonalization from a normalized Rademacher vector give a
  tridiagonal T; its eigenvalues are the quadrature nodes and the squared first components of
  its eigenvectors the weights (they sum to 1 and reproduce v^T A^j v for j < 2m). The density
  is the runs' average of Gaussian bumps at the nodes (PyHessian's smoothing: variance
  sigma2 * max(1, range), widened to at least 1.5 grid steps), normalized to integrate to 1
  on the grid.
Random vectors come from a CPU torch.Generator (the same seed gives the same vectors on any
device); dot products are accumulated in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from kdprobe.errors import KdprobeError

Op = Callable[[torch.Tensor], torch.Tensor]  # (P,) -> (P,)
ManyOp = Callable[[torch.Tensor], torch.Tensor]  # (k, P) -> (k, P)


@dataclass(frozen=True)
class Eigenpair:
    """One eigenvalue estimate with how it was reached."""

    value: float
    iterations: int
    residual: float  # ||A v - value v|| at the unit vector v the value was measured at
    converged: bool  # relative change below tol before the iteration cap


@dataclass(frozen=True)
class Density:
    """Eigenvalue density by stochastic Lanczos quadrature: raw nodes/weights per run and a smoothed curve."""

    nodes: tuple[tuple[float, ...], ...]  # per run: Ritz values
    weights: tuple[tuple[float, ...], ...]  # per run: quadrature weights (sum 1)
    grid: tuple[float, ...]
    density: tuple[float, ...]
    steps: int
    sigma2: float  # the variance actually used


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().to(torch.float64) * b.detach().to(torch.float64)).sum())


def rademacher(shape, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """+-1 entries with probability 1/2 each, drawn on the CPU from `generator`."""
    return torch.randint(0, 2, shape, generator=generator).to(dtype).mul_(2).sub_(1)


def power_iteration(op: Op, dim: int, *, k: int = 1, iterations: int = 100, tol: float = 1e-3,
                    generator: torch.Generator, device=None, dtype=torch.float32) -> list[Eigenpair]:
    """Top-k eigenvalues (by magnitude) of a symmetric operator by power iteration with deflation."""
    if k < 1 or iterations < 1 or tol < 0:
        raise KdprobeError(f"expected k >= 1, iterations >= 1 and tol >= 0, got {k}, {iterations}, {tol}")
    found, vecs = [], []
    for _ in range(k):
        v = torch.randn(dim, generator=generator).to(device=device, dtype=dtype)
        lam_prev, pair = None, None
        for it in range(1, iterations + 1):
            for u in vecs:  # deflation: stay orthogonal to the eigenvectors already found
                v = v - _dot(u, v) * u
            norm = float(v.norm())
            if norm == 0.0:
                raise KdprobeError("expected a non-zero iterate, got 0 (the operator has rank below k); lower k")
            v = v / norm
            hv = op(v)
            lam = _dot(v, hv)
            resid = float((hv.to(torch.float64) - lam * v.to(torch.float64)).norm())
            converged = lam_prev is not None and abs(lam - lam_prev) / (abs(lam_prev) + 1e-6) < tol
            pair = Eigenpair(lam, it, resid, converged)
            if converged:
                break
            lam_prev = lam
            hn = float(hv.norm())
            if hn == 0.0:  # v is in the null space: eigenvalue 0 exactly
                pair = Eigenpair(0.0, it, 0.0, True)
                break
            v = hv / hn
        found.append(pair)
        vecs.append(v)
    return found


def hutchinson(op_many: ManyOp, dim: int, *, samples: int = 100, chunk: int = 1, generator: torch.Generator,
               device=None, dtype=torch.float32) -> list[float]:
    """v^T A v for `samples` Rademacher vectors (their mean estimates tr A), `chunk` vectors per operator call."""
    if samples < 1 or chunk < 1:
        raise KdprobeError(f"expected samples >= 1 and chunk >= 1, got {samples} and {chunk}")
    out: list[float] = []
    while len(out) < samples:
        c = min(chunk, samples - len(out))
        v = rademacher((c, dim), generator, dtype).to(device)
        hv = op_many(v)
        out += (v.to(torch.float64) * hv.to(torch.float64)).sum(dim=1).tolist()
    return out


def lanczos(op: Op, v0: torch.Tensor, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, beta) of the Lanczos tridiagonal after up to `steps` steps from v0, full reorthogonalization."""
    v = v0 / v0.norm()
    basis = [v]
    alpha, beta = [], []
    w = op(v)
    for j in range(steps):
        a = _dot(w, v)
        alpha.append(a)
        w = w - a * v - (beta[-1] * basis[-2] if j > 0 else 0.0)
        for u in basis:  # full reorthogonalization, twice is enough in floating point
            w = w - _dot(u, w) * u
        for u in basis:
            w = w - _dot(u, w) * u
        b = float(w.norm())
        if j == steps - 1 or b < 1e-10 * max(1.0, abs(a)):  # invariant subspace found: T is exact
            break
        beta.append(b)
        v = w / b
        basis.append(v)
        w = op(v)
    return np.asarray(alpha), np.asarray(beta[: len(alpha) - 1])


def quadrature(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gauss quadrature nodes and weights of the Lanczos tridiagonal (weights sum to 1)."""
    t = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
    nodes, vecs = np.linalg.eigh(t)
    return nodes, vecs[0, :] ** 2


def slq_density(op: Op, dim: int, *, steps: int = 80, runs: int = 1, generator: torch.Generator, device=None,
                dtype=torch.float32, bins: int = 1000, sigma2: float = 1e-5) -> Density:
    """Eigenvalue density by stochastic Lanczos quadrature, `runs` random starts of `steps` steps."""
    if steps < 1 or runs < 1:
        raise KdprobeError(f"expected steps >= 1 and runs >= 1, got {steps} and {runs}")
    nodes, weights = [], []
    for _ in range(runs):
        v0 = rademacher((dim,), generator, dtype).to(device)
        n, w = quadrature(*lanczos(op, v0, min(steps, dim)))
        nodes.append(n)
        weights.append(w)
    lo = min(float(n.min()) for n in nodes) - 0.01
    hi = max(float(n.max()) for n in nodes) + 0.01
    grid = np.linspace(lo, hi, bins)
    # PyHessian's width, but never narrower than 1.5 grid steps (a bump between grid points would vanish)
    s2 = max(sigma2 * max(1.0, hi - lo), (1.5 * (grid[1] - grid[0])) ** 2)
    dens = np.zeros(bins)
    for n, w in zip(nodes, weights):
        dens += (w[None, :] * np.exp(-((grid[:, None] - n[None, :]) ** 2) / (2 * s2))).sum(1) / math.sqrt(2 * math.pi * s2)
    dens /= runs
    area = float(dens.sum() * (grid[1] - grid[0]))
    dens = dens / area if area > 0 else dens
    return Density(tuple(tuple(map(float, n)) for n in nodes), tuple(tuple(map(float, w)) for w in weights),
                   tuple(map(float, grid)), tuple(map(float, dens)), int(steps), float(s2))
