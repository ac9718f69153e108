"""Where tensors run and where randomness comes from: the device, seeds, seeded noise, mixed precision.

Every command and lesson picks its device with `pick_device`, seeds with `set_seed`, and draws the noise
that must not disturb training's own random streams (validation, evaluation, figures) under `seeded`.
Training and validation run under `autocast`: bf16 matrix products where the hardware has them; and training
asks glibc to keep the memory a step frees for the next one (`keep_freed_memory`).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import ContextManager

import numpy as np
import torch


def pick_device(name: str | torch.device | None = "auto") -> torch.device:
    """`auto` (or None): CUDA, then Apple's MPS, then CPU; otherwise the device named.

    Taught in notebooks/00_setup.ipynb.
    """
    if name is None or str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but PyTorch sees no CUDA GPU; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} asked for, but MPS is not available; use --device cpu or auto")
    return device


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices). Taught in notebooks/00_setup.ipynb."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run a block with torch's generators seeded by `seed`, then restore them as they were.

    Two evaluations of the same weights then draw the same noise, and the caller's random streams (a
    training run that is later resumed exactly) are untouched. On CUDA the device's generator is saved too.
    """
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of x86 CPUs with bf16 arithmetic


def cpuinfo(path: str | Path = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ("model name", "flags", ...); {} where there is none."""
    try:
        lines = Path(path).read_text().split("\n\n")[0].splitlines()
    except OSError:
        return {}
    return {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in lines)}


def cpu_name() -> str:
    """This CPU's model name as /proc/cpuinfo gives it ("AMD EPYC"), else what `platform` knows."""
    return cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown CPU"


@functools.cache
def cpu_has_bf16(path: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 natively: AVX512-BF16 or AMX among the flags of `cpuinfo(path)`.

    Without them PyTorch emulates bf16 with conversions to and from fp32, so `autocast` leaves such CPUs in
    fp32. False where there is no /proc/cpuinfo (macOS, Windows).
    """
    flags = set(cpuinfo(path).get("flags", "").split())
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype:
    """The dtype `autocast(device, enabled)` computes matrix products in: bf16 on CUDA and on CPUs with
    bf16 arithmetic (`cpu_has_bf16`), else fp32."""
    if enabled and (device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())):
        return torch.bfloat16
    return torch.float32


def has_fused_adamw(device: torch.device) -> bool:
    """Whether `torch.optim.AdamW(..., fused=True)` runs on this device: one kernel for every parameter."""
    return device.type in ("cpu", "cuda")


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """`x` in fp32 when autocast left it in bf16 (or fp16); fp32 and fp64 stay as they are.

    What a network hands back is summed over pixels, tokens or latent dimensions next, so it leaves in
    full precision; a float64 model (the maths tests) keeps its float64.
    """
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def autocast(device: torch.device, enabled: bool) -> ContextManager:
    """bf16 autocast when `enabled` and the device computes bf16 natively (`amp_dtype`); fp32 otherwise.

    bf16 keeps fp32's exponent range, so no loss scaling is needed (unlike fp16). Autocast runs the matrix
    products (linear layers, convolutions, GRUs) in bf16; the networks hand back fp32 (their last line casts),
    so the ELBO's sums, KL terms and logsumexps are reduced in fp32.
    """
    if amp_dtype(device, enabled) == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


# glibc's mallopt parameters (malloc.h) and the values `keep_freed_memory` sets them to.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest: blocks up to 32 MiB come from the heap
TRIM_THRESHOLD = 256 * 2**20  # free memory at the top of the heap kept for the next step


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the process, for the next training step to reuse.

    A training step allocates and frees tensors of a few MB (the `cpu` preset's 192 decoded images are
    2.4 MB each time). By default glibc hands such blocks back to the kernel on free, and every reuse then
    faults their pages in again: 1300-1550 page faults and 2.2-2.8 ms of system time per `cpu` preset step,
    against 80-90 and 0.2-0.3 ms with these thresholds (benchmarks/README.md). The cost: memory a step
    freed stays with the process (up to 256 MB of it at the top of the heap) instead of going back to the
    system. Once per process; True where it took effect, False where the C library has no `mallopt`
    (macOS, Windows), which leaves it as it was.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no such library, or no mallopt in it
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def machine_description() -> str:
    """The machine a speed was measured on, in one line: CPU, cores, bf16 arithmetic, torch, load average."""
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"
    return (f"{cpu_name()}, {os.cpu_count()} cores, "
            f"bf16 arithmetic {'yes' if cpu_has_bf16() else 'no'}, torch {torch.__version__}, "
            f"load average {load}")
