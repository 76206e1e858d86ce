"""Cost of --log (issue #20): a training run with each experiment tracker, side by side with the same run
without one (the baseline).

One tiny run (resnet8b width 0.25 on a digits subset, the fast preset) per tracker, in interleaved rounds
(every setting once per round, so a slow spell of the machine hits all of them), each into a fresh folder, so
every tracker pays what a new run pays: TensorBoard its event file, W&B its offline run (init and finish),
MLflow a new SQLite store (its tables) and run. Wall seconds of the whole train() call, median over rounds;
the extra seconds over the baseline, and per epoch (the part that grows with a longer run) from the difference
between an --epochs-long and a 1-epoch run.

Run: .venv/bin/python bench/bench_trackers.py [--epochs 10] [--rounds 3]
"""
from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from trainers.config import make_config
from trainers.loop import train
from trainers.trackers import TrackerSpec

SETTINGS = ((), ("tensorboard",), ("wandb",), ("mlflow",))


def run_once(kinds: tuple, epochs: int, root: Path) -> float:
    folder = Path(tempfile.mkdtemp(dir=root))
    cfg = make_config("fast", model="resnet8b", model_kwargs={"width": 0.25}, epochs=epochs, train_subset=256)
    spec = TrackerSpec(kinds, str(folder / "logs"), "bench", "run") if kinds else None
    t = time.perf_counter()
    train(cfg, folder / "run.pt", device="cpu", trackers=spec)
    seconds = time.perf_counter() - t
    shutil.rmtree(folder)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="kdprobe-bench-trackers-"))
    run_once((), 1, root)  # warm-up: imports, first allocations
    times = {(k, e): [] for k in SETTINGS for e in (1, args.epochs)}
    for _ in range(args.rounds):
        for kinds in SETTINGS:
            for e in (1, args.epochs):
                times[(kinds, e)].append(run_once(kinds, e, root))
    shutil.rmtree(root, ignore_errors=True)
    med = {key: statistics.median(v) for key, v in times.items()}
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread; "
          f"{args.epochs} epochs, {args.rounds} rounds, median wall seconds")
    base, base1 = med[((), args.epochs)], med[((), 1)]
    per_epoch_base = (base - base1) / (args.epochs - 1)
    print(f"{'tracker':12} {'run s':>8} {'vs none':>8} {'extra s':>8} {'extra ms/epoch':>15}")
    for kinds in SETTINGS:
        full, one = med[(kinds, args.epochs)], med[(kinds, 1)]
        per_epoch = (full - one) / (args.epochs - 1)
        print(f"{(kinds or ('none',))[0]:12} {full:8.2f} {full / base:7.2f}x {full - base:8.2f} "
              f"{1000 * (per_epoch - per_epoch_base):15.1f}")


if __name__ == "__main__":
    main()
