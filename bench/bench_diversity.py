"""Seconds per checkpoint of the Jacobian-correlation score: kdprobe vs the original method.

Model: ResNet-56 (option B, 10 classes, random init), N=128 random-normal 3x32x32 inputs,
one probe batch per checkpoint. "original" is Mellor et al.'s v1 code path:
inputs.requires_grad_(True); out = model(x); out.sum().backward() (which also fills every
parameter's .grad); J = x.grad; numpy corrcoef; general (non-symmetric) eig. kdprobe takes
torch.autograd.grad w.r.t. a copy of the inputs only, float64 corrcoef and eigvalsh on the
model's device, and saves/restores BN buffers and modes. Both are timed in the same BN mode,
alternating rounds so a drift of the machine's speed hits both alike; the median is reported.

Run: .venv/bin/python bench/bench_diversity.py [--device cpu|cuda] [--repeats 3] [--batch-size 128]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from kdprobe.models import create_model
from kdprobe.probes.diversity import jacobian_score

K = 1e-5


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def original_score(model: torch.nn.Module, x: torch.Tensor, k: float = K) -> float:
    """The original code path (mode is whatever the model is in; parameter .grad gets filled)."""
    x = x.clone().requires_grad_(True)
    model.zero_grad()
    out = model(x)
    out.sum().backward()
    jac = x.grad.detach().reshape(x.shape[0], -1).cpu().numpy()
    corrs = np.corrcoef(jac)
    v, _ = np.linalg.eig(corrs)
    return float(np.real(-np.sum(np.log(v + k) + 1.0 / (v + k))))


def _timed(fn, dev) -> tuple[float, float]:
    _sync(dev)
    t0 = time.perf_counter()
    s = fn()
    _sync(dev)
    return time.perf_counter() - t0, s


def main() -> None:
    """Print seconds per checkpoint (one batch) for kdprobe and the original, and their ratio."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per method (alternating); median reported")
    ap.add_argument("--no-v2", action="store_true", help="skip timing the v2 (ReLU-code) score")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model("resnet56", num_classes=10).to(dev)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dev)

    def orig(mode):
        def run():
            model.train(mode == "train")
            return original_score(model, x)
        return run

    methods = {
        ("eval", "kdprobe"): lambda: jacobian_score(model, x, bn="eval"),
        ("eval", "original"): orig("eval"),
        ("train", "kdprobe"): lambda: jacobian_score(model, x, bn="train"),
        ("train", "original"): orig("train"),
    }
    if not args.no_v2:
        methods[("eval", "kdprobe v2")] = lambda: jacobian_score(model, x, variant="v2")
    times = {m: [] for m in methods}
    scores = {}
    for m, fn in methods.items():  # warm-up: allocator, cudnn autotune, lazy init
        scores[m] = _timed(fn, dev)[1]
    for _ in range(args.repeats):
        for m, fn in methods.items():
            t, scores[m] = _timed(fn, dev)
            times[m].append(t)
    med = {m: statistics.median(t) for m, t in times.items()}
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"resnet56b, N={args.batch_size}, 3x32x32 random inputs, device {name}, torch {torch.__version__}, "
          f"median of {args.repeats}")
    print(f"{'bn mode':<8} {'kdprobe s/ckpt':>15} {'original s/ckpt':>16} {'ratio':>7} {'|score diff|':>13}")
    for mode in ("eval", "train"):
        a, b = med[(mode, "kdprobe")], med[(mode, "original")]
        diff = abs(scores[(mode, "kdprobe")] - scores[(mode, "original")])
        print(f"{mode:<8} {a:>15.3f} {b:>16.3f} {a / b:>7.2f} {diff:>13.2e}")
    if not args.no_v2:
        print(f"v2 (eval, ReLU codes): {med[('eval', 'kdprobe v2')]:.3f} s/ckpt")
    print(f"scores: v1 eval {scores[('eval', 'kdprobe')]:.3f}, v1 train {scores[('train', 'kdprobe')]:.3f}")


if __name__ == "__main__":
    main()
