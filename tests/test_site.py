"""The course site (mvae_course/site.py): its pages, the course map, and what a browser shows of them.

The site is built from small synthetic notebooks plus one real, committed lesson (01_elbo, with its maths) and
its exercises, so that it stays quick. The browser test loads every page, one after the other, in headless
Chromium (Debian's `chromium`, which .ci/run installs) with every host name unresolvable, so maths that renders
there renders offline; it leaves screenshots of the course map and a lesson in build/site-check/.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest

from mvae_course.course import lesson_notebooks
from mvae_course.grading.exercises import EXERCISES
from mvae_course.notebook import ROOT
from mvae_course.site import build_site, lesson_time, objectives, read_page

REAL_LESSON = ROOT / "notebooks" / "01_elbo.ipynb"
REAL_EXERCISES = EXERCISES / "01_elbo_exercises.ipynb"
SCREENSHOTS = ROOT / "build" / "site-check"
FIRST_CELL = """# Lesson 9: a synthetic lesson

**You will learn to**
- write $\\log p(x)$ inline
  and continue a bullet on the next line;
- read a display equation.

**Prerequisites**: none.
**Time**: about 5 minutes to read; running it takes a second.
"""


def _lesson(folder: Path, name: str, first_cell: str, body: list[nbformat.NotebookNode], error: bool = False) -> Path:
    """An executed-looking lesson: its first cell, papermill's parameters cells, `body`, then a failed cell if asked."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("secret_parameter = 1", execution_count=1)
    params.metadata["tags"] = ["parameters"]
    injected = nbformat.v4.new_code_cell("secret_injected = 2", execution_count=2)
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(first_cell), params, injected, *body]
    if error:
        failing = nbformat.v4.new_code_cell("1 / 0", execution_count=3)
        failing.outputs = [nbformat.v4.new_output("error", ename="ZeroDivisionError", evalue="division by zero",
                                                  traceback=["ZeroDivisionError: division by zero"])]
        nb.cells.append(failing)
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, folder / name)
    return folder / name


def _synthetic_lessons(folder: Path, error: bool = False) -> list[Path]:
    display = nbformat.v4.new_markdown_cell("The bound:\n\n$$\\log p(x) \\ge \\mathrm{ELBO}(q).$$")
    bar = nbformat.v4.new_code_cell("train()", execution_count=3)
    bar.outputs = [nbformat.v4.new_output("stream", name="stderr", text=t)
                   for t in ["\rtrain:   0%|          | 0/4", "\rtrain: 100%|##########| 4/4 [00:01<00:00]", "\n"]]
    return [
        _lesson(folder, "00_synthetic.ipynb", FIRST_CELL.replace("Lesson 9", "Lesson 0"), [display, bar]),
        _lesson(folder, "02_second.ipynb", "# Lesson 2: a second one", [nbformat.v4.new_markdown_cell("Inline $z$.")],
                error=error),
    ]


def test_the_first_cell_gives_objectives_and_time():
    assert objectives(FIRST_CELL) == (
        "write $\\log p(x)$ inline and continue a bullet on the next line;", "read a display equation."
    )
    assert lesson_time(FIRST_CELL) == "about 5 minutes to read"
    assert lesson_time("**Time**: 45 minutes.") == "45 minutes"
    assert objectives("# no objectives") == () and lesson_time("# no time") is None


@pytest.mark.parametrize("path", lesson_notebooks(), ids=lambda p: p.stem)
def test_every_lesson_states_its_objectives_and_time(path: Path):
    """What the course map shows of a lesson comes from its first cell (see mvae_course/site.py)."""
    page = read_page(path)
    assert page.title.startswith("Lesson "), f"{path.name}: the first cell should start with '# Lesson N: ...'"
    assert page.objectives, f"{path.name}: the first cell needs '**You will learn to**' and '- ' bullets under it"
    assert page.time and re.search(r"\d+ min", page.time), f"{path.name}: the first cell needs '**Time**: N minutes'"


def test_every_exercise_notebook_names_its_lesson():
    lessons = {p.stem for p in lesson_notebooks()}
    for path in sorted(EXERCISES.glob("*.ipynb")):
        lesson = read_page(path).lesson
        assert lesson in lessons, (
            f"{path.name}: its first cell names lesson {lesson!r}, not one of {sorted(lessons)}; the site would "
            "leave it out (write `notebooks/NN_name.ipynb` in that cell)"
        )


