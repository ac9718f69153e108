"""MS-COCO captions: the reference reader, built on pycocotools and PIL.

Taught in notebooks/06_coco_data.ipynb.

A COCO folder is laid out as

    root/annotations/captions_<split>.json     images + caption annotations (COCO's JSON format)
    root/<split>/<file_name>                   the image files named in that JSON

(`split` is e.g. "train2017"; the built-in shapes set uses the same layout with "train" and "val").

Geometry, decided once and shared with `data/cache.py` through `load_image`: the shorter side is resized
to `image_size` (bilinear, antialiased) and the centre `image_size x image_size` square is cropped, so
objects keep their aspect ratio and only the margins of the longer side are lost. JPEGs are decoded at
a reduced scale first (`Image.draft`), never smaller than `image_size` on the shorter side, which is what
makes decoding cheap. Every PIL mode comes out RGB: alpha is composited over white, 16-bit and integer
greyscale are scaled to 8 bits, palettes and CMYK are converted by PIL.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from mvae_course.config import ON_BAD
from mvae_course.data.text import pad_captions

CAPTION_MODES = ("random", "all")

LAYOUT_HELP = (
    "A COCO folder looks like root/annotations/captions_<split>.json plus root/<split>/<file_name> "
    "(e.g. annotations/captions_train2017.json and train2017/000000000009.jpg)."
)


class CocoDataError(ValueError):
    """A COCO folder, annotation file or image that cannot be read; the message names the file.

    Taught in notebooks/06_coco_data.ipynb.
    """


def annotation_path(root: str | Path, split: str) -> Path:
    """Where the caption annotations of `split` live: `root/annotations/captions_<split>.json`.

    Taught in notebooks/06_coco_data.ipynb.
    """
    return Path(root) / "annotations" / f"captions_{split}.json"


def _read_json(path: Path) -> dict[str, Any]:
    """Parse an annotation file ourselves, so a syntax error names the file, line and column."""
    if not path.is_file():
        root = path.parent.parent
        found = sorted(p.name for p in path.parent.glob("captions_*.json")) if path.parent.is_dir() else []
        hint = f" Annotation files present: {found}." if found else ""
        where = "" if root.is_dir() else f" (the folder {root} does not exist)"
        raise CocoDataError(f"missing caption annotations: expected {path}{where}. {LAYOUT_HELP}{hint}")
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise CocoDataError(
            f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}. "
            "Re-download or regenerate the annotation file."
        ) from e
    except UnicodeDecodeError as e:
        raise CocoDataError(f"{path}: not UTF-8 text ({e}); is this really a COCO annotation file?") from e
    _check_layout(path, data)
    return data


def _check_layout(path: Path, data: Any) -> None:
    """The two lists this reader relies on; what is wrong inside them is `check_annotations`'s business."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
        data.get("annotations"), list
    ):
        raise CocoDataError(
            f"{path}: expected a JSON object with lists 'images' and 'annotations'. {LAYOUT_HELP}"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _name(kind: str, k: int, entry: Any) -> str:
    """How a message names entry `k` of `kind`s: by its COCO id when it has one, else by its position."""
    if isinstance(entry, dict) and _is_int(entry.get("id")):
        return f"{kind} id {entry['id']}"
    return f"{kind}s[{k}]"


def describe_bad_entries(bad: dict[str, list[str]], first: int = 3) -> str:
    """`check_annotations`'s findings in one line: "empty captions: 2 (annotation id 7, annotation id 9)"."""
    parts = []
    for problem, entries in bad.items():
        more = f", and {len(entries) - first} more" if len(entries) > first else ""
        parts.append(f"{problem}: {len(entries)} ({', '.join(entries[:first])}{more})")
    return "; ".join(parts)


def check_annotations(
    path: Path, data: dict[str, Any], on_bad_entry: str = "raise"
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The annotation file `data` (read from `path`) without its bad entries, and those entries by problem.

    Bad entries: images without an `id` or `file_name`, non-integer image ids, image ids used twice
    (their captions cannot be told apart: all are dropped), annotations without an integer `id`, an
    `image_id` and a `caption`, captions that are not strings or are empty, captions of an image id not
    in `images`, and images left without a caption. `on_bad_entry="raise"`: one `CocoDataError` naming
    the file and every problem (first entries and counts); `"skip"`: they are left out, with a warning.
    No usable caption at all is an error either way: a vocabulary needs words.
    """
    if on_bad_entry not in ON_BAD:
        raise ValueError(f"on_bad_entry must be one of {ON_BAD}, got {on_bad_entry!r}")
    bad: dict[str, list[str]] = defaultdict(list)
    images = []
    for k, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            bad["image entries without an id and a file_name"].append(f"images[{k}]")
        elif not _is_int(img["id"]):
            bad["non-integer image ids"].append(f"images[{k}] has id {img['id']!r:.40}")
        else:
            images.append(img)
    uses = Counter(img["id"] for img in images)
    duplicated = {i for i, n in uses.items() if n > 1}
    bad["duplicate image ids"] = [f"image id {i} used {uses[i]} times" for i in sorted(duplicated)]
    images = [img for img in images if img["id"] not in duplicated]
    ids = {img["id"] for img in images}

    annotations = []
    for k, ann in enumerate(data["annotations"]):
        name = _name("annotation", k, ann)
        if not isinstance(ann, dict) or not _is_int(ann.get("id")) or not {"image_id", "caption"} <= set(ann):
            bad["annotation entries without an integer id, an image_id and a caption"].append(name)
        elif not isinstance(ann["caption"], str):
            bad["non-string captions"].append(f"{name} has caption {ann['caption']!r:.40}")
        elif not ann["caption"].strip():
            bad["empty captions"].append(name)
        elif _is_int(ann["image_id"]) and ann["image_id"] in duplicated:
            continue  # left out with its ambiguous image, counted there
        elif not _is_int(ann["image_id"]) or ann["image_id"] not in ids:
            refers = f"{name} refers to image id {ann['image_id']!r:.40}"
            bad["captions of an image id not in 'images'"].append(refers)
        else:
            annotations.append(ann)
    captioned = {ann["image_id"] for ann in annotations}
    bad["images without captions"] = [f"image id {img['id']}" for img in images if img["id"] not in captioned]
    images = [img for img in images if img["id"] in captioned]

    bad = {problem: entries for problem, entries in bad.items() if entries}
    found = f" ({describe_bad_entries(bad)})" if bad else ""
    if not annotations:
        raise CocoDataError(
            f"{path}: no usable caption among its {len(data['annotations'])} annotations{found}; "
            "a vocabulary needs words: check that this is the right annotation file"
        )
    if bad and on_bad_entry == "raise":
        raise CocoDataError(
            f"{path}: bad entries: {describe_bad_entries(bad)}. Fix them, or leave them out with "
            "on_bad_entry='skip' (--on-bad-entry skip)"
        )
    if bad:
        warnings.warn(f"{path}: skipped bad entries: {describe_bad_entries(bad)}")
    return {**data, "images": images, "annotations": annotations}, bad


def read_annotations(
    root: str | Path, split: str, on_bad_entry: str = "raise"
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The checked annotations of one split and their bad entries by problem (see `check_annotations`)."""
    path = annotation_path(root, split)
    return check_annotations(path, _read_json(path), on_bad_entry)


def index_coco(data: dict[str, Any]) -> COCO:
    """Checked annotations indexed by pycocotools (`coco.imgs`, `coco.imgToAnns`)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


def load_coco(root: str | Path, split: str, on_bad_entry: str = "raise") -> COCO:
    """The validated, indexed caption annotations of one split, as a pycocotools `COCO` object.

    Taught in notebooks/06_coco_data.ipynb.
    """
    return index_coco(read_annotations(root, split, on_bad_entry)[0])


def read_captions(root: str | Path, split: str, on_bad_entry: str = "raise") -> list[str]:
    """Every caption of a split, in annotation order: what a tokenizer is fitted on.

    Taught in notebooks/06_coco_data.ipynb.
    """
    return [ann["caption"] for ann in read_annotations(root, split, on_bad_entry)[0]["annotations"]]


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as RGB: alpha over white, 16/32-bit greyscale scaled to 8 bits."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        # PIL's own conversion clips these at 255; scale the 16-bit range instead.
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, image_size: int) -> Image.Image:
    """Resize the shorter side to `image_size` (bilinear, antialiased), then crop the centre square.

    What torchvision's `Resize(image_size)` and `CenterCrop(image_size)` do to a PIL image, pixel for pixel
    (tests/test_coco.py compares them), without importing torchvision: that takes seconds, in every process.
    """
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(image_size * long / short)
    size = (image_size, new_long) if w <= h else (new_long, image_size)
    img = img.resize(size, Image.Resampling.BILINEAR)
    left, top = round((size[0] - image_size) / 2), round((size[1] - image_size) / 2)  # half to even
    return img.crop((left, top, left + image_size, top + image_size))


def load_image(path: str | Path, image_size: int) -> Image.Image:
    """Decode one image file to an RGB `image_size x image_size` PIL image; `CocoDataError` if unreadable.

    Taught in notebooks/06_coco_data.ipynb.

    Images larger than PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, about 89 M
    pixels) are refused too: a 20000 x 20000 PNG of a few kilobytes would otherwise take gigabytes.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns up to 2x limit
            with Image.open(path) as img:
                img.draft("RGB", (image_size, image_size))  # JPEG only: decode at 1/2, 1/4 or 1/8 scale
                img.load()  # decoding errors (a truncated JPEG) surface here, not at open
                rgb = to_rgb(img)
    except FileNotFoundError as e:
        raise CocoDataError(f"{path}: image file is missing") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise CocoDataError(
            f"{path}: refused as a possible decompression bomb: {e} "
            "(raise PIL.Image.MAX_IMAGE_PIXELS if the image is genuine)"
        ) from e
    except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise CocoDataError(f"{path}: cannot decode image: {e}") from e
    return resize_center_crop(rgb, image_size)


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a float32 3 x H x W tensor in [0, 1]."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


class CocoCaptionDataset(Dataset):
    """Image-caption pairs from a COCO folder, decoding each image on access.

    Taught in notebooks/06_coco_data.ipynb.

    `caption_mode="random"`: one item per image; each access draws one of its captions, reproducibly
    from (`seed`, epoch set by `set_epoch`, image id). `caption_mode="all"`: one item per caption
    (for evaluation), so `len()` is the number of captions.

    The annotation file is checked first (`check_annotations`): `on_bad_entry` decides whether a bad
    entry raises or is left out; `bad_entries` lists those left out, by problem.
    `on_bad_image="skip"`: images whose file is missing are dropped at construction; images that fail to
    decode are replaced, at access, by the next good item. `skipped` maps each bad file to the reason
    (with DataLoader workers, access-time skips are recorded in the worker's copy only).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        image_size: int = 64,
        tokenizer: Any = None,
        on_bad_image: str = "raise",
        caption_mode: str = "random",
        seed: int = 0,
        on_bad_entry: str = "raise",
    ) -> None:
        if on_bad_image not in ON_BAD:
            raise ValueError(f"on_bad_image must be one of {ON_BAD}, got {on_bad_image!r}")
        if caption_mode not in CAPTION_MODES:
            raise ValueError(f"caption_mode must be one of {CAPTION_MODES}, got {caption_mode!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer (pixels), got {image_size!r}")
        self.root, self.split, self.image_size = Path(root), split, image_size
        self.tokenizer, self.on_bad_image, self.caption_mode = tokenizer, on_bad_image, caption_mode
        self.seed, self.epoch = seed, 0
        self.annotation_file = annotation_path(root, split)
        data, self.bad_entries = read_annotations(root, split, on_bad_entry)
        self.coco = index_coco(data)  # every image has a caption now
        self.skipped: dict[str, str] = {}

        missing = [path for path in map(self.image_path, sorted(self.coco.imgs)) if not path.is_file()]
        if missing and on_bad_image == "raise":
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CocoDataError(
                f"{missing[0]}: image listed in {self.annotation_file} is missing{more}. "
                f"Check that {self.root / split} holds the images, or pass on_bad_image='skip'."
            )
        for path in missing:
            self.skipped[str(path)] = "missing file"
        if missing:
            warnings.warn(f"{self.annotation_file}: skipped {len(missing)} missing images, e.g. {missing[0]}")
        missing_set = set(missing)
        self.image_ids: list[int] = [
            i for i in sorted(self.coco.imgs) if self.image_path(i) not in missing_set
        ]
        # In "all" mode an item is an (image index, caption index) pair.
        self._items = [
            (n, k) for n, i in enumerate(self.image_ids) for k in range(len(self.coco.imgToAnns[i]))
        ]
        self._bad: set[int] = set()  # image indices that failed to decode

    def __len__(self) -> int:
        return len(self._items) if self.caption_mode == "all" else len(self.image_ids)

    def set_epoch(self, epoch: int) -> None:
        """Choose which caption each image shows this epoch (random mode)."""
        self.epoch = epoch

    def image_path(self, image_id: int) -> Path:
        return self.root / self.split / self.coco.imgs[image_id]["file_name"]

    def captions(self, image_id: int) -> list[str]:
        """All captions of one image, in annotation order."""
        return [ann["caption"] for ann in self.coco.imgToAnns[image_id]]

    def _pick(self, item: int) -> tuple[int, int]:
        """(image index, caption index) of an item."""
        if self.caption_mode == "all":
            return self._items[item]
        image_id = self.image_ids[item]
        rng = np.random.default_rng([self.seed, self.epoch, image_id])
        return item, int(rng.integers(len(self.coco.imgToAnns[image_id])))

    def __getitem__(self, item: int) -> dict[str, Any]:
        n_items = len(self)
        if not -n_items <= item < n_items:
            raise IndexError(f"index {item} out of range for {n_items} items")
        item %= n_items
        for _ in range(n_items):
            n, k = self._pick(item)
            if n not in self._bad:
                try:
                    img = load_image(self.image_path(self.image_ids[n]), self.image_size)
                    break
                except CocoDataError as e:
                    if self.on_bad_image == "raise":
                        raise
                    self._bad.add(n)
                    self.skipped[str(self.image_path(self.image_ids[n]))] = str(e.__cause__ or e)
                    warnings.warn(f"skipping unreadable image: {e}")
            item = (item + 1) % n_items  # fall back to the next item
        else:
            raise CocoDataError(f"no readable image in {self.root / self.split}")
        image_id = self.image_ids[n]
        caption = self.captions(image_id)[k]
        out: dict[str, Any] = {"image": image_to_tensor(img), "image_id": image_id}
        if self.tokenizer is not None:
            out["text"] = self.tokenizer.encode(caption)
        else:
            out["caption"] = caption
        return out


def collate_captions(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack dataset items into the batch dict of docs/architecture.md (`text` padded, EOS appended).

    Returns image B x 3 x H x W float32, text B x T int64, lengths B, image_id B; without a tokenizer,
    `caption` (a list of B strings) replaces text and lengths.
    """
    batch: dict[str, Any] = {
        "image": torch.stack([it["image"] for it in items]),
        "image_id": torch.tensor([it["image_id"] for it in items], dtype=torch.int64),
    }
    if "text" in items[0]:
        batch["text"], batch["lengths"] = pad_captions([it["text"] for it in items])
    else:
        batch["caption"] = [it["caption"] for it in items]
    return batch
