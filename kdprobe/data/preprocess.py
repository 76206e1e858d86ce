"""Inputs that fit the model: the image size a model takes, and how a batch is brought to it.

Datasets stay on the device at their stored size (50,000 CIFAR images resized to 224 px would
be 7.5 GB of uint8); images are resized per batch, on the device, only where a model needs it:

* Evaluation and every probe: an input hook on the model (`fit_input`) takes each batch the
  model receives, resizes its shorter side to int(S / 0.875) (256 for S = 224; bilinear,
  antialiased) and keeps the central S x S crop: the usual ImageNet evaluation recipe. A batch
  that already is S x S passes unchanged (data stored at the model's size is not zoomed).
* Training (`random_resized_crop_flip`): RandomResizedCrop(S, scale 0.08-1, ratio 3/4-4/3)
  and a horizontal flip per image, the usual ImageNet training recipe, drawn from the run's
  seeded generator; bilinear without antialiasing (the same as torchvision's for enlarging
  crops such as CIFAR -> 224; it aliases slightly where a crop is shrunk), rounded to uint8.

The image size S of a model (`image_size_for`), first rule that applies:
  1. the command's --image-size (N, or `native` = the data's own size, no resizing);
  2. what its kdprobe checkpoint records (`meta["image_size"]`; null = native);
  3. a checkpoint of an older kdprobe (it records `input_shape` but no image size): native;
  4. otherwise (a foreign file, a new model) the family default: torchvision models 224
     (inception_v3 299, a ViT its own `image_size`); kdprobe, repdistiller, rnp and python
     models native (their CIFAR recipe).

Normalization: a model is fed the dataset's per-channel mean/std, unless its checkpoint records
other statistics (`meta["normalization"]`): the input hook then re-normalizes each batch to
them (x * std_data + mean_data - mean_model) / std_model, so a model sees what it was trained on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdprobe.errors import KdprobeError

EVAL_CROP = 0.875  # ImageNet evaluation: resize to S / 0.875, center-crop S (256 -> 224)
RRC_SCALE = (0.08, 1.0)  # RandomResizedCrop area fraction
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # and aspect ratio (torchvision's defaults)
RRC_ATTEMPTS = 10  # tries before falling back to a central crop, as torchvision
EVAL_RULE = "shorter side to int(S/0.875), bilinear antialiased, center crop SxS (SxS batches pass unchanged)"
TRAIN_RULE = "RandomResizedCrop(S, scale 0.08-1, ratio 3/4-4/3) + horizontal flip, bilinear, uint8"


# Largest image side accepted from a flag or a file: 4x a 1024-px input. One 3 x 4096 x 4096 image is
# 200 MB as float32 before any layer; a side from a file beyond this is damage or an attack, not a model.
MAX_SIDE = 4096


def parse_image_size(text: str | int | None) -> int | None:
    """--image-size: None (not given), 0 for 'native', or a side 1 <= N <= MAX_SIDE in pixels."""
    if text is None:
        return None
    t = str(text).strip().lower()
    if t == "native":
        return 0
    if not t.isdigit() or len(t) > 9 or not 1 <= int(t) <= MAX_SIDE:
        raise KdprobeError(f"expected --image-size as a side in pixels from 1 to {MAX_SIDE} (e.g. 224) or 'native', "
                           f"got {text!r}")
    return int(t)


def family_image_size(model: nn.Module) -> int | None:
    """The image size a freshly built model of this family takes (None = the data's own size)."""
    name = str((getattr(model, "arch", None) or {}).get("name", ""))
    if not name.startswith("torchvision:"):
        return None  # kdprobe, repdistiller, rnp, python: CIFAR-style networks, any (or 32 px) input
    own = getattr(model, "image_size", None)  # a ViT is built for one size
    if isinstance(own, int) and not isinstance(own, bool) and own > 0:
        return own
    return 299 if name == "torchvision:inception_v3" else 224


def image_size_for(model: nn.Module, meta: dict | None, image_size: int | None = None) -> tuple[int | None, str]:
    """(S, where it came from) by the rules of the module docstring; S None = the data's own size."""
    meta = meta if isinstance(meta, dict) else {}
    if image_size is not None:
        return (image_size or None), "--image-size"
    if "image_size" in meta:
        v = meta["image_size"]
        return (v if type(v) is int and v > 0 else None), "the checkpoint"
    if meta.get("input_shape") is not None:
        return None, "the checkpoint"
    return family_image_size(model), "the family default"


def eval_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float batch (N, C, H, W) -> (N, C, size, size): shorter side to int(size / 0.875), center crop."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if (h, w) == (size, size):
        return x
    short = int(size / EVAL_CROP)
    nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def _channels(values, c: int) -> list[float] | None:
    vals = [float(v) for v in values] if isinstance(values, (list, tuple)) else None
    return vals if vals is not None and len(vals) == c else None


class InputAdapter:
    """A forward pre-hook: re-normalize (if asked) and resize every 4-D batch to size x size."""

    def __init__(self, size: int | None, scale: list[float] | None = None, shift: list[float] | None = None):
        self.size, self.scale, self.shift = size, scale, shift

    def __call__(self, module, args):
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            return None
        if self.scale is not None:  # per channel: x * scale + shift
            view = (1, -1, 1, 1)
            x = x * torch.tensor(self.scale, dtype=x.dtype, device=x.device).view(view) \
                + torch.tensor(self.shift, dtype=x.dtype, device=x.device).view(view)
        if self.size is not None:
            x = eval_resize(x, self.size)
        return (x, *args[1:])


@dataclass(frozen=True)
class InputFit:
    """How a model is fed a dataset: the shape it sees, the image size rule, re-normalization."""

    shape: tuple[int, int, int]  # (C, H, W) the model receives
    size: int | None  # S, or None = the data's own size
    source: str  # which rule chose S
    renormalized: bool  # the checkpoint's own mean/std are applied instead of the data's


def remove_input_adapter(model: nn.Module) -> None:
    """Take a model's input hook off again (it is then fed batches as they come)."""
    old = model.__dict__.pop("_kdprobe_input_hook", None)
    if old is not None:
        old.remove()
    model.__dict__.pop("input_adapter", None)


def input_size_of(model: nn.Module) -> int | None:
    """S of the input hook `fit_input` put on the model (None: no resizing)."""
    adapter = model.__dict__.get("input_adapter")
    return adapter.size if adapter is not None else None


def fit_input(model: nn.Module, meta: dict | None, data, image_size: int | None = None) -> InputFit:
    """Give `model` the input hook that resizes (and re-normalizes) `data`'s batches for it; returns the fit.

    data: a kdprobe.data.datasets.TensorData (its images, mean and std); meta: the checkpoint's metadata."""
    meta = meta if isinstance(meta, dict) else {}
    size, source = image_size_for(model, meta, image_size)
    c, h, w = (int(v) for v in data.test_x.shape[1:])
    scale = shift = None
    norm = meta.get("normalization") if isinstance(meta.get("normalization"), dict) else {}
    mean_m, std_m = _channels(norm.get("mean"), c), _channels(norm.get("std"), c)
    if mean_m and std_m and all(s > 0 for s in std_m):
        mean_d, std_d = [float(v) for v in data.mean], [float(v) for v in data.std]
        if any(abs(a - b) > 1e-6 for a, b in zip(mean_m + std_m, mean_d + std_d)):
            scale = [sd / sm for sd, sm in zip(std_d, std_m)]
            shift = [(md - mm) / sm for md, mm, sm in zip(mean_d, mean_m, std_m)]
    remove_input_adapter(model)
    if size is not None or scale is not None:
        adapter = InputAdapter(size, scale, shift)
        model.__dict__["input_adapter"] = adapter  # a plain attribute: not a submodule, not in the state_dict
        model.__dict__["_kdprobe_input_hook"] = model.register_forward_pre_hook(adapter)
    shape = (c, size, size) if size is not None else (c, h, w)
    return InputFit(shape, size, source, scale is not None)


def pin_size(model: nn.Module, side: int) -> None:
    """Make a model's input hook bring every batch to side x side (a teacher that takes the data's own size,
    taught to a student that trains on resized crops, sees them resized back by the evaluation rule)."""
    adapter = model.__dict__.get("input_adapter")
    if adapter is not None:
        adapter.size = side
        return
    adapter = InputAdapter(side)
    model.__dict__["input_adapter"] = adapter
    model.__dict__["_kdprobe_input_hook"] = model.register_forward_pre_hook(adapter)


def _crop_boxes(n: int, h: int, w: int, gen: torch.Generator, device) -> torch.Tensor:
    """(n, 4) float boxes (top, left, height, width) by torchvision's RandomResizedCrop.get_params."""
    area = float(h * w)
    lo, hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    u = torch.rand(n, RRC_ATTEMPTS, 2, generator=gen, device=device, dtype=torch.float64)
    target = area * (RRC_SCALE[0] + (RRC_SCALE[1] - RRC_SCALE[0]) * u[..., 0])
    ratio = torch.exp(lo + (hi - lo) * u[..., 1])
    cw, ch = torch.round(torch.sqrt(target * ratio)), torch.round(torch.sqrt(target / ratio))
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1, device=device))
    # fallback (no attempt fit): the whole image clipped to the ratio range, centred
    in_ratio = w / h
    fw, fh = (w, round(w / RRC_RATIO[0])) if in_ratio < RRC_RATIO[0] else \
        ((round(h * RRC_RATIO[1]), h) if in_ratio > RRC_RATIO[1] else (w, h))
    pick = first.clamp(min=0)[:, None]
    bw = torch.where(first >= 0, cw.gather(1, pick)[:, 0], torch.full_like(first, fw, dtype=torch.float64))
    bh = torch.where(first >= 0, ch.gather(1, pick)[:, 0], torch.full_like(first, fh, dtype=torch.float64))
    v = torch.rand(n, 2, generator=gen, device=device, dtype=torch.float64)
    top = torch.where(first >= 0, torch.floor(v[:, 0] * (h - bh + 1)), torch.floor((h - bh) / 2))
    left = torch.where(first >= 0, torch.floor(v[:, 1] * (w - bw + 1)), torch.floor((w - bw) / 2))
    return torch.stack([top, left, bh, bw], 1)


