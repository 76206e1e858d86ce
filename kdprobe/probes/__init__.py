"""Probes: `probe(model, data, *, options) -> result`; each leaves the model as it found it."""
from kdprobe.probes.diversity import (
    ScoreDetail,
    input_jacobian,
    jacobian_score,
    jacobian_score_details,
    jacobian_scores,
    probe_indices,
)

__all__ = [
    "ScoreDetail",
    "input_jacobian",
    "jacobian_score",
    "jacobian_score_details",
    "jacobian_scores",
    "probe_indices",
]
