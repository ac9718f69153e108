"""A graded question: how to make its inputs, and how to mark a submission's outputs.

A question never trusts the code it marks. `cases(generator)` draws fresh inputs; the submission turns
them into outputs (in this process for `check`, in the learner's own kernel for `grade`); `judge` marks
every case against a reference written in the checks module and, where cases are wrong, names a known
mistake the outputs reproduce, so the feedback points at the mistake instead of only saying "wrong".
Points are partial: the question's points times the fraction of its cases that are right. Before any of
that, an answer that is the package's own implementation (imported, called or copied; see
`integrity.py`) scores 0.

Kinds of question: "implement" (write what a lesson built), "derive" (a closed form, as a function called
on fresh inputs or a number), "diagnose" (name a failure and its remedy from a run's files), "data" (find
the bad entries of a COCO-style folder) and "written" (a few sentences, graded by the instructor: reported
as pending, never scored here).
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mvae_course.grading import integrity
from mvae_course.grading.kernel import function_info, rebuild

KINDS = ("implement", "derive", "diagnose", "data", "written")


@dataclass(frozen=True)
class Case:
    """The arguments of one call, a label that names an edge case in feedback, and (for judges that need
    it) the truth, which never leaves this process."""

    args: tuple[Any, ...]
    label: str = ""
    truth: Any = None

    def __iter__(self):
        return iter(self.args)


def case(*args: Any, label: str = "", truth: Any = None) -> Case:
    """Case(args, label, truth) with the arguments written out."""
    return Case(args, label, truth)


@dataclass(frozen=True)
class Marks:
    """How the outputs did: `right` of `total` cases (a diagnosis can be half right), and feedback."""

    right: float
    total: int
    feedback: str = ""


Judge = Callable[[Sequence[Case], Sequence[Any]], Marks]


@dataclass(frozen=True)
class Question:
    """One graded question: the function the learner writes and how to mark it.

    `forbidden`: dotted paths of the package objects that implement the answer; an answer that uses one
    scores 0. `min_words` only matters for written questions.
    """

    id: str
    notebook: str  # the exercise notebook's stem, e.g. "01_elbo_exercises"
    function: str
    title: str
    points: float
    kind: str
    cases: Callable[[torch.Generator], list[Case]]
    judge: Judge | None  # None for a written question
    forbidden: tuple[str, ...] = ()
    min_words: int = 25

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"question {self.id}: kind must be one of {KINDS}, got {self.kind!r}")
        if (self.judge is None) != (self.kind == "written"):
            raise ValueError(f"question {self.id}: a written question has no judge, every other kind has one")


@dataclass
class Verdict:
    """The grade of one question for one submission; a written answer is `pending` the instructor's grade."""

    question: str
    function: str
    title: str
    points: float
    max_points: float
    feedback: str
    pending: bool = False
    answer: str | None = None  # a written answer's text, for the instructor

    @property
    def passed(self) -> bool:
        return self.points == self.max_points and not self.pending

    def to_dict(self) -> dict[str, Any]:
        out = {
            "question": self.question, "function": self.function, "title": self.title, "points": self.points,
            "max_points": self.max_points, "passed": self.passed, "pending": self.pending, "feedback": self.feedback,
        }
        return out if self.answer is None else {**out, "answer": self.answer}


class SubmissionError(Exception):
    """The submission could not produce outputs (missing, not attempted, crashed, timed out)."""


def _points(question: Question, fraction: float) -> float:
    """Partial points, to the hundredth, as an int when whole (2, not 2.0)."""
    points = round(question.points * fraction, 2)
    return int(points) if points == int(points) else points


def failed(question: Question, message: str) -> Verdict:
    """A zero for a submission that produced no usable outputs, with the reason."""
    return Verdict(question.id, question.function, question.title, 0, question.points, message)


def _written(question: Question, answer: Any) -> Verdict:
    if not isinstance(answer, str):
        return failed(question, f"`{question.function}` must return your answer as a string, got {type(answer).__name__}")
    words = len(answer.split())
    if words < question.min_words:
        return failed(question, f"your answer has {words} words; write at least {question.min_words} (a few sentences)")
    return Verdict(question.id, question.function, question.title, 0, question.points,
                   f"pending: graded by the instructor against the rubric ({words} words)", pending=True,
                   answer=answer)


def verdict(
    question: Question,
    cases: Sequence[Case],
    outputs: Sequence[Any],
    info: dict[str, Any] | None = None,
    code: Sequence[str] | None = None,
) -> Verdict:
    """Mark outputs already computed for `cases`.

    info: what `kernel.function_info` reported about the submitted function; code: the source of each cell
    of the submitted notebook. With either, an answer that is the package's own implementation scores 0.
    A judge that itself crashes counts as a wrong answer.
    """
    problem = (integrity.static_problem(code, question.function, question.forbidden) if code is not None else None) or (
        integrity.dynamic_problem(info, question.function, question.forbidden) if info is not None else None)
    if problem:
        return failed(question, f"scored 0: {problem}")
    if question.judge is None:
        return _written(question, outputs[0])
    try:
        marks = question.judge(cases, outputs)
    except Exception as err:  # e.g. an output of a type the comparison cannot handle
        marks = Marks(0, len(cases), f"the output could not be checked ({type(err).__name__}: {err}); "
                                     "check its type and shape")
    feedback = marks.feedback or "passed"
    return Verdict(question.id, question.function, question.title, _points(question, marks.right / marks.total),
                   question.points, feedback)


