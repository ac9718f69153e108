"""Tests for mvae_course/data/shapes.py: COCO layout, captions that parse back, visible attributes."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from mvae_course.config import preset
from mvae_course.data.prepare import data_root
from mvae_course.data.shapes import (
    ATTRIBUTE_VALUES,
    COLOUR_RGB,
    FIXED_RGB,
    HOLDOUTS,
    JITTER,
    LEVELS,
    POSITION_CENTRE,
    POSITIONS,
    attributes_at_level,
    ensure_shapes,
    held_out,
    parse_caption,
    sample_objects,
    unseen_order_captions,
    write_captions,
    write_shapes,
)
from mvae_course.data.text import CaptionTokenizer

N_TRAIN, N_VAL, SIZE = 16, 4, 32


@pytest.fixture(scope="module")
def shapes_by_level(tmp_path_factory) -> dict[int, Path]:
    """One tiny shapes data set per level, at the `tiny` preset's 32 x 32."""
    root = tmp_path_factory.mktemp("shapes")
    return {
        level: write_shapes(root / f"level{level}", N_TRAIN, N_VAL, level=level, image_size=SIZE)
        for level in LEVELS
    }


def load_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        return COCO(str(path))


def images(root: Path, split: str = "train") -> list[dict]:
    return json.loads((root / "annotations" / f"captions_{split}.json").read_text())["images"]


@pytest.mark.parametrize("level", LEVELS)
def test_pycocotools_loads_both_splits_with_five_captions(shapes_by_level, level):
    root = shapes_by_level[level]
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        coco = load_coco(root / "annotations" / f"captions_{split}.json")
        assert len(coco.getImgIds()) == n
        for image_id in coco.getImgIds():
            info = coco.loadImgs(image_id)[0]
            captions = [a["caption"] for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
            assert len(captions) == 5 and len(set(captions)) >= 3  # phrased in varied ways
            assert set(info["attributes"]) == set(attributes_at_level(level))
            with Image.open(root / split / info["file_name"]) as image:
                assert image.size == (info["width"], info["height"]) == (SIZE, SIZE)
                assert image.mode == "RGB"


@pytest.mark.parametrize("level", LEVELS)
def test_every_caption_parses_back_to_the_attributes(shapes_by_level, level):
    root = shapes_by_level[level]
    splits = [json.loads((root / "annotations" / f"captions_{s}.json").read_text()) for s in ("train", "val")]
    tok = CaptionTokenizer.fit(a["caption"] for data in splits for a in data["annotations"])
    for data in splits:
        truth = {im["id"]: im["attributes"] for im in data["images"]}
        for ann in data["annotations"]:
            attributes = truth[ann["image_id"]]
            assert parse_caption(ann["caption"], level) == attributes, ann["caption"]
            unlevelled = parse_caption(ann["caption"])
            assert {a: unlevelled[a] for a in attributes} == attributes, ann["caption"]
            # A model's caption comes back through the tokenizer: lowercase, spaced-out punctuation.
            decoded = tok.decode(tok.encode(ann["caption"]))
            assert parse_caption(decoded, level) == attributes, decoded


def test_attribute_values_and_levels():
    assert attributes_at_level(1) == ("shape",)
    assert attributes_at_level(4) == ("shape", "size", "colour", "position")
    assert len(attributes_at_level(5)) == 8
    for level in LEVELS:
        assert set(attributes_at_level(level)) <= set(ATTRIBUTE_VALUES)
    assert all(len(values) >= 2 for values in ATTRIBUTE_VALUES.values())


def test_same_seed_same_bytes(tmp_path, shapes_by_level):
    again = write_shapes(tmp_path / "again", N_TRAIN, N_VAL, level=4, image_size=SIZE)
    first = shapes_by_level[4]
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (again / f).read_bytes() for f in files)
    other = write_shapes(tmp_path / "other", N_TRAIN, N_VAL, level=4, seed=1, image_size=SIZE)
    assert images(other) != images(first)


def nearest_colour(rgb: np.ndarray) -> str:
    palette = COLOUR_RGB | {"white": FIXED_RGB}
    return min(palette, key=lambda c: np.abs(np.array(palette[c]) - rgb).sum())


def test_objects_move_inside_their_quadrant_by_the_same_jitter_at_every_size(shapes_by_level):
    offsets: dict[str, list[float]] = {"small": [], "large": []}
    for info in images(shapes_by_level[4]):
        (obj,) = info["objects"]
        centre = np.array(POSITION_CENTRE[obj["position"]]) * SIZE
        offsets[obj["size"]] += (np.abs(np.array(obj["center"]) - centre) / SIZE).tolist()
        radius = obj["diameter"] / 2 / SIZE
        assert all(radius <= c <= 0.5 - radius for c in np.array(obj["center"]) / SIZE % 0.5), obj  # in its quadrant
    for size, values in offsets.items():
        assert max(values) <= JITTER + 0.01 / SIZE, size  # centres are rounded to 0.01 px
        assert max(values) > JITTER / 2, size  # and they do move, small objects as much as large ones


