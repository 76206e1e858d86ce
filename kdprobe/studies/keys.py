"""Reading a study spec's TOML tables: every key checked, every error naming its table and key."""
from __future__ import annotations

from kdprobe.errors import KdprobeError
from kdprobe.ranges import Range


class _Keys:
    """Reads one TOML table, remembering its dotted path for error messages."""

    doc = "the spec"  # what the messages tell the user to fix (a subclass reading another kind of file renames it)

    def __init__(self, src: str, path: str, table, allowed):
        if not isinstance(table, dict):
            raise KdprobeError(f"{src}: {path}: expected a table, got {type(table).__name__}; write [{path}]")
        unknown = sorted(set(table) - set(allowed))
        if unknown:
            raise KdprobeError(f"{src}: {path + '.' if path else ''}{unknown[0]}: unknown key; expected one of "
                               f"{', '.join(allowed)}")
        self.src, self.path, self.t = src, path, table

    def key(self, k: str) -> str:
        return f"{self.path}.{k}" if self.path else k

    def fail(self, k: str, want: str, got) -> None:
        raise KdprobeError(f"{self.src}: {self.key(k)}: expected {want}, got {got!r}; fix {self.doc}")

    def ranged(self, k: str, rng: Range, default):
        """A number of the spec checked against one declared Range (kdprobe.ranges), named by its key."""
        return self.get(k, rng.kind, default, check=rng.ok, want=rng.describe())

    def get(self, k: str, kind, default=None, *, required=False, choices=None, check=None, want=None):
        if k not in self.t:
            if required:
                raise KdprobeError(f"{self.src}: {self.key(k)}: missing; add it to {self.doc}")
            return default
        v = self.t[k]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(v, kinds) and not (isinstance(v, bool) and bool not in kinds)
        if float in kinds and isinstance(v, int) and not isinstance(v, bool):
            v, ok = float(v), True
        if not ok:
            self.fail(k, want or " or ".join(t.__name__ for t in kinds), v)
        if choices is not None and v not in choices:
            self.fail(k, f"one of {', '.join(map(str, choices))}", v)
        if check is not None and not check(v):
            self.fail(k, want or "a valid value", v)
        return v


def _name_list(r: _Keys, k: str, known: tuple[str, ...]) -> tuple[str, ...]:
    v = r.get(k, list, None, want="a list of method names")
    if v is None:
        return known
    bad = [m for m in v if m not in known]
    if not v or bad:
        r.fail(k, f"a non-empty list of method names from {', '.join(known)}", bad or v)
    return tuple(v)
