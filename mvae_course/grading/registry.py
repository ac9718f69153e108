"""Every graded question of the course, by id and by exercise notebook, and `check` for instant feedback."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from mvae_course.grading import (
    coco_data_checks,
    elbo_checks,
    evaluation_checks,
    failure_checks,
    fusion_checks,
    image_checks,
    text_checks,
    training_checks,
)
from mvae_course.grading.question import Question, run_in_process

CHECKS = (elbo_checks, image_checks, text_checks, fusion_checks, failure_checks, coco_data_checks,
          training_checks, evaluation_checks)
NOTEBOOKS: dict[str, list[Question]] = {module.NOTEBOOK: module.QUESTIONS for module in CHECKS}
QUESTIONS: dict[str, Question] = {q.id: q for questions in NOTEBOOKS.values() for q in questions}


def question(question_id: str) -> Question:
    """The question with this id, e.g. "q3" (or "Q3": ids are case-insensitive); a clear error for an unknown id."""
    key = str(question_id).strip().lower()
    if key not in QUESTIONS:
        raise KeyError(f"no question {question_id!r}; the course has q1 to q{len(QUESTIONS)} (Q1 is q1)")
    return QUESTIONS[key]


def check(question_id: str, fn: Callable[..., Any]) -> None:
    """Run question `question_id`'s checks on your function now and print friendly feedback.

    Taught in notebooks/00_setup.ipynb

    Fresh random inputs every call. This is feedback, not the grade: `python -m mvae_course grade`
    runs the same checks in a process your notebook cannot touch.
    """
    q = question(question_id)
    v = run_in_process(q, fn, seed=secrets.randbits(31))
    if v.pending:
        print(f"{q.id} {q.title} ({q.function}): answer recorded; {v.feedback}")
        return
    mark = "passed" if v.passed else "not yet"
    print(f"{q.id} {q.title} ({q.function}): {mark}, {v.points}/{v.max_points} points")
    if not v.passed:
        print(f"  {v.feedback}")
