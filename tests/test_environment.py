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


def test_installed_versions_satisfy_the_declared_ranges() -> None:
    """What this environment runs (torch 2.14.1 from this machine's disk among them) is what both files admit."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    outside = {}
    for name, spec in pyproject_requirements().items():
        try:
            installed = Version(version(name))
        except PackageNotFoundError:
            outside[name] = "not installed"
            continue
        # A local build tag (torch 2.14.1+cu130) does not change which release it is.
        if Version(installed.base_version) not in SpecifierSet(spec):
            outside[name] = f"{installed} not in {spec!r}"
    assert not outside, f"installed packages outside their declared ranges: {outside}"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make run" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.MULTILINE)
