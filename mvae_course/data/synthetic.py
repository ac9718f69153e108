"""Synthetic COCO-sized data: photos and captions with COCO's statistics, for timing at full scale.

Captions are Zipf-distributed whole words with COCO's mean length; images are smooth random colours
with grain (as JPEG files in COCO's layout) or uniform noise (straight into a `CaptionCache`). Only the
speed of what trains on them means anything, not the loss.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from mvae_course.data.cache import CaptionCache
from mvae_course.data.coco import annotation_path
from mvae_course.data.text import bert_tokenizer

COCO_TRAIN_IMAGES = 118_287  # COCO 2017 train: images and caption pairs, for epoch projections
COCO_TRAIN_CAPTIONS = 591_753
COCO_WORDPIECES = 6_700  # distinct wordpieces in COCO's training captions (order of magnitude)
COCO_MEAN_TOKENS = 13.8  # mean wordpieces per COCO caption




def word_pool(n_words: int = COCO_WORDPIECES) -> list[str]:
    """The first `n_words` whole-word entries of BERT's vocabulary (roughly by frequency).

    Each is one wordpiece, so a caption of them joined by spaces tokenises back to exactly them.
    """
    vocab = sorted(bert_tokenizer().get_vocab().items(), key=lambda kv: kv[1])
    words = [w for w, _ in vocab if w.isascii() and w.isalpha()]
    if n_words > len(words):
        raise ValueError(f"n_words={n_words}: BERT has only {len(words)} whole-word entries")
    return words[:n_words]


def zipf_probs(n: int, s: float = 1.0) -> Tensor:
    """Zipf's law over n ranks, p(r) proportional to 1 / r^s: n (float64), summing to 1."""
    p = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** s
    return p / p.sum()


def caption_lengths(n: int, generator: torch.Generator, mean: float = COCO_MEAN_TOKENS, std: float = 3.5,
                    device: str | torch.device = "cpu") -> Tensor:
    """Content wordpieces per caption, COCO-like: rounded Normal(mean, std) clipped to [5, 48]: n (int64)."""
    x = torch.randn(n, generator=generator, device=device) * std + mean
    return x.round().clamp(5, 48).long()


def synthetic_captions(n: int, n_words: int = COCO_WORDPIECES, seed: int = 0) -> list[str]:
    """n captions of Zipf-distributed whole words with COCO's mean length (13.8 wordpieces)."""
    g = torch.Generator().manual_seed(seed)
    words = word_pool(n_words)
    lengths = caption_lengths(n, g)
    ids = torch.multinomial(zipf_probs(n_words), int(lengths.sum()), replacement=True, generator=g).tolist()
    starts = [0, *torch.cumsum(lengths, 0).tolist()]
    return [" ".join(words[i] for i in ids[a:b]) for a, b in zip(starts, starts[1:])]


def synthetic_jpeg(rng: np.random.Generator, noise: np.ndarray, width: int = 640, height: int = 480) -> bytes:
    """A COCO-sized photo stand-in: smooth random colours plus grain, as JPEG (about 100 kB at 640 x 480)."""
    low = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), dtype=np.int16)
    pixels += noise[: height, : width]
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_synthetic_coco(root: str | Path, split: str = "train2017", n_images: int = 2000,
                        captions_per_image: int = 5, size: tuple[int, int] = (640, 480),
                        n_words: int = COCO_WORDPIECES, seed: int = 0) -> Path:
    """A COCO-layout folder of synthetic JPEGs (`size` = width, height) and COCO-like captions.

    Writes root/annotations/captions_<split>.json and root/<split>/<id>.jpg; returns root.
    """
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    noise = rng.integers(-12, 13, (height, width, 3)).astype(np.int16)
    captions = synthetic_captions(n_images * captions_per_image, n_words, seed)
    images, annotations = [], []
    for i in range(n_images):
        name = f"{i + 1:012d}.jpg"
        (root / split / name).write_bytes(synthetic_jpeg(rng, np.roll(noise, i * 7, axis=1), width, height))
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
        for k in range(captions_per_image):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "caption": captions[i * captions_per_image + k]})
    annotation_path(root, split).write_text(json.dumps({"images": images, "annotations": annotations}))
    return root


def synthetic_cache(n_images: int, captions_per_image: int = 5, vocab_size: int = COCO_WORDPIECES + 4,
                    image_size: int = 64, device: str | torch.device = "cpu", seed: int = 0) -> CaptionCache:
    """A `CaptionCache` of random images and Zipf-distributed compact ids, made straight on `device`.

    No files and no tokenizer: for timing training at COCO's size (118k images, 591k captions) in
    seconds. Images are uniform noise, so only the speed means anything, not the loss.
    """
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    images = torch.randint(0, 256, (n_images, 3, image_size, image_size), generator=g, device=device,
                           dtype=torch.uint8)
    n_captions = n_images * captions_per_image
    lengths = caption_lengths(n_captions, g, device=device)
    probs = zipf_probs(vocab_size - 4).float().to(device)
    tokens = (torch.multinomial(probs, int(lengths.sum()), replacement=True, generator=g) + 4).to(torch.int16)
    offsets = F.pad(torch.cumsum(lengths, 0), (1, 0))
    meta: dict[str, Any] = {"tokenizer": "synthetic", "vocab_size": vocab_size, "n_images": n_images,
                            "n_captions": n_captions, "image_size": image_size}
    return CaptionCache(
        images=images, image_ids=torch.arange(1, n_images + 1, device=device), tokens=tokens, offsets=offsets,
        caption_image=torch.arange(n_images, device=device).repeat_interleave(captions_per_image),
        captions=[], attributes=None, meta=meta,
    )
