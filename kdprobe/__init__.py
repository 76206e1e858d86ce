"""kdprobe: train and probe image-classifier checkpoints: what did distillation, pruning or augmentation do?

    import kdprobe
    ck = kdprobe.load("runs/kd.pt")                      # any supported checkpoint, model in eval mode
    r = kdprobe.agreement(["runs/scratch*.pt", "runs/kd*.pt"])
    r.to_frame()                                          # pandas; r.to_dict() is the CLI's --json
    r.save("agreement.html")                              # or .json / .csv; r.figure() is the plotly figure

Every probe takes paths, globs, `kdprobe.Checkpoint` objects or plain `torch.nn.Module`s (with dataset=),
fits the data to each model and returns a result with .to_dict(), .to_frame(), .save(path) and
.figure(). The CLI (`kdprobe --help`) calls these same functions. The names below load on first use, so
`import kdprobe` stays quick."""
from __future__ import annotations

import importlib

from kdprobe.version import __version__
from kdprobe.errors import KdprobeError
from kdprobe.models import create_model, list_models

# public name -> the module that defines it (imported on first use)
_API = {
    "load": "kdprobe.api.loading", "load_dataset": "kdprobe.api.loading", "Checkpoint": "kdprobe.api.loading",
    "Dataset": "kdprobe.api.loading",
    "ProbeResult": "kdprobe.api.results", "info": "kdprobe.api.info", "CheckpointInfo": "kdprobe.api.info",
    "agreement": "kdprobe.api.probes", "ensembles": "kdprobe.api.probes", "cka": "kdprobe.api.probes",
    "calibration": "kdprobe.api.probes", "sharpness": "kdprobe.api.probes",
    "landscape": "kdprobe.api.landscape", "interpolate": "kdprobe.api.landscape",
    "LandscapeResult": "kdprobe.api.landscape", "InterpolationResult": "kdprobe.api.landscape",
    "diversity": "kdprobe.api.diversity", "surplus": "kdprobe.api.diversity", "evaluate": "kdprobe.api.diversity",
    "DiversityResult": "kdprobe.api.diversity", "SurplusResult": "kdprobe.api.diversity",
    "EvaluationResult": "kdprobe.api.diversity",
    "train": "kdprobe.api.training", "train_config": "kdprobe.api.training",
    "train_config_toml": "kdprobe.api.training", "prune": "kdprobe.api.training", "study": "kdprobe.api.training",
    "TrainResult": "kdprobe.api.training", "PruneResult": "kdprobe.api.training",
    "StudyResult": "kdprobe.api.training",
    "pipeline": "kdprobe.api.pipeline", "PipelineResult": "kdprobe.api.pipeline",
}

__all__ = ["KdprobeError", "create_model", "list_models", "__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # once loaded, a plain attribute
        return value
    raise AttributeError(f"module 'kdprobe' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
