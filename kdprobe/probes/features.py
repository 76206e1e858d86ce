"""Features of named layers of any nn.Module, taken with forward hooks, for representation probes (CKA)
and for feature KD (`FeatureTap`, `feature_layer`).

A layer is named as in `dict(model.named_modules())`: "name" is the module's output, "name:in"
its first positional input (e.g. "fc:in", the penultimate representation of a CIFAR ResNet).
For probes, features are flattened per sample and returned in float64; the model runs in eval
mode without gradients; its train/eval flags are restored and the hooks removed afterwards.
A FeatureTap keeps the map itself, with its gradient, for a training loss.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from kdprobe.errors import KdprobeError
from kdprobe.runtime.precision import fp32_exact


def _module(model: nn.Module, spec: str) -> tuple[nn.Module, bool]:
    name, _, where = spec.partition(":")
    if where not in ("", "in"):
        raise KdprobeError(f"expected a layer as NAME or NAME:in, got {spec!r}")
    mods = dict(model.named_modules())
    if name not in mods:
        some = ", ".join(n for n in list(mods)[1:13] if n)
        raise KdprobeError(f"expected a module name of the model, got {name!r}; names include {some}, ...")
    return mods[name], where == "in"


def penultimate_layer(model: nn.Module) -> str:
    """'NAME:in' for the last nn.Linear of the model (its input is the penultimate representation)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise KdprobeError("expected an nn.Linear classifier to take the penultimate layer from, got none; "
                           "name the layer (--layer NAME or NAME:in)")
    return f"{linears[-1]}:in"


def default_layers(model: nn.Module) -> list[str]:
    """Blocks of every top-level nn.Sequential (its ReLUs if it holds plain layers), then the penultimate and logits."""
    out = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential):
            kids = list(child.named_children())
            if any(len(list(k.children())) for _, k in kids):
                out += [f"{name}.{k}" for k, _ in kids]
            else:
                relus = [f"{name}.{k}" for k, m in kids if isinstance(m, nn.ReLU)]
                out += relus or [f"{name}.{k}" for k, _ in kids]
    pen = penultimate_layer(model)
    return out + [pen, pen.split(":")[0]]


class _Hooks:
    """Forward hooks that record flattened float64 features of the named layers for one forward pass."""

    def __init__(self, model: nn.Module, layers: Sequence[str]):
        self.model, self.layers, self.out, self.handles = model, list(layers), {}, []
        for spec in self.layers:
            mod, on_input = _module(model, spec)
            if on_input:
                self.handles.append(mod.register_forward_pre_hook(self._grab(spec, True)))
            else:
                self.handles.append(mod.register_forward_hook(self._grab(spec, False)))

    def _grab(self, spec: str, on_input: bool):
        def hook(mod, args, output=None):
            t = args[0] if on_input else output
            t = t[0] if isinstance(t, (tuple, list)) else t
            self.out[spec] = t.detach().reshape(t.shape[0], -1).to(torch.float64)
        return hook if not on_input else (lambda mod, args: hook(mod, args))

    def run(self, x: torch.Tensor) -> dict:
        self.out = {}
        # entered and left per batch: a suspended generator must not leak no_grad or the TF32 switches
        with torch.no_grad(), fp32_exact():
            self.model(x)
        missing = [s for s in self.layers if s not in self.out]
        if missing:
            raise KdprobeError(f"expected layer {missing[0]} to run in the forward pass, got no call; pick another layer")
        return self.out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model without tensors."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextmanager
