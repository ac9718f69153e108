"""Peak resident memory of training and of preparing the cache, each measured in its own process.

Taught in notebooks/06_coco_data.ipynb (the cache) and notebooks/07_coco_training.ipynb (training).

    python benchmarks/memory.py                          # train on coco-mini; prepare 1000 and 5000
    python benchmarks/memory.py --train-steps 5 --prepare-images 500 5000

Every measurement runs in a fresh interpreter (this script with --phase), so `ru_maxrss` is its own.
A sampler thread also records the peak of RssAnon (memory the process owns) and RssFile (file pages
mapped into it: a memory-mapped cache shows up here, and the kernel can drop those pages at will).
  import     the baseline: interpreter + torch + the package, nothing done
  train      N training steps of the naive or the course pipeline on coco-mini (batch 64)
  prepare    `prepare_cache` of a synthetic JPEG set of N images (2 workers; the workers' peak separately)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mvae_course.notebook import coco_mini_path

DEFAULT_ROOT = coco_mini_path()
MIB = 2**20


class RssSampler:
    """Peak RssAnon and RssFile of this process (from /proc/self/status), sampled every 20 ms."""

    def __init__(self) -> None:
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in self.peak:
                self.peak[key] = max(self.peak[key], int(value.split()[0]) * 1024)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self._sample()
        return {f"peak_{k}_mib": v / MIB for k, v in self.peak.items()}


def _usage() -> dict[str, float]:
    """Peak RSS of this process and of its largest finished child (Linux reports KiB)."""
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_child_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def phase_import(args: argparse.Namespace) -> dict:
    import mvae_course.data.cache  # noqa: F401
    import mvae_course.throughput  # noqa: F401

    return {"what": "import torch + mvae_course"}


def phase_train(args: argparse.Namespace) -> dict:
    from mvae_course.throughput import COURSE, NAIVE, build_pipeline, load_train_data

    data = load_train_data(args.root, "train2017", args.work / "cache")
    pipeline = build_pipeline(NAIVE if args.pipeline == "naive" else COURSE, data, args.batch_size)
    for _ in range(args.train_steps):
        pipeline.step()
    return {"what": f"train {args.pipeline}, {args.train_steps} steps, batch {args.batch_size}, coco-mini"}


def phase_prepare(args: argparse.Namespace) -> dict:
    from mvae_course.data.cache import prepare_cache
    from mvae_course.data.coco import read_captions
    from mvae_course.data.text import CaptionTokenizer

    root = args.work / f"synthetic-{args.images}"
    tokenizer = CaptionTokenizer.fit(read_captions(root, "train2017"))
    out = args.work / f"cache-{args.images}"
    prepare_cache(root, "train2017", out, args.image_size, tokenizer, workers=2)
    nbytes = args.images * 3 * args.image_size**2
    return {"what": f"prepare_cache {args.images} images at {args.image_size} px", "images_mib": nbytes / MIB}


PHASES = {"import": phase_import, "train": phase_train, "prepare": phase_prepare}


def measure(phase: str, args: argparse.Namespace, **extra) -> dict:
    """Run one phase in a fresh interpreter; returns its JSON line."""
    cmd = [sys.executable, __file__, "--phase", phase, "--work", str(args.work), "--root", str(args.root),
           "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
           "--train-steps", str(args.train_steps)]
    cmd += [a for k, v in extra.items() for a in (f"--{k}", str(v))]
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="coco-mini (for training)")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--prepare-images", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", choices=["naive", "course"], help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        sampler = RssSampler()
        row = PHASES[args.phase](args)
        print(json.dumps({**row, **sampler.stop(), **_usage()}))
        return

    from mvae_course.data.synthetic import make_synthetic_coco

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        args.work = Path(tmp)
        rows.append(measure("import", args))
        if (args.root / "annotations").is_dir():
            rows += [measure("train", args, pipeline=p) for p in ("naive", "course")]
        else:
            print(f"no coco-mini at {args.root}: training measurements skipped")
        for n in args.prepare_images:
            start = time.perf_counter()
            # Small JPEGs: decoding speed is not measured here, only what the cache holds in memory.
            make_synthetic_coco(args.work / f"synthetic-{n}", n_images=n, size=(160, 120))
            print(f"{n} synthetic JPEGs written in {time.perf_counter() - start:.0f} s", flush=True)
            rows.append(measure("prepare", args, images=n))
    print(f"\n| measurement | peak RSS (MiB) | peak RssAnon | peak RssFile | largest worker | images (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        images = f"{r['images_mib']:.0f}" if "images_mib" in r else ""
        print(f"| {r['what']} | {r['peak_rss_mib']:.0f} | {r['peak_RssAnon_mib']:.0f} | "
              f"{r['peak_RssFile_mib']:.0f} | {r['peak_child_rss_mib']:.0f} | {images} |")


if __name__ == "__main__":
    main()
