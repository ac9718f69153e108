"""A graded question: how to make its inputs, and how to judge a submission's outputs.

A question never trusts the code it judges. `cases(generator)` draws fresh random inputs; the submission
turns them into outputs (in this process for `check`, in the learner's own kernel for `grade`); `judge`
compares the outputs with the package's reference implementation and, when they differ, with known
wrong variants, so the feedback can name the likely mistake instead of only saying "wrong".
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

Case = tuple[Any, ...]
Judge = Callable[[Sequence[Case], Sequence[Any]], "str | None"]


@dataclass(frozen=True)
class Question:
    """One graded question: the function the learner writes and how to check it.

    `cases(generator)` returns the argument tuples the function is called with; `judge(cases, outputs)`
    returns None when the outputs are right, else feedback for the learner.
    """

    id: str
    notebook: str  # the exercise notebook's stem, e.g. "01_elbo_exercises"
    function: str
    title: str
    points: int
    cases: Callable[[torch.Generator], list[Case]]
    judge: Judge


@dataclass
class Verdict:
    """The grade of one question for one submission."""

    question: str
    function: str
    title: str
    points: int
    max_points: int
    feedback: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.points == self.max_points

    def to_dict(self) -> dict[str, Any]:
        return {
            "question": self.question, "function": self.function, "title": self.title, "points": self.points,
            "max_points": self.max_points, "passed": self.passed, "feedback": self.feedback,
        }


class SubmissionError(Exception):
    """The submission could not produce outputs (missing, not attempted, crashed, timed out)."""


def verdict(question: Question, cases: Sequence[Case], outputs: Sequence[Any]) -> Verdict:
    """Judge outputs already computed for `cases`; a judge that itself crashes counts as a wrong answer."""
    try:
        problem = question.judge(cases, outputs)
    except Exception as err:  # e.g. an output of a type the comparison cannot handle
        problem = f"the output could not be checked ({type(err).__name__}: {err}); check its type and shape"
    if problem is None:
        return Verdict(question.id, question.function, question.title, question.points, question.points, "passed")
    return Verdict(question.id, question.function, question.title, 0, question.points, problem)


def failed(question: Question, message: str) -> Verdict:
    """A zero for a submission that produced no outputs, with the reason."""
    return Verdict(question.id, question.function, question.title, 0, question.points, message)


def run_in_process(question: Question, fn: Callable[..., Any], seed: int) -> Verdict:
    """Call `fn` on fresh cases here and judge it: the instant feedback of `check` in a notebook."""
    cases = question.cases(torch.Generator().manual_seed(seed))
    outputs = []
    for i, case in enumerate(cases):
        try:
            outputs.append(fn(*copy.deepcopy(case)))  # a copy: an in-place edit must not change the reference
        except NotImplementedError:
            return failed(question, f"not attempted yet: `{question.function}` raises NotImplementedError")
        except Exception as err:
            return failed(question, f"`{question.function}` raised {type(err).__name__}: {err} (on test case {i + 1})")
    return verdict(question, cases, outputs)


# --- comparing outputs --------------------------------------------------------------------------------


def _shape(x: Tensor) -> str:
    return " x ".join(map(str, x.shape)) or "a scalar"


def compare(output: Any, expected: Any, atol: float = 1e-4, rtol: float = 1e-4, where: str = "output") -> str | None:
    """None when `output` matches `expected` (tensors, numbers, and tuples/lists of them), else what differs.

    Taught in notebooks/02_image_vae.ipynb
    """
    if isinstance(expected, Tensor):
        if not isinstance(output, Tensor):
            return f"{where} should be a tensor, got {type(output).__name__}"
        if output.shape != expected.shape:
            return f"{where} has shape {_shape(output)} but should be {_shape(expected)}"
        if expected.dtype == torch.bool:
            if output.dtype != torch.bool:
                return f"{where} should be a bool tensor, got {output.dtype}"
            wrong = int((output != expected).sum())
            return None if wrong == 0 else f"{where} is wrong at {wrong} of {expected.numel()} positions"
        if expected.dtype.is_floating_point != output.dtype.is_floating_point:
            return f"{where} should have dtype {expected.dtype}, got {output.dtype}"
        out, exp = output.detach().double().cpu(), expected.detach().double().cpu()
        if torch.allclose(out, exp, atol=atol, rtol=rtol, equal_nan=True):
            return None
        if bool(torch.isnan(out).any() | torch.isinf(out).any()) and bool(torch.isfinite(exp).all()):
            return f"{where} contains nan or inf where the answer is finite (a numerically unstable step?)"
        gap = (out - exp).abs().nan_to_num(nan=math.inf).max().item()
        return f"{where} differs from the expected values (largest difference {gap:.3g})"
    if isinstance(expected, (tuple, list)):
        if not isinstance(output, (tuple, list)) or len(output) != len(expected):
            kind = type(expected).__name__
            return f"{where} should be a {kind} of {len(expected)} items, got {type(output).__name__}" + (
                f" of {len(output)}" if isinstance(output, (tuple, list)) else ""
            )
        for i, (o, e) in enumerate(zip(output, expected)):
            problem = compare(o, e, atol, rtol, f"{where}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        if isinstance(output, Tensor) and output.numel() == 1:
            output = output.item()
        if not isinstance(output, (int, float)):
            return f"{where} should be a number, got {type(output).__name__}"
        if isinstance(expected, int) and output != expected:
            return f"{where} is {output} but should be {expected}"
        if not math.isclose(output, expected, rel_tol=rtol, abs_tol=atol):
            return f"{where} is {output:.6g} but should be {expected:.6g}"
        return None
    return None if output == expected else f"{where} is {output!r} but should be {expected!r}"


def compare_all(outputs: Sequence[Any], expected: Sequence[Any], atol: float = 1e-4, rtol: float = 1e-4) -> str | None:
    """The first case whose output differs, described, or None when all match."""
    for i, (o, e) in enumerate(zip(outputs, expected)):
        problem = compare(o, e, atol, rtol)
        if problem:
            return f"test case {i + 1}: {problem}"
    return None


Mistake = tuple[str, Callable[..., Any]]
Property = Callable[[Sequence[Case], Sequence[Any]], "str | None"]


@dataclass(frozen=True)
class ReferenceJudge:
    """Compares with `reference(*case)`; on a mismatch it names the first known mistake (message, wrong
    implementation) whose outputs the submission reproduces.

    `properties` are extra checks on right-looking outputs (e.g. "KL is never negative"). Wrong variants
    must be deterministic: a random one can never be matched.
    """

    reference: Callable[..., Any]
    mistakes: Sequence[Mistake] = ()
    properties: Sequence[Property] = ()
    hint: str = ""  # added to the generic "differs" feedback when no known mistake matches
    atol: float = 1e-4
    rtol: float = 1e-4

    def __call__(self, cases: Sequence[Case], outputs: Sequence[Any]) -> str | None:
        expected = [self.reference(*copy.deepcopy(case)) for case in cases]
        problem = compare_all(outputs, expected, self.atol, self.rtol)
        if problem is None:
            for prop in self.properties:
                problem = prop(cases, outputs)
                if problem:
                    return problem
            return None
        for message, wrong in self.mistakes:
            try:
                wrong_outputs = [wrong(*copy.deepcopy(case)) for case in cases]
            except Exception:  # a variant that cannot run on these inputs is not the learner's mistake
                continue
            if compare_all(outputs, wrong_outputs, self.atol, self.rtol) is None:
                return message
        return f"{problem}; {self.hint}" if self.hint else problem
