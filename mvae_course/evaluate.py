"""Measuring a trained multimodal VAE: coherence, retrieval, caption metrics and likelihoods.

Taught in notebooks/08_evaluation.ipynb.

A multimodal VAE is good when (i) what it generates in one modality agrees with what it was given in
the other (cross-modal coherence), (ii) its latent space puts an image near its captions (retrieval),
(iii) its captions read like the references (BLEU, chrF, sentence-embedding similarity), and (iv) it
assigns high likelihood to held-out pairs (IWAE bound). On the shapes data coherence is exact: captions
are parsed back to attributes, and generated images are judged by `judge.AttributeClassifier`, with
`rule_judge.RuleJudge` (nothing learnt) beside it. The metrics themselves are pure functions in
`metrics.py`; this module feeds them a model and a data set.

Every figure states how it was drawn (`Protocol`: posterior mean or sample, mean image or pixel sample,
greedy or sampled caption) and comes with a bootstrap 95% interval over the items it averages (under
"ci", beside the figures it belongs to; `intervals` pairs them up).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mvae_course import plots
from mvae_course.data.cache import CacheLoader, CaptionCache, as_float_images, image_captions
from mvae_course.data.prepare import prepare_data
from mvae_course.data.shapes import attributes_at_level, held_out, parse_caption, unseen_order_captions
from mvae_course.data.text import CaptionTokenizer, normalise, pad_captions
from mvae_course.device import seeded
from mvae_course.judge import STEPS as JUDGE_STEPS
from mvae_course.judge import AttributeClassifier, judge_accuracy, load_or_train_classifier
from mvae_course.metrics import (
    KS,
    attribute_accuracy,
    attribute_hits,
    bootstrap_ci,
    caption_metrics,
    chance_accuracy,
    query_ranks,
    recall_at_k,
    semantic_similarity,
)
from mvae_course.models.fusion import Posterior
from mvae_course.models.mvae import MultimodalVAE
from mvae_course.objectives import image_mean, image_sample
from mvae_course.rule_judge import RuleJudge
from mvae_course.runs import load_model

EVALUATION_VERSION = 2  # bump when a figure's definition changes: saved metrics are then not reused


def _device_of(model: MultimodalVAE) -> torch.device:
    return next(model.parameters()).device


def _image_batches(cache: CaptionCache, batch_size: int, device: torch.device) -> Iterable[Tensor]:
    """The cache's images in order, B x 3 x H x W float in [0, 1] on `device`."""
    for start in range(0, len(cache), batch_size):
        yield as_float_images(cache.images[start:start + batch_size]).to(device)


def _caption_loader(cache: CaptionCache, batch_size: int, device: torch.device, captions: str = "all",
                    ) -> CacheLoader:
    """Every caption of the cache in order (`captions="all"`), or one per image ("random")."""
    if not cache.has_text:
        raise ValueError("the cache has no tokenised captions: build it with a tokenizer (prepare_cache(..., tokenizer))")
    return CacheLoader(cache, batch_size, shuffle=False, seed=0, device=device, captions=captions)


@torch.no_grad()
def generate_captions(model: MultimodalVAE, tokenizer: CaptionTokenizer, cache: CaptionCache,
                      batch_size: int = 128, seed: int = 0, **decode_kwargs: Any) -> list[str]:
    """One generated caption per image of the cache (greedy unless `method=` says otherwise).

    Any noise the model draws (a sampling decoder, mmvaeplus's private latent) comes from `seed`.
    Taught in notebooks/04_fusion.ipynb.
    """
    device = _device_of(model)
    with seeded(seed, device):
        return [tokenizer.decode(ids) for images in _image_batches(cache, batch_size, device)
                for ids in model.generate_text(images, **decode_kwargs)]


