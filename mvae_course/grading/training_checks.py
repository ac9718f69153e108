"""Checks for exercises/07_coco_training_exercises.ipynb, which follows notebooks/07_coco_training.ipynb:
where a preset's KL warm-up ends, when the learning rate has decayed, which items each DDP rank reads,
and the diagnosis of a COCO training run.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mvae_course.config import preset
from mvae_course.grading.diagnosis import DiagnosisJudge, curve, diverge, run_folder, shuffled, uniform
from mvae_course.grading.question import Case, Question, ReferenceJudge, case
from mvae_course.train import kl_beta, lr_factor

NOTEBOOK = "07_coco_training_exercises"
COCO_TRAIN_IMAGES = 118_287


# --- q32: steps per epoch, and where the KL warm-up ends ----------------------------------------------


def _schedule_cases(g: torch.Generator) -> list[Case]:
    n = int(torch.randint(2_000, 50_000, (), generator=g))
    short = 30 * (n // 2 // 64) // int(torch.randint(2, 6, (), generator=g))
    gpu = preset("coco_gpu").train  # the preset lesson 07 shows, so the question follows it
    return [
        case(COCO_TRAIN_IMAGES, gpu.batch_size, 1, gpu.epochs, gpu.kl_warmup_steps,
             label="the coco_gpu preset on full COCO, one GPU"),
        case(COCO_TRAIN_IMAGES, gpu.batch_size, 4, gpu.epochs, gpu.kl_warmup_steps,
             label="the same command under torchrun on 4 GPUs"),
        case(n, 64, 2, 30, short, label="a warm-up shorter than the run"),
        case(int(torch.randint(1_000, 9_000, (), generator=g)), 96, 1, 3, 5_000),
    ]


def _schedule(n_images: int, batch_size: int, world_size: int, epochs: int, kl_warmup_steps: int,
              drop_last: bool = True, ranks: bool = True, clip: bool = True) -> tuple[int, int, float]:
    n_local = n_images // world_size if ranks else n_images
    steps = n_local // batch_size if drop_last else math.ceil(n_local / batch_size)
    total = epochs * steps
    beta = kl_beta(total, kl_warmup_steps) if clip else total / kl_warmup_steps
    return steps, total, beta


WARMUP_SCHEDULE = Question(
    id="q32", notebook=NOTEBOOK, function="warmup_schedule", title="where the KL warm-up ends", points=2,
    kind="derive", cases=_schedule_cases,
    forbidden=("mvae_course.train.kl_beta", "mvae_course.data.cache.CacheLoader"),
    judge=ReferenceJudge(
        _schedule,
        mistakes=[
            ("training drops the last, incomplete batch of each epoch (drop_last): round down",
             lambda *a: _schedule(*a, drop_last=False)),
            ("under torchrun each process reads 1/world_size of the images per epoch, with its own batch",
             lambda *a: _schedule(*a, ranks=False)),
            ("beta rises to 1 and then stays there: it is never above 1", lambda *a: _schedule(*a, clip=False)),
        ],
        hint="lesson 07 section 1 (the coco_gpu preset) and section 9 (torchrun): what one step consumes",
        atol=1e-9, rtol=1e-9,
    ),
)


# --- q33: when the learning rate has decayed ----------------------------------------------------------


def _lr_cases(g: torch.Generator) -> list[Case]:
    return [
        case(0.5, 100, 2_000, label="half the peak: the middle of the cosine"),
        case(uniform(g, 0.05, 0.95), int(torch.randint(10, 500, (), generator=g)), int(torch.randint(1_000, 20_000, (), generator=g))),
        case(uniform(g, 0.9, 0.99), 50, 600, label="just below the peak"),
        case(uniform(g, 0.05, 0.5), 0, 1_000, label="no warm-up"),
    ]


def _first_below(fraction: float, warmup: int, total: int, offset: bool = True, inclusive: bool = False) -> int:
    """The first step after the warm-up whose learning-rate factor is below `fraction` (by brute force)."""
    start = warmup if offset else 0
    factor = (lambda t: lr_factor(t, warmup, total)) if offset else (lambda t: lr_factor(t + warmup, warmup, total))
    for t in range(start, total + 1):
        if (factor(t) <= fraction) if inclusive else (factor(t) < fraction):
            return t
    return total


LR_BELOW = Question(
    id="q33", notebook=NOTEBOOK, function="lr_below_fraction", title="when the learning rate has decayed", points=1,
    kind="derive", cases=_lr_cases, forbidden=("mvae_course.train.lr_factor",),
    judge=ReferenceJudge(
        _first_below,
        mistakes=[
            ("the cosine starts after the warm-up: count the steps from step 0, not from the end of the warm-up",
             lambda f, w, T: _first_below(f, w, T, offset=False)),
            ("off by one: return the first step whose factor is already below the fraction",
             lambda f, w, T: _first_below(f, w, T) - 1),
        ],
        hint="lesson 07 section 3 plots the schedule: solve the cosine for the step, then round to the first whole "
             "step past it",
    ),
)


# --- q34: the items a DDP rank reads ------------------------------------------------------------------


def _rank_cases(g: torch.Generator) -> list[Case]:
    def order(n: int) -> Tensor:
        return torch.randperm(n, generator=g) * 3 + 7  # item ids, shuffled

    return [
        case(order(10), 1, 4, False, label="10 items on 4 ranks"),
        case(order(10), 3, 4, True, label="10 items on 4 ranks, drop_last"),
        case(order(12), 0, 3, False, label="12 items on 3 ranks (no padding needed)"),
        case(order(3), 4, 5, False, label="3 items on 5 ranks"),
    ]


def _rank_items(order: Tensor, rank: int, world_size: int, drop_last: bool, how: str = "pad-first",
                strided: bool = True) -> Tensor:
    n = order.shape[0]
    n_local = n // world_size if drop_last else math.ceil(n / world_size)
    total = n_local * world_size
    if total > n and how != "none":
        padding = order.repeat(math.ceil(total / n))[: total - n] if how == "pad-first" else order[-1:].repeat(total - n)
        order = torch.cat([order, padding])
    order = order[:total]
    return order[rank::world_size] if strided else order[rank * n_local:(rank + 1) * n_local]


RANK_ITEMS = Question(
    id="q34", notebook=NOTEBOOK, function="rank_items", title="the items a DDP rank reads", points=2,
    kind="implement", cases=_rank_cases,
    forbidden=("mvae_course.data.cache.CacheLoader", "torch.utils.data.distributed.DistributedSampler"),
    judge=ReferenceJudge(
        _rank_items,
        mistakes=[
            ("rank r takes items r, r + world_size, r + 2 world_size, ... of the order, not a contiguous block",
             lambda *a: _rank_items(*a, strided=False)),
            (("without padding the ranks would run different numbers of steps (and DDP would hang): pad the order "
              "to a multiple of world_size"), lambda *a: _rank_items(*a, how="none")),
            ("pad with the FIRST items of the order, as DistributedSampler does",
             lambda *a: _rank_items(*a, how="pad-last")),
        ],
        hint="lesson 07 section 9: every rank must run the same number of steps over its share of the order",
    ),
)


# --- q35: diagnosing a COCO training run --------------------------------------------------------------

TRAINING_FAILURES = {
    "healthy": "this run trained normally: beta reached 1 and the validation loss kept falling or levelled off",
    "warmup_never_ends": "look at beta in the last rows",
    "overfitting": "compare the training and the validation loss over the run",
    "exploding_loss": "look at the last rows of the loss",
}
TRAINING_REMEDIES = ("none", "shorten_kl_warmup", "stop_earlier_or_more_data", "lower_learning_rate")


def _training_run(g: torch.Generator, failure: str) -> dict:
    n, every = 50, 100  # logged rows, steps between them
    per_epoch = COCO_TRAIN_IMAGES // 256  # steps per epoch of the coco_gpu preset's batch on one GPU
    steps = [every * (i + 1) for i in range(n)]
    total = steps[-1]
    warm = int(total * uniform(g, 1.05, 1.3)) if failure == "warmup_never_ends" else int(total * uniform(g, 0.1, 0.3))
    beta = [kl_beta(s, warm) for s in steps]
    train_loss = curve(g, n, 400.0, uniform(g, 120.0, 160.0), rate=3.0, noise=0.01)
    if failure == "overfitting":
        low = int(n * uniform(g, 0.35, 0.55))
        val_loss = [train_loss[min(i, low)] * 1.05 + (max(0, i - low) * uniform(g, 1.5, 3.0)) for i in range(n)]
    else:
        val_loss = [v * uniform(g, 1.03, 1.08) for v in train_loss]
    if failure == "exploding_loss":
        exploded = diverge(g, train_loss)
        val_loss = [v if before == after else after for v, before, after in zip(val_loss, train_loss, exploded)]
        train_loss = exploded
    rows = []
    for i, s in enumerate(steps):
        rec_text = -uniform(g, 25, 35)
        kl = uniform(g, 20, 40)
        terms = {"loss": train_loss[i], "rec_image": -train_loss[i] - rec_text + kl, "rec_text": rec_text, "kl": kl}
        rows.append({"step": s, "epoch": s // per_epoch, "split": "train", **terms, "lr": 1e-3 * lr_factor(s, 100, total),
                     "beta": beta[i], "samples_per_s": uniform(g, 2500, 3500)})
        if i % 5 == 4:
            rows.append({"step": s, "epoch": s // per_epoch, "split": "val", **terms, "loss": val_loss[i]})
    config = {"name": "coco_gpu", "train": {"batch_size": 256, "lr": 1e-3, "kl_warmup_steps": warm,
                                            "max_steps": total, "epochs": None}}
    return run_folder(rows, config)


def _training_cases(g: torch.Generator) -> list[Case]:
    truths = {"healthy": {"none"}, "warmup_never_ends": {"shorten_kl_warmup"},
              "overfitting": {"stop_earlier_or_more_data"}, "exploding_loss": {"lower_learning_rate"}}
    return shuffled(g, [case(_training_run(g, f), label="a run folder", truth=(f, truths[f])) for f in truths])


DIAGNOSE_TRAINING = Question(
    id="q35", notebook=NOTEBOOK, function="diagnose_training_run", title="diagnose a COCO training run", points=2,
    kind="diagnose", cases=_training_cases, judge=DiagnosisJudge(TRAINING_FAILURES, TRAINING_REMEDIES),
)


QUESTIONS = [WARMUP_SCHEDULE, LR_BELOW, RANK_ITEMS, DIAGNOSE_TRAINING]
