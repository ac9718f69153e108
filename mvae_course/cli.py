"""The command line: `python -m mvae_course COMMAND ...`.

Taught in notebooks/00_setup.ipynb. Each command is a thin layer over a package function, so what a
learner runs in a notebook and what an engineer runs in a shell are the same code.

Each command's arguments are declared by the module that runs it (`add_*_arguments`), so a flag is
defined once, next to the code that reads it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _shapes(args: argparse.Namespace) -> int:
    from mvae_course.data.shapes import write_shapes

    out = write_shapes(
        args.out, n_train=args.train, n_val=args.val, level=args.level, seed=args.seed, image_size=args.image_size
    )
    print(f"wrote the shapes data set (level {args.level}) to {out}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from mvae_course.data.cache import prepare_cache, read_captions
    from mvae_course.data.text import CaptionTokenizer

    if args.tokenizer:
        tokenizer = CaptionTokenizer.load(args.tokenizer)
    else:
        fit_split = args.fit_split or args.split
        tokenizer = CaptionTokenizer.fit(read_captions(args.root, fit_split), min_count=args.min_count)
        tokenizer_path = Path(args.out).with_suffix(".tokenizer.json")
        tokenizer_path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(tokenizer_path)
        print(f"fitted a {tokenizer.vocab_size}-token vocabulary on {fit_split}; saved to {tokenizer_path}")
    out = prepare_cache(
        args.root, args.split, args.out, image_size=args.image_size, tokenizer=tokenizer,
        workers=args.workers, on_bad_image=args.on_bad_image,
    )
    print(f"wrote the cache to {out}")
    return 0


def _site(args: argparse.Namespace) -> int:
    from mvae_course.course import lesson_notebooks
    from mvae_course.grading.exercises import EXERCISES
    from mvae_course.site import build_site

    lessons = lesson_notebooks(Path(args.out) / "notebooks")
    if not lessons:
        print(f"error: no executed lessons in {Path(args.out) / 'notebooks'}: run `make run` first", file=sys.stderr)
        return 2
    print(f"the course site: {build_site(lessons, Path(args.out) / 'html', sorted(EXERCISES.glob('*.ipynb')))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mvae_course", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("shapes", help="write the built-in synthetic image-caption set in COCO's format")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=2000, help="training images")
    p.add_argument("--val", type=int, default=200, help="validation images")
    p.add_argument("--level", type=int, default=4, help="1 shape, 2 +size, 3 +colour, 4 +position, 5 +clutter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.set_defaults(func=_shapes)

    p = sub.add_parser("prepare", help="decode images once into the preprocessing cache training reads")
    p.add_argument("--root", required=True, help="COCO-style folder (annotations/captions_<split>.json)")
    p.add_argument("--split", required=True, help="e.g. train2017, val2017, or train/val for shapes")
    p.add_argument("--out", required=True, help="cache path")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--tokenizer", help="a saved CaptionTokenizer JSON; default: fit one on --fit-split")
    p.add_argument("--fit-split", help="split whose captions define the vocabulary (default: --split)")
    p.add_argument("--min-count", type=int, default=1, help="rarer wordpieces map to UNK")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--on-bad-image", choices=["raise", "skip"], default="raise")
    p.set_defaults(func=_prepare)

    from mvae_course.compare import add_compare_arguments, run_compare
    from mvae_course.course import run_course
    from mvae_course.evaluate import add_evaluate_arguments, run_evaluate
    from mvae_course.train import add_train_arguments, run_train

    p = sub.add_parser("train", help="train a multimodal VAE")
    add_train_arguments(p)
    p.set_defaults(func=run_train)

    p = sub.add_parser("evaluate", help="measure a trained run: coherence, retrieval, caption metrics, IWAE")
    add_evaluate_arguments(p)
    p.set_defaults(func=run_evaluate)

    p = sub.add_parser("compare", help="train every fusion with the same budget and tabulate the metrics")
    add_compare_arguments(p)
    p.set_defaults(func=run_compare)

    from mvae_course.grading.cli import (
        add_exercises_arguments, add_grade_arguments, run_exercises, run_grade,
    )

    p = sub.add_parser("exercises", help="build exercises/ from solutions/, or check it is up to date")
    add_exercises_arguments(p)
    p.set_defaults(func=run_exercises)

    p = sub.add_parser("grade", help="grade submitted exercise notebooks, each in its own kernel")
    add_grade_arguments(p)
    p.set_defaults(func=run_grade)

    p = sub.add_parser("course", help="run the course's main job end to end on the built-in data")
    p.add_argument("--out", default="build", help="where figures and runs go")
    p.add_argument("--preset", default="cpu", help="tiny for a smoke run, cpu for the real thing")
    p.add_argument("--max-steps", type=int, help="override the preset's training budget")
    p.set_defaults(func=run_course)

    p = sub.add_parser("site", help="rebuild the course site (OUT/html) from the lessons `course` executed")
    p.add_argument("--out", default="build", help="the folder `course` wrote into (OUT/notebooks)")
    p.set_defaults(func=_site)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
