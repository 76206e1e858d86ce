"""Linear CKA between two models' features (Kornblith et al. 2019) over a whole split, with the
unbiased HSIC estimator (Song et al. 2012) as Nguyen, Raghu and Kornblith 2021 use it.

CKA(X, Y) = HSIC(X, Y) / sqrt(HSIC(X, X) HSIC(Y, Y)) with linear kernels K = X X^T, L = Y Y^T.
Unbiased HSIC on m samples, with K~, L~ the kernels with zeroed diagonals:
    HSIC_1 = [tr(K~L~) + 1'K~1 1'L~1 / ((m-1)(m-2)) - 2/(m-2) 1'K~L~1] / (m(m-3)).
Two estimators, neither builds an N x N matrix of the split:
- "minibatch" (Nguyen et al. 2021): HSIC_1 on the Gram matrices of each minibatch of m samples,
  summed over minibatches, CKA = sum HSIC_1(K, L) / sqrt(sum HSIC_1(K, K) sum HSIC_1(L, L)).
  Memory m x m per layer, any feature size. Each minibatch only uses its own pairs of samples,
  so the value depends (slightly) on the batch size and order: it is deterministic for a fixed
  --batch-size and the split's fixed order. A last batch of fewer than 4 samples (HSIC_1 needs
  m >= 4) is merged into the one before.
- "exact": HSIC_1 of the whole split at once (m = N), computed from feature-space sums
  (X^T Y, X^T X, column sums, sums of squared row norms), so the result does not depend on the
  batch size at all (tested). Memory p1 x p2 + p1^2 + p2^2 float64 per layer pair: the right
  choice for the penultimate layer (64 features for a CIFAR ResNet), not for a 16,384-wide
  feature map.
"auto" picks exact when the sums fit in EXACT_BUDGET entries, else minibatch; results say which.
`biased=True` gives the plain formula ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred
features (Kornblith's HSIC_0 form), exact estimator only.

Features come from forward hooks at named modules of any nn.Module (kdprobe.probes.features):
"name" is the module's output, "name:in" its (first) input; each is flattened per sample.
The default group layer is the input of the last nn.Linear (the penultimate representation).
"""
from __future__ import annotations

import math
from contextlib import closing
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from kdprobe.errors import KdprobeError
from kdprobe.probes.pairs import Member, PairRecord, pairs_of
from kdprobe.probes.features import default_layers, layer_features, modes_preserved, penultimate_layer
from kdprobe.probes.features import model_device as _device

ESTIMATORS = ("auto", "exact", "minibatch")
EXACT_BUDGET = 2 ** 25  # float64 entries of feature-space sums (256 MB) before auto switches to minibatch
MIN_BATCH = 4  # HSIC_1 divides by m(m-3)


