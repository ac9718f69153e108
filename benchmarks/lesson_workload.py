"""The lessons' own training, timed: the `cpu` preset per fusion, and every training run the lessons make.

    python benchmarks/lesson_workload.py                                 # this checkout, bf16 where the CPU has it
    python benchmarks/lesson_workload.py --variant before=/tmp/old --variant after=.   # two checkouts, side by side
    python benchmarks/lesson_workload.py --variant bf16=. --variant fp32=.:amp=off --only fusions
    python benchmarks/lesson_workload.py --variant one=.:threads=1 --variant two=.:threads=2 --only fusions

Each variant is NAME=PATH[:amp=on|off][:threads=N]: a checkout of the repository (its `mvae_course` is imported
from PATH, so an older commit can be measured against this one; `git worktree add /tmp/old <rev>`), whether
bf16 autocast is allowed (`train.amp`), and the torch threads it trains with (default 1). Every measurement
runs `mvae_course.train.train` in a fresh process, and the variants take turns item by item (A B A B ...),
so a change in the machine's load hits all of them alike. Two tables:

- fusions: the `cpu` preset (what lessons 02-04 and the quality benchmark train) for each fusion: samples/s
  (the training log's, wall clock) and CPU seconds per 1000 steps: the CPU time of a run of `--steps` steps
  minus that of a run of 0 steps, so data preparation and the first validation are left out.
- lessons: every training run lessons 02, 03 and 04 make with their default parameters (lesson 07 reuses
  04's runs; lesson 06 trains 60 steps on coco-mini, not counted): wall and CPU seconds of each `train` call.

The lesson configs below mirror the notebooks (notebooks/0N_*.ipynb, commit 833a9c5): keep them in step.
Nothing here asserts a speed; benchmarks/README.md has the figures and the machine they were measured on.
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


def lesson_runs() -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """{lesson: [(run name, config changes)]}: each run as `base` preset + `config.replace(**changes)`.

    The changes are plain dicts, so the same run builds under any version of the package.
    """
    l02 = {"train": {"max_steps": 500, "kl_warmup_steps": 100, "eval_every": 100, "ckpt_every": 500,
                     "log_every": 10},
           "model": {"fusion": "independent", "image_likelihood": "bernoulli"}}
    l02_likelihood = {"data": {"n_train": 4000, "n_val": 500},
                      "train": {"max_steps": 500, "kl_warmup_steps": 100, "eval_every": 500, "ckpt_every": 500,
                                "log_every": 10}}
    l03 = {"data": {"image_size": 32},
           "model": {"fusion": "independent", "image_size": 32, "image_channels": [8, 16, 32], "text_weight": 1.0},
           "train": {"max_steps": 400, "warmup_steps": 20, "eval_every": 400, "ckpt_every": 400, "log_every": 10}}
    l03_variants = {"no remedy": {"kl_warmup_steps": 0}, "KL warm-up": {"kl_warmup_steps": 200},
                    "KL warm-up + word dropout": {"kl_warmup_steps": 200}}
    l04 = {"data": {"image_size": 32},
           "model": {"image_size": 32, "image_channels": [16, 32, 64], "z_dim": 16, "emb_dim": 32, "enc_hidden": 64,
                     "dec_hidden": 64},
           "train": {"max_steps": 500, "warmup_steps": 20, "kl_warmup_steps": 166, "eval_every": 500,
                     "ckpt_every": 500}}
    return {
        "02_image_vae": [("cpu, independent", {"base": "cpu", **l02})] + [
            (f"tiny, {lik}", {"base": "tiny", **l02_likelihood,
                              "model": {"fusion": "independent", "image_likelihood": lik}})
            for lik in ("gaussian", "bernoulli", "continuous_bernoulli")],
        "03_text_vae": [
            (name, {"base": "cpu", **l03, "train": {**l03["train"], **train},
                    "model": {**l03["model"], **({"word_dropout": 0.5} if "dropout" in name else {})}})
            for name, train in l03_variants.items()],
        "04_fusion": [(fusion, {"base": "cpu", **l04, "model": {**l04["model"], "fusion": fusion}})
                      for fusion in FUSIONS],
    }


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
    """NAME=PATH[:amp=on|off][:threads=N]."""

    name: str
    path: Path
    amp: bool = True
    threads: int = 1
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Variant:
        name, sep, rest = text.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"--variant {text!r}: write NAME=PATH[:amp=off][:threads=N]")
        path, *options = rest.split(":")
        variant = cls(name, Path(path).resolve())
        for option in options:
            key, _, value = option.partition("=")
            if key == "amp" and value in ("on", "off"):
                variant.amp = value == "on"
            elif key == "threads" and value.isdigit() and int(value) > 0:
                variant.threads = int(value)
            else:
                raise argparse.ArgumentTypeError(f"--variant {text!r}: unknown option {option!r} "
                                                 "(amp=on|off, threads=N)")
        if not (variant.path / "mvae_course" / "__init__.py").is_file():
            raise argparse.ArgumentTypeError(f"--variant {text!r}: {variant.path} holds no mvae_course package")
        return variant


def run_job(variant: Variant, job: dict[str, Any]) -> dict[str, Any]:
    """`work(job)` in a fresh interpreter that imports the variant's package."""
    env = {**os.environ, "PYTHONPATH": str(variant.path)}
    job = {**job, "amp": variant.amp, "threads": variant.threads}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], check=False, env=env,
                          capture_output=True, text=True, cwd=variant.path)
    if proc.returncode != 0:
        raise SystemExit(f"variant {variant.name}, job {job['out']}: failed\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", type=Variant.parse,
                        help="NAME=PATH[:amp=on|off][:threads=N], repeatable (default: this checkout)")
    parser.add_argument("--only", choices=["fusions", "lessons"], help="one table only")
    parser.add_argument("--steps", type=int, default=300, help="fusions: steps per timed run (default 300)")
    parser.add_argument("--fusions", nargs="+", default=list(FUSIONS), choices=FUSIONS)
    parser.add_argument("--data-dir", type=Path, help="where the shapes data and caches go (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(work(json.loads(args.worker))))
        return
    # Imported here, not at the top: a worker imports its variant's package, which may predate these.
    from mvae_course.notebook import markdown_table
    from mvae_course.throughput import machine_description

    variants = args.variant or [Variant.parse(f"this={REPO}")]
    print(machine_description())
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or Path(tmp) / "data"
        jobs: list[tuple[str, dict[str, Any]]] = []
        if args.only != "lessons":
            for fusion in args.fusions:
                changes = {"base": "cpu", "model": {"fusion": fusion}}
                jobs += [(f"fusion {fusion} {n}", {"changes": changes, "max_steps": n}) for n in (0, args.steps)]
        if args.only != "fusions":
            jobs += [(f"{lesson}: {name}", {"changes": changes})
                     for lesson, runs in lesson_runs().items() for name, changes in runs]
        for i, (key, job) in enumerate(jobs):
            for variant in variants:
                out = Path(tmp) / variant.name / f"run{i}"
                variant.results[key] = run_job(variant, {**job, "out": str(out), "data_dir": str(data_dir)})
            print(f"{key}: " + ", ".join(f"{v.name} {v.results[key]['cpu_s']:.1f} CPU s" for v in variants),
                  flush=True)
    print(f"\n{machine_description()} (at the end)")
    if args.only != "lessons":
        rows = []
        for fusion in args.fusions:
            row: dict[str, Any] = {"fusion": fusion}
            for v in variants:
                timed, empty = v.results[f"fusion {fusion} {args.steps}"], v.results[f"fusion {fusion} 0"]
                row[f"{v.name} samples/s"] = timed["samples_per_s"]
                row[f"{v.name} CPU s / 1000 steps"] = 1000 * (timed["cpu_s"] - empty["cpu_s"]) / args.steps
            if len(variants) > 1:
                first, last = (row[f"{v.name} CPU s / 1000 steps"] for v in (variants[0], variants[-1]))
                row[f"{variants[0].name} / {variants[-1].name}"] = first / last
            rows.append(row)
        print(f"\n### The cpu preset per fusion ({args.steps} steps, batch 64)\n\n{markdown_table(rows)}")
    if args.only != "fusions":
        rows = []
        for lesson, runs in lesson_runs().items():
            for name, _ in runs:
                row = {"lesson": lesson, "run": name, "steps": variants[0].results[f"{lesson}: {name}"]["steps"]}
                for v in variants:
                    r = v.results[f"{lesson}: {name}"]
                    row[f"{v.name} wall s"], row[f"{v.name} CPU s"] = r["wall_s"], r["cpu_s"]
                rows.append(row)
        totals = {"lesson": "all", "run": "total", "steps": sum(r["steps"] for r in rows)}
        totals.update({k: sum(r[k] for r in rows) for k in rows[0] if k.endswith(" s")})
        print(f"\n### The lessons' training runs\n\n{markdown_table(rows + [totals])}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_description(), "variants": {
            v.name: {"path": str(v.path), "amp": v.amp, "threads": v.threads, "results": v.results}
            for v in variants}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
