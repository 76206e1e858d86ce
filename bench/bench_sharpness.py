"""Time to equal accuracy, top Hessian eigenvalue + Hessian trace: kdprobe vs the `pyhessian` package.

Same model, same samples, BN in eval mode for every contender, one process, one run.
Baseline: PyHessian 0.1 (Yao et al. 2020), the package itself, in both of its modes:
  single      hessian(model, criterion, data=(x, y)): one forward + create_graph backward over the
              whole sample set, reused by every Hessian-vector product (its faster mode);
  dataloader  hessian(..., dataloader=batches of --batch-size): forward + double backward per
              minibatch per product.
Install it for benchmarking only (never a kdprobe dependency):
    .venv/bin/pip install pyhessian==0.1 --no-deps
Without it the baseline is skipped with a message and only kdprobe's numbers are printed.

Equal accuracy:
  eigenvalue  within --eig-rtol (1e-3) of a converged reference (kdprobe Lanczos to 1e-9 relative,
              cross-checked against PyHessian's own last iterate). PyHessian's power iteration is
              charged only up to the first product whose Rayleigh quotient is within the tolerance
              and stays there for one more step (an oracle stop it could not make itself: generous).
  trace       the standard error PyHessian's Hutchinson reaches with --vectors (100) Rademacher
              vectors (std/sqrt(n) of its own samples); kdprobe runs with --trace-rtol set to that
              relative standard error and must reach it.
kdprobe = `kdprobe.probes.sharpness.sharpness` (Lanczos + Hutch++, keep_graphs) as `kdprobe sharpness
--keep-graphs --trace-rtol R` runs it, timed from the model to the result (graph building included).
Also printed: the achieved GFLOP/s of one kdprobe Hessian-vector product (torch's FLOP counter) beside
this machine's measured fp32 peak (a 4096x4096 matrix product on the same threads), and the load.

Run: .venv/bin/python bench/bench_sharpness.py [--checkpoint runs/x.pt] [--dataset digits] [--images 1024]
     [--model resnet20] [--threads 1] [--vectors 100] [--skip-dataloader] [--json out.json]
With no --checkpoint a resnet20 is trained on digits for the run (25 s; a random init has no
meaningful spectrum).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:  # the checkpoint and data modules may live in sub-packages
    from kdprobe.checkpoints import load_checkpoint  # type: ignore
except ImportError:
    from kdprobe.checkpoints.format import load_checkpoint
try:
    from kdprobe.data.datasets import load_dataset
except ImportError:  # pragma: no cover
    from kdprobe.data.datasets import load_dataset  # type: ignore
from kdprobe.models import create_model
from kdprobe.probes.sharpness import HessianOperator, sharpness
from kdprobe.probes.spectral import lanczos_top


def load() -> str:
    """The 1/5/15-minute load averages, as uptime prints them."""
    return "load %.2f %.2f %.2f" % os.getloadavg()


def fp32_peak(threads: int) -> float:
    """GFLOP/s of a 4096x4096 fp32 matrix product (best of 5) on the current threads."""
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    a @ b
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 4096 ** 3 / best / 1e9


def hvp_gflops(op: HessianOperator) -> tuple[float, float]:
    """(GFLOP per Hessian-vector product by torch's counter, achieved GFLOP/s over 3 timed products)."""
    from torch.utils.flop_counter import FlopCounterMode

    v = torch.randn(op.dim)
    op.hvp(v)  # builds the kept graphs
    with FlopCounterMode(display=False) as fc:
        op.hvp(v)
    flop = fc.get_total_flops()
    t = time.perf_counter()
    for _ in range(3):
        op.hvp(v)
    return flop / 1e9, flop * 3 / (time.perf_counter() - t) / 1e9


class _Stop(Exception):
    pass


def pyhessian_run(model, x, y, *, mode: str, batch_size: int, ref: float, rtol: float, vectors: int,
                  cap: int, seed: int) -> dict:
    """PyHessian in one mode: time to the eigenvalue (oracle stop) and to `vectors` Hutchinson samples."""
    import importlib

    ph = importlib.import_module("pyhessian.hessian")  # the module (the package exports the class by that name)

    torch.manual_seed(seed)
    crit = torch.nn.CrossEntropyLoss()
    traj: list[tuple[float, float]] = []
    t0 = time.perf_counter()
    if mode == "single":
        h = ph.hessian(model, crit, data=(x, y), cuda=False)
    else:
        batches = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]
        h = ph.hessian(model, crit, dataloader=batches, cuda=False)
    t_build = time.perf_counter() - t0
    within = {"n": 0}

    def record(lam: float) -> None:
        traj.append((time.perf_counter() - t0, lam))
        within["n"] = within["n"] + 1 if abs(lam - ref) <= rtol * abs(ref) else 0
        if within["n"] >= 2:  # within the tolerance, and still there one product later
            raise _Stop

    orig_hvp, orig_dl = ph.hessian_vector_product, h.dataloader_hv_product

    def hvp_rec(gradsH, params, v):
        hv = orig_hvp(gradsH, params, v)
        record(float(sum((a * b).sum() for a, b in zip(hv, v))))
        return hv

    def dl_rec(v):
        lam, hv = orig_dl(v)
        record(lam)
        return lam, hv

    ph.hessian_vector_product, h.dataloader_hv_product = hvp_rec, dl_rec
    try:
        h.eigenvalues(maxIter=cap, tol=0.0, top_n=1)
        reached = False
    except _Stop:
        reached = True
    finally:
        ph.hessian_vector_product, h.dataloader_hv_product = orig_hvp, orig_dl
    # time to the eigenvalue: up to the first product inside the tolerance (the extra confirming product not charged)
    first_in = len(traj) - 1 if reached else len(traj)
    t_eig = traj[first_in - 1][0] if reached else traj[-1][0]
    t1 = time.perf_counter()
    samples = h.trace(maxIter=vectors, tol=0.0)
    t_trace = time.perf_counter() - t1
    s = np.asarray(samples)
    return dict(mode=mode, build_s=t_build, eig_s=t_eig, eig_products=first_in, eig_reached=reached,
                eigenvalue=traj[first_in - 1][1] if reached else traj[-1][1], trace_s=t_trace, trace=float(s.mean()),
                trace_se=float(s.std(ddof=1) / math.sqrt(len(s))), vectors=len(s), total_s=t_eig + t_trace)


