"""The grader against hostile submissions (issue 17): every attack graded as one batch beside three innocent
solutions, once with the sandbox ("auto": bubblewrap where it runs) and once without it ("none").

Each test checks the attacker's own grade, the innocents' full marks and an intact gradebook (JSON and CSV).
Without bubblewrap some attacks cannot be contained (a kernel running as the grader's own user may delete
its files or kill it): a batch leaves out the attacks its confinement cannot hold, and those tests skip,
saying so; the warning that such a grading is not isolated is tested instead. Set MVAE_REQUIRE_BWRAP=1 (CI
does) to fail, not skip, where bubblewrap cannot run.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import shutil
import site
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

from mvae_course import cli
from mvae_course.grading.grader import (
    NotebookGrade, _helper_failure, check_record, format_report, grade_notebooks, write_gradebook_csv,
)
from mvae_course.grading.question import Verdict
from mvae_course.grading import sandbox
from mvae_course.grading.sandbox import PACKAGE, Confinement, KernelBox, Limits, confinement

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "solutions"
SOLUTION, STUBS = SOLUTIONS / "01_elbo_exercises.ipynb", ROOT / "exercises/01_elbo_exercises.ipynb"
INNOCENTS = ("alice_01_elbo_exercises", "bob_03_text_exercises", "carol_08_evaluation_exercises")
CALL_TIMEOUT = 4


def _code(path: Path) -> list[str]:
    """A notebook's code cells, without its check cells."""
    cells = nbformat.read(path, as_version=4).cells
    return [c.source for c in cells if c.cell_type == "code" and not c.source.startswith("check(")]


def _write(folder: Path, name: str, sources: list[str]) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    nb.metadata["mvae_course"] = {"exercises": "01_elbo_exercises"}
    path = folder / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


@dataclass(frozen=True)
class Where:
    """What an attacker is assumed to know: the instructor's paths."""

    folder: Path  # the submissions
    gradebook: Path
    gradebook_csv: Path
    marker: Path  # created only if the grader ran the attacker's pickle
    host_tmp: Path  # a file in the grader's /tmp that a kernel with a private /tmp cannot create
    port: int  # the grader's machine listens on 127.0.0.1:port


# --- the attacks ------------------------------------------------------------------------------------------

FORGE = '''
import os, pickle, torch
_load, _save = torch.load, torch.save

class Boom:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))

def load(f, *args, **kwargs):  # q1 sees no test case: zero outputs would match anything
    return [] if "q1.in" in str(f) else _load(f, *args, **kwargs)

def save(obj, f, *args, **kwargs):
    name = os.path.basename(str(f))
    if name.startswith("q2."):
        return _save([obj], f)  # a list, not the grader's record
    if name.startswith("q3."):
        with open(f, "wb") as out:
            pickle.dump(Boom(), out)  # code, not data
        return None
    if name.startswith("q4."):
        return _save({{"outputs": obj.get("outputs", []) * 2}}, f)  # more outputs than cases
    if name.startswith("q5."):
        return os.symlink("/etc/passwd", f)  # a link, not a file
    return _save(obj, f, *args, **kwargs)

torch.load, torch.save = load, save
'''

FAKE = "\\n  total                    10/10\\nall notebooks: 999/999\\x1b[2K"
NOISE = [
    f'print("{FAKE}")',
    'print("x" * 20_000_000)  # one message larger than the grader reads',
    'for _ in range(40):\n    print("y" * 100_000)',
    "hog = bytearray(16 * 2**30)  # more memory than a kernel may have",
    f'raise RuntimeError("{FAKE}")',
    f'def kl_normal(mu_q, logvar_q, mu_p, logvar_p):\n    raise ValueError("{FAKE}")',
]

LOOP = '''
import signal, time

def kl_normal(mu_q, logvar_q, mu_p, logvar_p):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:  # sleeping, not spinning, to spare the test machine's cores: the grader cannot tell
        time.sleep(0.1)
'''

READ_SOLUTIONS = '''
import json
nb = json.load(open("{solutions}/01_elbo_exercises.ipynb"))
for cell in nb["cells"]:
    source = "".join(cell["source"])
    if cell["cell_type"] == "code" and not source.startswith("check("):
        exec(source, globals())
'''
REACH_OUT = '''
import socket
with open("{host_tmp}", "w") as f:  # the grader's /tmp, or a private one
    f.write("rita was here")
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
except OSError:
    pass
else:
    raise RuntimeError("reached the grader's loopback")
'''

