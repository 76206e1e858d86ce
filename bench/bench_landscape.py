"""Grid points per second of loss-surface evaluation: kdprobe vs loss-landscapes vs the
reference-style serial loop, on this machine, in one run.

Model: resnet20 (option B), CIFAR-10 sized (3x32x32), weights from the seed (speed does
not depend on training; BN shifts get small non-zero values, which loss-landscapes needs).
Data: 512 CIFAR-10 test images, a fixed class-balanced subset of
../shared/data/cifar10-jpeg.tar.gz (the sorted file lists of the ten classes interleaved:
class 0 file 0, class 1 file 0, ...), decoded once with PIL and cached in bench/out/.

Contenders, each on the same NxN grid of the same plane, all without autograd:
  serial      the way Li et al.'s loss-landscape code evaluates (evaluation.eval_loss +
              net_plotter.set_weights): per grid point, weights set in place, model.eval(),
              one pass of a DataLoader at batch 128 over a dataset that converts each image
              PIL -> ToTensor -> Normalize (as torchvision's CIFAR10 with transforms does);
              num_workers=0 (workers would only compete for the same 2 cores).
  loss-landscapes  loss_landscapes.random_plane(normalization='filter') with a
              metrics.Loss over all 512 images as one tensor (model passed in eval mode).
  kdprobe     kdprobe.probes.landscape.compute_surface in fp32 (the default) and in bf16
              (--precision bf16: autocast, fast where the CPU has AVX512-BF16/AMX), default
              chunking; the table also gives bf16's largest loss and accuracy differences from
              fp32 on the same plane.
Rounds alternate the contenders so background load hits all of them alike; the table
shows mean and std over rounds and the best round.

    .venv/bin/python bench/bench_landscape.py            # 5x5 grid, 3 rounds (~2-4 min on 2 cores)
    .venv/bin/python bench/bench_landscape.py --steps 4 --rounds 3 --threads 1   # steadier on a shared machine
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CACHE = ROOT / "bench" / "out" / "cifar10_test512.pt"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10 per-channel, fraction of 255


def cifar_subset(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 N,3,32,32 images, int64 labels): the fixed balanced subset, cached after the first decode."""
    if CACHE.exists():
        blob = torch.load(CACHE, weights_only=True)
        return blob["x"][:n], blob["y"][:n]
    if not ARCHIVE.exists():
        sys.exit(f"no cached subset ({CACHE}) and no archive at {ARCHIVE}; see ../shared/data/README.md")
    import io

    from PIL import Image

    with tarfile.open(ARCHIVE) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile() and "/test/" in m.name and m.name.endswith(".jpg")]
    classes = sorted({p.split("/")[-2] for p in names})
    per = [sorted(p for p in names if p.split("/")[-2] == c) for c in classes]
    order = [per[c][i] for i in range(max(map(len, per))) for c in range(len(classes)) if i < len(per[c])][:n]
    want = set(order)
    imgs = {}
    with tarfile.open(ARCHIVE) as tar:
        for m in tar:
            if m.name in want:
                imgs[m.name] = np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB"))
    x = torch.as_tensor(np.stack([imgs[p] for p in order])).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor([classes.index(p.split("/")[-2]) for p in order])
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"x": x, "y": y, "classes": classes}, CACHE)
    return x, y


