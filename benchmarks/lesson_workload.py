"""The lessons' own training, timed: the `cpu` preset (what every reference run trains) per fusion.

    python benchmarks/lesson_workload.py                                 # this checkout, bf16 where the CPU has it
    python benchmarks/lesson_workload.py --variant before=/tmp/old --variant after=.   # two checkouts, side by side
    python benchmarks/lesson_workload.py --variant bf16=. --variant fp32=.:amp=off
    python benchmarks/lesson_workload.py --variant one=.:threads=1 --variant two=.:threads=2
    python benchmarks/lesson_workload.py --variant eager=. --variant compiled=.:compile=on

Each variant is NAME=PATH[:amp=on|off][:threads=N][:compile=on|off]: a checkout of the repository (its
`mvae_course` is imported from PATH, so an older commit can be measured against this one; `git worktree add
/tmp/old <rev>`), whether bf16 autocast is allowed (`train.amp`), the torch threads it trains with (default 1),
and whether the image encoder and decoder are put through `torch.compile` (a lever measured here, not part of
the course's training; each run compiles afresh, with an inductor cache of its own, so the one-step run's extra
CPU seconds are the compile time). Every measurement
runs `mvae_course.train.train` in a fresh process, and the variants take turns item by item (A B A B ...),
so a change in the machine's load hits all of them alike. For each fusion: samples/s (the training log's, wall
clock) and CPU seconds per 1000 steps: the CPU time of a run of `--steps` steps minus that of a run of one
step, per step between them, so data preparation, the first validation and the first step are left out.

The lessons load reference runs, all of them the `cpu` preset with a change or two (`mvae_course.reference`);
what each cost to train is in its manifest (`mvae-course reference` lists them; `make run RETRAIN=1` trains
them all here). Nothing here asserts a speed; benchmarks/README.md has the figures and the machine they were
measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FUSIONS = ("independent", "poe", "moe", "mopoe")


# ---------------------------------------------------------------------------------------------
# The worker: one `train` call in this process, with the variant's package on sys.path
# ---------------------------------------------------------------------------------------------


def work(job: dict[str, Any]) -> dict[str, Any]:
    """Train one run as `job` says; return its steps, wall and CPU seconds and the logged samples/s."""
    import torch

    from mvae_course.config import preset
    from mvae_course.metrics_log import read_metrics
    from mvae_course.train import train

    torch.set_num_threads(job["threads"])
    if job.get("compile"):
        import mvae_course.train

        class Compiled(mvae_course.train.MultimodalVAE):  # the convolutions; the GRUs stay in eager mode
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.image_encoder.compile()
                self.image_decoder.compile()

        mvae_course.train.MultimodalVAE = Compiled
    changes = {k: v for k, v in job["changes"].items() if k != "base"}
    cfg = preset(job["changes"]["base"]).replace(**changes)
    train_opts = {"amp": job["amp"], "device": "cpu"}
    if hasattr(cfg.train, "threads"):  # older checkouts have no train.threads: torch's setting above holds
        train_opts["threads"] = job["threads"]
    cfg = cfg.replace(train=train_opts)
    if job.get("max_steps") is not None:
        cfg = cfg.replace(train={"max_steps": job["max_steps"], "eval_every": 10**9, "ckpt_every": 10**9,
                                 "log_every": max(1, job["max_steps"] // 4)})
    out = Path(job["out"])
    wall, cpu = time.perf_counter(), time.process_time()
    result = train(cfg, out, device="cpu", progress=False, data_dir=job["data_dir"])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rates = [float(r["samples_per_s"]) for r in read_metrics(out, "train") if r.get("samples_per_s")]
    return {"steps": result.step, "batch": cfg.train.batch_size, "wall_s": wall, "cpu_s": cpu,
            "samples_per_s": sum(rates) / len(rates) if rates else None}


# ---------------------------------------------------------------------------------------------
# The parent: variants, jobs in turn, tables
# ---------------------------------------------------------------------------------------------


@dataclass
class Variant:
    """NAME=PATH[:amp=on|off][:threads=N][:compile=on|off]."""

    name: str
    path: Path
    amp: bool = True
    threads: int = 1
    compile: bool = False
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Variant:
        name, sep, rest = text.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"--variant {text!r}: write NAME=PATH[:amp=off][:threads=N]"
                                             "[:compile=on]")
        path, *options = rest.split(":")
        variant = cls(name, Path(path).resolve())
        for option in options:
            key, _, value = option.partition("=")
            if key == "amp" and value in ("on", "off"):
                variant.amp = value == "on"
            elif key == "threads" and value.isdigit() and int(value) > 0:
                variant.threads = int(value)
            elif key == "compile" and value in ("on", "off"):
                variant.compile = value == "on"
            else:
                raise argparse.ArgumentTypeError(f"--variant {text!r}: unknown option {option!r} "
                                                 "(amp=on|off, threads=N, compile=on|off)")
        if not (variant.path / "mvae_course" / "__init__.py").is_file():
            raise argparse.ArgumentTypeError(f"--variant {text!r}: {variant.path} holds no mvae_course package")
        return variant


def run_job(variant: Variant, job: dict[str, Any]) -> dict[str, Any]:
    """`work(job)` in a fresh interpreter that imports the variant's package."""
    env = {**os.environ, "PYTHONPATH": str(variant.path)}
    if variant.compile:  # a cold cache per run: what a learner's first training pays
        env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(job["out"]) / "inductor-cache")
    job = {**job, "amp": variant.amp, "threads": variant.threads, "compile": variant.compile}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], check=False, env=env,
                          capture_output=True, text=True, cwd=variant.path)
    if proc.returncode != 0:
        raise SystemExit(f"variant {variant.name}, job {job['out']}: failed\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", type=Variant.parse,
                        help="NAME=PATH[:amp=on|off][:threads=N][:compile=on|off], repeatable "
                             "(default: this checkout)")
    parser.add_argument("--steps", type=int, default=300, help="fusions: steps per timed run (default 300)")
    parser.add_argument("--fusions", nargs="+", default=list(FUSIONS), choices=FUSIONS)
    parser.add_argument("--preset", default="cpu", choices=["cpu", "tiny"],
                        help="what the lessons train (cpu, the default) or tiny (a smoke run of this script)")
    parser.add_argument("--data-dir", type=Path,
                        help="where the shapes data and caches go, a folder per variant (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(work(json.loads(args.worker))))
        return
    # Imported here, not at the top: a worker imports its variant's package, which may predate these.
    from mvae_course.notebook import markdown_table
    from mvae_course.device import machine_description

    variants = args.variant or [Variant.parse(f"this={REPO}")]
    print(machine_description())
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or Path(tmp) / "data"
        jobs: list[tuple[str, dict[str, Any]]] = []
        for fusion in args.fusions:
            changes = {"base": args.preset, "model": {"fusion": fusion}}
            jobs += [(f"fusion {fusion} {n}", {"changes": changes, "max_steps": n}) for n in (1, args.steps)]
        # One untimed step per variant first writes the shapes data and its cache into a folder of its own,
        # which its later runs reuse: else a one-step run would pay for them, and two checkouts whose data
        # differ (an older generator) would rebuild each other's caches inside timed runs.
        for variant in variants:
            warm = run_job(variant, {**jobs[0][1], "out": str(Path(tmp) / "warm-up" / variant.name),
                                     "data_dir": str(data_dir / variant.name)})
            print(f"{variant.name}: data prepared (and one step) in {warm['cpu_s']:.1f} CPU s, not counted",
                  flush=True)
        for i, (key, job) in enumerate(jobs):
            for variant in variants:
                out = Path(tmp) / variant.name / f"run{i}"
                variant.results[key] = run_job(variant, {**job, "out": str(out),
                                                         "data_dir": str(data_dir / variant.name)})
            print(f"{key}: " + ", ".join(f"{v.name} {v.results[key]['cpu_s']:.1f} CPU s" for v in variants),
                  flush=True)
    print(f"\n{machine_description()} (at the end)")
    rows = []
    for fusion in args.fusions:
        row: dict[str, Any] = {"fusion": fusion}
        for v in variants:
            timed, one = v.results[f"fusion {fusion} {args.steps}"], v.results[f"fusion {fusion} 1"]
            row[f"{v.name} samples/s"] = timed["samples_per_s"]
            row[f"{v.name} CPU s / 1000 steps"] = 1000 * (timed["cpu_s"] - one["cpu_s"]) / (args.steps - 1)
        if len(variants) > 1:
            first, last = (row[f"{v.name} CPU s / 1000 steps"] for v in (variants[0], variants[-1]))
            row[f"{variants[0].name} / {variants[-1].name}"] = first / last
        rows.append(row)
    batch = variants[0].results[jobs[-1][0]]["batch"]
    title = f"The {args.preset} preset per fusion ({args.steps} steps, batch {batch})"
    print(f"\n### {title}\n\n{markdown_table(rows)}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_description(), "variants": {
            v.name: {"path": str(v.path), "amp": v.amp, "threads": v.threads, "compile": v.compile,
                     "results": v.results}
            for v in variants}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
