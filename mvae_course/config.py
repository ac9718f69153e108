"""Configuration as plain dataclasses, with named presets.

Taught in notebooks/00_setup.ipynb (presets) and notebooks/06_coco_training.ipynb (the GPU preset).

A `Config` holds three parts: what data to read (`DataConfig`), what network to build (`ModelConfig`)
and how to train it (`TrainConfig`). A copy is saved next to every checkpoint, so a checkpoint knows how
to rebuild its model and tokenizer. Presets: `tiny` (CI and unit tests), `cpu` (a laptop), `coco_gpu`
(full COCO on one GPU).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

FUSIONS = ("independent", "poe", "moe", "mopoe")
IMAGE_LIKELIHOODS = ("gaussian", "bernoulli", "continuous_bernoulli")


@dataclass
class DataConfig:
    """Where the image-caption pairs come from.

    `dataset` is "shapes" (the built-in synthetic set, generated under `root` when missing) or "coco"
    (a COCO 2017-style folder at `root`).
    """

    dataset: str = "shapes"
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = 64
    level: int = 4  # shapes only: 1 shape, 2 +size, 3 +colour, 4 +position, 5 +second object/texture
    n_train: int = 2000  # shapes only
    n_val: int = 200  # shapes only
    holdout: str | None = None  # shapes only: e.g. "shape-colour" keeps data.shapes.HOLDOUTS' pairs out of train
    min_count: int = 1  # wordpieces seen fewer times in the training captions map to UNK


@dataclass
class ModelConfig:
    """The multimodal VAE: encoders, decoders, latent size and how the experts are fused."""

    fusion: str = "poe"
    z_dim: int = 64
    image_size: int = 64
    image_channels: tuple[int, ...] = (32, 64, 128)
    # Bernoulli: the sigmoid of a Gaussian mean saturates on the black backgrounds of the shapes data and
    # its gradient vanishes (the latent collapses); BCE on logits does not. See notebooks/02_image_vae.ipynb.
    image_likelihood: str = "bernoulli"
    image_sigma: float = 0.1  # fixed std of the Gaussian image likelihood, in [0, 1] pixel units
    vocab_size: int = 0  # set from the tokenizer before the model is built
    emb_dim: int = 300
    enc_hidden: int = 512
    dec_hidden: int = 512
    max_caption_len: int = 32  # longest caption generated
    word_dropout: float = 0.0  # fraction of decoder inputs replaced by UNK (a remedy for posterior collapse)
    image_weight: float = 1.0  # scales log p(image | z) in the training objective (MMVAE-style rescaling)
    text_weight: float = 1.0  # scales log p(text | z) in the training objective; reported ELBOs stay unscaled

    def __post_init__(self) -> None:
        self.image_channels = tuple(self.image_channels)
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.image_likelihood not in IMAGE_LIKELIHOODS:
            raise ValueError(
                f"image_likelihood must be one of {IMAGE_LIKELIHOODS}, got {self.image_likelihood!r}"
            )


@dataclass
class TrainConfig:
    """The optimisation: batch, learning rate, budget, KL warm-up, checkpoints."""

    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_steps: int | None = 2000  # stop after this many optimiser steps (None: run `epochs`)
    epochs: int | None = None
    warmup_steps: int = 100  # linear learning-rate warm-up
    kl_warmup_steps: int = 500  # beta rises linearly from 0 to 1 over these steps
    grad_clip: float = 5.0
    seed: int = 0
    device: str = "auto"  # auto: CUDA, then MPS, then CPU
    amp: bool = True  # bf16 autocast where the device supports it (CUDA)
    cache_on_device: bool = True  # keep the whole preprocessing cache on the GPU
    eval_every: int = 500
    ckpt_every: int = 500
    log_every: int = 50


@dataclass
class Config:
    """Everything one run needs: data, model, training."""

    name: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Rebuild from `to_dict()` output; unknown keys are an error, not silently dropped."""
        parts = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
        unknown = set(d) - {"name", *parts}
        if unknown:
            raise ValueError(f"unknown config sections: {sorted(unknown)}")
        kwargs: dict[str, Any] = {"name": d.get("name", "custom")}
        for key, part in parts.items():
            values = dict(d.get(key, {}))
            known = {f.name for f in dataclasses.fields(part)}
            extra = set(values) - known
            if extra:
                raise ValueError(f"unknown keys in config section {key!r}: {sorted(extra)}")
            kwargs[key] = part(**values)
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        """Write as JSON or YAML, chosen by the file's suffix."""
        path = Path(path)
        d = self.to_dict()
        if path.suffix in (".yaml", ".yml"):
            path.write_text(yaml.safe_dump(d, sort_keys=False))
        else:
            path.write_text(json.dumps(d, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Config:
        path = Path(path)
        text = path.read_text()
        d = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        return cls.from_dict(d)

    def replace(self, **sections: dict[str, Any]) -> Config:
        """A copy with some fields changed, e.g. `cfg.replace(model={"fusion": "moe"})`."""
        d = self.to_dict()
        for key, values in sections.items():
            d[key].update(values)
        return Config.from_dict(d)


def _tiny() -> Config:
    return Config(
        name="tiny",
        data=DataConfig(dataset="shapes", level=4, n_train=256, n_val=64, image_size=32),
        model=ModelConfig(
            image_size=32, image_channels=(8, 16, 32), z_dim=16, emb_dim=32, enc_hidden=32, dec_hidden=64
        ),
        train=TrainConfig(
            batch_size=32, lr=2e-3, max_steps=60, warmup_steps=5, kl_warmup_steps=20,
            eval_every=30, ckpt_every=30, log_every=10, amp=False,
        ),
    )


def _cpu() -> Config:
    # Sized for shapes level 4 on 2 CPU cores (benchmarks/README.md, "Quality"): 32 px keeps all four
    # attributes readable at 40% of 64 px's cost per step, and the image decoder, the costliest network,
    # is narrow. text_weight = 10 makes z carry what captions name (shape, size, colour, position)
    # rather than the pixel detail that dominates an unweighted image likelihood. 4000 steps of the
    # costliest fusion (mopoe, ~0.15 CPU s/step) fit 15 minutes of one core with room to spare.
    return Config(
        name="cpu",
        data=DataConfig(dataset="shapes", level=4, n_train=4000, n_val=500, image_size=32),
        model=ModelConfig(
            image_size=32, image_channels=(16, 32, 64), z_dim=32, emb_dim=64, enc_hidden=128, dec_hidden=128,
            text_weight=10.0,
        ),
        train=TrainConfig(batch_size=64, lr=2e-3, max_steps=4000, kl_warmup_steps=800),
    )


def _coco_gpu() -> Config:
    return Config(
        name="coco_gpu",
        data=DataConfig(dataset="coco", train_split="train2017", val_split="val2017", image_size=64, min_count=5),
        model=ModelConfig(
            image_size=64, image_channels=(32, 64, 128), z_dim=64, emb_dim=300, enc_hidden=512, dec_hidden=512,
            word_dropout=0.1,
        ),
        train=TrainConfig(
            batch_size=256, lr=1e-3, max_steps=None, epochs=20, kl_warmup_steps=10000,
            eval_every=2000, ckpt_every=2000, log_every=100,
        ),
    )


PRESETS = {"tiny": _tiny, "cpu": _cpu, "coco_gpu": _coco_gpu}


def preset(name: str) -> Config:
    """A fresh copy of a named preset: `tiny`, `cpu` or `coco_gpu`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
