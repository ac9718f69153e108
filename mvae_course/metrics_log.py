"""A run's training log: rows of `metrics.csv` (one per logged step and split), mirrored to TensorBoard.

Taught in notebooks/07_coco_training.ipynb (and read back in every lesson that plots a training curve).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


class MetricsLog:
    """Rows of `metrics.csv` (step, epoch, split, loss terms, lr, beta, samples/s), mirrored to TensorBoard.

    On resume, rows logged after the checkpoint's step are dropped (they will be logged again).
    """

    def __init__(self, out_dir: Path, resume_step: int | None = None, enabled: bool = True):
        self.path = out_dir / "metrics.csv"
        self.enabled = enabled
        self.fields: list[str] | None = None
        self.tb = None
        if not enabled:
            return
        rows: list[dict[str, str]] = []
        if resume_step is not None and self.path.exists():
            with self.path.open(newline="") as f:
                reader = csv.DictReader(f)
                self.fields = list(reader.fieldnames) if reader.fieldnames else None
                rows = [row for row in reader if int(row["step"]) <= resume_step]
        self.path.unlink(missing_ok=True)
        if self.fields:
            with self.path.open("w", newline="") as f:
                writer = csv.DictWriter(f, self.fields)
                writer.writeheader()
                writer.writerows(rows)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # TensorBoard is optional: the CSV has everything
            return
        self.tb = SummaryWriter(out_dir / "tensorboard", purge_step=resume_step)

    def log(self, step: int, epoch: int, split: str, terms: dict[str, float], **extra: float) -> None:
        if not self.enabled:
            return
        row = {"step": step, "epoch": epoch, "split": split, **terms, **extra}
        new = self.fields is None
        if new:
            self.fields = ["step", "epoch", "split", *terms, "lr", "beta", "samples_per_s"]
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, self.fields)
            if new:
                writer.writeheader()
            writer.writerow(row)
        if self.tb is not None:
            for name, value in {**terms, **extra}.items():
                self.tb.add_scalar(f"{split}/{name}", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """The rows of a run's `metrics.csv` (numbers as floats, empty cells left out), optionally of one split.

    Taught in notebooks/07_coco_training.ipynb.
    """
    path = Path(run_dir) / "metrics.csv" if Path(run_dir).is_dir() else Path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path} not found; train a run first (it writes metrics.csv)")
    with path.open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if split is None or row["split"] == split]
    return [{k: v if k == "split" else float(v) for k, v in row.items() if v != ""} for row in rows]
