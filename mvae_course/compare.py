"""The fusion comparison: every fusion trained with the same budget and seeds, evaluated, tabulated.

Taught in notebooks/08_evaluation.ipynb.

`compare(...)` trains one run per fusion and seed under `out/seed<seed>/<fusion>` (a finished run is
reused, an interrupted one resumed, an evaluation already saved for the same checkpoint read back), so
the same command picks up where it stopped. It evaluates each with `evaluate_run` and writes one table
as `out/compare.md`, `out/compare.csv` and `out/compare.json`, and a bar plot `out/compare.png`. With
one seed, each figure comes with its bootstrap 95% interval over the validation items; with several,
with the mean, the standard deviation and the range over seeds. The protocol of every column (which z,
which image, which caption) is in its name and in the title.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mvae_course import plots
from mvae_course.config import FUSIONS, Config
from mvae_course.config import preset as load_preset
from mvae_course.evaluate import PROTOCOLS, Protocol, evaluate_run, flatten, intervals
from mvae_course.judge import STEPS as JUDGE_STEPS
from mvae_course.metrics import chance_recall
from mvae_course.train import train

# The table's columns: (name in the table, key of the flattened metrics). Missing ones are left out (the
# seen / unseen columns exist with a holdout only, the new word orders from level 3 up, the pixel sample
# and the sampled caption when those protocols were evaluated).
SHAPES_COLUMNS = (
    ("image->text strict, mean z", "coherence/mean_z/image_to_text/strict"),
    ("image->text strict, sampled z", "coherence/sampled_z/image_to_text/strict"),
    ("text->image strict, mean z", "coherence/mean_z/text_to_image/strict"),
    ("text->image strict, sampled z", "coherence/sampled_z/text_to_image/strict"),
    ("text->image strict, new word orders, sampled z", "coherence/sampled_z/text_to_image_new_orders/strict"),
    ("joint strict, z ~ prior", "coherence/mean_z/joint/strict"),
    ("judges agree, text->image, sampled z", "coherence/sampled_z/judge_agreement/text_to_image"),
    ("text->image strict, sampled z, pixel sample", "coherence/pixel_sample/text_to_image/strict"),
    ("image->text strict, sampled z, sampled caption", "coherence/sampled_caption/image_to_text/strict"),
    ("seen image->text strict, sampled z", "coherence/sampled_z/seen/image_to_text/strict"),
    ("unseen image->text strict, sampled z", "coherence/sampled_z/unseen/image_to_text/strict"),
    ("seen text->image strict, sampled z", "coherence/sampled_z/seen/text_to_image/strict"),
    ("unseen text->image strict, sampled z", "coherence/sampled_z/unseen/text_to_image/strict"),
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
PROTOCOL_NOTE = ("z: the posterior mean or one posterior sample, as each column says; the image is the decoder's "
                 "mean and the caption greedy unless the column says pixel sample or sampled caption; joint: "
                 "z ~ prior; images read by the CNN judge; strict = every attribute right")


def comparison_config(data: str = "shapes", level: int = 4, fusion: str = "poe", preset_name: str = "cpu",
                      max_steps: int | None = None, seed: int = 0, root: str | Path | None = None,
                      holdout: str | None = None) -> Config:
    """The config of one fusion's run: a preset with the data, fusion, budget, seed (and holdout) set."""
    cfg = load_preset(preset_name)
    data_opts: dict[str, Any] = {"dataset": data}
    if data == "shapes":
        data_opts.update(level=level, train_split="train", val_split="val", holdout=holdout)
    elif data == "coco":
        if root is None and cfg.data.root is None:
            raise ValueError("compare on COCO needs root=<a COCO 2017 folder> (--root DIR)")
        if holdout is not None:
            raise ValueError("a holdout of attribute combinations exists for the shapes data only")
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


def _columns(dataset: str) -> tuple[tuple[str, str], ...]:
    return SHAPES_COLUMNS if dataset == "shapes" else COCO_COLUMNS


