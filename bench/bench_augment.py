"""Throughput (images/s) of the batch augmentations vs torchvision's per-image AutoAugment loop.

Run: .venv/bin/python bench/bench_augment.py [--batches 5] [--batch-size 256] [--threads 1] [--device cpu]
"""
from __future__ import annotations

import argparse
import time

import torch
from torchvision.transforms import AutoAugment, AutoAugmentPolicy

from trainers.augment import auto_augment, cutmix, random_crop_flip


def _rate(fn, batches: list[torch.Tensor], device: torch.device) -> float:
    """Images per second of fn over the given batches (after one warm-up call)."""
    fn(batches[0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for b in batches:
        fn(b)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return sum(b.shape[0] for b in batches) / (time.perf_counter() - t0)


def main() -> None:
    """Print images/s of each augmentation on random 32x32x3 uint8 batches."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, default=5, help="timed batches per method")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    g = torch.Generator(device=dev).manual_seed(0)
    batches = [torch.randint(0, 256, (args.batch_size, 3, 32, 32), dtype=torch.uint8,
                             generator=g, device=dev) for _ in range(args.batches)]
    labels = torch.randint(10, (args.batch_size,), generator=g, device=dev)

    ref = AutoAugment(AutoAugmentPolicy.CIFAR10, fill=[128] * 3)
    torch.manual_seed(0)  # torchvision's transform draws from the global RNG
    naive = _rate(lambda b: torch.stack([ref(img) for img in b]), batches, dev)
    grouped = _rate(lambda b: auto_augment(b, g), batches, dev)
    crop = _rate(lambda b: random_crop_flip(b, g), batches, dev)
    mix = _rate(lambda b: cutmix(b.float(), labels, g, prob=1.0), batches, dev)

    print(f"device={dev} threads={torch.get_num_threads()} batch={args.batch_size} "
          f"batches={args.batches}")
    print(f"{'method':<44}{'images/s':>12}")
    print(f"{'torchvision AutoAugment, per-image loop':<44}{naive:>12.0f}")
    print(f"{'auto_augment (per-image policy, grouped)':<44}{grouped:>12.0f}")
    print(f"{'  speed-up grouped / loop':<44}{grouped / naive:>11.1f}x")
    print(f"{'random_crop_flip':<44}{crop:>12.0f}")
    print(f"{'cutmix (prob=1, incl. uint8->float)':<44}{mix:>12.0f}")


if __name__ == "__main__":
    main()
