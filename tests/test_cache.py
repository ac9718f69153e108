"""The preprocessing cache: round trip, atomic writes, staleness, and the batches CacheLoader serves."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import jpeg_bytes, need_coco_mini, write_coco

from mvae_course.data import cache as cache_module
from mvae_course.data.cache import (
    CacheError,
    CacheLoader,
    StaleCacheError,
    cache_key,
    ensure_cache,
    image_captions,
    load_cache,
    prepare_cache,
)
from mvae_course.data.coco import CocoCaptionDataset, CocoDataError, read_captions
from mvae_course.data.text import EOS, PAD, CaptionTokenizer, pad_captions

WORDS = ["red", "blue", "green", "square", "circle", "triangle", "left", "right", "small", "big"]
N_IMAGES = 10


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    """Ten images (JPEG and PNG, several sizes and modes) with 1 to 3 captions each, and attributes."""
    rng = np.random.default_rng(0)
    images, captions, attributes = {}, {}, {}
    for n in range(N_IMAGES):
        h, w = rng.integers(20, 60, size=2)
        pixels = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        name = f"{n:03d}.jpg" if n % 2 else f"{n:03d}.png"
        images[name] = jpeg_bytes(pixels) if n % 2 else (pixels.convert("L") if n == 4 else pixels)
        captions[name] = [" ".join(rng.choice(WORDS, size=rng.integers(1, 7))) for _ in range(1 + n % 3)]
        attributes[name] = {"shape": WORDS[n % 3 + 3], "index": n}
    return write_coco(tmp_path_factory.mktemp("coco"), images, captions, attributes=attributes)


@pytest.fixture(scope="module")
def tokenizer(coco) -> CaptionTokenizer:
    return CaptionTokenizer.fit(read_captions(coco, "train"))


@pytest.fixture(scope="module")
def cache(coco, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "train"
    return load_cache(prepare_cache(coco, "train", out, 16, tokenizer, workers=2))


def test_round_trip_matches_the_reader(coco, tokenizer, cache, tmp_path):
    ds = CocoCaptionDataset(coco, "train", image_size=16)
    assert cache.images.shape == (N_IMAGES, 3, 16, 16) and cache.images.dtype == torch.uint8
    assert cache.image_ids.tolist() == ds.image_ids
    for n, image_id in enumerate(ds.image_ids):
        assert torch.equal(cache.images[n], (ds[n]["image"] * 255).round().to(torch.uint8))
        caps = ds.captions(image_id)
        rows = (cache.caption_image == n).nonzero().flatten()
        assert [cache.captions[m] for m in rows] == caps
        tokens = [cache.tokens[cache.offsets[m] : cache.offsets[m + 1]].tolist() for m in rows]
        assert tokens == [tokenizer.encode(c) for c in caps]
        assert [tokenizer.decode(t) for t in tokens] == [tokenizer.decode(tokenizer.encode(c)) for c in caps]
    assert image_captions(cache, [0, 2]) == [ds.captions(ds.image_ids[0]), ds.captions(ds.image_ids[2])]
    assert cache.attributes[3] == {"shape": WORDS[3 % 3 + 3], "index": 3}
    assert cache.meta["n_images"] == N_IMAGES and cache.meta["vocab_size"] == tokenizer.vocab_size
    # One process or two: the same bytes.
    serial = load_cache(prepare_cache(coco, "train", tmp_path / "serial", 16, tokenizer, workers=1))
    for name in cache_module.ARRAYS:
        assert torch.equal(getattr(serial, name), getattr(cache, name)), name


def _crash_while_writing_meta(coco, out, image_size, tokenizer):
    """Child process: die abruptly (no cleanup, as if killed) just before meta.json is written."""

    def die(path, data):
        if Path(path).name == "meta.json":
            os._exit(3)

    cache_module._write_json = die
    prepare_cache(coco, "train", out, image_size, tokenizer, workers=1)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_killed_run_leaves_no_loadable_cache(coco, tokenizer, tmp_path):
    out = tmp_path / "train"
    ctx = multiprocessing.get_context("fork")

    def crash(image_size):
        p = ctx.Process(target=_crash_while_writing_meta, args=(coco, out, image_size, tokenizer))
        p.start()
        p.join()
        assert p.exitcode == 3

    crash(16)
    assert list(tmp_path.glob(".train.tmp-*")), "the half-written folder is left, under its temporary name"
    with pytest.raises(CacheError, match="no cache"):
        load_cache(out)
    prepare_cache(coco, "train", out, 16, tokenizer, workers=1)
    assert not list(tmp_path.glob(".train.tmp-*")), "leftovers of the killed run are removed"
    # A rebuild that dies keeps the previous complete cache in place.
    crash(8)
    assert load_cache(out).images.shape[-1] == 16


def test_stale_caches_are_detected_and_rebuilt(coco, tokenizer, tmp_path):
    root = tmp_path / "coco"  # the shared images, a private copy of the annotations to edit
    (root / "annotations").mkdir(parents=True)
    os.symlink(coco / "train", root / "train")
    ann = root / "annotations" / "captions_train.json"
    ann.write_bytes((coco / "annotations" / "captions_train.json").read_bytes())
    out = tmp_path / "cache"

    first = ensure_cache(root, "train", out, 16, tokenizer, workers=1)
    assert load_cache(out, cache_key(root, "train", 16, tokenizer)).meta == first.meta
    images_file = (out / "images.npy").stat()

    os.utime(ann, ns=(images_file.st_mtime_ns + 10**9,) * 2)  # touched, same content: reused
    ensure_cache(root, "train", out, 16, tokenizer, workers=1)
    assert (out / "images.npy").stat().st_ino == images_file.st_ino

    data = json.loads(ann.read_text())
    data["annotations"][0]["caption"] = "a big green triangle"
    ann.write_text(json.dumps(data))
    with pytest.raises(StaleCacheError, match="source_sha256"):
        load_cache(out, cache_key(root, "train", 16, tokenizer))
    with pytest.warns(UserWarning, match="rebuilding"):
        edited = ensure_cache(root, "train", out, 16, tokenizer, workers=1)
    assert "a big green triangle" in edited.captions

    with pytest.raises(StaleCacheError, match="image_size: cache has 16, expected 8"):
        load_cache(out, cache_key(root, "train", 8, tokenizer))
    with pytest.warns(UserWarning, match="rebuilding"):
        assert ensure_cache(root, "train", out, 8, tokenizer, workers=1).images.shape[-1] == 8

    other = CaptionTokenizer.fit(["a completely different vocabulary"])
    with pytest.raises(StaleCacheError, match="tokenizer"):
        load_cache(out, cache_key(root, "train", 8, other))


def test_bad_images_raise_or_are_dropped_with_their_captions(tmp_path):
    good = Image.new("RGB", (30, 20), (0, 200, 0))
    images = {"a.jpg": jpeg_bytes(good), "b.jpg": jpeg_bytes(good)[:200], "c.png": good, "d.png": good}
    root = write_coco(tmp_path / "coco", images, {n: [f"caption of {n}"] for n in images})
    (root / "train" / "d.png").unlink()
    with pytest.raises(CocoDataError, match=r"d\.png"):
        prepare_cache(root, "train", tmp_path / "c", 8)
    with pytest.warns(UserWarning):
        out = prepare_cache(root, "train", tmp_path / "c", 8, on_bad_image="skip", workers=1)
    c = load_cache(out)
    assert c.image_ids.tolist() == [1, 3] and c.captions == ["caption of a.jpg", "caption of c.png"]
    assert sorted(Path(p).name for p in c.meta["skipped"]) == ["b.jpg", "d.png"]
    assert c.images.float().mean(dim=(0, 2, 3))[1] > 150  # the kept rows are the green images, compacted
    assert not c.has_text and c.attributes is None
    batch = next(iter(CacheLoader(c, batch_size=2)))
    assert set(batch) == {"image", "image_id"}  # no tokenizer: image-only batches


def test_batches_shapes_padding_and_lengths(cache, tokenizer):
    loader = CacheLoader(cache, batch_size=4, captions="all", shuffle=False)
    n_captions = cache.caption_image.shape[0]
    assert len(loader) == -(-n_captions // 4)
    batches = list(loader)
    assert len(batches) == len(loader)
    for b, batch in enumerate(batches):
        caps = range(b * 4, min((b + 1) * 4, n_captions))
        ids = [cache.tokens[cache.offsets[m] : cache.offsets[m + 1]].tolist() for m in caps]
        text, lengths = pad_captions(ids, PAD, EOS)
        assert torch.equal(batch["text"], text) and batch["text"].dtype == torch.int64
        assert torch.equal(batch["lengths"], lengths)
        assert batch["image"].dtype == torch.float32 and batch["image"].shape == (len(ids), 3, 16, 16)
        rows = cache.caption_image[list(caps)]
        assert torch.equal(batch["image"], cache.images[rows].float() / 255)
        assert torch.equal(batch["image_id"], cache.image_ids[rows])


def test_each_image_once_per_epoch_with_one_of_its_captions(cache):
    loader = CacheLoader(cache, batch_size=3, seed=1)
    own = {int(cache.image_ids[n]): {tuple(t) for t in _tokens_of_image(cache, n)} for n in range(len(cache))}
    drawn = {i: set() for i in own}
    for epoch in range(12):
        loader.set_epoch(epoch)
        ids = []
        for batch in loader:
            for image_id, text, length in zip(batch["image_id"].tolist(), batch["text"], batch["lengths"]):
                caption = tuple(text[: length - 1].tolist())
                assert caption in own[image_id]
                drawn[image_id].add(caption)
                ids.append(image_id)
        assert sorted(ids) == sorted(own)
    assert drawn == own, "over epochs every caption is drawn"


def _tokens_of_image(cache, n: int) -> list[list[int]]:
    rows = (cache.caption_image == n).nonzero().flatten().tolist()
    return [cache.tokens[cache.offsets[m] : cache.offsets[m + 1]].tolist() for m in rows]


def _ids(loader: CacheLoader) -> list[int]:
    return [i for batch in loader for i in batch["image_id"].tolist()]


def test_reproducible_per_seed_and_epoch(cache):
    a, b = CacheLoader(cache, 4, seed=5), CacheLoader(cache, 4, seed=5)
    a.set_epoch(2)
    b.set_epoch(2)
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)
    orders = set()
    for epoch in range(4):
        a.set_epoch(epoch)
        orders.add(tuple(_ids(a)))
    assert len(orders) == 4
    assert _ids(CacheLoader(cache, 4, seed=6)) != _ids(CacheLoader(cache, 4, seed=5))


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_take_disjoint_shards(cache, drop_last):
    loaders = [CacheLoader(cache, 5, seed=0, rank=r, world_size=2, drop_last=drop_last) for r in range(2)]
    for loader in loaders:
        loader.set_epoch(3)
    shards = [_ids(loader) for loader in loaders]
    assert len(loaders[0]) == len(loaders[1])
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(cache.image_ids.tolist())  # 10 images, 2 ranks: no padding
    three = [CacheLoader(cache, 3, rank=r, world_size=3, drop_last=drop_last) for r in range(3)]
    sizes = {sum(len(b["image_id"]) for b in loader) for loader in three}
    assert sizes == ({3} if drop_last else {4}), "equal shards: cut or padded, like DistributedSampler"


def test_drop_last_and_device(cache):
    loader = CacheLoader(cache.to("cpu"), batch_size=4, drop_last=True, device="cpu")
    assert len(loader) == N_IMAGES // 4 and all(len(b["image_id"]) == 4 for b in loader)


def test_coco_mini_cache_matches_reader(tmp_path):
    root = need_coco_mini()
    out = prepare_cache(root, "val2017", tmp_path / "val", 32, workers=2)
    c = load_cache(out)
    ds = CocoCaptionDataset(root, "val2017", image_size=32)
    assert len(c) == 79 and c.captions == [cap for i in ds.image_ids for cap in ds.captions(i)]
    for n in (0, 40, 78):
        assert torch.equal(c.images[n], (ds[n]["image"] * 255).round().to(torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cache_on_the_gpu_serves_the_same_batches(cache):
    on_gpu = CacheLoader(cache.to("cuda"), 4, seed=2, device="cuda", captions="all")
    on_cpu = CacheLoader(cache, 4, seed=2, captions="all")
    for x, y in zip(on_gpu, on_cpu):
        assert all(x[k].device.type == "cuda" and torch.equal(x[k].cpu(), y[k]) for k in y)
