"""Checks for exercises/04_fusion_exercises.ipynb, which follows notebooks/04_fusion.ipynb: the masked
product of experts, sampling a mixture, captioning an image with a trained model's parts, the stratified
MoE ELBO, the MoPoE ELBO over subsets, and a written answer on MoPoE's bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mvae_course.config import ModelConfig
from mvae_course.grading.question import Case, Marks, Question, ReferenceJudge, case, describe, no_inputs
from mvae_course.models.fusion import mixture_of_products, product_of_experts, subsets
from mvae_course.models.mvae import MultimodalVAE
from mvae_course.objectives import gaussian_log_prob, kl_standard_normal

NOTEBOOK = "04_fusion_exercises"


# --- q17: the product of Gaussian experts, with the prior expert --------------------------------------


def _poe_cases(g: torch.Generator) -> list[Case]:
    cases = []
    for E, B, D, p_missing, garbage in [(2, 4, 3, 0.0, False), (3, 5, 2, 0.4, False), (2, 4, 2, 0.5, True)]:
        mu = torch.randn(E, B, D, generator=g) * 2
        logvar = torch.randn(E, B, D, generator=g)
        mask = torch.rand(E, B, generator=g) >= p_missing
        if p_missing:
            mask[:, 0] = False  # one sample with every modality missing: the prior alone
        label = ""
        if garbage:
            mu = torch.where(mask.unsqueeze(-1), mu, math.nan)  # a missing encoder's output is garbage
            label = "missing experts whose means are NaN (a masked encoder's garbage)"
        elif p_missing:
            label = "some modalities missing, one sample with none at all"
        cases.append(case(mu, logvar, mask, label=label))
    return cases


def _precision_weighted(mu: Tensor, logvar: Tensor, mask: Tensor, prior: bool = True, average: bool = False,
                        add_variances: bool = False, divide: bool = True) -> tuple[Tensor, Tensor]:
    """The product with explicit precisions and switches for the wrong variants (NaN-safe like the package)."""
    present = mask.unsqueeze(-1)
    precision = torch.where(present, torch.exp(-logvar), 0.0)
    total = precision.sum(0) + (1.0 if prior else 0.0)
    weights = torch.where(present, 1.0, 0.0) if average else precision
    mean = (weights * torch.where(present, mu, 0.0)).sum(0)
    if divide:
        mean = mean / (weights.sum(0) + 1.0 if average else total)
    if add_variances:
        return mean, torch.log(1.0 + torch.where(present, torch.exp(logvar), 0.0).sum(0))
    return mean, -torch.log(total)


PRODUCT_OF_EXPERTS = Question(
    id="q17", notebook=NOTEBOOK, function="product_of_experts", title="the product of Gaussian experts", points=2,
    kind="implement", cases=_poe_cases,
    forbidden=("mvae_course.models.fusion.product_of_experts", "mvae_course.models.fusion.mixture_of_products"),
    judge=ReferenceJudge(
        lambda mu, logvar, mask: product_of_experts(mu, logvar, mask, prior_expert=True),
        mistakes=[
            ("your product leaves out the prior expert N(0, I), the expert that is always present",
             lambda mu, lv, m: _precision_weighted(mu, lv, m, prior=False)),
            ("a missing modality (mask False) must contribute nothing to the product",
             lambda mu, lv, m: _precision_weighted(mu, lv, torch.ones_like(m))),
            (("a missing expert's mean may be garbage (even NaN), and 0 * NaN is NaN: leave missing experts out "
              "instead of multiplying them by 0"),
             lambda mu, lv, m: ((torch.exp(-lv) * m.unsqueeze(-1) * mu).sum(0) / (1 + (torch.exp(-lv) * m.unsqueeze(-1)).sum(0)),
                                -torch.log(1 + (torch.exp(-lv) * m.unsqueeze(-1)).sum(0)))),
            ("precisions add up, not variances", lambda mu, lv, m: _precision_weighted(mu, lv, m, add_variances=True)),
            ("the joint mean is the precision-weighted sum divided by the total precision",
             lambda mu, lv, m: _precision_weighted(mu, lv, m, divide=False)),
            ("the joint mean is precision-weighted, not a plain average of the experts' means",
             lambda mu, lv, m: _precision_weighted(mu, lv, m, average=True)),
        ],
        hint="lesson 04 sections 2 and 3: complete the square in the log of a product of Gaussians",
    ),
)


# --- q18: sampling from a mixture of experts ----------------------------------------------------------

MIXTURE_K = 3000  # samples per data point: component frequencies are then within ~1% of 1/E


def _mixture_cases(g: torch.Generator) -> list[Case]:
    cases = []
    for E, B, D in [(2, 3, 2), (3, 2, 4)]:
        # Experts far apart, with standard deviations far from 1, so every sample reveals its expert.
        centres = torch.arange(E, dtype=torch.float32).view(E, 1, 1) * 20.0 - 10.0
        mu = centres + torch.randn(E, B, D, generator=g)
        logvar = torch.log(torch.rand(E, B, D, generator=g) * 0.2 + 0.1) * 2  # std in [0.1, 0.3]
        cases.append(case(mu, logvar, MIXTURE_K))
    return cases


def _mixture_problem(mu: Tensor, logvar: Tensor, k: int, z: object) -> str | None:
    """Statistical checks of one case: every sample comes from one expert, experts are chosen uniformly and
    independently for every sample, and within its expert a sample has the expert's mean and spread."""
    E, B, D = mu.shape
    if not isinstance(z, Tensor) or z.shape != (k, B, D):
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        return f"expected k x B x D = {(k, B, D)} samples, got {shape}"
    log_p = gaussian_log_prob(z.unsqueeze(1).double(), mu.double(), logvar.double())  # K x E x B
    expert = log_p.argmax(1)  # K x B: the expert that explains each sample best
    chosen = mu[expert, torch.arange(B)]  # K x B x D
    std = torch.exp(0.5 * logvar)[expert, torch.arange(B)]
    r = (z - chosen) / std  # standardised residuals: N(0, 1) when the sampling is right
    if bool((r.abs() > 8).float().mean() > 0.01):
        if bool(((z - mu.mean(0)).abs() < (z - chosen).abs()).float().mean() > 0.5):
            return ("your samples sit between the experts: a mixture picks ONE expert per sample and samples "
                    "from it, it does not average the experts' parameters")
        return "your samples do not come from any of the experts N(mu_e, exp(logvar_e))"
    if r.var().item() < 0.01:
        return "your samples have no spread: each is a draw from its expert, not the expert's mean"
    frequency = torch.stack([(expert == e).float().mean(0) for e in range(E)])  # E x B
    if bool(((frequency == 0) | (frequency == 1)).all()):
        return "every sample of a data point comes from the same expert: choose the expert afresh for each of the k samples"
    if (frequency - 1.0 / E).abs().max().item() > 0.06:
        return (f"the experts must be chosen uniformly (1/E = {1 / E:.2f} each); yours are chosen with "
                f"frequencies {[round(f, 2) for f in frequency[:, 0].tolist()]}")
    if abs(r.mean().item()) > 0.1 or not 0.8 < r.var().item() < 1.25:
        return (f"within an expert, your samples have variance {r.var().item():.2f} times the expert's: "
                "scale the noise by the expert's standard deviation, exp(0.5 * logvar)")
    return None


