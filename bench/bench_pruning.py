"""Training throughput (images/s, forward + backward + SGD step) of an L1-pruned ResNet-56 vs the unpruned one.

Pruned: option A, remaining 0.4,0.7,0.9 per stage, skip preset resnet56-B (Li et al.
2016's ResNet-56-B). Both models are timed in the same process, alternating rounds so a
drift of the machine's speed hits both alike; the median round is reported.

Run: .venv/bin/python bench/bench_pruning.py [--device cpu|cuda] [--rounds 3] [--steps 2] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from kdprobe.models import create_model
from kdprobe.pruning import SKIP_PRESETS, count_flops, count_params, l1_prune


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _round(model: nn.Module, opt, x, y, steps: int, dev: torch.device) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process) over `steps` training steps.

    On a shared CPU the wall rate swings with other jobs' load; the CPU-time rate (all of
    this process' threads) is much less sensitive to it, so both are reported.
    """
    _sync(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    _sync(dev)
    n = steps * x.shape[0]
    return n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9)


def main() -> None:
    """Print params, MACs and training images/s of both networks, and the ratios."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per model (alternating)")
    ap.add_argument("--steps", type=int, default=2, help="training steps per round")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads (0 = torch default); 1 makes img/CPU-s meaningful on a loaded machine, "
                         "since OpenMP threads spin-wait (and burn CPU time) when the cores are oversubscribed")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    full = create_model("resnet56a", num_classes=100)
    pruned = l1_prune(full, [0.4, 0.7, 0.9], SKIP_PRESETS["resnet56-B"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=g).to(dev)
    y = torch.randint(100, (args.batch_size,), generator=g).to(dev)
    nets = {"unpruned": full, "l1-pruned": pruned}
    opts, rates, cpu_rates = {}, {k: [] for k in nets}, {k: [] for k in nets}
    for k, m in nets.items():
        m.to(dev).train()
        opts[k] = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        _round(m, opts[k], x, y, 1, dev)  # warm-up: allocator, cudnn autotune
    for _ in range(args.rounds):
        for k, m in nets.items():
            wall, cpu = _round(m, opts[k], x, y, args.steps, dev)
            rates[k].append(wall)
            cpu_rates[k].append(cpu)
    p = {k: count_params(m) for k, m in nets.items()}
    f = {k: count_flops(m, (3, 32, 32)) for k, m in nets.items()}
    r = {k: statistics.median(v) for k, v in rates.items()}
    c = {k: statistics.median(v) for k, v in cpu_rates.items()}
    print(f"device={dev} threads={torch.get_num_threads()} batch={args.batch_size} "
          f"rounds={args.rounds}x{args.steps} steps; ResNet-56 option A, CIFAR-100 head")
    print(f"pruned block_cfg={pruned.arch['kwargs']['block_cfg']}")
    print(f"{'':<12}{'params':>12}{'MACs':>14}{'train img/s':>14}{'img/CPU-s':>12}  (wall rounds: min..max)")
    for k in nets:
        print(f"{k:<12}{p[k]:>12,}{f[k]:>14,}{r[k]:>14.1f}{c[k]:>12.2f}  ({min(rates[k]):.1f}..{max(rates[k]):.1f})")
    u, q = "unpruned", "l1-pruned"
    print(f"{'pruned/full':<12}{p[q] / p[u]:>12.3f}{f[q] / f[u]:>14.3f}{r[q] / r[u]:>14.3f}{c[q] / c[u]:>12.3f}")


if __name__ == "__main__":
    main()
