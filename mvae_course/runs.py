"""Trained runs on disk: rebuilding a model from its run folder, exporting it, and "load if present, else train".

Taught in notebooks/08_evaluation.ipynb (loading a run) and used by every lesson that trains.

A run folder holds training checkpoints (`last.pt`, `best.pt`: weights, optimiser, random states). An
exported folder holds only what inference needs, in files that load without pickle: `model.safetensors`,
`config.json`, `tokenizer.json`. `load_model` reads either.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mvae_course.atomic import FileLock
from mvae_course.checkpoint import CheckpointError, load_checkpoint
from mvae_course.config import Config
from mvae_course.data.text import CaptionTokenizer
from mvae_course.device import pick_device
from mvae_course.models.mvae import MultimodalVAE
from mvae_course.train import TrainResult, train

WEIGHTS = "model.safetensors"


def export_weights(model: MultimodalVAE, tokenizer: CaptionTokenizer, config: Config, out_dir: str | Path,
                   dtype: torch.dtype = torch.float16) -> Path:
    """Write a trained model as an exported folder: `model.safetensors` (in `dtype`), `config.json`,
    `tokenizer.json`. Returns the folder. float16 halves the size; `load_model` reads it back as float32."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
               for k, v in model.state_dict().items()}
    save_file(tensors, out_dir / WEIGHTS, metadata={"format": "pt", "fusion": config.model.fusion})
    config.save(out_dir / "config.json")
    tokenizer.save(out_dir / "tokenizer.json")
    return out_dir


def _load_exported(folder: Path) -> tuple[MultimodalVAE, CaptionTokenizer, Config]:
    config = Config.load(folder / "config.json")
    model = MultimodalVAE(config.model)
    try:
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(folder / WEIGHTS).items()}
        model.load_state_dict(state)
    except (RuntimeError, ValueError, OSError) as err:
        raise CheckpointError(
            folder / WEIGHTS, f"cannot rebuild its model ({str(err).splitlines()[0]})",
            "It was exported by an incompatible version of mvae_course: export it again",
        ) from err
    return model, CaptionTokenizer.load(folder / "tokenizer.json"), config


def load_model(
    run_dir_or_ckpt: str | Path, device: str | torch.device | None = "auto"
) -> tuple[MultimodalVAE, CaptionTokenizer, Config]:
    """Rebuild `(model, tokenizer, config)` from a run folder (its `best.pt`, else `last.pt`), a `.pt` file,
    or an exported folder (`model.safetensors`, read without pickle).

    The model is in eval mode on `device` ("auto": CUDA, then MPS, then CPU).
    """
    path = Path(run_dir_or_ckpt)
    if path.is_dir() and (path / WEIGHTS).is_file():
        model, tokenizer, config = _load_exported(path)
        return model.to(pick_device(device)).eval(), tokenizer, config
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
    checkpoint, and an empty folder trains from scratch; so a lesson never makes a reader wait twice. Two
    processes asking for one run (two lessons running at once) take turns: the second loads what the first
    trained.
    """
    out_dir = Path(out_dir)
    # Not train's own lock (`.run.lock` inside the folder, which fails fast): this one waits its turn.
    with FileLock.beside(out_dir, f"training {out_dir}", suffix=".train.lock"):
        resume = (out_dir / "last.pt").exists()
        return train(config, out_dir, resume=resume, device=device, progress=progress, data_dir=data_dir)
