"""Evaluation: metric functions on hand-built inputs, the attribute judge, a tiny run end to end."""

import json

import pytest
import torch

from mvae_course.compare import chance_levels, comparison_table, summarise, to_markdown
from mvae_course.config import preset
from mvae_course.data.shapes import ATTRIBUTE_VALUES, attributes_at_level
from mvae_course.evaluate import Protocol, evaluate_run, flatten, format_table, intervals
from mvae_course.metrics import (
    attribute_accuracy,
    attribute_hits,
    bootstrap_ci,
    caption_metrics,
    centroid_accuracy,
    chance_accuracy,
    chance_recall,
    query_ranks,
    recall_at_k,
    semantic_similarity,
)
from mvae_course.objectives import image_mean, image_sample

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


def test_query_ranks_are_what_recall_counts():
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.7, 0.6, 0.1]])
    assert query_ranks(sim, [0, 1, {0, 1}]).tolist() == [1, 2, 1]


def test_chance_recall_of_a_random_ranking():
    assert chance_recall(10, 1, 3) == pytest.approx(0.3)
    assert chance_recall(10, 2, 1) == pytest.approx(0.2)
    assert chance_recall(4, 2, 3) == 1.0  # three picks among four always catch one of two
    # Against a simulation of random rankings: 25 captions, 5 of them right, top 5.
    ranks = torch.rand(20000, 25).argsort(1)[:, :5]  # the top 5 of each random ranking
    hit = (ranks < 5).any(1).float().mean().item()
    assert chance_recall(25, 5, 5) == pytest.approx(hit, abs=0.01)
    with pytest.raises(ValueError):
        chance_recall(5, 0, 1)


# --- bootstrap intervals -----------------------------------------------------------------------------


def test_bootstrap_interval_is_seeded_brackets_the_mean_and_narrows_with_more_items():
    g = torch.Generator().manual_seed(0)
    few = (torch.rand(50, generator=g) < 0.7).float()
    many = (torch.rand(5000, generator=g) < 0.7).float()
    lo, hi = bootstrap_ci(few, seed=3)
    assert (lo, hi) == bootstrap_ci(few, seed=3)  # same seed, same interval
    scores = torch.rand(50, generator=g)  # continuous values: another seed moves the interval a little
    assert bootstrap_ci(scores, seed=3) != bootstrap_ci(scores, seed=4)
    assert lo < few.mean().item() < hi
    lo_many, hi_many = bootstrap_ci(many)
    assert lo_many < many.mean().item() < hi_many
    assert hi_many - lo_many < (hi - lo) / 5  # ~sqrt(100) = 10 times narrower
    # The normal approximation's width for a proportion: 2 * 1.96 * sqrt(p (1 - p) / n).
    p = many.mean().item()
    assert hi_many - lo_many == pytest.approx(2 * 1.96 * (p * (1 - p) / 5000) ** 0.5, rel=0.15)
    assert bootstrap_ci(torch.ones(20)) == (1.0, 1.0)  # no spread, no interval
    assert bootstrap_ci([1, 2, 3, 100], statistic="median")[1] <= 100
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci([])


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
    # Two objects, strict as a set: either of the two matchings of guessed to true objects will do.
    assert chance_accuracy(attributes_at_level(5))["strict"] == pytest.approx(2 / 240**2)


def test_strict_compares_two_objects_as_a_set():
    names = attributes_at_level(5)
    a = {"shape": "circle", "size": "small", "colour": "red", "position": "top left"}
    b = {"shape": "star", "size": "large", "colour": "blue", "position": "bottom right"}
    true = [a | {f"{k}2": v for k, v in b.items()}] * 3
    swapped = b | {f"{k}2": v for k, v in a.items()}  # the same two objects, named the other way round
    wrong = true[0] | {"colour2": "green"}
    hits = attribute_hits([true[0], swapped, wrong], true, names)
    assert hits["strict"].tolist() == [True, True, False]
    assert hits["shape"].tolist() == [True, False, True]  # per attribute: object 1 is the top-left one
    assert attribute_accuracy([swapped], true[:1], names)["strict"] == 1.0


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


# --- a tiny run end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from mvae_course.train import train

    out = tmp_path_factory.mktemp("tiny_run")
    cfg = preset("tiny").replace(train={"max_steps": 6, "eval_every": 3, "ckpt_every": 6, "log_every": 2})
    train(cfg, out / "run", device="cpu", progress=False, data_dir=out / "data")
    return out


