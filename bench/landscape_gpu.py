"""GPU sweep for the landscape engine: points/s for each (precision, points per forward,
samples per forward), against the reference-style serial loop on the same GPU.

Run on a machine with CUDA (one short call, about 2-4 minutes for the defaults):
    python bench/landscape_gpu.py                      # resnet20 and resnet56, 2048 samples
    python bench/landscape_gpu.py --models resnet56 --samples 10000 --steps 8
Smoke test without a GPU:  python bench/landscape_gpu.py --device cpu --quick
Data: the cached CIFAR-10 subset of bench_landscape.py when it holds enough images
(carry bench/out to the GPU machine), else random normal inputs: speed does not depend
on pixel values. Writes bench/out/landscape_gpu.json after every row (a stopped run keeps them).
The serial reference runs in true fp32 (TF32 off, as kdprobe's "fp32"), so "max rel diff" of the
fp32 rows is rounding and that of the tf32 and bf16 rows is what those precisions cost.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def data(n: int, dev: torch.device):
    """(normalized float inputs on dev, labels on dev, source string)."""
    from bench_landscape import CACHE, MEAN, STD

    if CACHE.exists():
        blob = torch.load(CACHE, weights_only=True)
        if len(blob["y"]) >= n:
            x = (blob["x"][:n].float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
            return x.to(dev), blob["y"][:n].to(dev), "cifar10 subset"
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 3, 32, 32, generator=g).to(dev), torch.randint(0, 10, (n,), generator=g).to(dev),
            "random normal")


def serial(model, x, y, dirs, coords, batch=128):
    """Li et al.-style: weights set in place, model.eval(), batches of 128, .item() per batch; TF32 off."""
    from kdprobe.runtime.precision import fp32_exact

    with fp32_exact():
        return _serial(model, x, y, dirs, coords, batch)


def _serial(model, x, y, dirs, coords, batch):
    crit = torch.nn.CrossEntropyLoss()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = []
    with torch.no_grad():
        for a, b in coords:
            for n, p in model.named_parameters():
                p.data = base[n] + a * dirs.x[n].to(p.device) + b * dirs.y[n].to(p.device)
            model.eval()
            loss, total = 0.0, 0
            for i in range(0, len(y), batch):
                o = model(x[i:i + batch])
                loss += crit(o, y[i:i + batch]).item() * len(o)
                total += len(o)
            out.append(loss / total)
        for n, p in model.named_parameters():
            p.data = base[n]
    return np.array(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6, help="grid is steps x steps")
    ap.add_argument("--points", nargs="+", type=int, default=[1, 4, 8, 16])
    ap.add_argument("--batches", nargs="+", type=int, default=[512, 2048])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sweep (smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.models, args.samples, args.steps, args.points, args.batches = ["resnet8"], 64, 2, [1, 2], [32]

    from kdprobe.models import create_model
    from kdprobe.probes.landscape import compute_surface, make_directions, parse_grid

    dev = torch.device(args.device)
    # cuDNN autotuning stays off (torch's default), as `kdprobe landscape` runs: measure what the command runs
    x, y, source = data(args.samples, dev)
    grid = parse_grid(f"-1:1:{args.steps}")
    n = grid.size ** 2
    coords = [(a, b) for b in grid for a in grid]
    rows = []
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    out = ROOT / "bench" / "out" / "landscape_gpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(rows, complete=False):
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps({"device": name, "torch": torch.__version__, "samples": args.samples,
                                   "data": source, "grid": f"{args.steps}x{args.steps}", "rows": rows,
                                   "complete": complete}, indent=2) + "\n")
        tmp.replace(out)

    print(f"{name}, {args.samples} samples ({source}), {args.steps}x{args.steps} grid", flush=True)
    for model_name in args.models:
        torch.manual_seed(0)
        model = create_model(model_name, num_classes=10).to(dev).eval()
        dirs = make_directions(model, seed=0)
        serial(model, x, y, dirs, coords[:1])  # warm-up (cuDNN autotune)
        _sync(dev)
        t0 = time.perf_counter()
        ref = serial(model, x, y, dirs, coords)
        _sync(dev)
        base = n / (time.perf_counter() - t0)
        rows.append({"model": model_name, "method": "serial loop (batch 128)", "points_per_s": base})
        write(rows)
        print(f"{model_name:<10} serial loop, batch 128          {base:9.2f} points/s", flush=True)
        for precision in ("bf16", "tf32", "fp32"):
            for P in args.points:
                for B in args.batches:
                    kw = dict(directions=dirs, precision=precision, points_per_batch=P, batch_size=B)
                    try:
                        # warm-up on exactly P points: the vmap width the timed grid runs
                        compute_surface(model, x, y, xcoords=np.linspace(-1, 1, P), ycoords=grid[:1], **kw)
                        _sync(dev)
                        t0 = time.perf_counter()
                        res = compute_surface(model, x, y, xcoords=grid, ycoords=grid, **kw)
                        _sync(dev)
                        pps = n / (time.perf_counter() - t0)
                    except torch.OutOfMemoryError:
                        print(f"{model_name:<10} {precision} P={P} B={B}: out of memory", flush=True)
                        torch.cuda.empty_cache()
                        continue
                    rel = float((np.abs(res.loss.ravel() - ref) / np.abs(ref)).max())
                    rows.append({"model": model_name, "method": "kdprobe", "precision": precision,
                                 "points_per_batch": P, "batch_size": B, "points_per_s": pps,
                                 "speedup_vs_serial": pps / base, "max_rel_diff_vs_serial": rel})
                    write(rows)
                    print(f"{model_name:<10} kdprobe {precision} P={P:<3} B={B:<5}     {pps:9.2f} points/s "
                          f"x{pps / base:5.1f}  max rel diff {rel:.1e}", flush=True)
    write(rows, complete=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
