"""The autograder: checks in-process (fast), then real notebooks graded in their own kernels (one batch)."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from mvae_course import cli
from mvae_course.grading.fusion_checks import SAMPLE_MIXTURE
from mvae_course.grading.grader import identify
from mvae_course.grading.question import ReferenceJudge, call_in_process, compare, run_in_process, verdict
from mvae_course.grading.registry import NOTEBOOKS, QUESTIONS, check

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
EXERCISES = sorted((ROOT / "exercises").glob("*.ipynb"))


def solution_namespace(path: Path) -> dict:
    """Run a solution notebook's code here, without its check cells: its functions by name."""
    ns: dict = {}
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "code" and not cell.source.startswith("check("):
            exec(cell.source, ns)
    return ns


@pytest.fixture(scope="module")
def solution_functions() -> dict:
    functions: dict = {}
    for path in SOLUTIONS:
        functions.update(solution_namespace(path))
    return functions


# --- in-process checks --------------------------------------------------------------------------------


def test_course_has_enough_questions_with_unique_ids():
    assert len(QUESTIONS) >= 12
    assert sum(len(qs) for qs in NOTEBOOKS.values()) == len(QUESTIONS)
    assert len({q.function for q in QUESTIONS.values()}) == len(QUESTIONS)


@pytest.mark.parametrize("seed", [0, 1])
def test_solutions_pass_every_check_in_process(solution_functions, seed):
    for q in QUESTIONS.values():
        v = run_in_process(q, solution_functions[q.function], seed)
        assert v.passed or v.pending, f"{q.id}: {v.feedback}"  # a written answer waits for the instructor


@pytest.mark.parametrize("qid", [qid for qid, q in QUESTIONS.items() if isinstance(q.judge, ReferenceJudge)])
def test_every_known_mistake_is_caught_and_named(qid):
    q = QUESTIONS[qid]
    assert q.judge.mistakes, f"{qid} has no known mistakes to name"
    for message, wrong in q.judge.mistakes:
        for seed in range(3):
            # Judged directly: the variants live in the package, so `check` would refuse them as its own code.
            cases = q.cases(torch.Generator().manual_seed(seed))
            v = verdict(q, cases, call_in_process(wrong, cases))
            assert not v.passed  # partial credit: a variant may be right on some cases
            # Two variants may be caught by an earlier message for the same mistake (e.g. "off by one").
            named = [m for m, _ in q.judge.mistakes]
            assert any(v.feedback.startswith(m) for m in named[: named.index(message) + 1]), (
                f"{qid}: {message!r} got {v.feedback!r}")


def test_kl_sign_error_is_named(solution_functions):
    def kl_sign_error(mu_q, logvar_q, mu_p, logvar_p):
        return 0.5 * (torch.exp(logvar_q - logvar_p) + (mu_q - mu_p) ** 2 * torch.exp(-logvar_p) - 1.0
                      + (logvar_q - logvar_p)).sum(-1)

    v = run_in_process(QUESTIONS["q1"], kl_sign_error, seed=3)
    assert not v.passed and "wrong sign for the log-variance term" in v.feedback


def _mixture_mistakes():
    def averaged(mu, logvar, k):
        m, lv = mu.mean(0), logvar.mean(0)
        return m + torch.exp(0.5 * lv) * torch.randn(k, *m.shape)

    def no_noise(mu, logvar, k):
        return mu[torch.randint(mu.shape[0], (k, mu.shape[1])), torch.arange(mu.shape[1])]

    def one_expert_per_point(mu, logvar, k):
        e = torch.randint(mu.shape[0], (1, mu.shape[1])).expand(k, -1)
        m, lv = mu[e, torch.arange(mu.shape[1])], logvar[e, torch.arange(mu.shape[1])]
        return m + torch.exp(0.5 * lv) * torch.randn_like(m)

    def variance_not_std(mu, logvar, k):
        e = torch.randint(mu.shape[0], (k, mu.shape[1]))
        m, lv = mu[e, torch.arange(mu.shape[1])], logvar[e, torch.arange(mu.shape[1])]
        return m + torch.exp(lv) * torch.randn_like(m)

    def biased(mu, logvar, k):
        e = (torch.rand(k, mu.shape[1]) < 0.2).long()  # expert 1 a fifth of the time, never expert 2
        m, lv = mu[e, torch.arange(mu.shape[1])], logvar[e, torch.arange(mu.shape[1])]
        return m + torch.exp(0.5 * lv) * torch.randn_like(m)

    return [
        (averaged, "sit between the experts"),
        (no_noise, "no spread"),
        (one_expert_per_point, "afresh"),
        (variance_not_std, "exp(0.5 * logvar)"),
        (biased, "uniformly"),
    ]


