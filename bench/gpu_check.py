"""One short GPU check of kdprobe's hot paths (run by bench/gpu_check.sh; about 3-6 minutes on one GPU).

Prints, on the GPU it finds:
  1. ResNet-56 (option B, 10 classes) training throughput in images/s: batch 64 and 512, x
     loader "tensor" (kdprobe's: uint8 dataset resident on the GPU, crop/flip/normalize on the
     GPU through trainers.recipes.Recipe, as trainers.loop does) and loader "dataloader" (the
     reference codebases': torch DataLoader with workers, PIL RandomCrop(32, 4) + flip + ToTensor
     + Normalize per image, pinned host batches copied to the GPU), x eager vs torch.compile(model).
     Every step: bf16 autocast, SGD (momentum 0.9, wd 5e-4), channels-last, as the loop runs it.
     Training runs as `kdprobe train` does: deterministic kernels and TF32 off (kdprobe.runtime.precision);
     one more row measures the cost of that default (batch 512, --no-deterministic: cuDNN autotuning).
  2. Loss-landscape grid points/s (kdprobe.probes.landscape.compute_surface, default chunking, the
     model in the layout `kdprobe landscape` gives it, not channels-last), in fp32 (TF32 off, the
     default), tf32 and bf16, with the largest loss difference of each from fp32; the warm-up grid
     has as many points as one timed forward (the vmap path) plus one (the single-point path).
  3. Seconds per checkpoint of the diversity score (Jacobian correlation v1, N=128, 3x32x32), and
     the score's relative change under TF32 (what "fp32" would have been without the switch).
Data: synthetic CIFAR-shaped uint8 images (speed does not depend on pixel values), or
--data imagefolder:PATH (e.g. the shared cifar10-jpeg.tar.gz). Throughput is images processed
per second of steady state, after warm-up steps (and after compilation, whose time is listed).
Without CUDA it says so and runs a tiny CPU smoke pass of the same code (not a benchmark).

Every measurement is its own step: one that fails is recorded as failed and the rest still run,
and the JSON file is rewritten after every row, so a run stopped by the time cap keeps what it
measured. It installs nothing and prints the versions it ran with (the device machine's python
may carry another torch than .venv). --fail STEP forces a step to fail (to test exactly that).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdprobe.data.datasets import TensorData, load_dataset, normalize  # noqa: E402
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


def _model(name, data, dev, compiled, channels_last=True):
    torch.manual_seed(0)
    m = create_model(name, num_classes=data.num_classes, in_channels=data.in_channels).to(dev)
    if dev.type == "cuda" and channels_last:  # as trainers.loop trains; the probes get the model as loaded
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


def landscape_rate(data, dev, *, model, samples, steps, precisions=("fp32", "tf32", "bf16")):
    """{precision: (grid points/s, max |loss - fp32 loss|)} of compute_surface on a steps x steps grid."""
    from kdprobe.probes.landscape import compute_surface, make_directions
    from kdprobe.probes.landscape_eval import default_chunking

    m, _ = _model(model, data, dev, False, channels_last=False)  # `kdprobe landscape` never converts it
    m.eval()
    x = normalize(data.train_x[:samples], data.mean, data.std).to(dev)
    y = data.train_y[:samples].to(dev)
    dirs = make_directions(m, seed=0)
    P = default_chunking(dev)[0]
    grid = torch.linspace(-1, 1, steps).tolist()
    out, ref = {}, None
    for precision in precisions:
        # warm-up: one full chunk of P points (vmap) and one single point, the two paths the grid takes
        compute_surface(m, x, y, xcoords=torch.linspace(-1, 1, P + 1).tolist(), ycoords=[0.0], directions=dirs,
                        precision=precision)
        _sync(dev)
        t0 = time.perf_counter()
        res = compute_surface(m, x, y, xcoords=grid, ycoords=grid, directions=dirs, precision=precision)
        _sync(dev)
        rate = steps * steps / (time.perf_counter() - t0)
        ref = res.loss if ref is None else ref
        out[precision] = (rate, float(abs(res.loss - ref).max()))
    return out


def diversity_time(data, dev, *, model, n, repeats):
    """(median seconds of one jacobian_score, the score, its relative change with TF32 on)."""
    from kdprobe.runtime.precision import numerics
    from kdprobe.probes.diversity import correlation_matrix, input_jacobian, jacobian_score, score_from_eigenvalues

    m, _ = _model(model, data, dev, False, channels_last=False)
    m.eval()
    x = normalize(data.train_x[:n], data.mean, data.std).to(dev)
    jacobian_score(m, x)  # warm-up
    times = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        score = jacobian_score(m, x)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    # the same score with the Jacobian taken under TF32: the probe's function without its fp32 switch
    with numerics("tf32"):
        rows = getattr(input_jacobian, "__wrapped__", input_jacobian)(m, x)
    tf32 = score_from_eigenvalues(torch.linalg.eigvalsh(correlation_matrix(rows)))
    return statistics.median(times), score, (tf32 - score) / abs(score) if score else float("nan")


def versions(dev) -> dict:
    """What this run ran with: the device machine's python may carry another torch than the project's .venv."""
    from kdprobe.runtime.precision import numerics_state

    v = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
         "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
         else None, "numerics_default": numerics_state()}
    try:
        import torchvision
        v["torchvision"] = torchvision.__version__
    except ImportError:
        v["torchvision"] = None
    if dev.type == "cuda":
        v["gpu"] = torch.cuda.get_device_name(dev)
        v["capability"] = ".".join(map(str, torch.cuda.get_device_capability(dev)))
        v["gpus"] = torch.cuda.device_count()
    return v


class Report:
    """Rows printed and written to JSON as each finishes (atomically), so a stopped run keeps them."""

    def __init__(self, path: str, head: dict):
        self.path, self.head, self.rows = Path(path), head, []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write(complete=False)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(f"  {row}", flush=True)
        self.write(complete=False)

    def write(self, complete: bool, stopped: str | None = None) -> None:
        doc = dict(self.head, rows=self.rows, complete=complete, **({"stopped": stopped} if stopped else {}))
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, self.path)


def _step(report: Report, name: str, fail: set, base: dict, fn):
    """Run one measurement; its rows, or one failed row: never an exception that hides the next steps."""
    try:
        if name in fail:
            raise RuntimeError(f"forced failure of step {name!r} (--fail)")
        for row in fn():
            report.add(dict(base, step=name, **row))
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - one failing measurement must not lose the others
        msg = str(e).splitlines()[0][:160] if str(e) else ""
        report.add(dict(base, step=name, value=None, note=f"failed: {type(e).__name__}: {msg}"))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


STEPS = ("train", "determinism", "landscape", "diversity")


def main(argv=None) -> int:
    """Run every measurement, print one table, write the numbers as JSON row by row; exit 0 (also without a GPU)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="synthetic", help="synthetic | imagefolder:PATH | cifar10 (with --data-dir)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seconds", type=float, default=6.0, help="timed steady-state seconds per training setting")
    ap.add_argument("--batches", default="64,512")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"which steps to run, of {','.join(STEPS)}")
    ap.add_argument("--fail", default="", help="force these steps to fail (comma-separated; tests the JSON)")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", str(ROOT / "bench" / "out")),
                                                    "gpu_check.json"))
    args = ap.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    fail = {s for s in args.fail.split(",") if s}
    unknown = sorted((set(steps) | fail) - set(STEPS))
    if unknown:
        ap.error(f"unknown step(s) {unknown}; expected some of {','.join(STEPS)}")

    from kdprobe.runtime.precision import deterministic, fp32_exact

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        print("no CUDA GPU found: running a tiny CPU smoke pass of the same code paths (numbers are NOT a "
              "benchmark); run bench/gpu_check.sh on a machine with a GPU", flush=True)
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    name = torch.cuda.get_device_name(dev) if cuda else "cpu (smoke)"
    v = versions(dev)
    print(f"device: {name}; data: {args.data}", flush=True)
    print("versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if k != "numerics_default"), flush=True)
    report = Report(args.json, {"device": name, "torch": torch.__version__, "versions": v, "data": args.data})
    t_start = time.perf_counter()
    try:
        data = synthetic(50_000 if cuda else 512) if args.data == "synthetic" else load_dataset(args.data,
                                                                                               args.data_dir)
        model = "resnet56" if cuda else "resnet8b"
        workers = min(8, os.cpu_count() or 1) if cuda else 0
        seconds, warmup = (args.seconds, 5) if cuda else (0.5, 1)
        train_kw = dict(model=model, seconds=seconds, warmup=warmup, workers=workers)

        def train_rows(batch, loader, comp, det=True):
            def run():
                # as `kdprobe train` runs: TF32 off, and on a GPU deterministic kernels unless --no-deterministic
                with fp32_exact(), (deterministic(det) if cuda else nullcontext()):
                    ips, warm, n = train_throughput(data, dev, *_model(model, data, dev, comp), batch=batch,
                                                    loader=loader, **train_kw)
                yield {"value": round(ips, 1), "note": f"{n} steps timed; warm-up {warm:.1f}s"
                       + (" (compiles here)" if comp else "")}
            return run

        if "train" in steps:
            for batch in [int(b) for b in args.batches.split(",")] if cuda else [64]:
                for comp in (False,) if args.no_compile or not cuda else (False, True):
                    for loader in ("tensor", "dataloader"):
                        _step(report, "train", fail, {"what": f"train {model} batch {batch}", "loader": loader,
                                                      "mode": ("compile" if comp else "eager") + (" det" if cuda else ""),
                                                      "unit": "images/s"}, train_rows(batch, loader, comp))
        if "determinism" in steps:
            batch = 512 if cuda else 64
            _step(report, "determinism", fail, {"what": f"train {model} batch {batch}", "loader": "tensor",
                                                "mode": "eager no-det", "unit": "images/s"},
                  train_rows(batch, "tensor", False, det=False))

        if "landscape" in steps:
            samples, grid = (2048, 9) if cuda else (64, 3)

            def land():
                for prec, (rate, diff) in landscape_rate(data, dev, model=model, samples=samples, steps=grid).items():
                    yield {"mode": prec, "value": round(rate, 2),
                           "note": f"{samples} samples per point, default chunking; max |loss - fp32| {diff:.2e}"}
            _step(report, "landscape", fail, {"what": f"landscape {model}", "loader": "tensor",
                                              "mode": "fp32", "unit": "points/s"}, land)

        if "diversity" in steps:
            n_div = 128 if cuda else 16

            def div():
                secs, score, rel = diversity_time(data, dev, model=model, n=n_div, repeats=5 if cuda else 2)
                yield {"value": round(secs, 4), "note": f"one batch of N={n_div}; score {score:.2f}, "
                                                        f"{100 * rel:+.2f}% if taken under TF32"}
            _step(report, "diversity", fail, {"what": f"diversity {model}", "loader": "tensor",
                                              "mode": "v1 bn=eval fp32", "unit": "s/checkpoint"}, div)
    except KeyboardInterrupt:  # the time cap (timeout -s INT): keep what was measured
        report.write(complete=False, stopped=f"interrupted after {time.perf_counter() - t_start:.0f}s")
        print(f"gpu_check: interrupted; {len(report.rows)} rows kept in {args.json}", flush=True)
        return 130
    rows = report.rows
    if rows:
        width = max(len(r["what"]) for r in rows)
        print(f"\n{'measurement':<{width}}  {'loader':<10} {'mode':<16} {'value':>10}  unit          note")
        for r in rows:
            val = "failed" if r["value"] is None else f"{r['value']:.4g}"
            print(f"{r['what']:<{width}}  {r.get('loader', ''):<10} {r.get('mode', ''):<16} {val:>10}  "
                  f"{r.get('unit', ''):<13} {r.get('note', '')}")
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s on {name}")
    report.write(complete=True)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
