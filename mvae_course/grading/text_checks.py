"""Checks for exercises/03_text_exercises.ipynb, which follows notebooks/03_text_vae.ipynb: teacher
forcing, the masked caption likelihood, word dropout, one step of beam search, and the diagnosis of a
caption VAE's training run.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mvae_course.data.text import BOS, EOS, PAD, UNK
from mvae_course.grading.diagnosis import DiagnosisJudge, curve, diverge, run_folder, shuffled, uniform
from mvae_course.grading.question import Case, Question, ReferenceJudge, case
from mvae_course.models.text import shift_right
from mvae_course.objectives import text_log_likelihood

NOTEBOOK = "03_text_exercises"


def random_captions(g: torch.Generator, B: int, T: int, vocab_size: int = 20, empty: bool = False) -> Tensor:
    """A batch in the course's layout: content ids (>= 4), one EOS, then PAD: B x T.

    The first caption fills all T positions, so the batch is as long as its longest caption; with
    `empty`, the last caption has no words at all (only its EOS).
    """
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    if empty:
        lengths[-1] = 1
    text = torch.randint(EOS + 2, vocab_size, (B, T), generator=g)
    positions = torch.arange(T)
    text[positions == (lengths - 1).unsqueeze(1)] = EOS
    text[positions >= lengths.unsqueeze(1)] = PAD
    return text


# --- q12: teacher-forcing inputs ----------------------------------------------------------------------


def _caption_cases(g: torch.Generator) -> list[Case]:
    return [
        case(random_captions(g, 4, 6)),
        case(random_captions(g, 3, 9, empty=True), label="a batch whose last caption has no words (only EOS)"),
        case(random_captions(g, 1, 1), label="a single caption of one token (its EOS)"),
    ]


TEACHER_FORCING = Question(
    id="q12", notebook=NOTEBOOK, function="teacher_forcing_inputs", title="the teacher-forcing shift", points=1,
    kind="implement", cases=_caption_cases, forbidden=("mvae_course.models.text.shift_right",),
    judge=ReferenceJudge(
        shift_right,
        mistakes=[
            ("teacher-forcing inputs are not shifted right: the decoder would see the token it must predict",
             lambda text: text.clone()),
            ("you shifted left: position t must read token t - 1 (the past), not token t + 1",
             lambda text: torch.cat([text[:, 1:], torch.full_like(text[:, :1], PAD)], 1)),
            ("the inputs must start with BOS, the token that tells the decoder a caption begins",
             lambda text: torch.cat([torch.full_like(text[:, :1], PAD), text[:, :-1]], 1)),
            ("the inputs must start with BOS, the token that tells the decoder a caption begins",
             lambda text: torch.cat([torch.full_like(text[:, :1], EOS), text[:, :-1]], 1)),
            ("the inputs keep the length T of the captions: drop the last position after prepending BOS",
             lambda text: torch.cat([torch.full_like(text[:, :1], BOS), text], 1)),
        ],
        hint="lesson 03 section 2: at position t the decoder reads the true previous token",
    ),
)


# --- q13: the masked caption log-likelihood -----------------------------------------------------------


def _likelihood_cases(g: torch.Generator) -> list[Case]:
    cases = []
    for B, T, V, empty in [(4, 7, 12, False), (3, 3, 30, True), (1, 5, 9, False)]:
        text = random_captions(g, B, T, V, empty)
        label = "a batch whose last caption has no words (only EOS)" if empty else ""
        cases.append(case(torch.randn(B, T, V, generator=g) * 2, text, label=label))
    return cases


def _masked_reference(logits: Tensor, text: Tensor) -> Tensor:
    real = text != PAD  # the batch contract (docs/architecture.md): everything but PAD is real, EOS included
    row = torch.arange(text.shape[0]).unsqueeze(1).expand_as(text)
    return text_log_likelihood(logits[real], text[real], row[real], text.shape[0])


def _token_log_p(logits: Tensor, text: Tensor) -> Tensor:
    return -F.cross_entropy(logits.transpose(1, 2), text, reduction="none")  # B x T


MASKED_LOG_LIKELIHOOD = Question(
    id="q13", notebook=NOTEBOOK, function="masked_text_log_likelihood", title="the masked caption log-likelihood",
    points=2, kind="implement", cases=_likelihood_cases,
    forbidden=("mvae_course.objectives.text_log_likelihood", "mvae_course.models.text.TextDecoder.log_likelihood"),
    judge=ReferenceJudge(
        _masked_reference,
        mistakes=[
            ("you counted the padding positions: only real tokens belong to a caption",
             lambda logits, text: _token_log_p(logits, text).sum(1)),
            ("you averaged over the real tokens; log p(caption | z) is their sum",
             lambda logits, text: (_token_log_p(logits, text) * (text != PAD)).sum(1) / (text != PAD).sum(1)),
            ("that is the negative log-likelihood (the cross-entropy); return log p, which is <= 0",
             lambda logits, text: -_masked_reference(logits, text)),
            ("you left EOS out: it is a real token, the decoder must learn to predict it or it never stops",
             lambda logits, text: (_token_log_p(logits, text) * (text > EOS)).sum(1)),
            ("logits are not log-probabilities: normalise them over the vocabulary first",
             lambda logits, text: (logits.gather(2, text.unsqueeze(2)).squeeze(2) * (text != PAD)).sum(1)),
            ("F.cross_entropy's default reduction averages over the whole batch: ask for one number per position",
             lambda logits, text: -F.cross_entropy(logits.transpose(1, 2), text, ignore_index=PAD).expand(text.shape[0])),
        ],
        hint="lesson 03 section 3: which positions count, and how the per-token terms combine into log p(y | z)",
    ),
)


# --- q14: word dropout --------------------------------------------------------------------------------


def _dropout_cases(g: torch.Generator) -> list[Case]:
    cases = []
    for B, T, p, empty, label in [(4, 8, 0.4, False, ""), (3, 6, 0.0, False, "p = 0: nothing is dropped"),
                                  (3, 5, 1.0, True, "p = 1, and a caption with no words")]:
        inputs = shift_right(random_captions(g, B, T, empty=empty))
        cases.append(case(inputs, p, torch.rand(B, T, generator=g), label=label))
    return cases


def _dropout_reference(inputs: Tensor, p: float, u: Tensor) -> Tensor:
    drop = (u < p) & (inputs != BOS) & (inputs != PAD)
    return inputs.masked_fill(drop, UNK)


WORD_DROPOUT = Question(
    id="q14", notebook=NOTEBOOK, function="word_dropout", title="word dropout", points=2, kind="implement",
    cases=_dropout_cases, forbidden=("mvae_course.models.text.word_dropout",),
    judge=ReferenceJudge(
        _dropout_reference,
        mistakes=[
            ("you dropped BOS: the decoder must always know where a caption starts",
             lambda x, p, u: x.masked_fill((u < p) & (x != PAD), UNK)),
            ("you dropped padding: PAD is not a word, and it must stay PAD for the mask",
             lambda x, p, u: x.masked_fill((u < p) & (x != BOS), UNK)),
            ("a token is dropped with probability p, i.e. where u < p: yours keeps those and drops the rest",
             lambda x, p, u: x.masked_fill((u >= p) & (x != BOS) & (x != PAD), UNK)),
            ("a dropped word becomes UNK (unknown), not PAD: PAD would remove it from the caption",
             lambda x, p, u: x.masked_fill((u < p) & (x != BOS) & (x != PAD), PAD)),
        ],
        hint="lesson 03 section 4: which decoder inputs word dropout hides, and what it puts in their place",
    ),
)


# --- q15: one step of beam search ---------------------------------------------------------------------


def _beam_cases(g: torch.Generator) -> list[Case]:
    def log_p(B: int, K: int, V: int) -> Tensor:
        return torch.log_softmax(torch.randn(B, K, V, generator=g) * 2, -1)

    first = torch.full((2, 3), -math.inf)
    first[:, 0] = 0.0
    running = -torch.rand(3, 4, generator=g) * 10
    finished = torch.rand(3, 4, generator=g) < 0.5
    finished[:, 0] = False  # every sample keeps an unfinished beam
    return [
        case(first, log_p(2, 3, 6), torch.zeros(2, 3, dtype=torch.bool),
             label="the first step: all beams are the same BOS, so only beam 0 has a finite score"),
        case(running, log_p(3, 4, 7), torch.zeros(3, 4, dtype=torch.bool)),
        case(running, log_p(3, 4, 7), finished, label="some beams have finished (written EOS)"),
    ]


def _stay(V: int) -> Tensor:
    stay = torch.full((V,), -math.inf)
    stay[EOS] = 0.0  # a finished beam can only repeat EOS, at no cost
    return stay


def _beam_step(scores: Tensor, log_p: Tensor, finished: Tensor, keep_finished: bool = True,
               accumulate: bool = True, divisor: str = "V") -> tuple[Tensor, Tensor, Tensor]:
    B, K, V = log_p.shape
    if keep_finished:
        log_p = torch.where(finished.unsqueeze(-1), _stay(V), log_p)
    total = (scores.unsqueeze(-1) + log_p) if accumulate else log_p
    new, index = total.reshape(B, K * V).topk(K, dim=-1)
    d = V if divisor == "V" else K
    return new, index // d, index % d


BEAM_STEP = Question(
    id="q15", notebook=NOTEBOOK, function="beam_search_step", title="one step of beam search", points=2,
    kind="implement", cases=_beam_cases, forbidden=("mvae_course.models.text.TextDecoder._beam_search",),
    judge=ReferenceJudge(
        _beam_step,
        mistakes=[
            ("a finished beam must not grow: it can only repeat EOS at no cost, keeping its score",
             lambda s, lp, f: _beam_step(s, lp, f, keep_finished=False)),
            ("a beam's score is the total log-probability of its caption: add the step's log p to the running score",
             lambda s, lp, f: _beam_step(s, lp, f, accumulate=False)),
            ("the flattened index of (beam, token) is beam * V + token: divide by the vocabulary size V",
             lambda s, lp, f: _beam_step(s, lp, f, divisor="K")),
        ],
        hint="lesson 03 section 5: keep the beam_size best extensions of all beams together, best first",
    ),
)


# --- q16: diagnosing a caption VAE's run --------------------------------------------------------------

CAPTION_FAILURES = {
    "healthy": "this run trained normally: its caption KL settles well above zero and its terms stay finite",
    "posterior_collapse": "look at the KL in the first rows, and at beta",
    "collapse_after_warmup": "look at the KL while beta rises, and after it reaches 1",
    "exploding_loss": "look at the last rows of the loss",
}
CAPTION_REMEDIES = ("none", "kl_warmup", "word_dropout", "lower_learning_rate")


def _caption_run(g: torch.Generator, failure: str) -> dict:
    n = 40
    steps = [10 * (i + 1) for i in range(n)]
    warm = 0 if failure == "posterior_collapse" else 200
    beta = [1.0 if warm == 0 else min(1.0, (s - 10) / warm) for s in steps]
    rec = curve(g, n, -60.0, uniform(g, -24.0, -18.0), rate=4.0)
    if failure == "healthy":
        kl = curve(g, n, 1.0, uniform(g, 3.0, 8.0), rate=3.0, noise=0.03)
    elif failure == "posterior_collapse":  # beta = 1 from the start: the KL is squeezed out at once
        kl = [uniform(g, 0.005, 0.03) + 2.0 * math.exp(-i) for i in range(n)]
    elif failure == "collapse_after_warmup":  # z used while beta is small, squeezed out as beta reaches 1
        peak = uniform(g, 1.5, 4.0)
        kl = [peak * (1 - b) ** 1.5 + uniform(g, 0.01, 0.05) for b in beta]
    else:
        kl = curve(g, n, 1.0, uniform(g, 3.0, 8.0), rate=3.0)
    loss = [-(r - b * k) for r, b, k in zip(rec, beta, kl)]
    if failure == "exploding_loss":
        loss = diverge(g, loss, final=math.inf)
        rec = [-v for v in loss]
    rows = [{"step": s, "epoch": s // 63, "split": "train", "loss": loss[i], "rec_text": rec[i], "kl": kl[i],
             "elbo_text": rec[i] - kl[i], "lr": 2e-3, "beta": beta[i], "samples_per_s": uniform(g, 900, 1200)}
            for i, s in enumerate(steps)]
    config = {"name": "cpu", "model": {"fusion": "independent", "text_weight": 1.0,
                                       "word_dropout": 0.5 if failure == "healthy" else 0.0},
              "train": {"lr": 2e-3, "kl_warmup_steps": warm, "max_steps": 10 * n}}
    return run_folder(rows, config)


def _caption_run_cases(g: torch.Generator) -> list[Case]:
    truths = {"healthy": {"none"}, "posterior_collapse": {"kl_warmup", "word_dropout"},
              "collapse_after_warmup": {"word_dropout"}, "exploding_loss": {"lower_learning_rate"}}
    return shuffled(g, [case(_caption_run(g, f), label="a run folder", truth=(f, truths[f])) for f in truths])


DIAGNOSE_CAPTION_RUN = Question(
    id="q16", notebook=NOTEBOOK, function="diagnose_caption_run", title="diagnose a caption VAE's run", points=2,
    kind="diagnose", cases=_caption_run_cases, judge=DiagnosisJudge(CAPTION_FAILURES, CAPTION_REMEDIES),
)


QUESTIONS = [TEACHER_FORCING, MASKED_LOG_LIKELIHOOD, WORD_DROPOUT, BEAM_STEP, DIAGNOSE_CAPTION_RUN]
