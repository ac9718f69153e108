"""Training throughput, naive vs course pipeline, side by side: the command line over mvae_course.throughput.

Taught in notebooks/07_coco_training.ipynb.

    python benchmarks/train_throughput.py                          # coco-mini + synthetic COCO-sized, CPU
    python benchmarks/train_throughput.py --extra compile          # one more lever on top of the course's
    python benchmarks/train_throughput.py gpu --device cuda        # coco_gpu at COCO size (gpu_check.sh)
    python benchmarks/train_throughput.py gpu --device cpu --smoke # the same code, tiny, on a CPU
    python benchmarks/train_throughput.py flops --threads 1        # FLOPs per sample vs the matmul peak
    python benchmarks/train_throughput.py profile --threads 1      # where a step's time goes, by kind of op

`compare` (the default) times every rung of the lever ladder (naive, + cache, + compact_vocab,
+ dynamic_padding, + real_token_logits, + bf16, then any --extra) in alternating rounds on each data set and
prints a Markdown table per data set.

`flops` counts the FLOPs of a training step (`FlopCounterMode`) of the naive and course pipelines on the
synthetic COCO-sized set and of the `cpu` preset on shapes (what the lessons train), times them in turn in
CPU seconds, measures this machine's fp32 and bf16 matrix-product peak in the same run, and prints the
achieved GFLOP per CPU second as a fraction of the peak of the pipeline's precision.

`profile` says what holds a step back from that peak: `torch.profiler` over a few steps of the `cpu` preset's
mopoe (bf16 and fp32) and of the course pipeline on a synthetic COCO-sized set, the time split into matrix
products, convolutions and everything else (the ops that do no FLOPs), each with its GFLOP/s, beside the
matrix-product rates at 1024 x 1024 and at the sizes of the `cpu` preset's GRU products (batch x hidden x
3 hidden).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from mvae_course.config import preset
from mvae_course.data.prepare import data_root, prepare_data
from mvae_course.data.synthetic import make_synthetic_coco
from mvae_course.device import amp_dtype, machine_description
from mvae_course.kernels import KINETO_QUIET
from mvae_course.notebook import coco_mini_path, markdown_table
from mvae_course.throughput import (
    COURSE,
    LEVERS,
    NAIVE,
    Levers,
    TrainData,
    build_pipeline,
    compare,
    cpu_samples_per_s,
    flops_per_sample,
    format_table,
    gpu_epoch_check,
    lever_ladder,
    load_train_data,
    matmul_peak,
    step_profile,
)

DEFAULT_ROOT = coco_mini_path()


def run_ladder(data, ladder: list[tuple[str, Levers]], args: argparse.Namespace, model_config=None) -> str:
    pipelines = [
        build_pipeline(levers, data, args.batch_size, args.device, model_config, name=name)
        for name, levers in ladder
    ]
    results = compare(pipelines, rounds=args.rounds, steps=args.steps, warmup=args.warmup)
    return format_table(results)


def cmd_compare(args: argparse.Namespace) -> None:
    ladder = lever_ladder(args.extra)
    print(f"{machine_description()}\n{torch.get_num_threads()} thread(s), device {args.device}, "
          f"batch {args.batch_size}, {args.rounds} rounds x {args.steps} steps (+{args.warmup} warm-up)")
    with tempfile.TemporaryDirectory() as tmp:
        sets = []
        if "coco-mini" in args.datasets:
            if not (args.root / "annotations").is_dir():
                raise SystemExit(f"no COCO folder at {args.root}; pass --root or --datasets synthetic")
            sets.append(("coco-mini", args.root))
        if "synthetic" in args.datasets:
            start = time.perf_counter()
            root = make_synthetic_coco(Path(tmp) / "synthetic-coco", n_images=args.synthetic_images)
            seconds = time.perf_counter() - start
            print(f"synthetic COCO: {args.synthetic_images} JPEGs 640 x 480 in {seconds:.0f} s")
            sets.append(("synthetic COCO-sized", root))
        for title, root in sets:
            start = time.perf_counter()
            data = load_train_data(root, args.split, Path(tmp) / "cache")
            print(f"\n### {title} ({root.name}/{args.split}: {len(data.cache)} images, "
                  f"{len(data.cache.captions)} captions, compact vocabulary {data.tokenizer.vocab_size}; "
                  f"cache built in {time.perf_counter() - start:.0f} s)\n")
            print(run_ladder(data, ladder, args), flush=True)


def coco_and_shapes(tmp: Path, args: argparse.Namespace) -> tuple[TrainData, TrainData]:
    """The synthetic COCO-sized set and the shapes set the lessons train on (the `cpu` preset's), in `tmp`."""
    coco = load_train_data(make_synthetic_coco(tmp / "synthetic-coco", n_images=args.synthetic_images),
                           args.split, tmp / "cache")
    cpu = preset("cpu")
    prepare_data(cpu, tmp / "data")  # in COCO's layout
    shapes = load_train_data(data_root(cpu, tmp / "data"), cpu.data.train_split, tmp / "cache",
                             cpu.data.image_size)
    return coco, shapes


def cmd_flops(args: argparse.Namespace) -> None:
    print(f"{machine_description()}\n{torch.get_num_threads()} thread(s), batch {args.batch_size}, "
          f"{args.rounds} rounds of one step per pipeline, in turn")
    cpu = preset("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        coco, shapes = coco_and_shapes(Path(tmp), args)
        setups = [("naive (COCO-sized)", NAIVE, coco, None), ("course (COCO-sized)", COURSE, coco, None),
                  ("course fp32 (COCO-sized)", dataclasses.replace(COURSE, bf16=False), coco, None),
                  ("cpu preset mopoe (shapes)", COURSE, shapes, dataclasses.replace(cpu.model, fusion="mopoe")),
                  ("cpu preset mopoe fp32 (shapes)", dataclasses.replace(COURSE, bf16=False), shapes,
                   dataclasses.replace(cpu.model, fusion="mopoe"))]
        pipelines = [build_pipeline(levers, data, args.batch_size, "cpu", model, name=name)
                     for name, levers, data, model in setups]
        flops = [flops_per_sample(p) for p in pipelines]
        peaks = {dtype: matmul_peak(dtype) for dtype in (torch.float32, torch.bfloat16)}
        rates = cpu_samples_per_s(pipelines, rounds=args.rounds)
        peaks_after = {dtype: matmul_peak(dtype) for dtype in peaks}
    rows = []
    for p, f, rate in zip(pipelines, flops, rates):
        dtype = amp_dtype(p.device, p.bf16)
        achieved = f * rate / 1e9
        peak = max(peaks[dtype], peaks_after[dtype])
        rows.append({"pipeline": p.name, "GFLOP / sample": f / 1e9, "samples / CPU s": rate,
                     "GFLOP / CPU s": achieved, "precision": str(dtype).removeprefix("torch."),
                     "peak GFLOP / CPU s": peak, "of the peak": f"{100 * achieved / peak:.0f}%"})
    print("\nmatmul peak (1024 x 1024, best of 3 s, before / after the pipelines): "
          + ", ".join(f"{str(d).removeprefix('torch.')} {peaks[d]:.0f} / {peaks_after[d]:.0f} GFLOP per CPU s"
                      for d in peaks))
    print(f"\n{markdown_table(rows)}\n\n{machine_description()} (at the end)")


def cmd_profile(args: argparse.Namespace) -> None:
    os.environ.update(KINETO_QUIET)  # without CUDA, no "gpuGetDeviceCount failed" when a profile ends
    print(f"{machine_description()}\n{torch.get_num_threads()} thread(s), batch {args.batch_size}, "
          f"{args.steps} profiled steps per set-up after {args.warmup} warm-up step(s)")
    cpu = preset("cpu")
    mopoe = dataclasses.replace(cpu.model, fusion="mopoe")
    fp32 = dataclasses.replace(COURSE, bf16=False)
    with tempfile.TemporaryDirectory() as tmp:
        coco, shapes = coco_and_shapes(Path(tmp), args)
        for name, levers, data, model in [("cpu preset mopoe (shapes), bf16", COURSE, shapes, mopoe),
                                          ("cpu preset mopoe (shapes), fp32", fp32, shapes, mopoe),
                                          ("course (COCO-sized), bf16", COURSE, coco, None)]:
            pipeline = build_pipeline(levers, data, args.batch_size, "cpu", model, name=name)
            rows = step_profile(pipeline, args.steps, args.warmup)
            print(f"\n{name}:\n\n{markdown_table(rows)}", flush=True)
    H = cpu.model.dec_hidden
    shapes_of = [(1024, 1024, 1024), (args.batch_size, H, 3 * H), (3 * args.batch_size, H, 3 * H)]
    print("\nmatrix products, GFLOP per CPU s (best of 3 s): " + "; ".join(
        f"{m} x {k} x {n}: " + ", ".join(f"{str(d).removeprefix('torch.')} {matmul_peak(d, n, m=m, k=k):.0f}"
                                         for d in (torch.float32, torch.bfloat16))
        for m, k, n in shapes_of))
    print(f"\n{machine_description()} (at the end)")


def cmd_gpu(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    steps = 2 if args.smoke else args.steps
    check = gpu_epoch_check(device, steps=2 if args.smoke else args.check_steps,
                            warmup=1 if args.smoke else 10, smoke=args.smoke)
    print(json.dumps(check))
    print(f"coco_gpu preset, {check['n_images']} synthetic images resident on {device}, "
          f"batch {check['batch_size']}, {check['precision']}: {check['samples_per_s']:.0f} samples/s, "
          f"peak GPU memory {check['peak_memory_gib']:.2f} GiB; "
          f"projected epoch: {check['epoch_images_min']:.1f} min (118k images, one caption each), "
          f"{check['epoch_captions_min']:.1f} min (all 591k caption pairs)")
    n_images, size = (16, (80, 60)) if args.smoke else (args.synthetic_images, (640, 480))
    model_config = preset("tiny").model if args.smoke else None
    image_size = model_config.image_size if model_config else 64
    with tempfile.TemporaryDirectory() as tmp:
        root = make_synthetic_coco(Path(tmp) / "synthetic-coco", n_images=n_images, size=size)
        data = load_train_data(root, args.split, Path(tmp) / "cache", image_size)
        bf16 = amp_dtype(device, COURSE.bf16) == torch.bfloat16
        ladder = [("naive", NAIVE), ("course" + " (bf16)" * bf16, COURSE)]
        small = argparse.Namespace(**{**vars(args), "batch_size": 8 if args.smoke else args.batch_size,
                                      "rounds": 1 if args.smoke else args.rounds, "steps": steps,
                                      "warmup": 1 if args.smoke else args.warmup})
        print(f"\nnaive vs course on {device} ({n_images} synthetic JPEGs):\n")
        print(run_ladder(data, ladder, small, model_config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="compare",
                        choices=["compare", "flops", "profile", "gpu"])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="a COCO folder (default: coco-mini)")
    parser.add_argument("--split", default="train2017")
    parser.add_argument("--datasets", nargs="+", default=["coco-mini", "synthetic"],
                        choices=["coco-mini", "synthetic"])
    parser.add_argument("--synthetic-images", type=int, default=2000, help="JPEGs in the synthetic set")
    parser.add_argument("--extra", nargs="*", default=[], choices=LEVERS, help="levers to add on top")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (flops: of one step per pipeline)")
    parser.add_argument("--steps", type=int, default=3,
                        help="timed steps per pipeline per round (profile: profiled steps)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per pipeline first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core); "
                        "1 is steadier on a machine other jobs share")
    parser.add_argument("--check-steps", type=int, default=100, help="gpu: timed coco_gpu steps")
    parser.add_argument("--smoke", action="store_true", help="gpu: tiny sizes, to check the code on a CPU")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    commands = {"compare": cmd_compare, "flops": cmd_flops, "profile": cmd_profile, "gpu": cmd_gpu}
    commands[args.command](args)


if __name__ == "__main__":
    main()
