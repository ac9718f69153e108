"""The multimodal VAE: fused posteriors, the five objectives, generation and the IWAE estimates."""

from __future__ import annotations

import pytest
import torch

from mvae_course.config import FUSIONS, ModelConfig, preset
from mvae_course.data.text import BOS, EOS, PAD, UNK
from mvae_course.models import MultimodalVAE
from mvae_course.objectives import kl_standard_normal

VOCAB = 24
B = 6


def tiny_model(fusion: str, seed: int = 0, **changes) -> MultimodalVAE:
    config: ModelConfig = preset("tiny").model
    config.vocab_size = VOCAB
    config.fusion = fusion
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return MultimodalVAE(config)


def synthetic_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """B paired examples: a coloured square whose colour is also the caption's first word."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 3, 4, 2, 5, 3])
    colour = torch.arange(B) % 3
    image = torch.zeros(B, 3, 32, 32)
    text = torch.full((B, int(lengths.max())), PAD)
    for i in range(B):
        image[i, colour[i], 8:24, 8:24] = 1.0
        n = int(lengths[i])
        text[i, : n - 1] = torch.randint(UNK + 4, VOCAB, (n - 1,), generator=g)
        text[i, 0] = UNK + 1 + colour[i]
        text[i, n - 1] = EOS
    return {"image": image, "text": text, "lengths": lengths, "image_id": torch.arange(B)}


# --- posteriors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", FUSIONS)
def test_encode_with_either_modality_missing(fusion):
    model = tiny_model(fusion)
    batch = synthetic_batch()
    z_dim = model.config.z_dim
    for inputs in ({"image": batch["image"]}, {"text": batch["text"], "lengths": batch["lengths"]}):
        mu, logvar = model.encode(**inputs)  # one Gaussian: a mixture of C = 1
        assert mu.shape == logvar.shape == (1, B, z_dim)
        assert model.embed(**inputs).shape == (B, z_dim)
    both = {"image": batch["image"], "text": batch["text"], "lengths": batch["lengths"]}
    if fusion == "independent":
        with pytest.raises(ValueError, match="independent"):
            model.encode(**both)
        return
    components = {"poe": 1, "moe": 2, "mopoe": 3, "mmvaeplus": 2}[fusion]
    posterior = model.encode(**both)
    assert posterior.components == components and posterior.mu.shape == (components, B, z_dim)
    assert model.embed(**both).shape == (B, z_dim)


def test_encode_needs_a_modality_and_text_needs_lengths():
    model = tiny_model("poe")
    batch = synthetic_batch()
    with pytest.raises(ValueError, match="at least one modality"):
        model.encode()
    with pytest.raises(ValueError, match="lengths"):
        model.encode(text=batch["text"])


def test_poe_masking_a_modality_equals_leaving_it_out():
    model = tiny_model("poe")
    batch = synthetic_batch()
    image, text, lengths = batch["image"], batch["text"], batch["lengths"]
    missing = torch.zeros(B, dtype=torch.bool)
    cases = (({"text": missing}, {"image": image}), ({"image": missing}, {"text": text, "lengths": lengths}))
    for mask, alone in cases:
        masked = model.encode(image, text, lengths, mask=mask)
        left_out = model.encode(**alone)
        torch.testing.assert_close(masked, left_out)
    # Per sample: the first half has no caption.
    has_text = torch.arange(B) >= B // 2
    mu, logvar = model.encode(image, text, lengths, mask={"text": has_text})
    mu_image, _ = model.encode(image=image)
    mu_joint, _ = model.encode(image, text, lengths)
    torch.testing.assert_close(mu[:, ~has_text], mu_image[:, ~has_text])
    torch.testing.assert_close(mu[:, has_text], mu_joint[:, has_text])


def test_poe_includes_the_prior_expert_and_mopoe_does_not():
    batch = synthetic_batch()
    poe, mopoe = tiny_model("poe"), tiny_model("mopoe")
    mu_e, logvar_e = poe.experts(image=batch["image"])["image"]
    mu, logvar = poe.encode(image=batch["image"])
    torch.testing.assert_close(torch.exp(-logvar[0]), torch.exp(-logvar_e) + 1)  # precisions add, prior's is 1
    mu_e, logvar_e = mopoe.experts(image=batch["image"])["image"]
    torch.testing.assert_close(tuple(mopoe.encode(image=batch["image"])), (mu_e[None], logvar_e[None]))


def test_moe_embedding_is_the_mixture_mean():
    model = tiny_model("moe")
    batch = synthetic_batch()
    experts = model.experts(batch["image"], batch["text"], batch["lengths"])
    expected = (experts["image"][0] + experts["text"][0]) / 2
    torch.testing.assert_close(model.embed(batch["image"], batch["text"], batch["lengths"]), expected)


# --- objectives -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", FUSIONS)
def test_loss_terms_are_consistent(fusion):
    model = tiny_model(fusion)
    terms = model(synthetic_batch())
    expected = {"loss", "elbo", "rec_image", "rec_text", "kl", "elbo_image", "elbo_text"}
    assert expected <= set(terms)
    assert all(value.dim() == 0 and torch.isfinite(value) for value in terms.values())
    assert terms["rec_text"] < 0
    if fusion not in ("moe", "mmvaeplus"):  # a mixture's KL is a one-sample estimate log q - log p: it can be < 0
        assert terms["kl"] >= 0
    if fusion == "poe":  # the sub-sampled objective sums three ELBOs (beta = 1, unit weights)
        total = terms["elbo_joint"] + terms["elbo_image"] + terms["elbo_text"]
        torch.testing.assert_close(terms["loss"], -total)
    else:
        torch.testing.assert_close(terms["loss"], -terms["elbo"])


@pytest.mark.parametrize("fusion", FUSIONS)
def test_beta_and_weights_change_the_loss_but_not_the_elbo(fusion):
    model = tiny_model(fusion)
    batch = synthetic_batch()
    torch.manual_seed(5)
    base = model(batch)
    model.config.image_weight, model.config.text_weight = 0.5, 2.0
    torch.manual_seed(5)
    weighted = model(batch, beta=0.1)
    torch.testing.assert_close(weighted["elbo"], base["elbo"])
    assert not torch.isclose(weighted["loss"], base["loss"])


def test_independent_kl_is_the_sum_of_two_unimodal_kls():
    model = tiny_model("independent")
    batch = synthetic_batch()
    experts = model.experts(batch["image"], batch["text"], batch["lengths"])
    expected = sum(kl_standard_normal(*experts[m]) for m in ("image", "text")).mean()
    torch.testing.assert_close(model(batch)["kl"], expected)


SEVERAL_SAMPLES = [("mmvaeplus", {"k_samples": 3, "dreg": dreg}) for dreg in (True, False)]


@pytest.mark.parametrize(
    "fusion, changes", [(f, {}) for f in FUSIONS] + SEVERAL_SAMPLES,
    ids=[*FUSIONS, "mmvaeplus-k3-dreg", "mmvaeplus-k3-iwae"],
)
def test_loss_decreases_on_a_fixed_batch(fusion, changes):
    model = tiny_model(fusion, **changes)
    batch = synthetic_batch()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses, rec_text = [], []
    for _ in range(20):
        terms = model(batch)
        optimiser.zero_grad()
        terms["loss"].backward()
        optimiser.step()
        losses.append(terms["loss"].item())
        rec_text.append(terms["rec_text"].item())
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    assert rec_text[-1] > rec_text[0] + 2.0, rec_text  # the captions are learnt too, not only the pixels


# --- generation -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", FUSIONS)
def test_generation_shapes(fusion):
    model = tiny_model(fusion).eval()
    batch = synthetic_batch()
    samples = model.sample(4, max_len=5)
    assert samples["image"].shape == (4, 3, 32, 32)
    assert 0 <= samples["image"].min() and samples["image"].max() <= 1
    assert len(samples["text"]) == 4 and all(len(c) <= 5 for c in samples["text"])
    captions = model.generate_text(batch["image"], method="beam", beam_size=2, max_len=5)
    assert len(captions) == B
    assert not {PAD, BOS, EOS} & {t for c in captions for t in c}
    image = model.generate_image(batch["text"], batch["lengths"])
    assert image.shape == (B, 3, 32, 32) and 0 <= image.min() and image.max() <= 1
    recon = model.reconstruct(batch["image"], batch["text"], batch["lengths"], max_len=5)
    assert recon["image"].shape == (B, 3, 32, 32) and len(recon["text"]) == B


def test_generate_text_decodes_the_posterior_mean():
    model = tiny_model("poe").eval()
    batch = synthetic_batch()
    z = model.embed(image=batch["image"])
    assert model.generate_text(batch["image"], max_len=6) == model.text_decoder.generate(z, max_len=6)


# --- importance-weighted estimates ------------------------------------------------------------------


@pytest.mark.parametrize("fusion", FUSIONS)
def test_iwae_rises_with_k_and_text_is_a_log_probability(fusion):
    model = tiny_model(fusion, word_dropout=0.5)
    batch = synthetic_batch()
    torch.manual_seed(0)
    k1 = [model.iwae(batch, k=1) for _ in range(16)]  # the bound rises in expectation: average k = 1's noise
    k32 = model.iwae(batch, k=32, chunk_size=8)
    assert model.training, "iwae restores the training mode"
    for name in ("image", "text", "joint"):
        assert k32[name].shape == (B,) and torch.isfinite(k32[name]).all()
        assert k32[name].mean() > torch.stack([e[name] for e in k1]).mean(), name
    assert (k32["text"] <= 0).all()  # a discrete probability
    if fusion == "independent":
        torch.testing.assert_close(k32["joint"], k32["image"] + k32["text"])
