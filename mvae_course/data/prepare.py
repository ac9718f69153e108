"""A run's data made ready: the shapes set generated if needed, the tokenizer fitted, both caches built.

Taught in notebooks/06_coco_data.ipynb.
"""

from __future__ import annotations

from pathlib import Path

from mvae_course.config import Config
from mvae_course.data.cache import CaptionCache, ensure_cache, load_cache, read_captions, tokenizer_hash
from mvae_course.data.shapes import ensure_shapes
from mvae_course.data.text import CaptionTokenizer

SHAPES_SEED = 0  # the synthetic data set does not change with the training seed


def data_root(config: Config, data_dir: str | Path) -> Path:
    """Where the image-caption pairs live: `config.data.root`, or a shapes folder named by its settings."""
    data = config.data
    if data.root is not None:
        return Path(data.root)
    if data.dataset != "shapes":
        raise ValueError(f"data.root must point to a COCO-style folder for dataset {data.dataset!r}")
    holdout = f"-holdout-{data.holdout}" if data.holdout else ""
    return Path(data_dir) / f"shapes-L{data.level}-n{data.n_train}-{data.n_val}-{data.image_size}px{holdout}"


def prepare_data(
    config: Config, data_dir: str | Path, tokenizer: CaptionTokenizer | None = None, build: bool = True
) -> tuple[CaptionTokenizer, CaptionCache, CaptionCache]:
    """Generate the shapes set if needed, fit the tokenizer, and build (or reuse) both caches.

    Returns `(tokenizer, train_cache, val_cache)`; a `tokenizer` passed in (from a checkpoint) is kept.
    `build=False` only reads what another process (rank 0 under DDP) has already written.
    Taught in notebooks/06_coco_data.ipynb.
    """
    data = config.data
    if data.dataset not in ("shapes", "coco"):
        raise ValueError(f"data.dataset must be 'shapes' or 'coco', got {data.dataset!r}")
    if data.holdout is not None and data.dataset != "shapes":
        raise ValueError(f"data.holdout ({data.holdout!r}) is for the shapes data only; set it to null for COCO")
    root = data_root(config, data_dir)
    if data.dataset == "shapes" and build:
        ensure_shapes(root, n_train=data.n_train, n_val=data.n_val, level=data.level, seed=SHAPES_SEED,
                      image_size=data.image_size, holdout=data.holdout)
    elif not root.is_dir():
        raise FileNotFoundError(
            f"COCO folder {root} does not exist; download COCO 2017 there or pass --root DIR"
        )
    if tokenizer is None:
        captions = read_captions(root, data.train_split, on_bad_entry=data.on_bad_entry)
        tokenizer = CaptionTokenizer.fit(captions, min_count=data.min_count)
    caches = []
    for split in (data.train_split, data.val_split):
        # One cache folder per (data, split, size, vocabulary): runs with other tokenizers do not collide.
        name = f"{root.name}-{split}-{data.image_size}px-{tokenizer_hash(tokenizer)[:10]}"
        out = Path(data_dir) / "cache" / name
        if build:
            caches.append(ensure_cache(
                root, split, out, data.image_size, tokenizer, on_bad_image=data.on_bad_image,
                on_bad_entry=data.on_bad_entry, max_caption_tokens=data.max_caption_tokens,
            ))
        else:
            caches.append(load_cache(out))
    return tokenizer, caches[0], caches[1]
