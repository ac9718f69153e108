"""Measuring a trained multimodal VAE: coherence, retrieval, caption metrics and likelihoods.

Taught in notebooks/07_evaluation.ipynb.

A multimodal VAE is good when (i) what it generates in one modality agrees with what it was given in
the other (cross-modal coherence), (ii) its latent space puts an image near its captions (retrieval),
(iii) its captions read like the references (BLEU, chrF, sentence-embedding similarity), and (iv) it
assigns high likelihood to held-out pairs (IWAE bound). On the shapes data coherence is exact: captions
are parsed back to attributes, and generated images are judged by `judge.AttributeClassifier`. The
metrics themselves are pure functions in `metrics.py`; this module feeds them a model and a data set.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mvae_course import plots
from mvae_course.data.cache import CacheLoader, CaptionCache, as_float_images, image_captions
from mvae_course.data.prepare import prepare_data
from mvae_course.data.shapes import attributes_at_level, parse_caption
from mvae_course.data.text import CaptionTokenizer, normalise
from mvae_course.device import seeded
from mvae_course.judge import AttributeClassifier, load_or_train_classifier
from mvae_course.metrics import (
    attribute_accuracy,
    caption_metrics,
    chance_accuracy,
    recall_at_k,
    semantic_similarity,
)
from mvae_course.models.mvae import MultimodalVAE
from mvae_course.runs import load_model


def _device_of(model: MultimodalVAE) -> torch.device:
    return next(model.parameters()).device


def _image_batches(cache: CaptionCache, batch_size: int, device: torch.device) -> Iterable[Tensor]:
    """The cache's images in order, B x 3 x H x W float in [0, 1] on `device`."""
    for start in range(0, len(cache), batch_size):
        yield as_float_images(cache.images[start:start + batch_size]).to(device)


def _caption_loader(cache: CaptionCache, batch_size: int, device: torch.device, captions: str = "all",
                    ) -> CacheLoader:
    """Every caption of the cache in order (`captions="all"`), or one per image ("random")."""
    if not cache.has_text:
        raise ValueError("the cache has no tokenised captions: build it with a tokenizer (prepare_cache(..., tokenizer))")
    return CacheLoader(cache, batch_size, shuffle=False, seed=0, device=device, captions=captions)


@torch.no_grad()
def generate_captions(model: MultimodalVAE, tokenizer: CaptionTokenizer, cache: CaptionCache,
                      batch_size: int = 128, seed: int = 0, **decode_kwargs: Any) -> list[str]:
    """One generated caption per image of the cache (greedy unless `method=` says otherwise).

    Any noise the model draws (a sampling decoder, mmvaeplus's private latent) comes from `seed`.
    Taught in notebooks/04_fusion.ipynb.
    """
    device = _device_of(model)
    with seeded(seed, device):
        return [tokenizer.decode(ids) for images in _image_batches(cache, batch_size, device)
                for ids in model.generate_text(images, **decode_kwargs)]


@torch.no_grad()
def coherence(model: MultimodalVAE, tokenizer: CaptionTokenizer, cache: CaptionCache,
              classifier: AttributeClassifier, level: int, captions: str = "random", n_joint: int = 256, batch_size: int = 128, seed: int = 0,
              ) -> dict[str, dict[str, float]]:
    """Cross-modal and joint coherence on the shapes data, per attribute and strict (all attributes right).

    - image_to_text: a caption generated from each image, parsed back (`parse_caption`), against the truth.
    - text_to_image: an image generated from each caption (`captions="random"`: one per image, "all":
      every caption), judged by `classifier`, against the caption's image's attributes.
    - joint: `n_joint` pairs sampled from the prior; the parsed caption against the classifier's reading
      of the image (do the two modalities tell the same story?).
    Also returns "chance", the accuracy of uniform guessing. Taught in notebooks/07_evaluation.ipynb.
    """
    if cache.attributes is None:
        raise ValueError("coherence needs per-image attributes: evaluate on the shapes data")
    names = attributes_at_level(level)
    device = _device_of(model)
    true = [{a: attrs[a] for a in names} for attrs in cache.attributes]

    hyps = generate_captions(model, tokenizer, cache, batch_size, seed)
    out = {"image_to_text": attribute_accuracy([parse_caption(h, level) for h in hyps], true, names)}

    judged, wanted = [], []
    with seeded(seed, device):
        for batch in _caption_loader(cache, batch_size, device, captions):
            judged += classifier.predict(model.generate_image(batch["text"], batch["lengths"]))
            wanted += [true[r] for r in cache.rows_of(batch["image_id"])]
    out["text_to_image"] = attribute_accuracy(judged, wanted, names)

    with seeded(seed, device):
        pairs = model.sample(n_joint)
    said = [parse_caption(tokenizer.decode(ids), level) for ids in pairs["text"]]
    out["joint"] = attribute_accuracy(said, classifier.predict(pairs["image"]), names)
    out["chance"] = chance_accuracy(names)
    return out


