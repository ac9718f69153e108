"""The preprocessing cache: every image decoded once, every caption tokenised once; what training reads.

Taught in notebooks/06_coco_data.ipynb.

Decoding a JPEG costs milliseconds; a training step on a GPU costs less. So `prepare_cache` decodes
each image of a split once (in worker processes, with the geometry of `coco.load_image`), and stores

    out/images.npy         N x 3 x H x W uint8
    out/image_ids.npy      N int64, COCO image ids in sorted order
    out/tokens.npy         all captions' content ids, concatenated (int16, or int32 for big vocabularies)
    out/offsets.npy        M + 1 int64: caption m is tokens[offsets[m]:offsets[m + 1]]
    out/caption_image.npy  M int64: the image (row of images.npy) of caption m, non-decreasing
    out/text.json          the raw caption strings and the per-image `attributes` (null for COCO)
    out/meta.json          what the cache was built from (annotation file's size, mtime, sha256;
                           image_size; tokenizer hash; max_caption_tokens; split) and what was left
                           out (bad entries, bad images, captions cut to max_caption_tokens), written last

Why a folder of .npy files: `np.load(mmap_mode=...)` opens each in one call without copying, so
opening a cache of full COCO (118k images, 1.4 GB at 64 x 64) is instant, the OS page cache shares
it between processes, and `CaptionCache.to("cuda")` reads it once, straight into GPU memory. The
folder is written under a temporary name beside `out` and renamed into place (`atomic.atomic_dir`), so
an interrupted run never leaves a cache that loads. Builders of one cache take turns (`atomic.FileLock`
on `.<name>.lock` beside it): a second one waits, and `ensure_cache` then reuses what the first built;
temporary folders of builders that died are removed, those of live ones never. `CacheLoader` then
serves batches with tensor index operations only, on any device.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import signal
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mvae_course.atomic import FileLock, atomic_dir, clean_stale_temps
from mvae_course.config import MAX_CAPTION_TOKENS
from mvae_course.data.coco import (
    CocoCaptionDataset,
    CocoDataError,
    annotation_path,
    load_image,
    read_captions,
)
from mvae_course.data.text import EOS, PAD, check_max_tokens, truncate_captions
from mvae_course.progress import tqdm

__all__ = [
    "CacheError",
    "CacheLoader",
    "CaptionCache",
    "StaleCacheError",
    "cache_key",
    "ensure_cache",
    "image_captions",
    "load_cache",
    "prepare_cache",
    "read_captions",
]

FORMAT = 2  # bump when the layout, the geometry or the captions change: old caches then read as stale
# 2: captions cut to max_caption_tokens; annotation files checked for bad entries
ARRAYS = ("images", "image_ids", "tokens", "offsets", "caption_image")
CHUNK = 64  # most images per worker task


class CacheError(ValueError):
    """A cache folder that is missing, incomplete or unreadable."""


class StaleCacheError(CacheError):
    """A cache built from other source files, another image size or another tokenizer.

    Taught in notebooks/06_coco_data.ipynb.
    """


def tokenizer_hash(tokenizer: Any) -> str | None:
    """sha256 of a tokenizer's vocabulary (its wordpieces in id order); None without a tokenizer."""
    if tokenizer is None:
        return None
    return hashlib.sha256("\n".join(tokenizer.wordpieces).encode("utf-8")).hexdigest()


