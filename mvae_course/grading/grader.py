"""The autograder: run each submitted notebook in its own kernel, then judge its functions from here.

A submission cannot grade itself. After its cells have run (errors allowed, each cell under a timeout),
the grader draws fresh random inputs for every question in this process, saves them to a file, asks the
kernel to call the learner's function on them and save the results, and loads those results back here
(`weights_only=True`: plain tensors and numbers, no code). The comparison with the reference happens in
this process, which the notebook never touches, so redefining `check` or patching the grading modules in
the kernel changes nothing. A missing function, NotImplementedError, an exception or a timeout costs
that question only.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
import torch
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError

from mvae_course.grading.integrity import notebook_code
from mvae_course.grading.kernel import KERNEL_SOURCE
from mvae_course.grading.question import Question, Verdict, failed, verdict
from mvae_course.grading.registry import NOTEBOOKS
from mvae_course.kernels import CourseKernelManager

KERNEL_NAME = "python3"  # CourseKernelManager resolves it to this interpreter (sys.executable)
METADATA_KEY = "mvae_course"  # notebook metadata: {"mvae_course": {"exercises": "01_elbo_exercises"}}
_CALL = "mvae_grading_call"  # metadata flag of the cells the grader adds, which get the call timeout

# Defined in the kernel after the notebook has run. It only moves data and reports where the function comes
# from (grading/kernel.py, sent as source): the verdict is made in the grader.
_KERNEL_HELPER = f'''
_mvae_kernel = {{}}
exec({KERNEL_SOURCE!r}, _mvae_kernel)
''' + '''
def _mvae_grading_call(function, inputs, outputs):
    import torch
    from pathlib import Path

    def rebuild(arg, where):
        if isinstance(arg, dict) and "__mvae_model__" in arg:
            from mvae_course.config import ModelConfig
            from mvae_course.models.mvae import MultimodalVAE

            model = MultimodalVAE(ModelConfig(**arg["__mvae_model__"]))
            model.load_state_dict(arg["state_dict"])
            return model.eval()
        return _mvae_kernel["rebuild"](arg, where)  # a described folder is written under `where`

    fn = globals().get(function)
    case = 0
    if not callable(fn):
        record = {"error": "missing"}
    else:
        try:
            results = []
            for case, args in enumerate(torch.load(inputs, weights_only=True)):
                where = Path(inputs).parent / f"{function}-{case}"
                results.append(fn(*[rebuild(a, where / str(i)) for i, a in enumerate(args)]))
            record = {"outputs": results, "info": _mvae_kernel["function_info"](fn)}
        except NotImplementedError:
            record = {"error": "not_implemented"}
        except Exception as err:
            record = {"error": "exception", "message": f"{type(err).__name__}: {err}", "case": case}
    try:
        torch.save(record, outputs)
    except Exception as err:
        torch.save({"error": "unsaveable", "message": f"{type(err).__name__}: {err}"}, outputs)
'''


@dataclass
class NotebookGrade:
    """The grade of one submitted notebook."""

    path: str
    notebook: str
    seed: int
    verdicts: list[Verdict]
    cell_errors: list[str] = field(default_factory=list)

    @property
    def points(self) -> int:
        return sum(v.points for v in self.verdicts)

    @property
    def max_points(self) -> int:
        return sum(v.max_points for v in self.verdicts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "notebook": self.notebook, "seed": self.seed, "points": self.points,
            "max_points": self.max_points, "questions": [v.to_dict() for v in self.verdicts],
            "cell_errors": self.cell_errors,
        }


def identify(nb: nbformat.NotebookNode, path: Path) -> str:
    """Which exercise notebook this is: from its metadata, else from its file name."""
    name = nb.metadata.get(METADATA_KEY, {}).get("exercises")
    if name in NOTEBOOKS:
        return name
    for name in NOTEBOOKS:
        if name in path.name or name.removesuffix("_exercises") in path.name:
            return name
    raise ValueError(
        f"{path}: cannot tell which exercise notebook this is. Its metadata has no "
        f"{METADATA_KEY}.exercises entry and its name contains none of {', '.join(NOTEBOOKS)}; "
        "submit the notebook you were given (from exercises/), keeping its name"
    )


def _portable(arg: Any) -> Any:
    """A case argument as plain data the kernel can load with weights_only=True (models by weights)."""
    if isinstance(arg, torch.nn.Module):
        return {"__mvae_model__": dataclasses.asdict(arg.config), "state_dict": arg.state_dict()}
    return arg


def _question_seed(seed: int, q: Question) -> int:
    return (seed ^ zlib.crc32(q.id.encode())) % 2**63


def _cell_errors(cells: list[nbformat.NotebookNode]) -> list[str]:
    errors = []
    for i, cell in enumerate(cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                errors.append(f"cell {i + 1}: {out.get('ename')}: {out.get('evalue')}")
    return errors


class _KernelSession:
    """The learner's kernel, after the notebook has run: calls one function on saved inputs."""

    def __init__(self, client: NotebookClient, workdir: Path, timeout: float, code: list[str]) -> None:
        self.client, self.workdir, self.timeout, self.code = client, workdir, timeout, code
        self.dead: str | None = None

    def run(self, source: str) -> float:
        """Execute `source` in the kernel; returns the seconds it took. Raises DeadKernelError."""
        cells = self.client.nb.cells
        cells.append(nbformat.v4.new_code_cell(source, metadata={_CALL: True}))  # nbclient stores cells back
        start = time.monotonic()
        self.client.execute_cell(cells[-1], len(cells) - 1)
        return time.monotonic() - start

    def grade(self, q: Question, seed: int) -> Verdict:
        if self.dead:
            return failed(q, self.dead)
        cases = q.cases(torch.Generator().manual_seed(_question_seed(seed, q)))
        inputs, outputs = self.workdir / f"{q.id}.in.pt", self.workdir / f"{q.id}.out.pt"
        torch.save([tuple(_portable(a) for a in case) for case in cases], inputs)
        try:
            elapsed = self.run(f"_mvae_grading_call({q.function!r}, {str(inputs)!r}, {str(outputs)!r})")
        except DeadKernelError:
            self.dead = f"the kernel died while `{q.function}` ran, so no later question could be graded"
            return failed(q, f"the kernel died while `{q.function}` ran (it used too much memory or exited)")
        if not outputs.exists():
            if elapsed >= self.timeout:
                return failed(q, f"`{q.function}` did not finish within {self.timeout} s (an infinite loop?)")
            return failed(q, f"`{q.function}` gave no result (the kernel was interrupted or busy)")
        try:
            record = torch.load(outputs, weights_only=True)
        except Exception:
            return failed(q, f"`{q.function}` returned something other than tensors, numbers, lists or tuples")
        error = record.get("error")
        if error == "missing":
            return failed(q, f"no function named `{q.function}` is defined: keep the name from the exercise "
                             "and make sure its cell runs without errors")
        if error == "not_implemented":
            return failed(q, f"not attempted: `{q.function}` still raises NotImplementedError")
        if error == "exception":
            return failed(q, f"`{q.function}` raised {record['message']} (on test case {record['case'] + 1})")
        if error == "unsaveable":
            return failed(q, f"`{q.function}` returned something other than tensors, numbers, lists or tuples")
        return verdict(q, cases, record["outputs"], record.get("info"), self.code)


