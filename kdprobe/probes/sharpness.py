"""Sharpness of the training loss at a checkpoint: top Hessian eigenvalues, Hessian trace and,
optionally, the eigenvalue density (PyHessian's quantities, Yao et al. 2020; Ghorbani et al. 2019).

The loss is the mean cross-entropy over the chosen samples, as a function of every parameter
with requires_grad (biases and BN scales/shifts included; BN running statistics are buffers,
not variables). Hessian-vector products are exact, through torch.func on `functional_call`,
summed over minibatches of the samples (each minibatch's loss is a sum, the total is divided
by N once), so the batch size does not change the result (tested). Two ways (HVP_MODES):
"jvp", forward-over-reverse (`jvp` of `grad`), which redoes the forward pass and the gradient
for every vector; and "reuse" (default), reverse-over-reverse (`vjp` of `grad`), which does
them once per minibatch and applies the result to every vector of a call
(`vectors_per_pass` Hutchinson vectors at a time) and, with keep_graphs, to every later call
(power-iteration steps). Measured on a CPU (BENCHMARKS.md), jvp-over-grad costs about what
PyHessian's double backward costs per vector (both do ~9 convolution-sized products per conv
layer); the reuse is what saves time.

BatchNorm: "eval" (default) normalizes with the checkpoint's running statistics, so every
sample's loss is its own and the loss is the plain training objective at a fixed network;
"train" normalizes with each minibatch's statistics (running statistics neither used nor
updated), as during training: the loss then depends on how the samples are grouped into
batches, so the result depends on the batch size. Other layers (dropout) stay in eval mode.
The probe works on a private copy of the model: the caller's model (weights, buffers, modes,
requires_grad, .grad) is never touched.
Sharpness is not invariant to reparameterization (Dinh et al. 2017): report it next to the
filter-normalized surfaces, not instead of them.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, replace_all_batch_norm_modules_, vjp

from kdprobe.errors import KdprobeError
from kdprobe.runtime.precision import fp32_exact
from kdprobe.probes.spectral import (Density, Eigenpair, deflated_hutchinson, hutchinson, hutchpp_sketch,
                                     lanczos_top, power_iteration, slq_density, trace_interval)

BN_MODES = ("eval", "train")
HVP_MODES = ("reuse", "jvp")
EIG_METHODS = ("lanczos", "power")
TRACE_METHODS = ("hutch++", "hutchinson")


class _AffineBN(nn.Module):
    """An eval-mode BatchNorm written as x * s + b, s = weight / sqrt(running_var + eps), b = bias - mean * s.

    The same function of the same parameters (so the same Hessian), but its second derivatives
    are two multiplications instead of the general batch-norm double-backward formula.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.eps = bn.eps
        self.weight, self.bias = bn.weight, bn.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(bn, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            s = s * self.weight
        b = -self.running_mean * s
        if self.bias is not None:
            b = b + self.bias
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * s.view(shape) + b.view(shape)


def _affine_bns(model: nn.Module) -> None:
    """Replace every eval-mode BatchNorm with running statistics by _AffineBN (in place, on the private copy)."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and child.running_var is not None:
            setattr(model, name, _AffineBN(child))
        else:
            _affine_bns(child)


class HessianOperator:
    """v -> H v for the Hessian of the mean cross-entropy of `model` on (x, y) w.r.t. its trainable parameters.

    mode "reuse" (default): per minibatch, torch.func.vjp of torch.func.grad computes the forward
    pass and the gradient once and returns a function that maps v to H_batch v (H is symmetric,
    so the vector-Jacobian product of the gradient is the HVP); every vector of a call reuses it,
    and with keep_graphs=True every later call does too (memory: the autograd graph of the whole
    sample set, ~3.5 MB per CIFAR image for a ResNet-20 in fp32). mode "jvp": forward-over-reverse,
    torch.func.jvp of torch.func.grad, recomputing the forward pass and gradient for every vector.
    Both are exact; they agree to rounding (tested).
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, bn: str = "eval", batch_size: int = 256,
                 mode: str = "reuse", keep_graphs: bool = False, progress: Callable[[int], None] | None = None):
        if bn not in BN_MODES:
            raise KdprobeError(f"expected bn one of {', '.join(BN_MODES)}, got {bn!r}")
        if mode not in HVP_MODES:
            raise KdprobeError(f"expected an HVP mode one of {', '.join(HVP_MODES)}, got {mode!r}")
        if batch_size < 1 or len(x) != len(y) or len(y) == 0:
            raise KdprobeError(f"expected batch_size >= 1 and as many labels as inputs (at least one), got "
                               f"{batch_size}, {len(x)} inputs and {len(y)} labels")
        self.model = copy.deepcopy(model)  # private copy: the caller's model is never modified
        self.model.eval()
        if bn == "train":
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
            replace_all_batch_norm_modules_(self.model)  # batch statistics, no running-stat updates
        else:
            _affine_bns(self.model)
        if x.dim() == 4:  # NHWC convolutions are faster on CPUs (oneDNN) and GPUs; the same function
            self.model.to(memory_format=torch.channels_last)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not self.names:
            raise KdprobeError("expected parameters with requires_grad, got none; the Hessian has no variables")
        own = dict(self.model.named_parameters())
        self.params = {n: own[n].detach() for n in self.names}
        self.buffers = {n: b.detach() for n, b in self.model.named_buffers()}
        self.shapes = [self.params[n].shape for n in self.names]
        self.sizes = [self.params[n].numel() for n in self.names]
        self.dim = int(sum(self.sizes))
        p0 = self.params[self.names[0]]
        self.device, self.dtype = p0.device, p0.dtype
        self.x, self.y = x.to(self.device), y.to(self.device)
        if self.x.dim() == 4:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.n, self.batch_size, self.bn, self.mode = int(len(y)), int(batch_size), bn, mode
        self.keep_graphs = bool(keep_graphs) and mode == "reuse"
        self._kept: list = []
        self.progress = progress  # called with the number of vectors after every hvp_many call
        self.products = 0  # Hessian-vector products computed so far

    def _flat(self, d: dict) -> torch.Tensor:
        return torch.cat([d[n].reshape(-1) for n in self.names])

    def _unflat(self, v: torch.Tensor) -> dict:
        return {n: t.view(s) for n, t, s in zip(self.names, v.split(self.sizes), self.shapes)}

    def _loss_sum(self, params: dict, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        out = functional_call(self.model, {**self.buffers, **params}, (xb,))
        return F.cross_entropy(out, yb, reduction="sum")

    def _batches(self):
        for i in range(0, self.n, self.batch_size):
            yield self.x[i:i + self.batch_size], self.y[i:i + self.batch_size]

    def loss(self) -> float:
        """Mean cross-entropy at the checkpoint (the function whose Hessian this is)."""
        with torch.no_grad():
            return float(sum(float(self._loss_sum(self.params, xb, yb)) for xb, yb in self._batches()) / self.n)

    def _batch_ops(self):
        """Per minibatch, a function v (dict) -> H_batch v (dict), H_batch of the batch's summed loss."""
        if self.keep_graphs:
            if not self._kept:  # built whole before use, so an interrupted call cannot leave a partial list
                self._kept = list(self._make_ops())
            return iter(self._kept)
        return self._make_ops()

    def _make_ops(self):
        for xb, yb in self._batches():
            g = grad(lambda p, xb=xb, yb=yb: self._loss_sum(p, xb, yb))
            if self.mode == "jvp":
                f = lambda t, g=g: jvp(g, (self.params,), (t,))[1]  # noqa: E731
            else:
                _, vjp_fn = vjp(g, self.params)
                f = lambda t, vjp_fn=vjp_fn: vjp_fn(t)[0]  # noqa: E731
            yield f

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """H v for one flat vector (P,)."""
        return self.hvp_many(v[None])[0]

    def hvp_many(self, vs: torch.Tensor) -> torch.Tensor:
        """H v for k flat vectors (k, P); minibatches outside, vectors inside (one forward pass per batch)."""
        if vs.dim() != 2 or vs.shape[1] != self.dim:
            raise KdprobeError(f"expected vectors of shape (k, {self.dim}), got {tuple(vs.shape)}")
        tangents = [self._unflat(v) for v in vs.to(self.device, self.dtype)]
        total = torch.zeros(vs.shape[0], self.dim, dtype=self.dtype, device=self.device)
        for f in self._batch_ops():
            for i, t in enumerate(tangents):
                total[i] += self._flat(f(t))
        self.products += vs.shape[0]
        if self.progress is not None:
            self.progress(vs.shape[0])
        return total / self.n


@dataclass(frozen=True)
class SharpnessResult:
    """Top eigenvalues, trace (every sample kept, with a bootstrap-t interval) and optional density of one Hessian.

    Every entry of trace_samples is on its own an unbiased estimate of the trace: v^T H v for
    Hutchinson, trace_exact + (Pv)^T H (Pv) for Hutch++ (P projects out the sketch); trace is
    their mean, trace_se their std(ddof=1) / sqrt(n).
    """

    loss: float  # mean cross-entropy at the checkpoint
    eigenpairs: tuple[Eigenpair, ...]  # largest in magnitude first
    trace: float
    trace_se: float  # std(ddof=1) / sqrt(samples); nan for one sample
    trace_samples: tuple[float, ...]
    density: Density | None
    n_samples: int
    n_params: int
    products: int  # Hessian-vector products computed
    bn: str
    batch_size: int
    seed: int
    method: str = "power"  # how the eigenvalues were found: lanczos | power
    trace_method: str = "hutchinson"  # hutch++ | hutchinson
    trace_exact: float = 0.0  # tr(Q^T H Q) of the sketch Q (hutch++), computed exactly; 0 for hutchinson
    trace_sketch: int = 0  # rows of Q (Lanczos basis or Hutch++ sketch)
    trace_low: float = math.nan  # bootstrap-t interval for the trace at trace_confidence
    trace_high: float = math.nan
    trace_confidence: float = 0.95
    trace_stable: bool = False  # False: too few vectors or one vector dominates; trace_note says which
    trace_note: str = ""
    eig_products: int = 0  # Hessian-vector products spent on the eigenvalues (the rest: trace, density)

    @property
    def top_eigenvalue(self) -> float:
        """The first (largest-magnitude) eigenvalue."""
        return self.eigenpairs[0].value

    @property
    def trace_vectors(self) -> int:
        """Random vectors behind the trace estimate."""
        return len(self.trace_samples)


@fp32_exact()  # Hessian-vector products in true fp32: TF32 off on every device
def sharpness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, top_k: int = 1, iterations: int = 100,
              tol: float = 1e-3, trace_samples: int = 100, density: bool = False, lanczos_steps: int = 80,
              density_runs: int = 1, bn: str = "eval", batch_size: int = 256, vectors_per_pass: int = 25,
              mode: str = "reuse", keep_graphs: bool = False, seed: int = 0, method: str = "lanczos",
              trace_method: str = "hutch++", trace_rtol: float = 0.0, trace_sketch: int = 10,
              trace_confidence: float = 0.95, progress: Callable[[int], None] | None = None) -> SharpnessResult:
    """Top-k Hessian eigenvalues (Lanczos or power iteration), trace (Hutch++ or Hutchinson) with a bootstrap-t
    interval, and optional SLQ density, of the mean CE on (x, y).

    iterations caps the Lanczos steps (or power steps per eigenvalue); trace_samples caps the trace's random
    vectors, and trace_rtol > 0 stops earlier, once the standard error is below trace_rtol * |trace| (at least
    10 vectors). hutch++ deflates a sketch of trace_sketch directions: with lanczos, the Lanczos basis itself
    (run to at least trace_sketch steps), with power, Hutch++'s orth(H S) (2 * trace_sketch products).
    """
    if trace_samples < 1:
        raise KdprobeError(f"expected at least 1 trace sample, got {trace_samples}")
    if method not in EIG_METHODS:
        raise KdprobeError(f"expected method one of {', '.join(EIG_METHODS)}, got {method!r}")
    if trace_method not in TRACE_METHODS:
        raise KdprobeError(f"expected trace_method one of {', '.join(TRACE_METHODS)}, got {trace_method!r}")
    if not (trace_rtol >= 0 and trace_sketch >= 0 and 0 < trace_confidence < 1):
        raise KdprobeError(f"expected trace_rtol >= 0, trace_sketch >= 0 and trace_confidence in (0, 1), got "
                           f"{trace_rtol}, {trace_sketch}, {trace_confidence}")
    op = HessianOperator(model, x, y, bn=bn, batch_size=batch_size, mode=mode, keep_graphs=keep_graphs,
                         progress=progress)
    loss = op.loss()  # one forward pass, first: a model whose outputs are nan/inf has no Hessian to measure
    if not math.isfinite(loss):
        raise KdprobeError(f"the model's mean loss on these {op.n} samples is {loss} (its outputs are nan/inf on some "
                           "inputs although its weights are finite); expected finite outputs: check the checkpoint "
                           "with kdprobe eval, or probe another one")
    if top_k > op.dim:
        raise KdprobeError(f"expected top_k <= the {op.dim} trainable parameters, got {top_k}")
    gen = torch.Generator().manual_seed(int(seed))  # one stream: eigenvectors, then trace, then density
    kw = dict(generator=gen, device=op.device, dtype=op.dtype)
    deflate = trace_method == "hutch++" and trace_sketch > 0
    sketch_size = min(trace_sketch, op.dim) if deflate else 0
    if method == "lanczos":  # iterations caps every Lanczos step: the basis it deflates is at most that long
        sketch_size = min(sketch_size, iterations)
    basis, exact = None, 0.0
    if method == "lanczos":
        run = lanczos_top(op.hvp, op.dim, k=top_k, steps=iterations, tol=tol, min_steps=sketch_size, **kw)
        pairs = list(run.pairs)
        if deflate:
            basis, exact = run.basis, run.basis_trace
    else:
        pairs = power_iteration(op.hvp, op.dim, k=top_k, iterations=iterations, tol=tol, **kw)
    eig_products = op.products
    if deflate and basis is None:
        basis, exact = hutchpp_sketch(op.hvp_many, op.dim, size=sketch_size, **kw)
    if trace_method == "hutchinson" and trace_rtol == 0:
        samples = hutchinson(op.hvp_many, op.dim, samples=trace_samples, chunk=vectors_per_pass, **kw)
    else:
        resid = deflated_hutchinson(op.hvp_many, op.dim, basis=basis, exact=exact, samples=trace_samples,
                                    chunk=vectors_per_pass, rtol=trace_rtol, min_samples=min(10, max(2, trace_samples)),
                                    **kw)
        samples = [exact + r for r in resid]
    dens = slq_density(op.hvp, op.dim, steps=lanczos_steps, runs=density_runs, **kw) if density else None
    se = float(np.std(samples, ddof=1) / math.sqrt(len(samples))) if len(samples) > 1 else math.nan
    ci = trace_interval(samples, confidence=trace_confidence, seed=int(seed))
    return SharpnessResult(loss, tuple(pairs), float(np.mean(samples)), se, tuple(samples), dens, op.n, op.dim,
                           op.products, bn, op.batch_size, int(seed), method, trace_method, float(exact),
                           0 if basis is None else int(len(basis)), ci.low, ci.high, trace_confidence, ci.stable,
                           ci.note, eig_products)
