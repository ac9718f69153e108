"""exercises/ is generated from solutions/: every solution block becomes a stub, rubric cells are dropped,
outputs are cleared.

In a solution notebook the answer sits between two marker lines inside a function body:

    def kl_normal(mu_q, logvar_q, mu_p, logvar_p):
        # hint: ...
        ### BEGIN SOLUTION
        ...
        ### END SOLUTION

The exercise keeps everything else (hints included) and replaces the block with `# YOUR CODE HERE` and
`raise NotImplementedError()` at the marker's indentation. A cell tagged `rubric` (the instructor's marking
scheme of a written answer, beside its model answer) is left out of the exercise. Notebooks are written as deterministic JSON
(sorted keys, no outputs, no execution counts, only the metadata the course needs), so `check` can
compare the files byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
RUBRIC = "rubric"  # the tag of the cells only instructors see
REPO = Path(__file__).resolve().parents[2]
SOLUTIONS, EXERCISES = REPO / "solutions", REPO / "exercises"
_KEEP_NOTEBOOK_METADATA = ("kernelspec", "language_info", "mvae_course")
_KEEP_CELL_METADATA = ("tags",)


def strip_solutions(source: str, where: str = "cell") -> str:
    """Replace every BEGIN/END SOLUTION block in a cell's source with a stub that raises."""
    out: list[str] = []
    inside = False
    for number, line in enumerate(source.splitlines(), 1):
        marker = line.strip()
        if marker == BEGIN:
            if inside:
                raise ValueError(f"{where}, line {number}: {BEGIN} inside another solution block; close it first")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out += [f"{indent}# YOUR CODE HERE", f"{indent}raise NotImplementedError()"]
        elif marker == END:
            if not inside:
                raise ValueError(f"{where}, line {number}: {END} without a {BEGIN} above it")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{where}: {BEGIN} is never closed; add a {END} line")
    return "\n".join(out)


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The notebook without outputs, execution counts and editor metadata (a copy)."""
    nb = nbformat.from_dict(nb)
    nb.metadata = {k: v for k, v in nb.metadata.items() if k in _KEEP_NOTEBOOK_METADATA}
    for cell in nb.cells:
        cell.metadata = {k: v for k, v in cell.metadata.items() if k in _KEEP_CELL_METADATA}
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    return nb


def exercise_notebook(solution: nbformat.NotebookNode, name: str = "notebook") -> nbformat.NotebookNode:
    """The exercise version of a solution notebook: stubs for the answers, no rubric cells."""
    nb = clean(solution)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            cell.source = strip_solutions(cell.source, f"{name}, cell {index + 1}")
    nb.cells = [cell for cell in nb.cells if RUBRIC not in cell.metadata.get("tags", [])]
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    """The notebook as the exact text written to disk."""
    nbformat.validate(nb)
    return nbformat.writes(nb, version=4) + "\n"


def expected_exercises(solutions: Path = SOLUTIONS) -> dict[str, str]:
    """{file name: text} of every exercise notebook that `solutions` generates."""
    paths = sorted(Path(solutions).glob("*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"{solutions}: no solution notebooks (*.ipynb) found")
    return {p.name: render(exercise_notebook(nbformat.read(p, as_version=4), p.name)) for p in paths}


def build_exercises(solutions: Path = SOLUTIONS, exercises: Path = EXERCISES) -> list[Path]:
    """Write exercises/ from solutions/ and remove exercise notebooks without a solution."""
    expected = expected_exercises(solutions)
    exercises = Path(exercises)
    exercises.mkdir(parents=True, exist_ok=True)
    for stale in exercises.glob("*.ipynb"):
        if stale.name not in expected:
            stale.unlink()
    written = []
    for name, text in expected.items():
        path = exercises / name
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
        written.append(path)
    return written


def stale_exercises(solutions: Path = SOLUTIONS, exercises: Path = EXERCISES) -> list[str]:
    """Problems that make exercises/ differ from what solutions/ generates (empty when up to date)."""
    expected = expected_exercises(solutions)
    exercises = Path(exercises)
    problems = []
    for name, text in expected.items():
        path = exercises / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.read_text() != text:
            problems.append(f"{path}: out of date with {Path(solutions) / name}")
    for path in sorted(exercises.glob("*.ipynb")):
        if path.name not in expected:
            problems.append(f"{path}: has no solution notebook in {solutions}")
    return problems