@torch.no_grad()
def retrieval(model: MultimodalVAE, cache: CaptionCache, batch_size: int = 256, fold_size: int = 1000,
              min_images_for_folds: int = 5000) -> dict[str, dict[str, float]]:
    """Image <-> text retrieval by cosine similarity of posterior means, embedding each modality alone.

    image_to_text: an image is a hit at K if any of its captions ranks in the top K; text_to_image: a
    caption is a hit if its image does. With at least `min_images_for_folds` images, the standard COCO
    "1k" protocol: the average over folds of `fold_size` images (and their captions); else the whole split.
    Taught in notebooks/07_evaluation.ipynb.
    """
    device = _device_of(model)
    z_image = torch.cat([model.embed(image=x).float().cpu() for x in _image_batches(cache, batch_size, device)])
    z_text = torch.cat([model.embed(text=b["text"], lengths=b["lengths"]).float().cpu()
                        for b in _caption_loader(cache, batch_size, device)])  # M x D, in caption order
    z_image, z_text = F.normalize(z_image, dim=-1), F.normalize(z_text, dim=-1)
    owner = cache.caption_image.cpu()  # M: image row of each caption
    n = len(cache)
    size = fold_size if n >= min_images_for_folds else n
    folds = [(start, start + size) for start in range(0, n - size + 1, size)]
    results: dict[str, list[dict[str, float]]] = {"image_to_text": [], "text_to_image": []}
    for lo, hi in folds:
        caps = torch.nonzero((owner >= lo) & (owner < hi)).squeeze(1)  # captions of this fold's images
        sim = z_image[lo:hi] @ z_text[caps].T  # images x captions
        local = (owner[caps] - lo).tolist()
        per_image = [[] for _ in range(hi - lo)]
        for c, r in enumerate(local):
            per_image[r].append(c)
        results["image_to_text"].append(recall_at_k(sim, per_image))
        results["text_to_image"].append(recall_at_k(sim.T, local))
    out = {task: {key: statistics.fmean(r[key] for r in runs) for key in runs[0]} for task, runs in results.items()}
    out["folds"] = {"count": len(folds), "images_per_fold": size}
    return out


@torch.no_grad()
def log_likelihoods(model: MultimodalVAE, cache: CaptionCache, k: int = 16, batch_size: int = 64,
                    seed: int = 0,
                    ) -> dict[str, float]:
    """IWAE estimates (lower bounds, k samples) of log p(image), log p(text), log p(image, text).

    One caption per image. Returns the means per sample in nats (`log_p_image`, `log_p_text`,
    `log_p_joint`), and the negated image term in nats per dimension (`image_nats_per_dim`, over the
    3 H W pixels) and the negated text term in bits per token (`text_bits_per_token`, EOS included).
    Taught in notebooks/07_evaluation.ipynb.
    """
    device = _device_of(model)
    sums: dict[str, float] = {}
    n_pairs, n_tokens = 0, 0
    with seeded(seed, device):
        for batch in _caption_loader(cache, batch_size, device, captions="random"):
            for name, log_p in model.iwae(batch, k).items():
                sums[name] = sums.get(name, 0.0) + log_p.double().sum().item()
            n_pairs += batch["image"].shape[0]
            n_tokens += int(batch["lengths"].sum())
    dims = math.prod(cache.images.shape[1:])
    out = {f"log_p_{name}": total / n_pairs for name, total in sums.items()}
    out["image_nats_per_dim"] = -sums["image"] / (n_pairs * dims)
    out["text_bits_per_token"] = -sums["text"] / (n_tokens * math.log(2))
    return out


def captions_report(model: MultimodalVAE, tokenizer: CaptionTokenizer, cache: CaptionCache,
                    batch_size: int = 128,
                    semantic: bool = True) -> tuple[dict[str, float], list[str], list[list[str]]]:
    """BLEU-4, chrF and (if `semantic`) sentence-embedding similarity of greedy captions of every image.

    References are the image's captions, normalised as BERT's tokenizer sees them (lowercase, split
    punctuation) so that they compare like for like with the decoded hypotheses.
    Returns (metrics, hypotheses, references). Taught in notebooks/07_evaluation.ipynb.
    """
    hyps = generate_captions(model, tokenizer, cache, batch_size)
    refs = [[normalise(c) for c in caps] for caps in image_captions(cache, list(range(len(cache))))]
    metrics = caption_metrics(hyps, refs)
    if semantic:
        metrics["semantic_similarity"] = semantic_similarity(hyps, refs, device=str(_device_of(model)))
    return metrics, hyps, refs


# ---------------------------------------------------------------------------------------------------------
# One trained run: every metric, figures, a table
# ---------------------------------------------------------------------------------------------------------

