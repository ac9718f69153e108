"""Small helpers every lesson shares: where data and runs live, the lesson's models, claims, tables.

Taught in notebooks/00_setup.ipynb.

Lessons run in two modes. The default suits a laptop CPU; `smoke=True` (what the tests run,
`MVAE_SMOKE=1`) shrinks the training a lesson does itself to seconds and keeps its files under
`build/smoke/`, apart from the real ones. In both, the models a lesson discusses are the shipped reference
runs (`lesson_model`), so the figures and the numbers the prose states are the same in CI as on a laptop,
and every such number is checked by `claim`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from mvae_course.config import Config, preset
from mvae_course.data.cache import CaptionCache
from mvae_course.data.prepare import prepare_data
from mvae_course.device import machine_description
from mvae_course.reference import REFERENCE, Reference, load_reference, rebuild, reference_run, training_cost
from mvae_course.runs import train_or_load
from mvae_course.train import TrainResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]  # the repository (the package is installed editable)


def run_time(smoke: bool) -> str:
    """What this run of a lesson took, beside the "Time" line of its first cell: the CPU and wall seconds of
    the kernel since it started, the mode and the machine, in one sentence.

    Taught in notebooks/00_setup.ipynb.
    """
    cpu, wall = time.process_time(), time.time() - psutil.Process().create_time()
    return (f"This run took {cpu:.0f} s of CPU time and {wall:.0f} s of wall time (the kernel's, since it "
            f"started), {'in smoke mode' if smoke else 'with the defaults'}, on {machine_description()}.")


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


_SMOKE_TRAINED: set[str] = set()  # the fusions a smoke-mode lesson has trained a tiny model of, in this kernel


def lesson_model(name: str, smoke: bool, retrain: bool = False) -> Reference:
    """A model the lesson discusses: the shipped reference run `name`, or, with `retrain`, the same run
    trained here (into `runs/retrained/`, with progress; resumed if interrupted).

    Taught in notebooks/00_setup.ipynb. In smoke mode the same kind of model is also trained small (the
    tiny preset, seconds; once per fusion in a kernel, as runs of one fusion share their code), so CI runs
    the training code, but what is returned, and so every figure and claim, is the reference run. One line
    says which model it is, what it cost, and how to retrain it.
    """
    run = reference_run(name)
    tiny = run.config(smoke=True)
    if smoke and tiny.model.fusion in _SMOKE_TRAINED:
        print(f"smoke: the tiny {tiny.model.fusion} trained above exercises {name}'s code; the figures use the "
              "reference run")
    elif smoke:
        small = train_or_load(tiny, runs_dir(True) / "lessons" / name, data_dir=data_dir(True))
        _SMOKE_TRAINED.add(tiny.model.fusion)
        print(f"smoke: trained a tiny {name} ({small.step} steps, {small.seconds:.0f} s) to exercise the "
              "code; the figures use the reference run")
    elif retrain:
        rebuild([name], into=runs_dir(False) / "retrained", data_dir=data_dir(False))
        loaded = load_reference(name, root=runs_dir(False) / "retrained")
        print(f"{name}: trained here into {relative(loaded.folder)} ({loaded.manifest['steps']} steps, "
              f"{loaded.manifest['cpu_s'] / 60:.1f} CPU min)")
        return loaded
    loaded = load_reference(name, root=REFERENCE)
    m = loaded.manifest
    print(f"{name}: the reference run {relative(loaded.folder)} ({m['steps']} steps on {m['machine']['cpu']}, "
          f"training time {training_cost(m)}); retrain=True, or `mvae-course reference --rebuild {name}`, trains "
          "it here")
    return loaded


def reference_data(reference: Reference, smoke: bool) -> tuple[CaptionCache, CaptionCache]:
    """The training and validation caches of a reference run's data, tokenised with its vocabulary.

    Taught in notebooks/00_setup.ipynb. Generated (the shapes set) and cached under `data_dir(smoke)` once.
    """
    _, train_cache, val_cache = prepare_data(reference.config, data_dir(smoke), reference.tokenizer)
    return train_cache, val_cache


class ClaimError(AssertionError):
    """A lesson's prose says something about an output that the output does not bear out."""


def claim(statement: str, holds: Any, evidence: str = "") -> None:
    """Check a statement the lesson makes about an output, and print it with the numbers behind it.

    Taught in notebooks/00_setup.ipynb. `holds` is the check (a bool, or a one-element tensor); a claim
    that does not hold raises `ClaimError`, so a lesson whose prose its own output contradicts fails in CI.
    """
    shown = f"{statement}  [{evidence}]" if evidence else statement
    if not bool(holds):
        raise ClaimError(f"this lesson's claim does not hold: {shown}")
    print(f"\u2713 {shown}")


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

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]  # names escaped too
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
