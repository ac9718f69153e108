"""Diagnose questions: a run's files or an evaluation report, made here, healthy or broken, and a judge
that marks the learner's (failure, remedy) against what the grader broke.

The files look like what `train` writes: `metrics.csv` (step, epoch, split, the loss terms, lr, beta,
samples_per_s; validation rows leave lr, beta and samples_per_s empty) and `config.json`. Every number is
drawn afresh, so an answer must read the run, not remember it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mvae_course.grading.kernel import FOLDER
from mvae_course.grading.question import Case, Marks, describe

TRAIN_ONLY = ("lr", "beta", "samples_per_s")


def folder(files: Mapping[str, str]) -> dict[str, Any]:
    """A case argument the submission receives as a folder (a pathlib.Path) holding these text files."""
    return {FOLDER: dict(files)}


def run_folder(rows: Sequence[Mapping[str, Any]], config: Mapping[str, Any]) -> dict[str, Any]:
    """A run folder: metrics.csv from `rows` (in train.py's column order) and config.json."""
    terms = [k for k in rows[0] if k not in ("step", "epoch", "split", *TRAIN_ONLY)]
    fields = ["step", "epoch", "split", *terms, *TRAIN_ONLY]
    out = io.StringIO()
    writer = csv.DictWriter(out, fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    return folder({"metrics.csv": out.getvalue(), "config.json": json.dumps(config, indent=2) + "\n"})


def _cell(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else v


def curve(g: torch.Generator, n: int, start: float, end: float, rate: float = 4.0, noise: float = 0.02) -> list[float]:
    """n values moving from `start` towards `end` like 1 - exp(-rate t), with relative noise."""
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    clean = end + (start - end) * torch.exp(-rate * t)
    jitter = 1 + noise * torch.randn(n, generator=g, dtype=torch.float64)
    return (clean * jitter).tolist()


def diverge(g: torch.Generator, loss: list[float], final: float = math.nan) -> list[float]:
    """A loss that blows up: tenfold per row from a random row in the second half, `final` (nan or inf)
    in the last two rows, as when the optimisation diverges."""
    n = len(loss)
    start = int(torch.randint(n // 2, n - 6, (), generator=g))
    return loss[:start] + [final if i >= n - 2 else loss[start - 1] * 10 ** (i - start + 1) for i in range(start, n)]


def uniform(g: torch.Generator, low: float, high: float) -> float:
    """One number drawn uniformly from [low, high)."""
    return low + (high - low) * float(torch.rand((), generator=g, dtype=torch.float64))


def shuffled(g: torch.Generator, cases: list[Case]) -> list[Case]:
    """The cases in a random order, so that an answer cannot rely on their position."""
    return [cases[i] for i in torch.randperm(len(cases), generator=g).tolist()]


@dataclass(frozen=True)
class DiagnosisJudge:
    """Each case's truth is (failure, acceptable remedies). Half a case for the failure, half for a remedy
    that fixes it. `failures` maps each failure name to what to look at when it is missed."""

    failures: Mapping[str, str]
    remedies: Sequence[str]

    def __call__(self, cases: Sequence[Case], outputs: Sequence[Any]) -> Marks:
        right, problems = 0.0, []
        for i, (c, out) in enumerate(zip(cases, outputs)):
            failure, remedies = c.truth
            where = f"case {i + 1} ({describe(c)})"
            if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(x, str) for x in out)):
                problems.append(f"{where}: return (failure, remedy), two strings, got {out!r:.80}")
                continue
            said, fix = out
            if said not in self.failures:
                problems.append(f"{where}: {said!r} is not a failure name; choose one of {', '.join(self.failures)}")
            elif said != failure:
                problems.append(f"{where}: it is not {said!r}; {self.failures[failure]}")
            else:
                right += 0.5
            if fix not in self.remedies:
                problems.append(f"{where}: {fix!r} is not a remedy name; choose one of {', '.join(self.remedies)}")
            elif fix in remedies:
                right += 0.5
            elif said == failure:
                problems.append(f"{where}: the failure is right, but {fix!r} does not remedy it")
        n = len(cases)
        if not problems:
            return Marks(n, n)
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return Marks(right, n, f"{problems[0]}{more}")
