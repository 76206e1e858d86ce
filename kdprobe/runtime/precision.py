"""What "fp32" and "deterministic" mean on every device: the global torch switches, set and restored.

Precision (`numerics`):
  * "fp32": every float32 matmul and convolution in IEEE fp32 (23-bit mantissa). On this torch
    build cuDNN convolutions default to TF32 (`torch.backends.cudnn.conv.fp32_precision ==
    "tf32"`: 10-bit mantissa on Ampere and later), which moved a digits diversity score by 6.7%
    when emulated on CPU; so probes switch TF32 off around their computation;
  * "tf32": TF32 on for cuBLAS and cuDNN (faster on a GPU, an explicit choice that results record);
  * "bf16": autocast chooses bf16 for matmuls and convolutions; every op left in fp32 is IEEE fp32.
The switches are process-global: `numerics` sets them on entry and puts back exactly what it found.

Determinism (`deterministic`): cuDNN's deterministic kernels, no autotuning (`benchmark=False`),
`torch.use_deterministic_algorithms(True)` (an op without a deterministic kernel raises instead of
running one with atomics), and CUBLAS_WORKSPACE_CONFIG=":4096:8" (cuBLAS reads it when its
workspace is first allocated, so it is set in the process environment before the first GPU call).
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch

from kdprobe.errors import KdprobeError

PRECISIONS = ("fp32", "tf32", "bf16")
CUBLAS_WORKSPACE = ":4096:8"  # cuBLAS's documented setting for reproducible results (4 MiB x 8 buffers)
# the fp32_precision switches of torch >= 2.9 ("ieee" | "tf32" | "bf16" | "none" = inherit from the parent)
_NEW_API = ("cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")
_GPU = ("cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn")  # TF32 exists on these only (CPU oneDNN stays ieee)


class NumericsWarning(UserWarning):
    """A computation ran other than asked (folding off, a smaller chunk after out-of-memory); the message says how."""


def _node(path: str):
    o = torch.backends
    for part in path.split("."):
        o = getattr(o, part, None)
        if o is None:
            return None
    return o


def _new_api() -> list[str]:
    return [p for p in _NEW_API if hasattr(_node(p), "fp32_precision")]


def numerics_state() -> dict:
    """Every switch that decides fp32 arithmetic, as a dict (for restoring and for tests)."""
    state = {"float32_matmul_precision": torch.get_float32_matmul_precision()}
    paths = _new_api()
    for p in paths:
        state[p] = _node(p).fp32_precision
    if not paths:  # older torch: the legacy booleans (reading them after the new API was used raises)
        state["cuda.matmul.allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        state["cudnn.allow_tf32"] = torch.backends.cudnn.allow_tf32
    return state


def _apply(state: dict) -> None:
    torch.set_float32_matmul_precision(state["float32_matmul_precision"])  # first: it rewrites the new switches
    for p in _NEW_API:  # parents before children, in the order of _NEW_API
        if p in state:
            _node(p).fp32_precision = state[p]
    if "cudnn.allow_tf32" in state:
        torch.backends.cuda.matmul.allow_tf32 = state["cuda.matmul.allow_tf32"]
        torch.backends.cudnn.allow_tf32 = state["cudnn.allow_tf32"]


def _target(precision: str) -> dict:
    tf32 = precision == "tf32"
    state = {"float32_matmul_precision": "high" if tf32 else "highest"}
    paths = _new_api()
    for p in paths:
        state[p] = "tf32" if tf32 and p in _GPU else "ieee"
    if not paths:
        state["cuda.matmul.allow_tf32"] = state["cudnn.allow_tf32"] = tf32
    return state


def check_precision(precision: str, choices: tuple[str, ...] = PRECISIONS) -> str:
    """`precision` if it is one of `choices`, else a KdprobeError naming them."""
    if precision not in choices:
        raise KdprobeError(f"expected precision in {choices}, got {precision!r}; pick one of them")
    return precision


@contextmanager
def numerics(precision: str = "fp32") -> Iterator[None]:
    """Run the block with fp32 arithmetic as `precision` says (see the module docstring); restore after."""
    check_precision(precision)
    saved = numerics_state()
    _apply(_target(precision))
    try:
        yield
    finally:
        _apply(saved)


def fp32_exact():
    """numerics("fp32"): TF32 off on every device for the block."""
    return numerics("fp32")


def tf32_enabled() -> bool:
    """True when some fp32 matmul or convolution on a GPU may run in TF32 under the current switches."""
    s = numerics_state()
    if "cudnn.allow_tf32" in s:
        return bool(s["cuda.matmul.allow_tf32"] or s["cudnn.allow_tf32"])
    conv = s.get("cudnn.conv") if s.get("cudnn.conv") not in (None, "none") else s.get("cudnn")
    mm = s.get("cuda.matmul") if s.get("cuda.matmul") not in (None, "none") else None
    mm_tf32 = mm == "tf32" if mm is not None else s["float32_matmul_precision"] != "highest"
    return conv == "tf32" or mm_tf32


def set_cublas_workspace() -> None:
    """CUBLAS_WORKSPACE_CONFIG for reproducible cuBLAS, unless the user set one (must precede the first GPU call)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


def determinism_state() -> dict:
    """The determinism switches as they are now (recorded in checkpoints' metadata)."""
    return {"cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "deterministic_algorithms": bool(torch.are_deterministic_algorithms_enabled()),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


@contextmanager
def deterministic(enabled: bool = True) -> Iterator[dict]:
    """Deterministic kernels for the block (enabled) or cuDNN autotuning (not); yields the state set; restores after."""
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if enabled:
        set_cublas_workspace()
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled  # autotuning picks kernels by timing: run to run they differ
    torch.use_deterministic_algorithms(enabled, warn_only=False)
    try:
        yield determinism_state()
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def nondeterministic_op(e: BaseException) -> str | None:
    """The message of a 'no deterministic implementation' RuntimeError, else None."""
    msg = str(e)
    if isinstance(e, RuntimeError) and "deterministic" in msg and ("does not have a deterministic" in msg
                                                                      or "CUBLAS_WORKSPACE_CONFIG" in msg):
        return msg.splitlines()[0][:200]
    return None


def warn(message: str) -> None:
    """Say that a computation ran other than asked (a NumericsWarning; the CLI shows it on stderr)."""
    warnings.warn(message, NumericsWarning, stacklevel=3)
