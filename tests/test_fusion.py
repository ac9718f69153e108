"""Tests of mvae_course/models/fusion.py: products and mixtures of Gaussian experts."""

from __future__ import annotations


import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from mvae_course.models.fusion import (
    mixture_log_prob,
    mixture_of_experts_sample,
    mixture_of_products,
    product_of_experts,
    sample_mixture,
    subsets,
)
from mvae_course.objectives import gaussian_log_prob

DTYPE = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _experts(E: int = 3, B: int = 4, D: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    return torch.randn(E, B, D, generator=g, dtype=DTYPE), torch.randn(E, B, D, generator=g, dtype=DTYPE)


# --- product of experts ------------------------------------------------------------------------------


@pytest.mark.parametrize("prior_expert", [True, False])
def test_poe_is_the_normalised_product_of_densities_in_1d(prior_expert: bool) -> None:
    mu = torch.tensor([-1.0, 0.5, 2.0], dtype=DTYPE).view(3, 1, 1)
    logvar = torch.tensor([0.3, -0.5, 1.0], dtype=DTYPE).view(3, 1, 1)
    grid = torch.linspace(-10, 10, 20_001, dtype=DTYPE)
    log_product = Normal(mu.view(3, 1), (0.5 * logvar.view(3, 1)).exp()).log_prob(grid).sum(0)
    if prior_expert:
        log_product = log_product + Normal(0.0, 1.0).log_prob(grid)
    product = log_product.exp()
    product = product / torch.trapezoid(product, grid)  # normalised numerically
    mu_poe, logvar_poe = product_of_experts(mu, logvar, prior_expert=prior_expert)
    poe_pdf = Normal(mu_poe.view(()), (0.5 * logvar_poe.view(())).exp()).log_prob(grid).exp()
    torch.testing.assert_close(poe_pdf, product, atol=1e-8, rtol=0)


def test_poe_log_density_differs_from_the_product_by_a_constant_in_d_dims() -> None:
    mu, logvar = _experts()
    mu_poe, logvar_poe = product_of_experts(mu, logvar)
    z = torch.randn(100, 4, 5, generator=_gen(1), dtype=DTYPE)  # many z for each of the B rows
    log_product = gaussian_log_prob(z.unsqueeze(1), mu, logvar).sum(1)  # sum over the experts
    log_product = log_product + gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))
    difference = log_product - gaussian_log_prob(z, mu_poe, logvar_poe)  # 100 x B
    assert difference.std(0).max() < 1e-10  # the normalising constant only


def test_poe_precisions_add_up() -> None:
    mu, logvar = _experts()
    _, logvar_poe = product_of_experts(mu, logvar)
    torch.testing.assert_close(torch.exp(-logvar_poe), 1.0 + torch.exp(-logvar).sum(0))
    _, logvar_no_prior = product_of_experts(mu, logvar, prior_expert=False)
    torch.testing.assert_close(torch.exp(-logvar_no_prior), torch.exp(-logvar).sum(0))


def test_poe_with_every_expert_masked_is_the_prior() -> None:
    mu, logvar = _experts()
    mu[0, 0] = float("nan")  # what a missing modality's encoder returns does not matter
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mu_poe, logvar_poe = product_of_experts(mu, logvar, mask)
    torch.testing.assert_close(mu_poe, torch.zeros(4, 5, dtype=DTYPE))
    torch.testing.assert_close(logvar_poe, torch.zeros(4, 5, dtype=DTYPE))


def test_masking_an_expert_equals_leaving_it_out() -> None:
    mu, logvar = _experts()
    mask = torch.tensor([[True, False, True, True], [True, True, False, False], [False, True, True, False]])
    mu_poe, logvar_poe = product_of_experts(mu, logvar, mask)
    for b in range(4):
        kept = mask[:, b]
        mu_b, logvar_b = product_of_experts(mu[kept, b : b + 1], logvar[kept, b : b + 1])
        torch.testing.assert_close(mu_poe[b : b + 1], mu_b)
        torch.testing.assert_close(logvar_poe[b : b + 1], logvar_b)


def test_masked_experts_get_no_gradient_and_present_ones_do() -> None:
    mu, logvar = _experts()
    mu.requires_grad_()
    logvar.requires_grad_()
    mask = torch.tensor([[True] * 4, [False] * 4, [True, False, True, False]])
    mu_poe, logvar_poe = product_of_experts(mu, logvar, mask)
    (mu_poe.sum() + logvar_poe.sum()).backward()
    assert (mu.grad[1] == 0).all() and (logvar.grad[1] == 0).all()
    assert (mu.grad[2, 1] == 0).all()
    assert (mu.grad[0] != 0).all() and (logvar.grad[0] != 0).all()


def test_poe_is_stable_for_extreme_variances() -> None:
    mu = torch.tensor([[[1.0]], [[5.0]]])  # float32, E=2, B=1, D=1
    logvar = torch.tensor([[[-60.0]], [[60.0]]])  # precisions e^60 and e^-60 overflow float32 sums
    mu_poe, logvar_poe = product_of_experts(mu, logvar)
    assert torch.isfinite(mu_poe).all() and torch.isfinite(logvar_poe).all()
    torch.testing.assert_close(mu_poe, torch.tensor([[1.0]]))  # the confident expert wins
    torch.testing.assert_close(logvar_poe, torch.tensor([[-60.0]]))


