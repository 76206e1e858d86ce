"""Features of named layers of any nn.Module, taken with forward hooks, for representation probes (CKA).

A layer is named as in `dict(model.named_modules())`: "name" is the module's output, "name:in"
its first positional input (e.g. "fc:in", the penultimate representation of a CIFAR ResNet).
Features are flattened per sample and returned in float64. The model runs in eval mode
without gradients; its train/eval flags are restored and the hooks removed afterwards.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from kdprobe.errors import KdprobeError


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
        with torch.no_grad():  # entered and left per batch: a suspended generator must not leak no_grad
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
        from kdprobe.data import normalize

        return normalize(self.images[index], self.mean, self.std)