@pytest.mark.parametrize("wrong, phrase", _mixture_mistakes())
def test_mixture_sampling_mistakes_are_named(wrong, phrase):
    v = run_in_process(SAMPLE_MIXTURE, wrong, seed=5)
    assert not v.passed and phrase in v.feedback, v.feedback


def test_submission_crashes_become_feedback_not_errors():
    def crashes(*args):
        raise ValueError("boom")

    def stub(*args):
        raise NotImplementedError()

    assert "raised ValueError: boom" in run_in_process(QUESTIONS["q3"], crashes, 0).feedback
    assert "NotImplementedError" in run_in_process(QUESTIONS["q3"], stub, 0).feedback
    assert "test cases wrong" in run_in_process(QUESTIONS["q3"], lambda *a: torch.zeros(4), 0).feedback


def test_compare_describes_what_differs():
    assert compare(torch.ones(3), torch.ones(3)) is None
    assert "shape 3 x 1 but should be 3" in compare(torch.ones(3, 1), torch.ones(3))
    assert "nan or inf" in compare(torch.tensor([float("nan")]), torch.tensor([1.0]))
    assert "should be a tuple of 2" in compare(torch.ones(2), (torch.ones(2), torch.ones(2)))
    assert "bool" in compare(torch.ones(2), torch.ones(2, dtype=torch.bool))
    assert compare((1, 2), (1, 2)) is None and "is 3 but should be 2" in compare(3, 2)


def test_check_prints_friendly_feedback(capsys, solution_functions):
    check("q1", solution_functions["kl_normal"])
    check("Q1", lambda mu_q, logvar_q, mu_p, logvar_p: solution_functions["kl_normal"](mu_p, logvar_p, mu_q, logvar_q))
    out = capsys.readouterr().out
    assert "q1" in out and "passed, 2/2" in out
    assert "not yet" in out and "the arguments are the other way round" in out
    with pytest.raises(KeyError, match="no question 'q99'"):
        check("q99", print)


def test_unknown_notebook_is_a_clear_error(tmp_path):
    nb = nbformat.v4.new_notebook()
    with pytest.raises(ValueError, match="cannot tell which exercise notebook"):
        identify(nb, tmp_path / "homework.ipynb")
    assert identify(nb, tmp_path / "alice_03_text_exercises.ipynb") == "03_text_exercises"


def test_grade_command_reports_bad_paths_without_starting_kernels(tmp_path, capsys):
    assert cli.main(["grade", str(tmp_path / "missing.ipynb")]) == 2
    assert "no such notebook" in capsys.readouterr().err
    nbformat.write(nbformat.v4.new_notebook(), tmp_path / "homework.ipynb")
    assert cli.main(["grade", str(tmp_path / "homework.ipynb")]) == 2
    assert "cannot tell which exercise notebook" in capsys.readouterr().err


# --- real notebooks in real kernels: one batch, shared by the tests below ------------------------------

CHEAT = """
import mvae_course.grading as grading
import mvae_course.grading.grader as grader
import mvae_course.grading.question as question
import mvae_course.grading.registry as registry

def check(*args, **kwargs):
    print("passed, full marks")

grading.check = registry.check = check
for q in registry.QUESTIONS.values():
    object.__setattr__(q, "judge", lambda cases, outputs: None)
question.verdict = lambda q, cases, outputs: question.Verdict(q.id, q.function, q.title, q.points, q.points, "ok")
grader.verdict = question.verdict
"""


