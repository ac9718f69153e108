"""MS-COCO captions: the reference reader, built on pycocotools and PIL.

Taught in notebooks/05_coco_data.ipynb.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from mvae_course.data.text import pad_captions

ON_BAD_IMAGE = ("raise", "skip")
CAPTION_MODES = ("random", "all")

LAYOUT_HELP = (
    "A COCO folder looks like root/annotations/captions_<split>.json plus root/<split>/<file_name> "
    "(e.g. annotations/captions_train2017.json and train2017/000000000009.jpg)."
)


class CocoDataError(ValueError):
    """A COCO folder, annotation file or image that cannot be read; the message names the file.

    Taught in notebooks/05_coco_data.ipynb.
    """


def annotation_path(root: str | Path, split: str) -> Path:
    """Where the caption annotations of `split` live: `root/annotations/captions_<split>.json`.

    Taught in notebooks/05_coco_data.ipynb.
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
    """The few fields this reader relies on, checked before pycocotools indexes them."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
        data.get("annotations"), list
    ):
        raise CocoDataError(
            f"{path}: expected a JSON object with lists 'images' and 'annotations'. {LAYOUT_HELP}"
        )
    ids = set()
    for k, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise CocoDataError(f"{path}: images[{k}] needs an 'id' and a 'file_name', got {img!r:.200}")
        ids.add(img["id"])
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) or "image_id" not in ann:
            raise CocoDataError(
                f"{path}: annotations[{k}] needs an 'image_id' and a string 'caption', got {ann!r:.200}"
            )
        if ann["image_id"] not in ids:
            raise CocoDataError(
                f"{path}: annotations[{k}] refers to image id {ann['image_id']}, which is not in 'images'"
            )


def load_coco(root: str | Path, split: str) -> COCO:
    """The validated, indexed caption annotations of one split, as a pycocotools `COCO` object.

    Taught in notebooks/05_coco_data.ipynb.
    """
    coco = COCO()
    coco.dataset = _read_json(annotation_path(root, split))
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


def read_captions(root: str | Path, split: str) -> list[str]:
    """Every caption of a split, in annotation order: what a tokenizer is fitted on.

    Taught in notebooks/05_coco_data.ipynb.
    """
    return [ann["caption"] for ann in load_coco(root, split).dataset["annotations"]]


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
    """Resize the shorter side to `image_size`, then crop the centre square (torchvision's transforms)."""
    img = TF.resize(img, image_size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(img, [image_size, image_size])


def load_image(path: str | Path, image_size: int) -> Image.Image:
    """Decode one image file to an RGB `image_size x image_size` PIL image; `CocoDataError` if unreadable.

    Taught in notebooks/05_coco_data.ipynb.
    """
    try:
        with Image.open(path) as img:
            img.draft("RGB", (image_size, image_size))  # JPEG only: decode at 1/2, 1/4 or 1/8 scale
            img.load()  # decoding errors (a truncated JPEG) surface here, not at open
            rgb = to_rgb(img)
    except FileNotFoundError as e:
        raise CocoDataError(f"{path}: image file is missing") from e
    except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise CocoDataError(f"{path}: cannot decode image: {e}") from e
    return resize_center_crop(rgb, image_size)


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a float32 3 x H x W tensor in [0, 1]."""
    return TF.pil_to_tensor(img).float().div_(255.0)


class CocoCaptionDataset(Dataset):
    """Image-caption pairs from a COCO folder, decoding each image on access.

    Taught in notebooks/05_coco_data.ipynb.

    `caption_mode="random"`: one item per image; each access draws one of its captions, reproducibly
    from (`seed`, epoch set by `set_epoch`, image id). `caption_mode="all"`: one item per caption
    (for evaluation), so `len()` is the number of captions. Images without any caption are left out.

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
    ) -> None:
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
        if caption_mode not in CAPTION_MODES:
            raise ValueError(f"caption_mode must be one of {CAPTION_MODES}, got {caption_mode!r}")
        self.root, self.split, self.image_size = Path(root), split, image_size
        self.tokenizer, self.on_bad_image, self.caption_mode = tokenizer, on_bad_image, caption_mode
        self.seed, self.epoch = seed, 0
        self.annotation_file = annotation_path(root, split)
        self.coco = load_coco(root, split)
        self.skipped: dict[str, str] = {}

        missing = []
        for image_id in sorted(self.coco.imgs):
            path = self.image_path(image_id)
            if self.coco.imgToAnns[image_id] and not path.is_file():
                missing.append(path)
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
            i for i in sorted(self.coco.imgs)
            if self.coco.imgToAnns[i] and self.image_path(i) not in missing_set
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
