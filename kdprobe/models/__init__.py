"""Model registry and architectures. Importing this package registers every model."""
from kdprobe.models.registry import canonical_name, create_model, list_models, model_aliases, register_model
from kdprobe.models import resnet  # noqa: F401  (registers resnets)

for _mod in ("vgg", "densenet", "pyramidnet"):
    try:
        __import__(f"kdprobe.models.{_mod}")
    except ModuleNotFoundError as _e:  # architectures land one module at a time
        if _e.name != f"kdprobe.models.{_mod}":
            raise

__all__ = ["create_model", "list_models", "register_model", "canonical_name", "model_aliases"]
