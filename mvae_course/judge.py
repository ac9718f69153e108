"""A judge of generated images on the shapes data: a small CNN that reads an image's attributes.

Taught in notebooks/07_evaluation.ipynb.

Captions are judged exactly (`data.shapes.parse_caption`); images need a reader. The judge is trained
once per data set on the real training images, saved beside the caches, and reports its own accuracy on
the real validation images: a judge is only as good as that number.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mvae_course.data.cache import CaptionCache, as_float_images
from mvae_course.data.shapes import ATTRIBUTE_VALUES
from mvae_course.device import seeded
from mvae_course.metrics import attribute_accuracy


class AttributeClassifier(nn.Module):
    """A small CNN with one head per attribute, trained on real images to judge generated ones.

    `classes` maps each attribute to its possible values (the head's classes, in order). Besides RGB it
    sees each pixel's brightest channel, a colour-blind silhouette, so shape is learnt apart from colour.
    forward: images B x 3 x H x W in [0, 1] -> {attribute: logits B x K_attribute}.
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
            x = as_float_images(images[start:start + batch_size]).to(device)
            for a, logits in self(x).items():
                preds[a] += logits.argmax(-1).tolist()
        return [{a: self.classes[a][preds[a][i]] for a in self.classes} for i in range(images.shape[0])]


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
    """
    if images.shape[0] != len(attributes) or not attributes:
        raise ValueError(f"{images.shape[0]} images but {len(attributes)} attribute dicts")
    gen = torch.Generator().manual_seed(seed)
    with seeded(seed):
        clf = AttributeClassifier(classes).to(device)
    labels = clf.labels(attributes)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    max_shift = max(1, images.shape[-1] // 16)
    clf.train()
    for _ in range(steps):
        idx = torch.randint(images.shape[0], (min(batch_size, images.shape[0]),), generator=gen)
        x = _shift(as_float_images(images[idx]), max_shift, gen).to(device)
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


def load_or_train_classifier(train_cache: CaptionCache, val_cache: CaptionCache, attributes: Sequence[str], cache_dir: str | Path,
                             steps: int = 400, device: str | torch.device = "cpu",
                             ) -> tuple[AttributeClassifier, dict[str, float]]:
    """The attribute judge of one shapes data set: trained once on the real training images, then read
    from `cache_dir` (the file is named by the training cache's identity).

    train_cache, val_cache: `CaptionCache`s with `attributes`. Returns the classifier and its accuracy on
    the real validation images (per attribute and strict): a fair judge must be close to 100% there.
    Taught in notebooks/07_evaluation.ipynb.
    """
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
