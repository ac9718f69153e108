"""The COCO reader: layout, captions, every PIL mode to RGB, geometry, clear errors, torchvision parity."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from mvae_course.data.coco import (
    CocoCaptionDataset,
    CocoDataError,
    collate_captions,
    describe_bad_entries,
    load_coco,
    image_to_tensor,
    load_image,
    read_annotations,
    read_captions,
    resize_center_crop,
)
from mvae_course.data.text import EOS, PAD, CaptionTokenizer
from conftest import jpeg_bytes, need_coco_mini, png_bomb, three_images, write_coco


@pytest.fixture(scope="module")
def tokenizer() -> CaptionTokenizer:
    return CaptionTokenizer.fit(["a red square", "a blue circle on the left", "two green triangles"])


def test_every_pil_mode_comes_out_rgb(tmp_path):
    rgba = Image.new("RGBA", (24, 24), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 24, 12))  # top half fully transparent (black underneath)
    palette = Image.new("P", (24, 24))
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.paste(1, (0, 0, 24, 24))
    deep = Image.fromarray(np.full((24, 24), 128 * 257, dtype=np.uint16))  # 16-bit mid grey
    assert deep.mode == "I;16" and deep.convert("RGB").getpixel((0, 0)) == (255, 255, 255)  # PIL clips it
    images = {
        "rgb.png": Image.new("RGB", (24, 24), (0, 0, 255)),
        "grey.png": Image.new("L", (24, 24), 77),
        "bw.png": Image.new("1", (24, 24), 1),
        "cmyk.jpg": jpeg_bytes(Image.new("CMYK", (24, 24), (0, 255, 255, 0)), quality=95),
        "rgba.png": rgba,
        "la.png": Image.new("LA", (24, 24), (0, 0)),
        "palette.png": palette,
        "deep.png": deep,
    }
    root = write_coco(tmp_path, images, {name: [f"caption {name}"] for name in images})
    ds = CocoCaptionDataset(root, "train", image_size=8)
    px = {}
    for i in range(len(ds)):
        item = ds[i]
        img = item["image"]
        assert img.shape == (3, 8, 8) and img.dtype == torch.float32
        assert 0.0 <= img.min() and img.max() <= 1.0
        px[item["caption"].split()[1]] = (img[:, 6, 4] * 255).round().tolist()  # a pixel in the bottom half
        if item["caption"].endswith("rgba.png"):
            assert torch.allclose(img[:, 1, 4], torch.ones(3)), "transparent pixels go over white"
    assert px["grey.png"] == [77, 77, 77]
    assert px["bw.png"] == [255, 255, 255]
    assert px["rgba.png"] == [255, 0, 0]
    assert px["la.png"] == [255, 255, 255]  # fully transparent
    assert px["palette.png"] == [10, 200, 30]
    assert px["deep.png"] == [128, 128, 128]
    r, g, b = px["cmyk.jpg"]
    assert r > 245 and g < 10 and b < 10  # C=K=0, M=Y=full is red
    assert px["rgb.png"] == [0, 0, 255]


def test_geometry_is_resize_shorter_side_then_center_crop(tmp_path):
    wide = np.zeros((20, 60, 3), dtype=np.uint8)
    wide[:, :20, 0] = 255  # red left third
    wide[:, 20:40, 1] = 255  # green middle third
    wide[:, 40:, 2] = 255  # blue right third
    img = Image.fromarray(wide)
    root = write_coco(tmp_path, {"wide.png": img}, {"wide.png": ["a wide image"]})
    out = CocoCaptionDataset(root, "train", image_size=10)[0]["image"]
    reference = transforms.Compose([transforms.Resize(10), transforms.CenterCrop(10), transforms.ToTensor()])
    expected = reference(img)
    assert torch.allclose(out, expected, atol=1 / 255 + 1e-6)
    inner = out[:, :, 1:-1]  # the outermost columns blend with the cropped-off thirds
    # Only the green middle third is left.
    assert inner[1].min() > 0.99 and inner[0].max() < 0.01 and inner[2].max() < 0.01


@pytest.mark.parametrize("width, height", [(640, 480), (480, 640), (333, 500), (65, 63), (1000, 37),
                                           (37, 1000)])
def test_resize_and_crop_are_torchvisions_pixel_for_pixel(width, height):
    # The course does them with PIL itself (torchvision takes seconds to import); the cache must not change.
    img = Image.fromarray(np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8))
    for size in (32, 37, 64):
        ours = resize_center_crop(img, size)
        theirs = transforms.CenterCrop(size)(transforms.Resize(size)(img))
        assert ours.size == theirs.size == (size, size)
        assert np.array_equal(np.asarray(ours), np.asarray(theirs)), (width, height, size)
        assert torch.equal(image_to_tensor(ours), transforms.ToTensor()(theirs))


def test_jpeg_is_decoded_at_reduced_size_close_to_full_decode(tmp_path):
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (8, 6, 3))
    smooth = np.kron(blocks, np.ones((40, 40, 1))).astype(np.uint8)  # 320 x 240, flat 40 x 40 blocks
    path = tmp_path / "big.jpg"
    Image.fromarray(smooth).save(path, quality=95)
    with Image.open(path) as full:
        full.load()
        reference = np.asarray(transforms.CenterCrop(16)(transforms.Resize(16)(full)), dtype=np.float64)
    fast = np.asarray(load_image(path, 16), dtype=np.float64)
    assert fast.shape == (16, 16, 3)
    assert np.abs(fast - reference).mean() < 6


def test_captions_ids_and_caption_modes(tmp_path, tokenizer):
    images = {f"{n}.png": Image.new("RGB", (12, 10), (n * 40, 0, 0)) for n in range(4)}
    caps = {"0.png": ["a red square"],
            "1.png": ["a blue circle", "two green triangles", "a red square on the left"],
            "2.png": ["two green triangles", "a blue circle"], "3.png": ["a red square", "a blue circle"]}
    root = write_coco(tmp_path, images, caps)
    ds = CocoCaptionDataset(root, "train", image_size=8, seed=3)
    assert ds.image_ids == [1, 2, 3, 4] and len(ds) == 4
    assert ds.captions(2) == caps["1.png"]  # annotation order, though annotations were interleaved
    assert read_captions(root, "train") == [a["caption"] for a in json.loads(
        (root / "annotations" / "captions_train.json").read_text())["annotations"]]

    seen = set()
    for epoch in range(30):
        ds.set_epoch(epoch)
        first = [ds[i]["caption"] for i in range(4)]
        assert first == [ds[i]["caption"] for i in range(4)], "same epoch, same captions"
        assert all(c in caps[f"{n}.png"] for n, c in enumerate(first))
        seen.add(ds[1]["caption"])
    assert seen == set(caps["1.png"]), "over epochs, every caption of an image is drawn"

    every = CocoCaptionDataset(root, "train", image_size=8, caption_mode="all", tokenizer=tokenizer)
    assert len(every) == sum(len(c) for c in caps.values())
    pairs = sorted((every[i]["image_id"], tokenizer.decode(every[i]["text"])) for i in range(len(every)))
    expected = [(n + 1, tokenizer.decode(tokenizer.encode(c))) for n in range(4) for c in caps[f"{n}.png"]]
    assert pairs == sorted(expected)

    batch = collate_captions([every[i] for i in range(len(every))])
    lengths = torch.tensor([len(every[i]["text"]) + 1 for i in range(len(every))])
    assert batch["image"].shape == (len(every), 3, 8, 8)
    assert torch.equal(batch["lengths"], lengths)
    assert batch["text"].shape == (len(every), int(lengths.max())) and batch["text"].dtype == torch.int64
    assert torch.equal(batch["text"][torch.arange(len(every)), lengths - 1], torch.full((len(every),), EOS))
    assert batch["text"][0, lengths[0]:].eq(PAD).all()
    assert batch["image_id"].tolist() == [every[i]["image_id"] for i in range(len(every))]


def test_missing_annotation_file_names_expected_path(tmp_path):
    with pytest.raises(CocoDataError, match=r"captions_val\.json.*annotations/captions_<split>\.json"):
        CocoCaptionDataset(tmp_path, "val")


def test_malformed_json_names_file_line_and_column(tmp_path):
    (tmp_path / "annotations").mkdir()
    bad = tmp_path / "annotations" / "captions_train.json"
    bad.write_text('{"images": [],\n  "annotations": [\n    {"image_id": 1, "caption": "x",}\n]}')
    with pytest.raises(CocoDataError, match=r"captions_train\.json: malformed JSON at line 3, column 36"):
        CocoCaptionDataset(tmp_path, "train")


def test_annotation_for_unknown_image_is_an_error(tmp_path):
    root = write_coco(tmp_path, {"a.png": Image.new("RGB", (8, 8))}, {"a.png": ["one"]})
    ann = root / "annotations" / "captions_train.json"
    data = json.loads(ann.read_text())
    data["annotations"].append({"id": 9, "image_id": 42, "caption": "orphan"})
    ann.write_text(json.dumps(data))
    with pytest.raises(CocoDataError, match="image id 42"):
        CocoCaptionDataset(root, "train")


def test_missing_image_raises_or_is_skipped(tmp_path):
    images = {f"{n}.png": Image.new("RGB", (8, 8), (n, n, n)) for n in range(3)}
    root = write_coco(tmp_path, images, {name: ["a caption"] for name in images})
    (root / "train" / "1.png").unlink()
    with pytest.raises(CocoDataError, match=r"1\.png: image listed in .*captions_train\.json is missing"):
        CocoCaptionDataset(root, "train")
    with pytest.warns(UserWarning, match="skipped 1 missing"):
        ds = CocoCaptionDataset(root, "train", on_bad_image="skip")
    assert ds.image_ids == [1, 3] and len(ds) == 2
    assert list(ds.skipped) == [str(root / "train" / "1.png")]


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_jpeg_raises_or_falls_back(tmp_path, damage):
    good = jpeg_bytes(Image.new("RGB", (64, 48), (200, 10, 10)))
    bad = good[: len(good) // 2] if damage == "truncated" else b"not a jpeg at all" * 10
    images = {"0.jpg": good, "1.jpg": bad, "2.jpg": jpeg_bytes(Image.new("RGB", (64, 48), (10, 10, 200)))}
    root = write_coco(tmp_path, images, {name: [f"caption {name}"] for name in images})
    ds = CocoCaptionDataset(root, "train", image_size=8)
    ds[0]
    with pytest.raises(CocoDataError, match=r"1\.jpg: cannot decode image"):
        ds[1]
    skipping = CocoCaptionDataset(root, "train", image_size=8, on_bad_image="skip")
    with pytest.warns(UserWarning, match=r"1\.jpg"):
        item = skipping[1]
    assert item["image_id"] == 3 and item["caption"] == "caption 2.jpg"  # the next good item
    assert list(skipping.skipped) == [str(root / "train" / "1.jpg")]
    reason = skipping.skipped[str(root / "train" / "1.jpg")].lower()
    assert ("truncated" if damage == "truncated" else "cannot identify") in reason


def test_same_captions_as_torchvision_coco_captions():
    from torchvision.datasets import CocoCaptions

    root = need_coco_mini()
    for split in ("train2017", "val2017"):
        ours = CocoCaptionDataset(root, split)
        theirs = CocoCaptions(str(root / split), str(root / "annotations" / f"captions_{split}.json"))
        assert ours.image_ids == theirs.ids
        for image_id in ours.image_ids:
            assert ours.captions(image_id) == theirs._load_target(image_id)
    item = ours[0]
    assert item["image"].shape == (3, 64, 64) and item["caption"] in ours.captions(item["image_id"])


# --- bad entries in the annotation file ------------------------------------------------------------


def edit_annotations(root: Path, edit) -> None:
    path = root / "annotations" / "captions_train.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def caption_of(image_id: int):
    """The first annotation of an image, to damage in place."""
    return lambda data: next(a for a in data["annotations"] if a["image_id"] == image_id)


def _set(get, key, value):
    return lambda data: get(data).__setitem__(key, value)


def _drop(get, key):
    return lambda data: get(data).pop(key)


# (case, edit of the annotation data, the problem as the message names it, its entries, images kept by "skip")
BAD_ENTRIES = [
    ("duplicate image id", lambda d: d["images"].append({"id": 1, "file_name": "2.png"}),
     "duplicate image ids", ["image id 1 used 2 times"], [2, 3]),
    ("dangling caption", lambda d: d["annotations"].append({"id": 500, "image_id": 42, "caption": "orphan"}),
     "captions of an image id not in 'images'", ["annotation id 500 refers to image id 42"], [1, 2, 3]),
    ("empty caption", _set(caption_of(2), "caption", "  \n"), "empty captions", [r"annotation id \d+"], [1, 2, 3]),
    ("caption None", _set(caption_of(2), "caption", None),
     "non-string captions", [r"annotation id \d+ has caption None"], [1, 2, 3]),
    ("caption a number", _set(caption_of(3), "caption", 5),
     "non-string captions", [r"annotation id \d+ has caption 5"], [1, 2, 3]),
    ("image without captions", lambda d: d["images"].append({"id": 4, "file_name": "0.png"}),
     "images without captions", ["image id 4"], [1, 2, 3]),
    ("string image id", lambda d: d["images"][1].__setitem__("id", "2"),
     "non-integer image ids", [r"images\[1\] has id '2'"], [1, 3]),
    ("image without file_name", lambda d: d["images"][2].pop("file_name"),
     "image entries without an id and a file_name", [r"images\[2\]"], [1, 2]),
    ("annotation without id", _drop(caption_of(1), "id"),
     "annotation entries without an integer id, an image_id and a caption", [r"annotations\[\d+\]"], [1, 2, 3]),
]


@pytest.mark.parametrize("case, edit, problem, entries, kept", BAD_ENTRIES, ids=[c[0] for c in BAD_ENTRIES])
def test_a_bad_entry_raises_naming_the_file_and_entry_or_is_skipped_with_a_count(
    tmp_path, case, edit, problem, entries, kept
):
    root = three_images(tmp_path)
    edit_annotations(root, edit)
    ann = root / "annotations" / "captions_train.json"
    with pytest.raises(CocoDataError) as info:
        CocoCaptionDataset(root, "train")
    message = str(info.value)
    assert message.startswith(f"{ann}: bad entries: ") and "\n" not in message
    assert re.search(re.escape(problem) + rf": 1 \({entries[0]}\)", message), message
    assert "on_bad_entry='skip'" in message
    with pytest.raises(CocoDataError, match=re.escape(problem)):
        read_captions(root, "train")  # what a tokenizer is fitted on: the same check

    with pytest.warns(UserWarning, match=rf"{re.escape(str(ann))}: skipped bad entries: .*{re.escape(problem)}: 1"):
        ds = CocoCaptionDataset(root, "train", on_bad_entry="skip")
    assert ds.image_ids == kept
    assert len(ds.bad_entries[problem]) == 1
    assert all(isinstance(c, str) and c.strip() for i in ds.image_ids for c in ds.captions(i))
    for item in map(ds.__getitem__, range(len(ds))):  # each caption still names its own image's file
        assert item["caption"].endswith(ds.coco.imgs[item["image_id"]]["file_name"])


def test_a_string_id_is_named_as_such_not_as_a_missing_image(tmp_path):
    root = three_images(tmp_path)
    edit_annotations(root, lambda d: [img.__setitem__("id", str(img["id"])) for img in d["images"]])
    with pytest.raises(CocoDataError, match=r"non-integer image ids: 3 \(images\[0\] has id '1', images\[1\]"):
        load_coco(root, "train")


def test_no_usable_caption_is_refused_even_when_skipping(tmp_path):
    root = three_images(tmp_path)
    edit_annotations(root, lambda d: [a.__setitem__("caption", "") for a in d["annotations"]])
    for on_bad_entry in ("raise", "skip"):
        with pytest.raises(CocoDataError, match=r"no usable caption among its 6 annotations \(empty captions: 6 "
                                                r"\(.*, and 3 more\).*a vocabulary needs words"):
            read_captions(root, "train", on_bad_entry=on_bad_entry)
    edit_annotations(root, lambda d: d.__setitem__("annotations", []))
    with pytest.raises(CocoDataError, match=r"no usable caption among its 0 annotations \(images without captions: 3"):
        CocoCaptionDataset(root, "train", on_bad_entry="skip")


def test_a_good_file_has_no_bad_entries_and_all_problems_share_one_line(tmp_path):
    root = three_images(tmp_path)
    assert read_annotations(root, "train")[1] == {}
    bad = {"empty captions": [f"annotation id {i}" for i in range(5)], "images without captions": ["image id 9"]}
    assert describe_bad_entries(bad) == (
        "empty captions: 5 (annotation id 0, annotation id 1, annotation id 2, and 2 more); "
        "images without captions: 1 (image id 9)"
    )
    with pytest.raises(ValueError, match="on_bad_entry must be one of"):
        read_annotations(root, "train", on_bad_entry="ignore")


@pytest.mark.parametrize("side", [20000, 10000], ids=["bomb", "bomb-warning-size"])
def test_a_decompression_bomb_is_a_named_bad_image(tmp_path, side):
    # 20000^2 pixels is over PIL's error limit; 10000^2 only over its warning limit, refused all the same.
    images = {"0.png": Image.new("RGB", (8, 8), (200, 0, 0)), "1.png": png_bomb(side, side),
              "2.png": Image.new("RGB", (8, 8), (0, 0, 200))}
    root = write_coco(tmp_path, images, {name: [f"caption {name}"] for name in images})
    with pytest.raises(CocoDataError, match=r"1\.png: refused as a possible decompression bomb: Image size "
                                            rf"\({side * side} pixels\) exceeds limit"):
        CocoCaptionDataset(root, "train", image_size=8)[1]
    skipping = CocoCaptionDataset(root, "train", image_size=8, on_bad_image="skip")
    with pytest.warns(UserWarning, match=r"1\.png: refused as a possible decompression bomb"):
        assert skipping[1]["image_id"] == 3
    assert list(skipping.skipped) == [str(root / "train" / "1.png")]


def test_image_size_must_be_positive(tmp_path):
    root = three_images(tmp_path)
    for size in (0, -8, 8.0):
        with pytest.raises(ValueError, match=rf"image_size must be a positive integer \(pixels\), got {size}"):
            CocoCaptionDataset(root, "train", image_size=size)
