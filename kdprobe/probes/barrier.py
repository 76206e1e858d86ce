"""Barrier along a linear path between two checkpoints (Frankle et al. 2020, linear mode connectivity).

barrier = max over t in [0, 1] of loss(t) - ((1 - t) loss(A) + t loss(B)), from a
kdprobe.probes.landscape.LineResult (what `kdprobe interpolate` computes). The end points
are the path's points at t = 0 and t = 1 (both must be on the grid); points outside [0, 1]
(extrapolation) are ignored. The value is >= 0 (t = 0 counts); near zero means A and B lie
in one basin. The error barrier is the same on the error rate (1 - accuracy, a fraction like
every accuracy in kdprobe: 0.05 = 5 points), Frankle et al.'s own measure. How BN was handled on the path (`bn` of the line:
"eval" = interpolated running statistics, "recompute" = re-estimated at every t, the fair
choice for a barrier) is carried along, so a table can state it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdprobe.errors import KdprobeError

_ON_GRID = 1e-9  # how close a coordinate must be to 0 or 1 to count as the end point


@dataclass(frozen=True)
class Barrier:
    """Height and location of the barrier on one path, and what it was measured with."""

    loss_barrier: float  # max over t of loss(t) minus the straight line between the end losses
    t_loss: float  # where the maximum is
    error_barrier: float  # the same for the error rate (1 - accuracy), a fraction
    t_error: float
    loss_a: float
    loss_b: float
    points: int  # path points in [0, 1]
    bn: str  # "eval" or "recompute"
    num_samples: int


def _end(coords: np.ndarray, t: float) -> int:
    i = int(np.argmin(np.abs(coords - t)))
    if abs(coords[i] - t) > _ON_GRID:
        raise KdprobeError(f"expected the path to include t = {t:g}, got nearest t = {coords[i]:g}; choose --range "
                           "and --steps so that 0 and 1 are grid points (e.g. 0:1, or -0.5:1.5 with 81 steps)")
    return i


def _height(coords: np.ndarray, values: np.ndarray, ia: int, ib: int) -> tuple[float, float]:
    inside = (coords >= -_ON_GRID) & (coords <= 1 + _ON_GRID)
    t, v = coords[inside], values[inside]
    gap = v - ((1 - t) * values[ia] + t * values[ib])
    k = int(np.argmax(gap))
    return max(float(gap[k]), 0.0), float(t[k])


def barrier(line) -> Barrier:
    """Loss and error barrier of a finished LineResult (its coords must include 0 and 1)."""
    coords = np.asarray(line.coords, np.float64)
    if not np.all(np.asarray(line.done, bool)):
        raise KdprobeError(f"expected a finished path, got {int(np.sum(~np.asarray(line.done, bool)))} points not "
                           "evaluated; run the interpolation to the end first")
    loss, err = np.asarray(line.loss, np.float64), 1.0 - np.asarray(line.acc, np.float64)
    if not (np.all(np.isfinite(loss)) and np.all(np.isfinite(err))):
        raise KdprobeError("expected finite losses along the path, got nan/inf; check the checkpoints")
    ia, ib = _end(coords, 0.0), _end(coords, 1.0)
    lb, tl = _height(coords, loss, ia, ib)
    eb, te = _height(coords, err, ia, ib)
    points = int(np.sum((coords >= -_ON_GRID) & (coords <= 1 + _ON_GRID)))
    return Barrier(lb, tl, eb, te, float(loss[ia]), float(loss[ib]), points, str(line.bn), int(line.num_samples))
