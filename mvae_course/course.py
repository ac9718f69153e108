"""The whole course end to end: every lesson executed with papermill, then the offline course site.

`mvae-course course --out build` runs `notebooks/NN_*.ipynb` in order into `build/notebooks/`, builds the site
from them and the exercises into `build/html/` (mvae_course/site.py) and says where to look. Each lesson runs in
this very Python (mvae_course/kernels.py), from the `notebooks/` folder, with its `parameters` cell overridden by
papermill: `smoke` (the `tiny` preset) and optionally `max_steps`. While a lesson runs, the terminal shows which
one, and the latest line its kernel wrote to stderr: its progress bars (which training, the steps, the time left).
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Queue
from typing import Any

import nbformat

from mvae_course.kernels import CourseKernelManager
from mvae_course.notebook import ROOT, data_dir, relative, runs_dir
from mvae_course.progress import tqdm
from mvae_course.site import build_site

NOTEBOOKS = ROOT / "notebooks"
SMOKE_PRESETS = ("tiny", "smoke")
CPU_PRESETS = ("cpu",)
KEEP_NOTEBOOK_METADATA = ("kernelspec", "language_info")


class _QuietParameterParsing(logging.Filter):
    """Papermill reads a lesson's parameters cell to list its parameters, cannot read `smoke =
    os.environ.get("MVAE_SMOKE") == "1"` or a line whose comment holds a colon, and says so on every run;
    drop those lines so that its other warnings (a misspelt parameter) stand out."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return ("MVAE_SMOKE" not in message and message != "Passed unknown parameter: smoke"
                and not message.startswith("Unable to parse line"))


for _name in ("papermill", "papermill.translators"):
    logging.getLogger(_name).addFilter(_QuietParameterParsing())


class KernelStatus:
    """Where a running lesson is, as one status line under the course's bar: its section and its progress bars.

    It is papermill's `stderr_file` (what the kernel writes to stderr, as it comes) and nbclient's `on_cell_start`
    hook (a Markdown heading names the section that runs next). A text progress bar rewrites its line with a
    carriage return, so the latest non-empty line is the bar's current state; the status keeps its words and
    numbers and leaves the bar out, so that the steps and the time left fit
    (`train:  45%|####5     | 225/500 [00:12<00:14]` shows as `train:  45% 225/500 [00:12<00:14]`).
    """

    def __init__(self, line: tqdm, lesson: str) -> None:
        self.line, self.lesson, self.section = line, lesson, ""
        self.show("starting")

    def show(self, text: str = "") -> None:
        status = " · ".join(part for part in (self.lesson, self.section, text) if part)
        self.line.set_description_str(f"  {status}"[: shutil.get_terminal_size().columns - 1])

    def cell_started(self, cell: nbformat.NotebookNode, cell_index: int) -> None:
        heading = cell.source.lstrip().splitlines()[0] if cell.cell_type == "markdown" and cell.source.strip() else ""
        if heading.startswith("#"):
            self.section = heading.lstrip("#").strip()
            self.show()

    def write(self, text: str) -> int:
        latest = [part.strip() for part in re.split(r"[\r\n]", text) if part.strip()]
        if latest:
            self.show(re.sub(r"\s*\|[^|]*\|\s*", " ", latest[-1]))
        return len(text)

    def flush(self) -> None:
        pass


def lesson_notebooks(folder: str | Path = NOTEBOOKS) -> list[Path]:
    """The lessons `NN_name.ipynb` in `folder`, in course order."""
    return sorted(Path(folder).glob("[0-9][0-9]_*.ipynb"))


def execute_notebook(
    path: str | Path, out: str | Path, parameters: Mapping[str, Any] | None = None, timeout: int | None = None,
    status: KernelStatus | None = None,
) -> nbformat.NotebookNode:
    """Run a notebook with papermill from its own folder, writing the executed copy to `out`.

    `parameters` override the notebook's `parameters` cell; `status`, if given, follows the run as it goes.
    Raises papermill's `PapermillExecutionError` when a cell fails; `out` then holds the outputs up to and
    including the failing cell.
    """
    import papermill

    path, out = Path(path).resolve(), Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    # The kernel starts in the notebook's folder (nbclient's resources path), not papermill's `cwd`, which
    # changes this whole process's folder and so cannot serve two lessons running at once.
    return papermill.execute_notebook(
        str(path), str(out), parameters=dict(parameters or {}), kernel_name="python3",
        progress_bar=False, execution_timeout=timeout, kernel_manager_class=CourseKernelManager,
        record_timing=False, stderr_file=status, on_cell_start=status and status.cell_started,
        resources={"metadata": {"path": str(path.parent)}},
    )


def strip_run_metadata(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop what a run adds beside the outputs (papermill's records, timings); keep kernelspec and cell tags."""
    nb.metadata = nbformat.from_dict({k: v for k, v in nb.metadata.items() if k in KEEP_NOTEBOOK_METADATA})
    for cell in nb.cells:
        tags = cell.metadata.get("tags")
        cell.metadata = nbformat.from_dict({"tags": tags} if tags else {})
    return nb