def _source_coords(start: torch.Tensor, length: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel coordinates bilinear interpolation (align_corners=False) reads for `size` outputs of a crop."""
    k = torch.arange(size, device=start.device, dtype=torch.float64)
    src = (k[None] + 0.5) * (length[:, None] / size) - 0.5
    return start[:, None] + torch.minimum(src.clamp(min=0.0), length[:, None] - 1)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each image of a uint8/float batch to its (top, left, h, w) box and resize it to size x size
    (bilinear, = F.interpolate(crop, align_corners=False) per image); uint8 in -> rounded uint8 out."""
    n, _, h, w = x.shape
    ys = _source_coords(boxes[:, 0], boxes[:, 2], size)  # (n, size)
    xs = _source_coords(boxes[:, 1], boxes[:, 3], size)
    # grid_sample with align_corners=True reads pixel centres at exactly these coordinates
    gy = (2 * ys / max(h - 1, 1) - 1)[:, :, None].expand(n, size, size)
    gx = (2 * xs / max(w - 1, 1) - 1)[:, None, :].expand(n, size, size)
    grid = torch.stack([gx, gy], -1).to(torch.float32)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.round_().clamp_(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else out


def random_resized_crop_flip(x: torch.Tensor, size: int, gen: torch.Generator, flip: bool = True) -> torch.Tensor:
    """RandomResizedCrop(size) + horizontal flip (p = 0.5 per image) of a batch, on its device, seeded by gen."""
    if x.dim() != 4:
        raise KdprobeError(f"expected images (N, C, H, W), got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    boxes = _crop_boxes(n, h, w, gen, x.device)
    out = resized_crop(x, boxes, size)
    coin = torch.rand(n, generator=gen, device=x.device) < 0.5  # drawn even without flipping: same stream
    if flip:
        out = torch.where(coin[:, None, None, None], out.flip(-1), out)
    return out
