"""Checks for exercises/07_evaluation_exercises.ipynb: cross-modal retrieval."""

from __future__ import annotations

import torch
from torch import Tensor

from mvae_course.metrics import recall_at_k
from mvae_course.grading.question import Case, Question, ReferenceJudge

NOTEBOOK = "07_evaluation_exercises"


def _recall_cases(g: torch.Generator) -> list[Case]:
    cases: list[Case] = []
    for Q, N, k in [(8, 8, 1), (6, 10, 3), (12, 20, 5), (5, 7, 7)]:
        sim = torch.randn(Q, N, generator=g)
        gt = torch.randint(0, N, (Q,), generator=g)
        sim[torch.arange(Q // 2), gt[: Q // 2]] += 2.0  # some queries find their match, some do not
        cases.append((sim, gt, k))
    return cases


def _reference(sim: Tensor, gt: Tensor, k: int) -> float:
    return recall_at_k(sim, gt.tolist(), ks=(k,))[f"R@{k}"]


def _ranks(sim: Tensor, gt: Tensor) -> Tensor:
    """1 + the number of candidates scored strictly higher than the correct one, per query."""
    return (sim > sim.gather(1, gt.unsqueeze(1))).sum(1) + 1


RECALL_AT_K = Question(
    id="q14", notebook=NOTEBOOK, function="recall_at_k", title="retrieval: recall at K", points=2,
    cases=_recall_cases,
    judge=ReferenceJudge(
        _reference,
        mistakes=[
            ("higher similarity means closer: rank the candidates by descending similarity",
             lambda sim, gt, k: (_ranks(-sim, gt) <= k).float().mean().item()),
            ("off by one: a query is a hit when its match's rank (1 = best) is <= K",
             lambda sim, gt, k: (_ranks(sim, gt) < k).float().mean().item()),
            ("off by one: a query is a hit when its match's rank (1 = best) is <= K",
             lambda sim, gt, k: (_ranks(sim, gt) <= k + 1).float().mean().item()),
            ("return the fraction of queries that are hits (in [0, 1]), not their count",
             lambda sim, gt, k: float((_ranks(sim, gt) <= k).sum())),
        ],
    ),
)


QUESTIONS = [RECALL_AT_K]
