"""Batched, seeded image augmentations: crop+flip, AutoAugment (one sub-policy per image), CutMix.

Every function works on whatever device its input lives on and takes an explicit
`torch.Generator` on that same device, so a run is reproducible from its seed. No Python
`random` and no global torch RNG are used anywhere.

On a GPU the training loop syncs with the host only every 25 steps, so nothing here reads a
random draw back per step where it can be avoided: CutMix on a GPU builds its box as a mask on
the device from the same draws (lam stays a device tensor); AutoAugment must group images by
sub-policy on the host, so its draws come back in one copy per batch and the index tensors go
out without waiting (pinned, non_blocking).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
# the v1 functional kernels: exactly what torchvision.transforms.AutoAugment calls (bit-equal to
# it, and batched == per-image); the v2 kernels round autocontrast/saturation differently (+-1)
import torchvision.transforms.functional as TF
import torchvision.transforms.v2.functional as TF2
from torchvision.transforms import InterpolationMode

from kdprobe.errors import KdprobeError

# AutoAugment CIFAR-10 policy (Cubuk et al. 2019, appendix; same table and order as
# torchvision's AutoAugmentPolicy.CIFAR10): 25 sub-policies of two (op, probability, bin)
# steps; bin indexes 10 magnitude levels, None for ops without a magnitude.
CIFAR10_POLICY: tuple[tuple[tuple[str, float, int | None], ...], ...] = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)
_POLICIES = {"cifar10": CIFAR10_POLICY}
_NUM_BINS = 10
_SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
           "Brightness", "Color", "Contrast", "Sharpness"}


def _check_images(x: torch.Tensor, name: str, *, uint8: bool) -> None:
    if x.dim() != 4:
        raise KdprobeError(f"expected {name} of shape (N, C, H, W), got shape {tuple(x.shape)}; "
                           "add a batch dimension")
    if uint8 and x.dtype != torch.uint8:
        raise KdprobeError(f"expected {name} as uint8, got {x.dtype}; augment before normalize()")


def _check_generator(x: torch.Tensor, generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise KdprobeError(f"expected a torch.Generator, got {type(generator).__name__}; "
                           "pass torch.Generator(device=x.device).manual_seed(seed)")
    if generator.device.type != x.device.type:
        raise KdprobeError(f"expected a generator on {x.device.type}, got one on "
                           f"{generator.device.type}; create it with torch.Generator(device=x.device)")


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4,
                     flip: bool = True) -> torch.Tensor:
    """Zero-pad by `padding`, crop back to HxW at a per-image offset, flip each image with p=0.5 (if `flip`)."""
    _check_images(x, "x", uint8=False)
    _check_generator(x, generator)
    if padding < 0:
        raise KdprobeError(f"expected padding >= 0, got {padding}; use 4 for CIFAR")
    n, c, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (padding, padding, padding, padding))  # zeros, (N, C, H+2p, W+2p)
    # offsets in [0, 2p] pixels (both ends inclusive, like torchvision RandomCrop); flip coin
    off = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=dev)
    # the coin is drawn even when flipping is off, so the random stream does not depend on it
    flip = (torch.rand(n, generator=generator, device=dev) < 0.5) & flip
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = off[:, 0:1] + ar_h  # (N, H) source row of each output row
    cols = off[:, 1:2] + torch.where(flip[:, None], (w - 1) - ar_w, ar_w)  # (N, W)
    bidx = torch.arange(n, device=dev)[:, None, None, None]
    cidx = torch.arange(c, device=dev)[None, :, None, None]
    return padded[bidx, cidx, rows[:, None, :, None], cols[:, None, None, :]]


@dataclass(frozen=True)
class AutoAugmentDraw:
    """Per-image random draws of AutoAugment: sub-policy index, op coins and op signs."""

    policy: torch.Tensor   # (N,) int64, index into the policy table
    applied: torch.Tensor  # (N, 2) bool, whether step j of the sub-policy is applied
    positive: torch.Tensor  # (N, 2) bool, sign of step j's magnitude for signed ops


def draw_auto_augment(n: int, generator: torch.Generator, policy: str = "cifar10",
                      device: torch.device | str | None = None) -> AutoAugmentDraw:
    """Draw, for each of n images, its sub-policy, its two op coins and its two signs."""
    table = _policy_table(policy)
    dev = generator.device if device is None else torch.device(device)
    idx = torch.randint(len(table), (n,), generator=generator, device=dev)
    u = torch.rand(n, 2, generator=generator, device=dev)
    positive = torch.randint(2, (n, 2), generator=generator, device=dev) == 1
    probs = torch.tensor([[p for _, p, _ in sub] for sub in table], device=dev)  # (25, 2)
    # torchvision applies step j when its uniform draw is <= p (AutoAugment.forward)
    return AutoAugmentDraw(policy=idx, applied=u <= probs[idx], positive=positive)


def _policy_table(policy: str):
    if policy not in _POLICIES:
        raise KdprobeError(f"expected policy in {sorted(_POLICIES)}, got {policy!r}; use 'cifar10'")
    return _POLICIES[policy]


@functools.lru_cache(maxsize=None)
def _magnitude(op: str, bin_: int | None, h: int, w: int) -> float:
    """Unsigned magnitude of `op` at `bin_` of 10 (torchvision AutoAugment._augmentation_space)."""
    if bin_ is None:
        return 0.0
    top = {"ShearX": 0.3, "ShearY": 0.3, "TranslateX": 150.0 / 331.0 * w,
           "TranslateY": 150.0 / 331.0 * h, "Rotate": 30.0, "Brightness": 0.9, "Color": 0.9,
           "Contrast": 0.9, "Sharpness": 0.9}
    if op in top:  # linear ramp from 0 to top over the bins (float32 like torch.linspace)
        return float(torch.linspace(0.0, top[op], _NUM_BINS)[bin_])
    if op == "Posterize":  # 8 bits at bin 0 down to 4 bits at bin 9
        return float(8 - round(bin_ / ((_NUM_BINS - 1) / 4)))
    if op == "Solarize":  # threshold 255 (no-op) down to 0
        return float(torch.linspace(255.0, 0.0, _NUM_BINS)[bin_])
    raise AssertionError(f"op {op} has no magnitude")


def _apply_op(img: torch.Tensor, op: str, m: float, fill: list[float]) -> torch.Tensor:
    """One AutoAugment op with signed magnitude m on a uint8 batch (NEAREST, grey fill)."""
    nearest = InterpolationMode.NEAREST
    if op in ("ShearX", "ShearY"):
        # shear angle atan(m) in degrees about the top-left corner, as torchvision does
        deg = math.degrees(math.atan(m))
        shear = [deg, 0.0] if op == "ShearX" else [0.0, deg]
        return TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear,
                         interpolation=nearest, fill=fill, center=[0, 0])
    if op in ("TranslateX", "TranslateY"):
        shift = [int(m), 0] if op == "TranslateX" else [0, int(m)]  # whole pixels
        return TF.affine(img, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0],
                         interpolation=nearest, fill=fill)
    if op == "Rotate":
        return TF.rotate(img, m, interpolation=nearest, fill=fill)
    if op == "Brightness":
        return TF.adjust_brightness(img, 1.0 + m)
    if op == "Color":  # saturation; identity on 1-channel images (PIL behaviour)
        return TF.adjust_saturation(img, 1.0 + m)
    if op == "Contrast":
        return TF.adjust_contrast(img, 1.0 + m)
    if op == "Sharpness":
        return TF.adjust_sharpness(img, 1.0 + m)
    if op == "Posterize":
        return TF.posterize(img, int(m))
    if op == "Solarize":
        return TF.solarize(img, m)
    if op == "AutoContrast":
        return TF.autocontrast(img)
    if op == "Equalize":  # v2 kernel: vectorized over the batch, output equal to v1's per-image loop
        return TF2.equalize(img)
    if op == "Invert":
        return TF.invert(img)
    raise AssertionError(f"unknown op {op}")


def apply_auto_augment(x: torch.Tensor, draw: AutoAugmentDraw, policy: str = "cifar10",
                       fill: int = 128) -> torch.Tensor:
    """Apply given per-image AutoAugment draws with one batched call per distinct (op, magnitude)."""
    _check_images(x, "x", uint8=True)
    _policy_table(policy)  # validates the name
    n, c, h, w = x.shape
    if c not in (1, 3):
        raise KdprobeError(f"expected 1 or 3 channels, got {c}; AutoAugment needs grey or RGB images")
    if draw.policy.shape != (n,):
        raise KdprobeError(f"expected draws for {n} images, got {tuple(draw.policy.shape)}; "
                           "draw with n = x.shape[0]")
    fills = [float(fill)] * c
    ops, key_of = _op_keys(policy, h, w)
    # one host copy of the draws (one sync on a GPU): grouping on CPU, gathers/scatters on x's device
    packed = torch.cat([draw.policy[:, None], draw.applied.long(), draw.positive.long()], 1).cpu()
    pol, applied, positive = packed[:, 0], packed[:, 1:3].bool(), packed[:, 3:5].bool()
    to_device = ((lambda t: t.pin_memory().to(x.device, non_blocking=True)) if x.device.type == "cuda"
                 else (lambda t: t.to(x.device)))
    out = x.clone()
    # Step j of every image is applied before step j+1 of any; within a step each image gets
    # at most one op, so images sharing (op, signed magnitude) across sub-policies form one
    # batched call (<= 31 calls per step for CIFAR-10 instead of one call per image).
    for j in range(2):
        keys = key_of[pol, j, positive[:, j].long()]
        on = applied[:, j].nonzero().squeeze(1)
        if on.numel() == 0:
            continue
        sorted_keys, order = keys[on].sort(stable=True)
        uniq, counts = torch.unique_consecutive(sorted_keys, return_counts=True)
        for key, members in zip(uniq.tolist(), on[order].split(counts.tolist())):
            op, mag = ops[key]
            if members.numel() == n:
                out = _apply_op(out, op, mag, fills)
            else:
                idx = to_device(members)
                out[idx] = _apply_op(out[idx], op, mag, fills)
    return out


@functools.lru_cache(maxsize=None)
def _op_keys(policy: str, h: int, w: int) -> tuple[list[tuple[str, float]], torch.Tensor]:
    """Distinct (op, signed magnitude) pairs and, per (sub-policy, step, sign), their index."""
    table = _policy_table(policy)
    ops: list[tuple[str, float]] = []
    key_of = torch.empty(len(table), 2, 2, dtype=torch.long)  # sign index 0 = negative
    for k, steps in enumerate(table):
        for j, (op, _, bin_) in enumerate(steps):
            m = _magnitude(op, bin_, h, w)
            for sgn in (0, 1):
                pair = (op, -m if (op in _SIGNED and sgn == 0) else m)
                if pair not in ops:
                    ops.append(pair)
                key_of[k, j, sgn] = ops.index(pair)
    return ops, key_of


def auto_augment(x: torch.Tensor, generator: torch.Generator, policy: str = "cifar10",
                 fill: int = 128, *, return_draw: bool = False):
    """AutoAugment with one sub-policy drawn per image; returns uint8 (and the draws if asked)."""
    _check_images(x, "x", uint8=True)
    _check_generator(x, generator)
    draw = draw_auto_augment(x.shape[0], generator, policy, device=x.device)
    out = apply_auto_augment(x, draw, policy, fill)
    return (out, draw) if return_draw else out


@dataclass(frozen=True)
class MixedBatch:
    """A (possibly) CutMix-ed batch: loss = lam*CE(y_a) + (1-lam)*CE(y_b)."""

    x: torch.Tensor
    y_a: torch.Tensor
    y_b: torch.Tensor
    lam: float | torch.Tensor  # a 0-d float64 tensor when drawn on a GPU (reading it back would sync)
    perm: torch.Tensor | None = None  # partner index of each image; None when not mixed (CPU)


def sample_beta(a: float, b: float, generator: torch.Generator, n: int = 1) -> torch.Tensor:
    """n draws of Beta(a, b) on the generator's device, as X/(X+Y) with X~Gamma(a), Y~Gamma(b)."""
    if a <= 0 or b <= 0:
        raise KdprobeError(f"expected Beta parameters > 0, got ({a}, {b}); use beta=1.0")
    conc = torch.tensor([[a, b]], dtype=torch.float64, device=generator.device).expand(n, 2)
    g = torch._standard_gamma(conc.contiguous(), generator=generator)
    return g[:, 0] / (g[:, 0] + g[:, 1])


