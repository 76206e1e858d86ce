"""Representation diversity: the Jacobian-correlation score of Mellor et al. 2020 ("NAS without training").

v1 (the first version, used by Park et al.): J = d(sum of logits)/dx, one flattened row per
input; C = corrcoef(J) (float64); v = eigenvalues of C (symmetric solver);
score = -sum_i(log(v_i + k) + 1/(v_i + k)), k = 1e-5. An identity C gives
-N(log(1+k) + 1/(1+k)) ~= -N; higher = less correlated = more diverse.
v2 (the revised paper): binary ReLU on/off codes of every input over all ReLU units,
K_ij = #units - Hamming(c_i, c_j), score = log|det K|. A "ReLU" is any call of nn.ReLU, F.relu,
torch.relu, Tensor.relu (and their in-place variants), nn.ReLU6 / F.relu6, or a hardtanh clipped
below at 0, wherever the model makes it (module or functional); a unit is "on" when its output > 0.

BN handling (`bn`): "eval" uses running statistics, so samples do not interact and one
backward of the summed output gives exact per-sample gradients; "batch-frozen" computes
the batch statistics of every BN layer once (no grad) and then runs in eval mode with
them substituted (batch-statistics normalisation, exact per-sample gradients);
"train" is what the original code did: samples interact through the batch statistics,
so one backward does NOT give per-sample gradients. Whatever the option, the model's
modes, buffers (num_batches_tracked included), parameters and requires_grad are
restored, and no parameter .grad is touched (gradients are taken w.r.t. a copy of the
inputs only, with torch.autograd.grad).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from kdprobe.errors import KdprobeError
from kdprobe.runtime.precision import fp32_exact

VARIANTS = ("v1", "v2")
BN_MODES = ("eval", "batch-frozen", "train")
OUTPUTS = ("sum", "full", "pred")
# Every Python-level spelling of ReLU; nn.ReLU(inplace) calls F.relu, F.relu_ is torch.relu_. ReLU6
# (F.relu6; nn.ReLU6 calls F.hardtanh(x, 0, 6)) and any hardtanh clipped below at 0 count too: they are
# ReLUs with an upper clip, and their on/off code (output > 0) is the ReLU's.
_RELU_FUNCS = frozenset({F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, F.relu6})


def _is_relu(func, args, kwargs) -> bool:
    if func in _RELU_FUNCS:
        return True
    if func is F.hardtanh:
        low = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
        return float(low) == 0.0
    return False
# |corr| this close to 1 means two Jacobian rows are collinear up to float32 rounding.
_COLLINEAR_TOL = 1e-9


@dataclass(frozen=True)
class ScoreDetail:
    """One score on one batch, with what it was computed from."""

    score: float
    variant: str
    n: int  # inputs in the batch
    bn: str
    output: str  # v1 only ("sum", "full", "pred"); ignored by v2
    k: float  # v1 regulariser added to every eigenvalue
    row_length: int | None = None  # v1: length of one Jacobian row (D, or classes*D for "full")
    min_eigenvalue: float | None = None  # v1: smallest eigenvalue of C
    units_seen: int | None = None  # v2: ReLU units per input, summed over every ReLU call
    relu_calls: int | None = None  # v2: ReLU calls seen in one forward


def _check_options(variant: str, bn: str, output: str, k: float) -> None:
    if variant not in VARIANTS:
        raise KdprobeError(f"expected variant one of {VARIANTS}, got {variant!r}")
    if bn not in BN_MODES:
        raise KdprobeError(f"expected bn one of {BN_MODES}, got {bn!r}")
    if output not in OUTPUTS:
        raise KdprobeError(f"expected output one of {OUTPUTS}, got {output!r}")
    if not (k > 0 and math.isfinite(k)):
        raise KdprobeError(f"expected k > 0 (Mellor et al. use 1e-5), got {k}")


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return fallback


def duplicate_count(inputs: torch.Tensor) -> int:
    """Number of input rows that repeat an earlier row exactly (0 for a clean probe batch)."""
    flat = inputs.detach().reshape(inputs.shape[0], -1)
    return int(flat.shape[0] - torch.unique(flat, dim=0).shape[0])


def _check_inputs(inputs: torch.Tensor) -> None:
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point() or inputs.dim() < 2:
        got = f"{inputs.dtype} of shape {tuple(inputs.shape)}" if isinstance(inputs, torch.Tensor) else type(inputs)
        raise KdprobeError(f"expected a float input batch (N, ...), got {got}; normalize the images first")
    if inputs.shape[0] < 2:
        raise KdprobeError(f"expected at least 2 inputs in the probe batch, got {inputs.shape[0]}")
    dups = duplicate_count(inputs)
    if dups:
        raise KdprobeError(
            f"expected distinct inputs, got {dups} duplicate inputs in the probe batch; identical inputs make "
            "the correlation matrix singular, so draw the batch without replacement from distinct images"
        )


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag, every buffer's value and every requires_grad on exit."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    buffers = [(m, name, b, b.detach().clone()) for m in model.modules() for name, b in m._buffers.items()
               if b is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, name, b, saved in buffers:
                m._buffers[name] = b  # the original tensor object, in case a layer replaced it
                b.copy_(saved)
        for p, rg in grads:
            p.requires_grad_(rg)
        for m, flag in modes:
            m.training = flag


@contextmanager
def _bn_mode(model: nn.Module, inputs: torch.Tensor, bn: str) -> Iterator[None]:
    """Put the model in the mode `bn` asks for; everything is restored afterwards."""
    with preserved_state(model):
        if bn == "train":
            model.train()
        elif bn == "eval":
            model.eval()
        else:  # batch-frozen: one no-grad pass with only the BN layers in train mode
            bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

            def grab(m, args):
                x = args[0]
                dims = [d for d in range(x.dim()) if d != 1]
                var, mean = torch.var_mean(x, dim=dims, correction=0)  # biased, as BN normalises with
                stats[m] = (mean, var)

            model.eval()
            hooks = [m.register_forward_pre_hook(grab) for m in bns]
            try:
                for m in bns:
                    m.train()
                with torch.no_grad():
                    model(inputs)
            finally:
                for h in hooks:
                    h.remove()
            model.eval()
            with torch.no_grad():
                for m, (mean, var) in stats.items():
                    if m.running_mean is not None:
                        m.running_mean.copy_(mean)
                        m.running_var.copy_(var)
        yield


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise KdprobeError(f"expected the model to return logits of shape (N, classes), got {got}")
    return out


def _grad(y: torch.Tensor, x: torch.Tensor, retain: bool) -> torch.Tensor:
    (g,) = torch.autograd.grad(y, x, retain_graph=retain, allow_unused=True)
    if g is None:
        raise KdprobeError("expected the model output to depend on its input, got no gradient path")
    return g.reshape(x.shape[0], -1)


@fp32_exact()  # TF32 off on every device (a GPU's cuDNN default moved a score by 6.7%)
def input_jacobian(model: nn.Module, inputs: torch.Tensor, *, bn: str = "eval", output: str = "sum") -> torch.Tensor:
    """Rows of the input Jacobian, shape (N, D) for "sum"/"pred" or (N, classes*D) for "full"."""
    _check_options("v1", bn, output, 1e-5)
    x0 = inputs.detach().to(_model_device(model, inputs.device))
    with _bn_mode(model, x0, bn):
        x = x0.clone().requires_grad_(True)  # a fresh leaf: the caller's tensor never gets a .grad
        with torch.enable_grad():
            logits = _logits(model, x)
            if output == "sum":
                rows = _grad(logits.sum(), x, retain=False)
            elif output == "pred":
                pred = logits.detach().argmax(dim=1, keepdim=True)
                rows = _grad(logits.gather(1, pred).sum(), x, retain=False)
            else:  # one backward per class; in eval mode each gives exact per-sample rows
                c = logits.shape[1]
                rows = torch.stack([_grad(logits[:, j].sum(), x, retain=j < c - 1) for j in range(c)], dim=1)
                rows = rows.reshape(x.shape[0], -1)
    return rows.detach()


def correlation_matrix(jac: torch.Tensor) -> torch.Tensor:
    """corrcoef of the rows of `jac` in float64; constant or collinear rows raise KdprobeError."""
    if not torch.isfinite(jac).all():
        raise KdprobeError("expected finite Jacobian rows, got nan/inf; check the model and inputs")
    const = (jac.amax(dim=1) == jac.amin(dim=1)).nonzero().flatten().tolist()
    if const:
        raise KdprobeError(
            f"expected Jacobian rows that vary, got {len(const)} constant (zero-variance) rows, e.g. input "
            f"{const[0]}; their correlation is undefined (dead ReLUs or a saturated model?)"
        )
    j = jac.to(torch.float64)
    j = j - j.mean(dim=1, keepdim=True)
    j = j / j.norm(dim=1, keepdim=True)
    corr = (j @ j.T).clamp_(-1.0, 1.0)
    off = corr.abs().fill_diagonal_(0.0) >= 1.0 - _COLLINEAR_TOL
    if off.any():
        i, k = off.nonzero()[0].tolist()
        raise KdprobeError(
            f"expected non-collinear Jacobian rows, got {int(off.sum()) // 2} collinear pairs (e.g. inputs {i} and "
            f"{k}, |corr| = 1); the gradient does not vary across these inputs, so the score is undefined"
        )
    return corr


def score_from_eigenvalues(eigenvalues: torch.Tensor, k: float = 1e-5) -> float:
    """Mellor et al. v1: -sum(log(v + k) + 1/(v + k)) over the eigenvalues v of the correlation matrix."""
    v = eigenvalues.to(torch.float64)
    return float(-(torch.log(v + k) + 1.0 / (v + k)).sum())


def _relu_kernel(model: nn.Module, x: torch.Tensor, bn: str) -> tuple[torch.Tensor, int, int]:
    """K = #units - Hamming distance of the ReLU on/off codes, over every ReLU call in one forward."""
    n = x.shape[0]
    kernel = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    seen = {"units": 0, "calls": 0}

    class _Recorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)  # the mode is off inside: F.relu's inner call is not counted
            if _is_relu(func, args, kwargs) and isinstance(out, torch.Tensor) and out.dim() >= 1 and out.shape[0] == n:
                # agreements = on-on + off-off = U - s_i - s_j + 2 c_i.c_j (s = units on); one matmul.
                # 0/1 in float32 (exact also under TF32) with sums <= U < 2^24: integers stay exact.
                flat = (out.detach() > 0).reshape(n, -1)
                code = flat.to(torch.float32 if flat.shape[1] < 2**24 else torch.float64)
                on = code.sum(dim=1, dtype=torch.float64)
                kernel.add_((2.0 * (code @ code.T)).to(torch.float64) - on[:, None] - on[None, :] + code.shape[1])
                seen["units"] += code.shape[1]
                seen["calls"] += 1
            return out

    with _bn_mode(model, x, bn), torch.no_grad(), _Recorder():
        _logits(model, x)
    return kernel, seen["units"], seen["calls"]