VANDALISE = '''
import glob, os, site
import mvae_course.grading as grading
refused = []

def attempt(fn, *args):
    try:
        fn(*args)
    except OSError as err:
        refused.append(type(err).__name__)

def append(path, text):
    with open(path, "a") as f:
        f.write(text)

for name in ("grader.py", "question.py", "registry.py"):  # every later grading would give full marks
    attempt(append, os.path.join(os.path.dirname(grading.__file__), name), "\\nraise SystemExit  # vandal\\n")
for folder in site.getsitepackages():
    attempt(append, os.path.join(folder, "sitecustomize.py"), "import builtins  # vandal\\n")
    attempt(append, os.path.join(folder, "zz_vandal.pth"), "import os\\n")
for path in glob.glob("{folder}/*.ipynb"):  # classmates' notebooks
    attempt(append, path, "vandal")
print(refused)
'''

KILL = '''
import os, signal
me = os.getpid()
for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:  # siblings, the grader, anything
    if pid != me:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
try:
    os.kill(os.getppid(), signal.SIGKILL)
except OSError:
    pass
'''

DAEMON = '''
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        for _ in range(600):  # a minute of rewriting the gradebook, long after grading
            for path in ("{gradebook}", "{gradebook_csv}"):
                try:
                    with open(path, "w") as f:
                        f.write("forged: dan 10/10")
                except OSError:
                    pass
            time.sleep(0.1)
    os._exit(0)
'''

FORK_BOMB = '''
import os, time
forked = 0
try:
    while True:
        if os.fork() == 0:
            try:
                os.fork()
            except OSError:
                pass
            time.sleep(60)
            os._exit(0)
        forked += 1
except OSError:
    raise RuntimeError(f"fork refused after {forked} forks") from None
'''


@dataclass(frozen=True)
class Attack:
    """A hostile submission: its author, its cells, and what must confine it ("limits": any grading;
    "uid": bubblewrap or a uid per kernel; "processes": a process limit that applies)."""

    author: str
    cells: Callable[[Where], list[str]]
    needs: str = "limits"


ATTACKS = {
    "forge": Attack("mallory", lambda w: _code(SOLUTION) + [FORGE.format(marker=w.marker)]),
    "noise": Attack("eve", lambda w: _code(SOLUTION) + NOISE),
    "loop": Attack("lou", lambda w: _code(SOLUTION) + [LOOP]),
    "read_solutions": Attack("rita", lambda w: _code(STUBS) + [
        REACH_OUT.format(host_tmp=w.host_tmp, port=w.port), READ_SOLUTIONS.format(solutions=SOLUTIONS),
    ]),
    # Three attacks on the machine in one notebook (a kernel each would cost the tests seconds of CPU).
    "sabotage": Attack("victor", lambda w: _code(SOLUTION) + [
        VANDALISE.format(folder=w.folder), KILL,
        DAEMON.format(gradebook=w.gradebook, gradebook_csv=w.gradebook_csv),
    ], "uid"),
    "fork_bomb": Attack("boris", lambda w: [FORK_BOMB], "processes"),
}
# eve's file name tries to start a line of the report of its own (a file name cannot hold a slash)
FILE_NAMES = {"noise": "eve_01_elbo_exercises\nall notebooks: 999 of 999"}
BAD_FILES = {  # name: content; none of them is a notebook the grader can run
    "ivan_02_image_exercises.ipynb": "{not json",
    "emma_03_text_exercises.ipynb": "",
    "paul_04_fusion_exercises.py": "def product_of_experts(mu, logvar):\n    return mu\n",
    "homework.ipynb": nbformat.writes(nbformat.v4.new_notebook()),
}


def contained(attack: Attack, conf: Confinement) -> bool:
    if attack.needs == "uid":
        return conf.bwrap or conf.own_uids
    if attack.needs == "processes":  # root is exempt from RLIMIT_NPROC
        return conf.bwrap or conf.own_uids or os.geteuid() != 0
    return True


def _digest(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.py"))
            if "__pycache__" not in p.parts}