def _judge_mixture(cases: Sequence[Case], outputs: Sequence[Tensor]) -> Marks:
    problems = [(i, _mixture_problem(*c, z)) for i, (c, z) in enumerate(zip(cases, outputs))]
    wrong = [(i, p) for i, p in problems if p]
    if not wrong:
        return Marks(len(cases), len(cases))
    i, problem = wrong[0]
    return Marks(len(cases) - len(wrong), len(cases), f"test case {i + 1} ({describe(cases[i])}): {problem}")


SAMPLE_MIXTURE = Question(
    id="q18", notebook=NOTEBOOK, function="sample_mixture", title="sampling from a mixture of experts", points=2,
    kind="implement", cases=_mixture_cases, judge=_judge_mixture,
    forbidden=("mvae_course.models.fusion.sample_mixture", "mvae_course.models.fusion.mixture_of_experts_sample"),
)


# --- q19: cross-modal generation, image to caption ----------------------------------------------------


def fixed_model() -> MultimodalVAE:
    """A small product-of-experts model with fixed random weights (seed 0), the same in every grading.

    Its encoder weights are scaled up so that the posterior mean, and so the caption, changes visibly
    when the image expert is fused wrongly.
    """
    config = ModelConfig(
        fusion="poe", z_dim=4, image_size=16, image_channels=(4, 8), vocab_size=24, emb_dim=8,
        enc_hidden=8, dec_hidden=16, max_caption_len=8,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = MultimodalVAE(config)
        with torch.no_grad():
            model.image_encoder.to_params.weight.mul_(8.0)
            model.text_decoder.init_hidden.weight.mul_(3.0)
    return model.eval()


def _caption_cases(g: torch.Generator) -> list[Case]:
    model = fixed_model()
    return [case(model, torch.rand(6, 3, 16, 16, generator=g)), case(model, torch.rand(2, 3, 16, 16, generator=g)),
            case(model, torch.rand(1, 3, 16, 16, generator=g), label="a batch of one image")]


def _decode(model: MultimodalVAE, z: Tensor) -> list[list[int]]:
    return model.text_decoder.generate(z, method="greedy")


def _image_expert(model: MultimodalVAE, image: Tensor) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        return model.image_encoder(image)


CAPTION_IMAGE = Question(
    id="q19", notebook=NOTEBOOK, function="caption_image", title="cross-modal generation: image to caption", points=2,
    kind="implement", cases=_caption_cases,
    forbidden=("mvae_course.models.mvae.MultimodalVAE.generate_text", "mvae_course.models.mvae.MultimodalVAE.encode",
               "mvae_course.models.mvae.MultimodalVAE.embed", "mvae_course.models.mvae.MultimodalVAE.fuse",
               "mvae_course.models.fusion.product_of_experts"),
    judge=ReferenceJudge(
        lambda model, image: model.generate_text(image, method="greedy"),
        mistakes=[
            (("you decoded from the image expert's mean alone: the model's posterior given the image is the product "
              "of that expert and the prior expert, as it was trained"),
             lambda model, image: _decode(model, _image_expert(model, image)[0])),
            ("you decoded from the prior's mean z = 0: the caption must depend on the image",
             lambda model, image: _decode(model, torch.zeros(image.shape[0], model.config.z_dim))),
        ],
        hint="decode greedily from the mean of the model's posterior given the image alone (lesson 04 section 3)",
    ),
)


# --- q20: the stratified MoE ELBO ---------------------------------------------------------------------


def _moe_cases(g: torch.Generator) -> list[Case]:
    cases = []
    for E, B, D, missing in [(2, 4, 3, False), (3, 3, 2, False), (2, 3, 4, True)]:
        mu = torch.randn(E, B, D, generator=g)
        logvar = torch.randn(E, B, D, generator=g) * 0.5 - 0.5
        z = mu + torch.exp(0.5 * logvar) * torch.randn(E, B, D, generator=g)  # z[e] ~ q_e: one sample per expert
        mask = torch.ones(E, B, dtype=torch.bool)
        label = ""
        if missing:
            mask[1, 0] = False  # sample 0 has no caption: its text expert, and its z, are garbage
            z[1, 0] = torch.randn(D, generator=g) * 50
            label = "a missing modality: sample 0 has no caption"
        log_lik = -torch.rand(E, B, generator=g) * 100
        cases.append(case(log_lik, z, mu, logvar, mask, label=label))
    return cases


def _moe(log_lik: Tensor, z: Tensor, mu: Tensor, logvar: Tensor, mask: Tensor, own: bool = False,
         weights: bool = True, mean: bool = True, use_mask: bool = True) -> Tensor:
    if not use_mask:
        mask = torch.ones_like(mask)
    n = mask.sum(0)  # B: experts present
    log_w = torch.where(mask, 0.0, -math.inf) - (torch.log(n.float()) if weights else 0.0)  # E x B mixture weights
    if own:
        log_q = gaussian_log_prob(z, mu, logvar)  # E x B: each z under the expert that drew it
    else:
        log_q = torch.logsumexp(gaussian_log_prob(z.unsqueeze(1), mu, logvar) + log_w, dim=1)  # E x B
    terms = log_lik + gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z)) - log_q
    total = torch.where(mask, terms, 0.0).sum(0)
    return total / n if mean else total


