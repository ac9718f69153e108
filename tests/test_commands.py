"""Every command the course shows works as shown.

The commands are collected from the READMEs, docs/, and the Markdown cells (and code cells' comments) of the
lessons, the exercises and the solutions: inline code spans and code-block lines that start with `mvae-course`,
`python -m mvae_course` (either with a `.venv/bin/` prefix), `torchrun ... -m mvae_course` or `make`. A `...`
among the arguments stands for arguments left out and is dropped. Each command is checked as follows:
- a course command is parsed by the real argument parser (mvae_course/cli.py) with the arguments shown, so a
  flag, a choice or a subcommand the CLI does not accept fails here; the notebooks a `grade` command names exist;
- the cheap ones then run for real, writing into a temporary folder instead of the shown one: `shapes` (with a
  few small images), `prepare` (on coco-mini, when present) and `exercises check` / `build` / `release`. Training, evaluation,
  comparison, grading, the course runner and the site builder take minutes or need earlier runs: they are parsed
  only (the tests of those modules run their code);
- a `make` command must name a target `make -n` accepts, and the course commands its recipe would run are
  checked as above.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
import tokenize
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import nbformat
import pytest

from mvae_course.cli import build_parser, main
from mvae_course.notebook import ROOT

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md"))]
NOTEBOOKS = [p for folder in ("notebooks", "exercises", "solutions") for p in sorted((ROOT / folder).glob("*.ipynb"))]
COURSE = re.compile(r"(?:^|(?<=\s))(?:\.venv/bin/)?(?:mvae-course|python3? -m mvae_course|torchrun\s.*?-m mvae_course)(?=\s|$)")
MAKE = re.compile(r"\bmake [a-z]")
RUNS_FOR_REAL = {"shapes", "prepare", "exercises"}


def _code_lines(markdown: str) -> list[str]:
    """Inline code spans and the lines of fenced and indented code blocks (comments dropped)."""
    fenced = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.MULTILINE | re.DOTALL)
    lines = [line for block in fenced.findall(markdown) for line in block.splitlines()]
    prose = fenced.sub("", markdown)
    lines += re.findall(r"`([^`\n]+)`", prose)
    lines += [line for line in prose.splitlines() if line.startswith("    ") and not line.lstrip().startswith("-")]
    return [re.sub(r"\s#.*$", "", line).strip() for line in lines]


def _comments(code: str) -> str:
    """A code cell's comments, where it shows commands in backticks."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(code).readline))
    except (tokenize.TokenError, SyntaxError):
        return ""
    return "\n".join(t.string for t in tokens if t.type == tokenize.COMMENT)


def shown_commands(text: str) -> list[str]:
    """The course and make commands in a piece of Markdown."""
    commands = []
    for line in _code_lines(text):
        match = COURSE.search(line) or MAKE.match(line)
        if match:
            commands.append(line[match.start():])
    return commands


def _sources() -> list[tuple[str, str]]:
    found = []
    for path in DOCUMENTS:
        found += [(path.relative_to(ROOT).as_posix(), c) for c in shown_commands(path.read_text())]
    for path in NOTEBOOKS:
        for k, cell in enumerate(nbformat.read(path, as_version=4).cells):
            where = f"{path.relative_to(ROOT).as_posix()} cell {k}"
            text = cell.source if cell.cell_type == "markdown" else _comments(cell.source)
            found += [(where, c) for c in shown_commands(text)]
    return list(dict.fromkeys(found))


def course_argv(command: str) -> list[str]:
    """`python -m mvae_course train --preset cpu` -> ['train', '--preset', 'cpu'] (any of the shown prefixes).

    A `...` stands for arguments left out ("as above"): it is dropped, and the rest must parse.
    """
    words = shlex.split(command, comments=True)
    for k, word in enumerate(words):
        if word.endswith("mvae-course") or (word == "mvae_course" and k and words[k - 1] == "-m"):
            return [w for w in words[k + 1:] if w != "..."]
    raise ValueError(f"not a course command: {command}")


def parse_error(argv: list[str]) -> str | None:
    """What the real parser says about these arguments; None when it accepts them."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as e:
        if e.code == 0:
            return None  # --help
        return stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue().strip() else f"exit {e.code}"
    return None


def _redirect(argv: list[str], flag: str, value: Path | int) -> list[str]:
    """The shown arguments with `flag`'s value replaced (or the flag added)."""
    if flag in argv:
        k = argv.index(flag)
        return [*argv[:k + 1], str(value), *argv[k + 2:]]
    return [*argv, flag, str(value)]


