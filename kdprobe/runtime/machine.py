"""The machine a number was computed on: what decides whether it reproduces bit for bit.

The same seed and the same torch give the same bits only on the same *machine type*: float
sums are not associative, and which order a reduction adds in depends on the vector width of
the kernel that runs it. ATen picks its kernels by CPU capability (DEFAULT, AVX2, AVX512; the
environment variable ATEN_CPU_CAPABILITY can lower it), MKL and oneDNN pick theirs by the CPU's
instruction sets (MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA), and intra-op threads split a
reduction into as many partial sums. A GPU is a machine of its own. So a record holds the CPU
model, the instruction-set extensions those libraries dispatch on, ATen's capability, the thread
count, any of those environment overrides that are set, and the CUDA device when there is one.
Two records are the same machine type when every field is equal (`same_machine`).
"""
from __future__ import annotations

import os
import platform
from functools import lru_cache

import torch

#: instruction-set extensions that change which kernels ATen / MKL / oneDNN run (from /proc/cpuinfo flags)
DISPATCH_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                  "amx_bf16", "amx_fp16", "asimd", "sve", "sve2")
#: environment variables that override kernel dispatch or thread counts; recorded when set
DISPATCH_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
                "MKL_CBWR", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, tuple[str, ...]]:
    """(CPU model name, dispatch-relevant flags) from /proc/cpuinfo; platform's answer where there is none."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and not model:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:  # macOS, Windows: no /proc
        pass
    model = model or platform.processor() or platform.machine() or "unknown"
    return model, tuple(f for f in DISPATCH_FLAGS if f in flags)


def machine(device: torch.device | str | None = None) -> dict:
    """The machine record: cpu, cpu_flags, cpu_capability, threads, env overrides, and the CUDA device if used."""
    model, flags = _cpuinfo()
    rec = {"cpu": model, "arch": platform.machine(), "cpu_flags": " ".join(flags),
           "cpu_capability": str(torch.backends.cpu.get_cpu_capability()), "threads": torch.get_num_threads()}
    env = {k: os.environ[k] for k in DISPATCH_ENV if os.environ.get(k)}
    if env:
        rec["env"] = env
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" or dev is None and torch.cuda.is_available() and torch.cuda.is_initialized():
        idx = dev.index if dev is not None and dev.index is not None else torch.cuda.current_device()
        rec["cuda"] = torch.cuda.get_device_name(idx)
        rec["cuda_capability"] = ".".join(map(str, torch.cuda.get_device_capability(idx)))
    return rec


def machine_of(versions: dict | None) -> dict | None:
    """The machine record inside a `versions` dict (a checkpoint's meta or a summary); None when it has none."""
    m = (versions or {}).get("machine")
    return m if isinstance(m, dict) else None


def same_machine(a: dict | None, b: dict | None, torch_a: str | None = None, torch_b: str | None = None) -> bool:
    """True when two records (and torch versions, when given) name one machine type; False when either is missing."""
    if a is None or b is None:
        return False
    return a == b and torch_a == torch_b


def describe(m: dict | None) -> str:
    """One line: 'Intel Xeon (AVX512, 2 threads)' or 'not recorded'."""
    if not m:
        return "not recorded"
    parts = [str(m.get("cpu_capability", "?")), f"{m.get('threads', '?')} threads"]
    if m.get("cuda"):
        parts.insert(0, str(m["cuda"]))
    if m.get("env"):
        parts.append(" ".join(f"{k}={v}" for k, v in m["env"].items()))
    return f"{m.get('cpu', '?')} ({', '.join(parts)})"


def available_memory() -> int | None:
    """Bytes of memory free for a new allocation now (MemAvailable; total memory where that is unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