MOE_ELBO = Question(
    id="q20", notebook=NOTEBOOK, function="moe_elbo", title="the stratified MoE ELBO", points=2, kind="implement",
    cases=_moe_cases,
    forbidden=("mvae_course.models.fusion.mixture_log_prob", "mvae_course.models.mvae.MultimodalVAE._loss_moe"),
    judge=ReferenceJudge(
        _moe,
        mistakes=[
            (("the KL term needs the density of the MIXTURE at z, log (1/E) sum_e' q_e'(z), not the density of the "
              "expert that drew z (that would be the average of the unimodal ELBOs)"),
             lambda *a: _moe(*a, own=True)),
            ("the mixture is UNIFORM: each present expert has weight 1/E (subtract log E inside)",
             lambda *a: _moe(*a, weights=False)),
            ("stratified sampling AVERAGES over the experts' samples; yours sums them",
             lambda *a: _moe(*a, mean=False)),
            ("a missing modality's expert is not part of the mixture, and its z must not count",
             lambda *a: _moe(*a, use_mask=False)),
            (("a mixture's KL has no closed form: estimate it at the samples, log q_MoE(z) - log p(z); the experts' "
              "own KLs to the prior are not the mixture's"),
             lambda ll, z, mu, lv, m: torch.where(m, ll - kl_standard_normal(mu, lv), 0.0).sum(0) / m.sum(0)),
        ],
        hint="lesson 04 section 4: the MoE ELBO is an average over the components of log p(x, z) - log q_MoE(z)",
    ),
)


