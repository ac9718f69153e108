"""Small helpers every lesson shares: where data and runs live, the lesson's config, tables.

Taught in notebooks/00_setup.ipynb.

Lessons run in two modes. The default suits a laptop CPU (a few minutes per lesson); `smoke=True`
(what the tests run, `MVAE_SMOKE=1`) shrinks everything to seconds and keeps its files under
`build/smoke/`, apart from the real ones, so that a second smoke run reuses them instead of training again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mvae_course.config import Config, preset
from mvae_course.runs import train_or_load
from mvae_course.train import TrainResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]  # the repository (the package is installed editable)


def data_dir(smoke: bool) -> Path:
    """Where lessons generate the built-in data and its caches: `data/`, or `build/smoke/data/` in smoke mode.

    Taught in notebooks/00_setup.ipynb.
    """
    return ROOT / "build" / "smoke" / "data" if smoke else ROOT / "data"


def runs_dir(smoke: bool) -> Path:
    """Where lessons save trained runs (checkpoints, metrics): `runs/`, or `build/smoke/runs/` in smoke mode.

    Taught in notebooks/02_image_vae.ipynb.
    """
    return ROOT / "build" / "smoke" / "runs" if smoke else ROOT / "runs"


def coco_mini_path() -> Path:
    """Where the real COCO sample is looked for: `$MVAE_COCO_MINI`, else `../shared/data/coco-mini`."""
    return Path(os.environ.get("MVAE_COCO_MINI", ROOT.parent / "shared" / "data" / "coco-mini"))


def coco_mini() -> Path | None:
    """The real COCO sample (`coco_mini_path()`); None when absent.

    Taught in notebooks/00_setup.ipynb.
    """
    path = coco_mini_path()
    return path if (path / "annotations").is_dir() else None


def relative(path: str | Path) -> str:
    """A path as seen from the repository (`data/shapes-...`, `../shared/data/coco-mini`): what lessons print.

    Taught in notebooks/00_setup.ipynb.
    """
    return os.path.relpath(Path(path).resolve(), ROOT)


def lesson_config(
    smoke: bool, max_steps: int | None = None, seed: int | None = None, device: str | None = None
) -> Config:
    """The `tiny` preset in smoke mode, else `cpu`, with the lesson's parameters applied where given.

    Taught in notebooks/00_setup.ipynb.
    """
    config = preset("tiny" if smoke else "cpu")
    overrides = {"max_steps": max_steps, "seed": seed, "device": device}
    return config.replace(train={k: v for k, v in overrides.items() if v is not None})


def trained(config: Config, out: str | Path, smoke: bool) -> TrainResult:
    """A lesson's model: "load if present, else train" into `out`, with one line saying which and how long.

    Taught in notebooks/02_image_vae.ipynb. A finished run loads, an interrupted one resumes, a new one
    trains; the data and caches go under `data_dir(smoke)`. The model comes back in eval mode.
    """
    result = train_or_load(config, out, data_dir=data_dir(smoke))
    print(f"{relative(out)}: {result.step} steps, ready in {result.seconds:.0f} s")
    result.model.eval()
    return result


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts as a Markdown table (show it with `IPython.display.Markdown`); floats to 4 digits.

    Taught in notebooks/00_setup.ipynb.
    """
    if not rows:
        raise ValueError("markdown_table needs at least one row")
    columns = list(columns or rows[0])

    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def show_jpeg(fig: Figure, quality: int = 85) -> None:
    """Display a figure of photographs as JPEG (a fraction of a PNG's size in a saved notebook); close it.

    Taught in notebooks/00_setup.ipynb.
    """
    import io

    import matplotlib.pyplot as plt
    from IPython.display import Image, display

    buffer = io.BytesIO()
    fig.savefig(buffer, format="jpeg", pil_kwargs={"quality": quality})
    plt.close(fig)
    display(Image(buffer.getvalue(), format="jpeg"))
