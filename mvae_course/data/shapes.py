"""The built-in synthetic data: coloured shapes with captions, written in MS-COCO's caption layout.

Taught in notebooks/00_setup.ipynb.

Each image shows a shape on a black background; five captions describe it in varied words. As in the
CdSprites+ benchmark, a `level` sets how many attributes vary (the rest stay fixed and the captions
never mention them):

    level 1: shape                 level 4: + position (a quadrant)
    level 2: + size                level 5: + a second object (all four attributes, another quadrant)
    level 3: + colour

Because every caption is generated from known attributes, `parse_caption` can read them back from
any caption, including a model's, which makes image-to-text coherence exactly measurable.

Inside its quadrant an object sits up to `JITTER` (3% of the image side) off the quadrant's centre, the
same for every size: a position is a region, not a pixel, yet a caption, which names only the quadrant,
still pins the object down to about its own outline. (Version 1 let small objects move by half their
own diameter; the best model's drawing of a caption was then the shape averaged over those places, a
blob whose shape no judge could read. See benchmarks/README.md, "Quality".)

On disk (`write_shapes`), the folder reads like COCO 2017 and loads with pycocotools:

    root/annotations/captions_train.json   root/train/000000000001.png ...
    root/annotations/captions_val.json     root/val/000001000001.png ...

with each "images" entry also carrying its ground truth `attributes` and the drawn `objects`.

Two harder tests of generalisation, still exact. A `holdout` (e.g. "shape-colour") keeps a fixed list of
attribute combinations (`HOLDOUTS`) out of the training split entirely, while every other image of the
validation split shows one: seen and unseen combinations are then measured apart. And
`unseen_order_captions` writes captions in word orders `write_captions` never produces, for testing only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mvae_course.atomic import FileLock
from mvae_course.progress import tqdm

SHAPES = ("circle", "square", "triangle", "cross", "star")
SIZES = ("small", "large")
COLOUR_RGB = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 250),
    "yellow": (240, 220, 40),
    "cyan": (40, 210, 220),
    "purple": (190, 60, 230),
}
COLOURS = tuple(COLOUR_RGB)
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
LEVELS = (1, 2, 3, 4, 5)

_OBJECT_ATTRIBUTES = ("shape", "size", "colour", "position")
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "size": SIZES, "colour": COLOURS, "position": POSITIONS,
    "shape2": SHAPES, "size2": SIZES, "colour2": COLOURS, "position2": POSITIONS,
}
# What an attribute is when its level does not vary it.
FIXED = {"size": "large", "colour": "white", "position": "centre"}
FIXED_RGB = (235, 235, 235)
BACKGROUND_RGB = (0, 0, 0)

# Object diameter and quadrant centres as fractions of the image side; (x, y) from the top left.
SIZE_FRACTION = {"small": 0.24, "large": 0.42}
POSITION_CENTRE = {
    "top left": (0.25, 0.25), "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75), "bottom right": (0.75, 0.75), "centre": (0.5, 0.5),
}
SUPERSAMPLE = 4  # draw at 4x the size, then downsample: antialiased edges
# The most an object's centre moves off its quadrant's centre, in x and in y, as a fraction of the side;
# a large object (0.42) then still keeps 0.01 inside its quadrant.
JITTER = 0.03
GENERATOR_VERSION = 2  # bump when the images or captions change, so `ensure_shapes` regenerates

# Compositional splits: (shape, colour) pairs never drawn in the training split. Each colour and each
# shape still appears there with other partners, so an unseen pair is a new combination of known parts.
HOLDOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "shape-colour": (("circle", "red"), ("square", "green"), ("triangle", "blue"), ("cross", "yellow"),
                     ("star", "cyan"), ("triangle", "purple")),
}

# Words the captions use for each value; `parse_caption` reads all of them back.
_WORDS = {
    "shape": {
        "circle": ("circle", "disc"), "square": ("square", "box"), "triangle": ("triangle",),
        "cross": ("cross", "plus sign"), "star": ("star",),
    },
    "size": {"small": ("small", "little", "tiny"), "large": ("large", "big")},
    "colour": {c: (c,) for c in COLOURS} | {"purple": ("purple", "violet")},
}
_VERTICAL = {"top": ("top", "upper"), "bottom": ("bottom", "lower")}


def attributes_at_level(level: int) -> tuple[str, ...]:
    """The attributes that vary (and that captions mention) at a level, e.g. level 3 -> shape, size, colour.

    Taught in notebooks/08_evaluation.ipynb.
    """
    _check_level(level)
    if level == 5:
        return _OBJECT_ATTRIBUTES + tuple(f"{a}2" for a in _OBJECT_ATTRIBUTES)
    return _OBJECT_ATTRIBUTES[:level]


def held_out(attributes: Mapping[str, Any], holdout: str | None) -> bool:
    """Whether an image shows a combination its `holdout` keeps out of training: any of its objects'
    (shape, colour) pairs ("shape"/"colour", and "shape2"/"colour2" at level 5) is in `HOLDOUTS[holdout]`."""
    if holdout is None:
        return False
    if holdout not in HOLDOUTS:
        raise ValueError(f"data.holdout {holdout!r} is not a holdout; use one of {sorted(HOLDOUTS)} or null")
    pairs = set(HOLDOUTS[holdout])
    return any((attributes.get(f"shape{k}"), attributes.get(f"colour{k}")) in pairs for k in ("", "2"))


def _check_holdout(holdout: str | None, level: int) -> None:
    if holdout is None:
        return
    if holdout not in HOLDOUTS:
        raise ValueError(f"holdout must be None or one of {sorted(HOLDOUTS)}, got {holdout!r}")
    if level < 3:
        raise ValueError(f"holdout {holdout!r} holds (shape, colour) pairs out: it needs level 3 or more "
                         f"(colour varies), got level {level}")


def _check_level(level: int) -> None:
    if level not in LEVELS:
        raise ValueError(
            f"shapes level must be one of {LEVELS} (1 shape, 2 +size, 3 +colour, 4 +position, "
            f"5 +second object), got {level!r}"
        )


# ---------------------------------------------------------------------------------------------
# Sampling and drawing


def sample_objects(rng: np.random.Generator, level: int, holdout: str | None = None,
                   unseen: bool | None = None) -> list[dict[str, str]]:
    """One or two objects' attributes; non-varying ones take their `FIXED` value.

    Two objects sit in different quadrants, listed in `POSITIONS` order (top left first). With a
    `holdout`, `unseen=False` draws only objects whose (shape, colour) pair it does not hold out, and
    `unseen=True` only images that show at least one held-out pair (by drawing again until they do).
    """
    _check_level(level)
    _check_holdout(holdout, level)
    while True:
        objects = _draw_objects(rng, level)
        if unseen is None or held_out(_attributes(objects, level), holdout) == unseen:
            return objects


def _draw_objects(rng: np.random.Generator, level: int) -> list[dict[str, str]]:
    n = 2 if level == 5 else 1
    varying = _OBJECT_ATTRIBUTES[: min(level, 4)]
    quadrants = sorted(rng.choice(len(POSITIONS), size=n, replace=False).tolist())
    objects = []
    for k in range(n):
        obj = {"shape": SHAPES[rng.integers(len(SHAPES))]}
        obj["size"] = SIZES[rng.integers(len(SIZES))] if "size" in varying else FIXED["size"]
        obj["colour"] = COLOURS[rng.integers(len(COLOURS))] if "colour" in varying else FIXED["colour"]
        obj["position"] = POSITIONS[quadrants[k]] if "position" in varying else FIXED["position"]
        objects.append(obj)
    return objects


def _attributes(objects: list[dict[str, str]], level: int) -> dict[str, str]:
    names = attributes_at_level(level)
    flat = {a: objects[0][a] for a in _OBJECT_ATTRIBUTES} | (
        {f"{a}2": objects[1][a] for a in _OBJECT_ATTRIBUTES} if len(objects) > 1 else {}
    )
    return {a: flat[a] for a in names}


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, d: float, rgb: tuple) -> None:
    """One shape of diameter `d` centred on (cx, cy), in pixels."""
    r = d / 2
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
    elif shape == "square":  # a bit smaller than the circle's box so the two cover similar areas
        s = 0.85 * r
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=rgb)
    elif shape == "cross":
        t = d / 6
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=rgb)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=rgb)
    elif shape == "star":  # five points; an inner radius of 0.45 r keeps it legible at 32 x 32
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        draw.polygon(list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles))), fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def render(objects: list[dict[str, Any]], image_size: int) -> Image.Image:
    """Draw objects (each with shape, colour, `center` [x, y] and `diameter` in pixels) on black."""
    big = image_size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND_RGB)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        rgb = COLOUR_RGB.get(obj["colour"], FIXED_RGB)
        cx, cy = (SUPERSAMPLE * v for v in obj["center"])
        _draw_object(draw, obj["shape"], cx, cy, SUPERSAMPLE * obj["diameter"], rgb)
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS)


def _place(objects: list[dict[str, str]], rng: np.random.Generator, image_size: int) -> list[dict[str, Any]]:
    # Inside its quadrant an object moves a little at random, so a position is a region, not a pixel.
    placed = []
    for obj in objects:
        d = SIZE_FRACTION[obj["size"]]
        x, y = POSITION_CENTRE[obj["position"]]
        if obj["position"] != "centre":
            x, y = x + rng.uniform(-JITTER, JITTER), y + rng.uniform(-JITTER, JITTER)
        center = [round(x * image_size, 2), round(y * image_size, 2)]
        placed.append(obj | {"center": center, "diameter": round(d * image_size, 2)})
    return placed


# ---------------------------------------------------------------------------------------------
# Captions


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[rng.integers(len(options))]


def _position_phrases(position: str, rng: np.random.Generator) -> tuple[str, str]:
    """(a trailing phrase like "in the upper left", a heading like "top-left")."""
    v, h = position.split()
    v_word = _pick(rng, _VERTICAL[v])
    trailing = _pick(rng, (f"at the {v_word} {h}", f"in the {v_word} {h}", f"in the {v_word} {h} corner"))
    heading = _pick(rng, (f"{v_word}-{h}", f"{v_word} {h}", f"{v_word} {h} corner"))
    return trailing, heading


def _noun_phrase(obj: dict[str, str], varying: tuple[str, ...], rng: np.random.Generator) -> str:
    """The object without its position, e.g. "a big red circle" or "one red circle, large"."""
    noun = _pick(rng, _WORDS["shape"][obj["shape"]])
    size = _pick(rng, _WORDS["size"][obj["size"]]) if "size" in varying else ""
    colour = _pick(rng, _WORDS["colour"][obj["colour"]]) if "colour" in varying else ""
    if size and rng.integers(3) == 0:  # the size after the noun
        return " ".join(w for w in ("one", colour, f"{noun},", size) if w)
    return " ".join(w for w in ("a", size, colour, noun) if w)


def _object_phrase(
    obj: dict[str, str], varying: tuple[str, ...], rng: np.random.Generator, heading: bool = False
) -> str:
    """The object with its position, trailing ("..., in the upper left") or, if `heading`, leading."""
    phrase = _noun_phrase(obj, varying, rng)
    if "position" not in varying:
        return phrase
    trailing, lead = _position_phrases(obj["position"], rng)
    if heading and rng.integers(3) == 0:
        return f"{lead}: {phrase}"
    return f"{phrase}, {trailing}" if "," in phrase else f"{phrase} {trailing}"


def _single_caption(template: int, obj: dict[str, str], varying: tuple[str, ...], rng) -> str:
    if template in (3, 4) and "position" in varying:
        trailing, lead = _position_phrases(obj["position"], rng)
        phrase = _noun_phrase(obj, varying, rng)
        return f"{lead}: {phrase}" if template == 3 else f"{trailing}, {phrase}"
    prefix = ("", "there is ", "a picture of ", "an image showing ", "this is ", "we see ")[template]
    return prefix + _object_phrase(obj, varying, rng)


def _pair_caption(template: int, objects: list[dict[str, str]], rng) -> str:
    heading = template in (0, 4)  # "top-left: ..." reads badly after "there is"
    first, second = (_object_phrase(o, _OBJECT_ATTRIBUTES, rng, heading) for o in objects)
    return (
        f"{first} and {second}",
        f"there is {first} and {second}",
        f"two shapes: {first}; {second}",
        f"a picture of {first} and {second}",
        f"{first}; {second}",
        f"we see {first}, and {second}",
    )[template]


def write_captions(
    objects: list[dict[str, str]], level: int, rng: np.random.Generator, n: int = 5
) -> list[str]:
    """`n` differently phrased captions of the objects, mentioning only the attributes `level` varies."""
    varying = _OBJECT_ATTRIBUTES[: min(level, 4)]
    templates = rng.permutation(6)[:n].tolist()
    if len(objects) == 1:
        return [_single_caption(t, objects[0], varying, rng) for t in templates]
    # The caption names the two objects in either order.
    return [_pair_caption(t, objects if rng.integers(2) else objects[::-1], rng) for t in templates]


# Word orders for testing only. `write_captions` names an object's attributes in four orders (size,
# colour, shape, position; colour, shape, size, position; and both with the position first); each of
# these names them in another one, with words the generator already uses at that level.
def _new_order_phrase(template: int, obj: dict[str, str], varying: tuple[str, ...], rng) -> str:
    noun = _pick(rng, _WORDS["shape"][obj["shape"]])
    size = _pick(rng, _WORDS["size"][obj["size"]])
    colour = _pick(rng, _WORDS["colour"][obj["colour"]])
    trailing, lead = _position_phrases(obj["position"], rng) if "position" in varying else ("", "")
    if template == 0:  # shape, colour, size, position
        words = [f"a {noun}", colour, size] + ([trailing] if trailing else [])
        return ", ".join(words)
    if template == 1:  # colour, size, shape, position
        return " ".join(w for w in ("a", colour, size, noun, trailing) if w)
    if template == 2:  # position, shape, size, colour
        return f"{lead}: {noun}, {size}, {colour}" if lead else f"{noun}, {size}, {colour}"
    if template == 3:  # shape, position, colour, size
        return " ".join(w for w in (noun, trailing, "is", f"{colour},", size) if w)
    return f"a {size} {noun} {trailing}, {colour}" if trailing else f"a {size} {noun}, {colour}"  # size, shape, position, colour


UNSEEN_ORDER_TEMPLATES = 5


def unseen_order_captions(attributes: Mapping[str, str], level: int, rng: np.random.Generator,
                          n: int = 1) -> list[str]:
    """`n` captions of an image's attributes in word orders the generator never writes (test use only).

    attributes: an image's ground truth (the keys `attributes_at_level(level)`). Needs level 3 or more:
    with one or two attributes every order already occurs. At level 5 the two objects, each in a new
    order, are joined by "and" or ";" in either order. Every caption parses back to `attributes`.
    """
    _check_level(level)
    if level < 3:
        raise ValueError(f"captions in unseen word orders need level 3 or more, got level {level}")
    varying = _OBJECT_ATTRIBUTES[: min(level, 4)]
    objects = [{a: attributes.get(f"{a}{k}", FIXED.get(a)) for a in _OBJECT_ATTRIBUTES}
               for k in (("", "2") if level == 5 else ("",))]
    captions = []
    for _ in range(n):
        if rng.integers(2):
            objects = objects[::-1]
        phrases = [_new_order_phrase(int(rng.integers(UNSEEN_ORDER_TEMPLATES)), o, varying, rng) for o in objects]
        captions.append(_pick(rng, (" and ", "; ")).join(phrases))
    return captions


# ---------------------------------------------------------------------------------------------
# Reading captions back


def _lexicon() -> dict[str, tuple[str, str]]:
    # word -> (attribute, value); "plus" alone also reads as a cross
    lex = {
        w: (attr, value) for attr, table in _WORDS.items() for value, words in table.items() for w in words
    }
    lex["plus"] = ("shape", "cross")
    lex["disk"] = ("shape", "circle")
    return lex


_LEXICON = _lexicon()
_VERTICAL_WORDS = {w: v for v, words in _VERTICAL.items() for w in words}


def _lookup(word: str) -> tuple[str, str] | None:
    # Accept plurals a model may write ("circles", "boxes").
    if word not in _LEXICON and word.endswith("s"):
        word = word[:-1] if word[:-1] in _LEXICON else word[:-2]
    return _LEXICON.get(word)


def _parse_object(text: str) -> dict[str, str | None]:
    """Attributes named in one object's stretch of text; None where absent or contradictory."""
    found: dict[str, set[str]] = {a: set() for a in _OBJECT_ATTRIBUTES}
    words = text.split()
    vertical = {_VERTICAL_WORDS[w] for w in words if w in _VERTICAL_WORDS}
    horizontal = {w for w in words if w in ("left", "right")}
    for v in vertical:
        for h in horizontal:
            found["position"].add(f"{v} {h}")
    for i, word in enumerate(words):
        hit = _LEXICON.get(f"{word} {words[i + 1]}") if i + 1 < len(words) else None
        hit = hit or _lookup(word)
        if hit:
            found[hit[0]].add(hit[1])
    return {a: next(iter(values)) if len(values) == 1 else None for a, values in found.items()}


