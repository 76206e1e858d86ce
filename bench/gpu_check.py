"""One short GPU check of kdprobe's hot paths (run by bench/gpu_check.sh; about 3-6 minutes on one GPU).

Prints, on the GPU it finds:
  1. ResNet-56 (option B, 10 classes) training throughput in images/s: batch 64 and 512, x
     loader "tensor" (kdprobe's: uint8 dataset resident on the GPU, crop/flip/normalize on the
     GPU through trainers.recipes.Recipe, as trainers.loop does) and loader "dataloader" (the
     reference codebases': torch DataLoader with workers, PIL RandomCrop(32, 4) + flip + ToTensor
     + Normalize per image, pinned host batches copied to the GPU), x eager vs torch.compile(model).
     Every step: bf16 autocast, SGD (momentum 0.9, wd 5e-4), channels-last, as the loop runs it.
  2. Loss-landscape grid points/s (kdprobe.probes.landscape.compute_surface, default chunking).
  3. Seconds per checkpoint of the diversity score (Jacobian correlation v1, N=128, 3x32x32).
Data: synthetic CIFAR-shaped uint8 images (speed does not depend on pixel values), or
--data imagefolder:PATH (e.g. the shared cifar10-jpeg.tar.gz). Throughput is images processed
per second of steady state, after warm-up steps (and after compilation, whose time is listed).
Without CUDA it says so and runs a tiny CPU smoke pass of the same code (not a benchmark).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdprobe.data import TensorData, load_dataset, normalize  # noqa: E402
from kdprobe.models import create_model  # noqa: E402

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def synthetic(n: int) -> TensorData:
    """n random 3x32x32 uint8 training images (and 256 test images), 10 classes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return TensorData("synthetic-cifar", x, y, x[:256].clone(), y[:256].clone(), tuple(map(str, range(10))),
                      CIFAR_MEAN, CIFAR_STD)


class _PilSet(torch.utils.data.Dataset):
    """The reference pipeline: one PIL image per item through torchvision transforms."""

    def __init__(self, data: TensorData):
        from torchvision import transforms as T

        self.x, self.y = data.train_x.permute(0, 2, 3, 1).contiguous().numpy(), data.train_y
        self.tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                             T.Normalize(data.mean, data.std)])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image

        return self.tf(Image.fromarray(self.x[i])), self.y[i]


def _model(name, data, dev, compiled):
    torch.manual_seed(0)
    m = create_model(name, num_classes=data.num_classes, in_channels=data.in_channels).to(dev)
    if dev.type == "cuda":
        m = m.to(memory_format=torch.channels_last)
    return m, (torch.compile(m) if compiled else m)