def hsic1(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC (Song et al. 2012) of two m x m Gram matrices, m >= 4 (float64 scalar tensor)."""
    m = K.shape[0]
    if m < MIN_BATCH:
        raise KdprobeError(f"expected at least {MIN_BATCH} samples for the unbiased HSIC, got {m}")
    K = K.to(torch.float64).clone().fill_diagonal_(0.0)
    L = L.to(torch.float64).clone().fill_diagonal_(0.0)
    k1, l1 = K.sum(dim=1), L.sum(dim=1)
    trace = (K * L).sum()
    return (trace + k1.sum() * l1.sum() / ((m - 1) * (m - 2)) - 2.0 / (m - 2) * (k1 @ l1)) / (m * (m - 3))


class _LayerSums:
    """Feature-space sums of one layer's features X (n x p): what HSIC_1(K, .) needs from X alone."""

    def __init__(self, p: int, device):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.n, self.s, self.sa, self.saa, self.sax, self.xtx = 0, z(p), z(()), z(()), z(p), z(p, p)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        a = (x * x).sum(dim=1)  # squared row norms = the Gram matrix's diagonal
        self.n += x.shape[0]
        self.s += x.sum(dim=0)
        self.sa += a.sum()
        self.saa += (a * a).sum()
        self.sax += a @ x
        self.xtx += x.T @ x
        return a


class _PairSums:
    """Cross sums of two layers' features on the same samples."""

    def __init__(self, p1: int, p2: int, device):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.xty, self.sab, self.sbx, self.say = z(p1, p2), z(()), z(p1), z(p2)

    def update(self, x, y, a, b) -> None:
        self.xty += x.T @ y
        self.sab += (a * b).sum()
        self.sbx += b @ x
        self.say += a @ y


def _hsic_from_sums(n, sx, sy, sa, sb, sab, xty, sbx, say, biased: bool) -> float:
    """HSIC of the whole split from feature-space sums (linear kernels); unbiased HSIC_1 or the plain form."""
    if biased:  # ||centred X^T centred Y||_F^2 (the 1/(n-1)^2 factor cancels in CKA)
        c = xty - torch.outer(sx, sy) / n
        return float((c * c).sum())
    if n < MIN_BATCH:
        raise KdprobeError(f"expected at least {MIN_BATCH} samples for the unbiased HSIC, got {n}")
    trace = (xty * xty).sum() - sab  # sum over i != j of K_ij L_ij
    k1, l1 = sx @ sx - sa, sy @ sy - sb  # 1'K~1, 1'L~1
    kl = sx @ xty @ sy - sx @ sbx - sy @ say + sab  # 1'K~L~1
    return float((trace + k1 * l1 / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * kl) / (n * (n - 3)))


def _self_hsic(t: _LayerSums, biased: bool) -> float:
    return _hsic_from_sums(t.n, t.s, t.s, t.sa, t.sa, t.saa, t.xtx, t.sax, t.sax, biased)


def _cka(hxy: float, hxx: float, hyy: float) -> float:
    den = hxx * hyy
    if not den > 0:
        return math.nan  # a constant feature (or too few samples): CKA is undefined
    # HSIC_1 is an inner product of U-centred Gram matrices (Szekely & Rizzo 2014), so |CKA| <= 1 by
    # Cauchy-Schwarz; features are shifted before summing (see _shift), and what rounding leaves is clipped.
    return min(1.0, max(-1.0, hxy / math.sqrt(den)))


def _shift(x: torch.Tensor, ref: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x - ref, ref), ref = x's column means when not yet set. Linear-kernel HSIC (biased and unbiased) does not
    change when every sample's features move by one vector, but sums of raw products lose every digit to a large
    common offset (a logit offset of 1e4 gave CKA 1.0122): summing shifted features keeps them."""
    if ref is None:
        ref = x.mean(dim=0)
    return x - ref, ref


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Minibatch [start, end) ranges over n samples; a last batch under 4 samples joins the one before."""
    if batch_size < MIN_BATCH:
        raise KdprobeError(f"expected a CKA batch size of at least {MIN_BATCH} (the unbiased HSIC needs it), "
                           f"got {batch_size}")
    if n < MIN_BATCH:
        raise KdprobeError(f"expected at least {MIN_BATCH} samples for CKA, got {n}; raise --samples")
    bounds = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < MIN_BATCH:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def linear_cka(x: torch.Tensor, y: torch.Tensor, *, estimator: str = "exact", batch_size: int = 256,
               biased: bool = False) -> float:
    """Linear CKA of two in-memory feature matrices (n x p1, n x p2) with the chosen estimator."""
    x, y = x.reshape(x.shape[0], -1).to(torch.float64), y.reshape(y.shape[0], -1).to(torch.float64)
    if x.shape[0] != y.shape[0]:
        raise KdprobeError(f"expected features of the same samples, got {x.shape[0]} and {y.shape[0]} rows")
    acc = _Accumulator(["x"], ["y"], estimator, biased, {"x": x.shape[1], "y": y.shape[1]}, x.device)
    for lo, hi in batch_bounds(x.shape[0], batch_size if estimator == "minibatch" else max(x.shape[0], MIN_BATCH)):
        acc.update({"x": x[lo:hi]}, {"y": y[lo:hi]})
    return acc.matrix()[0][0]


class _Accumulator:
    """CKA of every (layer of A, layer of B) pair, fed batch by batch."""

    def __init__(self, layers_a, layers_b, estimator: str, biased: bool, dims: dict, device):
        if estimator not in ("exact", "minibatch"):
            raise KdprobeError(f"expected estimator exact or minibatch here, got {estimator!r}")
        if biased and estimator != "exact":
            raise KdprobeError("expected estimator exact for the biased (plain) CKA formula, got minibatch")
        self.la, self.lb, self.estimator, self.biased = list(layers_a), list(layers_b), estimator, biased
        self.shifts: dict = {}
        if estimator == "exact":
            self.sa = {k: _LayerSums(dims[k], device) for k in self.la}
            self.sb = {k: _LayerSums(dims[k], device) for k in self.lb}
            self.pairs = {(i, j): _PairSums(dims[i], dims[j], device) for i in self.la for j in self.lb}
        else:
            # on the features' device: summed there batch by batch, copied to the host once in matrix()
            self.hab = torch.zeros(len(self.la), len(self.lb), dtype=torch.float64, device=device)
            self.haa = torch.zeros(len(self.la), dtype=torch.float64, device=device)
            self.hbb = torch.zeros(len(self.lb), dtype=torch.float64, device=device)

    def update(self, fa: dict, fb: dict) -> None:
        """Add one batch of features (layer name -> (m, p) float64) of A and of B on the same samples."""
        fa = {k: self._center(("a", k), fa[k]) for k in self.la}
        fb = {k: self._center(("b", k), fb[k]) for k in self.lb}
        if self.estimator == "exact":
            a = {k: self.sa[k].update(fa[k]) for k in self.la}
            b = {k: self.sb[k].update(fb[k]) for k in self.lb}
            for (i, j), ps in self.pairs.items():
                ps.update(fa[i], fb[j], a[i], b[j])
            return
        ka = [fa[k] @ fa[k].T for k in self.la]
        kb = [fb[k] @ fb[k].T for k in self.lb]
        self.add_grams(ka, kb)

    def _center(self, key, x: torch.Tensor) -> torch.Tensor:
        """Exact: one shift per layer for the whole split (its first batch's means); minibatch: each batch its own."""
        if self.estimator == "minibatch":
            return _shift(x, None)[0]
        x, self.shifts[key] = _shift(x, self.shifts.get(key))
        return x

    def add_grams(self, ka: Sequence[torch.Tensor], kb: Sequence[torch.Tensor]) -> None:
        """Add one minibatch given as Gram matrices (minibatch estimator)."""
        # no host copy here (a GPU sync per layer pair and minibatch): the sums stay on the device
        dev = self.hab.device
        for i, K in enumerate(ka):
            K = K.to(dev)
            self.haa[i] += hsic1(K, K)
            for j, L in enumerate(kb):
                self.hab[i, j] += hsic1(K, L.to(dev))
        for j, L in enumerate(kb):
            L = L.to(dev)
            self.hbb[j] += hsic1(L, L)

    def matrix(self) -> list[list[float]]:
        """CKA[i][j] for layer i of A and layer j of B."""
        if self.estimator == "minibatch":
            hab, haa, hbb = (t.cpu().tolist() for t in (self.hab, self.haa, self.hbb))  # the one host copy
            return [[_cka(hab[i][j], haa[i], hbb[j]) for j in range(len(self.lb))] for i in range(len(self.la))]
        hxx = {k: _self_hsic(t, self.biased) for k, t in self.sa.items()}
        hyy = {k: _self_hsic(t, self.biased) for k, t in self.sb.items()}
        out = []
        for i in self.la:
            row = []
            for j in self.lb:
                ta, tb, ps = self.sa[i], self.sb[j], self.pairs[(i, j)]
                hxy = _hsic_from_sums(ta.n, ta.s, tb.s, ta.sa, tb.sa, ps.sab, ps.xty, ps.sbx, ps.say, self.biased)
                row.append(_cka(hxy, hxx[i], hyy[j]))
            out.append(row)
        return out


@dataclass(frozen=True)
class CkaMatrix:
    """CKA between every named layer of A and of B on the same N samples."""

    layers_a: tuple[str, ...]
    layers_b: tuple[str, ...]
    values: tuple[tuple[float, ...], ...]  # values[i][j]: layer i of A vs layer j of B
    estimator: str  # "exact" or "minibatch" (what "auto" resolved to)
    batch_size: int
    n: int


def resolve_estimator(estimator: str, dims_a: Sequence[int], dims_b: Sequence[int]) -> str:
    """'exact' or 'minibatch' for 'auto': exact when the feature-space sums fit in EXACT_BUDGET entries."""
    if estimator not in ESTIMATORS:
        raise KdprobeError(f"expected estimator one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    if estimator != "auto":
        return estimator
    need = sum(p * p for p in dims_a) + sum(p * p for p in dims_b) + sum(p * q for p in dims_a for q in dims_b)
    return "exact" if need <= EXACT_BUDGET else "minibatch"


def cka_matrix(model_a: nn.Module, model_b: nn.Module, inputs: torch.Tensor, *, layers_a: Sequence[str] | None = None,
               layers_b: Sequence[str] | None = None, estimator: str = "auto", batch_size: int = 256) -> CkaMatrix:
    """Linear CKA of every layer of A against every layer of B on `inputs` (float, normalized); one pass each."""
    la = list(layers_a or default_layers(model_a))
    lb = list(layers_b or default_layers(model_b))
    bounds = batch_bounds(len(inputs), batch_size)
    keys_b = [("b", k) for k in lb]  # A and B may use the same layer names
    dev = _device(model_a)
    acc, est = None, None
    with modes_preserved(model_a, model_b), closing(layer_features(model_a, inputs, la, bounds)) as fa_it, \
            closing(layer_features(model_b, inputs, lb, bounds)) as fb_it:  # A may be B: restore once, outside
        for fa, fb in zip(fa_it, fb_it):
            fb = {("b", k): fb[k].to(dev) for k in lb}
            if acc is None:  # the feature sizes are known from the first batch
                dims = {k: int(v.shape[1]) for k, v in {**fa, **fb}.items()}
                est = resolve_estimator(estimator, [dims[k] for k in la], [dims[k] for k in keys_b])
                acc = _Accumulator(la, keys_b, est, False, dims, dev)
            acc.update(fa, fb)
    vals = tuple(tuple(r) for r in acc.matrix())
    return CkaMatrix(tuple(la), tuple(lb), vals, est, int(batch_size), int(len(inputs)))


class CkaCache:
    """One layer's features of each checkpoint, taken in one forward pass each, for CKA of every pair.

    exact: the features themselves (N x p float32, CPU); minibatch: each minibatch's Gram matrix
    (float64, N x batch_size entries in all), so any feature size fits.
    """

    def __init__(self, inputs: torch.Tensor, *, estimator: str = "auto", batch_size: int = 256):
        if estimator not in ESTIMATORS:
            raise KdprobeError(f"expected estimator one of {', '.join(ESTIMATORS)}, got {estimator!r}")
        self.inputs, self.requested, self.batch_size = inputs, estimator, batch_size
        self.bounds = batch_bounds(len(inputs), batch_size)
        self.estimator: str | None = None  # fixed by the first checkpoint's feature size
        self.store: dict[str, object] = {}
        self.layers: dict[str, str] = {}
        self._self: dict[str, float | torch.Tensor] = {}
        self.forward_passes = 0

    def add(self, key: str, model: nn.Module, layer: str | None = None) -> None:
        """Record `model`'s features at `layer` (default: the penultimate layer) under key."""
        layer = layer or penultimate_layer(model)
        parts = []
        with closing(layer_features(model, self.inputs, [layer], self.bounds)) as it:
            for f in it:
                x = f[layer]
                if self.estimator is None:  # fixed by the first checkpoint's feature size
                    self.estimator = resolve_estimator(self.requested, [x.shape[1]], [x.shape[1]])
                if self.estimator == "minibatch":
                    x = _shift(x.to(torch.float64), None)[0]  # HSIC_1 is shift-invariant; the Gram keeps its digits
                parts.append(x.float().cpu() if self.estimator == "exact" else (x @ x.T).cpu())
        if self.estimator == "exact":
            self.store[key] = torch.cat(parts)
        else:
            self.store[key] = parts
            self._self[key] = sum(float(hsic1(K, K)) for K in parts)
        self.layers[key] = layer
        self.forward_passes += 1

    def cka(self, a: str, b: str) -> float:
        """Linear CKA between two recorded checkpoints."""
        if self.estimator == "exact":
            return linear_cka(self.store[a], self.store[b], estimator="exact")
        hab = sum(float(hsic1(K, L)) for K, L in zip(self.store[a], self.store[b]))
        return _cka(hab, self._self[a], self._self[b])


def pairwise_cka(members: Sequence[Member], cache: CkaCache) -> list[PairRecord]:
    """CKA of every pair of members from a CkaCache holding each member's features (keyed by path)."""
    missing = [m.path for m in members if m.path not in cache.store]
    if missing:
        raise KdprobeError(f"expected features of every member, missing {missing[0]}; add it to the cache first")
    return [PairRecord(a.path, b.path, a.group, b.group, kind, groups, {"cka": cache.cka(a.path, b.path)})
            for a, b, kind, groups in pairs_of(members)]