def parse_caption(text: str, level: int | None = None) -> dict[str, str | None] | None:
    """Read the attributes back from a caption: ours (any template, any synonym) or a model's.

    Case, punctuation, hyphens and odd spacing are ignored ("top - left : one red circle , large"
    reads like "top-left: one red circle, large"), and plurals are accepted. An attribute that is
    not mentioned, or mentioned with two different values, is None. At level 5 the two objects are
    the stretches of text around "and" or ";"; they are reported in `POSITIONS` order (top left
    first) when both positions are read, else in the order written, as `shape, size, colour,
    position` and `shape2, size2, colour2, position2`.

    With `level`, the dict has exactly the keys `attributes_at_level(level)` (below level 5 the whole
    caption describes one object). Without it, the dict has the four single-object keys, plus the
    four "2" keys when the caption describes a second object. Returns None when nothing is read.

    Taught in notebooks/08_evaluation.ipynb.
    """
    if level is not None:
        _check_level(level)
    clean = re.sub(r"[^a-z;]+", " ", text.lower())
    if level is not None and level < 5:
        segments = [clean]
    else:
        segments = re.split(r";|\band\b", clean)
    objects = [o for o in map(_parse_object, segments) if any(v is not None for v in o.values())][:2]
    if len(objects) == 2 and objects[0]["position"] and objects[1]["position"]:
        objects.sort(key=lambda o: POSITIONS.index(o["position"]))
    parsed = dict.fromkeys(_OBJECT_ATTRIBUTES) | (objects[0] if objects else {})
    if len(objects) == 2 or level == 5:
        second = objects[1] if len(objects) == 2 else {}
        parsed |= {f"{a}2": second.get(a) for a in _OBJECT_ATTRIBUTES}
    if level is not None:
        parsed = {a: parsed[a] for a in attributes_at_level(level)}
    return parsed if any(v is not None for v in parsed.values()) else None


