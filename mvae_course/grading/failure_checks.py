"""Checks for exercises/05_failure_modes_exercises.ipynb, which follows notebooks/05_failure_modes.ipynb:
a corrupted expert under the product and the mixture, beta's rate and distortion on the linear-Gaussian
model, the MMVAE+ objective, diagnosing a fusion from its evaluation report, and a written answer on the
mixture's generative gap.

The MMVAE+ objective (Palumbo, Daunhawer and Vogt, ICLR 2023) is written here from the reference code's
"looser" IWAE bound, because the package has no MMVAE+ yet; when it gets one, its loss should agree with
`mmvaeplus_reference` on these inputs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mvae_course.grading.diagnosis import DiagnosisJudge, shuffled, uniform
from mvae_course.grading.question import Case, Question, ReferenceJudge, case, no_inputs

NOTEBOOK = "05_failure_modes_exercises"


def _log_uniform(g: torch.Generator, n: int, low: float, high: float) -> Tensor:
    return torch.exp(math.log(low) + (math.log(high) - math.log(low)) * torch.rand(n, generator=g, dtype=torch.float64))


# --- q23: a corrupted expert under the product and under the mixture ----------------------------------


def _shift_cases(g: torch.Generator) -> list[Case]:
    f64 = torch.float64
    return [
        case(_log_uniform(g, 5, 0.1, 100), _log_uniform(g, 5, 0.1, 100), torch.randn(5, generator=g, dtype=f64) * 3),
        case(torch.tensor([100.0, 400.0], dtype=f64), torch.tensor([1.0, 1.0], dtype=f64),
             torch.tensor([2.0, -3.0], dtype=f64), label="a confident wrong expert (precision 100 or 400 against 1)"),
        case(torch.tensor([0.5], dtype=f64), torch.tensor([50.0], dtype=f64), torch.tensor([4.0], dtype=f64),
             label="a vague wrong expert beside a confident right one"),
    ]


def _shift_reference(precision_bad: Tensor, precision_other: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    return precision_bad * shift / (1 + precision_bad + precision_other), shift / 2


CORRUPTED_EXPERT = Question(
    id="q23", notebook=NOTEBOOK, function="corrupted_expert_shift", title="a corrupted expert: product vs mixture",
    points=2, kind="derive", cases=_shift_cases,
    forbidden=("mvae_course.models.fusion.product_of_experts", "mvae_course.models.fusion.mixture_of_products",
               "mvae_course.models.fusion.sample_mixture", "mvae_course.models.fusion.mixture_log_prob"),
    judge=ReferenceJudge(
        _shift_reference,
        mistakes=[
            ("your product leaves out the prior expert: the course's PoE always includes N(0, 1)",
             lambda tb, to, d: (tb * d / (tb + to), d / 2)),
            (("a mixture does not weigh its components by precision: each has weight 1/2, so its mean moves by "
              "half the shift whatever the experts' precisions"),
             lambda tb, to, d: (tb * d / (1 + tb + to), tb * d / (tb + to))),
            ("the mixture's mean is the average of its components' means: one moved component moves it by half",
             lambda tb, to, d: (tb * d / (1 + tb + to), d)),
        ],
        hint="move one expert's mean by `shift` and follow the joint posterior's mean (lesson 04 sections 2 and 4)",
    ),
)


# --- q24: beta's rate and distortion on a 1-D linear-Gaussian model ------------------------------------


def _rd_cases(g: torch.Generator) -> list[Case]:
    f64 = torch.float64

    def model(n: int) -> tuple[Tensor, Tensor, Tensor]:
        return (torch.randn(n, generator=g, dtype=f64) * 2, 0.5 + 1.5 * torch.rand(n, generator=g, dtype=f64),
                0.3 + 0.7 * torch.rand(n, generator=g, dtype=f64))

    return [
        case(*model(4), _log_uniform(g, 4, 0.1, 10.0)),
        case(*model(3), torch.ones(3, dtype=f64), label="beta = 1: the ELBO's own point"),
        case(*model(3), torch.full((3,), 50.0, dtype=f64), label="a large beta (50): the rate falls towards 0"),
    ]


def _rate_distortion(x: Tensor, w: Tensor, s: Tensor, beta: Tensor, beta_on: str = "kl",
                     constant: bool = True, spread: bool = True) -> tuple[Tensor, Tensor]:
    """Rate KL(q || p(z)) and distortion -E_q[log p(x | z)] at the q that maximises E_q[log p] - beta KL."""
    b = beta if beta_on == "kl" else 1.0 / beta if beta_on == "rec" else torch.ones_like(beta)
    m = w * x / (w**2 + b * s**2)
    v = b * s**2 / (b * s**2 + w**2)
    rate = 0.5 * (v + m**2 - 1 - torch.log(v))
    distortion = ((x - w * m) ** 2 + (w**2 * v if spread else 0.0)) / (2 * s**2)
    return rate, distortion + (0.5 * torch.log(2 * math.pi * s**2) if constant else 0.0)


RATE_DISTORTION = Question(
    id="q24", notebook=NOTEBOOK, function="rate_distortion", title="rate and distortion at the beta-optimal q",
    points=2, kind="derive", cases=_rd_cases,
    forbidden=("mvae_course.objectives.linear_gaussian_posterior", "mvae_course.objectives.linear_gaussian_elbo"),
    judge=ReferenceJudge(
        _rate_distortion,
        mistakes=[
            ("beta weighs the KL (the rate), not the reconstruction: maximise E_q[log p(x | z)] - beta KL",
             lambda *a: _rate_distortion(*a, beta_on="rec")),
            ("that is the exact posterior of the model (beta = 1) whatever beta: the optimal q changes with beta",
             lambda *a: _rate_distortion(*a, beta_on="none")),
            ("the distortion -E_q[log p(x | z)] includes the Gaussian's normaliser 1/2 log(2 pi s^2)",
             lambda *a: _rate_distortion(*a, constant=False)),
            ("the distortion is an expectation over q: the encoder's variance adds w^2 v / (2 s^2)",
             lambda *a: _rate_distortion(*a, spread=False)),
        ],
        hint="maximise E_q[log p(x | z)] - beta KL(q || N(0, 1)) over q's mean and variance, then evaluate both terms",
    ),
)


# --- q25: the MMVAE+ objective ------------------------------------------------------------------------


def _mmvaeplus_cases(g: torch.Generator) -> list[Case]:
    cases = []
    for M, K, B, beta, label in [(2, 4, 3, 1.0, ""), (2, 1, 2, 0.5, "K = 1 and beta = 0.5"),
                                 (3, 8, 2, 1.0, "three modalities")]:
        def draw(*shape: int, scale: float) -> Tensor:
            return -scale * (1 + torch.rand(*shape, generator=g))

        cases.append(case(draw(M, K, B, scale=200), draw(M, K, B, scale=10), draw(M, M, K, B, scale=8),
                          draw(M, K, B, scale=5), beta, label=label))
    return cases


def mmvaeplus_reference(log_lik: Tensor, log_prior: Tensor, log_q_experts: Tensor, log_q_private: Tensor,
                        beta: float, inside: bool = False, own: bool = False, beta_on_lik: bool = False,
                        private: bool = True, weights: bool = True, iwae: bool = True) -> Tensor:
    """The MMVAE+ bound of the reference code (the average over modalities outside the log), with switches
    for the wrong variants. Shapes: log_lik, log_prior, log_q_private M x K x B; log_q_experts M x M x K x B
    (stratum, expert). Returns B."""
    M, K, _ = log_lik.shape
    if own:
        log_qz = torch.stack([log_q_experts[m, m] for m in range(M)])
    else:
        log_qz = torch.logsumexp(log_q_experts, dim=1) - (math.log(M) if weights else 0.0)  # M x K x B
    regulariser = log_prior - log_qz - (log_q_private if private else 0.0)
    lw = beta * log_lik + regulariser if beta_on_lik else log_lik + beta * regulariser  # M x K x B
    if not iwae:
        return lw.mean((0, 1))
    if inside:
        return torch.logsumexp(lw.flatten(0, 1), 0) - math.log(M * K)
    return (torch.logsumexp(lw, 1) - math.log(K)).mean(0)


MMVAE_PLUS = Question(
    id="q25", notebook=NOTEBOOK, function="mmvaeplus_bound", title="the MMVAE+ objective", points=2,
    kind="implement", cases=_mmvaeplus_cases,
    judge=ReferenceJudge(
        mmvaeplus_reference,
        mistakes=[
            (("MMVAE+ averages the modalities' IWAE bounds OUTSIDE the log (the looser bound of the reference "
              "code); yours averages all M K weights inside it"), lambda *a: mmvaeplus_reference(*a, inside=True)),
            (("log q(z | X) is the MIXTURE of every expert's density at z, not only the density of the expert that "
              "drew it"), lambda *a: mmvaeplus_reference(*a, own=True)),
            ("the mixture is uniform: each expert has weight 1/M", lambda *a: mmvaeplus_reference(*a, weights=False)),
            ("beta weighs the regulariser (prior over posterior), not the likelihood",
             lambda *a: mmvaeplus_reference(*a, beta_on_lik=True)),
            ("the private latent w_m is sampled from q(w_m | x_m) too: its density belongs in the weight",
             lambda *a: mmvaeplus_reference(*a, private=False)),
            ("that averages the log-weights (an ELBO); MMVAE+ trains the importance-weighted bound over K samples",
             lambda *a: mmvaeplus_reference(*a, iwae=False)),
        ],
        hint="write one importance weight per stratum and sample, then combine them the way the lesson's MMVAE+ "
             "section does",
    ),
)


# --- q26: diagnosing a fusion from its evaluation report ----------------------------------------------

FUSION_FAILURES = {
    "healthy": "this model is coherent in both directions and draws about as sharply as a unimodal VAE",
    "unaligned_latents": "compare the cross-modal coherence with chance, and look at the fusion",
    "unweighted_likelihood": "which modality does the shared latent serve? compare the KL each expert pays and "
                             "the likelihood weights",
    "mixture_blur": "coherence is fine here; compare the sharpness of its drawings with a unimodal VAE's",
    "beta_too_large": "how many nats does the posterior carry at all, and at what beta?",
}
FUSION_REMEDIES = ("none", "fuse_the_experts", "raise_text_weight", "add_private_latents", "lower_beta")


def _report(g: torch.Generator, failure: str) -> dict:
   chance = 1 / 240

   def strict(low: float, high: float) -> float:
       return round(uniform(g, low, high), 3)

   report = {
       "fusion": ["poe", "mopoe"][int(torch.randint(2, (), generator=g))], "text_weight": 10.0, "beta": 1.0,
       "coherence_strict": {"image_to_text": strict(0.7, 0.95), "text_to_image": strict(0.6, 0.85),
                            "joint": strict(0.3, 0.6), "chance": round(chance, 4)},
       "kl": {"image": round(uniform(g, 15, 30), 2), "text": round(uniform(g, 8, 15), 2)},
       "sharpness": {"model": round(uniform(g, 0.65, 0.8), 3), "unimodal_vae": round(uniform(g, 0.75, 0.85), 3)},
   }
   if failure == "unaligned_latents":
       report["fusion"] = "independent"
       report["coherence_strict"].update(image_to_text=strict(0.0, 0.01), text_to_image=strict(0.0, 0.01),
                                         joint=strict(0.0, 0.01))
   elif failure == "unweighted_likelihood":
       report["text_weight"] = 1.0
       report["coherence_strict"].update(image_to_text=strict(0.02, 0.08), text_to_image=strict(0.01, 0.05),
                                         joint=strict(0.0, 0.03))
       report["kl"] = {"image": round(uniform(g, 60, 120), 2), "text": round(uniform(g, 0.2, 1.0), 2)}
   elif failure == "mixture_blur":
       report["fusion"] = ["moe", "mopoe"][int(torch.randint(2, (), generator=g))]
       report["sharpness"]["model"] = round(uniform(g, 0.15, 0.3), 3)
   elif failure == "beta_too_large":
       report["beta"] = float(int(torch.randint(6, 20, (), generator=g)))
       report["coherence_strict"].update(image_to_text=strict(0.0, 0.02), text_to_image=strict(0.0, 0.02),
                                         joint=strict(0.0, 0.02))
       report["kl"] = {"image": round(uniform(g, 0.1, 0.5), 2), "text": round(uniform(g, 0.05, 0.3), 2)}
       report["sharpness"]["model"] = round(uniform(g, 0.1, 0.2), 3)
   return report


def _report_cases(g: torch.Generator) -> list[Case]:
   truths = {"healthy": {"none"}, "unaligned_latents": {"fuse_the_experts"},
             "unweighted_likelihood": {"raise_text_weight"}, "mixture_blur": {"add_private_latents"},
             "beta_too_large": {"lower_beta"}}
   return shuffled(g, [case(_report(g, f), label="an evaluation report", truth=(f, truths[f])) for f in truths])


DIAGNOSE_FUSION = Question(
   id="q26", notebook=NOTEBOOK, function="diagnose_fusion_report", title="diagnose a fusion from its report",
   points=2, kind="diagnose", cases=_report_cases, judge=DiagnosisJudge(FUSION_FAILURES, FUSION_REMEDIES),
)


# --- q27: written: the mixture's generative gap -------------------------------------------------------

GENERATIVE_GAP = Question(
   id="q27", notebook=NOTEBOOK, function="explain_generative_gap", title="why mixtures draw blurry samples",
   points=2, kind="written", cases=no_inputs, judge=None, min_words=40,
)


QUESTIONS = [CORRUPTED_EXPERT, RATE_DISTORTION, MMVAE_PLUS, DIAGNOSE_FUSION, GENERATIVE_GAP]