def modes_preserved(*models: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag on exit (the same model may be passed twice)."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        yield
    finally:
        for m, flag in reversed(modes):
            m.training = flag


def hooked_forward(model: nn.Module, x: torch.Tensor, handles) -> None:
    """Run model(x) once in eval mode (every module's train/eval flag restored after) so the hooks behind
    `handles` see it, then remove those hooks, also when the forward fails."""
    try:
        with modes_preserved(model):
            model.eval()
            model(x)
    finally:
        for h in handles:
            h.remove()


def layer_features(model: nn.Module, inputs: torch.Tensor, layers: Sequence[str], bounds) -> Iterator[dict]:
    """Per minibatch, {layer: (m, p) float64 features} of `model` (eval mode, no grad, restored after)."""
    hooks = _Hooks(model, layers)
    dev = model_device(model)
    try:
        with modes_preserved(model):
            model.eval()
            for lo, hi in bounds:
                yield hooks.run(inputs[lo:hi].to(dev))
    finally:
        hooks.close()


class NormalizedImages:
    """uint8 images (N, C, H, W) normalized slice by slice when indexed (the whole split never exists in float)."""

    def __init__(self, images: torch.Tensor, mean, std):
        self.images, self.mean, self.std = images, mean, std

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index) -> torch.Tensor:
        from kdprobe.data.datasets import normalize

        return normalize(self.images[index], self.mean, self.std)


class FeatureTap:
    """The output (or, for 'NAME:in', the first input) of one module in the latest forward pass, gradient kept.

    A module that runs several times per forward (a shared ReLU) leaves its last call's tensor."""

    def __init__(self, model: nn.Module, spec: str):
        self.spec, self.value = spec, None
        mod, on_input = _module(model, spec)
        if on_input:
            self.handle = mod.register_forward_pre_hook(lambda m, args: self._keep(args[0]))
        else:
            self.handle = mod.register_forward_hook(lambda m, args, out: self._keep(out))

    def _keep(self, t) -> None:
        self.value = t[0] if isinstance(t, (tuple, list)) else t

    def take(self) -> torch.Tensor:
        """The tensor the layer produced in the latest forward pass (then forgotten)."""
        v, self.value = self.value, None
        if not isinstance(v, torch.Tensor):
            raise KdprobeError(f"expected layer {self.spec} to run in the forward pass and give a tensor, got "
                               f"{type(v).__name__}; pick another --feature-layer")
        return v

    def close(self) -> None:
        self.handle.remove()


_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)


@torch.no_grad()
def traced_feature_layer(model: nn.Module, x: torch.Tensor) -> str:
    """The rule for models that name no feature layer: the module whose output is the last map (N, C, H, W)
    produced before the final nn.Linear runs, pooling modules (nn.AdaptiveAvgPool2d, ...) skipped; of nested
    modules that finish with the same tensor, the outermost (e.g. `layer4`, not `layer4.1.relu`)."""
    seen: list[tuple[str, object]] = []  # (name, "linear" or a 4-D tensor), in the order modules finish
    names = {m: n for n, m in model.named_modules() if n}

    def hook(m, args, out):
        if isinstance(m, nn.Linear):
            seen.append((names[m], "linear"))
        elif isinstance(out, torch.Tensor) and out.dim() == 4 and not isinstance(m, _POOLS):
            seen.append((names[m], out))

    handles = [m.register_forward_hook(hook) for m in names]
    hooked_forward(model, x, handles)
    last_linear = max((i for i, (_, v) in enumerate(seen) if isinstance(v, str)), default=len(seen))
    maps = [name for name, v in seen[:last_linear] if not isinstance(v, str)]
    if not maps:
        raise KdprobeError(f"{(getattr(model, 'arch', None) or {}).get('name', type(model).__name__)} has no module "
                           "that outputs a (N, C, H, W) map before its classifier; pass --feature-layer NAME "
                           "(or NAME:in for a module's input)")
    return maps[-1]


def feature_layer(model: nn.Module, x: torch.Tensor, given: str | None = None) -> str:
    """The layer feature KD taps: `given`, else `model.feature_layer` (every kdprobe and zoo model sets it;
    torchvision models per family), else traced_feature_layer's rule on the probe batch x."""
    if given:
        _module(model, given)  # one-line error for an unknown name
        return given
    own = getattr(model, "feature_layer", None)
    if isinstance(own, str) and own in dict(model.named_modules()):
        return own
    return traced_feature_layer(model, x)
