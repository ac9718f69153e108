"""The `exercises` and `grade` commands (wired into `python -m mvae_course` by mvae_course/cli.py).

    python -m mvae_course exercises build     # write exercises/ from solutions/
    python -m mvae_course exercises check     # fail, naming the files, when exercises/ is stale
    python -m mvae_course exercises release OUT   # what learners get: no solutions/
    python -m mvae_course grade exercises/01_elbo_exercises.ipynb --json grades.json

Heavy modules (torch, nbclient) are imported inside the commands, so building the parser is instant.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def add_exercises_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `exercises {build,check,release OUT}`."""
    parser.add_argument("action", choices=["build", "check", "release"],
                        help="build: write exercises/; check: fail if stale; "
                             "release: write what learners get to OUT")
    parser.add_argument("out", nargs="?", type=Path, help="release: a new folder for the learners' copy")
    parser.add_argument("--solutions", type=Path, help="solution notebooks, the source (default: solutions/)")
    parser.add_argument("--exercises", type=Path, help="generated exercise notebooks (default: exercises/)")


def run_exercises(args: argparse.Namespace) -> int:
    """Build, check or release exercises/; returns the exit status (1 when `check` finds stale files, 2
    when a release is refused)."""
    from mvae_course.grading.exercises import EXERCISES, SOLUTIONS, build_exercises, stale_exercises
    from mvae_course.grading.release import release

    args.solutions, args.exercises = args.solutions or SOLUTIONS, args.exercises or EXERCISES
    if args.action == "release":
        if args.out is None:
            print("error: exercises release needs OUT, a new folder for the learners' copy", file=sys.stderr)
            return 2
        try:
            written = release(args.out, args.solutions.parent)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {len(written)} files to {args.out} (lessons, exercises, the package; no solutions/)")
        return 0
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


def _seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _jobs(text: str) -> int:
    """An argparse type: a whole number, at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def add_grade_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `grade PATH... [--json OUT] [--csv OUT]`."""
    parser.add_argument("paths", nargs="+", type=Path, help="submitted exercise notebooks (.ipynb)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON, for a gradebook")
    parser.add_argument("--csv", type=Path, help="also write one row per submission and question, for an LMS")
    parser.add_argument("--timeout", type=_seconds, default=60, help="seconds allowed for each notebook cell")
    parser.add_argument("--call-timeout", type=_seconds,
                        help="seconds for each graded function (default: --timeout)")
    parser.add_argument("--notebook-timeout", type=_seconds, default=900,
                        help="seconds for a whole notebook, after which its kernel is killed")
    parser.add_argument("--jobs", type=_jobs, default=2,
                        help="notebooks graded at once, each in its own kernel")
    parser.add_argument("--seed", type=int, help="seed of the random test inputs (default: fresh each run)")
    parser.add_argument("--sandbox", choices=["auto", "bwrap", "none"], default="auto",
                        help="auto: bubblewrap where it works, else resource limits only (with a warning); "
                             "bwrap: fail where it does not work; none: limits only")


def run_grade(args: argparse.Namespace) -> int:
    """Grade the notebooks, print the table, write the gradebooks asked for. Returns 0 when every file
    was graded, 2 when some could not be (they are named, and get 0 points, in the report and gradebooks)."""
    from mvae_course.grading.grader import (
        format_report, grade_notebooks, one_line, write_gradebook, write_gradebook_csv,
    )
    from mvae_course.grading.sandbox import SandboxError, SandboxWarning, confinement

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SandboxWarning)  # the report and stderr say it, once
            grades = grade_notebooks(
                args.paths, seed=args.seed, timeout=args.timeout, call_timeout=args.call_timeout,
                jobs=args.jobs, notebook_timeout=args.notebook_timeout, sandbox=args.sandbox,
            )
    except SandboxError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    confined = confinement(args.sandbox)  # every kernel is gone by now: the gradebooks cannot be overwritten
    if confined.missing:
        print(f"warning: {confined.warning()}", file=sys.stderr)
    print(format_report(grades), end="")
    if args.json:
        write_gradebook(grades, args.json, confined)
        print(f"wrote {args.json}")
    if args.csv:
        write_gradebook_csv(grades, args.csv)
        print(f"wrote {args.csv}")
    problems = [g.problem for g in grades if g.problem]
    for problem in problems:
        print(f"error: {one_line(problem, 1000)}", file=sys.stderr)
    return 2 if problems else 0
