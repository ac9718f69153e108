"""Figures: each has a title, axis labels and, with several series, a legend."""

import csv

import pytest
import torch

from mvae_course.plots import (
    image_grid,
    make_grid,
    pca_project,
    plot_comparison,
    plot_cross_modal,
    plot_latent_2d,
    plot_loss_terms,
    save_figure,
)


def _labels(fig):
    return [(ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), ax.get_legend()) for ax in fig.axes]


def test_loss_terms_from_csv_one_panel_per_term(tmp_path):
    path = tmp_path / "metrics.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "epoch", "split", "loss", "kl", "rec_image", "lr", "beta"])
        w.writeheader()
        for step in range(0, 50, 10):
            w.writerow({"step": step, "epoch": 0, "split": "train", "loss": 10 - step / 10, "kl": 1.0,
                        "rec_image": 5, "lr": 1e-3, "beta": 0.5})
        w.writerow({"step": 40, "epoch": 0, "split": "val", "loss": 7, "kl": 1.1, "rec_image": 5.5, "lr": 1e-3,
                    "beta": 1})
    fig = plot_loss_terms(path)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["loss", "kl", "rec_image"]
    for ax in fig.axes[:3]:
        assert ax.get_xlabel() == "step" and ax.get_ylabel()
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "val"]
        assert len(ax.lines) == 2
    assert fig._suptitle.get_text()


def test_loss_terms_from_prefixed_columns():
    rows = [{"step": 1, "train/loss": 3.0, "val/loss": ""}, {"step": 2, "train/loss": 2.0, "val/loss": 2.5}]
    fig = plot_loss_terms(rows)
    (ax,) = [a for a in fig.axes if a.get_title()]
    assert ax.get_title() == "loss"
    train, val = ax.lines
    assert list(train.get_ydata()) == [3.0, 2.0] and list(val.get_ydata()) == [2.5]


def test_loss_terms_rejects_empty_log():
    with pytest.raises(ValueError, match="no rows"):
        plot_loss_terms([])


def test_image_grid_and_save(tmp_path):
    fig = image_grid(torch.rand(10, 3, 8, 8), nrow=5, title="Samples")
    (ax,) = fig.axes
    assert ax.get_title() == "Samples" and ax.get_xlabel()
    h, w, _ = ax.images[0].get_array().shape
    assert (h, w) == (2 * 8 + 3 * 2, 5 * 8 + 6 * 2)  # make_grid pads by 2 pixels
    out = save_figure(fig, tmp_path / "sub" / "grid.png")
    assert out.is_file() and out.stat().st_size > 0


def test_cross_modal_rows_and_checks():
    imgs = torch.rand(3, 3, 8, 8)
    fig = plot_cross_modal(imgs, ["a", "b", "c"], ["x", "y", "z"], torch.rand(3, 3, 8, 8))
    assert len(fig.axes) == 9
    assert fig.axes[0].get_title() == "input image" and fig.axes[2].get_title() == "image generated from caption"
    assert fig.axes[-1].get_xlabel() == "text -> image"
    with pytest.raises(ValueError, match="as many"):
        plot_cross_modal(imgs, ["a"], ["x", "y", "z"], imgs)


def test_comparison_one_panel_per_metric():
    table = {"poe": {"coherence": 0.9, "log_p": -120.0}, "independent": {"coherence": 0.2, "log_p": -150.0}}
    fig = plot_comparison(table, title="Fusions")
    assert fig._suptitle.get_text() == "Fusions"
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["coherence", "log_p"]
    for ax in panels:
        assert ax.get_xlabel() == "fusion" and ax.get_ylabel() == ax.get_title()  # the metric names its axis
        assert [t.get_text() for t in ax.get_xticklabels()] == ["poe", "independent"]
    assert [p.get_height() for p in panels[0].patches] == pytest.approx([0.9, 0.2])
    assert [p.get_height() for p in panels[1].patches] == pytest.approx([-120.0, -150.0])
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["poe", "independent"]
    rows = [{"fusion": "moe", "a": 1.0, "note": "x"}, {"fusion": "mopoe", "a": 2.0, "note": "y"}]
    assert [ax.get_title() for ax in plot_comparison(rows).axes if ax.get_title()] == ["a"]


def test_latent_2d_pca_separates_clusters():
    torch.manual_seed(0)
    z = torch.cat([torch.randn(20, 6) + 5, torch.randn(20, 6) - 5])
    labels = ["circle"] * 20 + ["square"] * 20
    fig = plot_latent_2d(z, labels, label_name="shape")
    (ax,) = fig.axes
    assert ax.get_xlabel() == "PC 1" and ax.get_ylabel() == "PC 2" and ax.get_title()
    assert ax.get_legend().get_title().get_text() == "shape"
    a, b = (c.get_offsets()[:, 0] for c in ax.collections)
    assert (a.max() < b.min()) or (b.max() < a.min())  # the first component splits the two clusters
    with pytest.raises(ValueError, match="labels"):
        plot_latent_2d(z, labels[:3])


def test_pca_project_finds_the_direction_of_largest_variance():
    torch.manual_seed(0)
    z = torch.randn(200, 3) * torch.tensor([0.1, 5.0, 1.0]) + 7  # most variance along the second axis
    xy = pca_project(z, 2)
    assert xy.shape == (200, 2)
    assert torch.allclose(xy.mean(0), torch.zeros(2), atol=1e-4)  # centred
    first = xy[:, 0] / xy[:, 0].norm()
    assert abs(first @ (z[:, 1] - z[:, 1].mean()) / (z[:, 1] - z[:, 1].mean()).norm()) > 0.99
    assert xy[:, 0].var() > xy[:, 1].var() > 0.5  # the second component: the third axis, variance about 1
    with pytest.raises(ValueError, match="N x D"):
        pca_project(torch.randn(5))


def test_comparison_bars_are_labelled_with_the_tables_decimals():
    rows = [{"fusion": "poe", "R@1": 0.0856, "BLEU-4": 70.94}, {"fusion": "mopoe", "R@1": 0.374, "BLEU-4": 49.1}]
    fig = plot_comparison(rows)
    labels = [[t.get_text() for t in ax.texts if t.get_text() != "chance"] for ax in fig.axes if ax.get_title()]
    assert labels == [["0.086", "0.374"], ["70.9", "49.1"]]


@pytest.mark.parametrize("batch", [1, 3, 8, 9])
def test_make_grid_tiles_as_torchvision_does(batch):
    from torchvision.utils import make_grid as torchvision_make_grid

    images = torch.rand(batch, 3, 5, 7)
    for nrow in (1, 4, 8):
        theirs = torchvision_make_grid(images, nrow=nrow, pad_value=1.0)
        assert torch.equal(make_grid(images, nrow=nrow), theirs)
