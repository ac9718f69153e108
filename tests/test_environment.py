"""environment.yml (conda) and pyproject.toml (pip) must declare the same dependencies."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
NOT_DEPENDENCIES = {"python", "pip", "-e ."}


def _split(requirement: str) -> tuple[str, str]:
    """'torch>=2.4,<2.15' -> ('torch', '>=2.4,<2.15'), names normalised as pip does."""
    match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)", requirement)
    assert match, f"cannot parse requirement {requirement!r}"
    name, spec = match.groups()
    return re.sub(r"[-_.]+", "-", name).lower(), spec.replace(" ", "")


def pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["dev"]
    return dict(_split(r) for r in requirements)


def conda_requirements() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    entries: list[str] = []
    for item in env["dependencies"]:
        entries.extend(item["pip"] if isinstance(item, dict) else [item])
    return dict(_split(e) for e in entries if e not in NOT_DEPENDENCIES and not e.startswith("python"))


def test_conda_and_pip_declare_the_same_dependencies() -> None:
    pip, conda = pyproject_requirements(), conda_requirements()
    assert set(pip) == set(conda), (
        f"only in pyproject.toml: {sorted(set(pip) - set(conda))}; "
        f"only in environment.yml: {sorted(set(conda) - set(pip))}"
    )
    differing = {name: (pip[name], conda[name]) for name in pip if pip[name] != conda[name]}
    assert not differing, f"version ranges differ (pyproject, environment.yml): {differing}"


def test_torch_range_admits_the_versions_on_this_machine() -> None:
    from packaging.specifiers import SpecifierSet

    pip = pyproject_requirements()
    assert "2.14.1" in SpecifierSet(pip["torch"])
    assert "0.29.1" in SpecifierSet(pip["torchvision"])


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make run" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.MULTILINE)
