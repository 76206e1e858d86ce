"""Model registry and architectures. Importing this package registers every model."""
from kdprobe.models import densenet, pyramidnet, resnet, vgg  # noqa: F401  (importing registers them)
from kdprobe.models import repdistiller  # noqa: F401,E402  (after resnet: it aliases resnetXb)
from kdprobe.models import infer  # noqa: F401,E402  (kwargs rules for foreign files of our families)
from kdprobe.models.registry import canonical_name, create_model, list_models, model_aliases, register_model

from kdprobe.models import python_source, rnp, torchvision_source  # noqa: F401,E402  (sources)

__all__ = ["create_model", "list_models", "register_model", "canonical_name", "model_aliases"]
