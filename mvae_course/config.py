"""Configuration as plain dataclasses, with named presets.

Taught in notebooks/00_setup.ipynb (presets) and notebooks/07_coco_training.ipynb (the GPU preset).

A `Config` holds three parts: what data to read (`DataConfig`), what network to build (`ModelConfig`)
and how to train it (`TrainConfig`). A copy is saved next to every checkpoint, so a checkpoint knows how
to rebuild its model and tokenizer. Presets: `tiny` (CI and unit tests), `cpu` (a laptop), `coco_gpu`
(full COCO on one GPU).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

FUSIONS = ("independent", "poe", "moe", "mopoe", "mmvaeplus")
IMAGE_LIKELIHOODS = ("gaussian", "bernoulli", "continuous_bernoulli")
DATASETS = ("shapes", "coco")
ON_BAD = ("raise", "skip")  # what a bad annotation entry or image does: stop with an error, or is left out
# Real COCO captions are 12 wordpieces long on average, 22-24 at the 99th percentile and 47 at the most
# (coco-mini's 795 captions); the longest shapes caption (level 5) has 27. 32 keeps all but rare outliers
# whole, and no single pasted essay sets the padded length of its whole batch.
MAX_CAPTION_TOKENS = 32
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class ConfigError(ValueError):
    """Config values that are unknown, of the wrong type or out of range; one message names them all.

    E.g. "config: train.batch_size = 'x': must be a positive integer". `problems` holds one entry per value.
    """

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems, self.source = problems, source
        super().__init__(f"{source}: " + "; ".join(problems))


# A check returns what an allowed value looks like, or None when the value is allowed.
Check = Callable[[Any], "str | None"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(low: int, high: int | None = None, optional: bool = False) -> Check:
    """An int (not a bool, not a float) in [low, high]; None too when `optional`."""
    what = {0: "an integer >= 0", 1: "a positive integer"}.get(low, f"an integer >= {low}")
    if high is not None:
        what = f"an integer from {low} to {high}"
    what += " or null" if optional else ""

    def check(value: Any) -> str | None:
        if optional and value is None:
            return None
        ok = _is_int(value) and value >= low and (high is None or value <= high)
        return None if ok else f"must be {what}"
    return check


def number(low: float, low_open: bool = False, high: float | None = None, high_open: bool = False) -> Check:
    """A finite int or float in the interval from `low` to `high`, each end open or closed."""
    if high is None:
        what = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        what = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(value: Any) -> str | None:
        if isinstance(value, str):
            try:  # YAML 1.1 reads 1e-3 (no dot) as a string
                float(value)
                return f"must be {what}, not a string (in YAML write 1e-3 as 1.0e-3)"
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"must be {what}"
        above = value > low if low_open else value >= low
        below = high is None or (value < high if high_open else value <= high)
        return None if above and below else f"must be {what}"
    return check


def one_of(choices: tuple[str, ...]) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(map(repr, choices))}"
    return check


def text(optional: bool = False) -> Check:
    def check(value: Any) -> str | None:
        if (optional and value is None) or (isinstance(value, str) and value):
            return None
        return "must be a non-empty string" + (" or null" if optional else "")
    return check


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def device_name(value: Any) -> str | None:
    ok = isinstance(value, str) and DEVICE.fullmatch(value)
    return None if ok else "must be one of 'auto', 'cpu', 'cuda', 'cuda:N' (N = 0, 1, ...), 'mps'"


def channel_list(value: Any) -> str | None:
    ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(_is_int(c) and c >= 1 for c in value)
    return None if ok else "must be a non-empty list of positive integers (channels per convolution)"


def check_fields(obj: Any, section: str, checks: dict[str, Check]) -> list[str]:
    """One line per field of `obj` failing its check: "train.batch_size = 'x': must be a positive integer"."""
    problems = []
    for name, check in checks.items():
        value = getattr(obj, name)
        if (wrong := check(value)) is not None:
            problems.append(f"{section}.{name} = {value!r:.60}: {wrong}")
    return problems


def _validate(obj: Any, problems: list[str] = ()) -> None:
    """Raise one `ConfigError` for every field of a config section that fails its check."""
    found = check_fields(obj, obj.SECTION, obj.CHECKS) + list(problems)
    if found:
        raise ConfigError(found)


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
    max_caption_tokens: int | None = MAX_CAPTION_TOKENS  # longer training captions are cut (None: never)
    on_bad_entry: str = "raise"  # a bad annotation entry (duplicate id, empty caption, ...): raise or skip
    on_bad_image: str = "raise"  # an unreadable image (missing, corrupt, a decompression bomb): raise or skip

    SECTION: ClassVar[str] = "data"
    CHECKS: ClassVar[dict[str, Check]] = {
        "dataset": one_of(DATASETS), "root": text(optional=True), "train_split": text(), "val_split": text(),
        "image_size": integer(1), "level": integer(1, 5), "n_train": integer(1), "n_val": integer(1),
        "min_count": integer(1), "max_caption_tokens": integer(1, optional=True),
        "on_bad_entry": one_of(ON_BAD), "on_bad_image": one_of(ON_BAD),
        "holdout": text(optional=True),  # its name is checked against data.shapes.HOLDOUTS where it is used
    }

    def __post_init__(self) -> None:
        if isinstance(self.root, Path):
            self.root = str(self.root)
        _validate(self)


@dataclass
class ModelConfig:
    """The multimodal VAE: encoders, decoders, latent size and how the experts are fused."""

    fusion: str = "poe"
    z_dim: int = 64
    image_size: int = 64
    image_channels: tuple[int, ...] = (32, 64, 128)
    # Bernoulli by default: a Gaussian on the sigmoid of the logits saturates, and where it saturates on a
    # wrong pixel its gradient vanishes; BCE on logits has no such trap. notebooks/02_image_vae.ipynb
    # measures how close the shipped Gaussian run came to it.
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
    # fusion="mmvaeplus" only (MMVAE+, Palumbo et al. 2023): see models/mvae.py.
    private_dim: int = 8  # size of each modality's private latent w_m, beside the shared z
    aux_prior_scale: float = 1.0  # mean std of the auxiliary prior r(w_m) of the cross-modal terms
    learn_aux_prior: bool = True  # learn how r's std spreads over the dimensions (the reference code does)
    k_samples: int = 1  # importance samples per modality in the objective
    dreg: bool = True  # DReG gradients (Tucker et al. 2019) rather than the plain IWAE gradient

    SECTION: ClassVar[str] = "model"
    CHECKS: ClassVar[dict[str, Check]] = {
        "fusion": one_of(FUSIONS), "z_dim": integer(1), "image_size": integer(1),
        "image_channels": channel_list,
        "image_likelihood": one_of(IMAGE_LIKELIHOODS), "image_sigma": number(0, low_open=True),
        "vocab_size": integer(0), "emb_dim": integer(1), "enc_hidden": integer(1), "dec_hidden": integer(1),
        "max_caption_len": integer(1), "word_dropout": number(0, high=1, high_open=True),
        "image_weight": number(0), "text_weight": number(0),
        "private_dim": integer(1), "aux_prior_scale": number(0, low_open=True), "learn_aux_prior": boolean,
        "k_samples": integer(1), "dreg": boolean,
    }

    def __post_init__(self) -> None:
        _validate(self)
        self.image_channels = tuple(self.image_channels)


@dataclass
class TrainConfig:
    """The optimisation: batch, learning rate, budget, KL warm-up, checkpoints."""

    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_steps: int | None = 2000  # stop after this many optimiser steps (None: run `epochs`)
    epochs: int | None = None
    warmup_steps: int = 100  # linear learning-rate warm-up
    kl_warmup_steps: int = 500  # the KL weight rises linearly from 0 to `beta` over these steps
    beta: float = 1.0  # the KL weight after the warm-up: 1 trains the ELBO, another value a beta-VAE
    grad_clip: float = 5.0
    seed: int = 0
    device: str = "auto"  # auto: CUDA, then MPS, then CPU
    # bf16 autocast where the device computes bf16 natively: CUDA, and CPUs with AVX512-BF16 or AMX
    # (device.cpu_has_bf16); elsewhere, or False, fp32. Losses and KL terms are always reduced in fp32.
    amp: bool = True
    threads: int = 0  # torch CPU threads while training; 0 leaves torch's setting (one per core)
    cache_on_device: bool = True  # keep the whole preprocessing cache on the GPU
    eval_every: int = 500
    ckpt_every: int = 500
    log_every: int = 50

    SECTION: ClassVar[str] = "train"
    CHECKS: ClassVar[dict[str, Check]] = {
        "batch_size": integer(1), "lr": number(0, low_open=True), "weight_decay": number(0),
        "max_steps": integer(1, optional=True), "epochs": integer(1, optional=True),
        "warmup_steps": integer(0), "kl_warmup_steps": integer(0),
        "beta": number(0, low_open=True), "grad_clip": number(0, low_open=True),
        "seed": integer(0), "device": device_name, "amp": boolean, "threads": integer(0), "cache_on_device": boolean,
        "eval_every": integer(1), "ckpt_every": integer(1), "log_every": integer(1),
    }

    def __post_init__(self) -> None:
        budget = self.max_steps is None and self.epochs is None
        _validate(self, ["train.max_steps and train.epochs are both null: set one of them"] if budget else [])


@dataclass
class Config:
    """Everything one run needs: data, model, training.

    Every value is checked when a config is built or loaded; a bad one raises `ConfigError`.
    """

    name: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        problems = [] if isinstance(self.name, str) else [f"name = {self.name!r:.60}: must be a string"]
        halvings = len(self.model.image_channels)
        if self.model.image_size % 2**halvings:  # what models/image.py's stride-2 convolutions need
            problems.append(
                f"model.image_size = {self.model.image_size}: must be a multiple of {2**halvings} "
                f"(halved once per entry of model.image_channels, {halvings} times), e.g. 32 or 64"
            )
        if problems:
            raise ConfigError(problems)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> Config:
        """Rebuild from `to_dict()` output; `ConfigError` for unknown keys and bad values, not silence.

        `source` starts every message (a file name, for `load`).
        """
        parts = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
        if not isinstance(d, dict):
            raise ConfigError([f"expected a mapping with sections {sorted(parts)}, got {d!r:.60}"], source)
        unknown = sorted(set(d) - {"name", *parts})
        if unknown:
            hint = _did_you_mean(unknown, ["name", *parts])
            raise ConfigError([f"unknown sections {unknown}{hint}"], source)
        try:
            kwargs: dict[str, Any] = {"name": d.get("name", "custom")}
            for key, part in parts.items():
                values = d.get(key) or {}
                if not isinstance(values, dict):
                    raise ConfigError([f"{key} = {values!r:.60}: must be a mapping of keys to values"])
                known = [f.name for f in dataclasses.fields(part)]
                extra = sorted(set(values) - set(known))
                if extra:
                    hint = _did_you_mean(extra, known)
                    raise ConfigError([f"unknown keys in section {key!r}: {extra}{hint}"])
                kwargs[key] = part(**values)
            return cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(err.problems, source) from None

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
        """Read a config written by `save` (or by hand); `ConfigError` naming the file on a bad one."""
        path = Path(path)
        text = path.read_text()
        try:
            d = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        except (yaml.YAMLError, json.JSONDecodeError) as err:
            raise ConfigError([f"not valid {'YAML' if path.suffix != '.json' else 'JSON'}: "
                               + " ".join(str(err).split())], str(path)) from None
        return cls.from_dict(d, source=str(path))

    def replace(self, **sections: dict[str, Any]) -> Config:
        """A copy with some fields changed, e.g. `cfg.replace(model={"fusion": "moe"})`."""
        d = self.to_dict()
        for key, values in sections.items():
            d.setdefault(key, {}).update(values)
        return Config.from_dict(d)


def _did_you_mean(unknown: list[str], known: list[str]) -> str:
    close = [m for u in unknown for m in difflib.get_close_matches(u, known, n=1)]
    return f" (did you mean {', '.join(map(repr, close))}?)" if close else ""


def _tiny() -> Config:
    return Config(
        name="tiny",
        data=DataConfig(dataset="shapes", level=4, n_train=256, n_val=64, image_size=32),
        model=ModelConfig(
            image_size=32, image_channels=(8, 16, 32), z_dim=16, emb_dim=32, enc_hidden=32, dec_hidden=64
        ),
        train=TrainConfig(
            batch_size=32, lr=2e-3, max_steps=60, warmup_steps=5, kl_warmup_steps=20,
            eval_every=30, ckpt_every=30, log_every=10, amp=False, threads=1,
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
        # One thread: the small steps gain little from a second, and lose 20x when other jobs share the cores.
        train=TrainConfig(batch_size=64, lr=2e-3, max_steps=4000, kl_warmup_steps=800, threads=1),
    )


def _coco_gpu() -> Config:
    return Config(
        name="coco_gpu",
        data=DataConfig(dataset="coco", train_split="train2017", val_split="val2017", image_size=64, min_count=5),
        model=ModelConfig(
            image_size=64, image_channels=(32, 64, 128), z_dim=64, emb_dim=300, enc_hidden=512, dec_hidden=512,
            word_dropout=0.1,
        ),
        # An epoch of COCO 2017 train is 118,287 images / 256 = 462 steps, so the 20 epochs are 9,240 steps:
        # the KL warm-up ends after about 4 of them, and the rest trains the true ELBO (beta = 1).
        train=TrainConfig(
            batch_size=256, lr=1e-3, max_steps=None, epochs=20, kl_warmup_steps=2000,
            eval_every=2000, ckpt_every=2000, log_every=100,
        ),
    )


PRESETS = {"tiny": _tiny, "cpu": _cpu, "coco_gpu": _coco_gpu}


def preset(name: str) -> Config:
    """A fresh copy of a named preset: `tiny`, `cpu` or `coco_gpu`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
