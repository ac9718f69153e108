"""The whole course end to end: every lesson executed with papermill, then exported to HTML.

`python -m mvae_course course --out build` runs `notebooks/NN_*.ipynb` in order into `build/notebooks/`,
exports each to `build/html/` with an `index.html` linking them, and says where to look. Each lesson is
run in this very Python (whatever Jupyter kernels are installed), from the `notebooks/` folder, with its
`parameters` cell overridden by papermill: `smoke` (the `tiny` preset) and optionally `max_steps`.
"""

from __future__ import annotations

import argparse
import html
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ipykernel.kernelspec
import nbformat
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from traitlets import default

from mvae_course.notebook import ROOT, data_dir, runs_dir

NOTEBOOKS = ROOT / "notebooks"
SMOKE_PRESETS = ("tiny", "smoke")
CPU_PRESETS = ("cpu",)
KEEP_NOTEBOOK_METADATA = ("kernelspec", "language_info")


class _QuietSmokeDefault(logging.Filter):
    """Papermill cannot read `smoke = os.environ.get("MVAE_SMOKE") == "1"` as a literal default and says so on
    every run; drop those two lines so that its other warnings (a misspelt parameter) stand out."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "MVAE_SMOKE" not in message and message != "Passed unknown parameter: smoke"


for _name in ("papermill", "papermill.translators"):
    logging.getLogger(_name).addFilter(_QuietSmokeDefault())


class _ThisPythonSpecs(KernelSpecManager):
    """Every kernel name resolves to an ipykernel in the interpreter running this code."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        spec = ipykernel.kernelspec.get_kernel_dict()  # argv starts with sys.executable
        return self.kernel_spec_class(resource_dir=ipykernel.kernelspec.RESOURCES, **spec)


class ThisPythonKernelManager(AsyncKernelManager):
    """A kernel manager that ignores installed kernelspecs, so a user-level `python3` cannot shadow the venv.
    """

    @default("kernel_spec_manager")
    def _kernel_spec_manager_default(self) -> KernelSpecManager:
        return _ThisPythonSpecs(data_dir=self.data_dir)


def lesson_notebooks(folder: str | Path = NOTEBOOKS) -> list[Path]:
    """The lessons `NN_name.ipynb` in `folder`, in course order."""
    return sorted(Path(folder).glob("[0-9][0-9]_*.ipynb"))


def execute_notebook(
    path: str | Path, out: str | Path, parameters: Mapping[str, Any] | None = None, timeout: int | None = None
) -> nbformat.NotebookNode:
    """Run a notebook with papermill from its own folder, writing the executed copy to `out`.

    `parameters` override the notebook's `parameters` cell. Raises papermill's `PapermillExecutionError`
    when a cell fails; `out` then holds the outputs up to and including the failing cell.
    """
    import papermill

    path, out = Path(path).resolve(), Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    return papermill.execute_notebook(
        str(path), str(out), parameters=dict(parameters or {}), cwd=str(path.parent), kernel_name="python3",
        progress_bar=False, execution_timeout=timeout, kernel_manager_class=ThisPythonKernelManager,
        record_timing=False,
    )


def strip_run_metadata(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop what a run adds beside the outputs (papermill's records, timings); keep kernelspec and cell tags.
    """
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


def export_html(notebook: str | Path, out: str | Path) -> Path:
    """Write an executed notebook as a standalone HTML page."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(body, encoding="utf-8")
    return out


def lesson_title(path: str | Path) -> str:
    """The lesson's title: the first line of its first cell if that is a Markdown heading, else the file name.
    """
    cells = nbformat.read(path, as_version=4).cells
    first = cells[0] if cells and cells[0].cell_type == "markdown" else None
    heading = first.source.splitlines()[0] if first is not None and first.source else ""
    return heading.lstrip("#").strip() if heading.startswith("#") else Path(path).stem


def _index_page(entries: list[tuple[str, str, str | None]]) -> str:
    """entries: (lesson title, HTML file name, error or None)."""
    items = []
    for name, page, error in entries:
        status = f' <strong>failed</strong>: {html.escape(error)}' if error else ""
        items.append(f'<li><a href="{html.escape(page)}">{html.escape(name)}</a>{status}</li>')
    return (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>mvae-course</title></head><body>\n"
        "<h1>Multimodal VAEs for images and text: the lessons</h1>\n<ol>\n" + "\n".join(items) + "\n</ol>\n"
        "</body></html>\n"
    )


def run_notebooks(
    notebooks: list[Path], out: str | Path, parameters: Mapping[str, Any] | None = None
) -> dict[str, str | None]:
    """Execute each notebook into `out/notebooks/`, export it to `out/html/`, and write `out/html/index.html`.

    A failing lesson does not stop the others (lessons train or load their own models). Returns
    {notebook name: None if it ran, else the error}; failed lessons are exported too, up to the failure.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    results: dict[str, str | None] = {}
    entries = []
    bar = tqdm(notebooks, desc="lessons", unit="notebook")
    for path in bar:
        bar.set_postfix_str(path.name)
        executed = out / "notebooks" / path.name
        try:
            execute_notebook(path, executed, parameters)
            error = None
        except Exception as e:  # a cell's error, a dead kernel, a timeout: report it, run the next lesson
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            tqdm.write(f"{path.name} FAILED ({error}); its partial output is in {executed}")
        page = f"{path.stem}.html"
        if executed.is_file():
            export_html(executed, out / "html" / page)
        results[path.name] = error
        entries.append((lesson_title(path), page, error))
    (out / "html").mkdir(parents=True, exist_ok=True)
    (out / "html" / "index.html").write_text(_index_page(entries), encoding="utf-8")
    return results


def run_course(args: argparse.Namespace) -> int:
    """`python -m mvae_course course --out build [--preset tiny|cpu] [--max-steps N]`: run every lesson."""
    if args.preset not in SMOKE_PRESETS + CPU_PRESETS:
        raise SystemExit(
            f"--preset {args.preset!r}: the course runs on the built-in data with 'cpu' (the lessons' "
            "defaults) or 'tiny' (a smoke run); for full COCO on a GPU use "
            "`python -m mvae_course train --preset coco_gpu`"
        )
    notebooks = lesson_notebooks()
    if not notebooks:
        raise SystemExit(f"no lessons (NN_name.ipynb) found in {NOTEBOOKS}")
    smoke = args.preset in SMOKE_PRESETS
    parameters: dict[str, Any] = {"smoke": smoke}
    if args.max_steps is not None:
        parameters["max_steps"] = args.max_steps
    out = Path(args.out)
    results = run_notebooks(notebooks, out, parameters)
    failed = [name for name, error in results.items() if error]
    print(f"executed notebooks: {out / 'notebooks'}")
    print(f"open in a browser:  {out / 'html' / 'index.html'}")
    print(f"trained runs:       {runs_dir(smoke)}  (data under {data_dir(smoke)})")
    if failed:
        print(f"{len(failed)} of {len(results)} lessons failed: {', '.join(failed)} (partial outputs above)")
        return 1
    print(f"all {len(results)} lessons ran")
    return 0
