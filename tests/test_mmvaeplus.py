"""MMVAE+ (fusion="mmvaeplus"): private latents, the auxiliary prior, the looser IWAE objective, DReG.

The objective is checked against the reference code's formula (epalu/mmvaeplus, src/objectives.py
`_m_iwae` and `m_elbo`), written out again here step by step with torch.distributions, on random inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_mvae import VOCAB, synthetic_batch, tiny_model
from torch.distributions import Bernoulli, Categorical, Normal

from mvae_course.checkpoint import load_checkpoint, save_checkpoint
from mvae_course.cli import main
from mvae_course.config import preset
from mvae_course.data.text import EOS, PAD, UNK
from mvae_course.evaluate import evaluate_run
from mvae_course.models import MultimodalVAE
from mvae_course.objectives import (
    dreg_surrogate,
    gaussian_log_prob,
    iwae_bound,
    iwae_looser,
    linear_gaussian_log_evidence,
    log_standard_normal,
)
from mvae_course.train import train

B = 6
DTYPE = torch.float64


def plus(seed: int = 0, **changes) -> MultimodalVAE:
    return tiny_model("mmvaeplus", seed, **changes)


def random_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random pixels and random captions (content ids, one EOS, then PAD), in float64."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 2, 4, 3, 5, 1])
    text = torch.randint(UNK + 1, VOCAB, (B, 5), generator=g)
    for i, n in enumerate(lengths.tolist()):
        text[i, n - 1] = EOS
        text[i, n:] = PAD
    image = torch.rand(B, 3, 32, 32, generator=g, dtype=DTYPE)
    return {"image": image, "text": text, "lengths": lengths, "image_id": torch.arange(B)}


# --- latents and shapes -----------------------------------------------------------------------------


def test_the_encoders_give_a_shared_and_a_private_posterior_per_modality():
    model = plus(private_dim=5)
    batch = synthetic_batch()
    experts, private = model.posteriors(batch["image"], batch["text"], batch["lengths"])
    for m in ("image", "text"):
        assert experts[m][0].shape == experts[m][1].shape == (B, model.config.z_dim)
        assert private[m][0].shape == private[m][1].shape == (B, 5)
    posterior = model.encode(batch["image"], batch["text"], batch["lengths"])  # the mixture over z only
    assert posterior.mu.shape == (2, B, model.config.z_dim)
    torch.testing.assert_close(model.embed(image=batch["image"]), experts["image"][0])
    assert model.private_experts(image=batch["image"]).keys() == {"image"}
    assert tiny_model("moe").private_experts(image=batch["image"]) == {}
    z = torch.zeros(4, B, model.config.z_dim)
    assert model.decoder_input(z).shape == (4, B, model.config.z_dim + 5)
    with pytest.raises(ValueError, match=r"model\.private_dim = 0: must be a positive integer"):
        plus(private_dim=0)


def test_every_parameter_gets_a_finite_gradient_and_a_fixed_aux_prior_none():
    model = plus(k_samples=3)
    model(synthetic_batch())["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.aux_logits.grad.abs().sum() > 0  # r's spread is learnt through the cross-modal terms
    fixed = plus(learn_aux_prior=False, aux_prior_scale=2.0)
    fixed(synthetic_batch())["loss"].backward()
    assert fixed.aux_logits.grad is None
    torch.testing.assert_close(fixed.aux_std(), torch.full((2, fixed.config.private_dim), 2.0))
    with torch.no_grad():
        model.aux_logits.normal_()
    torch.testing.assert_close(model.aux_std().mean(-1), torch.ones(2))  # learnt: the spread, not the size


# --- the objective ------------------------------------------------------------------------------------


def reference_m_elbo(model: MultimodalVAE, batch: dict[str, torch.Tensor], beta: float) -> torch.Tensor:
    """epalu/mmvaeplus `m_elbo` (looser IWAE with K samples per modality), per sample, step by step.

    The reference's Laplace posteriors and priors are Gaussians here, and its latent (w, z) is (z, w);
    the random draws are made in the package's order: K x M x B x (z + w) posterior noise, then for each
    target modality one M x K x B x w block of auxiliary-prior noise (the reference draws the same kind
    of numbers, one block per cross-modal pair).
    """
    config, K, M = model.config, model.config.k_samples, 2
    d = config.z_dim
    names = ("image", "text")
    params = {"image": model.image_encoder(batch["image"]),
              "text": model.text_encoder(batch["text"], batch["lengths"])}
    qu_x = {m: Normal(mu, torch.exp(0.5 * logvar)) for m, (mu, logvar) in params.items()}
    eps = torch.randn(K, M, B, params["image"][0].shape[-1], dtype=DTYPE)
    uss = {m: qu_x[m].loc + qu_x[m].scale * eps[:, i] for i, m in enumerate(names)}  # K x B x (z + w)
    sigma_r = config.aux_prior_scale * torch.softmax(model.aux_logits, -1) * config.private_dim  # pw_params
    aux = {n: torch.randn(M, K, B, config.private_dim, dtype=DTYPE) * sigma_r[j] for j, n in enumerate(names)}

    def log_px(target: str, u: torch.Tensor) -> torch.Tensor:  # log p(x_target | u), K x B
        if target == "image":
            logits = model.image_decoder(u)
            return Bernoulli(logits=logits, validate_args=False).log_prob(batch["image"]).flatten(2).sum(-1)
        flat = u.reshape(K * B, -1)
        h, targets, row = model.text_decoder.hidden_states(flat, batch["text"].repeat(K, 1),
                                                           batch["lengths"].repeat(K))
        per_token = Categorical(logits=model.text_decoder.out(h)).log_prob(targets)
        return torch.zeros(K * B, dtype=DTYPE).index_add(0, row, per_token).view(K, B)

    scaling = {"image": config.image_weight, "text": config.text_weight}
    lws = []
    for r, m in enumerate(names):
        zs, ws = uss[m][..., :d], uss[m][..., d:]
        lpu = Normal(0.0, 1.0).log_prob(uss[m]).sum(-1)
        lqz_x = torch.logsumexp(torch.stack([
            Normal(qu_x[e].loc[..., :d], qu_x[e].scale[..., :d]).log_prob(zs).sum(-1) for e in names
        ]), 0) - math.log(M)
        lqw_x = Normal(qu_x[m].loc[..., d:], qu_x[m].scale[..., d:]).log_prob(ws).sum(-1)
        lpx_u = sum(
            scaling[n] * log_px(n, torch.cat([zs, ws if n == m else aux[n][r]], -1)) for n in names
        )
        lws.append(lpx_u + beta * (lpu - lqz_x - lqw_x))
    lw = torch.stack(lws)  # M x K x B
    return (torch.logsumexp(lw, 1) - math.log(K)).mean(0)  # log_mean_exp over K, mean over modalities


@pytest.mark.parametrize("dreg", [True, False])
def test_the_loss_matches_the_reference_formula_on_random_inputs(dreg):
    model = plus(seed=3, k_samples=3, dreg=dreg, text_weight=2.5, image_weight=0.7, aux_prior_scale=1.5)
    model = model.double()
    with torch.no_grad():
        model.aux_logits.uniform_(-0.5, 0.8)  # a learnt, uneven r
    batch = random_batch(seed=4)
    torch.manual_seed(11)
    terms = model(batch, beta=0.3)
    torch.manual_seed(11)
    expected = reference_m_elbo(model, batch, beta=0.3)
    torch.testing.assert_close(terms["loss"], -expected.mean(), rtol=1e-5, atol=0)
    model.config.image_weight = model.config.text_weight = 1.0
    torch.manual_seed(11)
    elbo = reference_m_elbo(model, batch, beta=1.0).mean()
    torch.testing.assert_close(terms["elbo"], elbo, rtol=1e-5, atol=0)  # reported: unweighted, beta = 1


def test_with_r_equal_to_the_prior_the_objective_is_below_the_iwae_estimate():
    model = plus(k_samples=4, learn_aux_prior=False, aux_prior_scale=1.0)
    batch = synthetic_batch()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):  # a little training, so that the posteriors mean something
        optimiser.zero_grad()
        model(batch)["loss"].backward()
        optimiser.step()
    model.eval()  # no word dropout, as in iwae
    torch.manual_seed(0)
    with torch.no_grad():
        bound = torch.stack([model(batch)["elbo"] for _ in range(20)]).mean()
        log_p = model.iwae(batch, k=512, chunk_size=128)["joint"].mean()
        k1 = torch.stack([model.iwae(batch, k=1)["joint"].mean() for _ in range(20)]).mean()
    assert bound < log_p, (bound, log_p)
    assert k1 < log_p  # and the estimate itself rises with k


def test_the_auxiliary_prior_feeds_the_cross_modal_terms_only():
    model = plus()
    batch = synthetic_batch()
    torch.manual_seed(2)
    base = model(batch)
    with torch.no_grad():
        model.aux_logits[1, 0] += 3.0  # r(w_text) spread unevenly
    torch.manual_seed(2)
    wide = model(batch)
    torch.testing.assert_close(wide["rec_image_from_text"], base["rec_image_from_text"])  # reads r(w_image)
    assert not torch.isclose(wide["rec_text_from_image"], base["rec_text_from_image"])
    # the image's own strata terms: the text decoder's own-w term is unchanged, so rec_text moves by
    # exactly half the change of its cross-modal part (the mean over two strata)
    torch.testing.assert_close(wide["rec_text"] - base["rec_text"],
                               (wide["rec_text_from_image"] - base["rec_text_from_image"]) / 2)


def test_k1_objective_is_the_stratified_elbo_and_k_raises_it():
    model = plus(k_samples=1)
    batch = synthetic_batch()
    terms = model(batch)
    torch.testing.assert_close(terms["elbo"], terms["rec_image"] + terms["rec_text"] - terms["kl"])
    many = plus(k_samples=16)
    torch.manual_seed(0)
    with torch.no_grad():
        k1 = torch.stack([model(batch)["elbo"] for _ in range(16)]).mean()
        k16 = many(batch)["elbo"]
    assert k16 > k1


# --- the looser bound and DReG, as pure functions -----------------------------------------------------


def test_iwae_looser_is_below_log_p_and_below_iwae_with_all_samples_in_one_log():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 2, generator=g, dtype=DTYPE)
    b, s = torch.zeros(3, dtype=DTYPE), 0.5
    x = torch.randn(1, 3, generator=g, dtype=DTYPE)
    log_px = linear_gaussian_log_evidence(x, W, b, s)  # 1
    n = 4000  # replicates of x, to average the estimators
    mu = torch.tensor([[0.8, -0.3], [-0.6, 0.9]], dtype=DTYPE).view(2, 1, 2).expand(2, n, 2)  # 2 experts
    logvar = torch.full_like(mu, -1.0)

    def log_w(k: int) -> torch.Tensor:  # M x K x n: z_mk ~ q_m, weighted by the whole mixture
        z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * torch.randn(2, k, n, 2, generator=g,
                                                                                  dtype=DTYPE)
        log_q = torch.logsumexp(gaussian_log_prob(z.unsqueeze(-3), mu, logvar), dim=-2) - math.log(2)
        log_joint = gaussian_log_prob(x, z @ W.T + b, torch.full((3,), 2 * math.log(s), dtype=DTYPE))
        return log_joint + log_standard_normal(z) - log_q

    lw1, lw8 = log_w(1), log_w(8)
    looser1, looser8 = iwae_looser(lw1).mean(), iwae_looser(lw8).mean()
    standard_error = iwae_looser(lw8).std() / math.sqrt(n)
    assert looser1 < looser8 < log_px - 3 * standard_error
    torch.testing.assert_close(iwae_looser(lw1), lw1.mean((0, 1)))  # K = 1: the stratified ELBO
    all_in_one_log = iwae_bound(lw8.reshape(16, n))
    assert (iwae_looser(lw8) <= all_in_one_log + 1e-12).all()  # log of a mean >= mean of logs, per sample


def test_dreg_surrogate_gradient_is_the_dreg_formula():
    """p(z) = N(0, I), p(x | z) = N(theta * z, I), q = N(mu, sigma^2): DReG's gradients by hand."""
    g = torch.Generator().manual_seed(1)
    K, n, D = 5, 3, 2
    x = torch.randn(n, D, generator=g, dtype=DTYPE)
    theta = torch.randn(D, generator=g, dtype=DTYPE).requires_grad_()
    mu = torch.randn(n, D, generator=g, dtype=DTYPE).requires_grad_()
    log_sigma = (0.3 * torch.randn(n, D, generator=g, dtype=DTYPE)).requires_grad_()
    eps = torch.randn(K, n, D, generator=g, dtype=DTYPE)

    z = mu + log_sigma.exp() * eps  # K x n x D
    log_w = (gaussian_log_prob(x, theta * z, torch.zeros(D, dtype=DTYPE)) + log_standard_normal(z)
             - gaussian_log_prob(z, mu.detach(), 2 * log_sigma.detach()))
    dreg_surrogate(log_w, z).sum().backward()

    with torch.no_grad():
        zk, sigma = mu + log_sigma.exp() * eps, log_sigma.exp()
        w = torch.softmax(log_w, dim=0).unsqueeze(-1)  # K x n x 1, normalised weights
        dlogw_dz = theta * (x - theta * zk) - zk + (zk - mu) / sigma**2  # d log w / d z, q's parameters fixed
        dlogw_dtheta = (x - theta * zk) * zk
        expected_theta = (w * dlogw_dtheta).sum((0, 1))  # sum_k w_k d log w_k / d theta
        expected_mu = (w**2 * dlogw_dz).sum(0)  # sum_k w_k^2 d log w_k / d z_k * d z_k / d mu (= 1)
        expected_log_sigma = (w**2 * dlogw_dz * sigma * eps).sum(0)  # d z_k / d log sigma = sigma eps_k
        # IWAE's own gradient for mu: the path term plus the score term d(-log q) / d mu at fixed z
        iwae_mu = (w * (dlogw_dz - (zk - mu) / sigma**2)).sum(0)
    torch.testing.assert_close(theta.grad, expected_theta, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mu.grad, expected_mu, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(log_sigma.grad, expected_log_sigma, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(mu.grad, iwae_mu)


def test_dreg_keeps_the_value_and_the_decoder_gradients_and_changes_the_encoders():
    batch = random_batch()
    grads, losses = {}, {}
    for dreg in (True, False):
        model = plus(seed=1, k_samples=4, dreg=dreg).double()
        torch.manual_seed(7)
        loss = model(batch)["loss"]
        loss.backward()
        losses[dreg] = loss.detach()
        grads[dreg] = {name: p.grad.clone() for name, p in model.named_parameters()}
    torch.testing.assert_close(losses[True], losses[False])
    for name in grads[True]:
        same = torch.allclose(grads[True][name], grads[False][name], rtol=1e-9, atol=1e-12)
        if "decoder" in name or name == "aux_logits":  # generative side: sum_k w_k grad log w_k in both
            assert same, name
        elif name.endswith("to_params.weight"):  # the encoders' heads: DReG's own gradient
            assert not same, name


# --- generation uses the private latents ---------------------------------------------------------------


def test_cross_modal_generation_draws_the_missing_private_latent_from_the_prior():
    model = plus().eval()
    batch = synthetic_batch()
    z = model.embed(text=batch["text"], lengths=batch["lengths"])
    torch.manual_seed(5)
    w = torch.randn(B, model.config.private_dim)
    expected = model._image_from(torch.cat([z, w], dim=-1))
    torch.manual_seed(5)
    torch.testing.assert_close(model.generate_image(batch["text"], batch["lengths"]), expected)
    torch.manual_seed(6)
    assert not torch.allclose(model.generate_image(batch["text"], batch["lengths"]), expected)


def test_reconstruction_reads_each_given_modality_s_private_posterior_mean():
    model = plus().eval()
    batch = synthetic_batch()
    experts, private = model.posteriors(batch["image"], batch["text"], batch["lengths"])
    z = model.fuse(experts).mean
    recon = model.reconstruct(batch["image"], batch["text"], batch["lengths"], max_len=5)
    torch.testing.assert_close(recon["image"], model._image_from(torch.cat([z, private["image"][0]], -1)))
    text_input = torch.cat([z, private["text"][0]], -1)
    assert recon["text"] == model.text_decoder.generate(text_input, max_len=5)


# --- training, resuming, evaluating, the command line -----------------------------------------------


def small_config(**model):
    return preset("tiny").replace(
        data={"n_train": 64, "n_val": 32},
        model={"fusion": "mmvaeplus", "k_samples": 2, **model},
        train={"batch_size": 16, "max_steps": 8, "warmup_steps": 2, "kl_warmup_steps": 4, "eval_every": 4,
               "ckpt_every": 4, "log_every": 2, "device": "cpu"},
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data_dir):
    return train(small_config(), tmp_path_factory.mktemp("run") / "full", progress=False, data_dir=data_dir)


def test_training_resumes_exactly(full_run, tmp_path, data_dir, monkeypatch):
    real_forward, calls = MultimodalVAE.forward, {"n": 0}

    def ctrl_c_at_step_6(self, batch, beta=1.0):
        calls["n"] += self.training
        if calls["n"] == 6:
            raise KeyboardInterrupt  # mid-epoch (4 batches an epoch): last.pt is saved at step 5
        return real_forward(self, batch, beta)

    with monkeypatch.context() as patch:
        patch.setattr(MultimodalVAE, "forward", ctrl_c_at_step_6)
        with pytest.raises(KeyboardInterrupt):
            train(small_config(), tmp_path / "cut", progress=False, data_dir=data_dir)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 5
    resumed = train(small_config(), tmp_path / "cut", resume=True, progress=False, data_dir=data_dir)
    assert resumed.step == 8
    weights = full_run.model.state_dict()
    assert "aux_logits" in weights
    assert all(torch.equal(value, resumed.model.state_dict()[key]) for key, value in weights.items())


def test_a_checkpoint_from_before_the_mmvaeplus_fields_still_resumes(tmp_path, data_dir):
    poe = small_config().replace(model={"fusion": "poe"}, train={"max_steps": 4})
    train(poe, tmp_path / "old", progress=False, data_dir=data_dir)
    ckpt = load_checkpoint(tmp_path / "old" / "last.pt")
    for key in ("private_dim", "aux_prior_scale", "learn_aux_prior", "k_samples", "dreg"):
        del ckpt["config"]["model"][key]
    save_checkpoint(ckpt, tmp_path / "old" / "last.pt")
    resumed = train(poe.replace(train={"max_steps": 6}), tmp_path / "old", resume=True, progress=False,
                    data_dir=data_dir)
    assert resumed.step == 6


def test_evaluate_measures_mmvaeplus_and_its_random_private_latents_come_from_a_seed(full_run, data_dir):
    run = full_run.out_dir
    first = evaluate_run(run, device="cpu", n=16, k=2, data_dir=data_dir, classifier_steps=20, verbose=False)
    again = evaluate_run(run, device="cpu", n=16, k=2, data_dir=data_dir, classifier_steps=20, figures=False,
                         verbose=False)
    assert first["fusion"] == "mmvaeplus"
    for key in ("coherence", "caption_metrics", "log_likelihood", "retrieval"):
        assert first[key] == again[key], key
    assert all(math.isfinite(v) for v in first["log_likelihood"].values())
    assert all((run / "figures" / name).is_file() for name in ("prior_samples.png", "cross_modal_val.png"))


def test_the_train_command_trains_mmvaeplus(tmp_path, data_dir, capsys):
    status = main(["train", "--preset", "tiny", "--fusion", "mmvaeplus", "--max-steps", "3",
                   "--out", str(tmp_path / "run"), "--data-dir", str(data_dir), "--no-progress",
                   "--device", "cpu"])
    assert status == 0
    out = capsys.readouterr().out
    assert "trained 3 steps" in out and "rec_image_from_text" in out