@pytest.mark.parametrize("level", LEVELS)
def test_colour_and_position_are_visible(shapes_by_level, level):
    root = shapes_by_level[level]
    for info in images(root):
        pixels = np.asarray(Image.open(root / "train" / info["file_name"]), dtype=float)
        for obj in info["objects"]:
            x, y = (int(v) for v in obj["center"])
            assert nearest_colour(pixels[y, x]) == obj["colour"]
            if obj["position"] in POSITIONS:  # the object's pixels lie in its quadrant
                v, h = obj["position"].split()
                rows = slice(0, SIZE // 2) if v == "top" else slice(SIZE // 2, SIZE)
                cols = slice(0, SIZE // 2) if h == "left" else slice(SIZE // 2, SIZE)
                quadrant = np.zeros((SIZE, SIZE), bool)
                quadrant[rows, cols] = True
                lit = pixels.max(-1) > 60
                assert lit[quadrant].sum() >= 10
        if level < 3:
            assert info["objects"][0]["colour"] == "white"
        if level == 5:
            assert len(info["objects"]) == 2
            assert info["objects"][0]["position"] != info["objects"][1]["position"]


def test_large_objects_cover_more_pixels(shapes_by_level):
    root = shapes_by_level[2]
    area: dict[str, list[int]] = {"small": [], "large": []}
    for info in images(root) + images(root, "val"):
        split = "train" if info["id"] < 1_000_000 else "val"
        pixels = np.asarray(Image.open(root / split / info["file_name"]))
        area[info["attributes"]["size"]].append(int((pixels.max(-1) > 100).sum()))
    assert area["small"] and area["large"]
    assert np.mean(area["large"]) > 2 * np.mean(area["small"])


def test_parse_caption_reads_model_like_text():
    assert parse_caption("top - left : one red circles , large") == {
        "shape": "circle", "size": "large", "colour": "red", "position": "top left"
    }
    assert parse_caption("A BIG Violet plus sign in the LOWER-right corner.", 4) == {
        "shape": "cross", "size": "large", "colour": "purple", "position": "bottom right"
    }
    # Two objects come back in position order, whatever order the caption names them in.
    parsed = parse_caption("a small blue star at the bottom right and a big red box in the upper left")
    assert (parsed["shape"], parsed["position"], parsed["shape2"], parsed["position2"]) == (
        "square", "top left", "star", "bottom right"
    )
    assert parse_caption("a red circle", 5)["shape2"] is None
    assert parse_caption("a red and blue circle", 3) == {"shape": "circle", "size": None, "colour": None}
    assert parse_caption("a big small square", 2) == {"shape": "square", "size": None}
    assert parse_caption("a picture of nothing much") is None
    assert parse_caption("", 4) is None


def test_bad_parameters_fail_clearly(tmp_path):
    for bad in (0, 6):
        with pytest.raises(ValueError, match="level must be one of"):
            write_shapes(tmp_path, 4, 1, level=bad)
        with pytest.raises(ValueError, match="level must be one of"):
            attributes_at_level(bad)
        with pytest.raises(ValueError, match="level must be one of"):
            parse_caption("a circle", bad)
    with pytest.raises(ValueError, match="image_size"):
        write_shapes(tmp_path, 4, 1, image_size=8)
    with pytest.raises(ValueError, match="n_train"):
        write_shapes(tmp_path, 0, 1)


def test_ensure_shapes_reuses_and_regenerates(tmp_path):
    root = tmp_path / "shapes"
    ensure_shapes(root, 6, 2, level=3, image_size=SIZE)
    annotations = root / "annotations" / "captions_train.json"
    stamp = annotations.stat().st_mtime_ns
    ensure_shapes(root, 6, 2, level=3, image_size=SIZE)
    assert annotations.stat().st_mtime_ns == stamp  # reused
    ensure_shapes(root, 4, 2, level=4, image_size=SIZE)
    assert len(images(root)) == 4 and len(list((root / "train").glob("*.png"))) == 4  # stale files gone
    assert json.loads(annotations.read_text())["info"]["shapes"]["level"] == 4
    (root / "train" / images(root)[0]["file_name"]).unlink()  # a missing image: generate again
    ensure_shapes(root, 4, 2, level=4, image_size=SIZE)
    assert all((root / "train" / im["file_name"]).is_file() for im in images(root))


def random_scene(rng: np.random.Generator, level: int) -> tuple[list[dict], dict]:
    """A scene's objects and the attributes its captions must parse back to."""
    objects = sample_objects(rng, level)
    truth = {a: objects[0][a] for a in attributes_at_level(min(level, 4))}
    if level == 5:
        truth |= {f"{a}2": objects[1][a] for a in attributes_at_level(4)}
    return objects, truth


@pytest.mark.parametrize("level", LEVELS)
def test_captions_of_many_scenes_parse_back(level):
    """Every template and synonym, without drawing: 300 scenes per level."""
    rng = np.random.default_rng(level)
    for _ in range(300):
        objects, truth = random_scene(rng, level)
        for caption in write_captions(objects, level, rng):
            assert parse_caption(caption, level) == truth, caption


# --- harder tests of generalisation: a compositional split, unseen word orders ---------------------------


@pytest.mark.parametrize("level", (3, 4, 5))
def test_a_holdout_keeps_its_pairs_out_of_training_and_shows_them_in_every_other_val_image(tmp_path, level):
    root = write_shapes(tmp_path / "held", 60, 20, level=level, image_size=SIZE, holdout="shape-colour")
    pairs = set(HOLDOUTS["shape-colour"])
    for info in images(root):
        assert not held_out(info["attributes"], "shape-colour")
        assert all((o["shape"], o["colour"]) not in pairs for o in info["objects"]), info
    val = images(root, "val")
    assert [held_out(info["attributes"], "shape-colour") for info in val] == [i % 2 == 1 for i in range(len(val))]
    # Each held-out shape and colour is still seen in training, with other partners.
    seen = {(o["shape"], o["colour"]) for info in images(root) for o in info["objects"]}
    assert {s for s, _ in pairs} <= {s for s, _ in seen} and {c for _, c in pairs} <= {c for _, c in seen}
    params = json.loads((root / "annotations" / "captions_train.json").read_text())["info"]["shapes"]
    assert params["holdout"] == "shape-colour"


def test_a_holdout_has_its_own_folder_and_parameters(tmp_path):
    plain = ensure_shapes(tmp_path / "plain", 8, 4, level=4, image_size=SIZE)
    stamp = (plain / "annotations" / "captions_train.json").stat().st_mtime_ns
    assert json.loads((plain / "annotations" / "captions_train.json").read_text())["info"]["shapes"]["holdout"] is None
    ensure_shapes(plain, 8, 4, level=4, image_size=SIZE, holdout="shape-colour")  # other params: regenerated
    assert (plain / "annotations" / "captions_train.json").stat().st_mtime_ns != stamp
    cfg = preset("tiny")
    held = cfg.replace(data={"holdout": "shape-colour"})
    assert data_root(cfg, tmp_path) != data_root(held, tmp_path)
    assert "holdout-shape-colour" in data_root(held, tmp_path).name


def test_bad_holdouts_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="holdout must be None or one of"):
        write_shapes(tmp_path, 4, 1, level=4, holdout="shape-size")
    with pytest.raises(ValueError, match="needs level 3 or more"):
        write_shapes(tmp_path, 4, 1, level=2, holdout="shape-colour")


def attribute_order(stretch: str) -> tuple[str, ...]:
    """The kinds of attribute in one object's stretch of caption, in the order they are first named."""
    order = []
    words = re.sub(r"[^a-z]+", " ", stretch.lower()).split()
    for i, word in enumerate(words):
        found = parse_caption(" ".join(words[i:i + 2]) if word == "plus" else word)
        kinds = [a for a, v in (found or {}).items() if v is not None]
        if word in ("top", "upper", "bottom", "lower"):
            kinds = ["position"]
        for kind in kinds:
            if kind not in order:
                order.append(kind)
    return tuple(order)


def object_stretches(caption: str, level: int) -> list[str]:
    return re.split(r";|\band\b", caption.lower()) if level == 5 else [caption]


@pytest.mark.parametrize("level", (3, 4, 5))
def test_unseen_order_captions_parse_back_in_orders_the_generator_never_writes(level):
    rng = np.random.default_rng(level)
    generated, unseen = set(), set()
    vocabulary, used = set(), set()
    for _ in range(300):
        objects, truth = random_scene(rng, level)
        for caption in write_captions(objects, level, rng):
            generated |= {attribute_order(s) for s in object_stretches(caption, level)}
            vocabulary |= set(re.findall(r"[a-z]+|[^a-z\s]", caption.lower()))
        for caption in unseen_order_captions(truth, level, rng, n=3):
            assert parse_caption(caption, level) == truth, caption
            unseen |= {attribute_order(s) for s in object_stretches(caption, level)}
            used |= set(re.findall(r"[a-z]+|[^a-z\s]", caption.lower()))
    assert unseen and not unseen & generated, unseen & generated
    # Only words (and punctuation) the generator uses at this level: a test of order, not of vocabulary.
    assert used <= vocabulary, used - vocabulary
    assert len(unseen) >= 4


def test_unseen_order_captions_need_three_attributes():
    with pytest.raises(ValueError, match="level 3 or more"):
        unseen_order_captions({"shape": "circle", "size": "large"}, 2, np.random.default_rng(0))


def test_level_5_parser_reads_both_objects_in_either_order():
    truth = {"shape": "square", "size": "large", "colour": "red", "position": "top left",
             "shape2": "star", "size2": "small", "colour2": "blue", "position2": "bottom right"}
    for caption in ("a small blue star at the bottom right and a big red box in the upper left",
                    "top-left: a large red square; a tiny blue star in the lower right corner",
                    "a big red square at the top left and a small blue star in the bottom right"):
        assert parse_caption(caption, 5) == truth, caption