class ReferenceStyleDataset(torch.utils.data.Dataset):
    """HWC uint8 images converted per item with PIL + ToTensor + Normalize (torchvision CIFAR10 style)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        import torchvision.transforms as T

        self.images, self.labels = x.permute(0, 2, 3, 1).numpy(), y.tolist()
        self.tf = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.tf(Image.fromarray(self.images[i])), self.labels[i]


def serial_reference(model, loader, dirs, coords) -> np.ndarray:
    """Li et al.-style loop: set weights in place, one DataLoader pass per point, batch 128."""
    crit = torch.nn.CrossEntropyLoss()
    base = [p.detach().clone() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    out = []
    for a, b in coords:
        for p, w, n in zip(model.parameters(), base, names):
            p.data = w + a * dirs.x[n] + b * dirs.y[n]
        model.eval()
        total, loss, correct = 0, 0.0, 0
        with torch.no_grad():
            for inputs, targets in loader:
                outputs = model(inputs)
                loss += crit(outputs, targets).item() * inputs.size(0)
                correct += outputs.max(1)[1].eq(targets).sum().item()
                total += inputs.size(0)
        out.append(loss / total)
    for p, w in zip(model.parameters(), base):
        p.data = w
    return np.array(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="grid is steps x steps points")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for every contender (default: torch's choice, one per core); "
                         "1 is steadier when other jobs share the cores")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import loss_landscapes
    import loss_landscapes.metrics

    from kdprobe.models import create_model
    from kdprobe.probes.landscape import compute_surface, make_directions, parse_grid
    from kdprobe.probes.landscape_eval import resolve_precision

    x8, y = cifar_subset(args.samples)
    x = (x8.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10).eval()
    with torch.no_grad():  # freshly initialised BN shifts are all 0, on which loss-landscapes 3.0.6
        for m in model.modules():  # divides by zero; a trained network has non-zero shifts anyway
            if isinstance(m, torch.nn.BatchNorm2d):
                m.bias.normal_(0, 0.01)
    dirs = make_directions(model, seed=0)
    grid = parse_grid(f"-1:1:{args.steps}")
    coords = [(a, b) for b in grid for a in grid]
    n = len(coords)
    loader = torch.utils.data.DataLoader(ReferenceStyleDataset(x8, y), batch_size=128, shuffle=False, num_workers=0)

    def run_serial():
        return serial_reference(model, loader, dirs, coords)

    def run_ll():
        metric = loss_landscapes.metrics.Loss(torch.nn.CrossEntropyLoss(), x, y)
        return loss_landscapes.random_plane(model, metric, distance=1, steps=args.steps, normalization="filter",
                                            deepcopy_model=True)

    def run_kd(precision):
        return lambda: compute_surface(model, x, y, xcoords=grid, ycoords=grid, directions=dirs,
                                       precision=precision)

    contenders = {"serial (reference-style loop)": run_serial, "loss-landscapes random_plane": run_ll,
                  "kdprobe fp32 (default)": run_kd("fp32"), "kdprobe bf16": run_kd("bf16")}
    times = {k: [] for k in contenders}
    load0 = os.getloadavg()[0]  # other processes on the same cores make every number noisier
    results = {}
    for r in range(args.rounds):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
            print(f"round {r + 1}: {name}: {n / times[name][-1]:.2f} points/s", file=sys.stderr)
    ref = results["serial (reference-style loop)"].reshape(args.steps, args.steps)
    kd, bf = results["kdprobe fp32 (default)"], results["kdprobe bf16"]
    rows = []
    base = statistics.mean(n / t for t in times["serial (reference-style loop)"])
    for name, ts in times.items():
        pps = [n / t for t in ts]
        rows.append({"method": name, "points_per_s_mean": statistics.mean(pps),
                     "points_per_s_std": statistics.stdev(pps) if len(pps) > 1 else 0.0,
                     "points_per_s_best": max(pps), "speedup_vs_serial": statistics.mean(pps) / base,
                     "raw_seconds": ts})
    info = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                       f"torch {torch.__version__}", "load_average_1min_start_end": [load0, os.getloadavg()[0]],
            "model": args.model, "samples": len(y),
            "grid": f"{args.steps}x{args.steps}", "points": n, "rounds": args.rounds,
            "bf16_units": resolve_precision("auto", torch.device("cpu")) == "bf16",
            "max_rel_diff_kdprobe_fp32_vs_serial": float((np.abs(kd.loss - ref) / np.abs(ref)).max()),
            "max_rel_diff_kdprobe_bf16_vs_serial": float((np.abs(bf.loss - ref) / np.abs(ref)).max()),
            "max_rel_loss_diff_bf16_vs_fp32": float((np.abs(bf.loss - kd.loss) / np.abs(kd.loss)).max()),
            "max_acc_diff_points_bf16_vs_fp32": float(np.abs(bf.acc - kd.acc).max()),
            "rows": rows}
    print(f"{args.model}, {len(y)} CIFAR-10 test images, {args.steps}x{args.steps} grid, {args.rounds} rounds, "
          f"{info['machine']}, load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'method':<34}{'points/s mean':>14}{'std':>8}{'best':>8}{'x serial':>10}")
    for row in rows:
        print(f"{row['method']:<34}{row['points_per_s_mean']:>14.2f}{row['points_per_s_std']:>8.2f}"
              f"{row['points_per_s_best']:>8.2f}{row['speedup_vs_serial']:>10.2f}")
    print(f"kdprobe fp32 vs serial loop, same plane: max relative loss difference = "
          f"{info['max_rel_diff_kdprobe_fp32_vs_serial']:.1e} (bf16: "
          f"{info['max_rel_diff_kdprobe_bf16_vs_serial']:.1e})")
    print(f"kdprobe bf16 vs fp32, same plane: max relative loss difference "
          f"{info['max_rel_loss_diff_bf16_vs_fp32']:.1e}, max accuracy difference "
          f"{info['max_acc_diff_points_bf16_vs_fp32']:.2f} points (this CPU has bf16 units: {info['bf16_units']})")
    # achieved GFLOP/s beside this machine's measured fp32 peak (same threads, same run): one grid point is one
    # forward pass over the samples, 2 FLOP per multiply-accumulate, counted by torch's FLOP counter
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x[:1])
    flop_point = fc.get_total_flops() * len(y)
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    a @ b
    best = min((lambda t: (a @ b, time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(5))
    peak = 2 * 4096 ** 3 / best / 1e9
    kd_gf = rows[2]["points_per_s_mean"] * flop_point / 1e9
    info.update(flop_per_point=flop_point, fp32_peak_gflops=peak, kdprobe_fp32_gflops=kd_gf)
    print(f"kdprobe fp32: {kd_gf:.1f} GFLOP/s ({flop_point / 1e9:.1f} GFLOP per point) = {kd_gf / peak:.0%} of this "
          f"machine's measured fp32 peak {peak:.1f} GFLOP/s (4096^2 matrix product, {torch.get_num_threads()} threads)")
    out = ROOT / "bench" / "out" / "landscape_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
