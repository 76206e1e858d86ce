"""Matrix-free spectral estimates of a symmetric operator v -> A v on flat vectors.

- `power_iteration`: the top-k eigenvalues (largest in magnitude) by power iteration with
  deflation (each iterate is Gram-Schmidt orthogonalized against the eigenvectors already
  found), as PyHessian (Yao et al. 2020) does; stops when the relative change of the Rayleigh
  quotient falls below `tol` (0 = always `iterations` steps) and reports the residual
  ||A v - lambda v|| at the last evaluated unit vector v.
- `lanczos_top`: the top-k eigenvalues (largest in magnitude) as Ritz values of a Lanczos run
  with full reorthogonalization (Golub & Van Loan, Matrix Computations, 4th ed., 10.1-10.3):
  m products give the best approximation from the Krylov space K_m(A, v0), where power
  iteration only has A^m v0, so far fewer products reach the same tolerance. Residual of a
  Ritz pair (theta, y = Q s): ||A y - theta y|| = beta_m |s_m| (exact with an orthonormal Q).
  It stops when, for each of the k values, the relative change over the last step is below
  `tol` and the error bound min(r, r^2 / gap) (Kato-Temple with the Ritz gap) is below
  tol * |theta|. It also returns the orthonormal basis Q and tr(Q^T A Q) = sum of alphas.
- `hutchinson`: tr(A) ~ mean over Rademacher v of v^T A v, with every sample kept and the
  standard error std(ddof=1)/sqrt(n).
- `deflated_hutchinson` / `hutchpp_sketch`: Hutch++ (Meyer, Musco, Musco, Woodruff 2021):
  tr(A) = tr(Q^T A Q) + tr((I - QQ^T) A (I - QQ^T)) for any orthonormal Q drawn independently
  of the Hutchinson vectors; the first term is exact, the second is estimated by Hutchinson on
  the projected vectors, whose variance 2 ||P A P||_F^2 (minus its diagonal) no longer holds
  the top eigenvalues. Q is the paper's sketch orth(A S) (S Rademacher), or the Lanczos basis
  of `lanczos_top` (a Krylov sketch: its products are spent anyway for the eigenvalues).
  `rtol` stops sampling once the standard error is below rtol * |trace|.
- `trace_interval`: kdprobe.stats.bootstrap_t_interval of the samples (the union of a
  studentized-bootstrap and the t interval; v^T A v is right-skewed when one eigenvalue carries
  much of the trace, which bootstrap-t corrects), flagged not stable below 10 vectors or below
  Cochran's n >= 25 g1^2. Coverage is checked in tests against an explicit Hessian over 200
  seeds (about 95% at 95%).
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
from kdprobe.stats import MeanInterval, bootstrap_t_interval

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
class LanczosRun:
    """Top eigenpairs from a Lanczos run, and the orthonormal Krylov basis it built (for deflating the trace)."""

    pairs: tuple[Eigenpair, ...]  # largest in magnitude first
    basis: torch.Tensor  # (m, P), orthonormal rows q_1..q_m, A q_j computed for each
    basis_trace: float  # tr(Q^T A Q) = sum of the Lanczos alphas (exact up to rounding)
    alpha: np.ndarray
    beta: np.ndarray


TraceInterval = MeanInterval  # a trace's interval is the generic interval of a mean of samples


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


def _orthogonalize(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """w minus its projection on the rows of basis (orthonormal), classical Gram-Schmidt twice ("twice is enough")."""
    for _ in range(2):
        w = w - (basis @ w) @ basis
    return w


def lanczos_top(op: Op, dim: int, *, k: int = 1, steps: int = 100, tol: float = 1e-3, min_steps: int = 0,
                generator: torch.Generator, device=None, dtype=torch.float32) -> LanczosRun:
    """Top-k eigenvalues (by magnitude) of a symmetric operator by Lanczos with full reorthogonalization."""
    if k < 1 or steps < 1 or tol < 0 or k > dim:
        raise KdprobeError(f"expected 1 <= k <= {dim}, steps >= 1 and tol >= 0, got {k}, {steps}, {tol}")
    steps = min(steps, dim)
    v = torch.randn(dim, generator=generator).to(device=device, dtype=dtype)  # the start vector power iteration uses
    basis = torch.zeros(steps, dim, device=device, dtype=dtype)
    basis[0] = v / v.norm()
    alpha: list[float] = []
    beta: list[float] = []
    prev: np.ndarray | None = None
    pairs: list[Eigenpair] = []
    for j in range(steps):
        q = basis[j]
        w = op(q).detach()
        a = _dot(q, w)
        alpha.append(a)
        w = _orthogonalize(w, basis[: j + 1])  # removes a q_j and beta q_{j-1} too (full reorthogonalization)
        b = float(w.norm())
        t = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
        theta, s = np.linalg.eigh(t)
        order = np.argsort(-np.abs(theta), kind="stable")[:k]
        top = theta[order]
        scale = max(1.0, float(np.abs(theta).max()))
        breakdown = b <= 1e-10 * scale  # invariant subspace (its Ritz values are exact; a repeated eigenvalue
        # shows once per Krylov space, so the run restarts from a fresh direction rather than stopping)
        res = b * np.abs(s[-1, order]) if not breakdown else np.zeros(len(order))
        done = len(order) == k and j + 1 == dim  # a full basis: the Ritz values are the eigenvalues
        if len(order) == k and not done and prev is not None and j + 1 >= min_steps:
            ok = True
            for i, idx in enumerate(order):
                others = np.delete(theta, idx)
                gap = float(np.abs(others - theta[idx]).min()) if others.size else math.inf
                err = min(res[i], res[i] ** 2 / gap if gap > 0 else math.inf)
                change = abs(top[i] - prev[i]) / (abs(prev[i]) + 1e-12) if i < len(prev) else math.inf
                ok = ok and change < tol and err <= tol * abs(top[i])
            done = ok
        pairs = [Eigenpair(float(top[i]), j + 1, float(res[i]), bool(done)) for i in range(len(order))]
        prev = top
        if done or j + 1 == steps:
            break
        if breakdown:  # fewer than k values in this Krylov space: continue from a fresh direction (T block-diagonal)
            w = _orthogonalize(torch.randn(dim, generator=generator).to(device=device, dtype=dtype), basis[: j + 1])
            b_next, b = float(w.norm()), 0.0
            w = w / b_next
        else:
            w = w / b
        beta.append(b)
        basis[j + 1] = w
    m = len(alpha)
    return LanczosRun(tuple(pairs), basis[:m], float(sum(alpha)), np.asarray(alpha), np.asarray(beta[: m - 1]))


def hutchpp_sketch(op_many: ManyOp, dim: int, *, size: int, generator: torch.Generator, device=None,
                   dtype=torch.float32) -> tuple[torch.Tensor, float]:
    """Hutch++'s sketch: Q = orth(A S) for `size` Rademacher columns S, and tr(Q^T A Q) (2 * size products)."""
    if not 1 <= size <= dim:
        raise KdprobeError(f"expected a sketch size in [1, {dim}], got {size}")
    y = op_many(rademacher((size, dim), generator, dtype).to(device))
    q = torch.linalg.qr(y.T.to(torch.float64)).Q.T.to(dtype)  # (size, P), orthonormal rows
    aq = op_many(q)
    return q, float((q.to(torch.float64) * aq.to(torch.float64)).sum())