def _processes_under(folder: Path) -> list[str]:
    """Command lines of live processes that mention `folder` (every kernel's connection file is in it)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(folder) in cmdline and state != "Z":
            found.append(f"{pid}: {cmdline[:200]}")
    return found


@pytest.fixture(scope="module", params=["auto", "none"])
def batch(request, tmp_path_factory) -> dict:
    """Innocents, attackers and bad files in one folder, graded by one `grade` command."""
    mode = request.param
    conf = confinement(mode)
    if mode == "auto" and not conf.bwrap:
        if os.environ.get("MVAE_REQUIRE_BWRAP") == "1":
            pytest.fail(f"MVAE_REQUIRE_BWRAP=1 but bubblewrap cannot run here: {conf.missing}")
        pytest.skip(f"bubblewrap cannot run here ({conf.missing}); the 'none' batch tests the fallback")
    out = tmp_path_factory.mktemp(f"attacks-{mode}")
    folder = out / "submissions"
    folder.mkdir()
    listener = socket.create_server(("127.0.0.1", 0))
    request.addfinalizer(listener.close)
    host_tmp = Path(tempfile.gettempdir(), f"mvae-rita-{os.getpid()}-{mode}")
    host_tmp.unlink(missing_ok=True)
    request.addfinalizer(lambda: host_tmp.unlink(missing_ok=True))
    where = Where(folder, out / "grades.json", out / "grades.csv", out / "pwned-by-mallory", host_tmp,
                  listener.getsockname()[1])
    innocents = {}
    for name in INNOCENTS:
        innocents[name] = folder / f"{name}.ipynb"
        innocents[name].write_bytes((ROOT / "solutions" / f"{name.split('_', 1)[1]}.ipynb").read_bytes())
    attackers = {key: _write(folder, FILE_NAMES.get(key, f"{a.author}_01_elbo_exercises"), a.cells(where))
                 for key, a in ATTACKS.items() if contained(a, conf)}
    bad = {}
    for name, text in BAD_FILES.items():
        bad[name] = folder / name
        bad[name].write_text(text)
    originals = {p: p.read_bytes() for p in folder.iterdir()}
    paths = [*innocents.values(), *attackers.values(), *bad.values()]
    package = _digest(PACKAGE)
    # Every kernel's folder goes under `boxes`, so that the processes of this batch can be told apart.
    boxes = Path(tempfile.mkdtemp(prefix="mvae-test-boxes-"))
    boxes.chmod(0o711)  # kernels under their own uid must reach their folders in it
    request.addfinalizer(lambda: shutil.rmtree(boxes, ignore_errors=True))
    stdout, stderr = io.StringIO(), io.StringIO()
    start = time.monotonic()
    command = ["grade", *map(str, paths), "--json", str(where.gradebook), "--csv", str(where.gradebook_csv),
               "--jobs", "4", "--call-timeout", str(CALL_TIMEOUT), "--sandbox", mode]
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stderr):
        mp.setattr(sandbox, "_box_parent", lambda: str(boxes))
        status = cli.main(command)
    seconds = time.monotonic() - start
    written = (where.gradebook.read_bytes(), where.gradebook_csv.read_bytes())
    if "sabotage" in attackers:
        time.sleep(2)  # a daemon left behind would rewrite the gradebook by now
    data = json.loads(where.gradebook.read_text())
    by_path = {s["path"]: s for s in data["submissions"]}
    return {
        "mode": mode, "conf": conf, "status": status, "seconds": seconds,
        "report": stdout.getvalue(), "stderr": stderr.getvalue(), "where": where, "data": data,
        "written": written,
        "rows": list(csv.DictReader(io.StringIO(where.gradebook_csv.read_text()))), "paths": paths,
        "grade": {key: by_path[str(p)] for key, p in {**innocents, **attackers, **bad}.items()},
        "innocents": innocents, "attackers": attackers, "bad": bad, "originals": originals,
        "package_before": package, "package_after": _digest(PACKAGE), "leftovers": _processes_under(boxes),
    }


def full_marks(g: dict) -> bool:
    """Every automatically graded question passed (written answers wait for the instructor: pending)."""
    return g["points"] == sum(q["max_points"] for q in g["questions"] if not q["pending"]) > 0


def honest(g: dict, but: tuple[str, ...]) -> float:
    """The points of every automatically graded question of `g` but those named: what honest answers earn."""
    return sum(q["max_points"] for q in g["questions"] if not q["pending"] and q["question"] not in but)


def _attacker(batch: dict, key: str) -> dict:
    """The attacker's grade, after checking that the innocents kept full marks beside it."""
    attack = ATTACKS[key]
    if key not in batch["attackers"]:
        pytest.skip(f"{attack.author}'s attack ({key}) needs {attack.needs} to be contained, which this "
                    f"grading lacks ({batch['conf'].describe()}): it is left out of this batch")
    for name in INNOCENTS:
        g = batch["grade"][name]
        assert full_marks(g) and g["problem"] is None, (name, g)
    return batch["grade"][key]


