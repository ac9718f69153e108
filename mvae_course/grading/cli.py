"""The `exercises` and `grade` commands (wired into `python -m mvae_course` by mvae_course/cli.py).

    python -m mvae_course exercises build     # write exercises/ from solutions/
    python -m mvae_course exercises check     # fail, naming the files, when exercises/ is stale
    python -m mvae_course grade exercises/01_elbo_exercises.ipynb --json grades.json

Heavy modules (torch, nbclient) are imported inside the commands, so building the parser is instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_exercises_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `exercises {build,check}`."""
    parser.add_argument("action", choices=["build", "check"], help="build: write exercises/; check: fail if stale")
    parser.add_argument("--solutions", type=Path, help="solution notebooks, the source (default: solutions/)")
    parser.add_argument("--exercises", type=Path, help="generated exercise notebooks (default: exercises/)")


def run_exercises(args: argparse.Namespace) -> int:
    """Build or check exercises/; returns the exit status (1 when `check` finds stale files)."""
    from mvae_course.grading.exercises import EXERCISES, SOLUTIONS, build_exercises, stale_exercises

    args.solutions, args.exercises = args.solutions or SOLUTIONS, args.exercises or EXERCISES
    if args.action == "build":
        for path in build_exercises(args.solutions, args.exercises):
            print(f"wrote {path}")
        return 0
    problems = stale_exercises(args.solutions, args.exercises)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print("exercises/ is out of date: run `python -m mvae_course exercises build`", file=sys.stderr)
        return 1
    print(f"{args.exercises} is up to date with {args.solutions}")
    return 0


def add_grade_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `grade PATH... [--json OUT]`."""
    parser.add_argument("paths", nargs="+", type=Path, help="submitted exercise notebooks (.ipynb)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON, for a gradebook")
    parser.add_argument("--timeout", type=float, default=60, help="seconds allowed for each notebook cell")
    parser.add_argument("--call-timeout", type=float, help="seconds for each graded function (default: --timeout)")
    parser.add_argument("--jobs", type=int, default=2, help="notebooks graded at once, each in its own kernel")
    parser.add_argument("--seed", type=int, help="seed of the random test inputs (default: fresh each run)")


def run_grade(args: argparse.Namespace) -> int:
    """Grade the notebooks, print the table, optionally write JSON. Returns 0 when grading completed."""
    from mvae_course.grading.grader import format_report, grade_notebooks, write_gradebook

    try:
        grades = grade_notebooks(
            args.paths, seed=args.seed, timeout=args.timeout, call_timeout=args.call_timeout, jobs=args.jobs
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(grades), end="")
    if args.json:
        write_gradebook(grades, args.json)
        print(f"wrote {args.json}")
    return 0

