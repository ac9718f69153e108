"""The multimodal VAE over images and captions: one latent z, two encoders, two decoders, five fusions.

Taught in notebooks/04_fusion.ipynb (and trained on COCO in 07_coco_training, evaluated in 08_evaluation).

The generative model is p(z) p(image | z) p(text | z) with p(z) = N(0, I). Each modality's encoder gives
an "expert" q(z | x_m); `config.fusion` says how the experts make the posterior and how it is trained:

- "independent": no shared latent. Each modality is its own VAE with its own z; the objective is the
  sum of two unimodal ELBOs. Feeding the image posterior's z to the text decoder then fails, because
  nothing ties the two latent spaces together: the baseline the other fusions beat.
- "poe" (MVAE, Wu and Goodman 2018): q(z | image, text) is proportional to p(z) q(z | image)
  q(z | text) (the prior is an expert too). Trained with the MVAE's sub-sampled objective: the joint
  ELBO plus the two unimodal ELBOs, ELBO(image, text) + ELBO(image) + ELBO(text). Each ELBO
  reconstructs exactly the modalities its posterior saw (the joint one both, a unimodal one its own),
  as in Wu and Goodman's paper; the unimodal terms train each expert to stand alone at test time.
- "moe" (MMVAE, Shi et al. 2019): q(z | image, text) = (q(z | image) + q(z | text)) / 2. Trained
  stratified: for each modality m, z ~ q(z | x_m) reconstructs BOTH modalities (cross-reconstruction),
  and the KL term is the one-sample estimate log q_mix(z) - log p(z); the objective averages over m.
  (The plain ELBO, not the DReG estimator of the paper.)
- "mopoe" (Sutter et al. 2021): a uniform mixture over every non-empty subset s of the modalities of
  q_s = PoE of the experts in s (no prior expert, as in the paper's equation: a one-modality subset is
  that modality's expert). Trained stratified: z ~ q_s for every s reconstructs all modalities, minus
  KL(q_s || p); the objective averages over subsets. Since KL of a mixture is at most the mean KL of its
  components, this is still a lower bound on log p(image, text).
- "mmvaeplus" (MMVAE+, Palumbo, Daunhawer and Vogt 2023): beside the shared z, each modality m has a
  private latent w_m with prior p(w_m) = N(0, I). Encoder m gives q(z | x_m) q(w_m | x_m), decoder m reads
  (z, w_m), and z is fused as in moe. Trained stratified with K samples (z, w_m) from each modality m:
      log w = log p(x_m | z, w_m) + log p(x_n | z, w~_n) + log p(z) p(w_m) / (q_mix(z) q(w_m | x_m)),
  where n is the other modality and w~_n is drawn from an auxiliary prior r(w_n) = N(0, diag(sigma_n^2)):
  the cross-modal term never sees x_n's own private code, so z must carry all that the modalities share,
  and w_n only what is x_n's alone. sigma_n keeps its mean over dimensions (config.aux_prior_scale) and
  learns how to spread it, as in the reference code (`aux_std`). The objective is `iwae_looser` of these
  weights (the average over m outside the log) with DReG gradients, as in the reference code
  (epalu/mmvaeplus `m_dreg`, MultiVae's `dreg_looser`). With r = p it is a lower bound on log p(image, text); with another r
  the cross-modal terms lack log p(w~_n) / r(w~_n) and it can exceed log p, so `iwae` reports proper bounds.
  A modality generated but not given gets its w from the prior p(w), as both reference codes do.

Every loss is normalised per sample (summed over pixels and tokens, averaged over the batch), so the
image and text log-likelihoods keep their natural scales in nats. A 64 x 64 image has 12288 numbers and
a caption about a dozen tokens, so the image term dominates a shared latent; `config.image_weight` and
`config.text_weight` rescale the log-likelihoods in the training objective only (the MMVAE paper does
the same), never in the reported `elbo` or in `iwae`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mvae_course.config import ModelConfig
from mvae_course.models.fusion import (
    Posterior,
    mixture_log_prob,
    mixture_of_experts_sample,
    mixture_of_products,
    product_of_experts,
    subsets,
)
from mvae_course.models.image import ImageDecoder, ImageEncoder
from mvae_course.models.text import TextDecoder, TextEncoder
from mvae_course.objectives import (
    dreg_surrogate,
    elbo_terms,
    gaussian_log_prob,
    image_log_likelihood,
    image_mean,
    iwae_bound,
    iwae_looser,
    kl_standard_normal,
    log_standard_normal,
    reparameterize,
)

MODALITIES = ("image", "text")
Experts = dict[str, tuple[Tensor, Tensor]]


def _subset_name(subset: tuple[str, ...]) -> str:
    """("image",) -> "image"; all modalities -> "joint"."""
    return "joint" if len(subset) == len(MODALITIES) else "_".join(subset)


class MultimodalVAE(nn.Module):
    """Image and caption encoders and decoders around one latent space, fused by `config.fusion`.

    Taught in notebooks/04_fusion.ipynb
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # The networks' latent: z, or for mmvaeplus (z, w_m), a modality's shared and private codes.
        networks = config
        if config.fusion == "mmvaeplus":
            networks = dataclasses.replace(config, z_dim=config.z_dim + config.private_dim)
            # How the auxiliary priors' std spreads over w_m's dimensions, one row per modality (`aux_std`)
            logits = torch.zeros(len(MODALITIES), config.private_dim)
            self.aux_logits = nn.Parameter(logits, requires_grad=config.learn_aux_prior)
        self.image_encoder = ImageEncoder(networks)
        self.image_decoder = ImageDecoder(networks)
        self.text_encoder = TextEncoder(networks)
        self.text_decoder = TextDecoder(networks)

    @property
    def fusion(self) -> str:
        """How the experts are fused: "independent", "poe", "moe", "mopoe" or "mmvaeplus" (the config's)."""
        return self.config.fusion

    # --- inference: experts and their fusion ---------------------------------------------------------

    def experts(
        self, image: Tensor | None = None, text: Tensor | None = None, lengths: Tensor | None = None
    ) -> Experts:
        """The unimodal posteriors q(z | x_m) of the modalities passed.

        Taught in notebooks/04_fusion.ipynb

        image: B x 3 x H x W; text: B x T with lengths: B. Returns {"image": (mu, logvar), "text": (mu,
        logvar)} (only the keys passed), each B x z_dim. For mmvaeplus these are the shared z's experts;
        `private_experts` gives the private latents' posteriors.
        """
        return self.posteriors(image, text, lengths)[0]

    def private_experts(
        self, image: Tensor | None = None, text: Tensor | None = None, lengths: Tensor | None = None
    ) -> Experts:
        """mmvaeplus: the posteriors q(w_m | x_m) of the private latents, {modality: (mu, logvar)}, B x
        private_dim each (only the modalities passed). Other fusions have no private latent: {}."""
        return self.posteriors(image, text, lengths)[1]

    def posteriors(
        self, image: Tensor | None = None, text: Tensor | None = None, lengths: Tensor | None = None
    ) -> tuple[Experts, Experts]:
        """(`experts`, `private_experts`) from one pass of the encoders."""
        encoded = self._encode(image, text, lengths)
        d = self.config.z_dim  # the networks' latent is (z, w): the first z_dim numbers are z
        shared = {m: (mu[..., :d], logvar[..., :d]) for m, (mu, logvar) in encoded.items()}
        private = {m: (mu[..., d:], logvar[..., d:]) for m, (mu, logvar) in encoded.items()}
        return shared, (private if self.fusion == "mmvaeplus" else {})

    def _encode(self, image: Tensor | None, text: Tensor | None, lengths: Tensor | None) -> Experts:
        """The encoders' outputs, {modality: (mu, logvar)}, each B x the networks' latent size."""
        encoded: Experts = {}
        if image is not None:
            encoded["image"] = self.image_encoder(image)
        if text is not None:
            if lengths is None:
                raise ValueError(
                    "text needs its lengths (content ids + EOS per caption): pass lengths=batch['lengths']"
                )
            encoded["text"] = self.text_encoder(text, lengths)
        if not encoded:
            raise ValueError("pass at least one modality: image=..., text=... (with lengths=...), or both")
        return encoded

    def fuse(self, experts: Experts, mask: dict[str, Tensor] | None = None) -> Posterior:
        """The posterior given the experts present, by `config.fusion`.

        Taught in notebooks/04_fusion.ipynb

        Returns a `Posterior` (mu, logvar: C x B x z_dim), a uniform mixture of C Gaussians:
        - one expert (any fusion): that modality's posterior, C = 1 (for poe, its product with the prior).
        - poe: the product of the experts and the prior, C = 1. `mask` ({modality: B bool}, False =
          missing for that sample) drops an expert per sample, exactly as if it were left out.
        - moe and mmvaeplus given both: the 2 experts, the components of the mixture (for mmvaeplus, of z).
        - mopoe given both: the PoE of every non-empty subset (image, text, joint): 3 components.
        - independent given both: an error: its two latents are different spaces, use `experts`.
        """
        names = list(experts)
        if mask is not None and self.fusion != "poe":
            raise ValueError(f"a per-sample mask is supported for fusion='poe' only, not {self.fusion!r}")
        mu = torch.stack([experts[m][0] for m in names])  # E x B x D
        logvar = torch.stack([experts[m][1] for m in names])
        if self.fusion == "poe":
            present = None
            if mask is not None:  # E x B, a modality absent from the mask is present everywhere
                everywhere = torch.ones(mu.shape[1], dtype=torch.bool, device=mu.device)
                present = torch.stack([mask.get(m, everywhere).to(mu.device) for m in names])
            mu, logvar = product_of_experts(mu, logvar, present, prior_expert=True)
            return Posterior(mu.unsqueeze(0), logvar.unsqueeze(0))
        if len(names) == 1 or self.fusion in ("moe", "mmvaeplus"):
            return Posterior(mu, logvar)
        if self.fusion == "mopoe":
            # subsets(range(E)) lists the same subsets, in the same order, as subsets(names), by index.
            return Posterior(*mixture_of_products(mu, logvar, subsets(range(len(names))), prior_expert=False))
        raise ValueError(
            "fusion='independent' has no joint posterior: each modality has its own latent space. "
            "Encode one modality at a time, or use model.experts(image, text, lengths)"
        )

    def encode(
        self,
        image: Tensor | None = None,
        text: Tensor | None = None,
        lengths: Tensor | None = None,
        mask: dict[str, Tensor] | None = None,
    ) -> Posterior:
        """The posterior q(z | modalities passed): `fuse(experts(image, text, lengths), mask)`.

        Taught in notebooks/04_fusion.ipynb

        Returns a `Posterior` (mu, logvar: C x B x z_dim; C = 1 unless moe/mopoe/mmvaeplus given both); see
        `fuse`. For mmvaeplus this is the shared z's posterior only.
        """
        return self.fuse(self.experts(image, text, lengths), mask)

    def embed(
        self, image: Tensor | None = None, text: Tensor | None = None, lengths: Tensor | None = None
    ) -> Tensor:
        """The posterior mean E[z | modalities passed], B x z_dim (for retrieval and latent plots).

        Taught in notebooks/08_evaluation.ipynb

        For a mixture posterior the mean is the average of its components' means. For mmvaeplus: the
        shared z only (the private latents say nothing the other modality shares).
        """
        return self.encode(image, text, lengths).mean

    # --- generation: decoders ------------------------------------------------------------------------

    def log_likelihood(self, z: Tensor, batch: dict[str, Tensor], modality: str) -> Tensor:
        """log p(x_m | z) per sample, for the batch's image or caption.

        z: ... x B x latent (e.g. B, or K x B with K samples per data point), what the decoders read: z,
        or for mmvaeplus (z, w_m) (`decoder_input`). Returns ... x B.
        """
        if modality == "image":
            logits = self.image_decoder(z)  # ... x B x 3 x H x W
            config = self.config
            return image_log_likelihood(logits, batch["image"], config.image_likelihood, config.image_sigma)
        if modality == "text":
            text, lengths = batch["text"], batch["lengths"]
            n = z[..., 0].numel() // text.shape[0]  # how many latents per caption
            z_flat = z.reshape(-1, z.shape[-1])  # (... B) x D: the batch index runs fastest
            log_p = self.text_decoder.log_likelihood(z_flat, text.repeat(n, 1), lengths.repeat(n))
            return log_p.view(z.shape[:-1])
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")

    @torch.no_grad()
    def generate_text(self, image: Tensor, **decode_kwargs) -> list[list[int]]:
        """Captions for images, decoded from the posterior mean z = E[z | image] (w ~ p(w) for mmvaeplus).

        Taught in notebooks/04_fusion.ipynb

        image: B x 3 x H x W. decode_kwargs go to `TextDecoder.generate` (method="greedy" | "sample" |
        "beam", max_len, temperature, top_k, top_p, beam_size). Returns B lists of content ids.
        """
        return self.text_decoder.generate(self.decoder_input(self.embed(image=image)), **decode_kwargs)

    @torch.no_grad()
    def generate_image(self, text: Tensor, lengths: Tensor) -> Tensor:
        """Images for captions: the decoder's mean at z = E[z | text] (with w ~ p(w) for mmvaeplus).
        text: B x T, lengths: B.

        Taught in notebooks/04_fusion.ipynb

        Returns B x 3 x H x W in [0, 1].
        """
        return self._image_from(self.decoder_input(self.embed(text=text, lengths=lengths)))

    @torch.no_grad()
    def reconstruct(
        self,
        image: Tensor | None = None,
        text: Tensor | None = None,
        lengths: Tensor | None = None,
        **decode_kwargs,
    ) -> dict[str, Tensor | list[list[int]]]:
        """Both modalities decoded from the posterior mean given the modalities passed.

        Taught in notebooks/04_fusion.ipynb

        Returns {"image": B x 3 x H x W in [0, 1], "text": B lists of content ids}. For "independent"
        given both, each modality is decoded from its own posterior. For mmvaeplus a modality passed is
        decoded with its private posterior mean E[w_m | x_m], one not passed with w ~ p(w).
        """
        if self.fusion == "independent" and image is not None and text is not None:
            return {
                "image": self._image_from(self.embed(image=image)),
                "text": self.text_decoder.generate(self.embed(text=text, lengths=lengths), **decode_kwargs),
            }
        experts, private = self.posteriors(image, text, lengths)
        z = self.fuse(experts).mean
        w = {m: mu for m, (mu, _) in private.items()}
        return {
            "image": self._image_from(self.decoder_input(z, w.get("image"))),
            "text": self.text_decoder.generate(self.decoder_input(z, w.get("text")), **decode_kwargs),
        }

    @torch.no_grad()
    def sample(self, n: int, **decode_kwargs) -> dict[str, Tensor | list[list[int]]]:
        """n image-caption pairs from the prior: z ~ N(0, I), then both decoders.

        Taught in notebooks/04_fusion.ipynb

        Returns {"image": n x 3 x H x W in [0, 1], "text": n lists of content ids}. For "independent"
        each modality gets its own z (its latents are separate spaces), so the pairs do not match. For
        mmvaeplus each modality also gets its own private w ~ p(w).
        """
        device = next(self.parameters()).device
        z = torch.randn(n, self.config.z_dim, device=device)
        z_text = torch.randn_like(z) if self.fusion == "independent" else z
        return {
            "image": self._image_from(self.decoder_input(z)),
            "text": self.text_decoder.generate(self.decoder_input(z_text), **decode_kwargs),
        }

    def decoder_input(self, z: Tensor, w: Tensor | None = None) -> Tensor:
        """What a decoder reads: z itself, or for mmvaeplus (z, w) side by side.

        z: ... x z_dim; w: ... x private_dim, the modality's private latent (None: a draw from its prior
        p(w) = N(0, I), as for a modality that was not given). Returns ... x (z_dim [+ private_dim]).
        """
        if self.fusion != "mmvaeplus":
            return z
        if w is None:
            w = torch.randn(*z.shape[:-1], self.config.private_dim, dtype=z.dtype, device=z.device)
        return torch.cat([z, w], dim=-1)

    def _image_from(self, z: Tensor) -> Tensor:
        return image_mean(self.image_decoder(z), self.config.image_likelihood)

    # --- training objectives -------------------------------------------------------------------------

    def forward(self, batch: dict[str, Tensor], beta: float = 1.0) -> dict[str, Tensor]:
        """The training loss of `config.fusion`, with its terms by name: `model(batch, beta)`.

        batch: {"image": B x 3 x H x W, "text": B x T, "lengths": B, ...}; beta weighs the KL terms.
        Returns scalars: "loss" (mean over the batch of -objective; minimise it), "elbo" (the bound on
        log p(image, text) it trains, with beta = 1 and no likelihood weights), "rec_image" and
        "rec_text" (log-likelihoods E_q[log p(x_m | z)] in nats, higher is better), "kl" and, per ELBO
        the objective sums or averages, "elbo_<subset>" (elbo_image, elbo_text, elbo_joint). For moe and
        mmvaeplus also the cross-modal terms "rec_text_from_image" and "rec_image_from_text".
        """
        encoded = self._encode(batch["image"], batch["text"], batch["lengths"])  # for mmvaeplus of (z, w)
        losses: dict[str, Callable[[Experts, dict[str, Tensor], float], dict[str, Tensor]]] = {
            "independent": self._loss_independent,
            "poe": self._loss_poe,
            "moe": self._loss_moe,
            "mopoe": self._loss_mopoe,
            "mmvaeplus": self._loss_mmvaeplus,
        }
        terms = losses[self.fusion](encoded, batch, beta)  # each B
        objective = terms.pop("objective")
        return {"loss": -objective.mean(), **{name: value.mean() for name, value in terms.items()}}

    def _elbo(
        self, mu: Tensor, logvar: Tensor, batch: dict[str, Tensor], modalities: tuple[str, ...], beta: float
    ) -> dict[str, Tensor]:
        """One-sample ELBO terms of a Gaussian posterior reconstructing `modalities`.

        mu, logvar: ... x B x D (e.g. S x B x D for S posteriors at once). Returns terms ... x B.
        """
        z = reparameterize(mu, logvar)
        log_likelihoods = {m: self.log_likelihood(z, batch, m) for m in modalities}
        return self._terms(log_likelihoods, kl_standard_normal(mu, logvar), beta)

    def _terms(self, log_likelihoods: dict[str, Tensor], kl: Tensor, beta: float) -> dict[str, Tensor]:
        """`elbo_terms`, with the objective's log-likelihoods scaled by config.image_weight / text_weight."""
        terms = elbo_terms(log_likelihoods, kl, beta)
        weights = {"image": self.config.image_weight, "text": self.config.text_weight}
        terms["objective"] = sum(weights[m] * ll for m, ll in log_likelihoods.items()) - beta * kl
        return terms

    def _loss_independent(self, experts: Experts, batch: dict[str, Tensor], beta: float) -> dict[str, Tensor]:
        image = self._elbo(*experts["image"], batch, ("image",), beta)
        text = self._elbo(*experts["text"], batch, ("text",), beta)
        return {
            "objective": image["objective"] + text["objective"],
            "elbo": image["elbo"] + text["elbo"],  # log p(image, text) = log p(image) + log p(text) here
            "rec_image": image["rec_image"],
            "rec_text": text["rec_text"],
            "kl": image["kl"] + text["kl"],  # two latents, two KL terms
            "elbo_image": image["elbo"],
            "elbo_text": text["elbo"],
        }

    def _loss_poe(self, experts: Experts, batch: dict[str, Tensor], beta: float) -> dict[str, Tensor]:
        elbos = {
            _subset_name(s): self._elbo(*self._product(experts, s), batch, s, beta)
            for s in subsets(MODALITIES)
        }
        joint = elbos["joint"]
        return {
            "objective": sum(e["objective"] for e in elbos.values()),  # the MVAE's sub-sampled objective
            "elbo": joint["elbo"],
            "rec_image": joint["rec_image"],
            "rec_text": joint["rec_text"],
            "kl": joint["kl"],
            **{f"elbo_{name}": e["elbo"] for name, e in elbos.items()},
        }

    def _product(self, experts: Experts, subset: tuple[str, ...]) -> tuple[Tensor, Tensor]:
        """The PoE posterior of one subset of modalities: mu, logvar B x D."""
        posterior = self.fuse({m: experts[m] for m in subset})
        return posterior.mu[0], posterior.logvar[0]

    def _loss_moe(self, experts: Experts, batch: dict[str, Tensor], beta: float) -> dict[str, Tensor]:
        posterior = self.fuse(experts)  # E x B x D, the mixture's components (image, text)
        z = mixture_of_experts_sample(*posterior)[0].squeeze(1)  # E x B x D: z[e] ~ q(z | x_e)
        log_likelihoods = {m: self.log_likelihood(z, batch, m) for m in MODALITIES}  # E x B each
        kl = posterior.log_prob(z) - log_standard_normal(z)  # one-sample estimate: no closed form
        terms = self._terms(log_likelihoods, kl, beta)  # E x B each
        return {
            **{name: value.mean(0) for name, value in terms.items()},  # stratified: average over experts
            **{f"elbo_{m}": terms["elbo"][e] for e, m in enumerate(MODALITIES)},  # z from modality m
            "rec_text_from_image": log_likelihoods["text"][0],
            "rec_image_from_text": log_likelihoods["image"][1],
        }

    def _loss_mopoe(self, experts: Experts, batch: dict[str, Tensor], beta: float) -> dict[str, Tensor]:
        mu, logvar = self.fuse(experts)  # S x B x D, one PoE per subset
        terms = self._elbo(mu, logvar, batch, MODALITIES, beta)  # S x B each
        return {
            **{name: value.mean(0) for name, value in terms.items()},  # stratified: average over subsets
            **{f"elbo_{_subset_name(s)}": terms["elbo"][i] for i, s in enumerate(subsets(MODALITIES))},
        }

    def _loss_mmvaeplus(self, encoded: Experts, batch: dict[str, Tensor], beta: float) -> dict[str, Tensor]:
        """The MMVAE+ objective: `iwae_looser` over the modalities of K weights each, DReG gradients."""
        K, d = self.config.k_samples, self.config.z_dim
        mu = torch.stack([encoded[m][0] for m in MODALITIES])  # M x B x (z_dim + private_dim)
        logvar = torch.stack([encoded[m][1] for m in MODALITIES])
        u = reparameterize(mu, logvar, k=K).transpose(0, 1)  # M x K x B x (z + w): row m ~ q(z, w_m | x_m)
        z, w = u[..., :d], u[..., d:]
        log_likelihoods = {
            n: self.log_likelihood(torch.cat([z, self._private_codes(w, n)], dim=-1), batch, n)
            for n in MODALITIES
        }  # M x K x B each: log p(x_n | z from modality m, w_n)
        if self.config.dreg:  # q's parameters are reached through u only (DReG)
            mu, logvar = mu.detach(), logvar.detach()
        log_q = mixture_log_prob(z, mu[..., :d], logvar[..., :d])  # q_mix(z | image, text)
        log_q = log_q + gaussian_log_prob(w, mu[:, None, :, d:], logvar[:, None, :, d:])  # q(w_m | x_m)
        kl = log_q - log_standard_normal(z) - log_standard_normal(w)  # M x K x B, log q / p at the samples
        weights = {"image": self.config.image_weight, "text": self.config.text_weight}
        log_w = sum(weights[n] * ll for n, ll in log_likelihoods.items()) - beta * kl
        log_w_elbo = sum(log_likelihoods.values()) - kl  # beta = 1, no likelihood weights: the reported bound
        objective = iwae_looser(log_w)
        if self.config.dreg and torch.is_grad_enabled():  # the bound's value, DReG's gradient
            surrogate = dreg_surrogate(log_w, u).mean(0)
            objective = objective.detach() + surrogate - surrogate.detach()
        return {
            "objective": objective,
            "elbo": iwae_looser(log_w_elbo),
            **{f"rec_{n}": ll.mean((0, 1)) for n, ll in log_likelihoods.items()},  # over strata and samples
            "kl": kl.mean((0, 1)),
            **{f"elbo_{m}": iwae_bound(log_w_elbo[i]) for i, m in enumerate(MODALITIES)},  # z, w from m
            "rec_text_from_image": log_likelihoods["text"][0].mean(0),
            "rec_image_from_text": log_likelihoods["image"][1].mean(0),
        }

    def aux_std(self) -> Tensor:
        """mmvaeplus: the std of the auxiliary priors r(w_m), M x private_dim (rows: image, text).

        sigma = aux_prior_scale * D * softmax(logits): its mean over the D dimensions stays aux_prior_scale
        and training learns only how it spreads over them, as the reference code's `pw_params` (softmax
        times D). A free std shrinks, so that the cross-modal terms hardly vary w: with the cpu preset it
        fell from 1 to 0.60 (image) and 0.34 (text) in 700 steps, still falling.
        """
        D = self.config.private_dim
        return self.config.aux_prior_scale * D * torch.softmax(self.aux_logits, dim=-1)

    def _private_codes(self, w: Tensor, modality: str) -> Tensor:
        """The private latent decoder `modality` reads in each stratum: its own w where the samples came
        from its own modality, else w~ ~ r(w_modality), reparameterised so that r's scale is learnt.

        w: M x K x B x private_dim, row m from q(w_m | x_m). Returns M x K x B x private_dim.
        """
        n = MODALITIES.index(modality)
        eps = torch.randn(w.shape, dtype=w.dtype, device=w.device)
        aux = eps * self.aux_std()[n]  # w~ ~ r(w_n) = N(0, diag(sigma_n^2))
        own = torch.arange(len(MODALITIES), device=w.device).view(-1, 1, 1, 1) == n
        return torch.where(own, w, aux)

    # --- evaluation: importance-weighted log-likelihoods ---------------------------------------------

    @torch.no_grad()
    def iwae(self, batch: dict[str, Tensor], k: int = 16, chunk_size: int = 8) -> dict[str, Tensor]:
        """Importance-weighted estimates (lower bounds) of log p(image), log p(text), log p(image, text).

        The proposal is the model's posterior given the modalities in question (a mixture for moe,
        mopoe and mmvaeplus given both; for mmvaeplus times q(w_m | x_m) for each modality m in question);
        k samples per data point, decoded `chunk_size` at a time to bound memory.
        Runs in eval mode (no word dropout). For "independent" the joint is the sum of the two
        marginals, since its two latents are independent. Returns {"image": B, "text": B, "joint": B}.
        """
        was_training = self.training
        self.eval()
        try:
            image = self._iwae(batch, ("image",), k, chunk_size)
            text = self._iwae(batch, ("text",), k, chunk_size)
            if self.fusion == "independent":
                joint = image + text
            else:
                joint = self._iwae(batch, MODALITIES, k, chunk_size)
        finally:
            self.train(was_training)
        return {"image": image, "text": text, "joint": joint}

    def _iwae(self, batch: dict[str, Tensor], modalities: tuple[str, ...], k: int, chunk_size: int) -> Tensor:
        """log (1/k) sum_k p(x_M, z_k) / q(z_k | x_M), z_k ~ q(z | x_M), for the modalities M. Returns B."""
        inputs = {"image": batch["image"]} if "image" in modalities else {}
        if "text" in modalities:
            inputs.update(text=batch["text"], lengths=batch["lengths"])
        experts, private = self.posteriors(**inputs)
        posterior = self.fuse(experts)
        log_w = []
        for start in range(0, k, chunk_size):
            n = min(chunk_size, k - start)
            z = posterior.sample(k=n)  # n x B x D
            chunk = log_standard_normal(z) - posterior.log_prob(z)  # n x B
            for m in modalities:
                w = None
                if m in private:  # mmvaeplus: w_m ~ q(w_m | x_m), with its own prior-to-proposal ratio
                    w = reparameterize(*private[m], k=n)
                    chunk = chunk + log_standard_normal(w) - gaussian_log_prob(w, *private[m])
                chunk = chunk + self.log_likelihood(self.decoder_input(z, w), batch, m)
            log_w.append(chunk)
        return iwae_bound(torch.cat(log_w))  # k x B -> B