def cutmix(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
           prob: float = 0.5, beta: float = 1.0) -> MixedBatch:
    """CutMix (Yun et al. 2019): with probability `prob` paste one box of a permuted batch."""
    _check_images(x, "x", uint8=False)
    _check_generator(x, generator)
    if y.shape != (x.shape[0],):
        raise KdprobeError(f"expected labels of shape ({x.shape[0]},), got {tuple(y.shape)}; "
                           "pass integer class labels")
    if not 0.0 <= prob <= 1.0:
        raise KdprobeError(f"expected prob in [0, 1], got {prob}; use 0.5 as in the reference")
    dev = x.device
    if dev.type != "cpu":
        return _cutmix_on_device(x, y, generator, prob, beta)
    # one coin per batch, as clovaai/CutMix-PyTorch train.py (r < cutmix_prob)
    if not float(torch.rand(1, generator=generator, device=dev)) < prob:
        return MixedBatch(x=x, y_a=y, y_b=y, lam=1.0)
    n, _, h, w = x.shape
    lam0 = float(sample_beta(beta, beta, generator)[0])
    perm = torch.randperm(n, generator=generator, device=dev)
    # box centre uniform over the pixel grid (reference: np.random.randint(W), randint(H))
    cy, cx = torch.stack([torch.randint(h, (), generator=generator, device=dev),
                          torch.randint(w, (), generator=generator, device=dev)]).tolist()
    ratio = math.sqrt(1.0 - lam0)  # box side / image side, so area ~ (1 - lam)
    half_h, half_w = int(h * ratio) // 2, int(w * ratio) // 2
    y1, y2 = max(cy - half_h, 0), min(cy + half_h, h)  # clipped at the borders
    x1, x2 = max(cx - half_w, 0), min(cx + half_w, w)
    mixed = x.clone()
    mixed[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
    lam = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)  # recomputed from the pasted area
    return MixedBatch(x=mixed, y_a=y, y_b=y[perm], lam=lam, perm=perm)


