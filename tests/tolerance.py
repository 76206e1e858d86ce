"""Tolerances that follow from the dtype and the size of a computation, not from the CPU a test was written on.

Two evaluations of one formula that add in different orders (another batch size, ATen's vector width
under ATEN_CPU_CAPABILITY=default/avx2/avx512, an MKL or oneDNN kernel, 1 or 2 threads) differ by
rounding only. The standard bound (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed.,
eq. 3.5 and section 4.2): a sum or dot product of n terms, added in any order, is off by at most
gamma_{n-1} * sum|terms|, gamma_n = n u / (1 - n u), u = eps / 2 the unit roundoff; two evaluations
therefore differ by at most twice that. Through a network, the layers' first-order relative errors
add up. These are worst-case bounds (rounding errors typically grow like sqrt(n) u, not n u), so a
test that uses them passes on any CPU and any thread count, yet they stay orders of magnitude below
what a real bug changes (a wrong weight, a dropped or doubled batch, a wrong statistic move these
tests' numbers by 1e-3 relative or more): every helper here returns a number, and tests assert that
number is small where it matters.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn


def unit_roundoff(dtype: torch.dtype = torch.float32) -> float:
    """u = eps / 2: the largest relative error of one rounding (2**-24 for float32, 2**-53 for float64)."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of n successive roundings."""
    nu = max(n, 0) * unit_roundoff(dtype)
    if nu >= 0.5:
        raise ValueError(f"expected n u < 0.5 for a meaningful bound, got n={n} in {dtype}")
    return nu / (1 - nu)


def sum_rtol(n: int, dtype: torch.dtype = torch.float64) -> float:
    """Bound on |a - b| / sum|terms| for two evaluation orders of a sum (or dot product) of n terms."""
    return 2 * gamma(max(n - 1, 1), dtype)


#: lambda of the probabilistic bound: each length-n dot product stays within ~lambda sqrt(n) u with probability at
#: least 1 - 2n exp(-lambda^2 (1 - u)^2 / 2) (Higham & Mary, SIAM J. Sci. Comput. 41(5), 2019, section 2: inner
#: products), i.e. 1 - 5e-18 n for lambda = 9
LAMBDA = 9.0


def gamma_prob(n: int, dtype: torch.dtype = torch.float32, lam: float = LAMBDA) -> float:
    """Higham & Mary's probabilistic gamma~_n(lambda) = exp(lambda sqrt(n) u + n u^2 / (1 - u)) - 1 ~ lambda sqrt(n) u:
    the bound rounding errors keep when they are independent and of mean zero (true of round-to-nearest in
    practice), far tighter than gamma_n for long reductions (4,608-long dot products: 3.6e-5 vs 2.7e-4 in float32)."""
    u = unit_roundoff(dtype)
    return math.expm1(lam * math.sqrt(max(n, 0)) * u + max(n, 0) * u * u / (1 - u))


def chain_rtol(lengths, dtype: torch.dtype = torch.float32, *, probabilistic: bool = False) -> float:
    """Two evaluations of a chain of reductions of the given lengths (a network's layers): first-order relative
    difference bound 2 * sum_l gamma_{k_l} (each layer's error is passed on, to first order unchanged, and adds);
    probabilistic=True uses gamma~ (for deep networks, where the worst case is too loose to test anything)."""
    g = gamma_prob if probabilistic else gamma
    return 2 * sum(g(k, dtype) for k in lengths)


def reduction_lengths(model: nn.Module, x: torch.Tensor) -> list[int]:
    """The roundings one forward pass on x stacks up, per leaf module that runs: a conv / linear its fan-in plus
    the bias and a residual add; a normalization 4 (subtract, divide by sqrt(var + eps), scale, shift); any other leaf 2 (an
    activation, a residual add done in the parent) plus the number of inputs it averages (pooling: input
    elements per output element, measured). Runs on a copy, so the model's BN statistics and mode are untouched."""
    m = copy.deepcopy(model).eval()
    out: list[int] = []

    def hook(mod, args, res):
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            out.append(mod.weight[0].numel() + 2)  # + bias, + a residual add after it (if any)
        elif isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
            out.append(4)
        elif torch.is_tensor(res) and args and torch.is_tensor(args[0]):
            out.append(2 + max(1, args[0].numel() // max(res.numel(), 1)))
        else:
            out.append(2)

    handles = [mod.register_forward_hook(hook) for mod in m.modules() if next(mod.children(), None) is None]
    try:
        with torch.no_grad():
            m(x.to(next(m.parameters()).dtype))
    finally:
        for h in handles:
            h.remove()
    if x.dim() > 2:  # functional pooling (F.avg_pool2d, .mean) is no module: it averages at most a whole input map
        out.append(int(torch.tensor(x.shape[2:]).prod()))
    return out


def network_rtol(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None = None, *,
                 probabilistic: bool = False) -> float:
    """Relative difference bound of two evaluations of `model` on x in its own dtype (first order)."""
    if dtype is None:
        dtype = next(model.parameters()).dtype
    return chain_rtol(reduction_lengths(model, x), dtype, probabilistic=probabilistic)


def cross_entropy_atol(model: nn.Module, x: torch.Tensor, logits: torch.Tensor, *,
                       probabilistic: bool = False) -> float:
    """Absolute bound on the difference of two evaluations of the mean cross-entropy of `model` on a batch.

    The loss is logsumexp(z) - z_y: a difference of logits, so its rounding error scales with the logits'
    magnitude, not with the loss (a loss of 3e4 from logits of 1e5 or a loss of 0.01 from logits of 20 alike).
    logsumexp is 1-Lipschitz in the max-norm, so |d loss_i| <= 2 max|d z| <= 2 * network_rtol * max|z|; the
    softmax's own C-term sum and the mean over N samples add gamma_C and gamma_N of the loss.
    """
    z = float(logits.detach().abs().max())
    n, c = logits.shape[0], logits.shape[-1]
    dtype = logits.dtype
    loss_scale = z + 1.0  # |loss_i| <= 2 max|z| + log C; the +1 keeps a bound for all-zero logits
    net = network_rtol(model, x, dtype, probabilistic=probabilistic)
    return 2 * net * z + 2 * (gamma(c + 2, dtype) + gamma(n, dtype)) * 2 * loss_scale
