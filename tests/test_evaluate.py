"""Evaluation: metric functions on hand-built inputs, the attribute judge, a tiny run end to end."""

import json

import pytest
import torch

from mvae_course.compare import comparison_table, to_markdown
from mvae_course.config import preset
from mvae_course.data.cache import ensure_cache
from mvae_course.data.shapes import ATTRIBUTE_VALUES, attributes_at_level, ensure_shapes
from mvae_course.evaluate import evaluate_run, flatten
from mvae_course.judge import load_or_train_classifier
from mvae_course.metrics import (
    attribute_accuracy,
    caption_metrics,
    chance_accuracy,
    recall_at_k,
    semantic_similarity,
)


# --- retrieval ---------------------------------------------------------------------------------------


def test_recall_perfect_similarity():
    r = recall_at_k(torch.eye(12), list(range(12)))
    assert r == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "median_rank": 1.0}


def test_recall_reversed_similarity_ranks_last():
    n = 12
    sim = torch.arange(n, dtype=torch.float).repeat(n, 1)  # every query prefers the last candidates
    sim -= 100 * torch.eye(n)  # and the correct one is worst of all
    r = recall_at_k(sim, list(range(n)))
    assert r["median_rank"] == n
    assert r["R@1"] == r["R@5"] == r["R@10"] == 0.0


def test_recall_counts_a_hit_when_any_correct_caption_is_in_top_k():
    # 2 images x 10 captions; image 0 owns captions {7, 9}, image 1 owns {0}
    sim = torch.zeros(2, 10)
    sim[0] = torch.linspace(1, 0, 10)  # ranks caption 0 first, ..., 7 eighth, 9 last
    sim[1, 0] = 1.0
    r = recall_at_k(sim, [{7, 9}, 0])
    assert r["R@1"] == 0.5 and r["R@5"] == 0.5 and r["R@10"] == 1.0
    with pytest.raises(ValueError, match="ground-truth"):
        recall_at_k(sim, [0])


def test_recall_ties_count_against_the_query():
    collapsed = torch.ones(5, 5)  # every candidate equally close: no information
    r = recall_at_k(collapsed, list(range(5)))
    assert r["R@1"] == 0.0 and r["median_rank"] == 5


# --- attributes --------------------------------------------------------------------------------------


def test_attribute_accuracy_per_attribute_and_strict():
    true = [{"shape": "circle", "colour": "red"}] * 4
    pred = [
        {"shape": "circle", "colour": "red"},
        {"shape": "circle", "colour": "blue"},
        {"shape": "square", "colour": None},
        None,  # unparseable: wrong on everything
    ]
    acc = attribute_accuracy(pred, true, ["shape", "colour"])
    assert acc == {"shape": 0.5, "colour": 0.25, "strict": 0.25}


def test_chance_levels_from_attribute_values():
    chance = chance_accuracy(["shape", "size"])
    assert chance["shape"] == pytest.approx(1 / len(ATTRIBUTE_VALUES["shape"]))
    assert chance["strict"] == pytest.approx(1 / (len(ATTRIBUTE_VALUES["shape"]) * len(ATTRIBUTE_VALUES["size"])))


# --- captions ----------------------------------------------------------------------------------------


def test_bleu_of_identical_captions_is_100_and_drops_otherwise():
    refs = [["a red circle in the upper left", "a circle, red"], ["a big blue square"]]
    same = caption_metrics(["a red circle in the upper left", "a big blue square"], refs)
    assert same["bleu4"] == pytest.approx(100.0) and same["chrf"] == pytest.approx(100.0)
    other = caption_metrics(["a green star", "two small crosses"], refs)
    assert other["bleu4"] < 10 and other["chrf"] < same["chrf"]


@pytest.mark.slow
def test_semantic_similarity_identical_beats_unrelated():
    refs = ["a red circle in the upper left", "a man rides a horse on the beach"]
    identical = semantic_similarity(refs, refs)
    unrelated = semantic_similarity(["a plate of pasta with tomatoes", "a red circle"], [[r] for r in refs])
    assert identical == pytest.approx(1.0, abs=1e-4)
    assert unrelated < identical - 0.3


# --- the attribute judge -----------------------------------------------------------------------------


