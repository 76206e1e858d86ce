"""Loss and accuracy of one model architecture at many parameter points, fast.

The landscape probes (kdprobe.probes.landscape) hand this engine stacked parameter
sets: every parameter and buffer name -> tensor of shape (P, *shape), P points. Speed
comes from four things, each optional and each exact up to float rounding:
  * eval-mode BatchNorm is folded into the preceding convolution per point
    (W' = W * g/sqrt(var+eps), b' = (b - mean) * g/sqrt(var+eps) + beta) wherever
    kdprobe.probes.bn_fold proves the pair (torch.fx, or a recorded forward for models fx
    cannot trace) and the folded copy agrees with the model on the samples; else unfolded;
  * 4-D inputs are kept channels-last (oneDNN / cuDNN's fast layout);
  * precision "bf16" runs the forward under torch.autocast; logits, loss and counts
    are accumulated in fp32. The default is "fp32" on every device, the surface the
    reference computes (bf16 moved losses by up to 1.3% and accuracies by 0.28 points in
    issue 10's test), run with TF32 off (kdprobe.runtime.precision: cuDNN convolutions default to
    TF32 on this torch build); "tf32" keeps TF32 on (a GPU's fast fp32, recorded like bf16);
    "auto" (bf16 where the hardware has bf16 units) is opt-in;
  * P > 1 points share one forward pass through torch.func.vmap over functional_call
    (a grouped convolution per layer: a win on GPUs, a loss on CPUs, so the CPU default
    is P = 1, one plain forward per point).
Samples per forward are bounded by free memory (`plan_chunks`: a per-sample activation
estimate times the points per forward, within half of what the device has free); a forward
that still runs out of memory is retried with half the samples (then half the points), with
a NumericsWarning that says so.
The caller's model is never touched: the engine works on private copies whose own
tensors are never read (functional_call supplies every parameter and buffer).
"""
from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap

from kdprobe.errors import KdprobeError
from kdprobe.runtime.machine import available_memory
from kdprobe.runtime.precision import numerics, warn
from kdprobe.probes.bn_fold import agrees, fold_plan, fold_state

_BN = nn.modules.batchnorm._BatchNorm
BN_MODES = ("eval", "recompute")
PRECISIONS = ("auto", "fp32", "tf32", "bf16")
MEMORY_FRACTION = 0.5  # of the free memory a forward's activations may plan to take (the rest: margin, allocator)


def bf16_is_fast(device: torch.device) -> bool:
    """True where bf16 matrix units exist: CUDA (sm80+) or a CPU with AVX512-BF16/AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:  # private helpers, present since torch 2.1; absent means "assume not"
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        except AttributeError:
            return False
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bf16' where the hardware runs it natively, else 'fp32'."""
    if precision not in PRECISIONS:
        raise KdprobeError(f"expected precision in {PRECISIONS}, got {precision!r}; pick one of them")
    if precision == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    return precision


def default_chunking(device: torch.device, precision: str = "fp32") -> tuple[int, int]:
    """(points per forward, samples per forward) that measured fastest on this device type."""
    # CPU (2-core AVX512 EPYC, resnet20 32x32): vmap turns every conv into a grouped conv,
    # 2-3x slower per point on oneDNN, so one point per forward; fp32 is fastest at 64
    # samples per forward (activations stay in cache), bf16 at 128.
    # CUDA: several points per forward keep the GPU busy; bench/landscape_gpu.py sweeps it.
    # Both are upper bounds: PointEvaluator lowers the samples to what free memory holds (plan_chunks).
    if device.type == "cuda":
        return 8, 1024
    return 1, (128 if precision == "bf16" else 64)


