"""The lessons: each committed notebook is clean and executed; the course runner (papermill) runs lessons,
several at once, and reports the ones that fail.

The lessons themselves run in nbval (configured in pyproject.toml): it executes each committed notebook in smoke
mode, fails on any cell that raises (a `claim` that does not hold among them), and compares the outputs of the
cells marked `# NBVAL_CHECK_OUTPUT` with the committed ones; the runner's tests below cover papermill's
parameter injection.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import time
from pathlib import Path

import nbformat
import pytest

from mvae_course.config import preset
from mvae_course.course import (
    KEEP_NOTEBOOK_METADATA,
    KernelStatus,
    lesson_notebooks,
    run_course,
    run_notebooks,
    strip_run_metadata,
)
from mvae_course.notebook import (
    ROOT,
    coco_mini,
    data_dir,
    lesson_config,
    markdown_table,
    relative,
    run_time,
    runs_dir,
)

NOTEBOOKS = lesson_notebooks()
REQUIRED_PARAMETERS = {"smoke", "device", "data_root", "max_steps", "seed"}
SMOKE_DEFAULT = 'os.environ.get("MVAE_SMOKE") == "1"'


def _read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def _parameter_cells(nb: nbformat.NotebookNode) -> list:
    return [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]


def _errors(nb: nbformat.NotebookNode) -> list[str]:
    return [
        f"cell {k}: {out.get('ename')}: {out.get('evalue')}"
        for k, cell in enumerate(nb.cells) if cell.cell_type == "code"
        for out in cell.get("outputs", []) if out.output_type == "error"
    ]


def test_there_are_lessons():
    names = [p.name for p in NOTEBOOKS]
    assert {"00_setup.ipynb", "01_elbo.ipynb", "06_coco_data.ipynb"} <= set(names), names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_lesson_is_clean(path: Path):
    nb = _read(path)
    nbformat.validate(nb)

    cells = _parameter_cells(nb)
    assert len(cells) == 1, f"{path.name}: expected exactly one cell tagged 'parameters', found {len(cells)}"
    assigned = {}
    for node in ast.parse(cells[0].source).body:
        assert isinstance(node, ast.Assign), f"{path.name}: the parameters cell should only assign values"
        for target in node.targets:
            assigned[target.id] = ast.dump(node.value)
    missing = REQUIRED_PARAMETERS - set(assigned)
    assert not missing, f"{path.name}: the parameters cell lacks {sorted(missing)}"
    smoke_default = ast.dump(ast.parse(SMOKE_DEFAULT, mode="eval").body)
    assert assigned["smoke"] == smoke_default, f"{path.name}: smoke should default to {SMOKE_DEFAULT}"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "a title comes first"

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), f"{path.name}: not executed top to bottom"
    assert sum(bool(c.outputs) for c in code) >= len(code) // 3, f"{path.name}: too few outputs; execute it"
    assert not _errors(nb), f"{path.name} holds error outputs: {_errors(nb)}"
    # The first cell's "Time" line is backed by the last cell: what the committed run took, and where
    last = code[-1]
    assert "run_time(smoke)" in last.source, f"{path.name}: the last code cell should print run_time(smoke)"
    shown = "".join(o.get("text", "") for o in last.outputs)
    assert shown.startswith("This run took ") and "with the defaults" in shown, f"{path.name}: {shown!r}"

    assert "kernelspec" in nb.metadata, f"{path.name}: no kernelspec"
    assert set(nb.metadata) <= set(KEEP_NOTEBOOK_METADATA), f"{path.name}: run metadata {sorted(nb.metadata)}"
    for k, cell in enumerate(nb.cells):
        assert set(cell.metadata) <= {"tags"}, f"{path.name} cell {k}: run metadata {sorted(cell.metadata)}"
        tags = cell.metadata.get("tags", [])
        assert "injected-parameters" not in tags, f"{path.name}: papermill's injected parameters cell"


def _tiny_lessons(folder: Path) -> list[Path]:
    """Two one-cell lessons, the second failing, with a parameters cell like the real ones."""
    folder.mkdir()
    paths = []
    for name, body in [("00_ok", "import os\nprint('value', value)\nprint(os.getcwd())"), ("01_broken", "1 / 0")]:
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        params = nbformat.v4.new_code_cell("value = 1")
        params.metadata["tags"] = ["parameters"]
        nb.cells = [nbformat.v4.new_markdown_cell(f"# {name}"), params, nbformat.v4.new_code_cell(body)]
        paths.append(folder / f"{name}.ipynb")
        nbformat.write(nb, paths[-1])
    return paths


@pytest.mark.slow
def test_run_notebooks_reports_failures_and_exports_html(tmp_path: Path):
    lessons = _tiny_lessons(tmp_path / "lessons")
    here = os.getcwd()
    results = run_notebooks(lessons, tmp_path / "build", {"value": 7}, jobs=2)  # both at once

    assert list(results) == ["00_ok.ipynb", "01_broken.ipynb"] and os.getcwd() == here  # course order; cwd kept
    assert results["00_ok.ipynb"] is None
    assert "ZeroDivisionError" in results["01_broken.ipynb"]
    executed = _read(tmp_path / "build" / "notebooks" / "00_ok.ipynb")
    # The parameter reached the kernel, which ran in the lesson's folder.
    assert executed.cells[-1].outputs[0]["text"] == f"value 7\n{tmp_path / 'lessons'}\n"
    assert _errors(_read(tmp_path / "build" / "notebooks" / "01_broken.ipynb"))  # partial output kept
    index = (tmp_path / "build" / "html" / "index.html").read_text()
    assert index.index("00_ok.html") < index.index("01_broken.html")
    assert index.count("did not run to the end") == 1 and "ZeroDivisionError" in index  # the failure, on the map
    assert ">00_ok</a>" in index  # each lesson's title (its first heading) names its link
    assert "value 7" in (tmp_path / "build" / "html" / "00_ok.html").read_text()
    assert "course-error" in (tmp_path / "build" / "html" / "01_broken.html").read_text()  # flagged on its page

    clean = strip_run_metadata(executed)
    assert set(clean.metadata) <= set(KEEP_NOTEBOOK_METADATA)
    assert all(set(c.metadata) <= {"tags"} for c in clean.cells)


def test_kernel_status_shows_the_latest_state_of_a_progress_bar():
    class Line:
        description = ""

        def set_description_str(self, text: str) -> None:
            self.description = text

    line = Line()
    status = KernelStatus(line, "02_image_vae")
    assert line.description == "  02_image_vae · starting"
    status.cell_started(nbformat.v4.new_markdown_cell("## 3. Training\n\ntext"), 9)
    status.cell_started(nbformat.v4.new_code_cell("# not a heading"), 10)
    assert line.description == "  02_image_vae · 3. Training"
    for chunk in ["\rtrain:   0%|          | 0/500", "\rtrain:  45%|####5     | 225/500 [00:12<00:14]", "\n"]:
        assert status.write(chunk) == len(chunk)
    assert line.description == "  02_image_vae · 3. Training · train:  45% 225/500 [00:12<00:14]"  # no bar


def test_run_course_rejects_the_gpu_preset(tmp_path: Path):
    args = argparse.Namespace(out=str(tmp_path), preset="coco_gpu", max_steps=None)
    with pytest.raises(SystemExit, match="coco_gpu"):
        run_course(args)


def test_run_time_gives_this_process_cpu_and_wall_time_the_mode_and_the_machine():
    started = time.perf_counter()
    while time.perf_counter() - started < 1.5:  # this process is at least 1.5 s old when it reports
        sum(i * i for i in range(10_000))
    shown = run_time(smoke=True)
    took = re.search(r"took (\d+) s of CPU time and (\d+) s of wall time", shown)
    cpu, wall = int(took.group(1)), int(took.group(2))
    assert abs(cpu - time.process_time()) < 1.5 and "in smoke mode" in shown and " cores" in shown, shown
    assert wall >= 1, shown  # the process's age, not the time since some later point
    assert "with the defaults" in run_time(smoke=False)


def test_markdown_table_formats_rows():
    table = markdown_table([{"name": "a|b", "value": 1 / 3}, {"name": "c", "value": 2}], columns=["name", "value"])
    assert table.splitlines() == ["| name | value |", "|---|---|", "| a\\|b | 0.3333 |", "| c | 2 |"]
    # a column name with a bar (KL(q(z|image) || p)) once split its header into more cells than its rows
    header = markdown_table([{"KL(q(z|image) || p)": 1.5}]).splitlines()[0]
    assert header == "| KL(q(z\\|image) \\|\\| p) |"
    with pytest.raises(ValueError):
        markdown_table([])


def test_lesson_config_picks_the_preset_and_applies_parameters():
    assert lesson_config(smoke=True).name == "tiny" and lesson_config(smoke=False).name == "cpu"
    config = lesson_config(smoke=True, max_steps=7, seed=3, device="cpu")
    assert (config.train.max_steps, config.train.seed, config.train.device) == (7, 3, "cpu")
    assert lesson_config(smoke=False, max_steps=None).train.max_steps == preset("cpu").train.max_steps


def test_coco_mini_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MVAE_COCO_MINI", str(tmp_path))
    assert coco_mini() is None  # no annotations/ folder there
    (tmp_path / "annotations").mkdir()
    assert coco_mini() == tmp_path
    assert relative(ROOT / "data" / "x") == str(Path("data") / "x")
    assert data_dir(smoke=True) != data_dir(smoke=False) and runs_dir(smoke=True).is_relative_to(ROOT / "build")


def test_papermills_noise_about_parameter_cells_is_dropped_and_its_real_warnings_kept(caplog: pytest.LogCaptureFixture):
    import logging

    import mvae_course.course  # noqa: F401  (installs the filter)

    log = logging.getLogger("papermill.translators")
    with caplog.at_level(logging.WARNING, logger="papermill.translators"):
        log.warning("Unable to parse line 4 'max_steps = None  # unused: this lesson trains nothing'.")
        log.warning("Passed unknown parameter: smoke")
        log.warning("Passed unknown parameter: max_stpes")
    assert [r.getMessage() for r in caplog.records] == ["Passed unknown parameter: max_stpes"]
