"""Loss landscapes: Li et al. 2018 ("Visualizing the Loss Landscape of Neural Nets")
2-D surfaces around a checkpoint, and 1-D linear paths between two checkpoints.

Surface: loss and accuracy at theta + x*d1 + y*d2 on a grid, d1 and d2 Gaussian random
directions, filter-normalized: each filter (output channel of a conv, row of a linear
layer) of a direction is rescaled to the norm of the same filter of the weights; 1-D
parameters (biases, BN scale and shift) get a zero direction unless include_bn, in
which case the whole 1-D tensor counts as one filter. BN running statistics are not
perturbed (they are buffers, not parameters): bn="eval" uses the checkpoint's,
bn="recompute" re-estimates them at every point on the evaluation samples.
Array convention (as in Li et al.'s HDF5 files): value[i, j] is at (x_j, y_i).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from kdprobe.errors import KdprobeError
from kdprobe.runtime.machine import available_memory
from kdprobe.probes.distributed import broadcast_array, rank_world, run_points
from kdprobe.probes.landscape_eval import PointEvaluator, default_chunking, free_memory, plan_chunks

_EPS = 1e-10  # guards 0/0 when a direction filter is all zeros (Li et al. use the same)
# Two directions closer than this (|cosine| over all entries) span a line, not a plane. Independent
# Gaussian directions of n entries have |cosine| of order 1/sqrt(n) (about 0.01 at 10^4 parameters).
MAX_COSINE = 0.99
# Host memory per grid point, with margin. Measured (tracemalloc, a 400x400 grid): the result arrays
# with their resume/progress copies take 58 B, the VTK writer 80 B more (HDF5: 1 B), and the HTML
# writer, which builds plotly's Python lists and JSON text, 740 B more.
BYTES_PER_POINT = 200
BYTES_PER_POINT_HTML = 1000


def parse_grid(spec: str, num: int | None = None) -> np.ndarray:
    """'min:max:num' (or 'min:max' with `num`) -> np.linspace(min, max, num), float64."""
    parts = str(spec).strip().split(":")
    want = "min:max:num (e.g. -1:1:51)" if num is None else "min:max (e.g. 0:1)"
    try:
        if num is None and len(parts) == 3:
            lo, hi, n = float(parts[0]), float(parts[1]), int(parts[2])
        elif num is not None and len(parts) == 2:
            lo, hi, n = float(parts[0]), float(parts[1]), int(num)
        else:
            raise ValueError
    except ValueError:
        raise KdprobeError(f"expected a range {want}, got {spec!r}; write it like the example") from None
    if not (np.isfinite(lo) and np.isfinite(hi)) or n < 1 or (n > 1 and not lo < hi) or (n == 1 and lo != hi):
        raise KdprobeError(f"expected finite min < max and num >= 2 (or min == max with num 1), "
                           f"got {spec!r} with num {n}; fix the range")
    check_grid_memory(n, what=f"range {spec!r}" + (f" with {n} steps" if num is not None else ""))
    return np.linspace(lo, hi, n)


@dataclass(frozen=True, eq=False)
class Directions:
    """Two directions in parameter space, each parameter name -> CPU float32 tensor."""
    x: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]
    seed: int | None
    include_bn: bool

    def fingerprint(self) -> str:
        """sha256 over names, shapes and values: equal fingerprints mean the same plane."""
        h = hashlib.sha256()
        for tag, d in (("x", self.x), ("y", self.y)):
            for name in sorted(d):
                t = d[name].detach().to("cpu", torch.float32).contiguous()
                h.update(f"{tag}/{name}/{tuple(t.shape)};".encode())
                h.update(t.numpy().tobytes())
        return h.hexdigest()


def filter_normalize(d: torch.Tensor, w: torch.Tensor, include_bn: bool = False) -> torch.Tensor:
    """Scale every filter of `d` (slice along dim 0) to the norm of the same filter of `w`."""
    if d.dim() <= 1:  # bias / BN: zero, or the whole vector as one filter
        return d * (w.norm() / (d.norm() + _EPS)) if include_bn else torch.zeros_like(d)
    dn, wn = d.flatten(1).norm(dim=1), w.flatten(1).norm(dim=1)
    return d * (wn / (dn + _EPS)).view(-1, *([1] * (d.dim() - 1)))


def make_directions(model: nn.Module, *, seed: int = 0, include_bn: bool = False) -> Directions:
    """Two seeded Gaussian, filter-normalized directions for `model`'s parameters."""
    # CPU generator: the same seed gives the same plane on every device and rank; every
    # parameter draws numbers whether or not it is zeroed, so include_bn changes only 1-D entries
    g = torch.Generator().manual_seed(int(seed))
    params = [(n, p.detach().to("cpu", torch.float32)) for n, p in model.named_parameters()]
    out = []
    for _ in range(2):
        out.append({n: filter_normalize(torch.randn(w.shape, generator=g), w, include_bn) for n, w in params})
    return Directions(out[0], out[1], int(seed), include_bn)


