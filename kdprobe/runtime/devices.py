"""Which torch device a command runs on: 'auto', 'cpu', 'cuda' or 'cuda:N', refused when it is not there."""
from __future__ import annotations

import torch

from kdprobe.errors import KdprobeError


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; a requested but missing GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise KdprobeError(f"expected --device auto, cpu, cuda or cuda:N; got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KdprobeError(f"--device {device} asked for a GPU but CUDA is not available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise KdprobeError(f"--device {device} names GPU {dev.index} but this machine has {n} GPU(s) "
                           f"(cuda:0 to cuda:{n - 1}); pick one of them")
    return dev
