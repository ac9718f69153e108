"""How fast the preprocessing cache is built, and what it buys when training reads data.

Taught in notebooks/06_coco_data.ipynb.

    python benchmarks/prepare_throughput.py --root ../shared/data/coco-mini --repeat 3

Three measurements, each in a fresh process so its peak RSS is its own:
  prepare   images/s of `prepare_cache` (decode + resize + tokenise + write) over the JPEGs of every split
  cache     samples/s of `CacheLoader` epochs (10 x repeat) from the cache (uint8 -> float on the CPU)
  decode    samples/s of an epoch of `CocoCaptionDataset` + torch `DataLoader`, decoding every access
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mvae_course.notebook import coco_mini_path

PHASES = ("prepare", "cache", "decode")
DEFAULT_ROOT = coco_mini_path()


def _splits(root: Path) -> list[str]:
    return sorted(p.stem.removeprefix("captions_") for p in (root / "annotations").glob("captions_*.json"))


def _peak_rss_mb() -> float:
    """Peak resident memory of this process plus its finished children (Linux reports KiB)."""
    usage = [resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    kib = sum(usage)
    return kib / 1024


def bench_prepare(root: Path, image_size: int, workers: int, repeat: int, cache_dir: Path) -> dict:
    from mvae_course.data.cache import load_cache, prepare_cache
    from mvae_course.data.coco import read_captions
    from mvae_course.data.text import CaptionTokenizer

    splits = _splits(root)
    tokenizer = CaptionTokenizer.fit(read_captions(root, splits[0]))
    best, n = float("inf"), 0
    for _ in range(repeat):
        start = time.perf_counter()
        n = 0
        for split in splits:
            out = prepare_cache(root, split, cache_dir / split, image_size, tokenizer, workers)
            n += len(load_cache(out))
        best = min(best, time.perf_counter() - start)
    what = f"prepare_cache, {workers} workers"
    return {"what": what, "rate": n / best, "unit": "images/s", "rss": _peak_rss_mb()}


def bench_cache(root: Path, batch_size: int, repeat: int, cache_dir: Path) -> dict:
    import torch

    from mvae_course.data.cache import CacheLoader, load_cache

    # One thread, like a DataLoader worker: on a busy machine torch's thread pool mostly waits on itself.
    torch.set_num_threads(1)
    loader = CacheLoader(load_cache(cache_dir / _splits(root)[0]), batch_size)
    n, start = 0, time.perf_counter()
    for epoch in range(10 * repeat):  # coco-mini's epochs are too short to time one by one
        loader.set_epoch(epoch)
        n += sum(len(batch["image_id"]) for batch in loader)
    rate = n / (time.perf_counter() - start)
    return {"what": "CacheLoader epoch, 1 thread", "rate": rate, "unit": "samples/s", "rss": _peak_rss_mb()}


def bench_decode(root: Path, image_size: int, batch_size: int, workers: int, repeat: int) -> dict:
    from torch.utils.data import DataLoader

    from mvae_course.data.coco import CocoCaptionDataset, collate_captions, read_captions
    from mvae_course.data.text import CaptionTokenizer

    split = _splits(root)[0]
    tokenizer = CaptionTokenizer.fit(read_captions(root, split))
    ds = CocoCaptionDataset(root, split, image_size, tokenizer)
    loader = DataLoader(ds, batch_size, shuffle=True, num_workers=workers, collate_fn=collate_captions)
    n, start = 0, time.perf_counter()
    for epoch in range(repeat):
        ds.set_epoch(epoch)
        n += sum(len(batch["image_id"]) for batch in loader)
    rate = n / (time.perf_counter() - start)
    what = f"CocoCaptionDataset + DataLoader, {workers} workers"
    return {"what": what, "rate": rate, "unit": "samples/s", "rss": _peak_rss_mb()}


def in_fresh_process(phase: str, args: argparse.Namespace, cache_dir: Path) -> dict:
    """Run one measurement in a new interpreter (this script with --phase), so peak RSS is its own."""
    cmd = [sys.executable, __file__, "--phase", phase, "--cache-dir", str(cache_dir), f"--root={args.root}"]
    for flag in ("repeat", "image_size", "batch_size", "workers"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_phase(args: argparse.Namespace) -> dict:
    if args.phase == "prepare":
        return bench_prepare(args.root, args.image_size, args.workers, args.repeat, args.cache_dir)
    if args.phase == "cache":
        return bench_cache(args.root, args.batch_size, args.repeat, args.cache_dir)
    return bench_decode(args.root, args.image_size, args.batch_size, args.workers, args.repeat)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="a COCO folder (default: coco-mini)")
    parser.add_argument("--repeat", type=int, default=3, help="prepare runs (best kept), epochs of loading")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # internal: one measurement
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (args.root / "annotations").is_dir():
        expected = args.root / "annotations" / "captions_<split>.json"
        raise SystemExit(f"no COCO folder at {args.root} (expected {expected})")
    if args.phase:
        print(json.dumps(run_phase(args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        rows = [in_fresh_process(phase, args, Path(tmp)) for phase in PHASES]  # prepare first: cache reads it
    print(f"\n{args.root}: splits {_splits(args.root)}, {args.image_size} x {args.image_size}, "
          f"batch {args.batch_size}, repeat {args.repeat}")
    print(f"{'measurement':<45} {'rate':>12}  {'unit':<10} {'peak RSS (MB)':>14}")
    for r in rows:
        print(f"{r['what']:<45} {r['rate']:>12.0f}  {r['unit']:<10} {r['rss']:>14.0f}")


if __name__ == "__main__":
    main()
