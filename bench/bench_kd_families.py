"""Training step cost of each distillation method relative to label KD (issue #22).

One model, one batch size, one machine, one run: full training steps (augment, teacher forward, student
forward with the method's hooks and heads, loss, backward, SGD) of scratch, label KD, feature KD and the KD
families (AT, FitNet, SP, RKD, PKT, CRD, DKD) on device-resident data, in interleaved rounds (every method
once per round, so a slow spell of the machine hits all of them), median seconds per step, ratio to label KD
side by side (the median of each round's ratio). On a CPU the clock is the process's CPU time by default
(--clock cpu, one thread): on a machine shared with other jobs, wall time measures them too. The teacher is the same architecture with its own random weights: the cost of a step does not
depend on what the teacher learned. CRD's K is the training loop's rule (at most 16,384, capped at the fewest
negatives a sample has: about 1,300 on digits); --crd-k sets it.

Run: .venv/bin/python bench/bench_kd_families.py [--model resnet20] [--dataset digits] [--steps 40] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from kdprobe.data.datasets import load_dataset
from kdprobe.models import create_model
from trainers.config import KD_FAMILIES, make_config
from trainers.recipes import Recipe

METHODS = ("none", "label", "feature", *KD_FAMILIES)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Runner:
    """One method's model, recipe, optimiser and batch stream, ready to time `steps` steps."""

    def __init__(self, method: str, data, model_name: str, teacher, batch: int, dev, kd_settings: dict):
        torch.manual_seed(0)
        cfg = make_config(None, model=model_name, distill=method, teacher=None if method == "none" else "t.pt",
                          batch_size=batch, kd_settings=kd_settings if method in KD_FAMILIES else {})
        self.model = create_model(model_name, num_classes=data.num_classes, in_channels=data.in_channels).to(dev)
        self.recipe = Recipe(cfg, self.model, None if method == "none" else teacher, data)
        self.student = self.recipe.student(self.model)
        self.opt = torch.optim.SGD(self.student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        self.gen = torch.Generator(device=dev).manual_seed(0)
        self.data, self.batch, self.dev = data, batch, dev
        self.n = len(data.train_y)

    def step(self):
        idx = torch.randint(self.n, (self.batch,), generator=self.gen, device=self.dev)
        mb = self.recipe.batch(self.data.train_x[idx], self.data.train_y[idx], self.gen)
        loss = self.recipe.loss(self.student, mb, index=idx, epoch=1, gen=self.gen)["loss"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def time(self, steps: int, clock=time.perf_counter) -> float:
        self.student.train()
        _sync(self.dev)
        t0 = clock()
        for _ in range(steps):
            self.step()
        _sync(self.dev)
        return (clock() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per method and round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--clock", choices=("cpu", "wall"), default=None,
                    help="cpu: process CPU time (default on a CPU); wall: elapsed time (default on a GPU)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--crd-k", type=int, default=None, help="CRD's negatives (default: the loop's rule)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    data = load_dataset(a.dataset).to(dev)
    torch.manual_seed(1)
    teacher = create_model(a.model, num_classes=data.num_classes, in_channels=data.in_channels).to(dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    crd = {"k": a.crd_k} if a.crd_k else {}
    runners = {m: Runner(m, data, a.model, teacher, a.batch_size, dev, crd if m == "crd" else {}) for m in METHODS}
    for r in runners.values():  # warm-up: first-call costs (allocations, CRD's Z) out of the timing
        r.time(3)
    clock_name = a.clock or ("wall" if dev.type == "cuda" else "cpu")
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    times = {m: [] for m in METHODS}
    for _ in range(a.rounds):
        for m, r in runners.items():
            times[m].append(r.time(a.steps, clock))
    med = {m: statistics.median(v) for m, v in times.items()}
    ratio = {m: statistics.median(t / b for t, b in zip(times[m], times["label"])) for m in METHODS}
    k = runners["crd"].recipe.kd["settings"]["k"]
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    print(f"{a.model} on {a.dataset}, batch {a.batch_size}, {a.steps} steps x {a.rounds} interleaved rounds, "
          f"{clock_name} time, {torch.get_num_threads()} threads, {where}; CRD K = {k}")
    print(f"{'method':<10} {'ms/step':>9} {'vs label KD':>12}")
    for m in METHODS:
        print(f"{m if m != 'none' else 'scratch':<10} {1000 * med[m]:>9.2f} {ratio[m]:>11.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "dataset": a.dataset, "batch_size": a.batch_size, "steps": a.steps,
                       "rounds": a.rounds, "threads": torch.get_num_threads(), "device": where, "crd_k": k,
                       "clock": clock_name, "seconds_per_step": med, "ratio_to_label": ratio}, f, indent=1)


if __name__ == "__main__":
    main()
