"""The fusion comparison: every fusion trained with the same budget and seed, evaluated, tabulated.

Taught in notebooks/07_evaluation.ipynb.

`compare(...)` trains one run per fusion under `out/<fusion>` (a finished run is reused, an
interrupted one resumed), evaluates each with `evaluate_run`, and writes one table as
`out/compare.md`, `out/compare.csv` and `out/compare.json`, and a bar plot `out/compare.png`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mvae_course import plots
from mvae_course.config import FUSIONS, Config
from mvae_course.config import preset as load_preset
from mvae_course.evaluate import evaluate_run, flatten
from mvae_course.train import train

# The table's columns: (name in the table, key of the flattened metrics). Missing ones are left out.
SHAPES_COLUMNS = (
    ("coherence image->text", "coherence/image_to_text/strict"),
    ("coherence text->image", "coherence/text_to_image/strict"),
    ("coherence joint", "coherence/joint/strict"),
    ("R@1 image->text", "retrieval/image_to_text/R@1"),
    ("R@1 text->image", "retrieval/text_to_image/R@1"),
    ("BLEU-4", "caption_metrics/bleu4"),
    ("log p(image)", "log_likelihood/log_p_image"),
    ("log p(text)", "log_likelihood/log_p_text"),
    ("log p(image, text)", "log_likelihood/log_p_joint"),
)
COCO_COLUMNS = (
    ("R@1 image->text", "retrieval/image_to_text/R@1"),
    ("R@5 image->text", "retrieval/image_to_text/R@5"),
    ("R@1 text->image", "retrieval/text_to_image/R@1"),
    ("R@5 text->image", "retrieval/text_to_image/R@5"),
    ("BLEU-4", "caption_metrics/bleu4"),
    ("semantic similarity", "caption_metrics/semantic_similarity"),
    ("log p(image)", "log_likelihood/log_p_image"),
    ("text bits/token", "log_likelihood/text_bits_per_token"),
    ("log p(image, text)", "log_likelihood/log_p_joint"),
)


def comparison_config(data: str = "shapes", level: int = 4, fusion: str = "poe", preset_name: str = "cpu",
                      max_steps: int | None = None, seed: int = 0, root: str | Path | None = None) -> Config:
    """The config of one fusion's run: a preset with the data, fusion, budget and seed set."""
    cfg = load_preset(preset_name)
    data_opts: dict[str, Any] = {"dataset": data}
    if data == "shapes":
        data_opts.update(level=level, train_split="train", val_split="val")
    elif data == "coco":
        if root is None and cfg.data.root is None:
            raise ValueError("compare on COCO needs root=<a COCO 2017 folder> (--root DIR)")
        if cfg.data.dataset != "coco":
            data_opts.update(train_split="train2017", val_split="val2017")
    else:
        raise ValueError(f"data must be 'shapes' or 'coco', got {data!r}")
    if root is not None:
        data_opts["root"] = str(root)
    train_opts: dict[str, Any] = {"seed": seed}
    if max_steps is not None:
        train_opts.update(max_steps=max_steps, epochs=None)
    return cfg.replace(data=data_opts, model={"fusion": fusion}, train=train_opts)


def comparison_table(results: dict[str, dict[str, Any]], dataset: str) -> list[dict[str, Any]]:
    """One row per fusion: {"fusion", then the headline metrics} from each run's `evaluate_run` output.

    Taught in notebooks/07_evaluation.ipynb.
    """
    columns = SHAPES_COLUMNS if dataset == "shapes" else COCO_COLUMNS
    rows = []
    for fusion, metrics in results.items():
        flat = flatten(metrics)
        rows.append({"fusion": fusion, **{name: flat[key] for name, key in columns if key in flat}})
    return rows


def _cell(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def to_markdown(rows: Sequence[dict[str, Any]], title: str) -> str:
    """The table in Markdown, numbers to 3 decimals."""
    header = list(rows[0])
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(row.get(h, "")) for h in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def compare(data: str = "shapes", level: int = 4, fusions: Sequence[str] = FUSIONS, preset: str = "cpu",
            max_steps: int | None = None, seed: int = 0, out: str | Path = "runs/compare",
            data_dir: str | Path | None = None, root: str | Path | None = None, device: str | None = None,
            n: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Train every fusion with the same preset, budget and seed; evaluate each; save and print one table.

    Writes `out/<fusion>/` (the runs), `out/compare.{md,csv,json,png}`; returns the table's rows.
    `data_dir` holds the data and caches all runs share (default `out/data`); `n` limits evaluation to
    the first n validation images. Taught in notebooks/07_evaluation.ipynb.
    """
    unknown = [f for f in fusions if f not in FUSIONS]
    if unknown or not fusions:
        raise ValueError(f"fusions must be a non-empty subset of {FUSIONS}, got {list(fusions)}")
    out = Path(out)
    data_dir = Path(data_dir) if data_dir is not None else out / "data"
    results: dict[str, dict[str, Any]] = {}
    for fusion in fusions:
        cfg = comparison_config(data, level, fusion, preset, max_steps, seed, root)
        run_dir = out / fusion
        print(f"== {fusion}: training {run_dir} ==")
        train(cfg, run_dir, resume=True, device=device, progress=progress, data_dir=data_dir)
        results[fusion] = evaluate_run(run_dir, "val", device=device, n=n, data_dir=data_dir, verbose=False)

    rows = comparison_table(results, data)
    steps = cfg.train.max_steps if cfg.train.max_steps is not None else f"{cfg.train.epochs} epochs"
    where = f"level {level}" if data == "shapes" else "COCO"
    title = f"Fusion comparison: {data} {where}, preset {preset}, {steps} steps, seed {seed}"
    markdown = to_markdown(rows, title)
    (out / "compare.md").write_text(markdown)
    with (out / "compare.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "compare.json").write_text(json.dumps({"title": title, "rows": rows, "runs": results}, indent=2) + "\n")
    plots.save_figure(plots.plot_comparison(rows, title=title), out / "compare.png")
    print(markdown)
    print(f"wrote {out / 'compare.md'}, compare.csv, compare.json, compare.png")
    return rows
