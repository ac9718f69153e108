"""Checks for exercises/08_evaluation_exercises.ipynb, which follows notebooks/08_evaluation.ipynb:
recall at K with ties, the chance level of retrieval, a bootstrap interval, diagnosing an evaluation
report, and a written answer on why likelihood alone ranks the fusions wrongly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mvae_course.metrics import recall_at_k
from mvae_course.grading.diagnosis import DiagnosisJudge, shuffled, uniform
from mvae_course.grading.question import Case, Question, ReferenceJudge, case, no_inputs

NOTEBOOK = "08_evaluation_exercises"


# --- q36: recall at K, ties counting against the query ------------------------------------------------


def _recall_cases(g: torch.Generator) -> list[Case]:
    cases: list[Case] = []
    for Q, N, k in [(8, 8, 1), (6, 10, 3), (12, 20, 5)]:
        sim = torch.randn(Q, N, generator=g)
        gt = torch.randint(0, N, (Q,), generator=g)
        sim[torch.arange(Q // 2), gt[: Q // 2]] += 2.0  # some queries find their match, some do not
        cases.append(case(sim, gt, k))
    cases.append(case(torch.zeros(5, 7), torch.randint(0, 7, (5,), generator=g), 1,
                      label="a collapsed latent space: every candidate scores the same"))
    rounded = torch.round(torch.rand(10, 6, generator=g) * 4) / 4  # five levels: many ties
    cases.append(case(rounded, torch.randint(0, 6, (10,), generator=g), 2, label="scores with ties (five levels)"))
    return cases


def _reference(sim: Tensor, gt: Tensor, k: int) -> float:
    return recall_at_k(sim, gt.tolist(), ks=(k,))[f"R@{k}"]


def _ranks(sim: Tensor, gt: Tensor, ties_against: bool = True) -> Tensor:
    """1 + the number of wrong candidates scored higher than (or as high as) the correct one, per query."""
    correct = sim.gather(1, gt.unsqueeze(1))
    beaten = (sim >= correct) if ties_against else (sim > correct)
    return beaten.sum(1) + (0 if ties_against else 1)  # with >=, the correct one counts itself


RECALL_AT_K = Question(
    id="q36", notebook=NOTEBOOK, function="recall_at_k", title="retrieval: recall at K", points=2, kind="implement",
    cases=_recall_cases, forbidden=("mvae_course.metrics.recall_at_k", "mvae_course.evaluate.retrieval"),
    judge=ReferenceJudge(
        _reference,
        mistakes=[
            (("ties must count AGAINST the query (lesson 08 section 3): yours counts them in its favour, so a "
              "collapsed latent space, where every candidate scores the same, would score R@1 = 1"),
             lambda sim, gt, k: (_ranks(sim, gt, ties_against=False) <= k).float().mean().item()),
            ("higher similarity means closer: rank the candidates by descending similarity",
             lambda sim, gt, k: (_ranks(-sim, gt) <= k).float().mean().item()),
            ("off by one: a query is a hit when its correct candidate's rank (1 = best) is at most K",
             lambda sim, gt, k: (_ranks(sim, gt) < k).float().mean().item()),
            ("off by one: a query is a hit when its correct candidate's rank (1 = best) is at most K",
             lambda sim, gt, k: (_ranks(sim, gt) <= k + 1).float().mean().item()),
            ("return the fraction of queries that are hits (in [0, 1]), not their count",
             lambda sim, gt, k: float((_ranks(sim, gt) <= k).sum())),
        ],
        hint="lesson 08 section 3 defines the rank; think about what a query should score when it cannot tell "
             "its candidates apart",
    ),
)


# --- q37: retrieval's chance level --------------------------------------------------------------------


def _chance_cases(g: torch.Generator) -> list[Case]:
    n = int(torch.randint(200, 3_000, (), generator=g))
    return [
        case(1_000, 1, 10, label="text -> image on 1000 images"),
        case(5 * n, 5, 1, label="image -> text: five correct captions among 5N"),
        case(5 * n, 5, 10),
        case(20, 5, 16, label="K > N - c: a hit is certain"),
    ]


def _chance(n_candidates: int, n_correct: int, k: int) -> float:
    return 1 - math.comb(n_candidates - n_correct, k) / math.comb(n_candidates, k)


CHANCE_RECALL = Question(
    id="q37", notebook=NOTEBOOK, function="chance_recall", title="the chance level of R@K", points=1, kind="derive",
    cases=_chance_cases,
    judge=ReferenceJudge(
        _chance,
        mistakes=[
            ("K / N is the chance of ONE correct candidate; with c of them, a hit is any of them in the top K",
             lambda n, c, k: k / n),
            ("c K / N adds the chances as if they were exclusive (it can even exceed 1)",
             lambda n, c, k: c * k / n),
            ("the top K are K different candidates, drawn without replacement, not K independent draws",
             lambda n, c, k: 1 - (1 - k / n) ** c),
        ],
        hint="count the rankings whose top K holds none of the c correct candidates",
        rtol=1e-7, atol=1e-9,
    ),
)


# --- q38: a bootstrap interval ------------------------------------------------------------------------


def _bootstrap_cases(g: torch.Generator) -> list[Case]:
    cases = []
    for N, n_boot, alpha, kind in [(50, 400, 0.05, "hits"), (30, 300, 0.1, "scores"), (80, 500, 0.05, "scores")]:
        values = (torch.rand(N, generator=g) < 0.4).float() if kind == "hits" else torch.randn(N, generator=g) + 2
        label = "per-query hits (0 or 1), as for R@K" if kind == "hits" else ""
        cases.append(case(values, torch.randint(0, N, (n_boot, N), generator=g), alpha, label=label))
    return cases


def _bootstrap(values: Tensor, idx: Tensor, alpha: float, tails: float = 2.0, of_means: bool = True,
               normal: bool = False) -> tuple[float, float]:
    means = values[idx].mean(1) if of_means else values
    if normal:
        centre, spread = values.mean().item(), 1.96 * means.std().item()
        return centre - spread, centre + spread
    q = torch.quantile(means.double(), torch.tensor([alpha / tails, 1 - alpha / tails], dtype=torch.float64))
    return q[0].item(), q[1].item()


BOOTSTRAP = Question(
    id="q38", notebook=NOTEBOOK, function="bootstrap_interval", title="a bootstrap interval", points=2,
    kind="implement", cases=_bootstrap_cases,
    judge=ReferenceJudge(
        _bootstrap,
        mistakes=[
            ("a 1 - alpha interval leaves alpha / 2 in EACH tail; yours leaves alpha in each (a 1 - 2 alpha interval)",
             lambda v, i, a: _bootstrap(v, i, a, tails=1.0)),
            ("those are quantiles of the items; the interval is made of the quantiles of the resampled MEANS",
             lambda v, i, a: _bootstrap(v, i, a, of_means=False)),
            (("that is a normal approximation (mean +- 1.96 standard errors); the percentile bootstrap reads the "
              "quantiles of the resampled means directly"), lambda v, i, a: _bootstrap(v, i, a, normal=True)),
        ],
        hint="each row of idx is one resample of the items; an interval reads off what the resampled statistic does",
        atol=1e-5, rtol=1e-5,
    ),
)


# --- q39: diagnosing an evaluation report -------------------------------------------------------------

EVALUATION_FAILURES = {
    "healthy": "this model is coherent and retrieves far above chance, with a judge that can be trusted",
    "unreliable_judge": "before reading text -> image and joint coherence, check the judge on real images",
    "unaligned_latents": "compare retrieval and cross-modal coherence with chance, and look at the log-likelihood",
    "collapsed_latent_space": "look at the median rank against the number of candidates, and at the KL",
}
EVALUATION_REMEDIES = ("none", "retrain_the_judge", "fuse_the_experts", "word_dropout")


def _evaluation_report(g: torch.Generator, failure: str) -> dict:
    n = int(torch.randint(300, 800, (), generator=g))

    def frac(low: float, high: float) -> float:
        return round(uniform(g, low, high), 3)

    report = {
        "n_images": n,
        "judge_accuracy": {a: frac(0.97, 1.0) for a in ("shape", "size", "colour", "position")},
        "coherence_strict": {"image_to_text": frac(0.6, 0.9), "text_to_image": frac(0.5, 0.8), "joint": frac(0.2, 0.5),
                             "chance": round(1 / 240, 4)},
        "retrieval_text_to_image": {"R@1": frac(0.05, 0.2), "R@10": frac(0.4, 0.7), "median_rank": float(int(uniform(g, 8, 30)))},
        "kl": round(uniform(g, 15, 40), 2),
        "log_p_joint": round(uniform(g, -950, -900), 1),
    }
    if failure == "unreliable_judge":
        report["judge_accuracy"].update(shape=frac(0.45, 0.6), colour=frac(0.5, 0.7))
    elif failure == "unaligned_latents":
        report["coherence_strict"].update(image_to_text=frac(0.0, 0.01), text_to_image=frac(0.0, 0.01),
                                          joint=frac(0.0, 0.01))
        report["retrieval_text_to_image"] = {"R@1": round(1 / n, 4), "R@10": round(10 / n, 4),
                                             "median_rank": float(n // 2 + int(uniform(g, -20, 20)))}
        report["log_p_joint"] = round(uniform(g, -890, -860), 1)  # the best likelihood: nothing to agree on
    elif failure == "collapsed_latent_space":
        report["coherence_strict"].update(image_to_text=frac(0.0, 0.01), text_to_image=frac(0.0, 0.01),
                                          joint=frac(0.0, 0.01))
        report["retrieval_text_to_image"] = {"R@1": 0.0, "R@10": 0.0, "median_rank": float(n)}
        report["kl"] = round(uniform(g, 0.0, 0.05), 3)
        report["log_p_joint"] = round(uniform(g, -1050, -1000), 1)
    return report


def _evaluation_cases(g: torch.Generator) -> list[Case]:
    truths = {"healthy": {"none"}, "unreliable_judge": {"retrain_the_judge"},
              "unaligned_latents": {"fuse_the_experts"}, "collapsed_latent_space": {"word_dropout"}}
    return shuffled(g, [case(_evaluation_report(g, f), label="an evaluation report", truth=(f, truths[f]))
                        for f in truths])


DIAGNOSE_EVALUATION = Question(
    id="q39", notebook=NOTEBOOK, function="diagnose_evaluation", title="diagnose an evaluation report", points=2,
    kind="diagnose", cases=_evaluation_cases, judge=DiagnosisJudge(EVALUATION_FAILURES, EVALUATION_REMEDIES),
)


# --- q40: written: likelihood against coherence -------------------------------------------------------

LIKELIHOOD_RANKING = Question(
    id="q40", notebook=NOTEBOOK, function="explain_likelihood_ranking",
    title="why likelihood alone ranks the fusions wrongly", points=2, kind="written", cases=no_inputs, judge=None,
    min_words=40,
)


QUESTIONS = [RECALL_AT_K, CHANCE_RECALL, BOOTSTRAP, DIAGNOSE_EVALUATION, LIKELIHOOD_RANKING]
