"""Fusing the unimodal posteriors ("experts") into one joint posterior q(z | x_1, ..., x_M).

Taught in notebooks/04_fusion.ipynb

Each modality's encoder gives a diagonal Gaussian expert N(mu_e, var_e); experts are stacked along a
leading dimension E. Three ways to combine them:

- product of experts (PoE, MVAE, Wu and Goodman 2018): q is proportional to p(z) prod_e q_e, again a
  Gaussian whose precision is the sum of the precisions. A missing modality is simply left out.
- mixture of experts (MoE, MMVAE, Shi et al. 2019): q = (1/E) sum_e q_e; trained with stratified
  samples (every component sampled for every data point).
- mixture of products of experts (MoPoE, Sutter et al. 2021): a uniform mixture of the PoE of every
  non-empty subset of modalities.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from mvae_course.objectives import gaussian_log_prob, reparameterize


class Posterior(NamedTuple):
    """A posterior q(z | ...): a uniform mixture of C diagonal Gaussians, C = 1 for a single Gaussian.

    mu, logvar: C x B x D. Every fusion returns this one type (PoE and a lone expert with C = 1; MoE
    with one component per expert; MoPoE with one per subset), so no caller branches on the fusion.
    Unpacks like a pair: `mu, logvar = model.encode(...)`.
    """

    mu: Tensor
    logvar: Tensor

    @property
    def components(self) -> int:
        """C, the number of mixture components (1: a single Gaussian)."""
        return self.mu.shape[0]

    @property
    def mean(self) -> Tensor:
        """E[z], B x D: the average of the components' means (the mixture is uniform)."""
        return self.mu.mean(0)

    def sample(self, k: int | None = None) -> Tensor:
        """z ~ q: B x D, or K x B x D when `k` is given. A single Gaussian is reparameterised (gradients
        flow); a mixture picks a component per sample first (`sample_mixture`)."""
        if self.components == 1:
            return reparameterize(self.mu[0], self.logvar[0], k=k)
        return sample_mixture(self.mu, self.logvar, k=k)[0]

    def log_prob(self, z: Tensor) -> Tensor:
        """log q(z): z ... x B x D -> ... ."""
        if self.components == 1:
            return gaussian_log_prob(z, self.mu[0], self.logvar[0])
        return mixture_log_prob(z, self.mu, self.logvar)


def product_of_experts(
    mu: Tensor, logvar: Tensor, mask: Tensor | None = None, prior_expert: bool = True
) -> tuple[Tensor, Tensor]:
    """The precision-weighted product of Gaussian experts, normalised: N(mu, exp(logvar)).

    Taught in notebooks/04_fusion.ipynb

    mu, logvar: E x B x D; mask: E x B bool (False = modality missing for that sample: the expert
    contributes nothing) or None (all present). With `prior_expert` the prior N(0, I) is one more expert,
    so a sample with every expert masked gets the prior. Returns mu, logvar: B x D.

    Precision 1/var = exp(-logvar) adds up, and mu is the precision-weighted mean of the expert means.
    Both are computed in log space (logsumexp, softmax), which stays finite for any logvar.
    """
    if mu.shape != logvar.shape or mu.dim() != 3:
        raise ValueError(
            f"mu and logvar must both be E x B x D, got {tuple(mu.shape)} and {tuple(logvar.shape)}"
        )
    log_precision = -logvar
    if mask is not None:
        if mask.shape != mu.shape[:2]:
            raise ValueError(f"mask must be E x B = {tuple(mu.shape[:2])}, got {tuple(mask.shape)}")
        present = mask.unsqueeze(-1)  # E x B x 1
        if not prior_expert and not bool(mask.any(0).all()):
            raise ValueError("a sample has every expert masked and no prior expert: its product is undefined")
        log_precision = log_precision.masked_fill(~present, -math.inf)
        mu = torch.where(present, mu, torch.zeros_like(mu))  # masked means may be garbage (even NaN)
    if prior_expert:
        zeros = torch.zeros_like(mu[:1])  # the prior: mean 0, log-precision 0
        mu = torch.cat([mu, zeros])
        log_precision = torch.cat([log_precision, zeros])
    weights = torch.softmax(log_precision, dim=0)  # precision_e / total precision
    return (weights * mu).sum(0), -torch.logsumexp(log_precision, dim=0)