# --- q21: the MoPoE ELBO ------------------------------------------------------------------------------


def _mopoe_cases(g: torch.Generator) -> list[Case]:
    cases = []
    for E, B, D, label in [(2, 4, 3, "two modalities: 3 subsets"), (3, 2, 2, "three modalities: 7 subsets")]:
        mu = torch.randn(E, B, D, generator=g)
        logvar = torch.randn(E, B, D, generator=g)
        rec = -torch.rand(2**E - 1, B, generator=g) * 50
        cases.append(case(mu, logvar, rec, label=label))
    return cases


def _mopoe(mu: Tensor, logvar: Tensor, rec: Tensor, prior: bool = False, mean: bool = True) -> Tensor:
    mu_s, logvar_s = mixture_of_products(mu, logvar, subsets(range(mu.shape[0])), prior_expert=prior)  # S x B x D
    terms = rec - kl_standard_normal(mu_s, logvar_s)  # S x B
    return terms.mean(0) if mean else terms.sum(0)


MOPOE_ELBO = Question(
    id="q21", notebook=NOTEBOOK, function="mopoe_elbo", title="the MoPoE ELBO over subsets", points=2,
    kind="implement", cases=_mopoe_cases,
    forbidden=("mvae_course.models.fusion.mixture_of_products", "mvae_course.models.fusion.product_of_experts",
               "mvae_course.models.mvae.MultimodalVAE._loss_mopoe"),
    judge=ReferenceJudge(
        _mopoe,
        mistakes=[
            (("MoPoE's subset posteriors are products of the subset's experts WITHOUT the prior expert (Sutter et "
              "al.): a one-modality subset is that modality's expert"), lambda *a: _mopoe(*a, prior=True)),
            ("stratified over the subsets, the ELBO AVERAGES their terms; yours sums them",
             lambda *a: _mopoe(*a, mean=False)),
            ("every non-empty subset is a component, not just the joint one",
             lambda mu, lv, rec: rec[-1] - kl_standard_normal(*[t[-1] for t in mixture_of_products(
                 mu, lv, subsets(range(mu.shape[0])), prior_expert=False)])),
        ],
        hint="lesson 04 section 4: one product of experts per non-empty subset, each with its own KL to the prior",
    ),
)


# --- q22: written: MoPoE's bound ----------------------------------------------------------------------

MOPOE_BOUND = Question(
    id="q22", notebook=NOTEBOOK, function="explain_mopoe_bound", title="why MoPoE's objective is a looser bound",
    points=2, kind="written", cases=no_inputs, judge=None, min_words=40,
)


QUESTIONS = [PRODUCT_OF_EXPERTS, SAMPLE_MIXTURE, CAPTION_IMAGE, MOE_ELBO, MOPOE_ELBO, MOPOE_BOUND]
