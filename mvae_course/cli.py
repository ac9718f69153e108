"""The command line: `mvae-course COMMAND ...` (or `python -m mvae_course COMMAND ...`).

Each command is a thin layer over a package function, so what a learner runs in a notebook and what an
engineer runs in a shell are the same code. Every option of every command is declared here, next to the
function that turns it into a call.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

from mvae_course.checkpoint import CheckpointError
from mvae_course.compare import compare
from mvae_course.config import FUSIONS, MAX_CAPTION_TOKENS, ON_BAD, PRESETS, Config, preset
from mvae_course.data.cache import prepare_cache, read_captions, read_meta
from mvae_course.data.shapes import HOLDOUTS, write_shapes
from mvae_course.data.text import CaptionTokenizer
from mvae_course.evaluate import evaluate_run
from mvae_course.grading.cli import add_exercises_arguments, add_grade_arguments, run_exercises, run_grade
from mvae_course.reference import RUNS, rebuild, reevaluate, reference_run, verify
from mvae_course.train import NonFiniteLossError, Terminated, train


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1, with the value in the message when it is not."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


# --- shapes, prepare: data ------------------------------------------------------------------------


def run_shapes(args: argparse.Namespace) -> int:
    out = write_shapes(
        args.out, n_train=args.train, n_val=args.val, level=args.level, seed=args.seed,
        image_size=args.image_size, holdout=args.holdout,
    )
    print(f"wrote the shapes data set (level {args.level}) to {out}")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    tokenizer_path = None
    if args.tokenizer:
        tokenizer = CaptionTokenizer.load(args.tokenizer)
    else:
        fit_split = args.fit_split or args.split
        captions = read_captions(args.root, fit_split, on_bad_entry=args.on_bad_entry)
        tokenizer = CaptionTokenizer.fit(captions, min_count=args.min_count)
        tokenizer_path = Path(args.out).with_suffix(".tokenizer.json")
        print(f"fitted a {tokenizer.vocab_size}-token vocabulary on {fit_split}")
    out = prepare_cache(
        args.root, args.split, args.out, image_size=args.image_size, tokenizer=tokenizer,
        workers=args.workers, on_bad_image=args.on_bad_image, on_bad_entry=args.on_bad_entry,
        max_caption_tokens=args.max_caption_tokens,
    )
    if tokenizer_path is not None:  # only now: a failed run leaves a cache and its vocabulary as they were
        tokenizer.save(tokenizer_path)
        print(f"saved the vocabulary to {tokenizer_path}")
    meta = read_meta(out)
    left_out = [f"{problem}: {found['count']}" for problem, found in meta["bad_entries"].items()]
    left_out += [f"unreadable images: {len(meta['skipped'])}"] if meta["skipped"] else []
    summary = f"wrote the cache to {out}: {meta['n_images']} images, {meta['n_captions']} captions"
    summary += f"; left out {', '.join(left_out)}" if left_out else ""
    if meta["n_truncated"]:
        summary += f"; {meta['n_truncated']} cut to {args.max_caption_tokens} tokens"
    print(summary)
    return 0


# --- train ----------------------------------------------------------------------------------------


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `mvae-course train`."""
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                        help="named configuration to start from (default: cpu)")
    parser.add_argument("--config", type=Path, help="a config .json/.yaml file; replaces --preset")
    parser.add_argument("--data", choices=["shapes", "coco"], help="data set (default: the preset's)")
    parser.add_argument("--root", type=Path, help="data folder (COCO 2017 layout); shapes are written there")
    parser.add_argument("--fusion", choices=FUSIONS, help="how the experts are fused")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--max-steps", type=int, help="optimiser steps to train for")
    budget.add_argument("--epochs", type=int, help="passes over the training split (instead of --max-steps)")
    parser.add_argument("--seed", type=int, help="random seed (default: the preset's)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:1, mps (default: auto)")
    parser.add_argument("--out", type=Path, help="run folder (default: runs/<preset>-<data>-<fusion>)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"),
                        help="where generated shapes data and caches go (default: ./data)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> Config:
    """The config the command-line options describe."""
    cfg = Config.load(args.config) if args.config else preset(args.preset)
    data: dict[str, Any] = {}
    if args.data and args.data != cfg.data.dataset:
        splits = ("train2017", "val2017") if args.data == "coco" else ("train", "val")
        data.update(dataset=args.data, train_split=splits[0], val_split=splits[1])
    if args.root:
        data["root"] = str(args.root)
    train_opts: dict[str, Any] = {}
    if args.max_steps is not None:
        train_opts.update(max_steps=args.max_steps, epochs=None)
    if args.epochs is not None:
        train_opts.update(max_steps=None, epochs=args.epochs)
    if args.seed is not None:
        train_opts["seed"] = args.seed
    if args.device:
        train_opts["device"] = args.device
    return cfg.replace(data=data, model={"fusion": args.fusion} if args.fusion else {}, train=train_opts)


