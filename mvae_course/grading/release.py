"""What learners get: `python -m mvae_course exercises release OUT`, as nbgrader's release step does.

A release holds the lessons (notebooks/), the exercises (exercises/, answers replaced by stubs), the
package and the files that install it, and no reference answers. The answers are written down in one
place, solutions/, which stays in the instructor's tree. The grader runs there: it judges with the
package's own reference implementations (functions the lessons teach, which learners have anyway), in
its own process, never with anything from a learner's tree or kernel.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat

from mvae_course.grading.exercises import BEGIN, END, REPO, stale_exercises

RELEASED_FILES = ("README.md", "pyproject.toml", "environment.yml", "Makefile")
RELEASED_TREES = (("notebooks", "*.ipynb"), ("exercises", "*.ipynb"), ("mvae_course", "*.py"))


def release_files(repo: Path = REPO) -> list[Path]:
    """The files of `repo` a release copies, relative to it."""
    repo = Path(repo)
    files = [Path(name) for name in RELEASED_FILES if (repo / name).is_file()]
    for folder, pattern in RELEASED_TREES:
        found = (p for p in (repo / folder).rglob(pattern) if "__pycache__" not in p.parts)
        files += sorted(p.relative_to(repo) for p in found)
    return files


def _answer_lines(path: Path) -> list[str]:
    """Where a notebook still holds a solution block (its marker lines), as "file, cell N" strings."""
    nb = nbformat.read(path, as_version=4)
    return [f"{path}, cell {i + 1}" for i, cell in enumerate(nb.cells)
            if any(line.strip() in (BEGIN, END) for line in cell.source.splitlines())]


def release(out: Path, repo: Path = REPO) -> list[Path]:
    """Write the learners' copy of `repo` to `out` (a new or empty folder); returns the files written.

    Refuses, naming the files, when exercises/ is out of date with solutions/ or a notebook to be
    released still holds a solution block.
    """
    repo, out = Path(repo), Path(out)
    stale = stale_exercises(repo / "solutions", repo / "exercises")
    if stale:
        raise ValueError("; ".join(stale) + ": run `python -m mvae_course exercises build` before releasing")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty folder; release into a new one")
    files = release_files(repo)
    leaks = [hit for f in files if f.suffix == ".ipynb" for hit in _answer_lines(repo / f)]
    if leaks:
        raise ValueError(f"solution blocks would be released: {'; '.join(leaks)}")
    written = []
    for f in files:
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / f, out / f)
        written.append(out / f)
    return written