def tiny_model_and_cache(tiny_run, n=16):
    from mvae_course.data.prepare import prepare_data
    from mvae_course.runs import load_model

    model, tokenizer, config = load_model(tiny_run / "run", "cpu")
    _, _, val = prepare_data(config, tiny_run / "data", tokenizer)
    return model, tokenizer, val.head(n)


def test_coherence_states_its_protocol_and_gives_every_figure_an_interval(tiny_run):
    from mvae_course.evaluate import coherence
    from mvae_course.rule_judge import RuleJudge

    model, tokenizer, val = tiny_model_and_cache(tiny_run)
    judge = RuleJudge(4, val.images.shape[-1])  # nothing to train: stands in for the CNN here
    mean = coherence(model, tokenizer, val, judge, 4, n_joint=16, holdout="shape-colour", n_boot=200)
    assert mean["protocol"]["z"].startswith("posterior mean") and mean["protocol"]["caption"] == "greedy decoding"
    flat = flatten({k: v for k, v in mean.items() if k != "protocol"})
    ci = intervals(flat)
    figures = [k for k in flat if "ci" not in k.split("/") and not k.startswith(("chance", "items"))]
    assert {"image_to_text/strict", "text_to_image/strict", "text_to_image_new_orders/strict", "joint/strict",
            "rule_judge/text_to_image/strict", "judge_agreement/joint", "seen/text_to_image/strict"} <= set(figures)
    for key in figures:  # every figure has its interval, and lies in it
        lo, hi = ci[key]
        assert 0.0 <= lo <= flat[key] <= hi <= 1.0, key
    # With the CNN's stand-in being the rule judge itself, the two judges agree on every image.
    assert mean["judge_agreement"]["text_to_image"] == 1.0
    assert mean["text_to_image"] == mean["rule_judge"]["text_to_image"]
    assert mean["items"]["seen images"] + mean["items"]["unseen images"] == mean["items"]["images"] == 16
    again = coherence(model, tokenizer, val, judge, 4, n_joint=16, holdout="shape-colour", n_boot=200)
    assert again == mean  # seeded: the same figures and intervals
    sampled = coherence(model, tokenizer, val, judge, 4, n_joint=16, protocol=Protocol(z="sample", image="sample"),
                        n_boot=200)
    assert sampled["protocol"]["z"].startswith("one sample") and "pixel sample" in sampled["protocol"]["image"]
    assert "seen" not in sampled  # no holdout, no split
    # Joint coherence reads no posterior: sampling z changes the cross-modal figures' draws, not its own.
    sampled_z = coherence(model, tokenizer, val, judge, 4, n_joint=16, protocol=Protocol(z="sample"), n_boot=200)
    assert sampled_z["joint"] == mean["joint"] and sampled_z["ci"]["joint"] == mean["ci"]["joint"]


def test_protocols_are_checked():
    assert Protocol().describe()["joint"] == "z ~ p(z), the prior"
    for bad in ({"z": "mode"}, {"image": "median"}, {"caption": "beam"}):
        with pytest.raises(ValueError, match="protocol"):
            Protocol(**bad)


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli", "continuous_bernoulli"])
def test_a_pixel_sample_has_the_decoder_mean_as_its_mean(likelihood):
    logits = torch.linspace(-4, 4, 9).view(1, 1, 3, 3).expand(4000, 3, 3, 3)
    torch.manual_seed(0)
    x = image_sample(logits, likelihood, sigma=0.05)
    assert x.min() >= 0 and x.max() <= 1
    torch.testing.assert_close(x.mean(0), image_mean(logits[0], likelihood), atol=0.03, rtol=0)
    if likelihood == "bernoulli":
        assert set(x.unique().tolist()) == {0.0, 1.0}


