"""`exercises release OUT`: what learners get holds the lessons, the exercises and the package, no answers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from mvae_course.cli import main
from mvae_course.grading.exercises import BEGIN, END, build_exercises
from mvae_course.grading.release import release

ROOT = Path(__file__).resolve().parents[1]


def test_release_has_lessons_exercises_and_package_but_no_answers(tmp_path, capsys):
    out = tmp_path / "handout"
    assert main(["exercises", "release", str(out)]) == 0, capsys.readouterr().err
    assert not (out / "solutions").exists() and not (out / "tests").exists()
    for folder in ("notebooks", "exercises"):
        names = sorted(p.name for p in (out / folder).glob("*.ipynb"))
        assert names == sorted(p.name for p in (ROOT / folder).glob("*.ipynb")) and names
    for path in (out / "exercises").glob("*.ipynb"):
        assert path.read_bytes() == (ROOT / "exercises" / path.name).read_bytes()
    for path in out.rglob("*.ipynb"):  # no solution block anywhere, nor a solution notebook's answer
        assert BEGIN not in path.read_text(), path
    assert (out / "mvae_course/grading/registry.py").is_file() and (out / "pyproject.toml").is_file()
    assert not list(out.rglob("__pycache__"))
    # the learners' copy imports on its own (the light modules: torch would only slow the test)
    env = {**os.environ, "PYTHONPATH": str(out)}
    probe = "import mvae_course.grading.exercises as e; print(e.__file__)"
    done = subprocess.run([sys.executable, "-c", probe], env=env, cwd=out, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith(str(out)), done.stderr


def test_release_refuses_stale_exercises_leaks_and_used_folders(tmp_path, capsys):
    repo = tmp_path / "course"
    for folder in ("solutions", "exercises", "notebooks"):
        shutil.copytree(ROOT / folder, repo / folder)
    (repo / "mvae_course").mkdir()
    (repo / "mvae_course/__init__.py").write_text("")

    nb = nbformat.read(repo / "solutions/01_elbo_exercises.ipynb", as_version=4)
    nb.cells[0].source += "\n\nEdited."
    nbformat.write(nb, repo / "solutions/01_elbo_exercises.ipynb")
    with pytest.raises(ValueError, match="01_elbo_exercises.ipynb: out of date"):
        release(tmp_path / "a", repo)

    build_exercises(repo / "solutions", repo / "exercises")
    lesson = nbformat.read(repo / "notebooks/01_elbo.ipynb", as_version=4)
    lesson.cells.append(nbformat.v4.new_code_cell(f"def f():\n    {BEGIN}\n    return 1\n    {END}"))
    nbformat.write(lesson, repo / "notebooks/01_elbo.ipynb")
    with pytest.raises(ValueError, match=r"solution blocks would be released: .*01_elbo.ipynb, cell"):
        release(tmp_path / "b", repo)

    (tmp_path / "used").mkdir()
    (tmp_path / "used/x").write_text("")
    assert main(["exercises", "release", str(tmp_path / "used")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["exercises", "release"]) == 2
    assert "needs OUT" in capsys.readouterr().err
