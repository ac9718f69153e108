"""Figures for training curves, samples, cross-modal generation, latent spaces and fusion comparisons.

Taught in notebooks/08_evaluation.ipynb (and used from notebooks/02_image_vae.ipynb onwards).

Every function returns a matplotlib `Figure` with a title, axis labels and, where there are several
series, a legend; none calls `plt.show()`, so the same code works in a notebook and on a headless server.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# No backend is forced: with no display matplotlib falls back to Agg by itself, and notebooks keep inline.
import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from torch import Tensor

from mvae_course.metrics_log import read_metrics

_LOSS_SPLITS = ("train", "val")
_NOT_TERMS = {"epoch", "lr", "beta", "samples_per_s"}  # logged beside the loss terms, not loss terms


def _read_metrics(metrics: str | Path | Mapping[str, Sequence] | Sequence[Mapping[str, Any]]) -> list[dict]:
    """Rows of a metrics log: a CSV path, a list of row dicts, or a column mapping (a DataFrame works)."""
    if isinstance(metrics, (str, Path)):
        return read_metrics(metrics)
    if isinstance(metrics, Mapping) or hasattr(metrics, "to_dict"):
        columns = metrics.to_dict("list") if hasattr(metrics, "to_dict") else metrics
        n = len(next(iter(columns.values()), []))
        return [{k: columns[k][i] for k in columns} for i in range(n)]
    return [dict(row) for row in metrics]


def _number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def plot_loss_terms(metrics: str | Path | Mapping[str, Sequence] | Sequence[Mapping[str, Any]],
                    terms: Sequence[str] | None = None, step_key: str = "step") -> Figure:
    """One panel per named loss term, train and validation curves against the optimiser step.

    `metrics` is the run's `metrics.csv` (or its rows / columns). A term is a column named either
    `train/<term>` and `val/<term>`, or `<term>` with a `split` column saying "train" or "val".
    Taught in notebooks/02_image_vae.ipynb.
    """
    rows = _read_metrics(metrics)
    if not rows:
        raise ValueError("no rows in the metrics log: nothing to plot")
    # (split, term) -> list of (step, value)
    curves: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for row in rows:
        step = _number(row.get(step_key))
        if step is None:
            continue
        for key, raw in row.items():
            value = _number(raw)
            if key in (step_key, "split") or key.rpartition("/")[2] in _NOT_TERMS or value is None:
                continue
            split, _, term = key.partition("/")
            if not term:
                split, term = str(row.get("split", "train")), key
            if split in _LOSS_SPLITS:
                curves.setdefault((split, term), []).append((step, value))
    names = list(terms) if terms is not None else sorted({t for _, t in curves}, key=lambda t: (t != "loss", t))
    if not names:
        raise ValueError(f"no train/val loss columns found among {sorted(rows[0])}")
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.2 * nrows), squeeze=False)
    for ax, term in zip(axes.flat, names):
        for split in _LOSS_SPLITS:
            points = sorted(curves.get((split, term), []))
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if split == "val" else None, markersize=3, label=split)
        ax.set_title(term)
        ax.set_xlabel("step")
        ax.set_ylabel("nats per sample")  # log-likelihoods, KLs, ELBOs and the loss: all in nats
        ax.legend()
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("Loss terms during training")
    fig.tight_layout()
    return fig


def make_grid(images: Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> Tensor:
    """Tile a batch of images into one: rows of `nrow`, `padding` pixels of `pad_value` around each.

    images: B x 3 x H x W. Returns 3 x (rows (H + padding) + padding) x (columns (W + padding) + padding),
    or a lone image as it is: what torchvision's `make_grid` returns (tests/test_plots.py compares them),
    without importing torchvision, which takes seconds, at the start of every lesson.
    """
    B, C, H, W = images.shape
    if B == 1:
        return images[0]
    columns = min(nrow, B)
    rows = math.ceil(B / columns)
    grid = images.new_full((C, rows * (H + padding) + padding, columns * (W + padding) + padding), pad_value)
    for k, image in enumerate(images):
        top, left = padding + (k // columns) * (H + padding), padding + (k % columns) * (W + padding)
        grid[:, top : top + H, left : left + W] = image
    return grid


def image_grid(images: Tensor, nrow: int = 8, title: str = "Images") -> Figure:
    """Show a batch of images (B x 3 x H x W in [0, 1]) as one grid.

    Taught in notebooks/02_image_vae.ipynb.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be B x C x H x W, got shape {tuple(images.shape)}")
    grid = make_grid(images.detach().float().cpu().clamp(0, 1), nrow=nrow)
    rows = math.ceil(images.shape[0] / nrow)
    fig, ax = plt.subplots(figsize=(1.2 * min(nrow, images.shape[0]) + 1, 1.2 * rows + 0.8))
    ax.imshow(grid.permute(1, 2, 0).numpy())
    ax.set_title(title)
    ax.set_xlabel(f"{images.shape[0]} images, {nrow} per row")
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def image_rows(rows: Mapping[str, Tensor], title: str, column_labels: Sequence[str] | None = None) -> Figure:
    """One labelled row of images per entry of `rows` ({label: N x 3 x H x W in [0, 1]}), in one figure.

    Taught in notebooks/02_image_vae.ipynb.

    For images beside their reconstructions, or decodings along a path; `column_labels` name the columns.
    """
    fig, axes = plt.subplots(len(rows), 1, figsize=(12, 1.25 * len(rows) + 0.5), squeeze=False,
                             layout="constrained")
    for ax, (label, images) in zip(axes[:, 0], rows.items()):
        grid = make_grid(images.detach().float().cpu().clamp(0, 1), nrow=images.shape[0])
        ax.imshow(grid.permute(1, 2, 0).numpy())
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if column_labels is not None:
        side = grid.shape[2] / len(column_labels)
        axes[-1, 0].set_xticks([side * (k + 0.5) for k in range(len(column_labels))], column_labels, fontsize=8)
    fig.suptitle(title)
    return fig