def _feedback(grade: dict) -> dict[str, str]:
    return {q["question"]: q["feedback"] for q in grade["questions"]}


# --- the batch as a whole ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_gradebook_is_complete_and_matches_the_csv(batch):
    data, rows = batch["data"], batch["rows"]
    assert batch["status"] == 2  # some files could not be graded; they are named below
    assert [s["path"] for s in data["submissions"]] == list(map(str, batch["paths"]))
    assert data["points"] == sum(s["points"] for s in data["submissions"])
    assert len(rows) == sum(max(1, len(s["questions"])) for s in data["submissions"])
    for s in data["submissions"]:
        mine = [r for r in rows if r["path"] == s["path"]]
        assert sum(float(r["points"]) for r in mine) == s["points"]
        assert [r["question"] for r in mine] == ([q["question"] for q in s["questions"]] or [""])
    assert data["isolated"] is batch["conf"].bwrap


@pytest.mark.slow
def test_bad_files_are_named_and_score_zero(batch):
    for name, path in batch["bad"].items():
        g = batch["grade"][name]
        assert g["problem"] and g["problem"].startswith(str(path)) and g["points"] == 0, g
        assert f"error: {path}" in batch["stderr"]
        assert all(q["feedback"].startswith("not graded") for q in g["questions"])
    reasons = {name: batch["grade"][name]["problem"] for name in batch["bad"]}
    assert "not a valid notebook" in reasons["ivan_02_image_exercises.ipynb"]
    assert "not a valid notebook" in reasons["emma_03_text_exercises.ipynb"]
    assert "not a notebook (.ipynb)" in reasons["paul_04_fusion_exercises.py"]
    assert "cannot tell which exercise notebook" in reasons["homework.ipynb"]
    assert len(batch["grade"]["ivan_02_image_exercises.ipynb"]["questions"]) > 0  # known from its name: zeros


@pytest.mark.slow
def test_warns_once_exactly_when_not_isolated(batch):
    warnings = [line for line in batch["stderr"].splitlines() if line.startswith("warning:")]
    if batch["conf"].bwrap:
        assert warnings == []
    else:
        assert len(warnings) == 1 and "submissions are not isolated" in warnings[0]


@pytest.mark.slow
def test_no_process_outlives_grading(batch):
    assert batch["leftovers"] == []


# --- one test per attack -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_forged_result_files_score_zero_each_with_its_reason(batch):
    g = _attacker(batch, "forge")
    feedback = _feedback(g)
    forged = ("q1", "q2", "q3", "q4", "q5")
    assert all(q["points"] == 0 for q in g["questions"] if q["question"] in forged)
    assert g["points"] == honest(g, but=forged)  # the questions it did not forge still count
    assert re.search(r"has 0 outputs for \d+ test cases", feedback["q1"])  # torch.load replaced: no cases
    assert "is a list, not the grader's record" in feedback["q2"]
    assert "returned something other than tensors" in feedback["q3"]  # a pickle of code: never run
    assert re.search(r"has \d+ outputs for \d+ test cases", feedback["q4"])
    assert "not a plain file" in feedback["q5"]
    assert not batch["where"].marker.exists()


@pytest.mark.slow
def test_fake_report_lines_and_floods_of_output_are_contained(batch):
    g = _attacker(batch, "noise")
    # q2's elbo calls her own kl_normal, which raises: what her honest answers earn is the rest
    assert g["points"] == honest(g, but=("q1", "q2")) and "ValueError" in _feedback(g)["q1"], _feedback(g)
    assert any("cell output beyond" in note for note in g["notes"])
    assert any(f"more than {Limits().message} bytes" in note for note in g["notes"])  # the 20 MB message
    assert any("MemoryError" in e for e in g["cell_errors"])
    lines = batch["report"].splitlines()
    assert "\x1b" not in batch["report"]
    assert [line for line in lines if line.startswith("all notebooks:")] == [
        f"all notebooks: {batch['data']['points']:g}/{batch['data']['max_points']:g}"
    ]
    totals = [line for line in lines if re.fullmatch(r"  total\s+[\d.]+/[\d.]+", line)]
    assert len(totals) == len(batch["paths"])  # one per file: none made by eve
    assert any("eve_01_elbo_exercises\\nall notebooks" in line for line in lines)  # her file name, escaped