def main() -> None:
    """Print the time-to-equal-accuracy table, kdprobe's HVP GFLOP/s and the fp32 peak."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=128, help="PyHessian's dataloader mode minibatch")
    ap.add_argument("--kd-batch-size", type=int, default=0, help="kdprobe's minibatch (0 = all images)")
    ap.add_argument("--vectors", type=int, default=100, help="PyHessian's Hutchinson vectors")
    ap.add_argument("--eig-rtol", type=float, default=1e-3)
    ap.add_argument("--power-cap", type=int, default=100)
    ap.add_argument("--trace-sketch", type=int, default=10)
    ap.add_argument("--skip-dataloader", action="store_true")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0")) or 1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"start: {time.strftime('%Y-%m-%d %H:%M:%S')}, {load()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {args.threads} torch threads, torch {torch.__version__}")
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = str(Path(tempfile.gettempdir()) / f"kdprobe_bench_{args.model}_digits.pt")
        if not Path(ckpt).exists():
            subprocess.run([sys.executable, "-m", "cli.main", "train", "-o", ckpt, "--model", args.model, "--dataset",
                            "digits", "--preset", "fast"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    model = load_checkpoint(ckpt).model.eval()
    x, y = load_dataset(args.dataset).head("train", args.images)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.model} ({n_params:,} parameters) from {ckpt}, {len(y)} {args.dataset} training images, BN eval")

    peak = fp32_peak(args.threads)
    kbs = args.kd_batch_size or len(y)
    op = HessianOperator(model, x, y, batch_size=kbs, keep_graphs=True)
    gflop, gflops = hvp_gflops(op)
    ref_run = lanczos_top(op.hvp, op.dim, k=1, steps=80, tol=1e-9, generator=torch.Generator().manual_seed(99))
    ref = ref_run.pairs[0].value
    del op
    print(f"reference top eigenvalue {ref:.6f} (Lanczos, {ref_run.pairs[0].iterations} steps, residual "
          f"{ref_run.pairs[0].residual:.2e}); fp32 peak {peak:.1f} GFLOP/s (4096^2 matmul); one kdprobe HVP = "
          f"{gflop:.2f} GFLOP at {gflops:.1f} GFLOP/s = {gflops / peak:.1%} of peak; {load()}")

    rows = []
    try:
        import pyhessian  # noqa: F401
        have = True
    except ImportError:
        have = False
        print("pyhessian not installed: baseline skipped (.venv/bin/pip install pyhessian==0.1 --no-deps)")
    if have:
        for mode in ("single",) + (() if args.skip_dataloader else ("dataloader",)):
            r = pyhessian_run(model, x, y, mode=mode, batch_size=args.batch_size, ref=ref, rtol=args.eig_rtol,
                              vectors=args.vectors, cap=args.power_cap, seed=args.seed)
            r["load"] = load()
            rows.append(r)
            print(f"pyhessian {mode}: eigenvalue {r['eigenvalue']:.5f} after {r['eig_products']} products "
                  f"({'reached' if r['eig_reached'] else 'NOT reached'}) {r['eig_s']:.1f} s; trace {r['trace']:.3f} "
                  f"± {r['trace_se']:.3f} ({r['vectors']} vectors) {r['trace_s']:.1f} s; {r['load']}", flush=True)
    target = min(r["trace_se"] / abs(r["trace"]) for r in rows) if rows else 0.03
    t0 = time.perf_counter()
    res = sharpness(model, x, y, tol=args.eig_rtol, trace_samples=10 * args.vectors, trace_rtol=target,
                    trace_sketch=args.trace_sketch, batch_size=kbs, keep_graphs=True, seed=args.seed)
    t_k = time.perf_counter() - t0
    eig_ok = abs(res.top_eigenvalue - ref) <= args.eig_rtol * abs(ref)
    se_ok = res.trace_se <= target * abs(res.trace) * (1 + 1e-9)
    kd = dict(mode="kdprobe lanczos+hutch++", total_s=t_k, eigenvalue=res.top_eigenvalue,
              eig_products=res.eig_products, trace=res.trace, trace_se=res.trace_se, vectors=res.trace_vectors,
              trace_low=res.trace_low, trace_high=res.trace_high, stable=res.trace_stable, note=res.trace_note,
              products=res.products, eig_ok=eig_ok, se_ok=se_ok, load=load())
    print(f"kdprobe: eigenvalue {res.top_eigenvalue:.5f} after {res.eig_products} products (within {args.eig_rtol:g}: "
          f"{eig_ok}); trace {res.trace:.3f} ± {res.trace_se:.3f} ({res.trace_vectors} vectors + {res.trace_sketch} "
          f"deflated, se target {target:.4f} relative: {se_ok}), 95% interval [{res.trace_low:.3f}, "
          f"{res.trace_high:.3f}]{'' if res.trace_stable else ' (not stable: ' + res.trace_note + ')'}; "
          f"{res.products} products, {t_k:.1f} s; {kd['load']}")
    print(f"\n{'method':<28}{'eig products':>13}{'trace vectors':>14}{'trace ± se':>20}{'total s':>10}{'kdprobe x':>11}")
    for r in rows + [kd]:
        print(f"{r['mode']:<28}{r['eig_products']:>13}{r['vectors']:>14}{r['trace']:>12.3f} ± {r['trace_se']:<6.3f}"
              f"{r['total_s']:>10.1f}{r['total_s'] / t_k:>10.2f}x")
    if rows:
        best = min(rows, key=lambda r: r["total_s"])
        print(f"kdprobe vs pyhessian's faster mode ({best['mode']}): {best['total_s'] / t_k:.2f}x at equal accuracy "
              f"(eigenvalue within {args.eig_rtol:g}: {eig_ok}; trace se <= pyhessian's: {se_ok}); end: {load()}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(vars(args), reference=ref, peak_gflops=peak, hvp_gflop=gflop,
                                                   hvp_gflops=gflops, baseline=rows, kdprobe=kd), indent=2) + "\n")


if __name__ == "__main__":
    main()