def _wrong_copy(src: Path, out_dir: Path, replace: dict[str, str], extra: str = "") -> Path:
    """A solution notebook with some lines replaced, its check cells dropped, and an optional extra cell."""
    nb = nbformat.read(src, as_version=4)
    nb.cells = [c for c in nb.cells if not c.source.startswith("check(")]
    for old, new in replace.items():
        hits = [c for c in nb.cells if old in c.source]
        assert len(hits) == 1, f"{old!r} not found once in {src.name}"
        hits[0].source = hits[0].source.replace(old, new)
    if extra:
        nb.cells.append(nbformat.v4.new_code_cell(extra))
    path = out_dir / src.name
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="module")
def graded(tmp_path_factory) -> dict:
    """Solutions, untouched exercises, and wrong/cheating/looping copies, graded through the CLI."""
    out = tmp_path_factory.mktemp("wrong")
    wrong = [
        _wrong_copy(ROOT / "solutions/01_elbo_exercises.ipynb", out,
                    {"- 1.0 - (logvar_q - logvar_p)": "- 1.0 + (logvar_q - logvar_p)"}, extra=CHEAT),
        _wrong_copy(ROOT / "solutions/03_text_exercises.ipynb", out,
                    {"return torch.cat([bos, text[:, :-1]], dim=1)": "return text.clone()"},
                    extra=f"import sys\nassert sys.prefix == {sys.prefix!r}, sys.prefix"),
        _wrong_copy(ROOT / "solutions/04_fusion_exercises.ipynb", out,
                    {"total = 1.0 + precision.sum(0)": "total = precision.sum(0)",
                     "    E, B, D = mu.shape\n": "    while True:\n        pass\n"}),
    ]
    gradebook = out / "grades.json"
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        status = cli.main(["grade", *map(str, SOLUTIONS + EXERCISES + wrong), "--json", str(gradebook),
                           "--jobs", "4", "--call-timeout", "6"])
    assert status == 0
    data = json.loads(gradebook.read_text())
    by_path = {Path(s["path"]): {q["question"]: q for q in s["questions"]} | {"_": s} for s in data["submissions"]}
    return {"report": report.getvalue(), "data": data, "by_path": by_path, "wrong": wrong}


@pytest.mark.slow
def test_every_solution_scores_full_marks(graded):
    for path in SOLUTIONS:
        sub = graded["by_path"][path]["_"]
        auto = [q for q in sub["questions"] if not q["pending"]]  # written answers wait for the instructor
        assert all(q["passed"] for q in auto) and sub["points"] == sum(q["max_points"] for q in auto) > 0, sub
        assert sub["cell_errors"] == []
    assert "all notebooks:" in graded["report"] and "total" in graded["report"]


@pytest.mark.slow
def test_untouched_exercises_score_zero_and_every_question_is_reported(graded):
    reported = []
    for path in EXERCISES:
        sub = graded["by_path"][path]["_"]
        assert sub["points"] == 0
        for q in sub["questions"]:
            assert "NotImplementedError" in q["feedback"]
            reported.append(q["question"])
    assert sorted(reported) == sorted(QUESTIONS)


@pytest.mark.slow
def test_kl_sign_error_is_caught_and_cheating_changes_nothing(graded):
    qs = graded["by_path"][graded["wrong"][0]]
    assert qs["_"]["cell_errors"] == []  # the cheating cell ran
    assert not qs["q1"]["passed"] and "wrong sign for the log-variance term" in qs["q1"]["feedback"]
    assert not qs["q2"]["passed"]  # the ELBO reuses the wrong KL
    assert all(qs[q]["passed"] for q in ("q3", "q4", "q5", "q6"))
    assert qs["_"]["points"] == 8 + qs["q1"]["points"] + qs["q2"]["points"]  # the wrong two keep partial credit


@pytest.mark.slow
def test_unshifted_teacher_forcing_is_caught_in_the_venv_kernel(graded):
    qs = graded["by_path"][graded["wrong"][1]]
    assert qs["_"]["cell_errors"] == []  # the kernel runs this virtualenv's python
    assert qs["q12"]["points"] == 0 and "not shifted right" in qs["q12"]["feedback"]
    assert qs["q13"]["passed"] and qs["q14"]["passed"]


@pytest.mark.slow
def test_poe_without_prior_is_caught_and_an_infinite_loop_times_out(graded):
    qs = graded["by_path"][graded["wrong"][2]]
    assert qs["q17"]["points"] == 0 and "leaves out the prior expert" in qs["q17"]["feedback"]
    assert qs["q18"]["points"] == 0 and "did not finish within 6" in qs["q18"]["feedback"]
    assert "q19" in qs  # grading went on after the timeout
