"""The ensemble-perspective probes of a study spec: [agreement], [ensembles], [calibration], [cka], [sharpness].

Each table switches its probe on (a missing table, or `enabled = false`, switches it off) and
takes the conventions of `kdprobe diversity` plus the probe's own options, with the defaults of
the matching command (`kdprobe agreement|calibration|cka|sharpness --help`):

    split       "test" (sharpness: "train")   the split probed, never augmented
    samples     0 (sharpness: 1024)           the first N examples of the split; 0 = all of it
    methods     every method                  which methods' cells are probed (all their seeds)
    reference   "scratch"                     group (and 'within' pair type) tested against; "none"
    confidence  0.99, interval "t"            intervals as everywhere in kdprobe
    seed        0                             every random draw of the probe
    alpha       0.05                          level of the ensemble-reading verdict (Holm-adjusted p)
    enabled     true

Parsing is pure, like the rest of the spec: every mistake is a KdprobeError naming the TOML key.
"""
from __future__ import annotations

from dataclasses import dataclass

from kdprobe.studies.keys import _Keys, _name_list

PROBES = ("agreement", "ensembles", "calibration", "cka", "sharpness")
_COMMON = {"enabled": True, "split": "test", "samples": 0, "methods": None, "reference": "scratch",
           "confidence": 0.99, "interval": "t", "seed": 0, "alpha": 0.05}
_OWN = {
    "agreement": {"bins": 15, "batch_size": 500},
    "ensembles": {"bins": 15, "max_subsets": 100, "batch_size": 500},
    "calibration": {"bins": 15, "adaptive": False, "classwise": False, "temperature": False, "batch_size": 500},
    "cka": {"layer": None, "estimator": "auto", "batch_size": 256},
    "sharpness": {"split": "train", "samples": 1024, "top_k": 1, "iterations": 100, "tol": 1e-3,
                  "trace_samples": 100, "density": False, "lanczos_steps": 80, "density_runs": 1, "bn": "eval",
                  "batch_size": 128, "vectors_per_pass": 25, "hvp": "reuse"},
}


@dataclass(frozen=True)
class ProbeSpec:
    """One switched-on probe of a study: the shared conventions and the probe's own options."""

    name: str  # agreement | ensembles | calibration | cka | sharpness
    split: str
    samples: int
    methods: tuple[str, ...]
    reference: str | None
    confidence: float
    interval: str
    seed: int
    alpha: float
    options: dict  # the probe's own options (bins, max_subsets, top_k, ...), every one filled in

    def settings(self) -> dict:
        """Everything as a flat JSON-ready dict (what the report's settings show)."""
        return {"split": self.split, "samples": self.samples, "methods": list(self.methods),
                "reference": self.reference, "confidence": self.confidence, "interval": self.interval,
                "seed": self.seed, "alpha": self.alpha, **self.options}


def _checks():
    """(kind, check, want) of every option; imported lazily so parsing a spec stays cheap. Numbers use the
    ranges the matching CLI options declare (kdprobe.ranges.PROBE_RANGES), so both refuse the same values."""
    from kdprobe.probes.cka import ESTIMATORS, MIN_BATCH
    from kdprobe.probes.sharpness import BN_MODES, HVP_MODES
    from kdprobe.ranges import MAX_BATCH, PROBE_RANGES, Range

    def num(rng):
        return rng.kind, rng.ok, rng.describe()

    flag = (bool, None, "true or false")
    return {
        **{k: num(PROBE_RANGES[k]) for k in ("bins", "max_subsets", "top_k", "iterations", "trace_samples",
                                              "lanczos_steps", "density_runs", "vectors_per_pass", "batch_size",
                                              "tol", "samples", "confidence", "seed", "alpha")},
        "adaptive": flag, "classwise": flag, "temperature": flag, "density": flag,
        "layer": (str, lambda v: bool(v.strip()), "a module name as in model.named_modules() (NAME:in = its input)"),
        "estimator": (str, lambda v: v in ESTIMATORS, f"one of {', '.join(ESTIMATORS)}"),
        "bn": (str, lambda v: v in BN_MODES, f"one of {', '.join(BN_MODES)}"),
        "hvp": (str, lambda v: v in HVP_MODES, f"one of {', '.join(HVP_MODES)}"),
        "cka_batch_size": num(Range(int, MIN_BATCH, MAX_BATCH)),
    }


def parse_probe(src: str, name: str, table, names: tuple[str, ...]) -> ProbeSpec | None:
    """One probe table of a spec (None when `enabled = false`)."""
    from kdprobe.stats import INTERVALS

    defaults = {**_COMMON, **_OWN[name]}
    r = _Keys(src, name, table, tuple(defaults))
    if not r.get("enabled", bool, True):
        return None
    ref = r.get("reference", str, defaults["reference"])
    ref = None if ref.lower() == "none" else ref
    methods = _name_list(r, "methods", names)
    if ref is not None and ref not in methods:
        r.fail("reference", f"one of the probed methods ({', '.join(methods)}) or 'none'", ref)
    checks = _checks()
    options = {}
    for k, default in _OWN[name].items():
        if k in _COMMON:
            continue
        kind, check, want = checks["cka_batch_size" if (name, k) == ("cka", "batch_size") else k]
        options[k] = r.get(k, kind, default, check=check, want=want)
    shared = {k: r.get(k, checks[k][0], defaults[k], check=checks[k][1], want=checks[k][2])
              for k in ("samples", "confidence", "seed", "alpha")}
    return ProbeSpec(
        name, r.get("split", str, defaults["split"], choices=("train", "test")), shared["samples"], methods, ref,
        shared["confidence"], r.get("interval", str, defaults["interval"], choices=INTERVALS), shared["seed"],
        shared["alpha"], options)


def parse_probes(src: str, tree: dict, names: tuple[str, ...]) -> dict[str, ProbeSpec]:
    """The switched-on probes of a resolved TOML tree, in PROBES order."""
    from kdprobe.errors import KdprobeError

    present = [p for p in PROBES if p in tree]
    if present and not names:
        raise KdprobeError(f"{src}: methods: expected [[methods]] for the {present[0]} probe, got none")
    out = {}
    for p in present:
        spec = parse_probe(src, p, tree[p], names)
        if spec is not None:
            out[p] = spec
    return out