def deflated_hutchinson(op_many: ManyOp, dim: int, *, basis: torch.Tensor | None = None, exact: float = 0.0,
                        samples: int = 100, chunk: int = 25, rtol: float = 0.0, min_samples: int = 10,
                        generator: torch.Generator, device=None, dtype=torch.float32) -> list[float]:
    """(Pv)^T A (Pv), P = I - QQ^T, for Rademacher v: tr A ~ exact + their mean; stops at `samples`, or at rtol.

    With rtol > 0, sampling stops once at least `min_samples` are in and std/sqrt(n) <= rtol * |exact + mean|;
    chunks after the first are sized to what the current spread says is still needed.
    """
    if samples < 1 or chunk < 1 or rtol < 0 or min_samples < 2:
        raise KdprobeError(f"expected samples >= 1, chunk >= 1, rtol >= 0 and min_samples >= 2, got {samples}, "
                           f"{chunk}, {rtol}, {min_samples}")
    out: list[float] = []
    while len(out) < samples:
        want = chunk
        if rtol > 0:
            if len(out) < min_samples:
                want = min(chunk, min_samples - len(out))
            else:
                arr = np.asarray(out)
                se = float(arr.std(ddof=1) / math.sqrt(len(arr)))
                goal = rtol * abs(exact + float(arr.mean()))
                if se <= goal:
                    break
                need = len(arr) * (se / goal) ** 2 if goal > 0 else math.inf
                want = int(min(chunk, max(1, math.ceil(need - len(arr)))))
        c = min(want, samples - len(out))
        v = rademacher((c, dim), generator, dtype).to(device)
        if basis is not None and len(basis):
            v = v - (v @ basis.T) @ basis
        hv = op_many(v)
        out += (v.to(torch.float64) * hv.to(torch.float64)).sum(dim=1).tolist()
    return out


def trace_interval(samples, *, exact: float = 0.0, confidence: float = 0.95, resamples: int = 2000,
                   seed: int = 0) -> TraceInterval:
    """Interval for the trace exact + mean(samples): kdprobe.stats.bootstrap_t_interval, its notes in vectors."""
    return bootstrap_t_interval(samples, offset=exact, confidence=confidence, resamples=resamples, seed=seed,
                                unit="vectors")


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
