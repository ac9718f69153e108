"""Checks for exercises/01_elbo_exercises.ipynb, which follows notebooks/01_elbo.ipynb: the Gaussian KL,
the ELBO of an image, the IWAE bound, the ELBO's gap and the best mean-field q on the linear-Gaussian
model, the score-function gradient, and a written answer on the IWAE error band.

The wrong variants below are the mistakes learners make most often; each carries the feedback that
names it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mvae_course import objectives
from mvae_course.grading.question import Case, Question, ReferenceJudge, case, no_inputs

NOTEBOOK = "01_elbo_exercises"
KL_PACKAGE = ("mvae_course.objectives.kl_normal", "mvae_course.objectives.kl_standard_normal",
              "torch.distributions.kl.kl_divergence")


def _gaussian_params(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Random mu and logvar with variances well away from 1, so sign and scale errors show."""
    mu = torch.randn(*shape, generator=g, dtype=dtype) * 1.5
    logvar = torch.randn(*shape, generator=g, dtype=dtype) * 1.2
    return mu, logvar


# --- q1: KL between two diagonal Gaussians ------------------------------------------------------------


def _kl_cases(g: torch.Generator) -> list[Case]:
    mu_a, logvar_a = _gaussian_params(g, 2, 5)
    return [
        case(*_gaussian_params(g, 4, 3), *_gaussian_params(g, 4, 3)),
        case(mu_a, logvar_a, mu_a.clone(), logvar_a.clone(), label="q equal to p (the KL is 0)"),
        case(mu_a, logvar_a, torch.zeros(5), torch.zeros(5),
             label="p = N(0, I), its parameters D-vectors that broadcast against q's B x D"),
        case(*_gaussian_params(g, 2, 3, 6), *_gaussian_params(g, 2, 3, 6), label="a 2 x 3 batch of 6-dimensional q's"),
    ]


def _kl(mq: Tensor, lq: Tensor, mp: Tensor, lp: Tensor, sign: float = -1.0, mean_scale: str = "p") -> Tensor:
    """The closed form with switches for the wrong variants: the sign of the log-ratio term, whose
    variance divides the squared mean difference."""
    scale = {"p": torch.exp(-lp), "q": torch.exp(-lq), "none": 1.0}[mean_scale]
    return 0.5 * (torch.exp(lq - lp) + (mq - mp) ** 2 * scale - 1.0 + sign * (lq - lp)).sum(-1)


KL_NORMAL = Question(
    id="q1", notebook=NOTEBOOK, function="kl_normal", title="KL between two Gaussians", points=2,
    kind="implement", cases=_kl_cases, forbidden=KL_PACKAGE,
    judge=ReferenceJudge(
        objectives.kl_normal,
        mistakes=[
            ("you computed KL(p || q): the arguments are the other way round (KL is not symmetric)",
             lambda mq, lq, mp, lp: objectives.kl_normal(mp, lp, mq, lq)),
            (("your KL has the wrong sign for the log-variance term: the KL is 0 when q = p and grows "
              "as sigma_q shrinks below sigma_p"),
             lambda mq, lq, mp, lp: _kl(mq, lq, mp, lp, sign=1.0)),
            ("the squared mean difference is measured in units of p's variance, not q's",
             lambda mq, lq, mp, lp: _kl(mq, lq, mp, lp, mean_scale="q")),
            ("the squared mean difference must be divided by p's variance",
             lambda mq, lq, mp, lp: _kl(mq, lq, mp, lp, mean_scale="none")),
            ("you ignored p's parameters: this is KL(q || N(0, I))",
             lambda mq, lq, mp, lp: objectives.kl_standard_normal(mq, lq)),
            ("you averaged over the latent dimensions; the KL of a diagonal Gaussian is their sum",
             lambda mq, lq, mp, lp: objectives.kl_normal(mq, lq, mp, lp) / mq.shape[-1]),
            ("return one KL per sample (shape ...), summed over the last dimension D",
             lambda mq, lq, mp, lp: 0.5 * (torch.exp(lq - lp) + (mq - mp) ** 2 * torch.exp(-lp) - 1 - (lq - lp))),
        ],
        hint="write KL(q || p) = E_q[log q(z) - log p(z)] one dimension at a time (lesson 01, section 4)",
    ),
)


# --- q2: the ELBO of one image, Bernoulli likelihood on logits -----------------------------------------


def _elbo_cases(g: torch.Generator) -> list[Case]:
    binary = (torch.rand(2, 3, 4, 4, generator=g) > 0.5).float()
    saturated = torch.where(binary > 0, -30.0, 30.0)  # every pixel painted confidently wrong
    return [
        case(torch.rand(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g) * 2,
             *_gaussian_params(g, 3, 5)),
        case(binary, saturated, *_gaussian_params(g, 2, 4),
             label="black and white pixels with saturated logits (+-30) of the wrong sign"),
        case(torch.rand(1, 1, 8, 8, generator=g), torch.randn(1, 1, 8, 8, generator=g),
             torch.zeros(1, 3), torch.zeros(1, 3), label="one grey image, q equal to the prior"),
    ]