def check_directions(model: nn.Module, directions: Directions) -> None:
    """Raise KdprobeError unless the two directions span a plane of the model's parameter space:
    exactly the model's parameter names and shapes, floating point, finite, neither zero, and not
    parallel (|cosine| <= MAX_COSINE over all entries)."""
    want = {n: tuple(p.shape) for n, p in model.named_parameters()}
    norms = {}
    for tag, d in (("x", directions.x), ("y", directions.y)):
        got = {n: tuple(t.shape) for n, t in d.items()}
        if got != want:
            bad = sorted(set(want) ^ set(got)) or sorted(n for n in want if want[n] != got[n])
            detail = ", ".join(f"{n} (model {want.get(n)}, directions {got.get(n)})" for n in bad[:3])
            raise KdprobeError(f"expected {tag}-direction names/shapes to match the model's parameters, "
                               f"got differences at {detail}; use directions saved for this architecture")
        bad_dtype = next((n for n, t in d.items() if not t.is_floating_point()), None)
        if bad_dtype is not None:  # an integer direction has lost its values (rounded to whole numbers)
            raise KdprobeError(f"expected floating-point directions, got {tag}-direction {bad_dtype} as "
                               f"{d[bad_dtype].dtype}; use directions written by kdprobe landscape")
        bad_value = next((n for n, t in d.items() if not bool(torch.isfinite(t).all())), None)
        if bad_value is not None:
            raise KdprobeError(f"expected finite directions, got NaN or inf in {tag}-direction {bad_value}; "
                               "every grid point would be NaN: use other directions")
        norms[tag] = math.sqrt(sum(float(t.double().pow(2).sum()) for t in d.values()))
        if norms[tag] == 0.0:
            raise KdprobeError(f"expected two non-zero directions, got a {tag}-direction that is zero everywhere "
                               "(the surface would be constant along it); use other directions")
    dot = sum(float((directions.x[n].double() * directions.y[n].double()).sum()) for n in want)
    cos = dot / (norms["x"] * norms["y"])
    if abs(cos) > MAX_COSINE:
        raise KdprobeError(f"expected two independent directions, got x and y with cosine {cos:.6f} (|cosine| > "
                           f"{MAX_COSINE}: they span a line, not a plane); use directions drawn independently")


def grid_memory_bytes(n_points: int, html: bool = False) -> int:
    """About how much host memory a surface or path of n_points needs (arrays, copies, file writers)."""
    return int(n_points) * (BYTES_PER_POINT + (BYTES_PER_POINT_HTML if html else 0))


def check_grid_memory(n_points: int, *, html: bool = False, what: str = "grid") -> None:
    """Refuse, before allocating, a grid whose arrays would not fit into the available memory."""
    need, have = grid_memory_bytes(n_points, html), available_memory()
    if have is not None and need > have:
        raise KdprobeError(f"a {what} of {n_points:,} points needs about {_gb(need)} of memory ({BYTES_PER_POINT}"
                           f"{f' + {BYTES_PER_POINT_HTML} for --html' if html else ''} bytes per point), more than "
                           f"the {_gb(have)} available; use fewer points")


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n < 2**40 else f"{n / 2**40:.1f} TiB"