def test_pages_have_navigation_hide_parameters_and_flag_errors(tmp_path: Path):
    lessons = [*_synthetic_lessons(tmp_path / "lessons", error=True), REAL_LESSON]
    index = build_site(lessons, tmp_path / "site", [REAL_EXERCISES], {"02_second.ipynb": "ZeroDivisionError: boom"})
    site = index.parent
    pages = {p.name: p.read_text() for p in site.glob("*.html")}
    assert set(pages) == {"index.html", "00_synthetic.html", "02_second.html", "01_elbo.html",
                          "01_elbo_exercises.html"}

    # reading order: each lesson, then its exercises; the map and the neighbours on every page
    def links(page: str, rel: str) -> list[str]:
        tags = re.findall(r"<a\b[^>]*>", pages[page])
        return [re.search(r'href="([^"]+)"', tag).group(1) for tag in tags if f'rel="{rel}"' in tag]

    assert links("00_synthetic.html", "prev") == [] and links("00_synthetic.html", "next") == ["02_second.html"] * 2
    assert links("01_elbo.html", "prev") == ["02_second.html"] * 2
    assert links("01_elbo.html", "next") == ["01_elbo_exercises.html"] * 2
    assert links("01_elbo_exercises.html", "next") == [] and 'href="01_elbo.html"' in pages["01_elbo_exercises.html"]
    assert all('href="index.html"' in body for name, body in pages.items() if name != "index.html")

    for name, body in pages.items():
        assert "secret_parameter" not in body and "secret_injected" not in body, f"{name}: parameters cell shown"
        loaded = re.findall(r'<(?:script|img)\b[^>]*\bsrc="([^"]+)"|<link\b[^>]*\bhref="([^"]+)"', body)
        remote = [url for pair in loaded for url in pair if url.startswith(("http:", "https:", "//"))]
        assert not remote, f"{name} loads {remote}: the site must work offline"
    assert (site / "mathjax" / "MathJax.js").is_file() and (site / "course.css").is_file()

    # the progress bar's overwritten states are gone, its last state stays
    assert "0/4" not in pages["00_synthetic.html"] and "4/4 [00:01&lt;00:00]" in pages["00_synthetic.html"]
    # the failure: flagged on its page and on the map, and nowhere else
    assert "course-error" in pages["02_second.html"] and "did not run to the end" in pages["02_second.html"]
    assert not any("course-error" in pages[n] for n in pages if n != "02_second.html")
    assert "ZeroDivisionError: boom" in pages["index.html"] and pages["index.html"].count("course-lesson-failed") == 1

    # the course map: every lesson's title, time, objectives and exercises, in course order
    index_html = pages["index.html"]
    order = [index_html.index(f'href="{p}"') for p in ("00_synthetic.html", "02_second.html", "01_elbo.html")]
    assert order == sorted(order)
    assert "Time: about 5 minutes to read" in index_html and "read a display equation." in index_html
    elbo = read_page(REAL_LESSON)
    assert html.escape(elbo.title) in index_html and elbo.time in index_html
    assert 'href="01_elbo_exercises.html"' in index_html and "exercises/01_elbo_exercises.ipynb" in index_html


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium; .ci/run installs it)")
    return found


def _render(chromium: str, page: Path, profile: Path, screenshot: Path | None = None) -> str:
    """The page's DOM after headless Chromium ran its scripts, every host name unresolvable (offline)."""
    for attempt in range(2):  # a second, fresh browser if one hangs (seen only with several at once on 2 cores)
        command = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}-{attempt}",
            "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=15000", "--window-size=1200,1500",
            "--dump-dom", *([f"--screenshot={screenshot}"] if screenshot else []), page.as_uri(),
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=90)
            break
        except subprocess.TimeoutExpired:
            if attempt:
                raise
    assert done.returncode == 0 and "</html>" in done.stdout, f"chromium failed on {page.name}: {done.stderr[-2000:]}"
    return done.stdout


def _visible_text(dom: str) -> str:
    """The page's text as a reader sees it: no scripts (MathJax keeps the TeX there), styles or code."""
    dom = re.sub(r"<(script|style|pre|code)\b.*?</\1>", " ", dom, flags=re.DOTALL | re.IGNORECASE)
    return html.unescape(re.sub(r"<[^>]+>", " ", dom))


@pytest.mark.slow
def test_the_site_renders_its_maths_offline_in_a_browser(tmp_path: Path):
    chromium = _chromium()
    index = build_site([_synthetic_lessons(tmp_path / "lessons")[0], REAL_LESSON], tmp_path / "site", [REAL_EXERCISES])
    pages = sorted(index.parent.glob("*.html"))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shots = {"index.html": SCREENSHOTS / "index.png", "01_elbo.html": SCREENSHOTS / "01_elbo.png"}
    for old in shots.values():
        old.unlink(missing_ok=True)
    doms = {p: _render(chromium, p, tmp_path / f"profile-{p.stem}", shots.get(p.name)) for p in pages}

    for page, dom in doms.items():
        typeset = len(re.findall(r'class="MathJax(?:_Display)?"', dom))
        assert typeset > 0, f"{page.name}: no MathJax output in the page (the maths did not render)"
        text = _visible_text(dom)
        assert "$$" not in text, f"{page.name}: raw $$ in the page: ...{text[text.index('$$') - 80:][:200]}..."
        assert 'class="course-error"' not in dom, f"{page.name} holds an error output"
        assert "Math Processing Error" not in text, f"{page.name}: MathJax could not typeset a formula"
    for shot in shots.values():
        assert shot.is_file() and shot.stat().st_size > 10_000, f"no screenshot {shot}"