@pytest.mark.slow
def test_classifier_is_a_fair_judge_on_real_images(tmp_path):
    level = 3  # shape, size, colour on 32 x 32 images
    root = ensure_shapes(tmp_path / "shapes", n_train=300, n_val=100, level=level, image_size=32)
    train = ensure_cache(root, "train", tmp_path / "train.cache", 32)
    val = ensure_cache(root, "val", tmp_path / "val.cache", 32)
    names = attributes_at_level(level)
    clf, acc = load_or_train_classifier(train, val, names, tmp_path / "judge", steps=250)
    assert acc["strict"] >= 0.9, acc
    assert set(acc) == {*names, "strict"}
    (saved,) = (tmp_path / "judge").glob("attribute_classifier_*.pt")
    again, acc_again = load_or_train_classifier(train, val, names, tmp_path / "judge", steps=250)
    assert acc_again == acc  # read from disk, not retrained
    assert list((tmp_path / "judge").iterdir()) == [saved]


# --- a tiny run end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from mvae_course.train import train

    out = tmp_path_factory.mktemp("tiny_run")
    cfg = preset("tiny").replace(train={"max_steps": 6, "eval_every": 3, "ckpt_every": 6, "log_every": 2})
    train(cfg, out / "run", device="cpu", progress=False, data_dir=out / "data")
    return out


@pytest.mark.slow
def test_evaluate_run_writes_every_metric_and_figure(tiny_run):
    run = tiny_run / "run"
    m = evaluate_run(run, device="cpu", n=24, k=2, data_dir=tiny_run / "data", classifier_steps=20, verbose=False)
    saved = json.loads((run / "metrics_val.json").read_text())
    assert saved["images"] == 24 and saved["fusion"] == "poe"
    flat = flatten(saved)
    for key in ("log_likelihood/log_p_image", "log_likelihood/log_p_text", "log_likelihood/log_p_joint",
                "log_likelihood/image_nats_per_dim", "log_likelihood/text_bits_per_token",
                "retrieval/image_to_text/R@1", "retrieval/text_to_image/median_rank", "caption_metrics/bleu4",
                "classifier_accuracy/strict", "coherence/image_to_text/strict", "coherence/text_to_image/shape",
                "coherence/joint/position", "coherence/chance/strict"):
        assert key in flat, key
    for task in ("image_to_text", "text_to_image", "joint"):
        assert 0.0 <= m["coherence"][task]["strict"] <= m["coherence"][task]["shape"] <= 1.0
    assert 1 <= flat["retrieval/text_to_image/median_rank"] <= 24
    assert all((run / "figures" / name).is_file() for name in
               ("loss_terms.png", "prior_samples.png", "cross_modal_val.png", "latent_val.png"))
    row = comparison_table({"poe": m}, "shapes")[0]
    assert row["fusion"] == "poe" and "coherence text->image" in row
    assert to_markdown([row], "t").splitlines()[2].startswith("| fusion |")


def test_head_keeps_images_with_their_captions(tiny_run):
    from mvae_course.data.cache import load_cache

    (path,) = (tiny_run / "data" / "cache").glob("*-val-*")
    cache = load_cache(path)
    small = cache.head(5)
    assert len(small) == 5 and len(small.captions) == int((cache.caption_image < 5).sum())
    assert small.offsets[-1] == small.tokens.shape[0]
    assert small.attributes == cache.attributes[:5]
    assert cache.head(None) is cache


# --- the main result, in miniature -------------------------------------------------------------------


@pytest.mark.slow
def test_poe_beats_independent_on_cross_modal_coherence(tmp_path):
    """A shared latent lets the image's posterior drive the caption decoder; independent latents cannot."""
    from mvae_course.compare import compare

    rows = compare(level=1, fusions=("independent", "poe"), preset="tiny", max_steps=400, seed=0,
                   out=tmp_path, device="cpu", n=64, progress=False)
    coherence = {row["fusion"]: row["coherence image->text"] for row in rows}
    assert coherence["poe"] >= coherence["independent"] + 0.3, coherence
    for name in ("compare.md", "compare.csv", "compare.json", "compare.png"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert [row["fusion"] for row in saved["rows"]] == ["independent", "poe"]