@dataclass(frozen=True, eq=False)
class SurfaceResult:
    """A (possibly partial) loss surface: arrays of shape (ny, nx), [i, j] at (x_j, y_i)."""
    xcoords: np.ndarray
    ycoords: np.ndarray
    loss: np.ndarray  # mean cross-entropy, nan where not done
    acc: np.ndarray  # accuracy (a fraction, 0-1), nan where not done
    done: np.ndarray  # bool
    directions: Directions
    bn: str
    precision: str
    num_samples: int

    @property
    def complete(self) -> bool:
        """True when every grid point has been evaluated."""
        return bool(self.done.all())


@dataclass(frozen=True, eq=False)
class LineResult:
    """Loss along (1-t)*A + t*B: arrays of shape (n,) at t = coords."""
    coords: np.ndarray
    loss: np.ndarray
    acc: np.ndarray
    done: np.ndarray
    bn: str
    precision: str
    num_samples: int


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _run(n_points: int, done: np.ndarray, loss: np.ndarray, acc: np.ndarray, evaluate,
         points_per_batch: int, snapshot: Callable[[], object], progress) -> None:
    """Fill loss/acc/done (flat views) for every point not yet done, rank-split."""
    todo = [int(i) for i in np.flatnonzero(~done)]

    def on_round(idx, lo, ac):
        loss[idx], acc[idx], done[idx] = lo, ac, True
        if progress is not None:
            progress(snapshot())

    run_points(todo, evaluate, points_per_batch, on_round)


