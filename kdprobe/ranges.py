"""Valid ranges of numeric settings, declared once and checked wherever a value enters
(CLI flags at parse time, TrainConfig, study and pipeline specs, model kwargs)."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from kdprobe.errors import KdprobeError

INT64_MAX = 2**63 - 1  # seeds: what HDF5, numpy and JSON readers all hold exactly


def _fmt(v) -> str:
    return "2**63-1" if v == INT64_MAX else f"{v:g}" if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class Range:
    """A number of one type within bounds; float values must also be finite (no nan, no inf)."""

    kind: type = float          # int or float (an int is accepted where a float is expected)
    low: float | None = None
    high: float | None = None
    low_open: bool = False      # True: value > low; False: value >= low
    high_open: bool = False     # True: value < high; False: value <= high
    optional: bool = False      # None allowed (means "not set")

    def describe(self) -> str:
        """'an integer >= 1', 'a finite number > 0 and <= 1', ..."""
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {_fmt(self.low)}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {_fmt(self.high)}")
        what = "an integer" if self.kind is int else "a finite number"
        return " ".join([what, " and ".join(parts)]).strip()

    def ok(self, value) -> bool:
        """True when `value` is in range."""
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.kind is int else numbers.Real):
            return False
        if self.kind is float and not math.isfinite(value):
            return False
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def check(self, value, name: str):
        """`value` if in range, else a one-line KdprobeError naming `name` and the range."""
        if not self.ok(value):
            raise KdprobeError(f"expected {name} to be {self.describe()}, got {value!r}")
        return value


POSITIVE = Range(float, 0, low_open=True)
