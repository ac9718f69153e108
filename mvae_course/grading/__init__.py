"""Graded exercises and the autograder.

- `check(question_id, fn)`: instant feedback on one exercise, in the notebook.
- `python -m mvae_course grade PATH...`: the grade, each notebook run in its own sandboxed kernel
  (sandbox.py, confine.py) and judged here (grader.py).
- `python -m mvae_course exercises build|check`: exercises/ generated from solutions/.
- `python -m mvae_course exercises release OUT`: what learners get, without solutions/ (release.py).
"""

from __future__ import annotations

from typing import Any


def check(question_id: str, fn: Any) -> None:
    """Run question `question_id`'s checks on your function `fn` and print feedback (see registry.check).

    Taught in notebooks/00_setup.ipynb
    """
    # Imported here so that `python -m mvae_course --help` does not wait for torch.
    from mvae_course.grading.registry import check as check_now

    check_now(question_id, fn)