def _wrap(caption: str, width: int = 40) -> str:
    return "\n".join(textwrap.wrap(caption, width)) or "(empty)"


def plot_cross_modal(images: Tensor, captions_true: Sequence[str], captions_generated: Sequence[str],
                     generated_images: Tensor, title: str = "Cross-modal generation") -> Figure:
    """Inputs beside outputs: each row shows an image, its caption, the caption generated from the image,
    and the image generated from the caption.

    images, generated_images: B x 3 x H x W in [0, 1]. Taught in notebooks/08_evaluation.ipynb.
    """
    b = images.shape[0]
    if not (len(captions_true) == len(captions_generated) == generated_images.shape[0] == b):
        raise ValueError(
            f"plot_cross_modal needs as many of each input: {b} images, {len(captions_true)} captions, "
            f"{len(captions_generated)} generated captions, {generated_images.shape[0]} generated images"
        )
    fig, axes = plt.subplots(b, 3, figsize=(9, 1.6 * b + 0.6), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2.2, 1]})
    headers = ("input image", "caption: true (black) / generated from image (blue)", "image generated from caption")
    for i in range(b):
        ax_in, ax_text, ax_out = axes[i]
        ax_in.imshow(images[i].detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy())
        ax_out.imshow(generated_images[i].detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy())
        ax_text.text(0.0, 0.7, "true: " + _wrap(captions_true[i]), fontsize=8, va="center")
        ax_text.text(0.0, 0.25, "gen:  " + _wrap(captions_generated[i]), fontsize=8, va="center", color="C0")
        for ax in (ax_in, ax_text, ax_out):
            ax.set_xticks([])
            ax.set_yticks([])
        ax_text.set_frame_on(False)
    for ax, header in zip(axes[0], headers):
        ax.set_title(header, fontsize=9)
    for ax, header in zip(axes[-1], ("image -> text", "", "text -> image")):
        ax.set_xlabel(header, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _comparison_columns(table: Mapping[str, Mapping[str, float]] | Sequence[Mapping[str, Any]],
                        ) -> tuple[list[str], dict[str, dict[str, float]]]:
    """(row names, {row: {metric: value}}) from {row: {metric: value}} or a list of dicts with a `fusion`."""
    if isinstance(table, Mapping):
        return list(table), {str(k): dict(v) for k, v in table.items()}
    rows = {}
    for row in table:
        row = dict(row)
        name = str(row.pop("fusion", row.pop("name", len(rows))))
        rows[name] = row
    return list(rows), rows


def plot_comparison(table: Mapping[str, Mapping[str, float]] | Sequence[Mapping[str, Any]],
                    metrics: Sequence[str] | None = None, title: str = "Fusion comparison",
                    intervals: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
                    chance: Mapping[str, float] | None = None) -> Figure:
    """Bars grouped by metric: one panel per metric (each on its own scale, since a log-likelihood in
    nats and an accuracy in [0, 1] share no axis), one coloured bar per row (e.g. per fusion), values
    written on the bars, one legend.

    `table` is {fusion: {metric: value}} or a list of row dicts with a `fusion` key. `intervals`
    ({fusion: {metric: (lo, hi)}}) are drawn as error bars; `chance` ({metric: value}) as a dashed line.
    Taught in notebooks/08_evaluation.ipynb.
    """
    names, rows = _comparison_columns(table)
    if not names:
        raise ValueError("plot_comparison needs at least one row")
    if metrics is None:
        metrics = [m for m in rows[names[0]] if all(_number(rows[n].get(m)) is not None for n in names)]
    if not metrics:
        raise ValueError("no numeric metric is shared by every row of the table")
    ncols = min(4, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows + 0.8), squeeze=False)
    colours = [f"C{i}" for i in range(len(names))]
    for ax, metric in zip(axes.flat, metrics):
        values = [_number(rows[n].get(metric)) or 0.0 for n in names]
        bounds = [(intervals or {}).get(n, {}).get(metric) for n in names]
        yerr = None
        if any(b is not None for b in bounds):  # below and above each bar; none where a row has no interval
            yerr = [[max(0.0, v - b[0]) if b else 0.0 for v, b in zip(values, bounds)],
                    [max(0.0, b[1] - v) if b else 0.0 for v, b in zip(values, bounds)]]
        bars = ax.bar(range(len(names)), values, color=colours, label=names, yerr=yerr, capsize=3)
        # At the bar's end (readable on a bar near 0), with the tables' decimals: 0.086, 70.9
        ax.bar_label(bars, fmt=lambda v: f"{v:.3f}" if abs(v) < 1 else f"{v:.1f}", fontsize=7, padding=2)
        if chance and metric in chance:
            ax.axhline(chance[metric], color="grey", linestyle="--", linewidth=1)
            ax.annotate("chance", (0.02, chance[metric]), xycoords=("axes fraction", "data"), fontsize=6,
                        ha="left", va="bottom", color="grey")
        ax.set_title(metric, fontsize=9)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=7, rotation=20)
        ax.set_xlabel("fusion")
        ax.set_ylabel("\n".join(textwrap.wrap(metric, 28)), fontsize=7)
        ax.axhline(0.0, color="black", linewidth=0.5)
        ax.margins(y=0.2)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours]
    fig.legend(handles, names, title="fusion", loc="upper right")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.9, 0.95))
    return fig


