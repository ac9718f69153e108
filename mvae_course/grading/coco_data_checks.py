"""Checks for exercises/06_coco_data_exercises.ipynb, which follows notebooks/06_coco_data.ipynb: the
batch contract (padding captions), and three data questions on a small COCO-style folder written here:
images without captions, duplicate image ids, captions longer than N wordpieces.

Every folder holds all three problems (in random numbers, sometimes none), tiny PNG images for every
entry, empty captions and words that BERT splits into several pieces.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mvae_course.data.text import BOS, EOS, PAD, bert_tokenizer
from mvae_course.grading.kernel import FOLDER
from mvae_course.grading.question import Case, Question, ReferenceJudge, case

NOTEBOOK = "06_coco_data_exercises"
SPLIT = "train2017"
WORDS = ["a", "man", "woman", "dog", "cat", "riding", "skateboarding", "snowboarder", "frisbee", "on", "the",
         "beach", "street", "with", "giraffe", "kitchen", "microwave", "red", "umbrella", "sidewalk", "of", "two"]


# --- q28: padding a batch of captions ------------------------------------------------------------------


def _pad_cases(g: torch.Generator) -> list[Case]:
    def ids(n: int) -> list[int]:
        return torch.randint(4, 50, (n,), generator=g).tolist()

    lengths = torch.randint(1, 9, (5,), generator=g).tolist()
    return [
        case([ids(n) for n in lengths]),
        case([ids(3), ids(1), []], label="three captions, the last with no words"),
        case([ids(6)], label="one caption"),
    ]


def _pad_reference(ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(c) + 1 for c in ids])
    text = torch.full((len(ids), int(lengths.max())), PAD, dtype=torch.long)
    for row, caption in enumerate(ids):
        text[row, : len(caption)] = torch.tensor(caption, dtype=torch.long)
        text[row, len(caption)] = EOS
    return text, lengths


def _pad_variant(ids: list[list[int]], start: list[int] = (), eos: bool = True, count_eos: bool = True):
    rows = [[*start, *c, *([EOS] if eos else [])] for c in ids]
    T = max(len(r) for r in rows)
    text = torch.tensor([r + [PAD] * (T - len(r)) for r in rows], dtype=torch.long)
    return text, torch.tensor([len(r) - (0 if count_eos else 1) for r in rows])


PAD_CAPTIONS = Question(
    id="q28", notebook=NOTEBOOK, function="pad_captions", title="a batch of captions", points=1, kind="implement",
    cases=_pad_cases, forbidden=("mvae_course.data.text.pad_captions",),
    judge=ReferenceJudge(
        _pad_reference,
        mistakes=[
            ("every caption ends with one EOS, so the decoder learns where captions stop",
             lambda ids: _pad_variant(ids, eos=False, count_eos=True)),
            ("lengths count the real tokens of each caption: its content ids AND its EOS",
             lambda ids: _pad_variant(ids, count_eos=False)),
            ("BOS never appears in a batch: the decoder prepends it when it shifts its inputs",
             lambda ids: _pad_variant(ids, start=[BOS])),
        ],
        hint="lesson 06 section 3 shows the batch format (docs/architecture.md, 'Tokens')",
    ),
)


# --- the COCO-style folder ----------------------------------------------------------------------------


@functools.cache
def _png() -> torch.Tensor:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(out, format="PNG")
    return torch.frombuffer(bytearray(out.getvalue()), dtype=torch.uint8)


def _caption(g: torch.Generator, n: int) -> str:
    return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (n,), generator=g))


def coco_folder(g: torch.Generator, uncaptioned: int, duplicated: int, long: int) -> dict[str, Any]:
    """A COCO 2017-style folder with `uncaptioned` images no annotation refers to, `duplicated` image ids
    used by more than one `images` entry, `long` captions far longer than the rest, and an image whose
    only caption is empty."""
    ids = (torch.randperm(900, generator=g)[:12] + 100).tolist()
    images = [{"id": i, "file_name": f"{i:012d}.png", "width": 8, "height": 8} for i in ids]
    for i in ids[:duplicated]:  # a second entry with the same id: pixels of another file
        images.append({"id": i, "file_name": f"{i:012d}_copy.png", "width": 8, "height": 8})
    for i in ids[:1] if duplicated else []:  # one id used three times
        images.append({"id": i, "file_name": f"{i:012d}_copy2.png", "width": 8, "height": 8})
    annotations, ann_id = [], int(torch.randint(1000, 9000, (), generator=g))
    captioned = ids[uncaptioned:]
    for image_id in captioned:
        n = 1 if image_id == captioned[-1] else int(torch.randint(1, 4, (), generator=g))
        for _ in range(n):
            annotations.append({"id": ann_id, "image_id": image_id, "caption": _caption(g, int(torch.randint(5, 12, (), generator=g)))})
            ann_id += int(torch.randint(1, 5, (), generator=g))
    for k in range(long):
        annotations[k * 2]["caption"] = _caption(g, int(torch.randint(30, 60, (), generator=g)))
    annotations[-1]["caption"] = ""  # the last image's only caption is empty: zero tokens
    order = torch.randperm(len(images), generator=g).tolist()
    data = {"info": {"description": "a graded COCO-style sample"}, "images": [images[i] for i in order],
            "annotations": annotations}
    files: dict[str, Any] = {f"annotations/captions_{SPLIT}.json": json.dumps(data, indent=1)}
    for entry in images:
        files[f"{SPLIT}/{entry['file_name']}"] = _png()
    return {FOLDER: files}


def _annotations(root: Path, split: str) -> dict[str, Any]:
    return json.loads((Path(root) / "annotations" / f"captions_{split}.json").read_text())


def _folder_cases(g: torch.Generator) -> list[Case]:
    return [
        case(coco_folder(g, 2, 1, 2), SPLIT),
        case(coco_folder(g, 0, 2, 1), SPLIT, label="a folder where every image has a caption"),
        case(coco_folder(g, 3, 0, 0), SPLIT, label="a folder without duplicate ids or long captions"),
    ]


# --- q29: images without captions ---------------------------------------------------------------------


def _without_captions(root: Path, split: str, empty_counts: bool = True, invert: bool = False) -> list[int]:
    data = _annotations(root, split)
    referred = {a["image_id"] for a in data["annotations"] if empty_counts or a["caption"].strip()}
    return sorted({i["id"] for i in data["images"] if (i["id"] in referred) == invert})


IMAGES_WITHOUT_CAPTIONS = Question(
    id="q29", notebook=NOTEBOOK, function="images_without_captions", title="images without captions", points=1,
    kind="data", cases=_folder_cases,
    judge=ReferenceJudge(
        _without_captions,
        mistakes=[
            ("those are the images that HAVE captions", lambda root, split: _without_captions(root, split, invert=True)),
            (("an annotation with an empty caption still refers to its image: the question asks for the images no "
              "annotation refers to"), lambda root, split: _without_captions(root, split, empty_counts=False)),
        ],
        hint="return the sorted ids of the images no annotation refers to, each once",
    ),
)


# --- q30: duplicate image ids -------------------------------------------------------------------------


def _duplicates(root: Path, split: str, key: str = "images", repeats: bool = False) -> list[int]:
    data = _annotations(root, split)
    ids = [entry["id" if key == "images" else "image_id"] for entry in data[key]]
    extra = sorted(i for n, i in enumerate(ids) if i in ids[:n])
    return extra if repeats else sorted(set(extra))


DUPLICATE_IDS = Question(
    id="q30", notebook=NOTEBOOK, function="duplicate_image_ids", title="duplicate image ids", points=1, kind="data",
    cases=_folder_cases,
    judge=ReferenceJudge(
        _duplicates,
        mistakes=[
            ("several captions per image are normal: a duplicate id is one that more than one entry of `images` uses",
             lambda root, split: _duplicates(root, split, key="annotations")),
            ("list each duplicated id once", lambda root, split: _duplicates(root, split, repeats=True)),
        ],
        hint="lesson 06 section 1: which list of the annotation file defines the images",
    ),
)


# --- q31: captions longer than N wordpieces -----------------------------------------------------------


def _long_cases(g: torch.Generator) -> list[Case]:
    cases = []
    for c, n in zip(_folder_cases(g), (20, 12, 8)):
        cases.append(case(*c, n, label=f"N = {n}"))
    return cases


def _long(root: Path, split: str, max_tokens: int, count: str = "pieces", strict: bool = True,
          images: bool = False) -> list[int]:
    def length(caption: str) -> int:
        if count == "words":
            return len(caption.split())
        return len(bert_tokenizer().tokenize(caption)) + (2 if count == "specials" else 0)  # [CLS], [SEP]

    anns = _annotations(root, split)["annotations"]
    hits = [a for a in anns if (length(a["caption"]) > max_tokens if strict else length(a["caption"]) >= max_tokens)]
    return sorted({a["image_id"] for a in hits}) if images else sorted(a["id"] for a in hits)


LONG_CAPTIONS = Question(
    id="q31", notebook=NOTEBOOK, function="long_captions", title="captions longer than N wordpieces", points=2,
    kind="data", cases=_long_cases,
    judge=ReferenceJudge(
        _long,
        mistakes=[
            ("you counted words; the decoder reads BERT wordpieces, and a rare word is several of them",
             lambda *a: _long(*a, count="words")),
            ("BERT's [CLS] and [SEP] are not part of a caption: count its wordpieces only",
             lambda *a: _long(*a, count="specials")),
            ("'longer than N' is strictly more than N wordpieces", lambda *a: _long(*a, strict=False)),
            ("return the ids of the caption annotations, not of their images", lambda *a: _long(*a, images=True)),
        ],
        hint="lesson 06 section 2 measures captions in wordpieces; return the sorted annotation ids",
    ),
)


QUESTIONS = [PAD_CAPTIONS, IMAGES_WITHOUT_CAPTIONS, DUPLICATE_IDS, LONG_CAPTIONS]