def comparison_table(results: Mapping[str, Mapping[str, Any]], dataset: str) -> list[dict[str, Any]]:
    """One row per fusion: {"fusion", then the headline metrics} from each run's `evaluate_run` output.

    Taught in notebooks/08_evaluation.ipynb.
    """
    rows = []
    for fusion, metrics in results.items():
        flat = flatten(metrics)
        rows.append({"fusion": fusion, **{name: flat[key] for name, key in _columns(dataset) if key in flat}})
    return rows


def summarise(runs: Mapping[str, Sequence[Mapping[str, Any]]], dataset: str) -> dict[str, Any]:
    """The comparison of fusions over one or more seeds: {fusion: [evaluate_run output per seed]} ->

    - "rows": one per fusion, each column the mean over seeds (one seed: its value);
    - "intervals": {fusion: {column: [lo, hi]}}: with one seed the bootstrap 95% interval over the
      validation items, with several the smallest and largest value over the seeds;
    - "sd": {fusion: {column: standard deviation over seeds}} (several seeds only);
    - "per_seed": {fusion: {column: [value per seed]}}; "interval": what the intervals are, in words.
    """
    rows, bounds, sd, per_seed = [], {}, {}, {}
    for fusion, results in runs.items():
        flats = [flatten(m) for m in results]
        cis = [intervals(f) for f in flats]
        columns = [(name, key) for name, key in _columns(dataset) if all(key in f for f in flats)]
        values = {name: [f[key] for f in flats] for name, key in columns}
        rows.append({"fusion": fusion, **{name: statistics.fmean(v) for name, v in values.items()}})
        per_seed[fusion] = values
        if len(results) == 1:
            bounds[fusion] = {name: cis[0][key] for name, key in columns if key in cis[0]}
        else:
            bounds[fusion] = {name: [min(v), max(v)] for name, v in values.items()}
            sd[fusion] = {name: statistics.stdev(v) for name, v in values.items()}
    several = any(len(r) > 1 for r in runs.values())
    interval = ("the range (min, max) over seeds; +- is the standard deviation over seeds" if several
                else "bootstrap 95% interval over the validation items (one seed)")
    return {"rows": rows, "intervals": bounds, "sd": sd, "per_seed": per_seed, "interval": interval}


def chance_levels(metrics: Mapping[str, Any], dataset: str) -> dict[str, float]:
    """The score of guessing at random for the columns that have one: coherence (uniform attributes) and
    recall@K (a random ranking of one fold's candidates)."""
    flat = flatten(metrics)
    out = {}
    strict = flat.get("coherence/mean_z/chance/strict")
    per_fold = flat.get("retrieval/folds/images_per_fold", metrics.get("images"))
    captions_per_image = metrics["captions"] / metrics["images"]
    for name, key in _columns(dataset):
        if key.startswith("coherence/") and key.endswith("/strict") and strict is not None:
            out[name] = strict
        elif key.startswith("retrieval/"):
            k = int(key.rsplit("@", 1)[1])
            out[name] = (chance_recall(per_fold, 1, k) if "text_to_image" in key else
                         chance_recall(round(per_fold * captions_per_image), round(captions_per_image), k))
    return out


def _cell(value: Any, interval: Sequence[float] | None = None, sd: float | None = None) -> str:
    if not isinstance(value, float):
        return str(value)
    text = f"{value:.3f}"
    if sd is not None:
        text += f" ± {sd:.3f}"
    elif interval is not None:
        text += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    return text


