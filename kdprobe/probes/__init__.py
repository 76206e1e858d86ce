"""Probes: `probe(model, data, *, options) -> result`; each leaves the model as it found it."""
from kdprobe.probes.diversity import (
    ScoreDetail,
    input_jacobian,
    jacobian_score,
    jacobian_score_details,
    jacobian_scores,
    probe_indices,
)
from kdprobe.probes.landscape import (
    Directions,
    LineResult,
    SurfaceResult,
    compute_surface,
    interpolate,
    make_directions,
    parse_grid,
)

__all__ = [
    "Directions",
    "LineResult",
    "SurfaceResult",
    "compute_surface",
    "interpolate",
    "make_directions",
    "parse_grid",
    "ScoreDetail",
    "input_jacobian",
    "jacobian_score",
    "jacobian_score_details",
    "jacobian_scores",
    "probe_indices",
]