def pca_project(z: Tensor, q: int = 2) -> Tensor:
    """Latent means z (N x D), centred and projected on their first q principal components: N x q.

    With `torch.pca_lowrank`. Taught in notebooks/08_evaluation.ipynb.
    """
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"z must be N x D with N >= 2, got shape {tuple(z.shape)}")
    z = z.detach().float().cpu()
    _, _, v = torch.pca_lowrank(z, q=q, center=True)
    return (z - z.mean(0)) @ v[:, :q]


def plot_latent_2d(z: Tensor, labels: Sequence[Any] | None = None, label_name: str = "attribute",
                   title: str = "Latent space (PCA)") -> Figure:
    """Project latent means (N x D) to 2-D with PCA (`torch.pca_lowrank`), one colour per label value.

    Taught in notebooks/08_evaluation.ipynb.
    """
    xy = pca_project(z, min(2, z.shape[-1]))  # N x q
    if xy.shape[1] == 1:
        xy = torch.cat([xy, torch.zeros_like(xy)], dim=1)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=8)
    else:
        if len(labels) != z.shape[0]:
            raise ValueError(f"{len(labels)} labels for {z.shape[0]} latent points")
        for value in sorted({str(l) for l in labels}):
            mask = torch.tensor([str(l) == value for l in labels])
            ax.scatter(xy[mask, 0], xy[mask, 1], s=8, label=value)
        ax.legend(title=label_name, fontsize=7, markerscale=2)
    ax.set_title(title)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write a figure (format from the suffix, e.g. .png or .pdf), creating folders, and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path
