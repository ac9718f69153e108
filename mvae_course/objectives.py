"""The maths of the ELBO: sampling, log-densities, KL terms, likelihoods, bounds.

Taught in notebooks/01_elbo.ipynb (and the likelihoods in 02_image_vae and 03_text_vae).

Every function here is pure: tensors in, tensors out, no state. Per-sample quantities have shape B (one
number per data point); the model averages them over the batch. A leading K dimension (importance
samples) broadcasts through wherever a docstring says "... x".

The generative model is p(z) p(x | z) with the prior p(z) = N(0, I); the inference network gives a
diagonal Gaussian q(z | x) = N(mu, diag(exp(logvar))). Then

    log p(x) >= elbo = E_q[log p(x | z)] - KL(q(z | x) || p(z)),

and the gap is exactly KL(q(z | x) || p(z | x)). The linear-Gaussian model at the end of this file has
log p(x) and p(z | x) in closed form, so the lesson (and the tests) can check all of this.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LOG_2PI = math.log(2 * math.pi)


# --- sampling and Gaussian densities ----------------------------------------------------------------


def reparameterize(
    mu: Tensor, logvar: Tensor, k: int | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Sample z = mu + sigma * eps with eps ~ N(0, I), so gradients reach mu and logvar.

    Taught in notebooks/01_elbo.ipynb

    mu, logvar: B x D. Returns B x D, or K x B x D when `k` is given (K independent samples per row).
    """
    shape = mu.shape if k is None else (k, *mu.shape)
    eps = torch.randn(shape, generator=generator, dtype=mu.dtype, device=mu.device)
    return mu + torch.exp(0.5 * logvar) * eps