@pytest.mark.slow
def test_evaluate_run_writes_every_metric_and_figure(tiny_run, capsys):
    run = tiny_run / "run"
    m = evaluate_run(run, device="cpu", n=24, k=2, data_dir=tiny_run / "data", classifier_steps=20, verbose=False)
    saved = json.loads((run / "metrics_val.json").read_text())
    assert saved["images"] == 24 and saved["fusion"] == "poe"
    flat = flatten(saved)
    for key in ("log_likelihood/log_p_image", "log_likelihood/log_p_text", "log_likelihood/log_p_joint",
                "log_likelihood/image_nats_per_dim", "log_likelihood/text_bits_per_token",
                "retrieval/image_to_text/R@1", "retrieval/text_to_image/median_rank", "caption_metrics/bleu4",
                "retrieval/ci/image_to_text/R@1", "judges/cnn/real/strict", "judges/cnn/blur 1.0/shape",
                "judges/rule/pixel sample/strict", "coherence/mean_z/image_to_text/strict",
                "coherence/sampled_z/text_to_image/shape", "coherence/mean_z/joint/position",
                "coherence/mean_z/chance/strict", "coherence/sampled_z/ci/text_to_image/strict",
                "protocol/coherence/sampled_z/z", "protocol/retrieval"):
        assert key in flat, key
    for protocol in ("mean_z", "sampled_z"):
        for task in ("image_to_text", "text_to_image", "joint"):
            scores = m["coherence"][protocol][task]
            assert 0.0 <= scores["strict"] <= scores["shape"] <= 1.0
    assert 1 <= flat["retrieval/text_to_image/median_rank"] <= 24
    assert all((run / "figures" / name).is_file() for name in
               ("loss_terms.png", "prior_samples.png", "cross_modal_val.png", "latent_val.png"))
    row = comparison_table({"poe": m}, "shapes")[0]
    assert row["fusion"] == "poe" and "text->image strict, sampled z" in row
    assert to_markdown([row], "t").splitlines()[2].startswith("| fusion |")
    # Read back, not recomputed, when nothing changed; recomputed when the checkpoint did.
    assert evaluate_run(run, device="cpu", n=24, k=2, data_dir=tiny_run / "data", classifier_steps=20,
                        reuse=True) == saved
    assert "reusing" in capsys.readouterr().out
    assert evaluate_run(run, device="cpu", n=20, k=2, data_dir=tiny_run / "data", classifier_steps=20,
                        verbose=False, figures=False, reuse=True)["images"] == 20  # other options


def test_tables_show_each_figure_with_its_interval():
    metrics = {"coherence": {"mean_z": {"text_to_image": {"strict": 0.8}, "ci": {"text_to_image": {"strict": [0.7, 0.9]}}}}}
    assert intervals(flatten(metrics)) == {"coherence/mean_z/text_to_image/strict": [0.7, 0.9]}
    table = format_table(metrics)
    assert "coherence/mean_z/text_to_image/strict  0.8 [0.7, 0.9]" in table and "/ci/" not in table


def fake_run(strict: float, lo: float, hi: float) -> dict:
    return {"images": 100, "captions": 500,
            "coherence": {"mean_z": {"text_to_image": {"strict": strict}, "chance": {"strict": 1 / 240},
                                     "ci": {"text_to_image": {"strict": [lo, hi]}}}},
            "retrieval": {"image_to_text": {"R@1": 0.5}, "folds": {"images_per_fold": 100}}}


