"""kdprobe: train and probe image-classifier checkpoints (KD, pruning, augmentation)."""
from kdprobe.version import __version__

from kdprobe.errors import KdprobeError
from kdprobe.models import create_model, list_models

__all__ = ["KdprobeError", "create_model", "list_models", "__version__"]
