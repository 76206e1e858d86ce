"""Training throughput (images/s) on real CIFAR-10 images from the shared JPEG archive.

Two comparisons, each measured on this machine in one run:
  loader   resnet20 scratch steps fed by kdprobe's tensor-resident path (uint8 tensors on the
           device, crop+flip there) vs a plain torchvision ImageFolder + DataLoader loop
           (PIL decode, RandomCrop(32, 4), RandomHorizontalFlip, ToTensor, Normalize).
  recipes  standard, CutMix, AutoAugment, label KD and feature KD relative to plain scratch
           (standard augmentation), all on the tensor-resident path.

Run: .venv/bin/python bench/bench_train.py [--images 1024] [--threads 2] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdprobe.data.datasets import load_dataset
from kdprobe.models import create_model
from trainers.config import TrainConfig
from trainers.recipes import Recipe

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def tensor_resident_rate(data, config: TrainConfig, dev, n_images: int, teacher=None) -> float:
    """Images/s of full training steps (augment, forward, backward, SGD) on device-resident data."""
    torch.manual_seed(0)
    model = create_model(config.model, num_classes=data.num_classes, in_channels=data.in_channels).to(dev)
    recipe = Recipe(config, model, teacher, data)
    student = recipe.student(model)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator(device=dev).manual_seed(0)
    bs = config.batch_size
    perm = torch.randperm(len(data.train_y), generator=gen, device=dev)[:n_images]

    def step(idx):
        mb = recipe.batch(data.train_x[idx], data.train_y[idx], gen)
        loss = recipe.loss(student, mb)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    student.train()
    step(perm[:bs])  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    for i in range(0, n_images, bs):
        step(perm[i:i + bs])
    _sync(dev)
    return n_images / (time.perf_counter() - t0)


def dataloader_rate(root: Path, dev, n_images: int, bs: int, workers: int) -> float:
    """Images/s of the same steps fed by torchvision ImageFolder + DataLoader (decode every epoch)."""
    import torchvision.transforms as T
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import ImageFolder

    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))])
    ds = ImageFolder(str(root / "train"), transform=tf)
    g = torch.Generator().manual_seed(0)
    ds = Subset(ds, torch.randperm(len(ds), generator=g)[:n_images + bs].tolist())
    loader = DataLoader(ds, batch_size=bs, shuffle=True, num_workers=workers, drop_last=False)
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    seen, t0 = 0, None
    for i, (x, y) in enumerate(loader):
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i == 0:  # first batch is the warm-up, as above
            _sync(dev)
            t0 = time.perf_counter()
            continue
        seen += len(y)
    _sync(dev)
    return seen / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1024, help="timed training images per configuration")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for the baseline")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", choices=["loader", "recipes", "all"], default="all")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the median is reported")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not ARCHIVE.exists():
        raise SystemExit(f"needs {ARCHIVE} (the shared CIFAR-10 JPEG archive)")
    dev = torch.device(args.device)
    t = time.perf_counter()
    data = load_dataset(f"imagefolder:{ARCHIVE}").to(dev)  # decoded once, then cached
    print(f"data ready in {time.perf_counter() - t:.1f}s: {tuple(data.train_x.shape)} on {dev}")
    base = dict(model="resnet20", dataset="cifar10", batch_size=args.batch_size)
    results = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "device": str(dev), "images": args.images, "batch_size": args.batch_size, "rounds": args.rounds}
    torch.manual_seed(1)
    teacher = create_model("resnet20", num_classes=10).to(dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    jobs = {"scratch": lambda: tensor_resident_rate(data, TrainConfig(**base), dev, args.images)}
    if args.only in ("loader", "all"):
        from kdprobe.data.datasets import _extract_archive

        root = _extract_archive(ARCHIVE)
        jobs["dataloader"] = lambda: dataloader_rate(root, dev, args.images, args.batch_size, args.workers)
    if args.only in ("recipes", "all"):
        configs = {
            "cutmix": (dict(augment="cutmix"), None),
            "autoaugment": (dict(augment="autoaugment"), None),
            "kd-label": (dict(distill="label", teacher="t.pt"), teacher),
            "kd-feature": (dict(distill="feature", teacher="t.pt"), teacher),
            "kd-label+cutmix": (dict(distill="label", teacher="t.pt", augment="cutmix"), teacher),
        }
        for name, (kw, t) in configs.items():
            jobs[name] = (lambda kw=kw, t=t: tensor_resident_rate(data, TrainConfig(**base, **kw), dev, args.images, teacher=t))
    # Interleaved rounds, median per configuration: load drifts on a shared machine, and
    # interleaving spreads that drift over every configuration alike.
    samples = {k: [] for k in jobs}
    for r in range(args.rounds):
        for name, fn in jobs.items():
            samples[name].append(fn())
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in samples.items()), flush=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    results.update(median=med, samples=samples)
    scratch = med["scratch"]
    print(f"\nresnet20, batch {args.batch_size}, {args.images} images x {args.rounds} rounds (median), "
          f"{torch.get_num_threads()} threads, {dev}")
    if "dataloader" in med:
        print(f"  {'tensor-resident (kdprobe)':<28} {scratch:8.1f} img/s")
        print(f"  {'ImageFolder + DataLoader':<28} {med['dataloader']:8.1f} img/s   ({args.workers} workers)")
        print(f"  ratio kdprobe / DataLoader    {scratch / med['dataloader']:8.2f}x\n")
    print(f"  {'recipe':<20} {'img/s':>8}   vs scratch")
    for name in ["scratch"] + [k for k in med if k not in ("scratch", "dataloader")]:
        print(f"  {name:<20} {med[name]:8.1f}   {med[name] / scratch:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
