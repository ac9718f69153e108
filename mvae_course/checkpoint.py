"""Checkpoints: written atomically, read safely, checked against the config that wants them.

Taught in notebooks/07_coco_training.ipynb.

A checkpoint is one `torch.save`d dict of tensors and plain Python values (no pickled classes), so it
loads with `torch.load(..., weights_only=True)`. It holds everything a run needs to continue exactly
where it stopped: model, optimiser and scheduler state, the step and the loader's position, every
random generator's state, the config and the tokenizer.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mvae_course.atomic import atomic_write, clean_stale_temps

CHECKPOINT_KEYS = (
    "model", "optimizer", "scheduler", "step", "epoch", "batch_in_epoch", "best_val", "rng", "world_size",
    "config", "tokenizer",
)


RESUMABLE_CHANGES = {"on_bad_entry", "on_bad_image"}  # data keys a continuation may change


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, incomplete, or written for another config.

    The message names the file, what is wrong and what to do. Taught in notebooks/07_coco_training.ipynb.
    """

    def __init__(self, path: str | Path, problem: str, fix: str):
        self.path = Path(path)
        super().__init__(f"checkpoint {self.path}: {problem}. {fix}")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` to `path` atomically: a run killed mid-save leaves the previous file intact.

    The bytes go to a temporary file in the same folder, are flushed to disk, and only then renamed
    over `path` (`atomic.atomic_write`). Temporary files left by writers that were killed mid-save are
    removed first. Taught in notebooks/07_coco_training.ipynb.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent, f".{path.name}.tmp-*")
    with atomic_write(path) as f:
        torch.save(state, f)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True`; a missing, corrupt or incomplete file: `CheckpointError`.

    Taught in notebooks/07_coco_training.ipynb.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            path, "no such file", "Train first (`python -m mvae_course train`) or check the path"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file; all mean the same here
        raise CheckpointError(
            path,
            f"cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "it is truncated, corrupt or not a checkpoint",
            "Delete it and resume from another checkpoint in the run folder (best.pt), or train again",
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(path, f"holds a {type(state).__name__}, not a checkpoint dict", "Train again")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise CheckpointError(
            path, f"is missing {missing}; it was not written by mvae_course.train", "Train again"
        )
    return state


def check_compatible(saved: dict[str, Any], wanted: dict[str, Any], path: str | Path) -> None:
    """Raise `CheckpointError` when the saved config's data or model differ from the wanted config.

    Only the `data` and `model` sections must match: the training section (budget, learning rate,
    logging) may change between a run and its continuation, and so may what to do with bad input
    (`data.on_bad_*`), which decides whether a run stops, not what it trains on. A key the saved config
    lacks was added to the package after the run began, and its default keeps the old behaviour, so it is
    not compared.
    Taught in notebooks/07_coco_training.ipynb.
    """
    diffs = [
        f"{section}.{key}: checkpoint has {saved[section][key]!r}, config has {value!r}"
        for section in ("data", "model")
        for key, value in wanted[section].items()
        if key not in RESUMABLE_CHANGES and key in saved.get(section, {})
        and _plain(saved[section][key]) != _plain(value)
    ]
    if diffs:
        raise CheckpointError(
            path,
            "was written for a different config (" + "; ".join(diffs) + ")",
            "Use a new output folder for the new config, or resume with the run's own config.json",
        )


def _plain(value: Any) -> Any:
    """Tuples and lists compare equal (JSON turns tuples into lists)."""
    return list(value) if isinstance(value, (tuple, list)) else value


def rng_state() -> dict[str, Any]:
    """Every random generator a run draws from, as tensors and plain values."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                  "gauss": gauss},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