# ---------------------------------------------------------------------------------------------
# Writing the data set


def _params(n_train: int, n_val: int, level: int, seed: int, image_size: int,
            holdout: str | None) -> dict[str, Any]:
    return {
        "generator": GENERATOR_VERSION, "n_train": n_train, "n_val": n_val,
        "level": level, "seed": seed, "image_size": image_size, "holdout": holdout,
    }


def _check_params(n_train: int, n_val: int, level: int, image_size: int, holdout: str | None) -> None:
    _check_level(level)
    _check_holdout(holdout, level)
    if n_train < 1 or n_val < 0:
        raise ValueError(f"need n_train >= 1 and n_val >= 0 images, got n_train={n_train}, n_val={n_val}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels for legible shapes, got {image_size}")


def _write_split(
    out: Path, split: str, n: int, params: dict[str, Any], first_id: int, bar: tqdm
) -> None:
    level, image_size, holdout = params["level"], params["image_size"], params["holdout"]
    rng = np.random.default_rng([params["seed"], ("train", "val").index(split)])
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        image_id = first_id + i
        # With a holdout: no held-out pair in training; in validation, every other image shows one.
        unseen = None if holdout is None else (split == "val" and i % 2 == 1)
        objects = _place(sample_objects(rng, level, holdout, unseen), rng, image_size)
        file_name = f"{image_id:012d}.png"
        render(objects, image_size).save(folder / file_name)
        images.append({
            "id": image_id, "file_name": file_name, "width": image_size, "height": image_size, "license": 1,
            "attributes": _attributes(objects, level), "objects": objects,
        })
        for k, caption in enumerate(write_captions(objects, level, rng)):
            annotations.append({"id": image_id * 10 + k, "image_id": image_id, "caption": caption})
        bar.update()
    # Files left from an earlier, larger run would otherwise linger beside the new ones.
    keep = {im["file_name"] for im in images}
    for stale in folder.glob("[0-9]" * 12 + ".png"):
        if stale.name not in keep:
            stale.unlink()
    data = {
        "info": {
            "description": f"mvae_course synthetic shapes, level {level}, split {split}",
            "version": str(GENERATOR_VERSION), "year": 2025, "contributor": "mvae_course",
            "date_created": "", "url": "", "shapes": params,
        },
        "licenses": [
            {"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}
        ],
        "images": images,
        "annotations": annotations,
    }
    # Written last: a run cut short leaves no annotation file, so `ensure_shapes` starts again.
    (out / "annotations" / f"captions_{split}.json").write_text(json.dumps(data) + "\n")


def write_shapes(
    out: str | Path, n_train: int, n_val: int, level: int = 4, seed: int = 0, image_size: int = 64,
    holdout: str | None = None,
) -> Path:
    """Generate the shapes data set under `out` in COCO's caption layout; the same seed gives the same bytes.

    Writes `out/annotations/captions_{train,val}.json` and `out/{train,val}/*.png`. Image ids are
    1.. in train and 1000001.. in val. With a `holdout` (a key of `HOLDOUTS`) the training split never
    shows its (shape, colour) pairs and every odd-numbered validation image does. Returns `out`.

    Taught in notebooks/00_setup.ipynb.
    """
    _check_params(n_train, n_val, level, image_size, holdout)
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):  # drop the old annotations first: no mix of old and new
        (out / "annotations" / f"captions_{split}.json").unlink(missing_ok=True)
    params = _params(n_train, n_val, level, seed, image_size, holdout)
    with tqdm(total=n_train + n_val, desc=f"shapes level {level}", unit="img") as bar:
        _write_split(out, "train", n_train, params, 1, bar)
        _write_split(out, "val", n_val, params, 1_000_001, bar)
    return out


def _written_params(root: Path) -> dict[str, Any] | None:
    found = None
    for split in ("train", "val"):
        path = root / "annotations" / f"captions_{split}.json"
        try:
            data = json.loads(path.read_text())
            params = data["info"]["shapes"]
            missing = any(not (root / split / im["file_name"]).is_file() for im in data["images"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if missing or (found is not None and params != found):
            return None
        found = params
    return found


def ensure_shapes(
    root: str | Path, n_train: int, n_val: int, level: int = 4, seed: int = 0, image_size: int = 64,
    holdout: str | None = None,
) -> Path:
    """The shapes data set at `root`: reused when already written with these parameters, else (re)generated.
    Processes needing it at once (two lessons) take turns: the second reuses what the first wrote.

    Taught in notebooks/00_setup.ipynb.
    """
    _check_params(n_train, n_val, level, image_size, holdout)
    root = Path(root)
    wanted = _params(n_train, n_val, level, seed, image_size, holdout)
    if _written_params(root) == wanted:
        return root
    with FileLock.beside(root, f"writing the shapes data {root}"):
        if _written_params(root) != wanted:  # not written by another process while this one waited
            write_shapes(root, n_train, n_val, level, seed, image_size, holdout)
    return root