def test_poe_rejects_bad_input() -> None:
    mu, logvar = _experts()
    with pytest.raises(ValueError, match="E x B x D"):
        product_of_experts(mu[0], logvar[0])
    with pytest.raises(ValueError, match="mask must be"):
        product_of_experts(mu, logvar, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="no prior expert"):
        product_of_experts(mu, logvar, torch.zeros(3, 4, dtype=torch.bool), prior_expert=False)


# --- subsets and mixture of products -----------------------------------------------------------------


def test_subsets_of_modalities() -> None:
    assert subsets(["image", "text"]) == [("image",), ("text",), ("image", "text")]
    three = subsets(["a", "b", "c"])
    assert len(three) == 7 == len(set(three))
    assert three[-1] == ("a", "b", "c")


def test_mixture_of_products_is_the_poe_of_each_subset() -> None:
    mu, logvar = _experts(E=2)
    subsets_idx = [(0,), (1,), (0, 1)]
    mu_s, logvar_s = mixture_of_products(mu, logvar, subsets_idx)
    assert mu_s.shape == logvar_s.shape == (3, 4, 5)
    for s, idx in enumerate(subsets_idx):
        expected = product_of_experts(mu[list(idx)], logvar[list(idx)])
        torch.testing.assert_close(mu_s[s], expected[0])
        torch.testing.assert_close(logvar_s[s], expected[1])
    # a missing modality drops out of every subset it is in: text missing for sample 0
    mask = torch.tensor([[True] * 4, [False, True, True, True]])
    mu_m, logvar_m = mixture_of_products(mu, logvar, subsets_idx, mask)
    torch.testing.assert_close(mu_m[1, 0], torch.zeros(5, dtype=DTYPE))  # {text} alone: the prior
    torch.testing.assert_close(mu_m[2, 0], mu_m[0, 0])  # {image, text} = {image}
    torch.testing.assert_close(logvar_m[2, 1:], logvar_s[2, 1:])


# --- mixtures ----------------------------------------------------------------------------------------


def test_mixture_log_prob_equals_torch_mixture() -> None:
    mu, logvar = _experts()
    z = torch.randn(7, 4, 5, generator=_gen(2), dtype=DTYPE)  # K x B x D
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=DTYPE)
    for w in (None, weights):
        probs = (torch.full((3,), 1 / 3, dtype=DTYPE) if w is None else w).expand(4, 3)
        components = Independent(Normal(mu.transpose(0, 1), (0.5 * logvar.transpose(0, 1)).exp()), 1)
        reference = MixtureSameFamily(Categorical(probs=probs), components)  # batch B, event D
        torch.testing.assert_close(mixture_log_prob(z, mu, logvar, w), reference.log_prob(z))
    # a zero weight leaves that component out
    one_hot = torch.tensor([0.0, 1.0, 0.0], dtype=DTYPE)
    only_second = mixture_log_prob(z, mu, logvar, one_hot)
    torch.testing.assert_close(only_second, gaussian_log_prob(z, mu[1], logvar[1]))


def test_sample_mixture_picks_components_in_proportion() -> None:
    E, B, D = 3, 2, 2
    mu = torch.tensor([-100.0, 0.0, 100.0], dtype=DTYPE).view(E, 1, 1).expand(E, B, D).clone()
    logvar = torch.full((E, B, D), -4.0, dtype=DTYPE)
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=DTYPE)
    n = 20_000
    z, component = sample_mixture(mu, logvar, weights, k=n, generator=_gen(3))
    assert z.shape == (n, B, D) and component.shape == (n, B)
    # each sample comes from the component it names
    assert ((z - mu[component, torch.arange(B)]).abs() < 1.0).all()
    for b in range(B):
        counts = torch.bincount(component[:, b], minlength=E).to(DTYPE)
        expected = n * weights
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < 13.8  # the 0.999 quantile of chi-square with E - 1 = 2 degrees of freedom
    z1, c1 = sample_mixture(mu, logvar, generator=_gen(4))  # one sample per row, uniform weights
    assert z1.shape == (B, D) and c1.shape == (B,)


def test_sample_mixture_with_per_sample_weights_never_picks_a_missing_expert() -> None:
    mu, logvar = _experts(E=2, B=3, D=2)
    weights = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]], dtype=DTYPE)  # E x B
    _, component = sample_mixture(mu, logvar, weights, k=2000, generator=_gen(5))
    assert (component[:, 0] == 0).all() and (component[:, 1] == 1).all()
    assert 800 < (component[:, 2] == 0).sum() < 1200


def test_stratified_sampling_covers_every_component_equally() -> None:
    mu, logvar = _experts(E=2, B=3, D=2)
    mu.requires_grad_()
    k = 50_000
    z, component = mixture_of_experts_sample(mu, logvar, k=k, generator=_gen(6))
    assert z.shape == (2, k, 3, 2) and component.shape == (2, k, 3)
    for e in range(2):
        assert (component[e] == e).all()
        # z[e] are draws from expert e
        var = logvar[e].exp()
        mean_se = (var.max() / k).sqrt().item()
        torch.testing.assert_close(z[e].mean(0), mu[e].detach(), atol=5 * mean_se, rtol=0)
        torch.testing.assert_close(z[e].var(0), var, atol=0.05 * var.max().item(), rtol=0)
    z.sum().backward()
    torch.testing.assert_close(mu.grad, torch.full_like(mu, float(k)))  # reparameterised
