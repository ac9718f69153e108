"""A judge of generated images on the shapes data: a small CNN that reads an image's attributes.

Taught in notebooks/08_evaluation.ipynb.

Captions are judged exactly (`data.shapes.parse_caption`); images need a reader. The judge is trained
once per data set on the real training images, saved beside the caches (safetensors, no pickle), and
reports its own accuracy on the real validation images: a judge is only as good as that number. The judge
of the reference runs' data ships in `reference/judges/`, so their recorded figures are read again by the
very judge that wrote them. Generated images are softer,
dimmer and noisier than real ones, so it is trained on real images degraded the way decoders degrade
them (`degrade.augment`), and `judge_accuracy` reports it on degraded copies as well (`DEGRADATIONS`).
A judge with nothing learnt, `rule_judge.RuleJudge`, checks it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor, nn

from mvae_course.atomic import atomic_write, clean_stale_temps
from mvae_course.data.cache import CaptionCache, as_float_images
from mvae_course.data.shapes import ATTRIBUTE_VALUES
from mvae_course.degrade import DEGRADATIONS, augment
from mvae_course.device import seeded
from mvae_course.metrics import attribute_accuracy

JUDGE_VERSION = 2  # bump when the network or its training change: saved judges then read as stale
STEPS = 1000  # training steps; benchmarks/README.md, "Quality", gives what they buy at levels 4 and 5
JUDGES = Path(__file__).resolve().parents[1] / "reference" / "judges"  # shipped: read before the cache


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


def train_attribute_classifier(images: Tensor, attributes: Sequence[Mapping[str, Any]],
                               classes: Mapping[str, Sequence[Any]], steps: int = STEPS, batch_size: int = 64,
                               lr: float = 3e-3, seed: int = 0, device: str | torch.device = "cpu",
                               ) -> AttributeClassifier:
    """Fit an `AttributeClassifier` on real images (N x 3 x H x W, uint8 or [0, 1]) and their attributes.

    The loss is the sum over attributes of each head's cross-entropy; one-cycle learning rate. Every
    batch is degraded at random (`degrade.augment`: blur, noise, gain and contrast, pixel samples, a
    shift of up to 1/16 of the side), so the judge reads what decoders draw, not only what the data holds.
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
        x = augment(as_float_images(images[idx]), gen, max_shift=max_shift).to(device)
        logits = clf(x)
        loss = sum(F.cross_entropy(logits[a], labels[a][idx].to(device)) for a in clf.classes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    return clf.eval()


def judge_accuracy(judge: Any, images: Tensor, attributes: Sequence[Mapping[str, Any]], names: Sequence[str],
                   degradations: Mapping[str, Callable[[Tensor, torch.Generator], Tensor]] = DEGRADATIONS,
                   seed: int = 0) -> dict[str, dict[str, float]]:
    """A judge's accuracy (per attribute and strict) on real images and on each degraded copy of them.

    judge: anything with `predict(images) -> list of attribute dicts` (the CNN, `RuleJudge`). images:
    N x 3 x H x W (uint8 or [0, 1]); attributes: their N true attribute dicts. Returns {degradation:
    {attribute: accuracy, ..., "strict": ...}}, in the order of `degradations` ("real" first).
    """
    x = as_float_images(images.cpu())
    out = {}
    for name, degrade in degradations.items():
        gen = torch.Generator().manual_seed(seed)
        out[name] = attribute_accuracy(judge.predict(degrade(x, gen)), attributes, names)
    return out


def judge_key(train_cache: CaptionCache, attributes: Sequence[str], steps: int = STEPS) -> str:
    """A short hash naming one judge: the training cache it learnt from (by its source), its classes, steps,
    and the judge's version."""
    classes = {a: ATTRIBUTE_VALUES[a] for a in attributes}
    identity = [train_cache.meta.get(k) for k in ("source_sha256", "split", "image_size", "n_images")]
    blob = json.dumps([identity, {a: list(v) for a, v in classes.items()}, steps, JUDGE_VERSION], default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def judge_file(key: str) -> str:
    """The file name of the judge `key` (in a cache folder, or in `JUDGES`)."""
    return f"attribute_classifier_{key}.safetensors"


def save_classifier(clf: AttributeClassifier, key: str, path: Path) -> Path:
    """Write a judge to `path` atomically (a temporary file renamed into place): safetensors, its classes and
    key in the metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent, f".{path.name}.tmp-*")
    metadata = {"version": str(JUDGE_VERSION), "key": key, "classes": json.dumps(clf.classes)}
    with atomic_write(path) as f:
        f.write(save({k: v.contiguous() for k, v in clf.state_dict().items()}, metadata))
    return path


def _load_classifier(path: Path, key: str, device: str | torch.device) -> AttributeClassifier | None:
    """The judge saved at `path`, or None (with a one-line message) when it is unreadable or not this one."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if metadata.get("key") != key:
                raise ValueError("it holds another judge than its name says")
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        clf = AttributeClassifier(json.loads(metadata["classes"]))
        clf.load_state_dict(state)
    except (OSError, SafetensorError, RuntimeError, ValueError, KeyError, TypeError) as err:
        # a damaged or foreign file fails in one of these ways; all mean "train again"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"attribute judge {path} is corrupt or stale ({reason}): not used", file=sys.stderr)
        return None
    return clf.to(device).eval()


def saved_judge(key: str, cache_dir: str | Path, device: str | torch.device = "cpu",
                ) -> tuple[AttributeClassifier, Path] | None:
    """The judge `key` and the file it was read from: the one shipped in `JUDGES`, else the one in
    `cache_dir`, passing over a file that is corrupt or stale; None when neither holds it."""
    for path in (JUDGES / judge_file(key), Path(cache_dir) / judge_file(key)):
        clf = _load_classifier(path, key, device) if path.is_file() else None
        if clf is not None:
            return clf, path
    return None


def load_or_train_classifier(train_cache: CaptionCache, val_cache: CaptionCache, attributes: Sequence[str], cache_dir: str | Path,
                             steps: int = STEPS, device: str | torch.device = "cpu",
                             ) -> tuple[AttributeClassifier, dict[str, float]]:
    """The attribute judge of one shapes data set: the one shipped in `JUDGES` if there is one, else trained
    once on the real training images and read from `cache_dir` after (the file is named by the training
    cache's identity, the judge's steps and its version).

    train_cache, val_cache: `CaptionCache`s with `attributes`. Returns the classifier and its accuracy on
    the real validation images (per attribute and strict): a fair judge must be close to 100% there
    (`judge_accuracy` gives it on degraded copies too). The file is written atomically, and one that is
    truncated, corrupt or from another version of the judge is replaced by a newly trained one.
    Taught in notebooks/08_evaluation.ipynb.
    """
    for name, cache in (("training", train_cache), ("validation", val_cache)):
        if cache.attributes is None:
            raise ValueError(f"the {name} cache has no per-image attributes: the attribute judge needs the shapes data")
    classes = {a: ATTRIBUTE_VALUES[a] for a in attributes}
    key = judge_key(train_cache, attributes, steps)
    path = Path(cache_dir) / judge_file(key)
    found = saved_judge(key, cache_dir, device)
    clf = found[0] if found else None
    if clf is None:
        # One thread, so the judge does not depend on the thread setting of whichever process trains it first
        # (reductions split over threads sum in another order, and a different judge reads some images otherwise).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            clf = train_attribute_classifier(train_cache.images.cpu(), train_cache.attributes, classes, steps=steps,
                                             device=device)
        finally:
            torch.set_num_threads(threads)
        save_classifier(clf, key, path)  # never half a judge on disk
    accuracy = attribute_accuracy(clf.predict(val_cache.images), val_cache.attributes, attributes)
    return clf, accuracy