@pytest.mark.slow
def test_a_loop_that_ignores_sigint_is_killed_at_its_timeout(batch):
    g = _attacker(batch, "loop")
    feedback = _feedback(g)
    assert g["points"] == 0
    assert f"did not finish within {CALL_TIMEOUT}" in feedback["q1"]
    assert "ignored the interrupt" in feedback["q1"]
    assert all("the kernel was stopped" in feedback[q] for q in ("q2", "q3", "q4", "q5"))


@pytest.mark.slow
def test_solutions_the_network_and_tmp_are_out_of_reach_in_the_sandbox(batch):
    g = _attacker(batch, "read_solutions")
    reached = any("reached the grader's loopback" in e for e in g["cell_errors"])
    if batch["conf"].bwrap:
        assert g["points"] == 0 and any("No such file" in e for e in g["cell_errors"]), g
        assert not reached and not batch["where"].host_tmp.exists()
    else:  # without the sandbox all three can be reached: that is what the warning says
        assert full_marks(g) and reached and batch["where"].host_tmp.exists()


@pytest.mark.slow
def test_vandalism_leaves_the_package_site_packages_and_classmates_untouched(batch):
    g = _attacker(batch, "sabotage")
    assert full_marks(g) and g["cell_errors"] == []
    assert batch["package_after"] == batch["package_before"]
    for folder in site.getsitepackages():
        for name in ("sitecustomize.py", "zz_vandal.pth"):
            assert not (Path(folder) / name).exists()
    for path, data in batch["originals"].items():
        assert path.read_bytes() == data, path


@pytest.mark.slow
def test_killing_siblings_and_the_grader_fails(batch):
    g = _attacker(batch, "sabotage")
    assert full_marks(g)  # its own kernel survived too; so did the grader (this process)


@pytest.mark.slow
def test_a_daemon_cannot_rewrite_the_gradebook(batch):
    g = _attacker(batch, "sabotage")
    assert full_marks(g)
    where = batch["where"]
    assert (where.gradebook.read_bytes(), where.gradebook_csv.read_bytes()) == batch["written"]
    assert batch["leftovers"] == []


@pytest.mark.slow
def test_a_fork_bomb_is_bounded_by_the_process_limit(batch):
    g = _attacker(batch, "fork_bomb")
    assert g["points"] == 0
    found = [re.search(r"fork refused after (\d+) forks", e) for e in g["cell_errors"]]
    refused = [int(m.group(1)) for m in found if m]
    assert refused and 0 < refused[0] <= Limits().processes, g["cell_errors"]
    assert batch["leftovers"] == []


# --- without kernels ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value", [("--timeout", "0"), ("--timeout", "-3"), ("--call-timeout", "nan"),
                                         ("--notebook-timeout", "0"), ("--jobs", "0")])
def test_timeouts_and_jobs_must_be_positive(flag, value, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["grade", str(SOLUTION), flag, value])
    assert exit.value.code == 2
    assert "must be" in capsys.readouterr().err
    with pytest.raises(ValueError, match="positive number of seconds"):
        grade_notebooks([SOLUTION], timeout=0)


def test_records_are_checked_before_they_are_judged():
    import torch

    good = {"outputs": [torch.ones(2), (1, 2.0), {"a": None}]}
    assert check_record(good, 3) is None
    assert check_record({"outputs": [], "module": "x"}, 0) is None  # keys it does not know are ignored
    assert check_record({"error": "missing"}, 3) is None
    for record, problem in [
        ([1, 2], "is a list"),
        ({"outputs": [torch.ones(1)]}, "has 1 outputs for 3 test cases"),
        ({"outputs": "abc"}, "invalid 'outputs'"),
        ({"error": "hacked"}, "invalid 'error'"),
        ({"error": "exception", "case": -1, "message": "m"}, "invalid 'case'"),
        ({"error": "exception", "message": "m"}, "no 'case' entry"),
        ({}, "neither outputs nor an error"),
        ({"outputs": [torch.ones(1).to_sparse()] * 3}, "not a plain CPU tensor"),
        ({"outputs": [{1: 2}] * 3}, "not plain data"),
        ({"outputs": [torch.zeros(10**7 + 1)] * 3}, "more than"),
    ]:
        assert problem in (check_record(record, 3) or ""), (record, problem)


