"""Tests of the maths in mvae_course/objectives.py against closed forms, torch.distributions and MC."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import (
    Bernoulli,
    ContinuousBernoulli,
    Independent,
    MultivariateNormal,
    Normal,
    kl_divergence,
)

from mvae_course.objectives import (
    elbo_terms,
    gaussian_log_prob,
    image_log_likelihood,
    image_mean,
    iwae_bound,
    kl_normal,
    kl_standard_normal,
    linear_gaussian_elbo,
    linear_gaussian_log_evidence,
    linear_gaussian_posterior,
    log_importance_weights,
    reparameterize,
    text_log_likelihood,
)

PAD = 0  # the padding id fixed by the token contract in docs/architecture.md
DTYPE = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- Gaussians and KL --------------------------------------------------------------------------------


def test_gaussian_log_prob_equals_torch_normal_and_broadcasts() -> None:
    g = _gen(0)
    z = torch.randn(7, 4, 3, generator=g, dtype=DTYPE)  # K x B x D
    mu, logvar = torch.randn(4, 3, generator=g, dtype=DTYPE), torch.randn(4, 3, generator=g, dtype=DTYPE)
    expected = Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    got = gaussian_log_prob(z, mu, logvar)
    assert got.shape == (7, 4)
    torch.testing.assert_close(got, expected)


def test_kl_normal_equals_torch_and_standard_normal_case() -> None:
    g = _gen(1)
    mu_q, lv_q, mu_p, lv_p = (torch.randn(5, 4, generator=g, dtype=DTYPE) for _ in range(4))
    expected = kl_divergence(Normal(mu_q, (0.5 * lv_q).exp()), Normal(mu_p, (0.5 * lv_p).exp())).sum(-1)
    torch.testing.assert_close(kl_normal(mu_q, lv_q, mu_p, lv_p), expected)
    zeros = torch.zeros_like(mu_q)
    torch.testing.assert_close(kl_standard_normal(mu_q, lv_q), kl_normal(mu_q, lv_q, zeros, zeros))


def test_kl_is_nonnegative_and_zero_only_when_q_equals_p() -> None:
    g = _gen(2)
    mu, logvar, mu_p, logvar_p = (torch.randn(100, 6, generator=g, dtype=DTYPE) for _ in range(4))
    assert (kl_normal(mu, logvar, mu_p, logvar_p) > 0).all()
    assert (kl_standard_normal(mu, logvar) > 0).all()
    torch.testing.assert_close(kl_normal(mu, logvar, mu, logvar), torch.zeros(100, dtype=DTYPE))
    zeros = torch.zeros(3, 6, dtype=DTYPE)
    torch.testing.assert_close(kl_standard_normal(zeros, zeros), torch.zeros(3, dtype=DTYPE))
    # a small change in either the mean or the variance makes it positive
    assert (kl_normal(mu + 1e-3, logvar, mu, logvar) > 0).all()
    assert (kl_normal(mu, logvar + 1e-3, mu, logvar) > 0).all()


def test_closed_form_kl_matches_monte_carlo() -> None:
    g = _gen(3)
    mu_q, lv_q = torch.randn(4, 3, generator=g, dtype=DTYPE), torch.randn(4, 3, generator=g, dtype=DTYPE)
    mu_p, lv_p = torch.randn(4, 3, generator=g, dtype=DTYPE), torch.randn(4, 3, generator=g, dtype=DTYPE)
    z = reparameterize(mu_q, lv_q, k=200_000, generator=g)  # K x B x D
    q = Independent(Normal(mu_q, (0.5 * lv_q).exp()), 1)
    p = Independent(Normal(mu_p, (0.5 * lv_p).exp()), 1)
    log_ratio = q.log_prob(z) - p.log_prob(z)  # K x B: an unbiased estimate of the KL per sample
    mc, se = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(z.shape[0])
    closed = kl_normal(mu_q, lv_q, mu_p, lv_p)
    assert ((closed - mc).abs() < 5 * se).all(), (closed, mc, se)


# --- reparameterisation ------------------------------------------------------------------------------


def test_reparameterize_shapes_statistics_and_seed() -> None:
    mu = torch.tensor([[1.0, -2.0]], dtype=DTYPE)
    logvar = torch.tensor([[0.0, math.log(4.0)]], dtype=DTYPE)
    assert reparameterize(mu, logvar).shape == (1, 2)
    z = reparameterize(mu, logvar, k=100_000, generator=_gen(4))
    assert z.shape == (100_000, 1, 2)
    torch.testing.assert_close(z.mean(0), mu, atol=0.03, rtol=0)  # se: 0.003 and 0.006
    torch.testing.assert_close(z.var(0), logvar.exp(), atol=0.06, rtol=0)
    torch.testing.assert_close(reparameterize(mu, logvar, 3, _gen(5)), reparameterize(mu, logvar, 3, _gen(5)))


def test_gradients_reach_mu_and_logvar_through_reparameterize() -> None:
    mu = torch.randn(3, 2, dtype=DTYPE, requires_grad=True)
    logvar = torch.randn(3, 2, dtype=DTYPE, requires_grad=True)
    z = reparameterize(mu, logvar, k=5, generator=_gen(6))
    z.sum().backward()
    eps = ((z - mu) / torch.exp(0.5 * logvar)).detach()
    # dz/dmu = 1 and dz/dlogvar = 0.5 * sigma * eps, summed over the K samples
    torch.testing.assert_close(mu.grad, torch.full_like(mu, 5.0))
    torch.testing.assert_close(logvar.grad, (0.5 * torch.exp(0.5 * logvar) * eps).sum(0).detach())


# --- the linear-Gaussian model: log p(x) and p(z | x) in closed form ---------------------------------


def _linear_gaussian(orthogonal: bool = False, seed: int = 7, D: int = 2, X: int = 5):
    """A model p(z) = N(0, I), p(x | z) = N(W z + b, s^2 I) and data x drawn from it."""
    g = _gen(seed)
    W = torch.randn(X, D, generator=g, dtype=DTYPE)
    if orthogonal:  # orthogonal columns: the posterior covariance is diagonal
        Q, _ = torch.linalg.qr(W)
        W = Q * torch.tensor([2.0, 0.7], dtype=DTYPE)[:D]
    b = torch.randn(X, generator=g, dtype=DTYPE)
    s = 0.5
    z = torch.randn(64, D, generator=g, dtype=DTYPE)
    x = z @ W.T + b + s * torch.randn(64, X, generator=g, dtype=DTYPE)
    return W, b, s, x, g


def test_log_evidence_and_posterior_satisfy_bayes_rule() -> None:
    W, b, s, x, g = _linear_gaussian()
    mu_post, cov_post = linear_gaussian_posterior(x, W, b, s)
    z = torch.randn(x.shape[0], W.shape[1], generator=g, dtype=DTYPE)  # any z
    log_lik = gaussian_log_prob(x, z @ W.T + b, torch.full_like(x, 2 * math.log(s)))
    log_prior = gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))
    log_post = MultivariateNormal(mu_post, covariance_matrix=cov_post).log_prob(z)
    # log p(x) = log p(x | z) + log p(z) - log p(z | x) for every z
    torch.testing.assert_close(log_lik + log_prior - log_post, linear_gaussian_log_evidence(x, W, b, s))


def test_elbo_gap_is_kl_to_the_true_posterior() -> None:
    W, b, s, x, g = _linear_gaussian()
    mu = torch.randn(x.shape[0], 2, generator=g, dtype=DTYPE)
    logvar = torch.randn(x.shape[0], 2, generator=g, dtype=DTYPE) - 1.0
    elbo = linear_gaussian_elbo(x, W, b, s, mu, logvar)
    log_px = linear_gaussian_log_evidence(x, W, b, s)
    assert (elbo < log_px).all()
    mu_post, cov_post = linear_gaussian_posterior(x, W, b, s)
    q = MultivariateNormal(mu, covariance_matrix=torch.diag_embed(logvar.exp()))
    kl_to_posterior = kl_divergence(q, MultivariateNormal(mu_post, covariance_matrix=cov_post))
    torch.testing.assert_close(log_px - elbo, kl_to_posterior)


def test_closed_form_elbo_matches_monte_carlo_with_the_package_terms() -> None:
    W, b, s, x, g = _linear_gaussian()
    x = x[:8]
    mu = torch.randn(8, 2, generator=g, dtype=DTYPE)
    logvar = torch.randn(8, 2, generator=g, dtype=DTYPE) - 1.0
    z = reparameterize(mu, logvar, k=50_000, generator=g)  # K x B x D
    log_lik = gaussian_log_prob(x, z @ W.T + b, torch.full_like(x, 2 * math.log(s)))  # K x B
    terms = elbo_terms({"x": log_lik}, kl_standard_normal(mu, logvar))
    mc, se = terms["elbo"].mean(0), terms["elbo"].std(0) / math.sqrt(z.shape[0])
    assert ((mc - linear_gaussian_elbo(x, W, b, s, mu, logvar)).abs() < 5 * se).all()


def test_reparameterised_gradient_is_unbiased() -> None:
    W, b, s, x, g = _linear_gaussian()
    x = x[:4]
    mu = torch.randn(4, 2, generator=g, dtype=DTYPE, requires_grad=True)
    logvar = (torch.randn(4, 2, generator=g, dtype=DTYPE) - 1.0).requires_grad_()
    exact_elbo = linear_gaussian_elbo(x, W, b, s, mu, logvar)
    exact_mu, exact_logvar = torch.autograd.grad(exact_elbo.sum(), [mu, logvar])
    k = 50_000
    z = reparameterize(mu, logvar, k=k, generator=g)
    log_lik = gaussian_log_prob(x, z @ W.T + b, torch.full_like(x, 2 * math.log(s)))
    elbo = log_lik.mean(0) - kl_standard_normal(mu, logvar)
    mc_mu, mc_logvar = torch.autograd.grad(elbo.sum(), [mu, logvar])
    # the MC error is far below the size of the gradients themselves
    torch.testing.assert_close(mc_mu, exact_mu, atol=0.05 * exact_mu.abs().max().item(), rtol=0)
    torch.testing.assert_close(mc_logvar, exact_logvar, atol=0.05 * exact_logvar.abs().max().item(), rtol=0)


def test_elbo_is_tight_when_q_is_the_true_posterior() -> None:
    W, b, s, x, g = _linear_gaussian(orthogonal=True)
    mu_post, cov_post = linear_gaussian_posterior(x, W, b, s)
    off_diagonal = cov_post - torch.diag(cov_post.diagonal())
    assert off_diagonal.abs().max() < 1e-12
    logvar = cov_post.diagonal().log().expand_as(mu_post)
    log_px = linear_gaussian_log_evidence(x, W, b, s)
    torch.testing.assert_close(linear_gaussian_elbo(x, W, b, s, mu_post, logvar), log_px)
    # and every importance weight equals p(x): the estimator has zero variance
    z = reparameterize(mu_post, logvar, k=10, generator=g)
    log_lik = gaussian_log_prob(x, z @ W.T + b, torch.full_like(x, 2 * math.log(s)))
    log_w = log_importance_weights(log_lik, z, mu_post, logvar)
    torch.testing.assert_close(log_w, log_px.expand_as(log_w))


def test_iwae_bound_rises_with_k_towards_log_evidence() -> None:
    W, b, s, x, g = _linear_gaussian(seed=8)
    x = x.repeat(32, 1)  # 2048 rows: average over many x and draws
    mu_post, cov_post = linear_gaussian_posterior(x, W, b, s)
    sd_post = cov_post.diagonal().sqrt()
    mu, logvar = mu_post + 0.7 * sd_post, torch.log(2 * sd_post**2).expand_as(mu_post)  # shifted and too wide
    log_px = linear_gaussian_log_evidence(x, W, b, s)
    gaps, ses = [], []  # mean of log p(x) - bound, and its standard error
    for k in (1, 8, 64, 512):
        z = reparameterize(mu, logvar, k=k, generator=g)
        log_lik = gaussian_log_prob(x, z @ W.T + b, torch.full_like(x, 2 * math.log(s)))
        gap = log_px - iwae_bound(log_importance_weights(log_lik, z, mu, logvar))
        gaps.append(gap.mean().item())
        ses.append(gap.std().item() / math.sqrt(len(gap)))
    elbo_gap = (log_px - linear_gaussian_elbo(x, W, b, s, mu, logvar)).mean().item()
    assert abs(gaps[0] - elbo_gap) < 4 * ses[0]  # K = 1 is the ELBO (in expectation)
    assert all(a - b > 4 * se for a, b, se in zip(gaps, gaps[1:3], ses)), (gaps, ses)  # rises with K
    assert -4 * ses[-1] < gaps[-1] < 0.01 * gaps[0], (gaps, ses)  # and approaches log p(x) from below


def test_iwae_bound_is_log_mean_exp_and_stable() -> None:
    log_w = torch.tensor([[-1000.0, 2.0], [-1001.0, 3.0], [-999.0, 1.0]], dtype=DTYPE)
    expected = torch.log(torch.exp(log_w - log_w.max(0).values).mean(0)) + log_w.max(0).values
    torch.testing.assert_close(iwae_bound(log_w), expected)
    assert torch.isfinite(iwae_bound(log_w)).all()
    torch.testing.assert_close(iwae_bound(log_w[:1]), log_w[0])


def test_elbo_terms_names_and_beta() -> None:
    rec = {"image": torch.tensor([-10.0, -20.0]), "text": torch.tensor([-3.0, -4.0])}
    kl = torch.tensor([2.0, 5.0])
    terms = elbo_terms(rec, kl, beta=0.5)
    assert set(terms) == {"rec_image", "rec_text", "kl", "elbo", "objective"}
    torch.testing.assert_close(terms["elbo"], torch.tensor([-15.0, -29.0]))
    torch.testing.assert_close(terms["objective"], torch.tensor([-14.0, -26.5]))
    torch.testing.assert_close(elbo_terms(rec, kl)["objective"], terms["elbo"])


# --- image likelihoods -------------------------------------------------------------------------------


def test_gaussian_image_likelihood_equals_torch_and_broadcasts_over_k() -> None:
    g = _gen(9)
    logits = 3 * torch.randn(5, 2, 3, 4, 4, generator=g, dtype=DTYPE)  # K x B x C x H x W
    x = torch.rand(2, 3, 4, 4, generator=g, dtype=DTYPE)
    got = image_log_likelihood(logits, x, "gaussian", sigma=0.2)
    assert got.shape == (5, 2)
    expected = Normal(torch.sigmoid(logits), 0.2).log_prob(x).flatten(-3).sum(-1)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(image_mean(logits, "gaussian"), torch.sigmoid(logits))


def test_bernoulli_image_likelihood_equals_torch_on_binary_pixels() -> None:
    g = _gen(10)
    logits = 3 * torch.randn(2, 3, 4, 4, generator=g, dtype=DTYPE)
    x = (torch.rand(2, 3, 4, 4, generator=g, dtype=DTYPE) > 0.5).to(DTYPE)
    expected = Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(image_log_likelihood(logits, x, "bernoulli"), expected)
    torch.testing.assert_close(image_mean(logits, "bernoulli"), torch.sigmoid(logits))


def test_continuous_bernoulli_equals_torch_including_near_half() -> None:
    g = _gen(11)
    near_half = torch.tensor([0.0, 1e-4, -3e-3, 9e-3, -1.1e-2, 0.3])  # logits near 0: lambda near 1/2
    logits = torch.cat([5 * torch.randn(40, generator=g), near_half])
    logits = logits.to(DTYPE).view(2, 1, 1, 23)
    x = torch.rand(2, 1, 1, 23, generator=g, dtype=DTYPE)
    cb = ContinuousBernoulli(logits=logits)
    got = image_log_likelihood(logits, x, "continuous_bernoulli")
    torch.testing.assert_close(got, cb.log_prob(x).flatten(1).sum(1))
    torch.testing.assert_close(image_mean(logits, "continuous_bernoulli"), cb.mean)


def test_continuous_bernoulli_density_integrates_to_one_with_its_mean() -> None:
    logits = torch.tensor([-40.0, -7.0, -0.3, -1e-3, 0.0, 5e-3, 0.2, 1.0, 12.0], dtype=DTYPE)
    x = torch.linspace(0, 1, 200_001, dtype=DTYPE)  # the grid
    log_p = image_log_likelihood(logits.view(-1, 1, 1, 1), x.view(-1, 1, 1, 1, 1), "continuous_bernoulli")
    density = log_p.exp()  # N x L: p(x_n) for each logit
    total = torch.trapezoid(density, x, dim=0)
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-6, rtol=0)
    mean = torch.trapezoid(density * x[:, None], x, dim=0)
    torch.testing.assert_close(image_mean(logits, "continuous_bernoulli"), mean, atol=1e-6, rtol=0)


def test_continuous_bernoulli_is_accurate_and_finite_in_float32() -> None:
    # either side of the switches to Taylor series, and saturated logits where sigmoid is 0 or 1
    logits = torch.tensor([-1e-2 - 1e-6, -1e-2 + 1e-6, 0.0, 0.25 - 1e-6, 0.25 + 1e-6, -60.0, 60.0])
    logits = logits.view(-1, 1, 1, 1).requires_grad_()  # one 1 x 1 x 1 image per logit
    x = torch.full_like(logits, 0.3)
    log_p = image_log_likelihood(logits, x, "continuous_bernoulli")
    log_p.sum().backward()
    assert torch.isfinite(log_p).all() and torch.isfinite(logits.grad).all()
    exact = image_log_likelihood(logits.detach().double(), x.double(), "continuous_bernoulli")
    torch.testing.assert_close(log_p.detach().double(), exact, atol=1e-5, rtol=1e-6)
    mean = image_mean(logits.detach(), "continuous_bernoulli").double()
    exact_mean = image_mean(logits.detach().double(), "continuous_bernoulli")
    torch.testing.assert_close(mean, exact_mean, atol=1e-6, rtol=0)


def test_unknown_image_likelihood_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown image likelihood"):
        image_log_likelihood(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), "laplace")
    with pytest.raises(ValueError, match="unknown image likelihood"):
        image_mean(torch.zeros(1, 1, 2, 2), "laplace")


# --- text likelihood ---------------------------------------------------------------------------------


def test_text_log_likelihood_equals_padded_cross_entropy_and_ignores_padding() -> None:
    g = _gen(12)
    B, T, V = 4, 6, 11
    lengths = torch.tensor([6, 1, 3, 4])
    targets = torch.randint(4, V, (B, T), generator=g)
    pad = torch.arange(T)[None, :] >= lengths[:, None]  # B x T
    targets[pad] = PAD
    logits = torch.randn(B, T, V, generator=g)
    # the naive reference: every position computed, padding ignored by the loss
    reference = -F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=PAD, reduction="none").sum(1)

    real = ~pad
    row = torch.arange(B)[:, None].expand(B, T)[real]  # N
    got = text_log_likelihood(logits[real], targets[real], row, B)
    assert got.shape == (B,)
    torch.testing.assert_close(got, reference)
    assert (got < 0).all()

    # garbage in the padded positions changes nothing
    logits[pad] = 1e4
    torch.testing.assert_close(text_log_likelihood(logits[real], targets[real], row, B), reference)
