"""The preprocessing cache: round trip, atomic writes, staleness, and the batches CacheLoader serves."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import jpeg_bytes, need_coco_mini, png_bomb, three_images, write_coco

from mvae_course.atomic import HOST
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


# --- captions cut to max_caption_tokens, bad entries and bombs in meta.json, format versions ---------------


def test_long_captions_are_cut_and_counted(tmp_path, capsys):
    essay = " ".join(["red square"] * 2500)  # 5,000 words
    images = {"a.png": Image.new("RGB", (8, 8)), "b.png": Image.new("RGB", (8, 8))}
    root = write_coco(tmp_path / "coco", images, {"a.png": ["a red square", essay], "b.png": ["a blue circle"]})
    tokenizer = CaptionTokenizer.fit(read_captions(root, "train"))
    c = load_cache(prepare_cache(root, "train", tmp_path / "cut", 8, tokenizer, workers=1))
    lengths = (c.offsets[1:] - c.offsets[:-1]).tolist()
    assert sorted(lengths) == [3, 3, 32] and c.meta["n_truncated"] == 1 and c.meta["max_caption_tokens"] == 32
    long = lengths.index(32)
    assert c.tokens[c.offsets[long] : c.offsets[long + 1]].tolist() == tokenizer.encode(essay)[:32]
    assert "train: cut 1 of 3 captions to 32 tokens" in capsys.readouterr().out
    batch = next(iter(CacheLoader(c, batch_size=3, captions="all", shuffle=False)))
    assert batch["text"].shape[1] == 33, "the longest row: 32 content ids + EOS"

    whole = load_cache(prepare_cache(root, "train", tmp_path / "whole", 8, tokenizer, workers=1,
                                     max_caption_tokens=None))
    assert int((whole.offsets[1:] - whole.offsets[:-1]).max()) == 5000 and whole.meta["n_truncated"] == 0
    with pytest.raises(StaleCacheError, match="max_caption_tokens: cache has None, expected 32"):
        load_cache(tmp_path / "whole", cache_key(root, "train", 8, tokenizer))
    with pytest.raises(ValueError, match="max_caption_tokens must be a positive integer or None, got 0"):
        prepare_cache(root, "train", tmp_path / "zero", 8, tokenizer, max_caption_tokens=0)


def test_a_cache_of_an_older_format_is_rebuilt(coco, tokenizer, tmp_path):
    out = tmp_path / "train"
    ensure_cache(coco, "train", out, 16, tokenizer, workers=1)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "format": 1}))
    with pytest.raises(StaleCacheError, match=f"format: cache has 1, expected {cache_module.FORMAT}"):
        load_cache(out)
    with pytest.warns(UserWarning, match="rebuilding.*format"):
        assert ensure_cache(coco, "train", out, 16, tokenizer, workers=1).meta["format"] == cache_module.FORMAT


def test_skipped_entries_and_bombs_are_counted_in_meta(tmp_path):
    root = three_images(tmp_path / "coco")
    (root / "train" / "1.png").write_bytes(png_bomb(20000, 20000))
    path = root / "annotations" / "captions_train.json"
    data = json.loads(path.read_text())
    data["annotations"] += [{"id": 900 + k, "image_id": 3, "caption": ""} for k in range(7)]
    path.write_text(json.dumps(data))
    with pytest.raises(CocoDataError, match=r"empty captions: 7 \(annotation id 900"):
        prepare_cache(root, "train", tmp_path / "c", 8, workers=1, on_bad_image="skip")
    with pytest.raises(CocoDataError, match=r"1\.png: refused as a possible decompression bomb"), pytest.warns(
        UserWarning, match="skipped bad entries"
    ):
        prepare_cache(root, "train", tmp_path / "c", 8, workers=1, on_bad_entry="skip")
    with pytest.warns(UserWarning):
        out = prepare_cache(root, "train", tmp_path / "c", 8, workers=2, on_bad_image="skip", on_bad_entry="skip")
    meta = load_cache(out).meta
    assert meta["bad_entries"] == {"empty captions": {"count": 7, "first": [f"annotation id {900 + k}" for k in range(5)]}}
    assert [Path(p).name for p in meta["skipped"]] == ["1.png"] and "decompression bomb" in meta["skipped"][
        str(root / "train" / "1.png")]
    assert meta["n_images"] == 2 and meta["n_captions"] == 4


def test_an_output_path_under_a_file_is_a_clear_error(coco, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(CacheError, match=r"cannot create the folder of the cache .*file/train: "):
        prepare_cache(coco, "train", tmp_path / "file" / "train", 8)


# --- builders of one cache at the same time --------------------------------------------------------------


def _build_in_child(fn_name: str, coco, out, tokenizer, delay: float) -> None:
    """Child process: `ensure_cache` or `prepare_cache` with a slow decode; exits with how often it built."""
    builds = []
    build, decode = cache_module._build, cache_module._decode_all

    def counted(*args):
        builds.append(1)
        return build(*args)

    def slow(*args, **kwargs):
        time.sleep(delay)
        return decode(*args, **kwargs)

    cache_module._build, cache_module._decode_all = counted, slow
    getattr(cache_module, fn_name)(coco, "train", out, 16, tokenizer, workers=1)
    load_cache(out)
    sys.exit(len(builds))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
@pytest.mark.parametrize("second", ["ensure_cache", "prepare_cache"])
def test_a_second_builder_waits_and_never_deletes_the_first_ones_work(coco, tokenizer, tmp_path, second):
    out = tmp_path / "train"
    ctx = multiprocessing.get_context("fork")
    first = ctx.Process(target=_build_in_child, args=("ensure_cache", coco, out, tokenizer, 1.5))
    first.start()
    deadline = time.monotonic() + 30
    while not list(tmp_path.glob(".train.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    live = list(tmp_path.glob(".train.tmp-*"))
    assert live and live[0].name.endswith(f"-{first.pid}@{HOST}"), "the first builder is at work"
    other = ctx.Process(target=_build_in_child, args=(second, coco, out, tokenizer, 0.0))
    other.start()
    other.join(60)
    first.join(60)
    assert first.exitcode == 1, "the first builder finished: its temporary folder was left alone"
    # ensure_cache reuses what the first built; prepare_cache (an explicit rebuild) builds after it.
    assert other.exitcode == (0 if second == "ensure_cache" else 1)
    assert len(load_cache(out)) == N_IMAGES and not list(tmp_path.glob(".train.tmp-*"))


SLOW_WORKER = """
import os, signal, sys, time
import numpy as np
from PIL import Image
from mvae_course.data.cache import _decode_all
from mvae_course.train import _raise_terminated

