"""Quality benchmark: every fusion trained on shapes level 4 with the `cpu` preset, then compared.

Taught in notebooks/07_evaluation.ipynb.

    python benchmarks/quality.py                         # the five fusions, cpu preset (1 thread)
    python benchmarks/quality.py --out /tmp/quality --threads 2 --fusions mopoe
    python benchmarks/quality.py --train-only --fusions poe --threads 1   # one fusion per process, then
    python benchmarks/quality.py                                          # evaluate and tabulate all
    python benchmarks/quality.py --fusions mopoe --amp off --out runs/quality-fp32   # bf16 autocast off

The same runs as `python -m mvae_course compare --data shapes --level 4 --fusions independent poe moe
mopoe mmvaeplus --preset cpu`, with the cost of each training run measured: wall seconds, process CPU seconds,
steps and samples/s. On a shared machine wall time depends on the neighbours; CPU seconds per step do
not (much), and CPU seconds / threads estimates the wall time on an otherwise idle machine. It writes
`OUT/quality.md` (the compare table and a cost table) and `OUT/quality.json`, next to compare's own files.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

from mvae_course.compare import compare, comparison_config, to_markdown
from mvae_course.config import FUSIONS, preset
from mvae_course.device import amp_dtype
from mvae_course.train import train

TARGETS = {"coherence image->text": 0.8, "coherence text->image": 0.7}  # strict, for the best fusion


def mean_samples_per_s(metrics_csv: Path) -> float:
    """The mean of the logged training throughput (samples/s) of a run's `metrics.csv`."""
    with metrics_csv.open(newline="") as f:
        values = [float(row["samples_per_s"]) for row in csv.DictReader(f)
                  if row["split"] == "train" and row.get("samples_per_s")]
    return sum(values) / len(values) if values else float("nan")


def train_timed(fusion: str, args: argparse.Namespace) -> dict[str, float | int | str]:
    """Train (or resume) one fusion's run under `args.out`; return what it cost, also kept in `cost.json`.

    A run already finished is not timed again: its `cost.json` is read back.
    """
    cfg = comparison_config("shapes", args.level, fusion, args.preset, args.max_steps, args.seed)
    cfg = cfg.replace(train={"amp": args.amp == "on", **({"threads": args.threads} if args.threads else {})})
    run_dir = args.out / fusion
    if (run_dir / "cost.json").is_file():
        return json.loads((run_dir / "cost.json").read_text())
    wall, cpu = time.perf_counter(), time.process_time()
    result = train(cfg, run_dir, resume=True, device="cpu", progress=not args.no_progress,
                   data_dir=args.out / "data")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    cost = {
        "fusion": fusion, "steps": result.step, "batch": cfg.train.batch_size,
        "image px": cfg.data.image_size, "threads": cfg.train.threads or torch.get_num_threads(),
        "precision": str(amp_dtype(torch.device("cpu"), cfg.train.amp)).removeprefix("torch."),
        "wall s": wall, "CPU s": cpu, "CPU s/step": cpu / max(result.step, 1),
        "samples/s (logged)": mean_samples_per_s(run_dir / "metrics.csv"),
    }
    (run_dir / "cost.json").write_text(json.dumps(cost, indent=2) + "\n")
    return cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/quality"), help="default: runs/quality")
    parser.add_argument("--preset", default="cpu", help="default: cpu")
    parser.add_argument("--level", type=int, default=4, help="shapes level (default: 4)")
    parser.add_argument("--fusions", nargs="+", default=list(FUSIONS), choices=list(FUSIONS))
    parser.add_argument("--max-steps", type=int, help="training steps per fusion (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--amp", choices=["on", "off"], default="on",
                        help="bf16 autocast where the CPU has bf16 arithmetic (train.amp; default on)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads for training and evaluation (default: the preset's train.threads)")
    parser.add_argument("--train-only", action="store_true",
                        help="train and time, no evaluation: train fusions in parallel processes, then run "
                             "again without it (finished runs are reused)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    threads = args.threads or preset(args.preset).train.threads
    if threads:
        torch.set_num_threads(threads)  # for evaluation; training runs with the config's train.threads
    # Timed training first (a finished run is reused with its recorded cost), then compare evaluates.
    costs = [train_timed(fusion, args) for fusion in args.fusions]
    if args.train_only:
        print(json.dumps(costs, indent=2))
        return
    rows = compare("shapes", args.level, args.fusions, args.preset, args.max_steps, args.seed, out=args.out,
                   data_dir=args.out / "data", device="cpu", progress=not args.no_progress)
    best = {name: max(row.get(name, 0.0) for row in rows) for name in TARGETS}
    verdict = ", ".join(f"best {name} {best[name]:.3f} (target {target})" for name, target in TARGETS.items())
    steps = "/".join(sorted({str(cost["steps"]) for cost in costs}))
    title = f"shapes level {args.level}, preset {args.preset}, {steps} steps, seed {args.seed}"
    markdown = (to_markdown(rows, f"Fusion comparison: {title}") + "\n" + verdict + "\n\n"
                + to_markdown(costs, "Training cost").replace("# ", "## ", 1))
    (args.out / "quality.md").write_text(markdown)
    (args.out / "quality.json").write_text(json.dumps({"title": title, "rows": rows, "costs": costs,
                                                       "best": best}, indent=2) + "\n")
    print(markdown)
    print(f"wrote {args.out / 'quality.md'} and quality.json")


if __name__ == "__main__":
    main()