def plan_chunks(free_bytes: int | None, per_sample_bytes: int, points: int, max_samples: int, *,
                point_bytes: int = 0, fraction: float = MEMORY_FRACTION) -> tuple[int, int]:
    """(points, samples) per forward whose activations fit in `fraction` of `free_bytes`.

    per_sample_bytes: activation bytes of one sample at one point; point_bytes: bytes each point
    adds besides (its stacked and folded weights). Points are halved first, down to 1, then the
    samples fit what is left (at least 1: a forward that still fails is caught as out of memory).
    None for free_bytes or 0 for per_sample_bytes (unknown) leaves the upper bounds as they are.
    """
    points, max_samples = max(1, int(points)), max(1, int(max_samples))
    if free_bytes is None or per_sample_bytes <= 0:
        return points, max_samples
    budget = float(free_bytes) * fraction
    while points > 1 and points * (point_bytes + per_sample_bytes) > budget:
        points //= 2
    left = budget - points * point_bytes
    samples = int(left // max(1, points * per_sample_bytes)) if left > 0 else 1
    return points, max(1, min(max_samples, samples))


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device`: the GPU's free memory plus what torch holds unused; host memory on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        return available_memory()
    return None


def activation_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of every module output in one forward of x (a bound on what the forward holds at once)."""
    total = 0

    def hook(_m, _args, out):
        nonlocal total
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    handles = [m.register_forward_hook(hook) for m in module.modules() if m is not module]
    try:
        with torch.no_grad():
            out = module(x)
        hook(None, None, out)
    finally:
        for h in handles:
            h.remove()
    return total + x.numel() * x.element_size()


def is_out_of_memory(e: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, or a RuntimeError saying out of memory (CPU allocators, older torch)."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


class PointEvaluator:
    """Evaluate `model`'s architecture on fixed data (x, y) at stacked parameter sets."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, bn: str = "eval",
                 precision: str = "fp32", batch_size: int | None = None, fold_bn: bool = True):
        if bn not in BN_MODES:
            raise KdprobeError(f"expected bn in {BN_MODES}, got {bn!r}; use 'eval' or 'recompute'")
        if x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise KdprobeError(f"expected as many labels as inputs (> 0), got {x.shape[0]} inputs, "
                               f"{y.shape[0]} labels; pass matching tensors")
        self.device = next(model.parameters()).device
        self.bn, self.precision = bn, resolve_precision(precision, self.device)
        self.batch_size = int(batch_size or default_chunking(self.device, self.precision)[1])
        if self.batch_size < 1:
            raise KdprobeError(f"expected batch_size >= 1, got {batch_size}; pass a positive number")
        self.fixed_batch = batch_size is not None  # the caller's samples per forward: not planned, only halved on OOM
        self.x = x.to(self.device)
        self.y = y.to(self.device, torch.long)
        self.names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
        self.eval_module, self.pairs, self.fold = fold_plan(model, self.x[:4]) if fold_bn else (None, [], "none")
        self.fold_note = None  # why folding is off although the model has conv->BN pairs
        if self.eval_module is not None and not agrees(model, self.eval_module, self.pairs, self.x[:4]):
            # agrees() compares in true fp32 (TF32 off), so this is the folded graph differing, not rounding
            self.fold_note = (f"BN folding is off for this model: the folded copy's logits differ from the model's "
                              f"beyond rtol 1e-3 ({len(self.pairs)} conv->BN pairs found by {self.fold}); the "
                              "landscape runs unfolded (same numbers, slower)")
            warn(self.fold_note)
            self.eval_module, self.pairs, self.fold = None, [], "none"  # unproven in effect: run unfolded
        self.eval_keys = set(self.eval_module.state_dict()) if self.eval_module is not None else None
        if self.eval_module is None:
            self.eval_module = copy.deepcopy(model).eval()
        self.stats_module = None
        if bn == "recompute":  # only BN layers train (dropout etc. stay in eval mode)
            self.stats_module = copy.deepcopy(model).eval()
            for m in self.stats_module.modules():
                if isinstance(m, _BN) and m.track_running_stats:
                    m.train()
                    m.momentum = None  # cumulative average over the batches (Li et al.; swa_utils.update_bn)
        # memory: activations of one sample (fp32 forward; bf16 needs less), weights of one point (stacked,
        # folded, and the perturbation's temporaries: 3 copies)
        try:
            self.per_sample_bytes = activation_bytes(self.eval_module, self.x[:1])
        except Exception:  # noqa: BLE001 - a forward that needs more than one sample: no estimate, OOM halving only
            self.per_sample_bytes = 0
        self.point_bytes = 3 * sum(t.numel() * t.element_size() for t in model.state_dict().values())
        self.samples_for: dict[int, int] = {}  # points per forward -> samples per forward (planned, then halved)

    def samples_per_forward(self, points: int, free_bytes: int | None = None) -> int:
        """Samples per forward for `points` points: the planned figure (batch_size at most), lowered after an OOM."""
        if points not in self.samples_for:
            if self.fixed_batch:
                self.samples_for[points] = self.batch_size
            else:
                free = free_memory(self.device) if free_bytes is None else free_bytes
                _, n = plan_chunks(free, self.per_sample_bytes, points, self.batch_size, point_bytes=self.point_bytes)
                self.samples_for[points] = n
        return self.samples_for[points]

    def _numerics(self):
        # bf16 autocast runs matmuls/convs in bf16; what stays fp32 is true fp32, as in "fp32"
        return numerics("tf32" if self.precision == "tf32" else "fp32")

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _batches(self, size: int | None = None):
        size = size or self.batch_size
        for i in range(0, self.x.shape[0], size):
            yield self.x[i:i + size], self.y[i:i + size]

    def _recompute(self, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Re-estimate BN running statistics point by point with a train-mode pass."""
        out = dict(t)
        for name, m in self.stats_module.named_modules():
            if isinstance(m, _BN) and m.track_running_stats:
                p = f"{name}." if name else ""
                for key, fill in (("running_mean", 0), ("running_var", 1), ("num_batches_tracked", 0)):
                    old = t[p + key]  # may be an expanded (stride-0) view: make a real tensor
                    out[p + key] = torch.full(old.shape, fill, dtype=old.dtype, device=old.device)
        for i in range(next(iter(t.values())).shape[0]):
            point = {k: v[i] for k, v in out.items()}  # views: BN updates them in place
            with self._autocast():
                for xb, _ in self._batches():  # batch_size exactly: BN statistics are averaged per batch
                    functional_call(self.stats_module, point, (xb,))
        return out

    def _fold(self, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return t if self.eval_keys is None else fold_state(t, self.pairs, self.eval_keys)

    @torch.no_grad()
    def __call__(self, stacked: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy (P,) and accuracy (P,), a fraction 0-1 in float64 (correct / n exactly, the value
        kdprobe eval gives), at P stacked parameter sets."""
        missing = set(self.names) - set(stacked)
        assert not missing, sorted(missing)
        with self._numerics():
            if self.bn == "recompute":
                stacked = self._recompute(stacked)
            return self._fit(self._fold(stacked))

    def _fit(self, feed: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluate, halving the samples (then the points) per forward after an out-of-memory error."""
        P = next(iter(feed.values())).shape[0]
        while True:
            n = self.samples_per_forward(P)
            try:
                return self._evaluate(feed, P, n)
            except Exception as e:  # noqa: BLE001 - only out-of-memory is handled; everything else re-raised
                if not is_out_of_memory(e):
                    raise
                what = f"{type(e).__name__}"
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # outside the except block: the failed forward's tensors are freed
            if n > 1:
                self.samples_for[P] = n // 2
                warn(f"out of memory ({what}) at {P} point(s) x {n} samples per forward on {self.device}; "
                     f"continuing with {n // 2} samples per forward")
            elif P > 1:
                h = P // 2
                warn(f"out of memory ({what}) at {P} points x 1 sample per forward on {self.device}; "
                     f"continuing with {h} and {P - h} points")
                a = self._fit({k: v[:h] for k, v in feed.items()})
                b = self._fit({k: v[h:] for k, v in feed.items()})
                return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])
            else:
                raise KdprobeError(f"out of memory evaluating one sample at one point on {self.device}; free "
                                   "memory on the device (other processes) or use --device cpu") from None

    def _forward(self, params: dict[str, torch.Tensor], xb: torch.Tensor, P: int) -> torch.Tensor:
        """Logits (P, n, classes) of one chunk of samples at P points."""
        fwd = lambda p, x: functional_call(self.eval_module, p, (x,))  # noqa: E731
        with self._autocast():
            if P == 1:  # channels-last: oneDNN's and cuDNN's fast layout (vmap has no rule for it)
                xb = xb.contiguous(memory_format=torch.channels_last) if xb.dim() == 4 else xb
                return fwd(params, xb).unsqueeze(0)
            return vmap(fwd, in_dims=(0, None))(params, xb)

    def _evaluate(self, feed: dict[str, torch.Tensor], P: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        loss = torch.zeros(P, dtype=torch.float32, device=self.device)
        correct = torch.zeros(P, dtype=torch.long, device=self.device)
        params = feed
        if P == 1:  # channels-last 4-D weights keep every conv on the fast path, even for 1-channel inputs
            params = {k: v[0].contiguous(memory_format=torch.channels_last) if v.dim() == 5 else v[0]
                      for k, v in feed.items()}
        for xb, yb in self._batches(size):
            logits = self._forward(params, xb, P).float()  # fp32 loss accumulation under bf16 autocast
            ce = F.cross_entropy(logits.flatten(0, 1), yb.repeat(P), reduction="none")
            loss += ce.view(P, -1).sum(1)
            correct += (logits.argmax(-1) == yb).sum(1)
        n = self.x.shape[0]
        return loss / n, correct.to(torch.float64) / n
