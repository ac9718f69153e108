"""Shared test setup, and the helpers several test files use.

Lessons read `MVAE_SMOKE` for the default of their `smoke` parameter; setting it here (before any kernel
starts) makes both the papermill runs of tests/test_notebooks.py and nbval's runs of notebooks/ quick.
Set MVAE_SMOKE=0 to test the notebooks with their full defaults instead. MVAE_TEXT_PROGRESS=1 gives nbval's
kernels the text progress bars of the course runner's (mvae_course/progress.py), not ipywidgets.
"""

import io
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from mvae_course.notebook import coco_mini_path

os.environ.setdefault("MVAE_SMOKE", "1")
os.environ.setdefault("MVAE_TEXT_PROGRESS", "1")


# `make test` runs on a worker per core (pytest-xdist). Each test file is one unit of work, so a module's
# fixtures are built once and a notebook's cells run in one kernel; tests that share a resource beyond a
# temporary folder run in one unit, one after another: the lessons (nbval's runs of notebooks/, and
# test_notebooks.py), as lessons share build/smoke/, and every test that grades, as graders pick free uids for
# their kernels. (xdist's own `xdist_group` marks do not reach its scheduler under pytest 9: hence this one.)
SHARED_GROUPS = {"lessons": ("test_notebooks.py", ".ipynb"),
                 "grading": ("test_grading.py", "test_grading_attacks.py", "test_questions.py")}


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class SharedResourceScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            name = file.rsplit("/", 1)[-1]
            return next((group for group, files in SHARED_GROUPS.items() if name.endswith(files)), file)

    return SharedResourceScheduling(config, log)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one torch thread (several thrash when other jobs share the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def need_coco_mini() -> Path:
    root = coco_mini_path()
    if not (root / "annotations" / "captions_val2017.json").is_file():
        pytest.skip(f"coco-mini not found at {root} (set MVAE_COCO_MINI to its folder)")
    return root


def write_coco(
    root: Path,
    images: dict[str, Image.Image | bytes],
    captions: dict[str, list[str]],
    split: str = "train",
    attributes: dict[str, dict] | None = None,
) -> Path:
    """A COCO-layout folder: images saved by file name (PIL images, or raw bytes as given), ids 1..n in the
    order of `images`, annotations interleaved across images so annotation order != image order."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    entries, anns = [], []
    for image_id, (name, img) in enumerate(images.items(), start=1):
        if isinstance(img, bytes):
            (root / split / name).write_bytes(img)
        else:
            img.save(root / split / name)
        entry = {"id": image_id, "file_name": name}
        if attributes:
            entry["attributes"] = attributes[name]
        entries.append(entry)
    ids = {name: i for i, name in enumerate(images, start=1)}
    longest = max(len(c) for c in captions.values())
    for k in range(longest):
        for name in reversed(list(images)):
            if k < len(captions[name]):
                anns.append({"id": len(anns) + 100, "image_id": ids[name], "caption": captions[name][k]})
    data = {"info": {}, "licenses": [], "images": entries, "annotations": anns}
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(data, indent=1))
    return root


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A PNG of a few bytes whose header claims width x height pixels: what a decompression bomb looks like
    to PIL, which checks the size in the header before decoding anything."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def three_images(root: Path) -> Path:
    """Images 1, 2, 3 (0.png, 1.png, 2.png) with two captions each; annotation ids from 100."""
    images = {f"{n}.png": Image.new("RGB", (8, 8), (n * 60, 0, 0)) for n in range(3)}
    return write_coco(root, images, {name: [f"a red square {name}", f"a blue circle {name}"] for name in images})