def compute_surface(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, xcoords, ycoords,
                    directions: Directions, bn: str = "eval", precision: str = "fp32",
                    points_per_batch: int | None = None, batch_size: int | None = None,
                    resume: SurfaceResult | None = None,
                    progress: Callable[[SurfaceResult], None] | None = None) -> SurfaceResult:
    """Loss/accuracy of `model` at theta + x*d1 + y*d2 over the grid xcoords x ycoords.

    x, y: the evaluation inputs (float, normalized) and int labels, moved once to the
    model's device. resume: a partial result (same grid and directions) whose done
    points are kept. progress(partial) is called after every round of chunks (on every
    rank; raise in it to stop). Under an initialized torch.distributed process group
    the points are split across ranks and every rank returns the full result.
    """
    xc, yc = np.asarray(xcoords, np.float64), np.asarray(ycoords, np.float64)
    if xc.ndim != 1 or yc.ndim != 1 or xc.size == 0 or yc.size == 0:
        raise KdprobeError(f"expected non-empty 1-D coordinate arrays, got shapes {xc.shape}, {yc.shape}")
    check_grid_memory(xc.size * yc.size)
    check_directions(model, directions)
    ev = PointEvaluator(model, x, y, bn=bn, precision=precision, batch_size=batch_size)
    P = _points_per_batch(points_per_batch, ev)
    ny, nx = yc.size, xc.size
    state = np.stack([np.full((ny, nx), np.nan), np.full((ny, nx), np.nan), np.zeros((ny, nx))])
    if resume is not None:
        if (resume.loss.shape != (ny, nx) or not np.array_equal(resume.xcoords, xc)
                or not np.array_equal(resume.ycoords, yc)
                or resume.directions.fingerprint() != directions.fingerprint()):
            raise KdprobeError("expected a partial result on the same grid and directions to resume, "
                               "got a different one; start a fresh surface")
        state = np.stack([resume.loss, resume.acc, resume.done.astype(np.float64)])
    state = broadcast_array(state)  # ranks agree on what is left to do
    loss, acc, done = state[0].copy(), state[1].copy(), state[2] > 0.5

    dev = ev.device
    theta = {n: t.detach() for n, t in _state(model).items()}
    dx = {n: t.to(dev, theta[n].dtype) for n, t in directions.x.items()}
    dy = {n: t.to(dev, theta[n].dtype) for n, t in directions.y.items()}
    cx, cy = torch.as_tensor(xc, device=dev), torch.as_tensor(yc, device=dev)

    def evaluate(idx: list[int]):
        flat = torch.as_tensor(idx, device=dev)
        a, b = cx[flat % nx], cy[flat // nx]
        stacked = {}
        for n, w in theta.items():
            if n in dx:
                s = (len(idx),) + (1,) * w.dim()
                stacked[n] = w + a.to(w.dtype).view(s) * dx[n] + b.to(w.dtype).view(s) * dy[n]
            else:  # buffers (BN running statistics) are not perturbed
                stacked[n] = w.unsqueeze(0).expand(len(idx), *w.shape)
        return ev(stacked)

    def snapshot():
        return SurfaceResult(xc, yc, loss.copy(), acc.copy(), done.copy(), directions, bn, ev.precision,
                             int(ev.x.shape[0]))

    _run(ny * nx, done.reshape(-1), loss.reshape(-1), acc.reshape(-1), evaluate, P, snapshot, progress)
    return snapshot()


def _points_per_batch(p: int | None, ev: PointEvaluator) -> int:
    if p is None and rank_world()[1] > 1:  # every rank must use one figure (run_points pads to it)
        p = default_chunking(ev.device)[0]
    elif p is None:  # the device's default, fewer where one sample at that many points would not fit in memory
        p, _ = plan_chunks(free_memory(ev.device), ev.per_sample_bytes, default_chunking(ev.device)[0], 1,
                           point_bytes=ev.point_bytes)
    p = int(p)
    if p < 1:
        raise KdprobeError(f"expected points_per_batch >= 1, got {p}; pass a positive number")
    return p


def interpolate(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor, y: torch.Tensor, ts, *,
                bn: str = "eval", precision: str = "fp32", points_per_batch: int | None = None,
                batch_size: int | None = None,
                progress: Callable[[LineResult], None] | None = None) -> LineResult:
    """Loss/accuracy along (1-t)*A + t*B for t in ts; BN running statistics are interpolated too."""
    ts = np.asarray(ts, np.float64)
    if ts.ndim != 1 or ts.size == 0:
        raise KdprobeError(f"expected a non-empty 1-D array of t values, got shape {ts.shape}")
    check_grid_memory(ts.size, what="path")
    sa, sb = _state(model_a), _state(model_b)
    shapes_a = {n: tuple(t.shape) for n, t in sa.items()}
    if shapes_a != {n: tuple(t.shape) for n, t in sb.items()}:
        bad = sorted(set(sa) ^ set(sb)) or sorted(n for n in sa if sa[n].shape != sb[n].shape)
        raise KdprobeError(f"expected two checkpoints of the same architecture, got differences at "
                           f"{', '.join(bad[:3])}; interpolate between checkpoints of one model")
    ev = PointEvaluator(model_a, x, y, bn=bn, precision=precision, batch_size=batch_size)
    P = _points_per_batch(points_per_batch, ev)
    A = {n: t.detach() for n, t in sa.items()}
    B = {n: sb[n].detach().to(ev.device) for n in sa}
    ct = torch.as_tensor(ts, device=ev.device)
    loss, acc, done = np.full(ts.size, np.nan), np.full(ts.size, np.nan), np.zeros(ts.size, bool)

    def evaluate(idx: list[int]):
        t = ct[torch.as_tensor(idx, device=ev.device)]
        stacked = {}
        for n, a in A.items():
            if a.is_floating_point():  # (1-t)A + tB is exactly A at t=0 and B at t=1
                s = t.to(a.dtype).view((len(idx),) + (1,) * a.dim())
                stacked[n] = (1 - s) * a + s * B[n]
            else:  # integer buffers (num_batches_tracked): keep A's
                stacked[n] = a.unsqueeze(0).expand(len(idx), *a.shape)
        return ev(stacked)

    def snapshot():
        return LineResult(ts, loss.copy(), acc.copy(), done.copy(), bn, ev.precision, int(ev.x.shape[0]))

    _run(ts.size, done, loss, acc, evaluate, P, snapshot, progress)
    return snapshot()

