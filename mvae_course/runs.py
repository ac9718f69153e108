"""Trained runs on disk: rebuilding a model from its run folder, and "load if present, else train".

Taught in notebooks/07_evaluation.ipynb (loading a run) and used by every lesson that trains.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mvae_course.checkpoint import CheckpointError, load_checkpoint
from mvae_course.config import Config
from mvae_course.data.text import CaptionTokenizer
from mvae_course.device import pick_device
from mvae_course.models.mvae import MultimodalVAE
from mvae_course.train import TrainResult, train


def load_model(
    run_dir_or_ckpt: str | Path, device: str | torch.device | None = "auto"
) -> tuple[MultimodalVAE, CaptionTokenizer, Config]:
    """Rebuild `(model, tokenizer, config)` from a run folder (its `best.pt`, else `last.pt`) or a `.pt` file.

    The model is in eval mode on `device` ("auto": CUDA, then MPS, then CPU).
    """
    path = Path(run_dir_or_ckpt)
    if path.is_dir():
        path = path / "best.pt" if (path / "best.pt").exists() else path / "last.pt"
    ckpt = load_checkpoint(path)
    try:
        config = Config.from_dict(ckpt["config"])
        model = MultimodalVAE(config.model)
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, ValueError, TypeError) as err:
        raise CheckpointError(
            path, f"cannot rebuild its model ({str(err).splitlines()[0]})",
            "It was written by an incompatible version of mvae_course: train it again",
        ) from err
    tokenizer = CaptionTokenizer(ckpt["tokenizer"]["wordpieces"])
    return model.to(pick_device(device)).eval(), tokenizer, config


def train_or_load(
    config: Config, out_dir: str | Path, data_dir: str | Path | None = None,
    device: str | torch.device | None = None, progress: bool = False,
) -> TrainResult:
    """Train a run into `out_dir`, or pick it up where it is: "load if present, else train".

    A finished run is loaded (train() only re-validates it), an interrupted one resumes from its last
    checkpoint, and an empty folder trains from scratch; so a lesson never makes a reader wait twice.
    """
    resume = (Path(out_dir) / "last.pt").exists()
    return train(config, out_dir, resume=resume, device=device, progress=progress, data_dir=data_dir)