def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested metric dicts as one level with "/"-joined keys, e.g. {"coherence/joint/strict": 0.9}.
    """
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten(value, f"{name}/")
        else:
            out[name] = value
    return out


def format_table(metrics: Mapping[str, Any]) -> str:
    """A two-column text table of (flattened) metrics, numbers to 4 significant digits."""
    flat = flatten(metrics)
    width = max(map(len, flat), default=0)
    lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  -----"]
    for key, value in flat.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"{key.ljust(width)}  {shown}")
    return "\n".join(lines)


def _default_data_dir(run_dir: Path) -> Path:
    """Where a run's data lives: `run_dir/data` (train()'s default) if present, else ./data (the CLI's)."""
    return run_dir / "data" if (run_dir / "data").is_dir() else Path("data")


def _figures(model: MultimodalVAE, tokenizer: CaptionTokenizer, cache: CaptionCache, run_dir: Path,
             split: str, level: int | None,
             n_show: int = 8) -> list[Path]:
    """The run's figures: loss curves, prior samples, cross-modal generation, the latent space."""
    device = _device_of(model)
    written = []
    if (run_dir / "metrics.csv").is_file():
        fig = plots.plot_loss_terms(run_dir / "metrics.csv")
        written.append(plots.save_figure(fig, run_dir / "figures" / "loss_terms.png"))
    shown = cache.head(n_show)
    batch = next(iter(_caption_loader(shown, n_show, device, captions="random")))
    with seeded(0, device):
        samples = model.sample(16)
    fig = plots.image_grid(samples["image"], nrow=8, title=f"Images sampled from the prior ({model.fusion})")
    written.append(plots.save_figure(fig, run_dir / "figures" / "prior_samples.png"))
    fig = plots.plot_cross_modal(
        batch["image"], tokenizer.decode_batch(batch["text"].tolist()),
        [tokenizer.decode(ids) for ids in model.generate_text(batch["image"])],
        model.generate_image(batch["text"], batch["lengths"]),
        title=f"Cross-modal generation ({model.fusion}, {split})",
    )
    written.append(plots.save_figure(fig, run_dir / "figures" / f"cross_modal_{split}.png"))
    z = torch.cat([model.embed(image=x).float().cpu() for x in _image_batches(cache, 256, device)])
    labels = [a["shape"] for a in cache.attributes] if cache.attributes is not None and level else None
    fig = plots.plot_latent_2d(z, labels, label_name="shape", title=f"Image posterior means, {split} ({model.fusion})")
    written.append(plots.save_figure(fig, run_dir / "figures" / f"latent_{split}.png"))
    return written


def evaluate_run(run_dir: str | Path, split: str = "val", device: str | torch.device | None = None,
                 n: int | None = None, k: int = 16, data_dir: str | Path | None = None,
                 classifier_steps: int = 400, semantic: bool | None = None, figures: bool = True,
                 verbose: bool = True) -> dict[str, Any]:
    """Every metric of a trained run on one split; writes `metrics_<split>.json` and figures into the run.

    - both data sets: IWAE log-likelihoods, latent-space retrieval, BLEU-4/chrF of greedy captions;
    - shapes: the attribute judge's own accuracy on real images, and cross-modal and joint coherence;
    - COCO: also the sentence-embedding similarity of captions (`semantic`, default on for COCO only).
    `n` limits the evaluation to the split's first n images; `data_dir` is where the run's data and
    caches are (default: run_dir/data if present, else ./data). Taught in notebooks/07_evaluation.ipynb.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist; train one with `python -m mvae_course train`")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    model, tokenizer, config = load_model(run_dir, device or "auto")
    data_dir = Path(data_dir) if data_dir is not None else _default_data_dir(run_dir)
    _, train_cache, val_cache = prepare_data(config, data_dir, tokenizer)
    cache = (train_cache if split == "train" else val_cache).head(n)
    shapes = config.data.dataset == "shapes"
    semantic = (not shapes) if semantic is None else semantic

    metrics: dict[str, Any] = {
        "run": str(run_dir), "split": split, "dataset": config.data.dataset, "fusion": config.model.fusion,
        "images": len(cache), "captions": len(cache.captions),
    }
    metrics["log_likelihood"] = log_likelihoods(model, cache, k)
    metrics["retrieval"] = retrieval(model, cache)
    metrics["caption_metrics"], hyps, _ = captions_report(model, tokenizer, cache, semantic=semantic)
    if shapes:
        classifier, accuracy = load_or_train_classifier(
            train_cache, val_cache, attributes_at_level(config.data.level), data_dir / "cache",
            steps=classifier_steps, device=_device_of(model),
        )
        metrics["classifier_accuracy"] = accuracy
        metrics["coherence"] = coherence(model, tokenizer, cache, classifier, config.data.level)
    metrics["examples"] = [{"reference": c, "generated": h}
                           for c, h in zip(cache.first_captions(), hyps)][:5]
    if figures:
        paths = _figures(model, tokenizer, cache, run_dir, split, config.data.level if shapes else None)
        metrics["figures"] = [str(p) for p in paths]
    (run_dir / f"metrics_{split}.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if verbose:
        shown = {k: v for k, v in metrics.items() if k not in ("examples", "figures")}
        print(format_table(shown))
        for example in metrics["examples"][:3]:
            print(f"  true: {example['reference']!r}\n  gen:  {example['generated']!r}")
    return metrics