def grade_notebook(
    path: str | Path, seed: int | None = None, timeout: float = 60, call_timeout: float | None = None
) -> NotebookGrade:
    """Run one submitted notebook in a fresh kernel and grade every question of its exercise set.

    seed: the random inputs (fresh when None). timeout: seconds allowed for each of the notebook's cells;
    call_timeout: for each graded function call (default: timeout). Past either the kernel is
    interrupted and grading goes on.
    """
    call_timeout = timeout if call_timeout is None else call_timeout
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such notebook; pass the .ipynb files to grade")
    nb = nbformat.read(path, as_version=4)
    name = identify(nb, path)
    questions = NOTEBOOKS[name]
    submitted = len(nb.cells)
    seed = secrets.randbits(62) if seed is None else seed
    client = NotebookClient(
        nb, kernel_name=KERNEL_NAME, kernel_manager_class=CourseKernelManager, allow_errors=True,
        interrupt_on_timeout=True, shutdown_kernel="immediate",
        timeout_func=lambda cell: call_timeout if cell.metadata.get(_CALL) else timeout,
        error_on_timeout={"ename": "TimeoutError", "evalue": "the cell ran past its timeout", "traceback": []},
        resources={"metadata": {"path": str(path.resolve().parent)}},
    )
    with tempfile.TemporaryDirectory(prefix="mvae-grade-") as tmp, client.setup_kernel():
        session = _KernelSession(client, Path(tmp), call_timeout, notebook_code(nb.cells[:submitted]))
        try:
            for index in range(submitted):
                client.execute_cell(nb.cells[index], index)
            session.run(_KERNEL_HELPER)
        except DeadKernelError:
            session.dead = "the kernel died while the notebook ran (it used too much memory or exited)"
        verdicts = [session.grade(q, seed) for q in questions]
    return NotebookGrade(str(path), name, seed, verdicts, _cell_errors(nb.cells[:submitted]))


def grade_notebooks(
    paths: list[str | Path],
    seed: int | None = None,
    timeout: float = 60,
    call_timeout: float | None = None,
    jobs: int = 1,
) -> list[NotebookGrade]:
    """Grade several notebooks, each in its own kernel, with one seed for the whole run.

    jobs: how many kernels run at once (kernels mostly wait on imports, so 2-4 helps even on 2 cores).
    """
    for path in paths:  # fail before any kernel starts
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such notebook; pass the .ipynb files to grade")
    seed = secrets.randbits(62) if seed is None else seed
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(lambda p: grade_notebook(p, seed, timeout, call_timeout), paths))


def format_report(grades: list[NotebookGrade]) -> str:
    """A per-question table with points and totals, one block per notebook."""
    lines = []
    for g in grades:
        lines.append(f"{g.path}  ({g.notebook}, seed {g.seed})")
        width = max(len(v.function) for v in g.verdicts)
        for v in g.verdicts:
            lines.append(f"  {v.question:<4} {v.function:<{width}}  {v.points}/{v.max_points}  {v.feedback}")
        lines.append(f"  {'total':<{width + 5}}  {g.points}/{g.max_points}")
        lines += [f"  note: {e}" for e in g.cell_errors]
        lines.append("")
    if len(grades) > 1:
        lines.append(f"all notebooks: {sum(g.points for g in grades)}/{sum(g.max_points for g in grades)}")
    return "\n".join(lines).rstrip() + "\n"


def write_gradebook(grades: list[NotebookGrade], out: str | Path) -> None:
    """The same results as JSON, for a gradebook."""
    data = {
        "points": sum(g.points for g in grades),
        "max_points": sum(g.max_points for g in grades),
        "submissions": [g.to_dict() for g in grades],
    }
    Path(out).write_text(json.dumps(data, indent=2) + "\n")
