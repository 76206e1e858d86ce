"""Valid ranges of numeric settings, declared once and checked wherever a value enters
(CLI flags at parse time, TrainConfig, study and pipeline specs, model kwargs), and the one
parser of user-given JSON and TOML (option values, specs, summaries) with its size limits."""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass

from kdprobe.errors import KdprobeError

INT64_MAX = 2**63 - 1  # seeds: what HDF5, numpy and JSON readers all hold exactly
FLOAT32_MAX = 3.4028234663852886e38  # the largest factor a float32 weight or gradient can be multiplied by


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
SEED = Range(int, 0, INT64_MAX)  # every seed: what torch, numpy, HDF5 and JSON readers all hold exactly
CONFIDENCE = Range(float, 0, 1, low_open=True, high_open=True)  # a level of 1 has an infinite quantile
MAX_BATCH = 2**20  # samples per forward pass: a million images is far beyond any device's memory

# The options of the probe commands (agreement, calibration, cka, sharpness, diversity, landscape) and of
# the study spec's probe tables, declared once: the CLI checks them at parse time, the spec when it is read.
# Upper bounds follow from what the option means, so a typo (1e9 for 1e3) is refused before any work.
PROBE_RANGES: dict[str, Range] = {
    "samples": Range(int, 0, 10**9),       # first N examples of a split; 0 = all (N beyond the split = all)
    "batch_size": Range(int, 1, MAX_BATCH),
    "confidence": CONFIDENCE,
    "seed": SEED,
    "alpha": Range(float, 0, 1, low_open=True, high_open=True),  # level of a test
    "bins": Range(int, 1, 10_000),         # ECE confidence bins (Guo et al.: 15)
    "max_subsets": Range(int, 1, 100_000),  # ensemble subsets drawn per size k
    "top_k": Range(int, 1, 1_000),         # Hessian eigenvalues by deflated power iteration; also <= parameters
    "iterations": Range(int, 1, 10_000),   # power-iteration steps per eigenvalue (PyHessian: 100)
    "tol": Range(float, 0),                # relative change that stops the power iteration; 0 = never early
    "trace_samples": Range(int, 1, 100_000),  # Hutchinson vectors
    "lanczos_steps": Range(int, 1, 10_000),  # per density run; also <= parameters
    "density_runs": Range(int, 1, 1_000),
    "vectors_per_pass": Range(int, 1, 10_000),
    "runs": Range(int, 1, 10_000),         # diversity: probe batches per checkpoint
    "k": POSITIVE,                         # diversity v1: regulariser added to each eigenvalue
    "zmax": Range(float, 0, low_open=True, optional=True),  # loss value the plotted height is clipped at
    "points_per_batch": Range(int, 1, 65_536, optional=True),  # landscape grid points per forward pass
    "steps": Range(int, 2, 1_000_000),     # interpolate: t values on the path
    "save_every": Range(float, 0),         # seconds between partial saves
    # ends of a landscape grid / interpolation range, in multiples of a filter-normalized direction or of
    # B - A (Li et al. plot [-1, 1]); far beyond, the perturbed weights overflow float32
    "extent": Range(float, -1e4, 1e4),
}


def check_extent(text: str, what: str) -> None:
    """The min and max of a 'min:max[:num]' range within PROBE_RANGES['extent'] (a malformed text is left to
    the grid parser, which says how to write it)."""
    try:
        ends = [float(p) for p in str(text).split(":")[:2]]
    except ValueError:
        return
    rng = PROBE_RANGES["extent"]
    bad = [v for v in ends if math.isfinite(v) and not rng.ok(v)]
    if bad:
        raise KdprobeError(f"expected the ends of {what} to be {rng.describe()}, got {bad[0]:g}; the plane and path "
                           "are measured in multiples of the direction (Li et al.: -1:1)")

# ---- user-given JSON and TOML: one parser path, limits checked before any recursion ----
# Real configs nest a few levels and write numbers of at most ~20 digits (float64 round-trips in 17,
# int64 holds 19). Text beyond these limits is refused up front: Python's JSON and TOML readers recurse
# once per level (30,000 '[' raise RecursionError) and refuse ints over 4,300 digits with a bare ValueError.
MAX_NESTING = 32   # levels of [ ] and { } (and of TOML dotted keys / table headers)
MAX_DIGITS = 100   # digits in one number literal
_MAX_INT_BITS = 333  # ~100 decimal digits: also catches TOML hex/octal/binary literals
_JSON_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]|[0-9]{%d,}' % (MAX_DIGITS + 1))
_KEY_PART = r'(?:[A-Za-z0-9_-]+|"[^"\n]*"|\'[^\'\n]*\')'
_TOML_TOKENS = re.compile(r'(?P<dotted>%s(?:[ \t]*\.[ \t]*%s){%d,})' % (_KEY_PART, _KEY_PART, MAX_NESTING)
                          + r'|"""(?:[^\\]|\\.)*?"""|\'\'\'[\s\S]*?\'\'\'|"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'|#[^\n]*'
                          r'|[\[\]{}]|[0-9][0-9_]{%d,}' % MAX_DIGITS)


