"""Where tensors run and where randomness comes from: the device, seeds, seeded noise, mixed precision.

Every command and lesson picks its device with `pick_device`, seeds with `set_seed`, and draws the noise
that must not disturb training's own random streams (validation, evaluation, figures) under `seeded`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
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


def autocast(device: torch.device, enabled: bool) -> ContextManager:
    """bf16 autocast on CUDA when `enabled` (no loss scaling needed, unlike fp16); fp32 elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