def test_a_broken_grading_helper_is_named():
    error = nbformat.v4.new_output("error", ename="ImportError", evalue="torch halted", traceback=[])
    cell = nbformat.v4.new_code_cell("import torch", outputs=[error])
    assert "helper could not run in this kernel (ImportError: torch halted)" in _helper_failure(cell)
    assert _helper_failure(nbformat.v4.new_code_cell("x = 1")) is None


def test_report_and_csv_escape_what_a_submission_wrote(tmp_path):
    v = Verdict("q1", "f", "t", 0, 2, "raised ValueError: x\n  total  10/10\x1b[2K")
    g = NotebookGrade("sub\n  total 9/9.ipynb", "01_elbo_exercises", 1, [v],
                      ["cell 1: E: a\nall notebooks: 9/9"])
    lines = format_report([g]).splitlines()
    assert len(lines) == 4 and lines[2] == "  total   0/2", lines  # header, q1, total, note: one line each
    assert "\x1b" not in "".join(lines) and lines[1].endswith("x\\n  total  10/10\\x1b[2K")
    write_gradebook_csv([NotebookGrade("=cmd|'/c calc'!A1", "x", 1, [v])], tmp_path / "g.csv")
    rows = list(csv.reader((tmp_path / "g.csv").open()))
    assert rows[1][0] == "'=cmd|'/c calc'!A1"


def test_result_files_must_be_plain_files(tmp_path):
    with KernelBox(Confinement(bwrap=False, own_uids=False), Limits(result=10), None) as box:
        assert box.take("absent.pt") is None
        (box.work / "link.pt").symlink_to("/etc/passwd")
        (box.work / "big.pt").write_bytes(b"x" * 11)
        os.mkfifo(box.work / "pipe.pt")
        problems = [("link.pt", "not a plain file"), ("big.pt", "larger than 10"), ("pipe.pt", "plain")]
        for name, problem in problems:
            with pytest.raises(ValueError, match=problem):
                box.take(name)
        root = box.root
    assert not root.exists()


@pytest.mark.slow
def test_a_notebook_past_its_deadline_is_killed(tmp_path):
    sleeper = _write(tmp_path, "sam_01_elbo_exercises",
                     ["import time\nfor _ in range(60):\n    time.sleep(1)"])
    with pytest.warns() if not confinement("auto").bwrap else contextlib.nullcontext():
        [g] = grade_notebooks([sleeper], notebook_timeout=4)
    assert g.points == 0 and g.seconds < 40, g  # not the minute its cell would sleep
    assert any("ran past its 4 s deadline" in note for note in g.notes)
    feedback = [v.feedback for v in g.verdicts]
    assert all("died" in f or "stopped" in f for f in feedback), feedback


@pytest.mark.slow
def test_kernels_die_with_the_grader(tmp_path):
    conf = confinement("auto")
    if not conf.bwrap:
        if os.environ.get("MVAE_REQUIRE_BWRAP") == "1":
            pytest.fail(f"MVAE_REQUIRE_BWRAP=1 but bubblewrap cannot run here: {conf.missing}")
        pytest.skip(f"only a sandbox dies with the grader, and bubblewrap cannot run here ({conf.missing})")
    sleeper = _write(tmp_path, "sam_01_elbo_exercises", ["import time\ntime.sleep(300)"])
    boxes = Path(tempfile.mkdtemp(prefix="mvae-test-boxes-"))
    boxes.chmod(0o711)
    command = [sys.executable, "-m", "mvae_course", "grade", str(sleeper), "--sandbox", "bwrap"]
    grader = subprocess.Popen(command, env={**os.environ, "TMPDIR": str(boxes)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        start = time.monotonic()
        while not any("ipykernel" in p for p in _processes_under(boxes)):
            assert grader.poll() is None and time.monotonic() - start < 120, "the kernel never started"
            time.sleep(0.2)
        time.sleep(1)  # the kernel is in its sleeping cell
        grader.kill()  # SIGKILL: the grader cannot clean up
        grader.wait()
        start = time.monotonic()
        while _processes_under(boxes) and time.monotonic() - start < 10:
            time.sleep(0.2)
        assert _processes_under(boxes) == []
    finally:
        grader.kill()
        grader.wait()
        shutil.rmtree(boxes, ignore_errors=True)