def _cutmix_on_device(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, prob: float,
                      beta: float) -> MixedBatch:
    """cutmix() without reading a draw back: the same draws in the same order, the box as a mask.

    Where the coin says mix, the image, labels and lam equal cutmix()'s on the same generator state;
    where it does not, the batch is returned as is (lam 1, y_b = y) but the box is still drawn, so the
    stream moves on further than cutmix()'s. Used on GPUs (and tested on a CPU)."""
    n, _, h, w = x.shape
    dev = x.device
    apply = torch.rand(1, generator=generator, device=dev)[0] < prob
    lam0 = sample_beta(beta, beta, generator)[0]  # float64
    perm = torch.randperm(n, generator=generator, device=dev)
    cy = torch.randint(h, (), generator=generator, device=dev)
    cx = torch.randint(w, (), generator=generator, device=dev)
    ratio = torch.sqrt(1.0 - lam0)  # float64, as math.sqrt in cutmix()
    half_h, half_w = torch.floor(h * ratio).long() // 2, torch.floor(w * ratio).long() // 2
    y1, y2 = (cy - half_h).clamp(min=0), (cy + half_h).clamp(max=h)
    x1, x2 = (cx - half_w).clamp(min=0), (cx + half_w).clamp(max=w)
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
    box = ((rows >= y1) & (rows < y2))[:, None] & ((cols >= x1) & (cols < x2))[None, :] & apply  # (H, W)
    mixed = torch.where(box, x[perm], x)
    area = ((y2 - y1) * (x2 - x1)).double()
    lam = torch.where(apply, 1.0 - area / (h * w), torch.ones((), dtype=torch.float64, device=dev))
    return MixedBatch(x=mixed, y_a=y, y_b=torch.where(apply, y[perm], y), lam=lam, perm=perm)


def mixed_cross_entropy(logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor | None,
                        lam: float | torch.Tensor) -> torch.Tensor:
    """lam*CE(logits, y_a) + (1-lam)*CE(logits, y_b), each averaged over the batch."""
    ce_a = F.cross_entropy(logits, y_a)
    if isinstance(lam, torch.Tensor):  # drawn on the device: testing lam == 1 would sync; lam 1 gives ce_a exactly
        ce_b = F.cross_entropy(logits, y_a if y_b is None else y_b)
        return lam.to(ce_a.dtype) * ce_a + (1.0 - lam).to(ce_a.dtype) * ce_b
    if y_b is None or lam == 1.0:
        return ce_a
    return lam * ce_a + (1.0 - lam) * F.cross_entropy(logits, y_b)