def check_course_command(command: str, tmp_path: Path) -> None:
    argv = course_argv(command)
    if not argv:
        return  # the program named in prose, not a command
    error = parse_error(argv)
    assert error is None, f"`{command}` is rejected by the CLI: {error}"
    if "--help" in argv or "-h" in argv:
        return
    args = build_parser().parse_args(argv)
    if args.command == "grade":  # the course's own notebooks must exist (an instructor's submissions/ need not)
        ours = [p for p in args.paths if p.parts[0] in ("exercises", "solutions")]
        missing = [str(p) for p in ours if not (ROOT / p).is_file()]
        assert not missing, f"`{command}` grades notebooks that do not exist: {missing}"
    if args.command not in RUNS_FOR_REAL:
        return  # parsed only: see the module docstring
    if args.command == "shapes":  # a few small images: the shown sizes take seconds more, through the same code
        argv = _redirect(argv, "--out", tmp_path / "shapes")
        for flag, value in (("--train", 8), ("--val", 4), ("--image-size", 32)):
            argv = _redirect(argv, flag, value)
    elif args.command == "prepare":
        if not (ROOT / args.root / "annotations").is_dir():
            pytest.skip(f"`{command}` reads {args.root}, which is absent here")
        argv = _redirect(argv, "--out", tmp_path / "cache" / "train")
    elif args.action == "build":
        argv = _redirect(argv, "--exercises", tmp_path / "exercises")
    elif args.action == "release":  # into a new temporary folder, not the shown one
        argv = [str(tmp_path / "handout") if a.rstrip("/") == str(args.out) else a for a in argv]
    assert main(argv) == 0, f"`{command}` (run as `{shlex.join(argv)}`) failed"


def check_make_command(command: str, tmp_path: Path) -> None:
    words = shlex.split(command, comments=True)
    dry = subprocess.run(["make", "-n", "-C", str(ROOT), *words[1:]], capture_output=True, text=True)
    assert dry.returncode == 0, f"`{command}`: {dry.stderr.strip() or dry.stdout.strip()}"
    for line in dry.stdout.splitlines():
        if COURSE.search(line):
            check_course_command(line[COURSE.search(line).start():], tmp_path)


SHOWN = _sources()


def test_the_course_shows_commands():
    shown = {command.split()[0] for _, command in SHOWN}
    assert {"make", "python"} <= shown and len(SHOWN) >= 20, SHOWN


@pytest.mark.parametrize(("where", "command"), SHOWN, ids=[f"{w}: {c}" for w, c in SHOWN])
def test_shown_command_works(where: str, command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(ROOT)  # commands are shown as typed in the repository's root
    if MAKE.match(command):
        check_make_command(command, tmp_path)
    else:
        check_course_command(command, tmp_path)


def test_a_flag_the_cli_does_not_accept_fails(tmp_path: Path):
    markdown = "Run\n\n```bash\nmvae-course shapes --out data/x --no-such-flag 3   # typo\n```\nor `make nosuchtarget`."
    shown = shown_commands(markdown)
    assert shown == ["mvae-course shapes --out data/x --no-such-flag 3", "make nosuchtarget"]
    with pytest.raises(AssertionError, match="unrecognized arguments: --no-such-flag"):
        check_course_command(shown[0], tmp_path)
    with pytest.raises(AssertionError, match="No rule to make target"):
        check_make_command(shown[1], tmp_path)
    with pytest.raises(AssertionError, match="invalid choice"):
        check_course_command("python -m mvae_course prepare --root r --split s --out o --on-bad-image ignore", tmp_path)
    with pytest.raises(AssertionError, match="do not exist"):
        check_course_command("mvae-course grade exercises/99_none_exercises.ipynb", tmp_path)


def test_the_console_entry_point_runs_the_same_commands():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"mvae-course": "mvae_course.cli:main"}
    installed = entry_points(group="console_scripts", name="mvae-course")
    if not installed:
        pytest.skip("the package is not installed in this Python (`make install` installs it, with .venv/bin/mvae-course)")
    assert next(iter(installed)).load() is main  # the same function as `python -m mvae_course`
    assert (Path(sys.executable).parent / "mvae-course").is_file(), "no mvae-course script beside this Python"
