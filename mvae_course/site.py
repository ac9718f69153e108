"""The course site: executed lessons and their exercises as static HTML pages that work offline.

`build_site(lessons, exercises, out)` exports each notebook with nbconvert's `lab` template, extended by the
course's own (`mvae_course/templates/course/`), and writes `out/index.html`, a map of the course. Maths is
typeset by the MathJax that the `jupyter-server-mathjax` package installs, copied beside the pages, so a page
opened from disk renders with no network. Papermill's parameters cells are left out of the pages, error outputs
are flagged, and every page links to the previous and the next one in reading order: each lesson, then its
exercises.

What the course map shows comes from each lesson's first cell (the convention every lesson follows):

    # Lesson 1: the evidence lower bound (ELBO)          <- the title
    **You will learn to**                                 <- followed by one bullet per objective
    - derive the ELBO ...
    **Time**: about 60 minutes to read; running ...       <- the time, up to the first ';' or '. '

and an exercise notebook goes with the lesson its first cell names (`notebooks/01_elbo.ipynb`).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nbformat

TEMPLATES = Path(__file__).resolve().parent / "templates"
COURSE_TEMPLATE = TEMPLATES / "course"
MATHJAX_DIR = "mathjax"
MATHJAX_URL = f"{MATHJAX_DIR}/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe"
HIDDEN_TAGS = ("parameters", "injected-parameters")  # papermill's: how the runner set the lesson up
OBJECTIVES_HEADING = "**You will learn to**"
_TIME = re.compile(r"^\*\*Time\*\*:\s*(.+)$", re.MULTILINE)
_LESSON_REFERENCE = re.compile(r"notebooks/([0-9]{2}_\w+)\.ipynb")


@dataclass(frozen=True)
class Page:
    """One notebook of the site: its file, its HTML page's name and what the course map says about it."""

    path: Path
    title: str
    objectives: tuple[str, ...] = ()  # Markdown, one per bullet
    time: str | None = None
    lesson: str | None = None  # an exercise notebook: the stem of the lesson it goes with

    @property
    def href(self) -> str:
        return f"{self.path.stem}.html"


def _first_cell(nb: nbformat.NotebookNode) -> str:
    cells = nb.cells
    return cells[0].source if cells and cells[0].cell_type == "markdown" else ""


def notebook_title(nb: nbformat.NotebookNode, path: str | Path) -> str:
    """The first line of the first cell if that is a Markdown heading, else the file name."""
    heading = (_first_cell(nb).splitlines() or [""])[0]
    return heading.lstrip("#").strip() if heading.startswith("#") else Path(path).stem


def objectives(first_cell: str) -> tuple[str, ...]:
    """The bullets under "**You will learn to**", each as one line of Markdown (continuation lines joined)."""
    lines = first_cell.splitlines()
    if OBJECTIVES_HEADING not in (line.strip() for line in lines):
        return ()
    start = [line.strip() for line in lines].index(OBJECTIVES_HEADING) + 1
    bullets: list[str] = []
    for line in lines[start:]:
        if line.startswith(("- ", "* ")):
            bullets.append(line[2:].strip())
        elif bullets and line.startswith(" ") and line.strip():
            bullets[-1] += " " + line.strip()
        else:
            break
    return tuple(bullets)


def lesson_time(first_cell: str) -> str | None:
    """The "**Time**:" line up to its first ';' or '. ' ("about 60 minutes to read and work through")."""
    match = _TIME.search(first_cell)
    return re.split(r";|\.\s", match.group(1), maxsplit=1)[0].strip().rstrip(".") if match else None


def read_page(path: str | Path) -> Page:
    """What the course map shows about a lesson or an exercise notebook, read from its first cell."""
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    first = _first_cell(nb)
    lesson = _LESSON_REFERENCE.search(first)
    return Page(path, notebook_title(nb, path), objectives(first), lesson_time(first), lesson and lesson.group(1))


def error_cells(nb: nbformat.NotebookNode) -> list[int]:
    """Indices of the code cells that hold an error output."""
    return [
        k for k, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and any(out.output_type == "error" for out in cell.get("outputs", []))
    ]