def execute_in_place(path: str | Path, parameters: Mapping[str, Any] | None = None) -> Path:
    """Execute a lesson (default parameters unless given) and save it over itself with clean metadata.

    What a lesson's author runs before committing it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.executing.ipynb")
    try:
        nb = execute_notebook(path, tmp, parameters)
        nbformat.write(strip_run_metadata(nb), path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def run_notebooks(
    notebooks: Sequence[Path], out: str | Path, parameters: Mapping[str, Any] | None = None,
    exercises: Sequence[Path] = (), jobs: int = 1,
) -> dict[str, str | None]:
    """Execute each notebook into `out/notebooks/`, `jobs` at a time, then build the course site into `out/html/`.

    A failing lesson does not stop the others (lessons train or load their own models). Returns
    {notebook name: None if it ran, else the error}, in course order; a failed lesson's page shows it up to
    the failure, flagged. `exercises` (notebooks, each naming its lesson in its first cell) get pages of their
    own. Each running lesson has a status line under the course's bar (in a terminal).
    """
    out = Path(out)
    course = tqdm(total=len(notebooks), desc="course", unit="lesson")
    slots = Queue()  # one status line per lesson running at a time
    for k in range(max(1, jobs)):
        slots.put(tqdm(bar_format="{desc}", leave=False, position=k + 1, disable=not sys.stderr.isatty()))

    def run(path: Path) -> str | None:
        line = slots.get()
        executed = out / "notebooks" / path.name
        try:
            execute_notebook(path, executed, parameters, status=KernelStatus(line, path.stem))
            return None
        except Exception as e:  # a cell's error, a dead kernel, a timeout: report it, run the next lesson
            message = str(e).strip()
            error = f"{type(e).__name__}: {message.splitlines()[-1] if message else ''}"
            tqdm.write(f"{path.name} FAILED ({error}); its partial output is in {executed}")
            return error
        finally:
            line.set_description_str("")
            slots.put(line)
            course.update()

    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        futures = [pool.submit(run, path) for path in notebooks]
        results = {path.name: future.result() for path, future in zip(notebooks, futures)}
    finally:
        pool.shutdown(cancel_futures=True)  # after Ctrl-C no further lesson starts
        while not slots.empty():
            slots.get().close()
        course.close()
    executed = [out / "notebooks" / name for name in results if (out / "notebooks" / name).is_file()]
    build_site(executed, out / "html", exercises, {name: error for name, error in results.items() if error})
    return results


def run_course(args: argparse.Namespace) -> int:
    """`mvae-course course --out build [--preset tiny|cpu] [--max-steps N] [--retrain] [--jobs N]`: run every
    lesson, N at a time (with `--retrain`, each trains its reference runs into runs/retrained/ instead of
    loading them), build the site."""
    from mvae_course.grading.exercises import EXERCISES

    if args.preset not in SMOKE_PRESETS + CPU_PRESETS:
        raise SystemExit(
            f"--preset {args.preset!r}: the course runs on the built-in data with 'cpu' (the lessons' "
            "defaults) or 'tiny' (a smoke run); for full COCO on a GPU use "
            "`mvae-course train --preset coco_gpu`"
        )
    notebooks = lesson_notebooks()
    if not notebooks:
        raise SystemExit(f"no lessons (NN_name.ipynb) found in {relative(NOTEBOOKS)}")
    smoke = args.preset in SMOKE_PRESETS
    parameters: dict[str, Any] = {"smoke": smoke}
    if args.max_steps is not None:
        parameters["max_steps"] = args.max_steps
    if args.retrain:
        parameters["retrain"] = True
    out = Path(args.out)
    results = run_notebooks(notebooks, out, parameters, sorted(EXERCISES.glob("*.ipynb")), jobs=args.jobs)
    failed = [name for name, error in results.items() if error]
    print(f"executed notebooks: {out / 'notebooks'}")
    print(f"the course site:    {out / 'html' / 'index.html'}  (open it in a browser; it works offline)")
    print(f"trained runs:       {relative(runs_dir(smoke))}  (data under {relative(data_dir(smoke))})")
    if failed:
        print(f"{len(failed)} of {len(results)} lessons failed: {', '.join(failed)} (partial outputs above)")
        return 1
    print(f"all {len(results)} lessons ran")
    return 0