def subsets(modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """All non-empty subsets of the modalities, smallest first, each in the given order.

    Taught in notebooks/04_fusion.ipynb

    subsets(["image", "text"]) == [("image",), ("text",), ("image", "text")].
    """
    return [s for r in range(1, len(modalities) + 1) for s in itertools.combinations(modalities, r)]


def mixture_of_experts_sample(
    mu: Tensor, logvar: Tensor, k: int = 1, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Stratified samples from the uniform mixture (1/E) sum_e N(mu_e, var_e): k from every component.

    Taught in notebooks/04_fusion.ipynb

    mu, logvar: E x B x D. Returns z: E x K x B x D (z[e] comes from expert e, with gradients through
    `reparameterize`) and component: E x K x B (the expert index of each sample, i.e. component[e] == e).
    Averaging an objective over e is then an unbiased, lower-variance estimate of its expectation under
    the mixture (MMVAE).
    """
    E, B, _ = mu.shape
    z = reparameterize(mu, logvar, k=k, generator=generator).transpose(0, 1)  # E x K x B x D
    component = torch.arange(E, device=mu.device).view(E, 1, 1).expand(E, k, B)
    return z, component


def _mixture_log_weights(weights: Tensor | None, E: int, B: int, like: Tensor) -> Tensor:
    """Normalised mixture log-weights, E x B, from None (uniform), E or E x B non-negative weights."""
    if weights is None:
        return torch.full((E, B), -math.log(E), dtype=like.dtype, device=like.device)
    weights = weights.to(like.dtype)
    if weights.dim() == 1:
        weights = weights.unsqueeze(1)
    weights = weights.expand(E, B)
    return torch.log(weights) - torch.log(weights.sum(0, keepdim=True))


def sample_mixture(
    mu: Tensor,
    logvar: Tensor,
    weights: Tensor | None = None,
    k: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample the mixture sum_e w_e N(mu_e, var_e): pick a component by its weight, then sample it.

    Taught in notebooks/04_fusion.ipynb

    mu, logvar: E x B x D; weights: E or E x B, non-negative, normalised here (None: uniform; a 0 weight
    leaves out a missing modality). Returns z: B x D (K x B x D when `k` is given) and component: B
    (K x B), the chosen expert of each sample. The choice is discrete, so no gradient flows through it.
    """
    E, B, D = mu.shape
    probs = _mixture_log_weights(weights, E, B, mu).exp().T  # B x E
    n = 1 if k is None else k
    component = torch.multinomial(probs, n, replacement=True, generator=generator).T  # K x B
    index = component.unsqueeze(-1).expand(n, B, D)
    mu_k = torch.gather(mu, 0, index)  # K x B x D: mu[component[k, b], b]
    logvar_k = torch.gather(logvar, 0, index)
    z = mu_k + torch.exp(0.5 * logvar_k) * torch.randn(
        mu_k.shape, generator=generator, dtype=mu.dtype, device=mu.device
    )
    return (z[0], component[0]) if k is None else (z, component)


def mixture_log_prob(z: Tensor, mu: Tensor, logvar: Tensor, weights: Tensor | None = None) -> Tensor:
    """log sum_e w_e N(z; mu_e, var_e), by logsumexp over the components (uniform weights by default).

    Taught in notebooks/04_fusion.ipynb

    z: ... x B x D (e.g. K x B x D or E x K x B x D), mu, logvar: E x B x D, weights: E or E x B (None:
    1/E each). Returns ... x B. Used for log q(z | x) of a MoE/MoPoE posterior in IWAE and KL estimates.
    """
    E, B, _ = mu.shape
    log_w = _mixture_log_weights(weights, E, B, mu)  # E x B
    log_p = gaussian_log_prob(z.unsqueeze(-3), mu, logvar)  # ... x E x B
    return torch.logsumexp(log_p + log_w, dim=-2)


def mixture_of_products(
    mu: Tensor,
    logvar: Tensor,
    subsets_idx: Sequence[Sequence[int]],
    mask: Tensor | None = None,
    prior_expert: bool = True,
) -> tuple[Tensor, Tensor]:
    """The PoE of each subset of experts: the components of the MoPoE posterior.

    Taught in notebooks/04_fusion.ipynb

    mu, logvar: E x B x D; subsets_idx: S subsets of expert indices (e.g. [(0,), (1,), (0, 1)]);
    mask: E x B bool or None, as in `product_of_experts`. Returns mu_s, logvar_s: S x B x D. The MoPoE
    posterior is the uniform mixture of these S Gaussians (`sample_mixture`, `mixture_log_prob`).
    """
    E, B, _ = mu.shape
    present = torch.ones(E, B, dtype=torch.bool, device=mu.device) if mask is None else mask
    components = []
    for subset in subsets_idx:
        in_subset = torch.zeros(E, 1, dtype=torch.bool, device=mu.device)
        in_subset[list(subset)] = True
        components.append(product_of_experts(mu, logvar, present & in_subset, prior_expert))
    mu_s, logvar_s = zip(*components)
    return torch.stack(mu_s), torch.stack(logvar_s)