def call_in_process(fn: Callable[..., Any], cases: Sequence[Case]) -> list[Any]:
    """fn on every case, here: folders written to a temporary directory, arguments copied (an in-place edit
    must not change them for the reference). Raises SubmissionError naming the case that failed."""
    outputs = []
    with tempfile.TemporaryDirectory(prefix="mvae-check-") as tmp:
        for i, c in enumerate(cases):
            args = [rebuild(copy.deepcopy(a), Path(tmp) / f"{i}-{j}") for j, a in enumerate(c)]
            try:
                outputs.append(fn(*args))
            except NotImplementedError as err:
                raise SubmissionError("not attempted yet: it raises NotImplementedError") from err
            except Exception as err:
                raise SubmissionError(f"raised {type(err).__name__}: {err} (on test case {i + 1})") from err
    return outputs


def run_in_process(question: Question, fn: Callable[..., Any], seed: int) -> Verdict:
    """Call `fn` on fresh cases here and mark it: the instant feedback of `check` in a notebook."""
    problem = integrity.dynamic_problem(function_info(fn), question.function, question.forbidden)
    if problem:  # before calling it: the package's function may not even take the question's arguments
        return failed(question, f"scored 0: {problem}")
    cases = question.cases(torch.Generator().manual_seed(seed))
    try:
        outputs = call_in_process(fn, cases)
    except SubmissionError as err:
        return failed(question, f"`{question.function}` {err}")
    return verdict(question, cases, outputs)


# --- comparing outputs --------------------------------------------------------------------------------


def shape(x: Tensor) -> str:
    """'3 x 4' for a 3 x 4 tensor, 'a scalar' for a 0-d one."""
    return " x ".join(map(str, x.shape)) or "a scalar"


def describe(c: Case) -> str:
    """What the feedback calls a case: its label, else the shapes and values of its arguments."""
    if c.label:
        return c.label

    def one(a: Any) -> str:
        if isinstance(a, Tensor):
            return f"a {shape(a)} tensor" if a.dim() else f"the scalar {a.item():.4g}"
        if isinstance(a, torch.nn.Module):
            return "a model"
        if isinstance(a, dict):
            return "a folder"
        return repr(a) if len(repr(a)) < 40 else type(a).__name__

    return "inputs: " + ", ".join(one(a) for a in c.args) if c.args else "no inputs"


def _number(v: float) -> str:
    return f"{v:.6g}"


def compare(output: Any, expected: Any, atol: float = 1e-4, rtol: float = 1e-4, where: str = "output") -> str | None:
    """None when `output` matches `expected` (tensors, numbers, strings, None, and tuples/lists of them),
    else what differs, with the expected and the submitted value at the worst position."""
    if isinstance(expected, Tensor):
        if not isinstance(output, Tensor):
            return f"{where} should be a tensor, got {type(output).__name__}"
        if output.shape != expected.shape:
            return f"{where} has shape {shape(output)} but should be {shape(expected)}"
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
        gap = (out - exp).abs().nan_to_num(nan=math.inf)
        flat = int(gap.argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), exp.shape)) if exp.dim() else ()
        at = f" at {list(index)}" if index else ""
        return (f"{where}{at} is {_number(out.flatten()[flat].item())} but should be "
                f"{_number(exp.flatten()[flat].item())}")
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
        if isinstance(output, bool) or not isinstance(output, (int, float)):
            return f"{where} should be a number, got {type(output).__name__}"
        if isinstance(expected, int) and output != expected:
            return f"{where} is {output} but should be {expected}"
        if not math.isclose(output, expected, rel_tol=rtol, abs_tol=atol):
            return f"{where} is {_number(output)} but should be {_number(expected)}"
        return None
    return None if output == expected else f"{where} is {output!r} but should be {expected!r}"


Mistake = tuple[str, Callable[..., Any]]


@dataclass(frozen=True)
class ReferenceJudge:
    """Marks each case against `reference(*case)`; when cases are wrong it names the first known mistake
    (message, wrong implementation) whose outputs the submission reproduces on every case.

    Wrong variants must be deterministic: a random one can never be matched. A variant may agree with the
    reference on some cases (a tie-breaking slip shows only on ties); it is named when it matches all.
    """

    reference: Callable[..., Any]
    mistakes: Sequence[Mistake] = ()
    hint: str = ""  # added to the feedback when no known mistake matches
    atol: float = 1e-4
    rtol: float = 1e-4

    def __call__(self, cases: Sequence[Case], outputs: Sequence[Any]) -> Marks:
        expected = call_in_process(self.reference, cases)
        problems = [compare(o, e, self.atol, self.rtol) for o, e in zip(outputs, expected)]
        wrong = [i for i, p in enumerate(problems) if p]
        n = len(cases)
        if not wrong:
            return Marks(n, n)
        first = wrong[0]
        summary = (f"{len(wrong)} of {n} test cases wrong; case {first + 1} ({describe(cases[first])}): "
                   f"{problems[first]}")
        for message, variant in self.mistakes:
            try:
                variant_outputs = call_in_process(variant, cases)
            except SubmissionError:  # a variant that cannot run on these inputs is not the learner's mistake
                continue
            if all(compare(o, v, self.atol, self.rtol) is None for o, v in zip(outputs, variant_outputs)):
                return Marks(n - len(wrong), n, f"{message} ({summary})")
        return Marks(n - len(wrong), n, f"{summary}; {self.hint}" if self.hint else summary)


def no_inputs(generator: torch.Generator) -> list[Case]:
    """The one case of a question whose function takes no arguments (a number, a written answer)."""
    return [case()]
