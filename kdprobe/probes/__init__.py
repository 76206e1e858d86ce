"""Probes: `probe(model, data, *, options) -> result`; each leaves the model as it found it."""
from kdprobe.probes.agreement import Agreement, agreement, pairwise_agreement
from kdprobe.probes.barrier import Barrier, barrier
from kdprobe.probes.calibration import CalibrationResult, calibration, fit_temperature
from kdprobe.probes.cka import CkaCache, CkaMatrix, cka_matrix, linear_cka, pairwise_cka
from kdprobe.probes.diversity import (
    ScoreDetail,
    input_jacobian,
    jacobian_score,
    jacobian_score_details,
    jacobian_scores,
    probe_indices,
)
from kdprobe.probes.ensemble import GroupEnsemble, compare_gains, ensemble_log_probs, group_ensemble
from kdprobe.probes.landscape import (
    Directions,
    LineResult,
    SurfaceResult,
    compute_surface,
    interpolate,
    make_directions,
    parse_grid,
)
from kdprobe.probes.predictions import LogitCache, Logits, model_logits
from kdprobe.probes.sharpness import HessianOperator, SharpnessResult, sharpness

__all__ = [
    "Agreement",
    "Barrier",
    "CalibrationResult",
    "CkaCache",
    "CkaMatrix",
    "GroupEnsemble",
    "HessianOperator",
    "LogitCache",
    "Logits",
    "SharpnessResult",
    "agreement",
    "barrier",
    "calibration",
    "cka_matrix",
    "compare_gains",
    "ensemble_log_probs",
    "fit_temperature",
    "group_ensemble",
    "linear_cka",
    "model_logits",
    "pairwise_agreement",
    "pairwise_cka",
    "sharpness",
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