@fp32_exact()  # TF32 off on every device (a GPU's cuDNN default moved a score by 6.7%)
def jacobian_score_details(model: nn.Module, inputs: torch.Tensor, *, variant: str = "v1", bn: str = "eval",
                           output: str = "sum", k: float = 1e-5) -> ScoreDetail:
    """Mellor et al. 2020 score of `model` on one batch, with the quantities it came from."""
    _check_options(variant, bn, output, k)
    _check_inputs(inputs)
    n = int(inputs.shape[0])
    x = inputs.detach().to(_model_device(model, inputs.device))
    if variant == "v2":
        kernel, units, calls = _relu_kernel(model, x, bn)
        if units == 0:
            raise KdprobeError("expected a ReLU network for variant v2, got no ReLU calls; use variant v1")
        sign, logdet = torch.linalg.slogdet(kernel)
        # identical codes make K exactly singular, but LU rounding can still report a sign > 0 and a
        # meaningless log-determinant: count them (K_ij = units exactly iff codes i and j agree)
        same = int(((kernel == units).sum() - n) // 2)
        if sign <= 0 or same:
            raise KdprobeError(
                f"expected distinct ReLU codes, got a singular kernel ({same} pairs of inputs with identical "
                "codes); the v2 score is undefined for this batch"
            )
        return ScoreDetail(float(logdet), variant, n, bn, output, k, units_seen=units, relu_calls=calls)
    jac = input_jacobian(model, x, bn=bn, output=output)
    length = int(jac.shape[1])
    if n > length - 1:  # centred rows live in a (length-1)-dim space: C has rank <= length-1
        raise KdprobeError(
            f"expected at most {length - 1} inputs for Jacobian rows of length {length}, got {n}; C would be "
            f"singular and the score dominated by {n - length + 1}/k, so use a smaller batch or output='full'"
        )
    eig = torch.linalg.eigvalsh(correlation_matrix(jac))
    return ScoreDetail(score_from_eigenvalues(eig, k), variant, n, bn, output, k, row_length=length,
                       min_eigenvalue=float(eig.min()))


def jacobian_score(model: nn.Module, inputs: torch.Tensor, *, variant: str = "v1", bn: str = "eval",
                   output: str = "sum", k: float = 1e-5) -> float:
    """Mellor et al. 2020 score of `model` on one batch of inputs (higher = more diverse)."""
    return jacobian_score_details(model, inputs, variant=variant, bn=bn, output=output, k=k).score


def jacobian_scores(model: nn.Module, batches: Iterable[torch.Tensor], **options) -> list[float]:
    """The score on each of R batches; every raw value is kept (spread comes from kdprobe.stats)."""
    scores = [jacobian_score(model, b, **options) for b in batches]
    if not scores:
        raise KdprobeError("expected at least one probe batch, got none")
    return scores


def probe_indices(n_total: int, runs: int, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """R index batches of size N, each drawn without replacement, from a torch.Generator seeded `seed`."""
    if runs < 1:
        raise KdprobeError(f"expected runs >= 1, got {runs}")
    if not (2 <= batch_size <= n_total):
        raise KdprobeError(f"expected a batch size between 2 and the {n_total} available images, got {batch_size}")
    g = torch.Generator().manual_seed(int(seed))
    return [torch.randperm(n_total, generator=g)[:batch_size] for _ in range(runs)]


def probe_batches(data, split: str, runs: int, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """The R fixed probe batches of a TensorData split: seeded indices, normalized, no augmentation."""
    from kdprobe.data.datasets import normalize

    x_all, _ = data.split(split)
    return [normalize(x_all[i], data.mean, data.std) for i in probe_indices(len(x_all), runs, batch_size, seed)]
