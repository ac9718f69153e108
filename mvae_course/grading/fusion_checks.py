"""Checks for exercises/04_fusion_exercises.ipynb: product and mixture of experts, cross-modal generation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mvae_course.config import ModelConfig
from mvae_course.grading.question import Case, Question, ReferenceJudge
from mvae_course.models.fusion import product_of_experts
from mvae_course.models.mvae import MultimodalVAE
from mvae_course.objectives import gaussian_log_prob

NOTEBOOK = "04_fusion_exercises"


# --- q11: the product of Gaussian experts, with the prior expert --------------------------------------


def _poe_cases(g: torch.Generator) -> list[Case]:
    cases = []
    for E, B, D, p_missing in [(2, 4, 3, 0.0), (3, 5, 2, 0.4)]:
        mu = torch.randn(E, B, D, generator=g) * 2
        logvar = torch.randn(E, B, D, generator=g)
        mask = torch.rand(E, B, generator=g) >= p_missing
        mask[:, 0] = False  # one sample with every modality missing: the prior alone
        cases.append((mu, logvar, mask))
    return cases


def _precision_weighted(mu: Tensor, logvar: Tensor, mask: Tensor, prior: bool = True) -> tuple[Tensor, Tensor]:
    """The product with explicit precisions, for building the wrong variants below."""
    precision = torch.exp(-logvar) * mask.unsqueeze(-1)
    total = precision.sum(0) + (1.0 if prior else 0.0)
    return (precision * mu).sum(0) / total, -torch.log(total)


def _poe_precisions_add_up(cases: Sequence[Case], outputs: Sequence[tuple[Tensor, Tensor]]) -> str | None:
    for (mu, logvar, mask), (_, out_logvar) in zip(cases, outputs):
        precision = 1.0 + (torch.exp(-logvar) * mask.unsqueeze(-1)).sum(0)
        if not torch.allclose(torch.exp(-out_logvar), precision, rtol=1e-3):
            return "the joint precision must be the sum of the experts' precisions (prior included)"
    return None


PRODUCT_OF_EXPERTS = Question(
    id="q11", notebook=NOTEBOOK, function="product_of_experts", title="the product of Gaussian experts",
    points=2,
    cases=_poe_cases,
    judge=ReferenceJudge(
        lambda mu, logvar, mask: product_of_experts(mu, logvar, mask, prior_expert=True),
        mistakes=[
            ("your product of experts leaves out the prior expert N(0, I): add precision 1 and mean 0",
             lambda mu, logvar, mask: _precision_weighted(mu, logvar, mask, prior=False)),
            ("a missing modality (mask False) must contribute nothing: multiply its precision by the mask",
             lambda mu, logvar, mask: product_of_experts(mu, logvar, None, prior_expert=True)),
            ("precisions add up, not variances: 1/var = 1 + sum_e mask_e / var_e",
             lambda mu, logvar, mask: (_precision_weighted(mu, logvar, mask)[0],
                                       torch.log(1.0 + (torch.exp(logvar) * mask.unsqueeze(-1)).sum(0)))),
            ("the joint mean weighs each expert's mean by its precision, then divides by the total precision",
             lambda mu, logvar, mask: ((torch.exp(-logvar) * mask.unsqueeze(-1) * mu).sum(0),
                                       _precision_weighted(mu, logvar, mask)[1])),
            ("the joint mean is precision-weighted, not a plain average of the experts' means",
             lambda mu, logvar, mask: ((mu * mask.unsqueeze(-1)).sum(0) / (1.0 + mask.sum(0).unsqueeze(-1)),
                                       _precision_weighted(mu, logvar, mask)[1])),
        ],
        properties=[_poe_precisions_add_up],
    ),
)


# --- q12: sampling from a mixture of experts ----------------------------------------------------------

MIXTURE_K = 3000  # samples per data point: component frequencies are then within ~1% of 1/E


def _mixture_cases(g: torch.Generator) -> list[Case]:
    cases = []
    for E, B, D in [(2, 3, 2), (3, 2, 4)]:
        # Experts far apart, with standard deviations far from 1, so every sample reveals its expert.
        centres = torch.arange(E, dtype=torch.float32).view(E, 1, 1) * 20.0 - 10.0
        mu = centres + torch.randn(E, B, D, generator=g)
        logvar = torch.log(torch.rand(E, B, D, generator=g) * 0.2 + 0.1) * 2  # std in [0.1, 0.3]
        cases.append((mu, logvar, MIXTURE_K))
    return cases


def _judge_mixture(cases: Sequence[Case], outputs: Sequence[Tensor]) -> str | None:
    """Statistical checks: every sample comes from one expert, experts are chosen uniformly and
    independently for every sample, and within its expert a sample has the expert's mean and spread."""
    for i, ((mu, logvar, k), z) in enumerate(zip(cases, outputs)):
        E, B, D = mu.shape
        if not isinstance(z, Tensor) or z.shape != (k, B, D):
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            return f"test case {i + 1}: expected k x B x D = {(k, B, D)} samples, got {shape}"
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
            return "your samples have no spread: sample z = mu_e + exp(0.5 * logvar_e) * eps, not just mu_e"
        frequency = torch.stack([(expert == e).float().mean(0) for e in range(E)])  # E x B
        if bool(((frequency == 0) | (frequency == 1)).all()):
            return ("every sample of a data point comes from the same expert: choose the expert afresh "
                    "for each of the k samples")
        if (frequency - 1.0 / E).abs().max().item() > 0.06:
            return f"the experts must be chosen uniformly (1/E = {1 / E:.2f} each); yours are chosen with " \
                   f"frequencies {[round(f, 2) for f in frequency[:, 0].tolist()]}"
        if abs(r.mean().item()) > 0.1 or not 0.8 < r.var().item() < 1.25:
            return (f"within an expert, your samples have variance {r.var().item():.2f} times the expert's: "
                    "scale eps by the standard deviation exp(0.5 * logvar)")
    return None


SAMPLE_MIXTURE = Question(
    id="q12", notebook=NOTEBOOK, function="sample_mixture", title="sampling from a mixture of experts",
    points=2,
    cases=_mixture_cases,
    judge=_judge_mixture,
)


# --- q13: cross-modal generation, image to caption ----------------------------------------------------


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
    return [(model, torch.rand(6, 3, 16, 16, generator=g)), (model, torch.rand(2, 3, 16, 16, generator=g))]


def _decode(model: MultimodalVAE, z: Tensor) -> list[list[int]]:
    return model.text_decoder.generate(z, method="greedy")


def _image_expert(model: MultimodalVAE, image: Tensor) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        return model.image_encoder(image)


CAPTION_IMAGE = Question(
    id="q13", notebook=NOTEBOOK, function="caption_image", title="cross-modal generation: image to caption",
    points=2,
    cases=_caption_cases,
    judge=ReferenceJudge(
        lambda model, image: model.generate_text(image, method="greedy"),
        mistakes=[
            ("you decoded from the image expert's mean alone: fuse it with the prior expert N(0, I) first "
             "(product_of_experts), as the model was trained",
             lambda model, image: _decode(model, _image_expert(model, image)[0])),
            ("you decoded from the prior's mean z = 0: the caption must depend on the image",
             lambda model, image: _decode(model, torch.zeros(image.shape[0], model.config.z_dim))),
        ],
        hint="decode greedily (argmax) from the posterior mean of q(z | image), the product of the image "
        "expert and the prior expert",
    ),
)


QUESTIONS = [PRODUCT_OF_EXPERTS, SAMPLE_MIXTURE, CAPTION_IMAGE]
