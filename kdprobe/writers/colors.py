"""One colour per method across every figure of a study (HTML and static alike).

Okabe & Ito's colour-blind-safe palette, in the order the study lists its methods (the spec's [[methods]]),
so "scratch" is the same blue in the diversity strip, the calibration diagrams and the ensemble curves; a
figure drawn on its own (a probe command) colours its groups in the order they appear."""
from __future__ import annotations

PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#7F7F7F", "#000000")


def method_colors(names, base: dict | None = None) -> dict[str, str]:
    """{name: colour}: `base` first (a study's whole method list), then the other names in order, each the
    first palette colour not taken yet."""
    out = dict(base or {})
    for n in names:
        if n not in out:
            free = [c for c in PALETTE if c not in out.values()]
            out[n] = free[0] if free else PALETTE[len(out) % len(PALETTE)]
    return out


def study_colors(settings: dict) -> dict[str, str]:
    """The colours of a study's methods, from its resolved spec (settings['methods'] in spec order)."""
    return method_colors([m.get("name") for m in (settings or {}).get("methods", []) if isinstance(m, dict)])
