"""The house: imports point down the layer table of docs/architecture.md, and lesson pointers are true.

Both checks read the code with `ast` (nothing is imported or run), so they also hold for code paths the
other tests never take.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mvae_course"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
POINTER = re.compile(r"notebooks/(\d\d_[a-z0-9_]+)\.ipynb")


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """mvae_course/data/cache.py -> "data.cache"; a package's __init__.py -> the package ("data", "")."""
    parts = list(path.relative_to(package).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def layer_table(text: str) -> dict[str, int]:
    """{module: layer} from the Markdown table whose first column is the layer number; modules are the
    backticked names in its other columns (the package's own `__init__` is `mvae_course`)."""
    layers: dict[str, int] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].isdigit():
            continue
        for name in re.findall(r"`([a-z_.]+)`", " ".join(cells[1:])):
            name = "" if name == "mvae_course" else name
            if name in layers:
                raise ValueError(f"{name or 'mvae_course'} is placed twice in the layer table")
            layers[name] = int(cells[0])
    return layers


def imports_of(path: Path, modules: set[str]) -> list[tuple[int, str]]:
    """(line, module) for every import of a package module in the file, at any depth (lazy ones too).

    `from mvae_course.data import cache` names the module `data.cache`; `from mvae_course.data.cache
    import X` the module `data.cache`. Importing a submodule also runs its parent packages' __init__,
    but that is Python's doing, not an arrow of the design, so it is not counted.
    """
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module != "mvae_course" and not node.module.startswith("mvae_course."):
                continue
            base = node.module.removeprefix("mvae_course").lstrip(".")
            for alias in node.names:
                full = f"{base}.{alias.name}".lstrip(".")
                found.append((node.lineno, full if full in modules else base))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "mvae_course" or alias.name.startswith("mvae_course."):
                    found.append((node.lineno, alias.name.removeprefix("mvae_course").lstrip(".")))
    return found


def layer_violations(package: Path, layers: dict[str, int]) -> list[str]:
    """Every module missing from the table, and every import that does not point to a lower layer."""
    modules = package_modules(package)
    problems = [f"{package.name}/{p.relative_to(package)} ({m or 'mvae_course'}) is not placed in the table"
                for m, p in modules.items() if m not in layers]
    for name, path in modules.items():
        if name not in layers:
            continue
        for line, target in imports_of(path, set(modules)):
            if target == name or target not in layers:
                continue
            if layers[target] >= layers[name]:
                way = "sideways" if layers[target] == layers[name] else "up"
                problems.append(
                    f"{path.relative_to(package.parent)}:{line}: {name} (layer {layers[name]}) imports "
                    f"{target} (layer {layers[target]}): an import that points {way}"
                )
    return problems


def test_every_module_is_placed_and_every_import_points_down():
    assert layer_violations(PACKAGE, layer_table(ARCHITECTURE.read_text(encoding="utf-8"))) == []


def test_what_the_lessons_import_leaves_torchvision_and_transformers_out():
    # Each takes seconds to import (torchvision brings torch._dynamo), at the start of every lesson's kernel,
    # every grader's kernel and every training process; they load where they are used (lesson 07's naive
    # pipeline, the WordPiece tokenizer).
    modules = ["notebook", "plots", "train", "evaluate", "reference", "compare", "judge", "data.prepare",
               "data.cache", "data.coco", "data.shapes", "models.mvae"]
    code = (f"import sys, {', '.join('mvae_course.' + m for m in modules)}; "
            "print(sorted(m for m in ('torchvision', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout


def test_a_planted_upward_import_is_caught(tmp_path):
    package = tmp_path / "mvae_course"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "data" / "__init__.py").write_text("")
    (package / "config.py").write_text("from mvae_course.train import train  # up\n")
    (package / "train.py").write_text("def f():\n    from mvae_course.data import cache  # down, lazily\n")
    (package / "data" / "cache.py").write_text("import mvae_course.config  # sideways\n")
    (package / "stray.py").write_text("")
    table = "\n".join(["| layer | modules |", "|---|---|", "| 2 | `train` |",
                       "| 1 | `mvae_course`, `data`, `config`, `data.cache` |"])
    problems = layer_violations(package, layer_table(table))
    assert any("config (layer 1) imports train (layer 2): an import that points up" in p for p in problems)
    assert any("data.cache (layer 1) imports config (layer 1): an import that points sideways" in p
               for p in problems)
    assert any("stray.py (stray) is not placed" in p for p in problems)
    assert len(problems) == 3, problems


# --- "Taught in notebooks/X" pointers ---------------------------------------------------------------


def lesson_text(stem: str) -> str | None:
    """All markdown and code of a lesson (no outputs), or None when there is no such lesson."""
    path = ROOT / "notebooks" / f"{stem}.ipynb"
    if not path.is_file():
        return None
    return "\n".join(cell.source for cell in nbformat.read(path, as_version=4).cells)


def pointers(path: Path) -> list[tuple[str, str, int, list[str]]]:
    """(object, kind, line, lessons) for every docstring with a "Taught in notebooks/..." pointer."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    nodes = [(tree, "module")] + [
        (node, "object") for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    ]
    for node, kind in nodes:
        doc = ast.get_docstring(node) or ""
        sentence = doc[doc.find("Taught in"):] if "Taught in" in doc else ""
        sentence = sentence.split("\n\n")[0]
        lessons = POINTER.findall(sentence)
        if lessons:
            name = module_name(path) if kind == "module" else node.name
            found.append((name, kind, getattr(node, "lineno", 1), lessons))
    return found


def mentions(text: str, name: str, kind: str) -> bool:
    if kind == "module":  # the lesson imports from the module, or names its file
        dotted = f"mvae_course.{name}" if name else "mvae_course"
        path = f"mvae_course/{name.replace('.', '/')}"
        return re.search(rf"{re.escape(dotted)}\b", text) is not None or path in text
    return re.search(rf"\b{re.escape(name)}\b", text) is not None


def test_every_lesson_pointer_names_a_lesson_that_uses_the_object():
    texts: dict[str, str | None] = {}
    wrong = []
    for name, path in package_modules().items():
        for obj, kind, line, lessons in pointers(path):
            for stem in lessons:
                text = texts.setdefault(stem, lesson_text(stem))
                where = f"{path.relative_to(ROOT)}:{line} {obj or 'mvae_course'}"
                if text is None:
                    wrong.append(f"{where}: notebooks/{stem}.ipynb does not exist")
                elif not mentions(text, obj, kind):
                    wrong.append(f"{where}: notebooks/{stem}.ipynb never mentions it")
    assert wrong == [], "\n".join(wrong)


@pytest.mark.parametrize("text, name, kind, expected", [
    ("from mvae_course.train import train", "train", "module", True),
    ("the file mvae_course/data/cache.py", "data.cache", "module", True),
    ("from mvae_course.training import x", "train", "module", False),
    ("result = train_or_load(config)", "train", "object", False),
    ("result = train_or_load(config)", "train_or_load", "object", True),
])
def test_mentions_is_a_whole_word_check(text, name, kind, expected):
    assert mentions(text, name, kind) is expected