def reading_order(lessons: Sequence[Page], exercises: Sequence[Page]) -> list[Page]:
    """Each lesson followed by its exercises (those of lessons not given are left out)."""
    return [p for lesson in lessons for p in [lesson, *(e for e in exercises if e.lesson == lesson.path.stem)]]


def _link(page: Page | None) -> dict[str, str] | None:
    return {"href": page.href, "title": page.title} if page else None


def _exporter():
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import CoalesceStreamsPreprocessor, TagRemovePreprocessor

    exporter = HTMLExporter(template_name="course", extra_template_basedirs=[str(TEMPLATES)], mathjax_url=MATHJAX_URL)
    exporter.register_preprocessor(TagRemovePreprocessor(remove_cell_tags=set(HIDDEN_TAGS)), enabled=True)
    # One block per stream, with what a progress bar overwrote (`\r`) dropped, as JupyterLab shows it.
    exporter.register_preprocessor(CoalesceStreamsPreprocessor(), enabled=True)
    return exporter


def copy_mathjax(out: str | Path) -> Path:
    """Copy the MathJax 2 that jupyter-server-mathjax installs to `out/mathjax/` (once); return that folder."""
    import jupyter_server_mathjax

    source = Path(jupyter_server_mathjax.__file__).parent / "static"
    target = Path(out) / MATHJAX_DIR
    if not (target / "MathJax.js").is_file():
        shutil.copytree(source, target, dirs_exist_ok=True)
    return target


def _course_map(lessons: Sequence[Page], exercises: Sequence[Page], failures: Mapping[str, str]) -> str:
    import jinja2
    from nbconvert.filters import markdown2html_mistune

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(COURSE_TEMPLATE), autoescape=True)
    env.filters["markdown"] = markdown2html_mistune
    rows = [
        {"page": lesson, "failure": failures.get(lesson.path.name),
         "exercises": [e for e in exercises if e.lesson == lesson.path.stem]}
        for lesson in lessons
    ]
    return env.get_template("map.html.j2").render(rows=rows, mathjax_url=MATHJAX_URL)


def build_site(
    lessons: Sequence[str | Path],
    out: str | Path,
    exercises: Sequence[str | Path] = (),
    failures: Mapping[str, str] | None = None,
) -> Path:
    """Write the site into `out`: a page per notebook, `index.html` (the course map), CSS and MathJax.

    lessons: executed lesson notebooks, in course order; exercises: exercise notebooks, each going with one of
    the lessons. failures: {lesson file name: error} for lessons whose run failed (their pages are flagged,
    and so are pages holding an error output). Returns the index page's path.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    failures = dict(failures or {})
    lesson_pages = [read_page(p) for p in lessons]
    exercise_pages = [read_page(p) for p in exercises]
    order = reading_order(lesson_pages, exercise_pages)
    titles = {page.path.stem: page for page in lesson_pages}
    exporter = _exporter()
    for k, page in enumerate(order):
        nb = nbformat.read(page.path, as_version=4)
        errors = error_cells(nb)
        failure = failures.get(page.path.name) or (f"an error in cell {errors[0]}" if errors else None)
        if failure:
            failures.setdefault(page.path.name, failure)
        course = {
            "index": "index.html",
            "notebook": page.path.name,
            "previous": _link(order[k - 1] if k else None),
            "next": _link(order[k + 1] if k + 1 < len(order) else None),
            "lesson": _link(titles.get(page.lesson)) if page.lesson else None,
            "exercises": [_link(e) for e in exercise_pages if e.lesson == page.path.stem],
            "failure": failure,
        }
        body, _ = exporter.from_notebook_node(nb, resources={"course": course, "metadata": {"name": page.title}})
        (out / page.href).write_text(body, encoding="utf-8")
    shutil.copyfile(COURSE_TEMPLATE / "course.css", out / "course.css")
    copy_mathjax(out)
    index = out / "index.html"
    index.write_text(_course_map(lesson_pages, exercise_pages, failures), encoding="utf-8")
    return index