folder = sys.argv[1]
paths = []
for k in range(8):
    paths.append(os.path.join(folder, f"{k}.png"))
    Image.new("RGB", (8, 8), (k, 0, 0)).save(paths[-1])
forks = []
# The second worker spends a second in an at-fork hook (as a library's may), while the first decodes everything;
# an exception raised in such a hook is printed and swallowed.
os.register_at_fork(before=lambda: forks.append(1), after_in_child=lambda: len(forks) == 2 and time.sleep(1))
signal.signal(signal.SIGTERM, _raise_terminated)  # what training's processes have while they build a cache
dest = np.zeros((8, 3, 8, 8), dtype=np.uint8)
print(_decode_all(paths, 8, dest, workers=2, desc="decode"), dest[:, 0, 0, 0].tolist())
"""


SLOW_WORKER_AND_AN_ERROR = SLOW_WORKER.replace(
    "dest = np.zeros((8, 3, 8, 8)", "dest = np.zeros((8, 3, 4, 4)"  # the wrong size: the first image raises
)


def test_a_worker_slow_to_start_does_not_hang_the_pool_when_it_fails(tmp_path: Path):
    # On an error the pool is stopped with SIGTERM at once, which the starting worker now holds back until it
    # has its own handler: the error comes through instead of a hang.
    done = subprocess.run([sys.executable, "-c", SLOW_WORKER_AND_AN_ERROR, str(tmp_path)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "ValueError" in done.stderr.splitlines()[-1], done.stderr[-2000:]


def test_a_worker_slow_to_start_does_not_hang_the_pool_when_it_finishes(tmp_path: Path):
    # A pool stopped with SIGTERM sent it to the starting worker, whose inherited handler raised inside the
    # hook, which swallowed it: the worker lived on and the pool waited for it forever (the DDP test's hang).
    done = subprocess.run([sys.executable, "-c", SLOW_WORKER, str(tmp_path)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "{} [0, 1, 2, 3, 4, 5, 6, 7]", done.stdout