def train_throughput(data, dev, raw, run, *, model, batch, loader, seconds, warmup, workers):
    """(images/s, warm-up seconds incl. any compilation, steps timed) of training `run` (raw, or compiled)."""
    from trainers.config import TrainConfig
    from trainers.recipes import Recipe

    opt = torch.optim.SGD(raw.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    if loader == "tensor":
        gpu = data.to(dev)
        recipe = Recipe(TrainConfig(model=model, dataset="synthetic", batch_size=batch), raw, None, gpu)
        gen = torch.Generator(device=dev).manual_seed(0)
        perm = torch.randperm(len(gpu.train_y), generator=gen, device=dev)

        def batches():
            i = 0
            while True:
                if (i + 1) * batch > len(perm):
                    i = 0
                idx = perm[i * batch:(i + 1) * batch]
                mb = recipe.batch(gpu.train_x[idx], gpu.train_y[idx], gen)
                yield mb.x, mb.y_a
                i += 1
    else:
        dl = torch.utils.data.DataLoader(_PilSet(data), batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=workers, pin_memory=dev.type == "cuda",
                                         persistent_workers=workers > 0)

        def batches():
            while True:
                for x, y in dl:
                    yield x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)

    it = batches()

    def step():
        x, y = next(it)
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(**amp):
            loss = F.cross_entropy(run(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    raw.train()
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(dev)
    warm = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        step()
        n += 1
        if n % 10 == 0:
            _sync(dev)
    _sync(dev)
    return n * batch / (time.perf_counter() - t0), warm, n


def landscape_rate(data, dev, *, model, samples, steps):
    """Grid points/s of compute_surface on a steps x steps grid (one warm-up point first)."""
    from kdprobe.probes.landscape import compute_surface, make_directions

    m, _ = _model(model, data, dev, False)
    m.eval()
    x = normalize(data.train_x[:samples], data.mean, data.std).to(dev)
    y = data.train_y[:samples].to(dev)
    dirs = make_directions(m, seed=0)
    compute_surface(m, x, y, xcoords=[0.0], ycoords=[0.0], directions=dirs)  # warm-up (tracing, kernels)
    _sync(dev)
    t0 = time.perf_counter()
    res = compute_surface(m, x, y, xcoords=torch.linspace(-1, 1, steps).tolist(),
                          ycoords=torch.linspace(-1, 1, steps).tolist(), directions=dirs)
    _sync(dev)
    return steps * steps / (time.perf_counter() - t0), res.precision


def diversity_time(data, dev, *, model, n, repeats):
    """Median seconds of one jacobian_score (one checkpoint, one batch of n)."""
    from kdprobe.probes.diversity import jacobian_score

    m, _ = _model(model, data, dev, False)
    m.eval()
    x = normalize(data.train_x[:n], data.mean, data.std).to(dev)
    jacobian_score(m, x)  # warm-up
    times = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        jacobian_score(m, x)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    """Run every measurement, print one table, write the numbers as JSON; exit 0 (also on CPU-only machines)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="synthetic", help="synthetic | imagefolder:PATH | cifar10 (with --data-dir)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seconds", type=float, default=6.0, help="timed steady-state seconds per training setting")
    ap.add_argument("--batches", default="64,512")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", str(ROOT / "bench" / "out")),
                                                    "gpu_check.json"))
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        print("no CUDA GPU found: running a tiny CPU smoke pass of the same code paths (numbers are NOT a "
              "benchmark); run bench/gpu_check.sh on a machine with a GPU", flush=True)
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    name = torch.cuda.get_device_name(dev) if cuda else "cpu (smoke)"
    print(f"device: {name}; torch {torch.__version__}; data: {args.data}", flush=True)
    data = synthetic(50_000 if cuda else 512) if args.data == "synthetic" else load_dataset(args.data, args.data_dir)
    model = "resnet56" if cuda else "resnet8b"
    workers = min(8, os.cpu_count() or 1) if cuda else 0
    settings = [(b, loader, comp) for b in ([int(v) for v in args.batches.split(",")] if cuda else [64])
                for comp in ((False,) if args.no_compile or not cuda else (False, True))
                for loader in ("tensor", "dataloader")]
    rows, t_start, nets = [], time.perf_counter(), {}
    for batch, loader, comp in settings:
        try:
            if (batch, comp) not in nets:  # both loaders share one (compiled) model: compile once per shape
                nets = {(batch, comp): _model(model, data, dev, comp)}
            ips, warm, n = train_throughput(data, dev, *nets[(batch, comp)], model=model, batch=batch,
                                            loader=loader, seconds=args.seconds if cuda else 0.5,
                                            warmup=5 if cuda else 1, workers=workers)
            rows.append({"what": f"train {model} batch {batch}", "loader": loader,
                         "mode": "compile" if comp else "eager", "value": round(ips, 1), "unit": "images/s",
                         "note": f"{n} steps timed; warm-up {warm:.1f}s" + (" (compiles here)" if comp and loader ==
                                                                           "tensor" else "")})
        except Exception as e:  # one failing setting (e.g. no compiler for torch.compile) must not hide the rest
            rows.append({"what": f"train {model} batch {batch}", "loader": loader,
                         "mode": "compile" if comp else "eager", "value": None, "unit": "images/s",
                         "note": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"})
        print(f"  {rows[-1]}", flush=True)
    pts, prec = landscape_rate(data, dev, model=model, samples=2048 if cuda else 64, steps=9 if cuda else 3)
    rows.append({"what": f"landscape {model}", "loader": "tensor", "mode": prec, "value": round(pts, 2),
                 "unit": "points/s", "note": f"{2048 if cuda else 64} samples per point, default chunking"})
    print(f"  {rows[-1]}", flush=True)
    n_div = 128 if cuda else 16
    secs = diversity_time(data, dev, model=model, n=n_div, repeats=5 if cuda else 2)
    rows.append({"what": f"diversity {model}", "loader": "tensor", "mode": "v1 bn=eval", "value": round(secs, 4),
                 "unit": "s/checkpoint", "note": f"one batch of N={n_div} (x R batches per checkpoint)"})
    width = max(len(r["what"]) for r in rows)
    print(f"\n{'measurement':<{width}}  {'loader':<10} {'mode':<11} {'value':>10}  unit          note")
    for r in rows:
        v = "failed" if r["value"] is None else f"{r['value']:.4g}"
        print(f"{r['what']:<{width}}  {r['loader']:<10} {r['mode']:<11} {v:>10}  {r['unit']:<13} {r['note']}")
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s on {name}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "data": args.data,
                                           "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
