"""`torchvision:NAME`: every torchvision classification builder, with weights only from the user's file.

`torchvision:resnet18` is `torchvision.models.get_model("resnet18", weights=None,
num_classes=...)`: torchvision's own module, so its state_dict keys are torchvision's and a
`torch.save(model.state_dict())` of a torchvision model loads as is. Nothing is ever
downloaded (`weights` is always None; a `weights` kwarg is refused). Extra keyword arguments
go to the builder (e.g. {"dropout": 0.3}, {"image_size": 32} for a ViT); they must be
JSON-able to be recorded in a checkpoint.

Two adaptations, both outside the state_dict: googlenet / inception_v3 return torchvision's
(logits, aux...) tuple in train mode; here forward returns the main logits in every mode, so
kdprobe's losses apply (the auxiliary heads keep their weights, and get no gradient). And
regnets compute their block widths with torch ops that cannot run on the meta device, so on
meta that one step runs on the CPU (auto-detection builds candidates on meta).

`feature_layer` names the module whose output feeds the global pool / head, per family (a
layer spec as kdprobe.probes.features reads it: `NAME`, or `NAME:in` for a module's input); a
ViT's is its encoder's token sequence, which feature KD refuses (it needs an (N, C, H, W) map).
"""
from __future__ import annotations

import difflib
import math
import threading
from contextlib import contextmanager
from functools import lru_cache

import torch
import torch.nn as nn

from kdprobe.errors import KdprobeError
from kdprobe.models.registry import Source, register_source

# family (name prefix) -> (feature_layer, classifier weight key whose dim 0 is num_classes)
FAMILIES: dict[str, tuple[str, str]] = {
    "alexnet": ("features", "classifier.6.weight"),
    "convnext": ("features", "classifier.2.weight"),
    "densenet": ("features", "classifier.weight"),
    "efficientnet": ("features", "classifier.1.weight"),
    "googlenet": ("inception5b", "fc.weight"),
    "inception": ("Mixed_7c", "fc.weight"),
    "maxvit": ("classifier:in", "classifier.5.weight"),  # blocks is a ModuleList: the last block's output
    "mnasnet": ("layers", "classifier.1.weight"),
    "mobilenet_v2": ("features", "classifier.1.weight"),
    "mobilenet_v3": ("features", "classifier.3.weight"),
    "regnet": ("trunk_output", "fc.weight"),
    "resnet": ("layer4", "fc.weight"),
    "resnext": ("layer4", "fc.weight"),
    "wide_resnet": ("layer4", "fc.weight"),
    "shufflenet": ("conv5", "fc.weight"),
    "squeezenet": ("features", "classifier.1.weight"),  # a 1x1 conv: dim 0 is still the classes
    "swin": ("permute", "head.weight"),  # swin keeps channels last until `permute` makes them (N, C, H, W)
    "vgg": ("features", "classifier.6.weight"),
    "vit": ("encoder", "heads.head.weight"),  # tokens (N, 1 + L, D), no spatial map
}
AUX_KEYS = {"googlenet": "aux1.fc2.weight", "inception_v3": "AuxLogits.fc.weight"}  # present iff aux_logits


@lru_cache(maxsize=1)
def builders() -> tuple[str, ...]:
    """Names of torchvision's classification builders (torchvision.models, not detection etc.)."""
    import torchvision.models as tvm

    return tuple(tvm.list_models(module=tvm))


def family(name: str) -> str:
    """The FAMILIES key of a builder name (longest matching prefix)."""
    hits = [f for f in FAMILIES if name.startswith(f)]
    if not hits:
        raise KdprobeError(f"torchvision:{name} has no feature-layer rule; add its family to FAMILIES")
    return max(hits, key=len)


def _canonical(rest: str) -> str:
    name = rest.strip().lower()
    if name not in builders():
        close = difflib.get_close_matches(name, builders(), n=3)
        hint = f"did you mean {', '.join('torchvision:' + c for c in close)}? " if close else ""
        raise KdprobeError(f"unknown torchvision model {rest!r}; {hint}see `kdprobe models` for the "
                           f"{len(builders())} builders")
    return name


_META_LOCK = threading.Lock()


@contextmanager
def _regnet_params_on_cpu():
    """On the meta device, let RegNet's BlockParams (which reads tensor values) run on the CPU."""
    from torchvision.models import regnet

    original = regnet.BlockParams.__dict__["from_init_params"]

    def on_cpu(cls, *args, **kwargs):
        with torch.device("cpu"):
            return original.__func__(cls, *args, **kwargs)

    with _META_LOCK:
        regnet.BlockParams.from_init_params = classmethod(on_cpu)
        try:
            yield
        finally:
            regnet.BlockParams.from_init_params = original


def _main_logits(x, *aux):
    """eager_outputs of googlenet / inception_v3 in every mode: the main logits only."""
    return x


def _build(name: str, num_classes: int, kwargs: dict) -> nn.Module:
    import torchvision.models as tvm

    if name in AUX_KEYS:  # torchvision's effective default, passed so it does not warn each build
        kwargs.setdefault("init_weights", True)
    if name.startswith("regnet") and torch.get_default_device().type == "meta":
        with _regnet_params_on_cpu():
            return tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    return tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def _resolve(name: str):
    def factory(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> nn.Module:
        if in_channels != 3:
            raise KdprobeError(f"torchvision:{name} takes 3-channel images, got in_channels={in_channels}; "
                               "use a 3-channel dataset or one of kdprobe's own models (`kdprobe models`)")
        bad = sorted(k for k in kwargs if k.startswith("weights"))
        if bad:
            raise KdprobeError(f"torchvision:{name} never downloads weights, got {bad[0]}=...; the weights come "
                               "from your checkpoint file (torch.save(model.state_dict(), PATH))")
        try:
            model = _build(name, num_classes, dict(kwargs))
        except (TypeError, ValueError) as e:  # an argument the builder rejects
            raise KdprobeError(f"torchvision:{name} rejected the arguments {sorted(kwargs)}: {e}") from None
        if name in AUX_KEYS:
            model.eager_outputs = _main_logits
        model.feature_layer = FAMILIES[family(name)][0]
        return model

    factory.__doc__ = f"torchvision.models.{name}(weights=None, num_classes=...)."
    return factory


def _infer(name: str, sd: dict) -> dict | None:
    """num_classes off the classifier; aux heads, a ViT's image size; None if the classifier key is missing."""
    w = sd.get(FAMILIES[family(name)][1])
    if not isinstance(w, torch.Tensor) or w.dim() < 2:
        return None
    kw = {"num_classes": int(w.shape[0])}
    if name in AUX_KEYS and AUX_KEYS[name] not in sd:
        kw["aux_logits"] = False
    pos, proj = sd.get("encoder.pos_embedding"), sd.get("conv_proj.weight")
    if family(name) == "vit" and isinstance(pos, torch.Tensor) and isinstance(proj, torch.Tensor):
        side = math.isqrt(int(pos.shape[1]) - 1)  # patches per side: L = side^2, plus the class token
        if side * side == int(pos.shape[1]) - 1 and side * int(proj.shape[-1]) != 224:
            kw["image_size"] = side * int(proj.shape[-1])
    return kw


register_source(Source(prefix="torchvision", resolve=_resolve, canonical=_canonical, names=lambda: list(builders()),
                       infer=_infer, detectable=lambda: list(builders()), usage="torchvision:NAME"))