def to_markdown(rows: Sequence[dict[str, Any]], title: str,
                bounds: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
                sd: Mapping[str, Mapping[str, float]] | None = None, note: str | None = None) -> str:
    """The table in Markdown, numbers to 3 decimals; each with its [lo, hi] interval (`bounds`), or with +- its
    standard deviation over seeds when `sd` is given for its row; `note` is printed under the title."""
    header = list(rows[0])
    lines = [f"# {title}", ""] + ([note, ""] if note else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        name = str(row.get("fusion", ""))
        cells = [_cell(row.get(h, ""), (bounds or {}).get(name, {}).get(h), (sd or {}).get(name, {}).get(h))
                 for h in header]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(data: str = "shapes", level: int = 4, fusions: Sequence[str] = FUSIONS, preset: str = "cpu",
            max_steps: int | None = None, seeds: Sequence[int] = (0,), out: str | Path = "runs/compare",
            data_dir: str | Path | None = None, root: str | Path | None = None, device: str | None = None,
            n: int | None = None, progress: bool = True, holdout: str | None = None,
            protocols: Mapping[str, Protocol] = PROTOCOLS, judge_steps: int = JUDGE_STEPS) -> dict[str, Any]:
    """Train every fusion with the same preset, budget and seeds; evaluate each; save and print one table.

    Writes `out/seed<seed>/<fusion>/` (the runs), `out/compare.{md,csv,json,png}`; returns `summarise`'s
    dict (its "rows": one per fusion) with the "title" added. Reruns reuse finished runs and evaluations.
    `data_dir` holds the data and caches all runs share (default `out/data`); `n` limits evaluation to
    the first n validation images; `holdout` (shapes) keeps attribute combinations out of training;
    `protocols` are the coherence protocols each run is evaluated with (`evaluate_run`), `judge_steps`
    the CNN judge's training steps.
    Taught in notebooks/08_evaluation.ipynb.
    """
    unknown = [f for f in fusions if f not in FUSIONS]
    if unknown or not fusions:
        raise ValueError(f"fusions must be a non-empty subset of {FUSIONS}, got {list(fusions)}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {list(seeds)}")
    out = Path(out)
    data_dir = Path(data_dir) if data_dir is not None else out / "data"
    runs: dict[str, list[dict[str, Any]]] = {f: [] for f in fusions}
    for seed in seeds:
        for fusion in fusions:
            cfg = comparison_config(data, level, fusion, preset, max_steps, seed, root, holdout)
            run_dir = out / f"seed{seed}" / fusion
            print(f"== {fusion}, seed {seed}: training {run_dir} ==")
            train(cfg, run_dir, resume=True, device=device, progress=progress, data_dir=data_dir)
            runs[fusion].append(evaluate_run(run_dir, "val", device=device, n=n, data_dir=data_dir, verbose=False,
                                             classifier_steps=judge_steps, protocols=protocols, reuse=True))

    summary = summarise(runs, data)
    steps = cfg.train.max_steps if cfg.train.max_steps is not None else f"{cfg.train.epochs} epochs"
    where = (f"level {level}" + (f", holdout {holdout}" if holdout else "")) if data == "shapes" else "COCO"
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))} (mean)"
    title = f"Fusion comparison: {data} {where}, preset {preset}, {steps} steps, {seed_text}"
    note = (PROTOCOL_NOTE + "; " if data == "shapes" else "") + f"intervals: {summary['interval']}"
    rows = summary["rows"]
    (out / "compare.md").write_text(to_markdown(rows, title, summary["intervals"], summary["sd"], note))
    with (out / "compare.csv").open("w", newline="") as f:
        flat_rows = [row | {f"{c} lo": v[0] for c, v in summary["intervals"][row["fusion"]].items()}
                     | {f"{c} hi": v[1] for c, v in summary["intervals"][row["fusion"]].items()}
                     | {f"{c} sd": v for c, v in summary["sd"].get(row["fusion"], {}).items()} for row in rows]
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in flat_rows for k in r)))
        writer.writeheader()
        writer.writerows(flat_rows)
    protocol = runs[fusions[0]][0].get("protocol", {})
    (out / "compare.json").write_text(json.dumps({"title": title, "note": note, "protocol": protocol, **summary,
                                                  "seeds": list(seeds), "runs": runs}, indent=2) + "\n")
    chance = chance_levels(runs[fusions[0]][0], data)
    plots.save_figure(plots.plot_comparison(rows, title=title, intervals=summary["intervals"], chance=chance),
                      out / "compare.png")
    print(to_markdown(rows, title, summary["intervals"], summary["sd"], note))
    print(f"wrote {out / 'compare.md'}, compare.csv, compare.json, compare.png")
    return summary | {"title": title}
