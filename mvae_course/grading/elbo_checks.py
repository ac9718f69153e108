"""Checks for exercises/01_elbo_exercises.ipynb: sampling, KL terms, the ELBO and the IWAE bound.

The wrong variants below are the mistakes learners make most often; each carries the feedback that
names it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mvae_course import objectives
from mvae_course.grading.question import Case, Question, ReferenceJudge

NOTEBOOK = "01_elbo_exercises"


def _gaussian_params(g: torch.Generator, *shape: int) -> tuple[Tensor, Tensor]:
    """Random mu and logvar with variances well away from 1, so sign and scale errors show."""
    mu = torch.randn(*shape, generator=g) * 1.5
    logvar = torch.randn(*shape, generator=g) * 1.2
    return mu, logvar


# --- q1: the reparameterisation trick ----------------------------------------------------------------


def _reparameterize_cases(g: torch.Generator) -> list[Case]:
    cases = []
    for shape in [(4, 3), (2, 5, 3), (1, 1)]:
        mu, logvar = _gaussian_params(g, *shape)
        cases.append((mu, logvar, torch.randn(*shape, generator=g)))
    return cases


def _reparameterize_reference(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
    # objectives.reparameterize draws its own eps; the exercise is given eps so the answer is deterministic.
    std = torch.exp(0.5 * logvar)
    return mu + std * eps


REPARAMETERIZE = Question(
    id="q1", notebook=NOTEBOOK, function="reparameterize", title="the reparameterisation trick", points=2,
    cases=_reparameterize_cases,
    judge=ReferenceJudge(
        _reparameterize_reference,
        mistakes=[
            ("you scaled eps by the variance exp(logvar); the standard deviation is exp(0.5 * logvar)",
             lambda mu, logvar, eps: mu + torch.exp(logvar) * eps),
            ("you scaled eps by logvar itself; the standard deviation is exp(0.5 * logvar)",
             lambda mu, logvar, eps: mu + logvar * eps),
            ("you scaled eps by exp(-0.5 * logvar), the inverse of the standard deviation",
             lambda mu, logvar, eps: mu + torch.exp(-0.5 * logvar) * eps),
            ("you left out the mean: z = mu + sigma * eps",
             lambda mu, logvar, eps: torch.exp(0.5 * logvar) * eps),
        ],
    ),
)


# --- q2: KL to the standard normal prior --------------------------------------------------------------


def _kl_standard_cases(g: torch.Generator) -> list[Case]:
    return [_gaussian_params(g, 5, 4), _gaussian_params(g, 3, 2, 6), (torch.zeros(2, 3), torch.zeros(2, 3))]


def _kl_is_zero_only_at_prior(cases: list[Case], outputs: list[Tensor]) -> str | None:
    if bool((outputs[0] < -1e-6).any()):
        return "a KL divergence is never negative, but yours is for some inputs"
    return None


KL_STANDARD_NORMAL = Question(
    id="q2", notebook=NOTEBOOK, function="kl_standard_normal", title="KL(q || N(0, I))", points=2,
    cases=_kl_standard_cases,
    judge=ReferenceJudge(
        objectives.kl_standard_normal,
        mistakes=[
            ("your KL has the wrong sign for the log-variance term: it is -logvar, i.e. "
             "0.5 * sum(exp(logvar) + mu^2 - 1 - logvar)",
             lambda mu, logvar: 0.5 * (torch.exp(logvar) + mu**2 - 1 + logvar).sum(-1)),
            ("your KL is the negative of the right value: KL(q || p) >= 0, the ELBO subtracts it",
             lambda mu, logvar: -objectives.kl_standard_normal(mu, logvar)),
            ("you used logvar where the variance exp(logvar) belongs",
             lambda mu, logvar: 0.5 * (logvar + mu**2 - 1 - logvar).sum(-1)),
            ("you forgot the factor 1/2 in front of the sum",
             lambda mu, logvar: (torch.exp(logvar) + mu**2 - 1 - logvar).sum(-1)),
            ("you forgot the -1 inside the sum (it makes the KL zero at the prior)",
             lambda mu, logvar: 0.5 * (torch.exp(logvar) + mu**2 - logvar).sum(-1)),
            ("you averaged over the latent dimensions; the KL of a diagonal Gaussian is their sum",
             lambda mu, logvar: objectives.kl_standard_normal(mu, logvar) / mu.shape[-1]),
            ("you did not sum over the latent dimension: return one KL per sample (shape ..., not ... x D)",
             lambda mu, logvar: 0.5 * (torch.exp(logvar) + mu**2 - 1 - logvar)),
        ],
        properties=[_kl_is_zero_only_at_prior],
    ),
)


# --- q3: KL between two diagonal Gaussians ------------------------------------------------------------


def _kl_normal_cases(g: torch.Generator) -> list[Case]:
    mu_q, logvar_q = _gaussian_params(g, 4, 3)
    mu_p, logvar_p = _gaussian_params(g, 4, 3)
    mu_a, logvar_a = _gaussian_params(g, 2, 5)
    return [
        (mu_q, logvar_q, mu_p, logvar_p),
        (mu_a, logvar_a, mu_a.clone(), logvar_a.clone()),  # q = p: KL must be 0
        (mu_a, logvar_a, torch.zeros(2, 5), torch.zeros(2, 5)),  # reduces to q2
    ]


KL_NORMAL = Question(
    id="q3", notebook=NOTEBOOK, function="kl_normal", title="KL between two Gaussians", points=2,
    cases=_kl_normal_cases,
    judge=ReferenceJudge(
        objectives.kl_normal,
        mistakes=[
            ("you computed KL(p || q): the arguments are the other way round (KL is not symmetric)",
             lambda mq, lq, mp, lp: objectives.kl_normal(mp, lp, mq, lq)),
            ("your KL has the wrong sign for the log-variance term: it is -(logvar_q - logvar_p)",
             lambda mq, lq, mp, lp: 0.5 * (torch.exp(lq - lp) + (mq - mp) ** 2 * torch.exp(-lp) - 1
                                           + (lq - lp)).sum(-1)),
            ("the squared mean difference must be divided by the prior's variance exp(logvar_p)",
             lambda mq, lq, mp, lp: 0.5 * (torch.exp(lq - lp) + (mq - mp) ** 2 - 1 - (lq - lp)).sum(-1)),
            ("the squared mean difference is divided by the variance of p, not of q",
             lambda mq, lq, mp, lp: 0.5 * (torch.exp(lq - lp) + (mq - mp) ** 2 * torch.exp(-lq) - 1
                                           - (lq - lp)).sum(-1)),
            ("you ignored p's parameters: this is KL(q || N(0, I))",
             lambda mq, lq, mp, lp: objectives.kl_standard_normal(mq, lq)),
        ],
    ),
)


# --- q4: the ELBO of one image ------------------------------------------------------------------------


def _elbo_cases(g: torch.Generator) -> list[Case]:
    cases = []
    for B, sigma in [(3, 0.1), (2, 0.5)]:
        x = torch.rand(B, 3, 4, 4, generator=g)
        logits = torch.randn(B, 3, 4, 4, generator=g)
        mu, logvar = _gaussian_params(g, B, 5)
        cases.append((x, logits, mu, logvar, sigma))
    return cases


def _elbo_reference(x: Tensor, logits: Tensor, mu: Tensor, logvar: Tensor, sigma: float) -> Tensor:
    rec = objectives.image_log_likelihood(logits, x, "gaussian", sigma)
    return objectives.elbo_terms({"image": rec}, objectives.kl_standard_normal(mu, logvar))["elbo"]


def _rec(x: Tensor, mean: Tensor, sigma: float) -> Tensor:
    """Per-pixel Gaussian log-density, B x C x H x W."""
    return -0.5 * (math.log(2 * math.pi) + 2 * math.log(sigma) + ((x - mean) / sigma) ** 2)


ELBO = Question(
    id="q4", notebook=NOTEBOOK, function="elbo", title="the ELBO of one image", points=2,
    cases=_elbo_cases,
    judge=ReferenceJudge(
        _elbo_reference,
        mistakes=[
            ("you added the KL term; the ELBO is reconstruction minus KL",
             lambda x, l, mu, lv, s: _rec(x, torch.sigmoid(l), s).flatten(1).sum(-1)
             + objectives.kl_standard_normal(mu, lv)),
            ("the decoder gives logits: the Gaussian mean is sigmoid(logits), not the logits themselves",
             lambda x, l, mu, lv, s: _rec(x, l, s).flatten(1).sum(-1) - objectives.kl_standard_normal(mu, lv)),
            ("you left out the normalising constant -0.5 * log(2 pi sigma^2) of each pixel's Gaussian",
             lambda x, l, mu, lv, s: (-0.5 * ((x - torch.sigmoid(l)) / s) ** 2).flatten(1).sum(-1)
             - objectives.kl_standard_normal(mu, lv)),
            ("you averaged the log-likelihood over pixels; log p(x | z) is the sum over every pixel",
             lambda x, l, mu, lv, s: _rec(x, torch.sigmoid(l), s).flatten(1).mean(-1)
             - objectives.kl_standard_normal(mu, lv)),
            ("you used sigma where the variance sigma^2 belongs (or the other way round)",
             lambda x, l, mu, lv, s: _rec(x, torch.sigmoid(l), math.sqrt(s)).flatten(1).sum(-1)
             - objectives.kl_standard_normal(mu, lv)),
            ("you left out the KL term", lambda x, l, mu, lv, s: _rec(x, torch.sigmoid(l), s).flatten(1).sum(-1)),
        ],
    ),
)


# --- q5: the importance-weighted bound ----------------------------------------------------------------


def _iwae_cases(g: torch.Generator) -> list[Case]:
    return [
        (torch.randn(8, 4, generator=g) * 3,),
        (torch.randn(1, 3, generator=g),),  # K = 1: the ELBO
        (torch.randn(16, 2, generator=g) * 5 - 1000.0,),  # typical image log-weights: exp underflows
    ]


IWAE = Question(
    id="q5", notebook=NOTEBOOK, function="iwae_bound", title="the IWAE bound", points=2,
    cases=_iwae_cases,
    judge=ReferenceJudge(
        objectives.iwae_bound,
        mistakes=[
            ("you averaged the log-weights: that is the average ELBO. The IWAE bound averages the weights "
             "themselves, log (1/K) sum_k exp(log w_k)", lambda log_w: log_w.mean(0)),
            ("you forgot the 1/K: subtract log K after the logsumexp", lambda log_w: torch.logsumexp(log_w, 0)),
            ("exp(log w) underflows to 0 for log-weights around -1000, giving -inf: use torch.logsumexp",
             lambda log_w: torch.log(torch.exp(log_w).mean(0))),
            ("you reduced over the wrong dimension: log_w is K x B, the bound is one number per sample (B)",
             lambda log_w: torch.logsumexp(log_w, 1) - math.log(log_w.shape[1])),
        ],
    ),
)


QUESTIONS = [REPARAMETERIZE, KL_STANDARD_NORMAL, KL_NORMAL, ELBO, IWAE]
