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
    issue 10's test); "auto" (bf16 where the hardware has bf16 units) is opt-in;
  * P > 1 points share one forward pass through torch.func.vmap over functional_call
    (a grouped convolution per layer: a win on GPUs, a loss on CPUs, so the CPU default
    is P = 1, one plain forward per point).
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
from kdprobe.probes.bn_fold import agrees, fold_plan, fold_state

_BN = nn.modules.batchnorm._BatchNorm
BN_MODES = ("eval", "recompute")
PRECISIONS = ("auto", "fp32", "bf16")


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
    if device.type == "cuda":
        return 8, 1024
    return 1, (128 if precision == "bf16" else 64)


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
        self.x = x.to(self.device)
        self.y = y.to(self.device, torch.long)
        self.names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
        self.eval_module, self.pairs, self.fold = fold_plan(model, self.x[:4]) if fold_bn else (None, [], "none")
        if self.eval_module is not None and not agrees(model, self.eval_module, self.pairs, self.x[:4]):
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

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _batches(self):
        for i in range(0, self.x.shape[0], self.batch_size):
            yield self.x[i:i + self.batch_size], self.y[i:i + self.batch_size]

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
                for xb, _ in self._batches():
                    functional_call(self.stats_module, point, (xb,))
        return out

    def _fold(self, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return t if self.eval_keys is None else fold_state(t, self.pairs, self.eval_keys)

    @torch.no_grad()
    def __call__(self, stacked: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy (P,) and accuracy in percent (P,) at P stacked parameter sets."""
        missing = set(self.names) - set(stacked)
        assert not missing, sorted(missing)
        P = next(iter(stacked.values())).shape[0]
        if self.bn == "recompute":
            stacked = self._recompute(stacked)
        feed = self._fold(stacked)
        loss = torch.zeros(P, dtype=torch.float32, device=self.device)
        correct = torch.zeros(P, dtype=torch.long, device=self.device)
        fwd = lambda p, xb: functional_call(self.eval_module, p, (xb,))  # noqa: E731
        if P == 1:  # channels-last 4-D weights keep every conv on the fast path, even for 1-channel inputs
            one = {k: v[0].contiguous(memory_format=torch.channels_last) if v.dim() == 5 else v[0]
                   for k, v in feed.items()}
        for xb, yb in self._batches():
            with self._autocast():
                if P == 1:  # channels-last: oneDNN's and cuDNN's fast layout (vmap has no rule for it)
                    xb = xb.contiguous(memory_format=torch.channels_last) if xb.dim() == 4 else xb
                    logits = fwd(one, xb).unsqueeze(0)
                else:
                    logits = vmap(fwd, in_dims=(0, None))(feed, xb)
            logits = logits.float()  # fp32 loss accumulation under bf16 autocast
            ce = F.cross_entropy(logits.flatten(0, 1), yb.repeat(P), reduction="none")
            loss += ce.view(P, -1).sum(1)
            correct += (logits.argmax(-1) == yb).sum(1)
        n = self.x.shape[0]
        return loss / n, correct.float() * (100.0 / n)