def test_summaries_over_one_seed_and_several():
    one = summarise({"mopoe": [fake_run(0.8, 0.7, 0.9)]}, "shapes")
    assert one["rows"] == [{"fusion": "mopoe", "text->image strict, mean z": 0.8, "R@1 image->text": 0.5}]
    assert one["intervals"]["mopoe"]["text->image strict, mean z"] == [0.7, 0.9] and one["sd"] == {}
    assert "bootstrap" in one["interval"]
    three = summarise({"mopoe": [fake_run(v, 0, 1) for v in (0.7, 0.8, 0.9)]}, "shapes")
    assert three["rows"][0]["text->image strict, mean z"] == pytest.approx(0.8)
    assert three["intervals"]["mopoe"]["text->image strict, mean z"] == [0.7, 0.9]  # the range over seeds
    assert three["sd"]["mopoe"]["text->image strict, mean z"] == pytest.approx(0.1)
    assert three["per_seed"]["mopoe"]["text->image strict, mean z"] == [0.7, 0.8, 0.9]
    assert "0.800 ± 0.100" in to_markdown(three["rows"], "t", three["intervals"], three["sd"])
    assert "0.800 [0.700, 0.900]" in to_markdown(one["rows"], "t", one["intervals"], one["sd"])
    chance = chance_levels(fake_run(0.8, 0.7, 0.9), "shapes")
    assert chance["text->image strict, mean z"] == pytest.approx(1 / 240)
    assert chance["R@1 image->text"] == pytest.approx(0.01)  # 5 right captions among 500


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

    summary = compare(level=1, fusions=("independent", "poe"), preset="tiny", max_steps=400, seeds=(0,),
                      out=tmp_path, device="cpu", n=64, progress=False, judge_steps=100)
    coherence = {row["fusion"]: row["image->text strict, mean z"] for row in summary["rows"]}
    assert coherence["poe"] >= coherence["independent"] + 0.3, coherence
    for name in ("compare.md", "compare.csv", "compare.json", "compare.png"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert [row["fusion"] for row in saved["rows"]] == ["independent", "poe"]
    assert "posterior mean" in saved["protocol"]["coherence"]["mean_z"]["z"] and "bootstrap" in saved["interval"]
    assert "seed 0" in saved["title"] and "[" in (tmp_path / "compare.md").read_text()


@pytest.mark.slow
def test_compare_over_seeds_reports_mean_and_spread_and_resumes(tmp_path, capsys):
    from mvae_course.compare import compare

    kw = {"level": 1, "fusions": ("poe",), "preset": "tiny", "max_steps": 4, "out": tmp_path, "device": "cpu",
          "n": 16, "progress": False, "judge_steps": 10}
    one = compare(seeds=(0,), **kw)
    both = compare(seeds=(0, 1), **kw)  # seed 0 is reused (run and evaluation), seed 1 added
    assert (tmp_path / "seed0" / "poe" / "last.pt").is_file() and (tmp_path / "seed1" / "poe" / "last.pt").is_file()
    column = "image->text strict, mean z"
    assert both["per_seed"]["poe"][column][0] == one["rows"][0][column]
    assert both["rows"][0][column] == pytest.approx(sum(both["per_seed"]["poe"][column]) / 2)
    assert "sd" in both and "seeds 0, 1 (mean)" in both["title"]
    assert "±" in (tmp_path / "compare.md").read_text()


def test_comparison_plot_draws_intervals_and_chance():
    from mvae_course.plots import plot_comparison

    rows = [{"fusion": "moe", "strict": 0.6, "BLEU-4": 40.0}, {"fusion": "mopoe", "strict": 0.8, "BLEU-4": 50.0}]
    fig = plot_comparison(rows, intervals={"moe": {"strict": [0.5, 0.7]}, "mopoe": {"strict": [0.75, 0.9]}},
                          chance={"strict": 1 / 240})
    from matplotlib.container import ErrorbarContainer

    strict, bleu = fig.axes[0], fig.axes[1]
    (errorbars,) = [c for c in strict.containers if isinstance(c, ErrorbarContainer)]
    segments = errorbars.lines[2][0].get_segments()  # one vertical segment per bar: (x, lo) to (x, hi)
    assert [(round(a[1], 3), round(b[1], 3)) for a, b in segments] == [(0.5, 0.7), (0.75, 0.9)]
    (chance,) = [line for line in strict.lines if line.get_linestyle() == "--"]
    assert chance.get_ydata()[0] == pytest.approx(1 / 240)
    assert not [c for c in bleu.containers if isinstance(c, ErrorbarContainer)]
    assert not [line for line in bleu.lines if line.get_linestyle() == "--"]


def test_centroid_accuracy_is_one_for_separate_clusters_and_near_chance_for_mixed_labels():
    torch.manual_seed(0)
    apart = torch.cat([torch.randn(50, 4) + 10, torch.randn(50, 4) - 10])
    labels = ["circle"] * 50 + ["square"] * 50
    assert centroid_accuracy(apart, labels) == 1.0
    mixed = torch.randn(2000, 4)
    shuffled = [("circle", "square", "star", "cross")[i % 4] for i in range(2000)]
    assert 0.2 < centroid_accuracy(mixed, shuffled) < 0.35  # four labels: chance 0.25
    one_wrong = torch.tensor([[0.0], [2.2], [3.0]])  # a's mean 1.1, b's 3: the point at 2.2 is nearer b's
    assert centroid_accuracy(one_wrong, ["a", "a", "b"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="one label per row"):
        centroid_accuracy(apart, labels[:3])


def test_active_units_count_dimensions_whose_posterior_mean_moves_with_x():
    from mvae_course.metrics import active_units

    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 1, generator=g)
    # dim 0 follows x (variance 1), dim 1 barely (variance 1e-4), dim 2 is the same for every x
    mu = torch.cat([x, 0.01 * x, torch.full_like(x, 3.0)], dim=1)
    assert active_units(mu).tolist() == [True, False, False]
    assert active_units(mu, threshold=1e-5).tolist() == [True, True, False]
    with pytest.raises(ValueError, match="N x D"):
        active_units(torch.zeros(1, 3))


def test_sharpness_falls_when_an_image_is_blurred():
    from mvae_course.degrade import gaussian_blur
    from mvae_course.metrics import sharpness

    image = torch.zeros(1, 3, 32, 32)
    image[..., 8:24, 8:24] = 1.0  # a crisp square
    blurred = gaussian_blur(image, 1.0)
    crisp, soft = sharpness(torch.cat([image, blurred]))
    assert soft < 0.5 * crisp
    assert sharpness(torch.full((1, 3, 8, 8), 0.5)).item() == 0.0
