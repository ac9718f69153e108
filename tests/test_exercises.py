"""exercises/ is generated from solutions/, stays in step with it, and matches the graded questions."""

from __future__ import annotations

import argparse
import inspect
import re
import shutil
from pathlib import Path

import nbformat
import pytest

from mvae_course.cli import main
from mvae_course.grading.cli import run_exercises
from mvae_course.grading.exercises import (
    BEGIN,
    END,
    RUBRIC,
    build_exercises,
    stale_exercises,
    strip_solutions,
)
from mvae_course.grading.registry import NOTEBOOKS

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))


def test_exercises_are_up_to_date_with_solutions(capsys):
    """`python -m mvae_course exercises check`, in-process: fails when someone edits solutions/ only."""
    assert main(["exercises", "check"]) == 0, capsys.readouterr().err


def test_check_names_stale_missing_and_orphan_files(tmp_path, capsys):
    solutions, exercises = tmp_path / "solutions", tmp_path / "exercises"
    shutil.copytree(ROOT / "solutions", solutions)
    build_exercises(solutions, exercises)
    args = argparse.Namespace(action="check", solutions=solutions, exercises=exercises)
    assert run_exercises(args) == 0

    nb = nbformat.read(solutions / "03_text_exercises.ipynb", as_version=4)
    nb.cells[0].source += "\n\nOne more sentence."
    nbformat.write(nb, solutions / "03_text_exercises.ipynb")
    (exercises / "01_elbo_exercises.ipynb").unlink()
    shutil.copy(exercises / "02_image_exercises.ipynb", exercises / "99_old_exercises.ipynb")
    capsys.readouterr()
    assert run_exercises(args) == 1
    err = capsys.readouterr().err
    assert "03_text_exercises.ipynb: out of date" in err
    assert "01_elbo_exercises.ipynb: missing" in err
    assert "99_old_exercises.ipynb: has no solution notebook" in err

    build_exercises(solutions, exercises)
    assert stale_exercises(solutions, exercises) == []
    assert not (exercises / "99_old_exercises.ipynb").exists()


def test_strip_solutions_keeps_hints_and_indentation():
    source = "\n".join([
        "def f(x):",
        "    # Hint: double it",
        f"    {BEGIN}",
        "    y = 2 * x",
        "    return y",
        f"    {END}",
        "",
        "def g(x):",
        "    for i in range(3):",
        f"        {BEGIN}",
        "        x += i",
        f"        {END}",
        "    return x",
    ])
    stub = strip_solutions(source)
    assert "2 * x" not in stub and "x += i" not in stub and "SOLUTION" not in stub
    assert "    # Hint: double it\n    # YOUR CODE HERE\n    raise NotImplementedError()" in stub
    assert "        # YOUR CODE HERE\n        raise NotImplementedError()\n    return x" in stub
    ns: dict = {}
    exec(stub, ns)
    with pytest.raises(NotImplementedError):
        ns["f"](1)


@pytest.mark.parametrize("bad, message", [
    (f"{BEGIN}\nx = 1", "never closed"),
    (f"x = 1\n{END}", "without a"),
    (f"{BEGIN}\n{BEGIN}\n{END}", "inside another"),
])
def test_strip_solutions_rejects_broken_markers(bad, message):
    with pytest.raises(ValueError, match=message):
        strip_solutions(bad, "solutions/x.ipynb, cell 3")


def _is_rubric(cell: nbformat.NotebookNode) -> bool:
    return RUBRIC in cell.metadata.get("tags", [])


@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_exercise_notebook_is_the_solution_without_answers(path):
    solution = nbformat.read(path, as_version=4)
    exercise = nbformat.read(ROOT / "exercises" / path.name, as_version=4)
    kept = [cell for cell in solution.cells if not _is_rubric(cell)]
    assert len(exercise.cells) == len(kept)
    for sol, ex in zip(kept, exercise.cells):
        if ex.cell_type == "code":
            assert ex.outputs == [] and ex.execution_count is None
            assert "SOLUTION" not in ex.source
            assert sol.source.count(BEGIN) == ex.source.count("raise NotImplementedError()")
            hints = [line for line in sol.source.splitlines() if line.strip().startswith("# Hint")]
            assert all(h in ex.source for h in hints)
        else:
            assert ex.source == sol.source
    # Every stub raises until the learner writes it.
    ns: dict = {}
    for cell in exercise.cells:
        if cell.cell_type == "code" and not cell.source.startswith("check("):
            exec(cell.source, ns)
    for q in NOTEBOOKS[exercise.metadata["mvae_course"]["exercises"]]:
        fn = ns[q.function]
        required = [p for p in inspect.signature(fn).parameters.values() if p.default is p.empty]
        with pytest.raises(NotImplementedError):
            fn(*[None] * len(required))


def test_written_answers_have_a_rubric_that_learners_never_see():
    for path in SOLUTIONS:
        solution = nbformat.read(path, as_version=4)
        exercise = nbformat.read(ROOT / "exercises" / path.name, as_version=4)
        learner_text = "\n".join(cell.source for cell in exercise.cells)
        rubrics = [cell.source for cell in solution.cells if _is_rubric(cell)]
        written = [q for q in NOTEBOOKS[path.stem] if q.kind == "written"]
        assert len(rubrics) == len(written), path.name  # one rubric beside each model answer
        for rubric in rubrics:
            assert rubric.startswith("**Rubric") and rubric not in learner_text
            assert all(line not in learner_text for line in rubric.splitlines()[1:] if len(line) > 20)
        for q in written:  # the model answer is a solution block: the exercise keeps only the stub
            answer = next(c.source for c in solution.cells if f"def {q.function}(" in c.source)
            assert answer.split(BEGIN)[1].strip().splitlines()[1] not in learner_text


def test_solution_notebooks_cover_every_question_with_a_check_cell():
    assert len(SOLUTIONS) >= 8
    seen = {}
    for path in SOLUTIONS:
        nb = nbformat.read(path, as_version=4)
        name = nb.metadata["mvae_course"]["exercises"]
        assert name == path.stem and name in NOTEBOOKS
        for cell in nb.cells:
            m = re.fullmatch(r'check\("(q\d+)", (\w+)\)', cell.source.strip())
            if m:
                seen[m.group(1)] = (name, m.group(2))
    expected = {q.id: (name, q.function) for name, qs in NOTEBOOKS.items() for q in qs}
    assert seen == expected