def gaussian_log_prob(x: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(x; mu, diag(exp(logvar))), summed over the last dimension.

    Taught in notebooks/01_elbo.ipynb

    x, mu, logvar: ... x D (they broadcast). Returns ... (e.g. B, or K x B).
    """
    return -0.5 * (LOG_2PI + logvar + (x - mu) ** 2 * torch.exp(-logvar)).sum(-1)


def log_standard_normal(z: Tensor) -> Tensor:
    """log p(z) under the prior N(0, I), summed over the last dimension.

    z: ... x D. Returns ... .
    """
    return -0.5 * (LOG_2PI + z**2).sum(-1)


def kl_normal(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """KL(N(mu_q, var_q) || N(mu_p, var_p)) between diagonal Gaussians, in closed form.

    Taught in notebooks/01_elbo.ipynb

    All inputs ... x D (they broadcast). Returns ... (summed over D).
    """
    ratio = torch.exp(logvar_q - logvar_p)
    return 0.5 * (ratio + (mu_q - mu_p) ** 2 * torch.exp(-logvar_p) - 1.0 - (logvar_q - logvar_p)).sum(-1)


def kl_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)): the KL term of the ELBO with a standard normal prior.

    Taught in notebooks/01_elbo.ipynb

    mu, logvar: ... x D. Returns ... .
    """
    return 0.5 * (torch.exp(logvar) + mu**2 - 1.0 - logvar).sum(-1)


# --- image likelihoods ------------------------------------------------------------------------------


def _continuous_bernoulli_log_norm(logits: Tensor) -> Tensor:
    """log Z(l) = log((e^l - 1) / l) = log of the integral of e^(l x) over x in [0, 1].

    The continuous Bernoulli density with logits l is p(x) = e^(l x) / Z(l). Written in logits, log Z is
    stable everywhere: max(l, 0) + log(1 - e^-|l|) - log|l| away from 0, and its Taylor series
    l/2 + l^2/24 - l^4/2880 near 0 (where the closed form is 0/0).
    """
    small = logits.abs() < 1e-2
    safe = torch.where(small, torch.ones_like(logits), logits)  # keeps the unused branch finite
    a = safe.abs()
    exact = torch.clamp(safe, min=0) + torch.log(-torch.expm1(-a)) - torch.log(a)
    taylor = logits / 2 + logits**2 / 24 - logits**4 / 2880
    return torch.where(small, taylor, exact)


def image_log_likelihood(
    logits: Tensor, x: Tensor, likelihood: str = "gaussian", sigma: float = 0.1
) -> Tensor:
    """log p(x | z) of an image given the decoder's logits, summed over channels and pixels.

    Taught in notebooks/02_image_vae.ipynb

    logits: ... x C x H x W (the decoder's output), x: ... x C x H x W pixels in [0, 1] (they broadcast,
    e.g. K x B x C x H x W logits against B x C x H x W images). Returns ... (e.g. B).

    - "gaussian": N(x; sigmoid(logits), sigma^2), the full normalised density. A smaller sigma weighs
      the reconstruction more against the KL term.
    - "bernoulli": -BCE(logits, x). For x strictly between 0 and 1 this is not a normalised density of
      x (it is the log-probability of binary pixels), so it is not a true bound on log p(x) for
      continuous images: fine for training, not for comparing log-likelihoods across models.
    - "continuous_bernoulli": the Bernoulli term plus its normaliser, a proper density on [0, 1]
      (Loaiza-Ganem and Cunningham, 2019). Computed from the logits so it stays exact where sigmoid
      saturates (torch.distributions.ContinuousBernoulli clamps probabilities there).
    """
    x, logits = torch.broadcast_tensors(x, logits)
    if likelihood == "gaussian":
        mean = torch.sigmoid(logits)
        log_p = -0.5 * (LOG_2PI + 2 * math.log(sigma) + ((x - mean) / sigma) ** 2)
    elif likelihood == "bernoulli":
        log_p = -F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    elif likelihood == "continuous_bernoulli":
        # p(x) = e^(l x) / Z(l): the same as lambda^x (1 - lambda)^(1 - x) times its normaliser C(lambda).
        log_p = logits * x - _continuous_bernoulli_log_norm(logits)
    else:
        raise ValueError(
            f"unknown image likelihood {likelihood!r}; use 'gaussian', 'bernoulli' or 'continuous_bernoulli'"
        )
    return log_p.flatten(-3).sum(-1)


def image_mean(logits: Tensor, likelihood: str = "gaussian") -> Tensor:
    """The mean pixel values E[x | z] in [0, 1] (what to show as a reconstruction).

    Taught in notebooks/02_image_vae.ipynb

    logits: ... x C x H x W. Returns the same shape. For the continuous Bernoulli the mean is not
    sigmoid(logits) but 1 / (1 - e^-l) - 1 / l (1/2 + l/12 - l^3/720 near l = 0).
    """
    if likelihood in ("gaussian", "bernoulli"):
        return torch.sigmoid(logits)
    if likelihood == "continuous_bernoulli":
        small = logits.abs() < 0.25  # below this the two terms of the closed form cancel badly
        safe = torch.where(small, torch.ones_like(logits), logits)
        exact = -1.0 / torch.expm1(-safe) - 1.0 / safe
        taylor = 0.5 + logits / 12 - logits**3 / 720
        return torch.where(small, taylor, exact)
    raise ValueError(
        f"unknown image likelihood {likelihood!r}; use 'gaussian', 'bernoulli' or 'continuous_bernoulli'"
    )


def image_sample(logits: Tensor, likelihood: str = "gaussian", sigma: float = 0.1) -> Tensor:
    """One draw x ~ p(x | z) per pixel and channel (torch's global generator), in [0, 1].

    logits: ... x C x H x W. "gaussian": sigmoid(logits) + sigma * noise, clipped to [0, 1];
    "bernoulli": 0 or 1 with P(1) = sigmoid(logits); "continuous_bernoulli": by inverting its CDF
    F(x) = (e^(l x) - 1) / (e^l - 1), i.e. x = log(1 + u (e^l - 1)) / l for u ~ U(0, 1) (x = u at l = 0).
    """
    if likelihood == "gaussian":
        return (torch.sigmoid(logits) + sigma * torch.randn_like(logits)).clamp(0, 1)
    if likelihood == "bernoulli":
        return torch.bernoulli(torch.sigmoid(logits))
    if likelihood == "continuous_bernoulli":
        u = torch.rand_like(logits)
        l = logits.clamp(-80, 80)  # e^80 still fits in float32
        small = l.abs() < 1e-4
        safe = torch.where(small, torch.ones_like(l), l)
        return torch.where(small, u, torch.log1p(u * torch.expm1(safe)) / safe).clamp(0, 1)
    raise ValueError(
        f"unknown image likelihood {likelihood!r}; use 'gaussian', 'bernoulli' or 'continuous_bernoulli'"
    )


# --- text likelihood --------------------------------------------------------------------------------


def text_log_likelihood(logits: Tensor, targets: Tensor, row: Tensor, batch_size: int) -> Tensor:
    """log p(caption | z) per sample: the sum of log p(token) over the real (non-pad) positions.

    Taught in notebooks/03_text_vae.ipynb

    logits: N x V, computed only at the N real token positions of the batch (content ids and EOS),
    targets: N (the true ids there), row: N (which sample each position belongs to, in [0, batch_size)).
    Returns batch_size. Padding never counts because it is never computed.
    """
    log_p = -F.cross_entropy(logits, targets, reduction="none")  # N (autocast runs it in float32)
    return log_p.new_zeros(batch_size).index_add_(0, row, log_p)


# --- the ELBO and importance-weighted bound ---------------------------------------------------------


def elbo_terms(log_likelihoods: dict[str, Tensor], kl: Tensor, beta: float = 1.0) -> dict[str, Tensor]:
    """The ELBO split into named terms, all per sample (B).

    Taught in notebooks/01_elbo.ipynb

    log_likelihoods: {modality name: B} reconstruction terms E_q[log p(x_m | z)] (one-sample estimates);
    kl: B. Returns `rec_<name>` for each modality, `kl`, `elbo` = sum(rec) - kl (the true bound) and
    `objective` = sum(rec) - beta * kl (what is maximised; equals `elbo` when beta = 1).
    """
    rec = sum(log_likelihoods.values())
    terms = {f"rec_{name}": value for name, value in log_likelihoods.items()}
    terms["kl"] = kl
    terms["elbo"] = rec - kl
    terms["objective"] = rec - beta * kl
    return terms


def log_importance_weights(log_px_given_z: Tensor, z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log w = log p(x | z) + log p(z) - log q(z | x), with p(z) = N(0, I) and q = N(mu, exp(logvar)).

    Taught in notebooks/01_elbo.ipynb

    log_px_given_z: K x B, z: K x B x D (samples from q), mu, logvar: B x D. Returns K x B.
    """
    return log_px_given_z + log_standard_normal(z) - gaussian_log_prob(z, mu, logvar)


def iwae_bound(log_w: Tensor) -> Tensor:
    """The importance-weighted bound log (1/K) sum_k w_k (Burda et al., 2016).

    Taught in notebooks/01_elbo.ipynb

    log_w: K x B. Returns B. K = 1 gives the ELBO; the bound rises with K towards log p(x).
    """
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])


def iwae_looser(log_w: Tensor) -> Tensor:
    """The stratified importance-weighted bound of a mixture posterior, the average over its M components
    outside the log: (1/M) sum_m log (1/K) sum_k w_mk, K samples from each component (Shi et al., 2019).

    log_w: M x K x B, row m computed at samples of component m with log q = the whole mixture's density.
    Returns B. By Jensen's inequality it is below log p(x), and below IWAE with the M K samples inside one
    log (hence "looser"); MMVAE+ trains on it. K = 1 gives the stratified ELBO.
    """
    return iwae_bound(log_w.transpose(0, 1)).mean(0)


def dreg_surrogate(log_w: Tensor, z: Tensor) -> Tensor:
    """A surrogate whose gradient is the DReG estimator of the IWAE gradient (Tucker et al., 2019).

    log_w: ... x K x B, computed at reparameterised samples z: ... x K x B x D with the variational
    parameters detached inside log q, so that they are reached only through z. With the normalised
    weights w~_k = w_k / sum_j w_j held constant, the surrogate is sum_k w~_k log w_k: the generative
    parameters get sum_k w~_k d log w_k (IWAE's own gradient), and a hook scales the gradient through z_k
    once more by w~_k, so the variational parameters get sum_k w~_k^2 (d log w_k / d z_k)(d z_k / d phi),
    without IWAE's high-variance score term. Returns ... x B. Its value is not the bound: take the value
    from `iwae_bound` and the gradient from here.
    """
    weights = torch.softmax(log_w.detach(), dim=-2)  # ... x K x B
    if z.requires_grad:
        z.register_hook(lambda grad: (grad * weights.unsqueeze(-1)).to(grad.dtype))
    return (weights * log_w).sum(-2)


# --- a model with everything in closed form ---------------------------------------------------------


def linear_gaussian_log_evidence(x: Tensor, W: Tensor, b: Tensor, s: float) -> Tensor:
    """log p(x) for p(z) = N(0, I), p(x | z) = N(W z + b, s^2 I), which is log N(x; b, W W^T + s^2 I).

    Taught in notebooks/01_elbo.ipynb

    x: B x X, W: X x D, b: X. Returns B.
    """
    cov = W @ W.T + s**2 * torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
    return torch.distributions.MultivariateNormal(b, covariance_matrix=cov).log_prob(x)


def linear_gaussian_posterior(x: Tensor, W: Tensor, b: Tensor, s: float) -> tuple[Tensor, Tensor]:
    """The exact posterior p(z | x) = N(mu, cov) of the linear-Gaussian model.

    Taught in notebooks/01_elbo.ipynb

    cov = (I + W^T W / s^2)^-1 and mu = cov W^T (x - b) / s^2. x: B x X, W: X x D, b: X.
    Returns mu (B x D) and cov (D x D, the same for every x). cov is diagonal when the columns of W are
    orthogonal; then a diagonal q can match the posterior exactly.
    """
    D = W.shape[1]
    precision = torch.eye(D, dtype=W.dtype, device=W.device) + W.T @ W / s**2
    cov = torch.linalg.inv(precision)
    mu = (x - b) @ W @ cov / s**2  # cov is symmetric
    return mu, cov


def linear_gaussian_elbo(x: Tensor, W: Tensor, b: Tensor, s: float, mu: Tensor, logvar: Tensor) -> Tensor:
    """The ELBO of the linear-Gaussian model for q(z | x) = N(mu, diag(exp(logvar))), in closed form.

    Taught in notebooks/01_elbo.ipynb

    E_q[log p(x | z)] = log N(x; W mu + b, s^2 I) - sum_j var_j |W_:j|^2 / (2 s^2), minus KL(q || p(z)).
    x: B x X, W: X x D, b: X, mu, logvar: B x D. Returns B.
    """
    mean = mu @ W.T + b
    expected_log_lik = gaussian_log_prob(x, mean, torch.full_like(mean, 2 * math.log(s)))
    expected_log_lik = expected_log_lik - (torch.exp(logvar) * (W**2).sum(0)).sum(-1) / (2 * s**2)
    return expected_log_lik - kl_standard_normal(mu, logvar)