def _elbo_reference(x: Tensor, logits: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    return objectives.image_log_likelihood(logits, x, "bernoulli") - objectives.kl_standard_normal(mu, logvar)


def _bernoulli(x: Tensor, logits: Tensor) -> Tensor:
    """Per-pixel log-likelihood, B x C x H x W."""
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none")


def _naive_bernoulli(x: Tensor, logits: Tensor) -> Tensor:
    p = torch.sigmoid(logits)
    return x * torch.log(p) + (1 - x) * torch.log(1 - p)


def _gaussian(x: Tensor, logits: Tensor, sigma: float = 0.1) -> Tensor:
    return -0.5 * (math.log(2 * math.pi * sigma**2) + ((x - torch.sigmoid(logits)) / sigma) ** 2)


def _kl0(mu: Tensor, logvar: Tensor) -> Tensor:
    return objectives.kl_standard_normal(mu, logvar)


ELBO = Question(
    id="q2", notebook=NOTEBOOK, function="elbo", title="the ELBO of one image", points=2, kind="implement",
    cases=_elbo_cases,
    forbidden=("mvae_course.objectives.image_log_likelihood", "mvae_course.objectives.elbo_terms", *KL_PACKAGE),
    judge=ReferenceJudge(
        _elbo_reference,
        mistakes=[
            ("you added the KL term; the ELBO is reconstruction minus KL",
             lambda x, l, mu, lv: _bernoulli(x, l).flatten(1).sum(-1) + _kl0(mu, lv)),
            (("log(sigmoid(l)) underflows to -inf when the sigmoid saturates: score the pixels from the logits "
              "directly, as lesson 02 section 2 explains"),
             lambda x, l, mu, lv: _naive_bernoulli(x, l).flatten(1).sum(-1) - _kl0(mu, lv)),
            ("you averaged the log-likelihood over pixels; log p(x | z) is the sum over every pixel and channel",
             lambda x, l, mu, lv: _bernoulli(x, l).flatten(1).mean(-1) - _kl0(mu, lv)),
            (("that is a Gaussian likelihood around sigmoid(logits), the one lesson 02 shows saturating; "
              "the course scores pixels with the Bernoulli on logits"),
             lambda x, l, mu, lv: _gaussian(x, l).flatten(1).sum(-1) - _kl0(mu, lv)),
            ("you left out the KL term", lambda x, l, mu, lv: _bernoulli(x, l).flatten(1).sum(-1)),
            ("the decoder gives logits, not probabilities: the pixel's probability is sigmoid(logit)",
             lambda x, l, mu, lv: (x * torch.log(l) + (1 - x) * torch.log(1 - l)).flatten(1).sum(-1) - _kl0(mu, lv)),
        ],
        hint="one sample's ELBO is log p(x | z) summed over pixels minus the KL to the prior (your Q1 with p = N(0, I))",
    ),
)


# --- q3: the importance-weighted bound ----------------------------------------------------------------


def _iwae_cases(g: torch.Generator) -> list[Case]:
    return [
        case(torch.randn(8, 4, generator=g) * 3),
        case(torch.randn(1, 3, generator=g), label="K = 1 (the bound is the ELBO)"),
        case(torch.randn(16, 2, generator=g) * 5 - 1000.0, label="log-weights near -1000, where exp underflows"),
        case(torch.randn(5, 1, generator=g) * 20, label="one sample, weights of very different sizes"),
    ]


IWAE = Question(
    id="q3", notebook=NOTEBOOK, function="iwae_bound", title="the IWAE bound", points=2, kind="implement",
    cases=_iwae_cases, forbidden=("mvae_course.objectives.iwae_bound",),
    judge=ReferenceJudge(
        objectives.iwae_bound,
        mistakes=[
            (("you averaged the log-weights: that is the average ELBO. The IWAE bound averages the weights "
              "themselves, then takes the log"), lambda log_w: log_w.mean(0)),
            ("you forgot the 1/K: the bound is the log of the MEAN weight", lambda log_w: torch.logsumexp(log_w, 0)),
            ("exp(log w) underflows to 0 for log-weights around -1000, giving -inf: stay in log space",
             lambda log_w: torch.log(torch.exp(log_w).mean(0))),
            ("you reduced over the wrong dimension: log_w is K x B, the bound is one number per sample (B)",
             lambda log_w: torch.logsumexp(log_w, 1) - math.log(log_w.shape[1])),
        ],
        hint="lesson 01 section 6: average K importance weights, then take the log; the weights live in log space",
    ),
)


# --- q4: the gap log p(x) - ELBO of the linear-Gaussian model -----------------------------------------

W_ORTHOGONAL = [[1.0, 0.5], [1.0, -0.5], [1.0, 0.5], [1.0, -0.5]]  # lesson 01's W
W_CORRELATED = [[1.0, 0.8], [1.0, 0.2], [1.0, 0.8], [1.0, 0.2]]


def _linear_model(g: torch.Generator, W: Tensor, B: int, s: float) -> tuple[Tensor, Tensor, Tensor, float]:
    """x (B x X) drawn from the model p(z) p(x | z) = N(0, I) N(Wz + b, s^2 I), with a random b."""
    b = torch.randn(W.shape[0], generator=g, dtype=torch.float64)
    z = torch.randn(B, W.shape[1], generator=g, dtype=torch.float64)
    x = z @ W.T + b + s * torch.randn(B, W.shape[0], generator=g, dtype=torch.float64)
    return x, W, b, s


def _gap_cases(g: torch.Generator) -> list[Case]:
    f64 = torch.float64
    x, W, b, s = _linear_model(g, torch.tensor(W_ORTHOGONAL, dtype=f64), 2, 0.5)
    mu_post, cov = objectives.linear_gaussian_posterior(x, W, b, s)
    exact = case(x, W, b, s, mu_post, cov.diagonal().log().expand_as(mu_post),
                 label="orthogonal W and q = p(z | x), the exact posterior (the gap is 0)")
    correlated = _linear_model(g, torch.tensor(W_CORRELATED, dtype=f64), 3, 0.5)
    general = _linear_model(g, torch.randn(5, 3, generator=g, dtype=f64), 4, 0.7)
    return [
        exact,
        case(*correlated, *_gaussian_params(g, 3, 2, dtype=f64), label="correlated columns of W, random q"),
        case(*general, *_gaussian_params(g, 4, 3, dtype=f64), label="a random 5 x 3 W, random q"),
    ]


def _gap_reference(x: Tensor, W: Tensor, b: Tensor, s: float, mu: Tensor, logvar: Tensor) -> Tensor:
    return objectives.linear_gaussian_log_evidence(x, W, b, s) - objectives.linear_gaussian_elbo(x, W, b, s, mu, logvar)


def _q_and_posterior(x: Tensor, W: Tensor, b: Tensor, s: float, mu: Tensor, logvar: Tensor):
    mu_post, cov = objectives.linear_gaussian_posterior(x, W, b, s)
    q = torch.distributions.MultivariateNormal(mu, torch.diag_embed(logvar.exp()))
    return q, torch.distributions.MultivariateNormal(mu_post, cov.expand(x.shape[0], -1, -1)), mu_post, cov


def _reversed_gap(*args) -> Tensor:
    q, post, _, _ = _q_and_posterior(*args)
    return torch.distributions.kl_divergence(post, q)


def _diagonal_gap(x, W, b, s, mu, logvar) -> Tensor:
    _, _, mu_post, cov = _q_and_posterior(x, W, b, s, mu, logvar)
    return objectives.kl_normal(mu, logvar, mu_post, cov.diagonal().log())


ELBO_GAP = Question(
    id="q4", notebook=NOTEBOOK, function="elbo_gap", title="the gap log p(x) - ELBO", points=2, kind="derive",
    cases=_gap_cases,
    forbidden=("mvae_course.objectives.linear_gaussian_log_evidence", "mvae_course.objectives.linear_gaussian_elbo"),
    judge=ReferenceJudge(
        _gap_reference,
        mistakes=[
            ("that is ELBO - log p(x): the gap is log p(x) minus the ELBO, and it is never negative",
             lambda *a: -_gap_reference(*a)),
            ("that is KL(p(z | x) || q): the gap is the KL from q TO the posterior, KL(q || p(z | x))",
             _reversed_gap),
            (("you treated the posterior as diagonal: with correlated columns of W its covariance is not, and "
              "the gap includes what a diagonal q cannot express"),
             _diagonal_gap),
            ("that is KL(q || p(z)), the regulariser inside the ELBO; the gap is the KL to the POSTERIOR p(z | x)",
             lambda x, W, b, s, mu, lv: objectives.kl_standard_normal(mu, lv)),
        ],
        hint="lesson 01 section 1 says what the gap is exactly; section 2 gives the posterior in closed form",
    ),
)


# --- q5: the best diagonal q ---------------------------------------------------------------------------


def _best_q_cases(g: torch.Generator) -> list[Case]:
    f64 = torch.float64
    return [
        case(*_linear_model(g, torch.tensor(W_CORRELATED, dtype=f64), 3, 0.5), label="lesson 01's correlated W"),
        case(*_linear_model(g, torch.randn(6, 3, generator=g, dtype=f64), 2, 0.8), label="a random 6 x 3 W"),
        case(*_linear_model(g, torch.tensor(W_ORTHOGONAL, dtype=f64), 1, 0.5),
             label="orthogonal W (the posterior is diagonal)"),
    ]


def _precision(W: Tensor, s: float) -> Tensor:
    return torch.eye(W.shape[1], dtype=W.dtype) + W.T @ W / s**2


def _best_q_reference(x: Tensor, W: Tensor, b: Tensor, s: float) -> tuple[Tensor, Tensor]:
    mu, _ = objectives.linear_gaussian_posterior(x, W, b, s)
    return mu, (-_precision(W, s).diagonal().log()).expand_as(mu)


def _marginal_q(x, W, b, s) -> tuple[Tensor, Tensor]:
    mu, cov = objectives.linear_gaussian_posterior(x, W, b, s)
    return mu, cov.diagonal().log().expand_as(mu)


BEST_DIAGONAL_Q = Question(
    id="q5", notebook=NOTEBOOK, function="best_diagonal_q", title="the best mean-field q", points=2, kind="derive",
    cases=_best_q_cases,
    judge=ReferenceJudge(
        _best_q_reference,
        mistakes=[
            (("those are the posterior's marginal variances: the diagonal q that maximises the ELBO is narrower, "
              "it matches the posterior's PRECISION on the diagonal (mean-field underestimates the spread)"),
             _marginal_q),
            ("return the LOG-variances (logvar), not the variances",
             lambda x, W, b, s: (_best_q_reference(x, W, b, s)[0], _best_q_reference(x, W, b, s)[1].exp())),
            ("the best q's mean is the posterior's mean, not the prior's 0",
             lambda x, W, b, s: (torch.zeros_like(_best_q_reference(x, W, b, s)[0]), _best_q_reference(x, W, b, s)[1])),
        ],
        hint="lesson 01 section 3: which diagonal Gaussian is closest to the posterior in KL(q || p(z | x))",
    ),
)


# --- q6: the score-function gradient ------------------------------------------------------------------


def _score_cases(g: torch.Generator) -> list[Case]:
    cases = []
    for K, B, D, label in [(16, 3, 2, ""), (1, 2, 4, "one sample (K = 1)"), (64, 1, 3, "")]:
        mu, logvar = _gaussian_params(g, B, D)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(K, B, D, generator=g)
        cases.append(case(torch.randn(K, B, generator=g) * 10 - 20, z, mu, logvar, label=label))
    return cases


def _score_reference(f: Tensor, z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    return (f.unsqueeze(-1) * (z - mu) * torch.exp(-logvar)).mean(0)


SCORE_FUNCTION = Question(
    id="q6", notebook=NOTEBOOK, function="score_function_gradient", title="the score-function gradient", points=2,
    kind="implement", cases=_score_cases,
    judge=ReferenceJudge(
        _score_reference,
        mistakes=[
            ("you divided by the standard deviation: d/dmu log N(z; mu, sigma^2) = (z - mu) / sigma^2",
             lambda f, z, mu, lv: (f.unsqueeze(-1) * (z - mu) * torch.exp(-0.5 * lv)).mean(0)),
            ("the score of a Gaussian divides (z - mu) by the variance", lambda f, z, mu, lv: (f.unsqueeze(-1) * (z - mu)).mean(0)),
            ("the sign is off: the score is d/dmu log q(z) = (z - mu) / sigma^2",
             lambda f, z, mu, lv: (f.unsqueeze(-1) * (mu - z) * torch.exp(-lv)).mean(0)),
            ("you summed over the K samples; the estimate is their mean",
             lambda f, z, mu, lv: (f.unsqueeze(-1) * (z - mu) * torch.exp(-lv)).sum(0)),
            ("each sample's score must be multiplied by f(z): that is what the estimator weighs",
             lambda f, z, mu, lv: ((z - mu) * torch.exp(-lv)).mean(0)),
        ],
        hint="lesson 01 section 5 derives this estimator; the score is the gradient of log q with respect to mu",
    ),
)


# --- q7: written: the IWAE error band -----------------------------------------------------------------

IWAE_BAND = Question(
    id="q7", notebook=NOTEBOOK, function="explain_iwae_band", title="why the IWAE band may cross log p(x)",
    points=2, kind="written", cases=no_inputs, judge=None, min_words=40,
)


QUESTIONS = [KL_NORMAL, ELBO, IWAE, ELBO_GAP, BEST_DIAGONAL_Q, SCORE_FUNCTION, IWAE_BAND]
