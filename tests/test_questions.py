"""The graded questions themselves: enough of every kind, edge cases in their inputs, partial credit, the
diagnose and written kinds, and answers that are the package's own code scoring 0 (a test per notebook, in
process, and once through real kernels)."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import re
from pathlib import Path

import nbformat
import pytest
import torch

from mvae_course import cli
from mvae_course.grading import integrity
from mvae_course.grading.kernel import KERNEL_SOURCE, function_info, rebuild
from mvae_course.grading.question import KINDS, call_in_process, run_in_process, verdict
from mvae_course.grading.registry import NOTEBOOKS, QUESTIONS, question

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = {p.stem: p for p in sorted((ROOT / "solutions").glob("*.ipynb"))}
FINAL_NOTEBOOKS = ["01_elbo_exercises", "02_image_exercises", "03_text_exercises", "04_fusion_exercises",
                   "05_failure_modes_exercises", "06_coco_data_exercises", "07_coco_training_exercises",
                   "08_evaluation_exercises"]


def cells_of(name: str) -> list[str]:
    return integrity.notebook_code(nbformat.read(SOLUTIONS[name], as_version=4).cells)


@functools.cache
def solution(name: str) -> dict:
    """The functions of a solution notebook, run here without its check cells (as a kernel's __main__)."""
    ns: dict = {"__name__": "__main__"}
    for source in cells_of(name):
        if source and not source.startswith("check("):
            exec(source, ns)
    return ns


def replaced(name: str, function: str, new_source: str) -> list[str]:
    """The notebook's code cells with the cell that defines `function` replaced by `new_source`."""
    cells = cells_of(name)
    index = next(i for i, c in enumerate(cells) if c.startswith(f"def {function}("))
    return cells[:index] + [new_source] + cells[index + 1:]


def defined(source: str, name: str, ns: dict | None = None):
    """`name` after running `source` (an answer written in a notebook cell) in a fresh __main__."""
    ns = {"__name__": "__main__", **(ns or {})}
    exec(source, ns)
    return ns[name]


# --- the set of questions -----------------------------------------------------------------------------


def test_every_lesson_has_exercises_with_the_final_numbering():
    assert list(NOTEBOOKS) == FINAL_NOTEBOOKS == list(SOLUTIONS)
    assert all(NOTEBOOKS[name] for name in FINAL_NOTEBOOKS)


def test_course_has_enough_questions_of_every_kind():
    graded = [q for q in QUESTIONS.values() if q.kind != "written"]
    assert len(graded) >= 28
    counts = {kind: sum(q.kind == kind for q in QUESTIONS.values()) for kind in KINDS}
    assert all(n >= 3 for n in counts.values()), counts  # each kind several times
    assert list(QUESTIONS) == [f"q{i}" for i in range(1, len(QUESTIONS) + 1)]  # numbered in notebook order


def test_question_ids_are_case_insensitive():
    assert question("Q5") is question(" q5 ") is QUESTIONS["q5"]
    with pytest.raises(KeyError, match="no question 'q99'; the course has q1 to q"):
        question("q99")


def test_forbidden_objects_exist_under_their_canonical_names():
    for q in QUESTIONS.values():
        for name in q.forbidden:
            assert integrity.qualified(integrity.resolve(name)) == name, (q.id, name)


def test_hints_name_an_idea_or_a_lesson_not_a_torch_call():
    for name in FINAL_NOTEBOOKS:
        sources = cells_of(name)
        for q in NOTEBOOKS[name]:
            if q.kind == "written":
                continue
            cell = next(c for c in sources if c.startswith(f"def {q.function}("))
            hints = [line.strip() for line in cell.splitlines() if line.strip().startswith("# Hint")]
            assert hints, f"{q.id} has no hint"
            assert not any("torch." in h for h in hints), (q.id, hints)


def test_inputs_include_the_lessons_edge_cases():
    def labels(qid: str) -> str:
        return " | ".join(c.label for c in QUESTIONS[qid].cases(torch.Generator().manual_seed(0)))

    assert "collapsed latent space" in labels("q36") and "ties" in labels("q36")  # retrieval
    for qid in ("q12", "q13", "q14", "q28"):  # zero-length captions
        assert "no words" in labels(qid), qid
    for qid in ("q17", "q20"):  # a missing modality
        assert "missing" in labels(qid), qid
    assert "saturated logits" in labels("q2") and "underflows" in labels("q3")


def test_q2_asks_for_the_bernoulli_elbo_and_names_the_gaussian_one():
    q = QUESTIONS["q2"]
    gaussian = [m for m, _ in q.judge.mistakes if "Gaussian" in m]
    assert gaussian and "Bernoulli" in gaussian[0]


# --- partial credit -----------------------------------------------------------------------------------


def test_ties_in_favour_of_the_query_get_partial_credit_and_are_named():
    def strict(sim, gt, k):  # the old Q14's rank: ties count in the query's favour
        rank = (sim > sim.gather(1, gt.unsqueeze(1))).sum(1) + 1
        return (rank <= k).float().mean().item()

    v = run_in_process(QUESTIONS["q36"], strict, seed=0)
    assert 0 < v.points < v.max_points  # right on the continuous scores, wrong on the ties
    assert "ties must count AGAINST the query" in v.feedback and "collapsed latent space" in v.feedback


def test_feedback_names_the_failing_case_with_expected_and_got():
    def nan_leak(mu, logvar, mask):  # right, except that 0 * NaN keeps a missing expert's garbage
        precision = torch.exp(-logvar) * mask.unsqueeze(-1)
        total = 1 + precision.sum(0)
        return (precision * mu).sum(0) / total, -torch.log(total)

    v = run_in_process(QUESTIONS["q17"], nan_leak, seed=0)
    assert v.points == 1.33  # two of the three cases right, to the hundredth
    assert "0 * NaN is NaN" in v.feedback and "case 3 (missing experts whose means are NaN" in v.feedback

    def shifted(image_size, channels):  # right for most sizes, but accepts one the model refuses
        side = image_size // 2 ** len(channels)
        return (channels[-1], side, side) if side else None

    v = run_in_process(QUESTIONS["q8"], shifted, seed=0)
    assert 0 < v.points < 1 and "is (128, 1, 1) but should be None" in v.feedback
    assert "a 48-pixel image and five convolutions" in v.feedback


# --- diagnose and written questions -------------------------------------------------------------------

DIAGNOSE = [qid for qid, q in QUESTIONS.items() if q.kind == "diagnose"]


@pytest.mark.parametrize("qid", DIAGNOSE)
def test_a_diagnosis_is_marked_on_its_failure_and_its_remedy(qid):
    q = QUESTIONS[qid]
    right = solution(q.notebook)[q.function]
    assert run_in_process(q, right, seed=4).passed

    cases = q.cases(torch.Generator().manual_seed(4))
    healthy = sum(c.truth[0] == "healthy" for c in cases)
    v = run_in_process(q, lambda run: ("healthy", "none"), seed=4)  # a learner who sees no problem anywhere
    assert v.points == round(q.points * healthy / len(cases), 2)  # only the healthy runs are right
    assert "it is not 'healthy'" in v.feedback

    def wrong_remedy(run):
        failure, _ = right(run)
        return failure, "none" if failure != "healthy" else q.judge.remedies[1]

    v = run_in_process(q, wrong_remedy, seed=4)
    assert v.points == q.points / 2 and "the failure is right, but" in v.feedback
    v = run_in_process(q, lambda run: ("broken", "none"), seed=4)
    assert v.points < q.points and "'broken' is not a failure name; choose one of healthy" in v.feedback


def test_written_answers_are_pending_and_short_ones_score_zero():
    q = QUESTIONS["q7"]
    model_answer = solution(q.notebook)[q.function]
    v = run_in_process(q, model_answer, seed=0)
    assert v.pending and not v.passed and v.points == 0 and v.max_points == q.points
    assert v.to_dict()["answer"] == model_answer() and "pending" in v.feedback
    short = run_in_process(q, lambda: "Only the mean is bounded.", seed=0)
    assert not short.pending and short.points == 0 and "write at least 40" in short.feedback
    assert "as a string" in run_in_process(q, lambda: 3, seed=0).feedback


# --- an answer that is the package's own code scores 0 ------------------------------------------------

# Per notebook: a question, and an answer that would be right but uses the package's implementation.
CHEATS = {
    "01_elbo_exercises": ("q1", "from mvae_course.objectives import kl_normal"),
    "02_image_exercises": ("q8", """
from mvae_course.models.image import conv_output_size

def encoder_feature_shape(image_size, channels):
    side = image_size
    for _ in channels:
        side = conv_output_size(side)
    return (channels[-1], side, side) if side * 2 ** len(channels) == image_size else None
"""),
    "03_text_exercises": ("q12", "from mvae_course.models.text import shift_right as teacher_forcing_inputs"),
    "04_fusion_exercises": ("q17", "from mvae_course.models.fusion import product_of_experts"),
    "05_failure_modes_exercises": ("q23", """
import torch
from mvae_course.models import fusion

def corrupted_expert_shift(precision_bad, precision_other, shift):
    logvar = -torch.log(torch.stack([precision_bad, precision_other])).unsqueeze(-1)
    mean = lambda d: fusion.product_of_experts(torch.stack([d, 0 * d]).unsqueeze(-1), logvar)[0][:, 0]
    return mean(shift) - mean(0 * shift), shift / 2
"""),
    "06_coco_data_exercises": ("q28", "from mvae_course.data.text import pad_captions"),
    "07_coco_training_exercises": ("q32", """
from mvae_course.train import kl_beta

def warmup_schedule(n_images, batch_size, world_size, epochs, kl_warmup_steps):
    steps = n_images // world_size // batch_size
    return steps, epochs * steps, kl_beta(epochs * steps, kl_warmup_steps)
"""),
    "08_evaluation_exercises": ("q36", """
import mvae_course.evaluate as ev

def recall_at_k(sim, gt, k):
    return ev.recall_at_k(sim, gt.tolist(), ks=(k,))[f"R@{k}"]
"""),
}


@pytest.mark.parametrize("name", FINAL_NOTEBOOKS)
def test_an_answer_made_of_the_package_scores_zero(name):
    qid, source = CHEATS[name]
    q = QUESTIONS[qid]
    cheat = defined(source, q.function)
    cases = q.cases(torch.Generator().manual_seed(0))
    outputs = call_in_process(cheat, cases)
    assert verdict(q, cases, outputs).passed  # the answer is right...
    cells = replaced(name, q.function, source)
    static = verdict(q, cases, outputs, code=cells)  # ...but the notebook's code uses the package
    dynamic = run_in_process(q, cheat, seed=0)  # ...and so does the function object
    for v in (static, dynamic):
        assert v.points == 0 and v.feedback.startswith("scored 0: `"), v.feedback
    assert any(f in static.feedback for f in q.forbidden) or "imported" in static.feedback


def test_no_solution_is_mistaken_for_the_package():
    for name in FINAL_NOTEBOOKS:
        for q in NOTEBOOKS[name]:
            assert integrity.static_problem(cells_of(name), q.function, q.forbidden) is None, q.id
            info = function_info(solution(name)[q.function])
            assert integrity.dynamic_problem(info, q.function, q.forbidden) is None, q.id


@pytest.mark.parametrize("source", [
    "import mvae_course.objectives as obj\n\ndef kl_normal(a, b, c, d):\n    return obj.kl_normal(a, b, c, d)",
    "from mvae_course import objectives\nkl_normal = objectives.kl_normal",
    "import functools\nfrom mvae_course import objectives\nkl_normal = functools.partial(objectives.kl_normal)",
    ("import mvae_course.objectives\n\ndef _kl(*a):\n    return mvae_course.objectives.kl_normal(*a)\n\n"
    "def kl_normal(*a):\n    return _kl(*a)"),
    "from mvae_course.objectives import kl_standard_normal as k\nkl_normal = lambda mq, lq, mp, lp: k(mq - mp, lq)",
    "from mvae_course.objectives import *",
    "import inspect\nfrom mvae_course import objectives\nexec(inspect.getsource(objectives.kl_normal))",
    ("from mvae_course import objectives\n\ndef kl_normal(a, b, c, d):\n    pass\n\n"
    "kl_normal.__code__ = objectives.kl_normal.__code__"),
    ("import torch.distributions as D\n\ndef kl_normal(mq, lq, mp, lp):\n"
    "    return D.kl_divergence(D.Normal(mq, (lq / 2).exp()), D.Normal(mp, (lp / 2).exp())).sum(-1)"),
], ids=["module attribute", "alias", "partial", "helper", "lambda", "star import", "getsource", "__code__", "torch"])
def test_every_way_of_reusing_the_implementation_is_caught_in_the_code(source):
    q = QUESTIONS["q1"]
    problem = integrity.static_problem(replaced(q.notebook, q.function, source), q.function, q.forbidden)
    assert problem and ("uses" in problem or "copies" in problem or "imported" in problem), problem
    # Q2's ELBO calls the learner's kl_normal: now the package's, so Q2 scores 0 too.
    assert integrity.static_problem(replaced(q.notebook, q.function, source), "elbo", QUESTIONS["q2"].forbidden)


def test_the_kernel_reports_where_a_function_comes_from():
    from mvae_course import objectives

    kernel: dict = {}
    exec(KERNEL_SOURCE, kernel)  # what the grader sends to the learner's kernel
    for info_of in (function_info, kernel["function_info"]):
        assert info_of(objectives.kl_normal)["module"] == "mvae_course.objectives"
        assert info_of(functools.partial(objectives.kl_normal))["qualname"] == "kl_normal"
        wrapper = defined("from mvae_course import objectives as o\ndef f(*a):\n    return o.kl_normal(*a)", "f")
        assert "mvae_course.objectives.kl_normal" in info_of(wrapper)["references"]
        copied = defined("def f(a, b, c, d):\n    pass", "f")
        copied.__code__ = objectives.kl_normal.__code__
        assert info_of(copied)["package_code"] and not info_of(wrapper)["package_code"]
    v = run_in_process(QUESTIONS["q1"], copied, seed=0)
    assert v.points == 0 and "runs the package's own code" in v.feedback
    # A method is matched by its attribute name, never by a global of the same name (the learner's own helper).
    q = QUESTIONS["q13"]  # forbids TextDecoder.log_likelihood
    own = defined("def log_likelihood(x):\n    return x\n\ndef f(x):\n    return log_likelihood(x)", "f")
    called = defined("def f(decoder, x):\n    return decoder.log_likelihood(x)", "f")
    assert integrity.dynamic_problem(function_info(own), q.function, q.forbidden) is None
    assert "TextDecoder.log_likelihood" in integrity.dynamic_problem(function_info(called), q.function, q.forbidden)


def test_a_described_folder_is_written_for_the_submission(tmp_path):
    files = {"__mvae_folder__": {"a/b.json": "{}", "c.bin": torch.tensor([1, 2, 255], dtype=torch.uint8)}}
    root = rebuild(files, tmp_path / "case")
    assert (root / "a" / "b.json").read_text() == "{}" and (root / "c.bin").read_bytes() == bytes([1, 2, 255])
    assert rebuild(3, tmp_path) == 3


# --- through real kernels: one batch of two notebooks -------------------------------------------------


def _copy(name: str, out: Path, replace: dict[str, str]) -> Path:
    nb = nbformat.read(SOLUTIONS[name], as_version=4)
    nb.cells = [c for c in nb.cells if not c.source.startswith("check(")]
    for function, source in replace.items():
        cell = next(c for c in nb.cells if c.source.startswith(f"def {function}("))
        cell.source = source
    path = out / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.mark.slow
def test_the_grader_scores_package_code_zero_and_gives_partial_credit(tmp_path):
    elbo = _copy("01_elbo_exercises", tmp_path, {
        "kl_normal": "from mvae_course.objectives import kl_normal",
        "iwae_bound": "import inspect\nfrom torch import Tensor\nfrom mvae_course import objectives\n"
                      "exec(inspect.getsource(objectives.iwae_bound))",
    })
    evaluation = _copy("08_evaluation_exercises", tmp_path, {
        "recall_at_k": "def recall_at_k(sim, gt, k):\n    rank = (sim > sim.gather(1, gt.unsqueeze(1))).sum(1) + 1\n"
                       "    return (rank <= k).float().mean().item()",
        "explain_likelihood_ranking": "def explain_likelihood_ranking():\n    return 'Likelihood is not coherence.'",
    })
    gradebook = tmp_path / "grades.json"
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        assert cli.main(["grade", str(elbo), str(evaluation), "--json", str(gradebook), "--jobs", "2"]) == 0
    by_name = {Path(s["path"]).stem: {q["question"]: q for q in s["questions"]}
               for s in json.loads(gradebook.read_text())["submissions"]}
    qs = by_name["01_elbo_exercises"]
    for qid in ("q1", "q2", "q3"):  # imported, built on the import, copied from the source
        assert qs[qid]["points"] == 0 and qs[qid]["feedback"].startswith("scored 0:"), qs[qid]
    assert "copies mvae_course.objectives.iwae_bound" in qs["q3"]["feedback"]
    assert all(qs[qid]["passed"] for qid in ("q4", "q5", "q6")) and qs["q7"]["pending"]
    qs = by_name["08_evaluation_exercises"]
    assert 0 < qs["q36"]["points"] < 2 and "ties must count AGAINST" in qs["q36"]["feedback"]
    assert qs["q40"]["points"] == 0 and "write at least" in qs["q40"]["feedback"]
    assert qs["q37"]["passed"] and qs["q38"]["passed"] and qs["q39"]["passed"]
    assert re.search(r"q7 +explain_iwae_band +0/2 +pending", report.getvalue())
