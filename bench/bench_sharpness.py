"""Top Hessian eigenvalue and Hessian trace: kdprobe vs PyHessian's method, same CPU, same vectors, one run.

Model: resnet20 (option B, 10 classes; random init unless --checkpoint), BN in eval mode, mean
cross-entropy over the first --images CIFAR-10 training images of the shared JPEG archive
(decoded once into the kdprobe cache), minibatches of --batch-size.

Baseline (written here, following the loop structure of amirgholami/PyHessian's `hessian`
class, dataloader mode): for every Hessian-vector product, for every minibatch: forward,
loss.backward(create_graph=True), torch.autograd.grad(gradsH, params, grad_outputs=v), summed
with weight batch size / N. Power iteration as PyHessian's `eigenvalues` (normalize, HVP,
Rayleigh quotient), Hutchinson as its `trace` (Rademacher v, v^T H v), with tol = 0 so both
run exactly --iterations steps and --vectors vectors. Both draw their vectors from the same
seeded generator in the same order, so their results must agree to float32 rounding; the
relative differences are printed.

kdprobe: kdprobe.probes.sharpness.HessianOperator (torch.func on functional_call; --mode reuse:
vjp of grad once per minibatch, applied to every vector of a call; --keep-graphs reuses it
across power-iteration steps too; eval-mode BN evaluated as an affine map) with
kdprobe.probes.spectral.power_iteration and hutchinson, i.e. what `kdprobe sharpness` runs.

Run: .venv/bin/python bench/bench_sharpness.py [--images 1024 --iterations 20 --vectors 100]
     [--batch-size 128] [--device cpu|cuda] [--keep-graphs | --both] [--mode reuse|jvp] [--json out.json]
(--both: kdprobe with and without --keep-graphs, against one baseline measurement.)
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdprobe.checkpoint import load_checkpoint
from kdprobe.data import load_dataset
from kdprobe.models import create_model
from kdprobe.probes.sharpness import HessianOperator
from kdprobe.probes.spectral import hutchinson, power_iteration, rademacher

# ../shared next to the checkout (or next to the folder of worktrees)
_CANDIDATES = [Path(__file__).resolve().parents[i] / "shared" / "data" / "cifar10-jpeg.tar.gz" for i in (2, 3)]
ARCHIVE = next((p for p in _CANDIDATES if p.exists()), _CANDIDATES[0])


class PyHessianStyle:
    """PyHessian's dataloader-mode HVP loop: a fresh create_graph backward per minibatch per vector."""

    def __init__(self, model, x, y, batch_size):
        self.model, self.x, self.y, self.bs = model.eval(), x, y, batch_size
        self.params = [p for p in model.parameters() if p.requires_grad]

    def hvp(self, v: list[torch.Tensor]) -> list[torch.Tensor]:
        total = [torch.zeros_like(p) for p in self.params]
        num = 0
        for i in range(0, len(self.y), self.bs):
            xb, yb = self.x[i:i + self.bs], self.y[i:i + self.bs]
            self.model.zero_grad()
            loss = F.cross_entropy(self.model(xb), yb)
            loss.backward(create_graph=True)
            grads = [p.grad for p in self.params]
            self.model.zero_grad()
            hv = torch.autograd.grad(grads, self.params, grad_outputs=v, only_inputs=True, retain_graph=False)
            total = [t + h * float(len(yb)) + 0.0 for t, h in zip(total, hv)]
            num += len(yb)
        return [t / float(num) for t in total]

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [t.view_as(p) for t, p in zip(flat.split([p.numel() for p in self.params]), self.params)]

    def eigenvalue(self, v0: torch.Tensor, iterations: int) -> float:
        """PyHessian's power iteration (top_n = 1, tol = 0: exactly `iterations` HVPs)."""
        v = self.split(v0)
        lam = None
        for _ in range(iterations):
            norm = torch.sqrt(sum((t * t).sum() for t in v))
            v = [t / (norm + 1e-6) for t in v]
            hv = self.hvp(v)
            lam = float(sum((a * b).sum() for a, b in zip(hv, v)))
            v = hv
        return lam

    def trace(self, vectors: torch.Tensor) -> list[float]:
        """PyHessian's Hutchinson loop over the given Rademacher vectors."""
        out = []
        for flat in vectors:
            v = self.split(flat)
            hv = self.hvp(v)
            out.append(float(sum((a * b).sum() for a, b in zip(hv, v))))
        return out


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    """Print both methods' results, their relative difference, times and the speed ratio."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--iterations", type=int, default=20, help="power-iteration steps (HVPs) for the top eigenvalue")
    ap.add_argument("--vectors", type=int, default=100, help="Hutchinson vectors for the trace")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--vectors-per-pass", type=int, default=25)
    ap.add_argument("--mode", default="reuse", choices=("reuse", "jvp"))
    ap.add_argument("--keep-graphs", action="store_true", help="kdprobe keeps the per-batch graphs across calls")
    ap.add_argument("--both", action="store_true",
                    help="time kdprobe with and without --keep-graphs against one baseline measurement")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0")) or None)
    ap.add_argument("--checkpoint", default=None, help="a resnet20 checkpoint instead of a random init")
    ap.add_argument("--dataset", default=f"imagefolder:{ARCHIVE}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    data = load_dataset(args.dataset)
    x, y = data.head("train", args.images)
    x, y = x.to(dev), y.to(dev)
    if args.checkpoint:
        model = load_checkpoint(args.checkpoint, map_location=dev).model
    else:
        torch.manual_seed(args.seed)
        model = create_model("resnet20", num_classes=data.num_classes, in_channels=data.in_channels).to(dev)
    model.eval()

    kinds = [False, True] if args.both else [args.keep_graphs]
    ops = {keep: HessianOperator(model, x, y, batch_size=args.batch_size, mode=args.mode, keep_graphs=keep)
           for keep in kinds}
    dim = ops[kinds[0]].dim
    base = PyHessianStyle(model, x, y, args.batch_size)
    gen = torch.Generator().manual_seed(args.seed)
    v0 = torch.randn(dim, generator=gen)
    chunks = [rademacher((min(args.vectors_per_pass, args.vectors - i), dim), gen)
              for i in range(0, args.vectors, args.vectors_per_pass)]
    vecs = torch.cat(chunks).to(dev)

    def ours_eig(op):
        return power_iteration(op.hvp, op.dim, k=1, iterations=args.iterations, tol=0.0,
                               generator=torch.Generator().manual_seed(args.seed), device=dev)[0].value

    def ours_trace(op):
        g = torch.Generator().manual_seed(args.seed)
        torch.randn(op.dim, generator=g)  # skip the start vector, as `sharpness` does
        return hutchinson(op.hvp_many, op.dim, samples=args.vectors, chunk=args.vectors_per_pass, generator=g,
                          device=dev)

    def row(eig, tr, t_eig, t_tr):
        return dict(eigenvalue=eig, trace=sum(tr) / len(tr), per_vector=tr, eig_wall=t_eig[0], eig_cpu=t_eig[1],
                    trace_wall=t_tr[0], trace_cpu=t_tr[1])

    rows = {}
    (b_eig, *te) = _timed(lambda: base.eigenvalue(v0.to(dev), args.iterations))
    (b_tr, *tt) = _timed(lambda: base.trace(vecs))
    rows["pyhessian"] = row(b_eig, b_tr, te, tt)
    for keep in kinds:
        o = ops.pop(keep)  # dropped after its turn: kept graphs hold GBs
        (k_eig, *te) = _timed(lambda: ours_eig(o))
        (k_tr, *tt) = _timed(lambda: ours_trace(o))
        rows["kdprobe --keep-graphs" if keep else "kdprobe"] = row(k_eig, k_tr, te, tt)
        del o
    print(f"resnet20, {args.images} images, batch {args.batch_size}, {args.iterations} power iterations, "
          f"{args.vectors} Hutchinson vectors, device {dev}, {torch.get_num_threads()} threads, mode {args.mode}")
    print(f"{'method':<22} {'top eigenvalue':>15} {'trace':>13} {'eig s (wall/cpu)':>18} {'trace s (wall/cpu)':>19}"
          f" {'x faster (wall/cpu)':>20} {'rel diff eig/trace/per-vector':>30}")
    b = rows["pyhessian"]
    scale = sum(abs(v) for v in b["per_vector"]) / len(b["per_vector"])  # per-vector values can nearly cancel
    summary = {}
    for name, r in rows.items():
        tw, tc = r["eig_wall"] + r["trace_wall"], r["eig_cpu"] + r["trace_cpu"]
        bw, bc = b["eig_wall"] + b["trace_wall"], b["eig_cpu"] + b["trace_cpu"]
        rel = (abs(r["eigenvalue"] - b["eigenvalue"]) / abs(b["eigenvalue"]),
               abs(r["trace"] - b["trace"]) / abs(b["trace"]),
               max(abs(u - v) for u, v in zip(r["per_vector"], b["per_vector"])) / scale)
        summary[name] = dict(speedup_wall=bw / tw, speedup_cpu=bc / tc, rel_eig=rel[0], rel_trace=rel[1],
                             rel_vec=rel[2])
        print(f"{name:<22} {r['eigenvalue']:>15.6f} {r['trace']:>13.4f} {r['eig_wall']:>8.1f}/{r['eig_cpu']:<9.1f}"
              f" {r['trace_wall']:>8.1f}/{r['trace_cpu']:<9.1f} {bw / tw:>9.2f}x/{bc / tc:<9.2f}"
              f" {rel[0]:.1e}/{rel[1]:.1e}/{rel[2]:.1e}")
    print("x faster = PyHessian's total (eigenvalue + trace) time / this row's; rel diff = relative to PyHessian's "
          "values (per-vector: largest |v^T H v| difference over their mean |v^T H v|)")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(vars(args), results=rows, summary=summary), indent=2) + "\n")


if __name__ == "__main__":
    main()