def run_train(args: argparse.Namespace) -> int:
    """Run `mvae-course train`; returns the exit status."""
    cfg = config_from_args(args)
    out = args.out or Path("runs") / f"{cfg.name}-{cfg.data.dataset}-{cfg.model.fusion}"
    result = train(cfg, out, resume=args.resume, progress=not args.no_progress, data_dir=args.data_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        val = ", ".join(f"{k} {v:.4g}" for k, v in result.val.items())
        print(f"trained {result.step} steps; validation: {val}")
        print(f"run folder: {result.out_dir} (last.pt, best.pt, metrics.csv)")
    return 0


# --- evaluate, compare ----------------------------------------------------------------------------


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `mvae-course evaluate`."""
    parser.add_argument("--run", type=Path, required=True, help="a run folder written by `train`")
    parser.add_argument("--split", default="val", choices=["train", "val"], help="which split (default: val)")
    parser.add_argument("--device", help="auto, cpu, cuda, mps (default: auto)")
    parser.add_argument("--n", type=positive_int, help="evaluate on the first N images only")
    parser.add_argument("--k", type=positive_int, default=16,
                        help="importance samples per IWAE estimate (default 16)")
    parser.add_argument("--data-dir", type=Path,
                        help="where the run's data and caches are (default: RUN/data if present, else data)")
    parser.add_argument("--no-figures", action="store_true", help="skip the figures")


def run_evaluate(args: argparse.Namespace) -> int:
    """Run `mvae-course evaluate`; returns the exit status."""
    metrics = evaluate_run(args.run, split=args.split, device=args.device, n=args.n, k=args.k,
                           data_dir=args.data_dir, figures=not args.no_figures)
    print(f"wrote {Path(args.run) / f'metrics_{args.split}.json'}")
    return 0 if metrics else 1


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `mvae-course compare`."""
    parser.add_argument("--data", default="shapes", choices=["shapes", "coco"], help="default: shapes")
    parser.add_argument("--level", type=int, default=4, help="shapes difficulty 1-5 (default: 4)")
    parser.add_argument("--fusions", nargs="+", default=list(FUSIONS), choices=list(FUSIONS),
                        help="fusions to compare (default: all)")
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="default: cpu")
    parser.add_argument("--max-steps", type=int, help="training steps per fusion (default: the preset's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="training seeds; with several, the table gives the mean and spread (default: 0)")
    parser.add_argument("--holdout", choices=sorted(HOLDOUTS),
                        help="shapes: keep these attribute combinations out of training, report seen vs unseen")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="default: runs/compare")
    parser.add_argument("--root", type=Path, help="COCO 2017 folder (for --data coco)")
    parser.add_argument("--data-dir", type=Path, help="shared data and caches (default: OUT/data)")
    parser.add_argument("--device", help="auto, cpu, cuda, mps (default: auto)")
    parser.add_argument("--n", type=positive_int, help="evaluate on the first N validation images only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_compare(args: argparse.Namespace) -> int:
    """Run `mvae-course compare`; returns the exit status."""
    compare(data=args.data, level=args.level, fusions=args.fusions, preset=args.preset,
            max_steps=args.max_steps, seeds=args.seeds, out=args.out, data_dir=args.data_dir, root=args.root,
            device=args.device, n=args.n, progress=not args.no_progress, holdout=args.holdout)
    return 0


# --- reference runs ---------------------------------------------------------------------------


def run_reference(args: argparse.Namespace) -> int:
    """List the shipped reference runs and whether their files match their manifests, or rebuild them."""
    if args.rebuild and args.reevaluate:
        raise SystemExit("--rebuild or --reevaluate: a rebuild evaluates what it trains")
    if args.rebuild or args.reevaluate:
        folders = (rebuild(args.names or None, data_dir=args.data_dir, force=args.force, progress=not args.no_progress)
                   if args.rebuild else
                   reevaluate(args.names or None, data_dir=args.data_dir, progress=not args.no_progress))
        for folder in folders:
            print(f"ready: {folder}")
        return 0
    names = args.names or [run.name for run in RUNS]
    broken = 0
    for name in names:
        run = reference_run(name)
        problems = verify(run)
        broken += bool(problems)
        state = "ok" if not problems else problems[0]
        print(f"{run.name:<{max(map(len, names))}}  {run.lesson:<18}  {state}")
    if broken:
        print(f"{broken} of {len(names)} need `mvae-course reference --rebuild`", file=sys.stderr)
    return 1 if broken else 0


# --- course ---------------------------------------------------------------------------------------


def run_course(args: argparse.Namespace) -> int:
    # Jupyter (papermill, ipykernel, nbconvert) is needed by `course` and `site` only: every other command
    # runs without it, so they import it here.
    from mvae_course.course import run_course as run

    return run(args)


def run_site(args: argparse.Namespace) -> int:
    """Rebuild the course site (OUT/html) from the lessons `course` executed, without running them."""
    from mvae_course.course import lesson_notebooks
    from mvae_course.grading.exercises import EXERCISES
    from mvae_course.site import build_site

    lessons = lesson_notebooks(Path(args.out) / "notebooks")
    if not lessons:
        raise FileNotFoundError(f"no executed lessons in {Path(args.out) / 'notebooks'}: run `make run` first")
    print(f"the course site: {build_site(lessons, Path(args.out) / 'html', sorted(EXERCISES.glob('*.ipynb')))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mvae-course", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="on an error, show the traceback too")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:  # every command takes --debug
        return sub.add_parser(name, help=help, parents=[common])

    p = command("shapes", "write the built-in synthetic image-caption set in COCO's format")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=2000, help="training images")
    p.add_argument("--val", type=int, default=200, help="validation images")
    p.add_argument("--level", type=int, default=4, help="1 shape, 2 +size, 3 +colour, 4 +position, 5 +object")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--holdout", choices=sorted(HOLDOUTS),
                   help="keep these (shape, colour) pairs out of train; every other val image shows one")
    p.set_defaults(func=run_shapes)

    p = command("prepare", "decode images once into the preprocessing cache training reads")
    p.add_argument("--root", required=True, help="COCO-style folder (annotations/captions_<split>.json)")
    p.add_argument("--split", required=True, help="e.g. train2017, val2017, or train/val for shapes")
    p.add_argument("--out", required=True, help="cache path")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--tokenizer", help="a saved CaptionTokenizer JSON; default: fit one on --fit-split")
    p.add_argument("--fit-split", help="split whose captions define the vocabulary (default: --split)")
    p.add_argument("--min-count", type=int, default=1, help="rarer wordpieces map to UNK")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--on-bad-image", choices=ON_BAD, default="raise",
                   help="an unreadable image (missing, corrupt, a decompression bomb): stop, or leave it out")
    p.add_argument("--on-bad-entry", choices=ON_BAD, default="raise",
                   help="a bad annotation entry (duplicate id, empty caption, ...): stop, or leave it out")
    p.add_argument("--max-caption-tokens", type=int, default=MAX_CAPTION_TOKENS,
                   help=f"cut longer captions to this many tokens (default: {MAX_CAPTION_TOKENS})")
    p.set_defaults(func=run_prepare)

    p = command("train", "train a multimodal VAE")
    add_train_arguments(p)
    p.set_defaults(func=run_train)

    p = command("evaluate", "measure a trained run: coherence, retrieval, caption metrics, IWAE")
    add_evaluate_arguments(p)
    p.set_defaults(func=run_evaluate)

    p = command("compare", "train every fusion with the same budget and tabulate the metrics")
    add_compare_arguments(p)
    p.set_defaults(func=run_compare)

    p = command("exercises", "build exercises/ from solutions/, or check it is up to date")
    add_exercises_arguments(p)
    p.set_defaults(func=run_exercises)

    p = command("grade", "grade submitted exercise notebooks, each in its own kernel")
    add_grade_arguments(p)
    p.set_defaults(func=run_grade)

    p = command("reference", "list the shipped reference runs (checked against their manifests), or rebuild")
    p.add_argument("names", nargs="*", help="reference runs (default: all)")
    p.add_argument("--rebuild", action="store_true", help="train, export, evaluate and record them")
    p.add_argument("--force", action="store_true", help="rebuild even those that are up to date")
    p.add_argument("--reevaluate", action="store_true",
                   help="evaluate the shipped weights again and record it, no training (after a change to the "
                        "evaluation or the judge)")
    p.add_argument("--data-dir", type=Path, help="where the data and caches go (default: data/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_reference)

    p = command("course", "run the course's main job end to end on the built-in data")
    p.add_argument("--out", default="build", help="where figures and runs go")
    p.add_argument("--preset", default="cpu", help="tiny for a smoke run, cpu for the real thing")
    p.add_argument("--max-steps", type=int, help="override the preset's training budget")
    p.add_argument("--retrain", action="store_true",
                   help="train the lessons' reference runs here instead of loading the shipped ones (hours)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="lessons run at a time (default: 2, or 1 on a single core; most lessons use one core)")
    p.set_defaults(func=run_course)

    p = command("site", "rebuild the course site (OUT/html) from the lessons `course` executed")
    p.add_argument("--out", default="build", help="the folder `course` wrote into (OUT/notebooks)")
    p.set_defaults(func=run_site)
    return parser


# Errors a user can cause and fix (a bad config, data folder, checkpoint, argument): one line, no traceback.
EXPECTED_ERRORS = (ValueError, OSError, CheckpointError, NonFiniteLossError)


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input ends in one `error:` line and status 1 (`--debug`: the traceback too)."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # a warning is one line too, without a source line
            warnings.showwarning = lambda message, *_: print(f"warning: {message}", file=sys.stderr)
            return args.func(args)
    except Terminated:
        return 128 + signal.SIGTERM  # 143, the conventional status of a process stopped by SIGTERM
    except KeyboardInterrupt:
        return 128 + signal.SIGINT  # 130
    except Exception as err:
        if args.debug:
            raise
        known = isinstance(err, EXPECTED_ERRORS)
        detail = "" if known else f"{type(err).__name__}: "
        hint = "" if known else " (unexpected: rerun with --debug for the traceback)"
        # An OSError from the system ("[Errno 20] Not a directory: 'x'") reads better as "x: Not a directory".
        text = f"{err.filename}: {err.strerror}" if isinstance(err, OSError) and err.filename else str(err)
        print(f"error: {detail}{' '.join(text.split())}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