# ---------------------------------------------------------------------------------------------------------
# The protocol: how a cross-modal sample is drawn
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Protocol:
    """How one modality is generated from the other: which z, which image, which caption.

    - z: "mean" decodes the posterior mean E[z | x] (the easy case: no sampling noise), "sample" one
      z ~ q(z | x), as a generative model is meant to be used;
    - image: "mean" shows the decoder's mean image E[x | z], "sample" one pixel sample x ~ p(x | z);
    - caption: "greedy" decodes the most likely word at each step, "sample" samples each word.
    Joint coherence always draws z from the prior; the image and caption settings hold there too.
    """

    z: str = "mean"
    image: str = "mean"
    caption: str = "greedy"

    def __post_init__(self) -> None:
        for name, allowed in (("z", ("mean", "sample")), ("image", ("mean", "sample")),
                              ("caption", ("greedy", "sample"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"protocol {name} must be one of {allowed}, got {getattr(self, name)!r}")

    def describe(self) -> dict[str, str]:
        """The protocol in words, as stored beside every coherence figure."""
        return {
            "z": "posterior mean E[z | x]" if self.z == "mean" else "one sample z ~ q(z | x)",
            "image": "decoder mean E[image | z]" if self.image == "mean" else "one pixel sample image ~ p(image | z)",
            "caption": "greedy decoding" if self.caption == "greedy" else "sampled word by word",
            "joint": "z ~ p(z), the prior",
        }


# The protocols `evaluate_run` reports: the posterior mean (what lessons show) and a posterior sample;
# and, for the quality benchmark, a posterior sample decoded to a pixel sample or to a sampled caption.
PROTOCOLS = {"mean_z": Protocol(), "sampled_z": Protocol(z="sample")}
SAMPLED_OUTPUTS = {"pixel_sample": Protocol(z="sample", image="sample"),
                   "sampled_caption": Protocol(z="sample", caption="sample")}


def _latent(posterior: Posterior, z: str) -> Tensor:
    """B x D: the posterior's mean, or one sample from it (a mixture picks a component first)."""
    return posterior.mean if z == "mean" else posterior.sample()


def _draw_images(model: MultimodalVAE, z: Tensor, image: str) -> Tensor:
    """Images decoded from z (B x D; mmvaeplus adds w ~ p(w)): the decoder's mean or one pixel sample,
    B x 3 x H x W in [0, 1]."""
    logits = model.image_decoder(model.decoder_input(z))
    config = model.config
    if image == "mean":
        return image_mean(logits, config.image_likelihood)
    return image_sample(logits, config.image_likelihood, config.image_sigma)


def _write_captions(model: MultimodalVAE, tokenizer: CaptionTokenizer, z: Tensor, caption: str) -> list[str]:
    """Captions decoded from z (B x D; mmvaeplus adds w ~ p(w)), greedy or sampled."""
    return [tokenizer.decode(ids) for ids in model.text_decoder.generate(model.decoder_input(z), method=caption)]


# ---------------------------------------------------------------------------------------------------------
# Coherence
# ---------------------------------------------------------------------------------------------------------

def _scored(pred: Sequence[Mapping[str, Any] | None], true: Sequence[Mapping[str, Any]], names: Sequence[str],
            n_boot: int, seed: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(accuracy per attribute and strict, its bootstrap 95% interval over the items)."""
    hits = attribute_hits(pred, true, names)
    accuracy = {a: h.float().mean().item() for a, h in hits.items()}
    return accuracy, {a: list(bootstrap_ci(h.float(), n_boot, seed=seed)) for a, h in hits.items()}


def _new_order_batches(tokenizer: CaptionTokenizer, true: Sequence[Mapping[str, str]], level: int, seed: int,
                       batch_size: int, device: torch.device) -> Iterable[tuple[Tensor, Tensor]]:
    """One caption per image in a word order the generator never writes, tokenised: (text, lengths) batches."""
    rng = np.random.default_rng(seed)
    ids = [tokenizer.encode(unseen_order_captions(t, level, rng)[0]) for t in true]
    for start in range(0, len(ids), batch_size):
        text, lengths = pad_captions(ids[start:start + batch_size])
        yield text.to(device), lengths.to(device)


@torch.no_grad()
def coherence(model: MultimodalVAE, tokenizer: CaptionTokenizer, cache: CaptionCache,
              classifier: AttributeClassifier, level: int, captions: str = "random", n_joint: int = 1000,
              batch_size: int = 128, seed: int = 0, protocol: Protocol = Protocol(),
              holdout: str | None = None, n_boot: int = 1000) -> dict[str, Any]:
    """Cross-modal and joint coherence on the shapes data, per attribute and strict (all attributes right;
    with two objects, both objects right as a set, in either order).

    - image_to_text: a caption generated from each image, parsed back (`parse_caption`), against the truth.
    - text_to_image: an image generated from each caption (`captions="random"`: one per image, "all":
      every caption), judged by `classifier`, against the caption's image's attributes.
    - text_to_image_new_orders (level 3 and up): the same from captions in word orders the generator
      never writes (`data.shapes.unseen_order_captions`), one per image.
    - joint: `n_joint` pairs sampled from the prior (the same draws under every protocol); the parsed
      caption against the classifier's reading of the image (do the two modalities tell the same story?).
    - rule_judge: text_to_image and joint read by `RuleJudge` (nothing learnt) instead; judge_agreement:
      the fraction of generated images both judges read alike in every attribute.
    - with a `holdout`: "seen" and "unseen", image_to_text and text_to_image on the images whose
      attribute combinations training saw, and on those it never saw.
    `protocol` says which z, image and caption (`Protocol`), and is returned as "protocol"; "ci" holds a
    bootstrap 95% interval for every figure (same keys, resampling items), "chance" the accuracy of
    uniform guessing, "items" how many items each figure averages. Sampling is seeded by `seed`.
    Taught in notebooks/08_evaluation.ipynb.
    """
    if cache.attributes is None:
        raise ValueError("coherence needs per-image attributes: evaluate on the shapes data")
    names = attributes_at_level(level)
    device = _device_of(model)
    true = [{a: attrs[a] for a in names} for attrs in cache.attributes]
    rule = RuleJudge(level, cache.images.shape[-1])
    out: dict[str, Any] = {"protocol": protocol.describe() | {"judge": "the CNN judge (judge.AttributeClassifier)"}}
    ci: dict[str, Any] = {}

    with seeded(seed, device):
        said = [parse_caption(c, level) for images in _image_batches(cache, batch_size, device)
                for c in _write_captions(model, tokenizer, _latent(model.encode(image=images), protocol.z),
                                         protocol.caption)]
        drawn, rows = [], []
        for batch in _caption_loader(cache, batch_size, device, captions):
            z = _latent(model.encode(text=batch["text"], lengths=batch["lengths"]), protocol.z)
            drawn.append(_draw_images(model, z, protocol.image).cpu())
            rows += cache.rows_of(batch["image_id"])
        reordered = []
        if level >= 3:
            for text, lengths in _new_order_batches(tokenizer, true, level, seed, batch_size, device):
                z = _latent(model.encode(text=text, lengths=lengths), protocol.z)
                reordered.append(_draw_images(model, z, protocol.image).cpu())
    # Joint coherence reads no posterior, so under every protocol it starts from the same prior draws.
    with seeded(seed, device):
        z = torch.randn(n_joint, model.config.z_dim, device=device)
        z_text = torch.randn_like(z) if model.fusion == "independent" else z  # its latents are separate spaces
        joint_images = _draw_images(model, z, protocol.image).cpu()
        joint_said = [parse_caption(c, level) for c in _write_captions(model, tokenizer, z_text, protocol.caption)]
    drawn = torch.cat(drawn)
    wanted = [true[r] for r in rows]

    out["image_to_text"], ci["image_to_text"] = _scored(said, true, names, n_boot, seed)
    seen_cnn, seen_rule = classifier.predict(drawn), rule.predict(drawn)
    out["text_to_image"], ci["text_to_image"] = _scored(seen_cnn, wanted, names, n_boot, seed)
    if reordered:
        out["text_to_image_new_orders"], ci["text_to_image_new_orders"] = _scored(
            classifier.predict(torch.cat(reordered)), true, names, n_boot, seed)
    joint_cnn, joint_rule = classifier.predict(joint_images), rule.predict(joint_images)
    out["joint"], ci["joint"] = _scored(joint_said, joint_cnn, names, n_boot, seed)
    out["chance"] = chance_accuracy(names)

    out["rule_judge"], ci["rule_judge"] = {}, {}
    out["rule_judge"]["text_to_image"], ci["rule_judge"]["text_to_image"] = _scored(seen_rule, wanted, names, n_boot, seed)
    out["rule_judge"]["joint"], ci["rule_judge"]["joint"] = _scored(joint_said, joint_rule, names, n_boot, seed)
    out["judge_agreement"], ci["judge_agreement"] = {}, {}
    for task, (cnn, rules) in {"text_to_image": (seen_cnn, seen_rule), "joint": (joint_cnn, joint_rule)}.items():
        agree = attribute_hits(cnn, rules, names)["strict"].float()
        out["judge_agreement"][task] = agree.mean().item()
        ci["judge_agreement"][task] = list(bootstrap_ci(agree, n_boot, seed=seed))

    items = {"images": len(true), "captions": len(wanted), "joint": n_joint}
    if holdout is not None:
        unseen_image = [held_out(t, holdout) for t in true]
        unseen_caption = [unseen_image[r] for r in rows]
        for group, flag in (("seen", False), ("unseen", True)):
            keep_i = [i for i, u in enumerate(unseen_image) if u == flag]
            keep_c = [i for i, u in enumerate(unseen_caption) if u == flag]
            if not keep_i:
                continue
            out[group], ci[group] = {}, {}
            out[group]["image_to_text"], ci[group]["image_to_text"] = _scored(
                [said[i] for i in keep_i], [true[i] for i in keep_i], names, n_boot, seed)
            out[group]["text_to_image"], ci[group]["text_to_image"] = _scored(
                [seen_cnn[i] for i in keep_c], [wanted[i] for i in keep_c], names, n_boot, seed)
            items[f"{group} images"] = len(keep_i)
    out["items"] = items
    out["ci"] = ci
    return out


@torch.no_grad()
def retrieval(model: MultimodalVAE, cache: CaptionCache, batch_size: int = 256, fold_size: int = 1000,
              min_images_for_folds: int = 5000, n_boot: int = 1000) -> dict[str, Any]:
    """Image <-> text retrieval by cosine similarity of posterior means, embedding each modality alone.

    image_to_text: an image is a hit at K if any of its captions ranks in the top K; text_to_image: a
    caption is a hit if its image does. With at least `min_images_for_folds` images, the standard COCO
    "1k" protocol: the average over folds of `fold_size` images (and their captions); else the whole split.
    "ci" holds bootstrap 95% intervals, resampling the queries (of every fold together).
    Taught in notebooks/08_evaluation.ipynb.
    """
    device = _device_of(model)
    z_image = torch.cat([model.embed(image=x).float().cpu() for x in _image_batches(cache, batch_size, device)])
    z_text = torch.cat([model.embed(text=b["text"], lengths=b["lengths"]).float().cpu()
                        for b in _caption_loader(cache, batch_size, device)])  # M x D, in caption order
    z_image, z_text = F.normalize(z_image, dim=-1), F.normalize(z_text, dim=-1)
    owner = cache.caption_image.cpu()  # M: image row of each caption
    n = len(cache)
    size = fold_size if n >= min_images_for_folds else n
    folds = [(start, start + size) for start in range(0, n - size + 1, size)]
    results: dict[str, list[dict[str, float]]] = {"image_to_text": [], "text_to_image": []}
    ranks: dict[str, list[Tensor]] = {"image_to_text": [], "text_to_image": []}
    for lo, hi in folds:
        caps = torch.nonzero((owner >= lo) & (owner < hi)).squeeze(1)  # captions of this fold's images
        sim = z_image[lo:hi] @ z_text[caps].T  # images x captions
        local = (owner[caps] - lo).tolist()
        per_image = [[] for _ in range(hi - lo)]
        for c, r in enumerate(local):
            per_image[r].append(c)
        for task, (s, gt) in {"image_to_text": (sim, per_image), "text_to_image": (sim.T, local)}.items():
            results[task].append(recall_at_k(s, gt))
            ranks[task].append(query_ranks(s, gt))
    out: dict[str, Any] = {task: {key: statistics.fmean(r[key] for r in runs) for key in runs[0]}
                           for task, runs in results.items()}
    out["folds"] = {"count": len(folds), "images_per_fold": size}
    out["ci"] = {}
    for task, parts in ranks.items():
        rank = torch.cat(parts).float()
        out["ci"][task] = {f"R@{k}": list(bootstrap_ci(rank <= k, n_boot)) for k in KS}
        out["ci"][task]["median_rank"] = list(bootstrap_ci(rank, n_boot, statistic="median"))
    return out


@torch.no_grad()
def log_likelihoods(model: MultimodalVAE, cache: CaptionCache, k: int = 16, batch_size: int = 64,
                    seed: int = 0,
                    ) -> dict[str, float]:
    """IWAE estimates (lower bounds, k samples) of log p(image), log p(text), log p(image, text).

    One caption per image. Returns the means per sample in nats (`log_p_image`, `log_p_text`,
    `log_p_joint`), and the negated image term in nats per dimension (`image_nats_per_dim`, over the
    3 H W pixels) and the negated text term in bits per token (`text_bits_per_token`, EOS included).
    Taught in notebooks/08_evaluation.ipynb.
    """
    device = _device_of(model)
    sums: dict[str, float] = {}
    n_pairs, n_tokens = 0, 0
    with seeded(seed, device):
        for batch in _caption_loader(cache, batch_size, device, captions="random"):
            for name, log_p in model.iwae(batch, k).items():
                sums[name] = sums.get(name, 0.0) + log_p.double().sum().item()
            n_pairs += batch["image"].shape[0]
            n_tokens += int(batch["lengths"].sum())
    dims = math.prod(cache.images.shape[1:])
    out = {f"log_p_{name}": total / n_pairs for name, total in sums.items()}
    out["image_nats_per_dim"] = -sums["image"] / (n_pairs * dims)
    out["text_bits_per_token"] = -sums["text"] / (n_tokens * math.log(2))
    return out


def captions_report(model: MultimodalVAE, tokenizer: CaptionTokenizer, cache: CaptionCache,
                    batch_size: int = 128,
                    semantic: bool = True) -> tuple[dict[str, float], list[str], list[list[str]]]:
    """BLEU-4, chrF and (if `semantic`) sentence-embedding similarity of greedy captions of every image.

    References are the image's captions, normalised as BERT's tokenizer sees them (lowercase, split
    punctuation) so that they compare like for like with the decoded hypotheses.
    Returns (metrics, hypotheses, references). Taught in notebooks/08_evaluation.ipynb.
    """
    hyps = generate_captions(model, tokenizer, cache, batch_size)
    refs = [[normalise(c) for c in caps] for caps in image_captions(cache, list(range(len(cache))))]
    metrics = caption_metrics(hyps, refs)
    if semantic:
        metrics["semantic_similarity"] = semantic_similarity(hyps, refs, device=str(_device_of(model)))
    return metrics, hyps, refs


# ---------------------------------------------------------------------------------------------------------
# One trained run: every metric, figures, a table
# ---------------------------------------------------------------------------------------------------------

def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested metric dicts as one level with "/"-joined keys, e.g. {"coherence/joint/strict": 0.9}.
    """
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten(value, f"{name}/")
        else:
            out[name] = value
    return out


def intervals(flat: Mapping[str, Any]) -> dict[str, list[float]]:
    """{figure's key: its [lo, hi]} from flattened metrics: an interval sits under a "ci" key beside its
    figure, so "coherence/mean_z/ci/text_to_image/strict" is "coherence/mean_z/text_to_image/strict"'s."""
    out = {}
    for key, value in flat.items():
        parts = key.split("/")
        if "ci" in parts:
            i = parts.index("ci")
            out["/".join(parts[:i] + parts[i + 1:])] = value
    return out


def format_table(metrics: Mapping[str, Any]) -> str:
    """A two-column text table of (flattened) metrics, numbers to 4 significant digits, each figure with
    its 95% interval when it has one."""
    flat = flatten(metrics)
    ci = intervals(flat)
    shown = {k: v for k, v in flat.items() if "ci" not in k.split("/")}
    width = max(map(len, shown), default=0)
    lines = [f"{'metric'.ljust(width)}  value [95% interval]", f"{'-' * width}  -----"]
    for key, value in shown.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        if key in ci:
            text += f" [{ci[key][0]:.4g}, {ci[key][1]:.4g}]"
        lines.append(f"{key.ljust(width)}  {text}")
    return "\n".join(lines)


def judges(classifier: AttributeClassifier, cache: CaptionCache, level: int,
           holdout: str | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Both judges' accuracy on the cache's real images and on degraded copies (`judge.judge_accuracy`):
    {"cnn": {degradation: accuracy}, "rule": {...}}; with a `holdout`, also on the real images showing
    combinations training never saw ("real, unseen combinations")."""
    names = attributes_at_level(level)
    out = {}
    for name, judge in (("cnn", classifier), ("rule", RuleJudge(level, cache.images.shape[-1]))):
        out[name] = judge_accuracy(judge, cache.images, cache.attributes, names)
        unseen = [i for i, a in enumerate(cache.attributes) if held_out(a, holdout)]
        if unseen:
            out[name]["real, unseen combinations"] = attribute_accuracy(
                judge.predict(cache.images[unseen]), [cache.attributes[i] for i in unseen], names)
    return out


def _default_data_dir(run_dir: Path) -> Path:
    """Where a run's data lives: `run_dir/data` (train()'s default) if present, else ./data (the CLI's)."""
    return run_dir / "data" if (run_dir / "data").is_dir() else Path("data")


def _figures(model: MultimodalVAE, tokenizer: CaptionTokenizer, cache: CaptionCache, run_dir: Path,
             split: str, level: int | None,
             n_show: int = 8) -> list[Path]:
    """The run's figures: loss curves, prior samples, cross-modal generation, the latent space."""
    device = _device_of(model)
    written = []
    if (run_dir / "metrics.csv").is_file():
        fig = plots.plot_loss_terms(run_dir / "metrics.csv")
        written.append(plots.save_figure(fig, run_dir / "figures" / "loss_terms.png"))
    shown = cache.head(n_show)
    batch = next(iter(_caption_loader(shown, n_show, device, captions="random")))
    with seeded(0, device):
        samples = model.sample(16)
    fig = plots.image_grid(samples["image"], nrow=8, title=f"Images sampled from the prior ({model.fusion})")
    written.append(plots.save_figure(fig, run_dir / "figures" / "prior_samples.png"))
    fig = plots.plot_cross_modal(
        batch["image"], tokenizer.decode_batch(batch["text"].tolist()),
        [tokenizer.decode(ids) for ids in model.generate_text(batch["image"])],
        model.generate_image(batch["text"], batch["lengths"]),
        title=f"Cross-modal generation ({model.fusion}, {split})",
    )
    written.append(plots.save_figure(fig, run_dir / "figures" / f"cross_modal_{split}.png"))
    z = torch.cat([model.embed(image=x).float().cpu() for x in _image_batches(cache, 256, device)])
    labels = [a["shape"] for a in cache.attributes] if cache.attributes is not None and level else None
    fig = plots.plot_latent_2d(z, labels, label_name="shape", title=f"Image posterior means, {split} ({model.fusion})")
    written.append(plots.save_figure(fig, run_dir / "figures" / f"latent_{split}.png"))
    return written


def _evaluation_key(run_dir: Path, split: str, n: int | None, k: int, protocols: Mapping[str, Protocol],
                    classifier_steps: int) -> dict[str, Any]:
    """What a saved `metrics_<split>.json` must have been computed with to be reused: this code's version,
    the options, and the checkpoint file (by size and modification time)."""
    ckpt = run_dir / "best.pt" if (run_dir / "best.pt").exists() else run_dir / "last.pt"
    stat = ckpt.stat() if ckpt.exists() else None
    return {"version": EVALUATION_VERSION, "split": split, "n": n, "k": k, "judge_steps": classifier_steps,
            "protocols": {name: vars(p) for name, p in protocols.items()},
            "checkpoint": [ckpt.name, stat.st_size, stat.st_mtime_ns] if stat else None}


def evaluate_run(run_dir: str | Path, split: str = "val", device: str | torch.device | None = None,
                 n: int | None = None, k: int = 16, data_dir: str | Path | None = None,
                 classifier_steps: int = JUDGE_STEPS, semantic: bool | None = None, figures: bool = True,
                 verbose: bool = True, protocols: Mapping[str, Protocol] = PROTOCOLS,
                 reuse: bool = False) -> dict[str, Any]:
    """Every metric of a trained run on one split; writes `metrics_<split>.json` and figures into the run.

    - both data sets: IWAE log-likelihoods, latent-space retrieval, BLEU-4/chrF of greedy captions;
    - shapes: both judges' accuracy on real and degraded images ("judges"), and cross-modal and joint
      coherence under each of `protocols` ("coherence": {name: `coherence(...)`}, by default the
      posterior mean "mean_z" and a posterior sample "sampled_z");
    - COCO: also the sentence-embedding similarity of captions (`semantic`, default on for COCO only).
    "protocol" says how each figure was drawn. `n` limits the evaluation to the split's first n images;
    `data_dir` is where the run's data and caches are (default: run_dir/data if present, else ./data).
    With `reuse`, a `metrics_<split>.json` computed by this version with the same options from the same
    checkpoint is read back instead. Taught in notebooks/08_evaluation.ipynb.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist; train one with `python -m mvae_course train`")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    key = _evaluation_key(run_dir, split, n, k, protocols, classifier_steps)
    saved = run_dir / f"metrics_{split}.json"
    if reuse and saved.is_file():
        try:
            metrics = json.loads(saved.read_text())
        except ValueError:
            metrics = {}
        if metrics.get("evaluation") == key:
            if verbose:
                print(f"reusing {saved} (same checkpoint, options and evaluation version)")
            return metrics
    model, tokenizer, config = load_model(run_dir, device or "auto")
    data_dir = Path(data_dir) if data_dir is not None else _default_data_dir(run_dir)
    _, train_cache, val_cache = prepare_data(config, data_dir, tokenizer)
    cache = (train_cache if split == "train" else val_cache).head(n)
    shapes = config.data.dataset == "shapes"
    semantic = (not shapes) if semantic is None else semantic

    metrics: dict[str, Any] = {
        "run": str(run_dir), "split": split, "dataset": config.data.dataset, "fusion": config.model.fusion,
        "images": len(cache), "captions": len(cache.captions), "evaluation": key,
        "protocol": {
            "log_likelihood": f"IWAE bound, k = {k} samples from the posterior, one caption per image",
            "retrieval": "cosine similarity of posterior means, each modality encoded alone",
            "caption_metrics": "greedy captions from the image's posterior mean",
        },
    }
    metrics["log_likelihood"] = log_likelihoods(model, cache, k)
    metrics["retrieval"] = retrieval(model, cache)
    metrics["caption_metrics"], hyps, _ = captions_report(model, tokenizer, cache, semantic=semantic)
    if shapes:
        level, holdout = config.data.level, config.data.holdout
        classifier, _ = load_or_train_classifier(
            train_cache, val_cache, attributes_at_level(level), data_dir / "cache",
            steps=classifier_steps, device=_device_of(model),
        )
        metrics["judges"] = judges(classifier, cache, level, holdout)
        metrics["coherence"] = {name: coherence(model, tokenizer, cache, classifier, level, protocol=protocol,
                                                holdout=holdout)
                                for name, protocol in protocols.items()}
        metrics["protocol"]["coherence"] = {name: p.describe() for name, p in protocols.items()}
    metrics["examples"] = [{"reference": c, "generated": h}
                           for c, h in zip(cache.first_captions(), hyps)][:5]
    if figures:
        paths = _figures(model, tokenizer, cache, run_dir, split, config.data.level if shapes else None)
        metrics["figures"] = [str(p) for p in paths]
    saved.write_text(json.dumps(metrics, indent=2) + "\n")
    if verbose:
        shown = {k: v for k, v in metrics.items() if k not in ("examples", "figures", "evaluation", "protocol")}
        print(format_table(shown))
        for example in metrics["examples"][:3]:
            print(f"  true: {example['reference']!r}\n  gen:  {example['generated']!r}")
    return metrics