def abbreviate(text: str, limit: int = 60) -> str:
    """A user's text for an error message: long inputs are cut, so the message stays one readable line."""
    text = " ".join(str(text).split())
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text):,} characters)"


def check_text(text: str, what: str, *, toml: bool = False) -> None:
    """Refuse JSON/TOML text nested deeper than MAX_NESTING or holding a number of more than MAX_DIGITS
    digits, by one linear scan that skips strings (and TOML comments) and never recurses."""
    depth = 0
    for m in (_TOML_TOKENS if toml else _JSON_TOKENS).finditer(text):
        tok = m.group()
        if m.lastgroup == "dotted":  # a.b.c... = 1 or [a.b.c...]: one level per part (tomllib is quadratic in them)
            raise KdprobeError(f"{what}: expected keys of at most {MAX_NESTING} dotted parts, got more (at character "
                               f"{m.start():,}); name a key of the spec")
        if tok == "[" or tok == "{":
            depth += 1
            if depth > MAX_NESTING:
                raise KdprobeError(f"{what}: expected at most {MAX_NESTING} levels of nested [ ] or {{ }}, got more "
                                   f"(at character {m.start():,}); flatten the value")
        elif tok == "]" or tok == "}":
            depth = max(0, depth - 1)
        elif tok[0].isdigit() or tok[0] == "_":
            raise KdprobeError(f"{what}: expected numbers of at most {MAX_DIGITS} digits, got one of "
                               f"{len(tok):,}; write it with an exponent (1.5e30) or fix the value")


def check_tree(value, what: str, *, finite: bool = True):
    """`value` (parsed JSON/TOML) if no container nests deeper than MAX_NESTING, no int is absurdly large and,
    with `finite`, every float is finite; checked without recursion, errors name the place (a.b[2])."""
    stack = [(value, "", 1)]
    while stack:
        v, where, depth = stack.pop()
        place = f" at key {where}" if where else ""
        if isinstance(v, (dict, list)):
            if depth > MAX_NESTING:
                raise KdprobeError(f"{what}: expected at most {MAX_NESTING} levels of nested tables or lists, got "
                                   f"more{place[:80]}; flatten the value")
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, child in items:
                sub = f"{where}[{k}]" if isinstance(v, list) else (f"{where}.{k}" if where else str(k))
                stack.append((child, sub, depth + 1))
        elif isinstance(v, bool):
            continue
        elif isinstance(v, int) and v.bit_length() > _MAX_INT_BITS:
            raise KdprobeError(f"{what}: expected numbers of at most {MAX_DIGITS} digits, got a {v.bit_length():,}-bit "
                               f"integer{place}; fix the value")
        elif finite and isinstance(v, float) and not math.isfinite(v):
            raise KdprobeError(f"{what}: expected a finite number{place}, got {v!r} (nan, inf or beyond the float "
                               "range of about 1.8e308); write a finite number")
    return value


def parse_json(text: str, what: str, *, finite: bool = True):
    """JSON given by a user (an option's value, a file's text): limits first, then json.loads; every
    problem is a one-line KdprobeError naming `what`. `finite=False` keeps NaN/Infinity (e.g. summaries)."""
    import json

    check_text(text, what)

    def constant(name):
        if finite:
            raise KdprobeError(f"{what}: expected finite numbers, got {name}; write a finite number")
        return float(name)

    try:
        value = json.loads(text, parse_constant=constant)
    except KdprobeError:
        raise
    except json.JSONDecodeError as e:
        raise KdprobeError(f"{what}: expected valid JSON, got {abbreviate(text)} ({e.msg} at line {e.lineno} column "
                           f"{e.colno})") from None
    except (ValueError, RecursionError) as e:  # belt and braces: check_text should have caught these
        raise KdprobeError(f"{what}: expected valid JSON, got {abbreviate(text)} ({type(e).__name__})") from None
    return check_tree(value, what, finite=finite)


def parse_toml(text: str, what: str) -> dict:
    """A TOML document given by a user (a study spec): limits first, then tomllib; one-line KdprobeErrors."""
    import tomllib

    check_text(text, what, toml=True)
    try:
        tree = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise KdprobeError(f"{what}: expected valid TOML, got a syntax error: {e}; fix the file") from None
    except (ValueError, RecursionError) as e:
        raise KdprobeError(f"{what}: expected valid TOML, got {type(e).__name__}; fix the file") from None
    return check_tree(tree, what)