def source_fingerprint(path: Path, known: dict[str, Any] | None = None) -> dict[str, Any]:
    """Size, mtime and sha256 of an annotation file; the hash is reused from `known` if size+mtime match."""
    st = path.stat()
    stamp = {"file": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if known and known.get("size") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns:
        return {**stamp, "sha256": known["sha256"]}
    return {**stamp, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def cache_key(
    root: str | Path,
    split: str,
    image_size: int,
    tokenizer: Any = None,
    known_source: dict | None = None,
    max_caption_tokens: int | None = MAX_CAPTION_TOKENS,
) -> dict[str, Any]:
    """What a cache must have been built from to be reused: compared key by key by `load_cache(expect=...)`.

    Taught in notebooks/06_coco_data.ipynb.

    The annotation file counts by content (sha256): touching it changes nothing, editing it does.
    """
    source = source_fingerprint(annotation_path(root, split), known_source)
    return {
        "format": FORMAT,
        "split": split,
        "image_size": image_size,
        "tokenizer": tokenizer_hash(tokenizer),
        "max_caption_tokens": max_caption_tokens,
        "source_sha256": source["sha256"],
    }


def _decode_chunk(task: tuple[list[str], int]) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Worker: decode a chunk of files to n x 3 x S x S uint8; failures come back as (position, message)."""
    paths, size = task
    out = np.zeros((len(paths), 3, size, size), dtype=np.uint8)
    errors = []
    for i, path in enumerate(paths):
        try:
            out[i] = np.asarray(load_image(path, size)).transpose(2, 0, 1)
        except CocoDataError as e:
            errors.append((i, str(e)))
    return out, errors


def _worker_signals() -> None:
    """A worker takes the default action on SIGTERM (the pool stops its workers with it), not a handler
    it inherited from the parent, and leaves Ctrl-C to the parent. SIGTERM was held back until now (`_pool`)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _pool(workers: int) -> Pool:
    """Worker processes, forked where the OS can (as torch's DataLoader does): a spawned worker would
    spend seconds importing torch before decoding its first image.

    They are forked with SIGTERM blocked, so that one arriving before a worker has its own handler waits
    for it: the parent's (training's raises Terminated) could be swallowed by an at-fork hook, and the
    worker would live on while `terminate()` waits for it forever.
    """
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        return context.Pool(workers, _worker_signals)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _decode_all(
    paths: list[str], image_size: int, dest: np.ndarray, workers: int, desc: str
) -> dict[int, str]:
    """Decode every path into `dest` (N x 3 x S x S), `workers` processes; returns {index: error}."""
    # Small sets: chunks small enough to keep every worker busy.
    chunk = max(1, min(CHUNK, math.ceil(len(paths) / (4 * max(workers, 1)))))
    tasks = [(paths[i : i + chunk], image_size) for i in range(0, len(paths), chunk)]
    errors: dict[int, str] = {}
    with tqdm(total=len(paths), desc=desc, unit="img") as bar:
        pool = _pool(workers) if workers > 1 and len(tasks) > 1 else None
        try:
            results = pool.imap(_decode_chunk, tasks) if pool else map(_decode_chunk, tasks)
            for start, (images, errs) in zip(range(0, len(paths), chunk), results):
                dest[start : start + len(images)] = images
                errors.update({start + i: msg for i, msg in errs})
                bar.update(len(images))
        except BaseException:
            if pool:
                pool.terminate()  # an error or Ctrl-C: stop the workers now
            raise
        else:
            if pool:
                pool.close()  # done: the workers exit when told to
        finally:
            if pool:
                pool.join()
    return errors


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False) + "\n", encoding="utf-8")


