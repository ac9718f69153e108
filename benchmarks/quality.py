"""Quality benchmark: fusions trained on the shapes data with the `cpu` preset, over seeds, then compared.

Taught in notebooks/08_evaluation.ipynb.

    python benchmarks/quality.py --seeds 0 1 2                        # level 4, the four fusions
    python benchmarks/quality.py --seeds 0 1 2 --level 5 --out runs/quality-L5
    python benchmarks/quality.py --seeds 0 1 2 --holdout shape-colour --out runs/quality-holdout
    python benchmarks/quality.py --train-only --fusions poe --seeds 0 --threads 1   # one fusion per process,
    python benchmarks/quality.py --seeds 0                                          # then evaluate them all

The same runs as `python -m mvae_course compare --data shapes --preset cpu --seeds ...`, in the same
folders (`OUT/seed<seed>/<fusion>`), with the cost of each training run measured: wall seconds,
process CPU seconds, steps. Resumable: a finished run is reused with its recorded cost, an interrupted
one resumed, a saved evaluation of the same checkpoint read back; so after a crash, or to add a seed,
run the same command again. Each run is evaluated under four protocols (posterior mean; posterior
sample; posterior sample with a pixel-sampled image; posterior sample with a sampled caption). It
writes `OUT/quality.md` (the table, the targets met or missed, the cost) and `OUT/quality.json`.

    python benchmarks/quality.py --fusions mopoe --amp off --out runs/quality-fp32   # bf16 autocast off
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mvae_course.compare import compare, comparison_config, to_markdown
from mvae_course.config import FUSIONS, preset
from mvae_course.data.shapes import HOLDOUTS
from mvae_course.device import amp_dtype
from mvae_course.evaluate import PROTOCOLS, SAMPLED_OUTPUTS
from mvae_course.train import train

# The targets for the best fusion (the mean over seeds), by data set: {column: at least}.
TARGETS = {
    "level 4": {"image->text strict, sampled z": 0.95, "text->image strict, sampled z": 0.95,
                "joint strict, z ~ prior": 0.6},
    "level 5": {"image->text strict, sampled z": 0.8, "text->image strict, sampled z": 0.8},
    "holdout": {"unseen image->text strict, sampled z": 0.7, "unseen text->image strict, sampled z": 0.7},
}


def train_timed(fusion: str, seed: int, args: argparse.Namespace) -> dict[str, float | int | str]:
    """Train (or resume) one run under `args.out`; return what it cost, also kept in its `cost.json`.

    A run already finished is not timed again: its `cost.json` is read back.
    """
    cfg = comparison_config("shapes", args.level, fusion, args.preset, args.max_steps, seed, holdout=args.holdout)
    cfg = cfg.replace(train={"amp": args.amp == "on", **({"threads": args.threads} if args.threads else {})})
    run_dir = args.out / f"seed{seed}" / fusion
    if (run_dir / "cost.json").is_file():
        return json.loads((run_dir / "cost.json").read_text())
    wall, cpu = time.perf_counter(), time.process_time()
    result = train(cfg, run_dir, resume=True, device="cpu", progress=not args.no_progress,
                   data_dir=args.out / "data")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    cost = {
        "fusion": fusion, "seed": seed, "steps": result.step, "batch": cfg.train.batch_size,
        "image px": cfg.data.image_size, "threads": cfg.train.threads or torch.get_num_threads(),
        "precision": str(amp_dtype(torch.device("cpu"), cfg.train.amp)).removeprefix("torch."),
        "wall s": wall, "CPU s": cpu, "CPU s/step": cpu / max(result.step, 1),
    }
    (run_dir / "cost.json").write_text(json.dumps(cost, indent=2) + "\n")
    return cost


def verdicts(rows: list[dict], targets: dict[str, float]) -> list[str]:
    """One line per target: the best fusion's figure, and whether it meets the target."""
    lines = []
    for column, target in targets.items():
        scored = [(row[column], row["fusion"]) for row in rows if column in row]
        if not scored:
            lines.append(f"- {column} >= {target}: not measured")
            continue
        best, fusion = max(scored)
        lines.append(f"- {column} >= {target}: best {fusion} {best:.3f}, **{'met' if best >= target else 'missed'}**")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/quality"), help="default: runs/quality")
    parser.add_argument("--preset", default="cpu", help="default: cpu")
    parser.add_argument("--level", type=int, default=4, help="shapes level (default: 4)")
    parser.add_argument("--holdout", choices=sorted(HOLDOUTS), help="keep these combinations out of training")
    parser.add_argument("--fusions", nargs="+", default=list(FUSIONS), choices=list(FUSIONS))
    parser.add_argument("--max-steps", type=int, help="training steps per run (default: the preset's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (default: 0)")
    parser.add_argument("--amp", choices=["on", "off"], default="on",
                        help="bf16 autocast where the CPU has bf16 arithmetic (train.amp; default on)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads for training and evaluation (default: the preset's train.threads)")
    parser.add_argument("--train-only", action="store_true",
                        help="train and time, no evaluation: train runs in parallel processes, then run "
                             "again without it (finished runs are reused)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    threads = args.threads or preset(args.preset).train.threads
    if threads:
        torch.set_num_threads(threads)  # for evaluation; training runs with the config's train.threads
    # Timed training first (a finished run is reused with its recorded cost), then compare evaluates.
    costs = [train_timed(fusion, seed, args) for seed in args.seeds for fusion in args.fusions]
    if args.train_only:
        print(json.dumps(costs, indent=2))
        return
    summary = compare("shapes", args.level, args.fusions, args.preset, args.max_steps, args.seeds, out=args.out,
                      data_dir=args.out / "data", device="cpu", progress=not args.no_progress,
                      holdout=args.holdout, protocols=PROTOCOLS | SAMPLED_OUTPUTS)
    rows = summary["rows"]
    targets = TARGETS.get("holdout" if args.holdout else f"level {args.level}", {})
    verdict = verdicts(rows, targets)
    markdown = (to_markdown(rows, summary["title"], summary["intervals"], summary["sd"],
                            f"intervals: {summary['interval']}")
                + "\nTargets (best fusion, mean over the seeds run):\n\n" + "\n".join(verdict) + "\n\n"
                + to_markdown(costs, "Training cost").replace("# ", "## ", 1))
    (args.out / "quality.md").write_text(markdown)
    (args.out / "quality.json").write_text(json.dumps({"title": summary["title"], "rows": rows,
                                                       "intervals": summary["intervals"], "sd": summary["sd"],
                                                       "per_seed": summary["per_seed"], "targets": targets,
                                                       "verdicts": verdict, "costs": costs}, indent=2) + "\n")
    print(markdown)
    print(f"wrote {args.out / 'quality.md'} and quality.json")


if __name__ == "__main__":
    main()
