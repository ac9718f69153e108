"""Checks for exercises/03_text_exercises.ipynb: teacher forcing, the padding mask, the caption likelihood."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mvae_course.data.text import BOS, EOS, PAD
from mvae_course.grading.question import Case, Question, ReferenceJudge
from mvae_course.models.text import shift_right
from mvae_course.objectives import text_log_likelihood

NOTEBOOK = "03_text_exercises"


def random_captions(g: torch.Generator, B: int, T: int, vocab_size: int = 20) -> tuple[Tensor, Tensor]:
    """A batch in the course's layout: content ids (>= 4), one EOS, then PAD. Returns text B x T, lengths B.

    The first caption always fills all T positions, so the batch is as long as its longest caption.
    """
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    text = torch.randint(EOS + 2, vocab_size, (B, T), generator=g)
    positions = torch.arange(T)
    text[positions == (lengths - 1).unsqueeze(1)] = EOS
    text[positions >= lengths.unsqueeze(1)] = PAD
    return text, lengths


# --- q8: teacher-forcing inputs -----------------------------------------------------------------------


def _caption_cases(g: torch.Generator) -> list[Case]:
    return [(random_captions(g, 4, 6)[0],), (random_captions(g, 3, 9)[0],), (random_captions(g, 1, 1)[0],)]


TEACHER_FORCING = Question(
    id="q8", notebook=NOTEBOOK, function="teacher_forcing_inputs", title="the teacher-forcing shift", points=2,
    cases=_caption_cases,
    judge=ReferenceJudge(
        shift_right,
        mistakes=[
            ("teacher-forcing inputs are not shifted right: the decoder would see the token it must predict",
             lambda text: text.clone()),
            ("you shifted left: position t must read token t - 1 (the past), not token t + 1",
             lambda text: torch.cat([text[:, 1:], torch.full_like(text[:, :1], PAD)], 1)),
            ("the inputs must start with BOS (id 1), the token that tells the decoder a caption begins",
             lambda text: torch.cat([torch.full_like(text[:, :1], PAD), text[:, :-1]], 1)),
            ("the inputs must start with BOS (id 1), the token that tells the decoder a caption begins",
             lambda text: torch.cat([torch.full_like(text[:, :1], EOS), text[:, :-1]], 1)),
            ("drop the last token after prepending BOS: the inputs keep the length T of the captions",
             lambda text: torch.cat([torch.full_like(text[:, :1], BOS), text], 1)),
        ],
    ),
)


# --- q9: the padding mask -----------------------------------------------------------------------------


def _real_tokens(text: Tensor) -> Tensor:
    # The batch contract (docs/architecture.md): everything but PAD is a real token, EOS included.
    return text != PAD


PADDING_MASK = Question(
    id="q9", notebook=NOTEBOOK, function="real_token_mask", title="the padding mask", points=1,
    cases=_caption_cases,
    judge=ReferenceJudge(
        _real_tokens,
        mistakes=[
            ("your mask is inverted: True must mark real tokens (content and EOS), False the padding",
             lambda text: text == PAD),
            ("EOS is a real token: the decoder must learn to predict it, or it never learns to stop",
             lambda text: text > EOS),
        ],
    ),
)


# --- q10: the masked caption log-likelihood -----------------------------------------------------------


def _likelihood_cases(g: torch.Generator) -> list[Case]:
    cases = []
    for B, T, V in [(4, 7, 12), (2, 3, 30)]:
        text, _ = random_captions(g, B, T, V)
        cases.append((torch.randn(B, T, V, generator=g) * 2, text))
    return cases


def _masked_reference(logits: Tensor, text: Tensor) -> Tensor:
    real = _real_tokens(text)
    row = torch.arange(text.shape[0]).unsqueeze(1).expand_as(text)
    return text_log_likelihood(logits[real], text[real], row[real], text.shape[0])


def _token_log_p(logits: Tensor, text: Tensor) -> Tensor:
    return -F.cross_entropy(logits.transpose(1, 2), text, reduction="none")  # B x T


MASKED_LOG_LIKELIHOOD = Question(
    id="q10", notebook=NOTEBOOK, function="masked_text_log_likelihood", title="the masked caption log-likelihood",
    points=2,
    cases=_likelihood_cases,
    judge=ReferenceJudge(
        _masked_reference,
        mistakes=[
            ("you counted the padding positions: sum log p(token) only where text != PAD",
             lambda logits, text: _token_log_p(logits, text).sum(1)),
            ("you averaged over the real tokens; log p(caption | z) is their sum",
             lambda logits, text: (_token_log_p(logits, text) * (text != PAD)).sum(1) / (text != PAD).sum(1)),
            ("that is the negative log-likelihood (the cross-entropy); return log p, which is <= 0",
             lambda logits, text: -_masked_reference(logits, text)),
            ("you left EOS out: it is a real token, the decoder must learn to predict it",
             lambda logits, text: (_token_log_p(logits, text) * (text > EOS)).sum(1)),
            ("logits are not log-probabilities: apply log_softmax over the vocabulary first",
             lambda logits, text: (logits.gather(2, text.unsqueeze(2)).squeeze(2) * (text != PAD)).sum(1)),
        ],
    ),
)


QUESTIONS = [TEACHER_FORCING, PADDING_MASK, MASKED_LOG_LIKELIHOOD]