def _token_arrays(
    captions: list[str], tokenizer: Any, max_tokens: int | None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Content ids of all captions, each cut to `max_tokens`, concatenated (int16 while the vocabulary
    fits); M + 1 offsets; and how many captions were cut."""
    ids = tokenizer.encode_batch(captions) if tokenizer is not None else [[] for _ in captions]
    ids, n_cut = truncate_captions(ids, max_tokens)
    dtype = np.int16 if tokenizer is None or tokenizer.vocab_size <= np.iinfo(np.int16).max else np.int32
    offsets = np.zeros(len(captions) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in ids], out=offsets[1:])
    return np.fromiter((t for c in ids for t in c), dtype=dtype, count=int(offsets[-1])), offsets, n_cut


def prepare_cache(
    root: str | Path,
    split: str,
    out: str | Path,
    image_size: int = 64,
    tokenizer: Any = None,
    workers: int = 2,
    on_bad_image: str = "raise",
    on_bad_entry: str = "raise",
    max_caption_tokens: int | None = MAX_CAPTION_TOKENS,
) -> Path:
    """Decode, resize and tokenise one split into the cache folder `out`, atomically; returns `out`.

    Taught in notebooks/06_coco_data.ipynb.

    `tokenizer`: a fitted `CaptionTokenizer` (fit it on the train split's `read_captions`); without one
    only images and raw captions are stored. `on_bad_entry="skip"` leaves bad annotation entries out
    (`coco.check_annotations`), `on_bad_image="skip"` unreadable images with their captions; meta.json
    counts both (`bad_entries`, `skipped`). Captions longer than `max_caption_tokens` content ids are
    cut (None: kept whole), counted in `n_truncated`. A second builder of the same `out` waits.
    """
    out = Path(out)
    with _build_lock(out):
        return _build(root, split, out, image_size, tokenizer, workers, on_bad_image, on_bad_entry,
                      max_caption_tokens)


def _build_lock(out: Path) -> FileLock:
    """The lock that builders of the cache `out` take turns on, beside it (its folder is created)."""
    try:
        return FileLock.beside(out, f"building the cache {out}")
    except OSError as e:
        raise CacheError(f"cannot create the folder of the cache {out}: {e.strerror} ({e.filename})") from e


def _build(
    root: str | Path,
    split: str,
    out: Path,
    image_size: int,
    tokenizer: Any,
    workers: int,
    on_bad_image: str,
    on_bad_entry: str,
    max_caption_tokens: int | None,
) -> Path:
    """`prepare_cache` with its lock held."""
    check_max_tokens(max_caption_tokens)  # before minutes of decoding, not after
    ds = CocoCaptionDataset(root, split, image_size, on_bad_image=on_bad_image, on_bad_entry=on_bad_entry)
    if not ds.image_ids:
        raise CocoDataError(f"{ds.annotation_file}: no images with captions to cache")
    for kind in ("tmp", "old"):  # left behind by builders that were killed
        clean_stale_temps(out.parent, f".{out.name}.{kind}-*")
    source = source_fingerprint(ds.annotation_file)
    meta = cache_key(root, split, image_size, tokenizer, known_source=source,
                     max_caption_tokens=max_caption_tokens)
    with atomic_dir(out) as tmp:
        paths = [str(ds.image_path(i)) for i in ds.image_ids]
        shape = (len(paths), 3, image_size, image_size)
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, shape)
        errors = _decode_all(paths, image_size, images, workers, desc=f"caching {split}")
        if errors and on_bad_image == "raise":
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise CocoDataError(next(iter(errors.values())) + more)
        keep = [n for n in range(len(paths)) if n not in errors]
        if errors:
            first = next(iter(errors.values()))
            warnings.warn(f"{split}: skipped {len(errors)} unreadable images, e.g. {first}")
            kept = images[keep]  # rare: rewrite without the bad rows
            del images
            np.save(tmp / "images.npy", kept)
        else:
            images.flush()
            del images

        image_ids = [ds.image_ids[n] for n in keep]
        captions = [ds.captions(i) for i in image_ids]
        flat = [c for caps in captions for c in caps]
        tokens, offsets, n_truncated = _token_arrays(flat, tokenizer, max_caption_tokens)
        if n_truncated:
            print(f"{split}: cut {n_truncated} of {len(flat)} captions to {max_caption_tokens} tokens")
        attributes = [ds.coco.imgs[i].get("attributes") for i in image_ids]
        np.save(tmp / "image_ids.npy", np.asarray(image_ids, dtype=np.int64))
        np.save(tmp / "tokens.npy", tokens)
        np.save(tmp / "offsets.npy", offsets)
        caption_image = np.repeat(np.arange(len(image_ids), dtype=np.int64), [len(caps) for caps in captions])
        np.save(tmp / "caption_image.npy", caption_image)
        if all(a is None for a in attributes):
            attributes = None
        _write_json(tmp / "text.json", {"captions": flat, "attributes": attributes})
        meta.update(
            source=source,
            vocab_size=None if tokenizer is None else tokenizer.vocab_size,
            n_images=len(image_ids),
            n_captions=len(flat),
            n_truncated=n_truncated,
            bad_entries={problem: {"count": len(entries), "first": entries[:5]}
                         for problem, entries in ds.bad_entries.items()},
            skipped={**ds.skipped, **{paths[n]: msg for n, msg in errors.items()}},
        )
        _write_json(tmp / "meta.json", meta)  # last: a folder without meta.json is not a cache
    return out


def read_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a cache folder; `CacheError` when there is no complete cache there.

    Taught in notebooks/06_coco_data.ipynb.
    """
    path = Path(path)
    try:
        return json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CacheError(f"no cache at {path} (no meta.json); build it with ensure_cache") from e
    except json.JSONDecodeError as e:
        raise CacheError(f"{path / 'meta.json'} is corrupt ({e}); delete {path} and rebuild it") from e


@dataclass
class CaptionCache:
    """A loaded cache: images, tokens and captions as tensors and lists.

    images N x 3 x H x W uint8; image_ids N int64; tokens (total content ids,) int16/int32;
    offsets M + 1 int64; caption_image M int64 (non-decreasing); captions M strings;
    attributes N dicts (or None when the source JSON has none); meta as in meta.json.
    """

    images: torch.Tensor
    image_ids: torch.Tensor
    tokens: torch.Tensor
    offsets: torch.Tensor
    caption_image: torch.Tensor
    captions: list[str]
    attributes: list[dict] | None
    meta: dict[str, Any]

    @property
    def has_text(self) -> bool:
        """Whether captions were tokenised (a tokenizer was given to `prepare_cache`)."""
        return self.meta.get("tokenizer") is not None

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: str | torch.device) -> CaptionCache:
        """A copy with every tensor on `device` (e.g. the whole cache in GPU memory)."""
        return replace(self, **{name: getattr(self, name).to(device) for name in ARRAYS})

    def head(self, n: int | None) -> CaptionCache:
        """The first `n` images with their captions (the whole cache when n is None or larger)."""
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise ValueError(f"n must be at least 1 image, got {n}")
        m = int((self.caption_image < n).sum())  # captions of the first n images (caption_image is sorted)
        return replace(
            self, images=self.images[:n], image_ids=self.image_ids[:n], tokens=self.tokens[: int(self.offsets[m])],
            offsets=self.offsets[: m + 1], caption_image=self.caption_image[:m], captions=self.captions[:m],
            attributes=None if self.attributes is None else self.attributes[:n],
        )

    def rows_of(self, image_ids: torch.Tensor) -> list[int]:
        """Rows of `images` holding these COCO image ids (B)."""
        row = {int(i): r for r, i in enumerate(self.image_ids.tolist())}
        return [row[int(i)] for i in image_ids.tolist()]

    def first_captions(self) -> list[str]:
        """The first raw caption of every image: N strings."""
        first = torch.searchsorted(self.caption_image.cpu(), torch.arange(len(self)))
        return [self.captions[int(i)] for i in first]


def load_cache(path: str | Path, expect: dict[str, Any] | None = None) -> CaptionCache:
    """Open a cache folder (memory-mapped); `StaleCacheError` if any key of `expect` differs from its meta.

    Taught in notebooks/06_coco_data.ipynb.
    """
    path = Path(path)
    meta = read_meta(path)
    expect = {"format": FORMAT, **(expect or {})}
    diffs = [f"{k}: cache has {meta.get(k)!r}, expected {v!r}" for k, v in expect.items() if meta.get(k) != v]
    if diffs:
        raise StaleCacheError(f"cache {path} is stale ({'; '.join(diffs)}); rebuild it with ensure_cache")
    try:
        # mmap_mode="c": copy-on-write pages, so torch gets writable arrays without reading the file now.
        arrays = {name: torch.from_numpy(np.load(path / f"{name}.npy", mmap_mode="c")) for name in ARRAYS}
        text = json.loads((path / "text.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CacheError(f"cache {path} is unreadable ({e}); delete it and rebuild") from e
    return CaptionCache(**arrays, captions=text["captions"], attributes=text["attributes"], meta=meta)


def ensure_cache(
    root: str | Path,
    split: str,
    out: str | Path,
    image_size: int = 64,
    tokenizer: Any = None,
    workers: int = 2,
    on_bad_image: str = "raise",
    on_bad_entry: str = "raise",
    max_caption_tokens: int | None = MAX_CAPTION_TOKENS,
) -> CaptionCache:
    """Load the cache at `out` if it was built from these files and parameters, else (re)build it.

    Taught in notebooks/06_coco_data.ipynb.

    Several processes may call it at once: one builds, the others wait and then load what it built.
    The `on_bad_*` choices only matter when it builds (meta.json says what was left out).
    """
    out = Path(out)

    def fresh(say_stale: bool) -> CaptionCache | None:
        try:
            known = read_meta(out).get("source")
        except CacheError:
            known = None
        expect = cache_key(root, split, image_size, tokenizer, known, max_caption_tokens)
        try:
            return load_cache(out, expect)
        except StaleCacheError as e:
            if say_stale:
                warnings.warn(f"rebuilding: {e}")
        except CacheError:
            pass  # no cache yet
        return None

    cache = fresh(say_stale=True)  # without the lock: an up-to-date read-only cache needs no lock file
    if cache is not None:
        return cache
    with _build_lock(out):
        cache = fresh(say_stale=False)  # another process may have built it while this one waited
        if cache is None:
            _build(root, split, out, image_size, tokenizer, workers, on_bad_image, on_bad_entry,
                   max_caption_tokens)
            cache = load_cache(out)
    return cache


class CacheLoader:
    """Batches straight from a `CaptionCache` with tensor indexing: no per-sample Python, any device.

    Taught in notebooks/06_coco_data.ipynb.

    `captions="random"`: every image once per epoch with one of its captions drawn at random;
    `captions="all"`: every caption once (images repeat), for evaluation. Shuffles and caption draws
    depend only on (`seed`, epoch set by `set_epoch`), so they are reproducible and the same on every
    DDP rank; rank r takes items r, r + world_size, ... of the epoch's order. As torch's
    DistributedSampler does, the order is padded with its first items to a multiple of `world_size`
    (or cut to one when `drop_last`), so all ranks run the same number of steps.

    Yields the batch dict of docs/architecture.md: image B x 3 x H x W float32 in [0, 1], text B x T
    int64 (content ids, EOS, PAD to the longest in the batch), lengths B, image_id B.
    """

    def __init__(
        self,
        cache: CaptionCache,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        captions: str = "random",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if captions not in ("random", "all"):
            raise ValueError(f"captions must be 'random' or 'all', got {captions!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.cache, self.batch_size, self.shuffle, self.seed = cache, batch_size, shuffle, seed
        self.drop_last, self.device, self.captions = drop_last, torch.device(device), captions
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        n_images = len(cache)
        counts = torch.bincount(cache.caption_image.cpu(), minlength=n_images)  # captions per image: N
        if captions == "random" and bool((counts == 0).any()):
            raise ValueError("every image in the cache needs at least one caption")
        self._counts, self._first = counts, torch.cumsum(counts, 0) - counts
        # One PAD after the last token, so gathers past a caption's end stay in bounds (then masked).
        self._tokens = torch.nn.functional.pad(cache.tokens.long(), (0, 1), value=PAD)

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle and caption draw of `epoch` (call before iterating, on every rank)."""
        self.epoch = epoch

    def _n_items(self) -> int:
        return len(self.cache) if self.captions == "random" else self.cache.caption_image.shape[0]

    def _n_local(self) -> int:
        n, ws = self._n_items(), self.world_size
        return n // ws if self.drop_last else math.ceil(n / ws)

    def __len__(self) -> int:
        n = self._n_local()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _epoch_captions(self) -> torch.Tensor:
        """This rank's caption indices for the epoch, in batch order: n_local (int64, CPU)."""
        seed = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]
        g = torch.Generator().manual_seed(int(seed))
        n = self._n_items()
        if self.captions == "random":
            draw = (torch.rand(n, generator=g, dtype=torch.float64) * self._counts).long()
            caps = self._first + draw
        else:
            caps = torch.arange(n)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        total = self._n_local() * self.world_size
        if total > n:  # pad with the first items, as DistributedSampler does
            order = torch.cat([order, order.repeat(math.ceil(total / n))[: total - n]])
        return caps[order[:total][self.rank :: self.world_size]]

    def _batch(self, caps: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch dict for caption indices `caps` (B)."""
        cache = self.cache
        rows = cache.caption_image[caps]  # B
        batch = {
            "image": cache.images[rows].to(self.device, non_blocking=True).float().div_(255.0),
            "image_id": cache.image_ids[rows].to(self.device),
        }
        if cache.has_text:
            starts = cache.offsets[caps]  # B
            lens = cache.offsets[caps + 1] - starts  # B: content ids per caption
            pos = torch.arange(int(lens.max()) + 1, device=starts.device)  # T
            gather = (starts[:, None] + pos).clamp_max(self._tokens.shape[0] - 1)  # B x T
            text = torch.where(pos < lens[:, None], self._tokens[gather], PAD)
            text = torch.where(pos == lens[:, None], EOS, text)
            batch["text"], batch["lengths"] = text.to(self.device), (lens + 1).to(self.device)
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        caps = self._epoch_captions().to(self.cache.caption_image.device)
        for b in range(len(self)):
            yield self._batch(caps[b * self.batch_size : (b + 1) * self.batch_size])


def image_captions(cache: CaptionCache, rows: Sequence[int]) -> list[list[str]]:
    """All raw captions of some images (rows of `cache.images`): the references for BLEU.

    Taught in notebooks/08_evaluation.ipynb.
    """
    first = torch.searchsorted(cache.caption_image.cpu(), torch.as_tensor(rows), side="left")
    last = torch.searchsorted(cache.caption_image.cpu(), torch.as_tensor(rows), side="right")
    return [cache.captions[int(a) : int(b)] for a, b in zip(first, last)]


def as_float_images(images: torch.Tensor) -> torch.Tensor:
    """Images as float32 in [0, 1], from the cache's uint8 or already float: same shape (... x 3 x H x W)."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
