"""Reference runs: the trained models the lessons discuss, shipped with the course in `reference/`.

A lesson that trained its own models for a few hundred steps would show grey blobs; one that trained them
for the full budget would keep a learner waiting. So every model a lesson discusses is trained once, at a
budget that shows the phenomenon, by one command (`mvae-course reference --rebuild`), and shipped:

    reference/<name>/model.safetensors   the weights (float16: half the size; no pickle, so safe to load)
    reference/<name>/config.json         the config that trained it (rebuilds the model)
    reference/<name>/tokenizer.json      its compact vocabulary
    reference/<name>/metrics.csv         its training log
    reference/<name>/metrics_val.json    `evaluate_run` on the validation split, of the shipped weights
    reference/<name>/metrics_check.json  the same on its first 64 images with k = 4 (what a test repeats)
    reference/<name>/manifest.json       command, commit, seed, machine, wall and CPU time, files' sha256
    reference/judges/                    the attribute judge that scored them (`judge.JUDGES`)

Whoever changes a model, a preset or the data generator rebuilds them in the same change
(`mvae-course reference --rebuild --force`); whoever changes the evaluation or the judge re-evaluates the
shipped weights (`mvae-course reference --reevaluate`): no training.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mvae_course.atomic import FileLock
from mvae_course.checkpoint import load_checkpoint
from mvae_course.config import Config, preset
from mvae_course.data.prepare import prepare_data
from mvae_course.data.shapes import attributes_at_level
from mvae_course.data.text import CaptionTokenizer
from mvae_course.device import cpu_name
from mvae_course.evaluate import evaluate_run
from mvae_course.judge import JUDGES, STEPS, judge_file, judge_key, saved_judge
from mvae_course.models.mvae import MultimodalVAE
from mvae_course.runs import WEIGHTS, export_weights, load_model, train_or_load

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "reference"
FILES = ("model.safetensors", "config.json", "tokenizer.json", "metrics.csv", "metrics_val.json",
         "metrics_check.json")
CHECK = {"n": 64, "k": 4}  # metrics_check.json: a small evaluation a test can repeat in a second
SMOKE_JUDGE_STEPS = 100  # the judge of a smoke build's tiny data: seconds, not a minute


@dataclass(frozen=True)
class ReferenceRun:
    """One shipped run: its name, the lesson that discusses it, and how its config differs from the preset.

    `changes` maps the lesson preset (`cpu`, or `tiny` in smoke mode) to this run's config, so a smoke
    run trains the same kind of model, only smaller.
    """

    name: str
    lesson: str
    about: str
    changes: Callable[[Config], Config]

    def config(self, smoke: bool = False) -> Config:
        """The config this run trains with (`smoke`: the same changes applied to the `tiny` preset)."""
        return self.changes(preset("tiny" if smoke else "cpu"))

    @property
    def path(self) -> Path:
        """Where the course ships it: reference/<name>."""
        return REFERENCE / self.name


def _change(model: dict[str, Any] | None = None, train: Callable[[Config], dict[str, Any]] | None = None,
            ) -> Callable[[Config], Config]:
    """A run's changes: model fields as given, training fields computed from the preset (e.g. a warm-up
    that is a fraction of its budget, so the smoke version keeps the same shape)."""
    return lambda config: config.replace(model=model or {}, train=train(config) if train else {})


def _budget(steps: int, warmup_share: float) -> Callable[[Config], dict[str, Any]]:
    """At most `steps` optimiser steps, the KL warm-up over the first `warmup_share` of them."""
    def train(config: Config) -> dict[str, Any]:
        n = min(steps, config.train.max_steps)
        return {"max_steps": n, "kl_warmup_steps": int(n * warmup_share), "eval_every": n // 4,
                "ckpt_every": n // 4}
    return train


def _warmup(share: float) -> Callable[[Config], dict[str, Any]]:
    return lambda config: {"kl_warmup_steps": int(config.train.max_steps * share)}


# Lesson 02's likelihood comparison: small networks (the tiny preset's) on the lesson's data, a short budget.
_SMALL = {"fusion": "independent", "image_channels": [8, 16, 32], "z_dim": 16, "emb_dim": 32,
          "enc_hidden": 32, "dec_hidden": 64}
# Lesson 03's caption VAEs train the plain ELBO (text_weight 1): with the cpu preset's 10, the caption
# likelihood outweighs the KL and no remedy is needed, which is not what the lesson is about.
_CAPTION = {"fusion": "independent", "text_weight": 1.0}

RUNS: tuple[ReferenceRun, ...] = (
    *(ReferenceRun(f"likelihood-{name.replace('_', '-')}", "02_image_vae",
                   f"an image VAE with the {name.replace('_', ' ')} likelihood (small networks, 1500 steps)",
                   _change({**_SMALL, "image_likelihood": name}, _budget(1500, 0.2)))
      for name in ("gaussian", "bernoulli", "continuous_bernoulli")),
    ReferenceRun("caption-no-remedy", "03_text_vae", "a caption VAE on the plain ELBO, no KL warm-up",
                 _change(_CAPTION, _warmup(0.0))),
    ReferenceRun("caption-kl-warmup", "03_text_vae", "the same, the KL weight warmed up over half the run",
                 _change(_CAPTION, _warmup(0.5))),
    ReferenceRun("caption-kl-warmup-word-dropout", "03_text_vae",
                 "the same, with KL warm-up and word dropout 0.5",
                 _change({**_CAPTION, "word_dropout": 0.5}, _warmup(0.5))),
    ReferenceRun("independent", "04_fusion",
                 "two separate VAEs: the baseline that cannot translate (and lesson 02's image VAE)",
                 _change({"fusion": "independent"})),
    ReferenceRun("poe", "04_fusion", "product of experts with the MVAE's sub-sampled objective",
                 _change({"fusion": "poe"})),
    ReferenceRun("moe", "04_fusion", "mixture of experts (MMVAE), stratified", _change({"fusion": "moe"})),
    ReferenceRun("mopoe", "04_fusion", "mixture of products of experts (MoPoE)",
                 _change({"fusion": "mopoe"})),
    ReferenceRun("mmvaeplus", "05_failure_modes",
                 "MMVAE+: a mixture over a shared z, a private latent per modality",
                 _change({"fusion": "mmvaeplus"})),
    # Sweeps around the cpu preset (text_weight 10: `mopoe`; beta 1: `independent`), three and four points:
    # each point costs about 9 CPU minutes to build.
    *(ReferenceRun(f"mopoe-text-weight-{w:g}", "05_failure_modes", f"MoPoE with text_weight {w:g}",
                   _change({"fusion": "mopoe", "text_weight": w})) for w in (1.0, 30.0)),
    *(ReferenceRun(f"beta-{b:g}", "05_failure_modes", f"two separate VAEs, the KL weighted by beta = {b:g}",
                   _change({"fusion": "independent"}, lambda config, b=b: {"beta": b}))
      for b in (0.25, 0.5, 4.0)),
)


def reference_run(name: str) -> ReferenceRun:
    """The reference run called `name`; a clear error naming the known ones."""
    for run in RUNS:
        if run.name == name:
            return run
    raise KeyError(f"no reference run {name!r}; the course ships {', '.join(r.name for r in RUNS)}")


# --- loading -----------------------------------------------------------------------------------------


@dataclass
class Reference:
    """A loaded reference run: the model (eval mode), its tokenizer and config, and what was recorded."""

    run: ReferenceRun
    folder: Path
    model: MultimodalVAE
    tokenizer: CaptionTokenizer
    config: Config
    evaluation: dict[str, Any]
    manifest: dict[str, Any]

    @property
    def metrics_csv(self) -> Path:
        """The run's training log (rows per logged step, as `metrics_log.read_metrics` reads them)."""
        return self.folder / "metrics.csv"


def load_reference(run: str | ReferenceRun, device: str | torch.device = "cpu",
                   root: str | Path = REFERENCE) -> Reference:
    """Load a reference run from `root/<name>` (the shipped one by default): safetensors, no pickle."""
    run = reference_run(run) if isinstance(run, str) else run
    folder = Path(root) / run.name
    if not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(
            f"reference run {run.name!r} is not in {folder}; build it with "
            f"`mvae-course reference --rebuild {run.name}`"
        )
    model, tokenizer, config = load_model(folder, device)
    evaluation = json.loads((folder / "metrics_val.json").read_text())
    manifest = json.loads((folder / "manifest.json").read_text())
    return Reference(run, folder, model, tokenizer, config, evaluation, manifest)


def training_minutes(manifest: dict[str, Any]) -> float | None:
    """The CPU minutes a manifest records for the run's training, or None where they were not measured (a run
    exported from a training that had already finished). A resumed build counts from `resumed_at_step`."""
    if manifest.get("resumed_at_step", 0) >= manifest["steps"]:
        return None
    return manifest["cpu_s"] / 60


def training_cost(manifest: dict[str, Any]) -> str:
    """What a run's training cost, as a lesson prints it: "8.7 CPU min", "5.1 CPU min from step 546, where it
    resumed" or "not recorded"."""
    minutes, resumed = training_minutes(manifest), manifest.get("resumed_at_step", 0)
    if minutes is None:
        return "not recorded"
    return f"{minutes:.1f} CPU min" + (f" from step {resumed}, where it resumed" if resumed else "")


def total_training_cost(manifests: dict[str, dict[str, Any]]) -> str:
    """The CPU time several runs' training cost together ({name: manifest}), with the runs whose count is
    partial (resumed) or missing named: "32 CPU min in all (mmvaeplus's not recorded)"."""
    minutes = {name: training_minutes(m) for name, m in manifests.items()}
    total = sum(m for m in minutes.values() if m is not None)
    caveats = [f"{name}'s not recorded" for name, m in minutes.items() if m is None]
    caveats += [f"{name}'s counted from step {m['resumed_at_step']}, where it resumed"
                for name, m in manifests.items() if minutes[name] is not None and m.get("resumed_at_step", 0)]
    return f"{total:.0f} CPU min in all" + (f" ({'; '.join(caveats)})" if caveats else "")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify(run: str | ReferenceRun, root: str | Path = REFERENCE) -> list[str]:
    """What is wrong with a run's files in `root/<name>` against its manifest (missing, or a hash that
    differs); an empty list when all is well."""
    folder = Path(root) / (run if isinstance(run, str) else run.name)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return [f"{manifest_path} is missing"]
    manifest = json.loads(manifest_path.read_text())
    recorded = dict(manifest["files"])
    if "judge" in manifest:  # the judge that scored it, beside the runs
        recorded[manifest["judge"]["file"]] = manifest["judge"]["sha256"]
    problems = [f"{folder / f} is missing" for f in dict.fromkeys([*FILES, *recorded]) if not (folder / f).is_file()]
    problems += [f"{folder / f}: sha256 differs from the manifest" for f, digest in recorded.items()
                 if (folder / f).is_file() and sha256(folder / f) != digest]
    return problems


# --- building ----------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What trained a run: CPU model, cores, torch version, whether CUDA was used."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "python": platform.python_version()}


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}{'+changes' if dirty else ''}"


def _shown(path: Path) -> str:
    """A path as the course shows it: relative to the repository when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rebuild(names: Sequence[str | ReferenceRun] | None = None, into: str | Path = REFERENCE,
            work_dir: str | Path | None = None, data_dir: str | Path | None = None, force: bool = False,
            progress: bool = True, smoke: bool = False) -> list[Path]:
    """Train, export, evaluate and record each reference run (all of them by default) into `into/<name>`.

    Returns the folders written. Resumable at two levels: a run already there (its manifest's files all
    present and matching) is skipped unless `force`, and an interrupted training resumes from its
    checkpoint in `work_dir/<name>` (default `runs/reference/`). Data and caches go under `data_dir`
    (default `data/`). A lesson's `retrain=True` runs this same code into `runs/retrained/`; `smoke`
    trains each run's tiny-preset version (seconds: for tests of this pipeline).
    """
    runs = [reference_run(n) if isinstance(n, str) else n for n in names] if names else list(RUNS)
    into = Path(into)
    work_dir = Path(work_dir) if work_dir is not None else ROOT / "runs" / "reference"
    data_dir = Path(data_dir) if data_dir is not None else ROOT / "data"
    written = []
    bar = tqdm(runs, desc="reference runs", unit="run", disable=not progress)
    into.mkdir(parents=True, exist_ok=True)
    for run in bar:
        bar.set_postfix_str(run.name)
        # Two lessons retraining one run at once take turns: the second finds it up to date.
        with FileLock.beside(into / run.name, f"building the reference run {run.name}"):
            if not force and not verify(run, into):
                tqdm.write(f"{run.name}: up to date ({into / run.name}); --force rebuilds it")
                written.append(into / run.name)
                continue
            build = work_dir / run.name
            if force and build.exists():
                shutil.rmtree(build)
            # The cost is what this call spent: a run resumed from step N cost more than that, and says so.
            resumed = load_checkpoint(build / "last.pt")["step"] if (build / "last.pt").is_file() else 0
            wall, cpu = time.perf_counter(), _cpu_seconds()
            result = train_or_load(run.config(smoke), build, data_dir=data_dir, progress=progress)
            wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
            cost = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "steps": result.step,
                    "resumed_at_step": resumed}
            written.append(_ship(run, result.model, result.tokenizer, result.config, build, into / run.name,
                                 data_dir, cost, SMOKE_JUDGE_STEPS if smoke else STEPS))
    return written


def _ship(run: ReferenceRun, model: MultimodalVAE, tokenizer: CaptionTokenizer, config: Config, build: Path,
          out: Path, data_dir: Path, cost: dict[str, Any], judge_steps: int = STEPS) -> Path:
    """Export one trained run into `out`: weights, config, tokenizer, log, evaluation, manifest."""
    tmp = out.with_name(f".{out.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    export_weights(model, tokenizer, config, tmp)
    shutil.copy(build / "metrics.csv", tmp / "metrics.csv")
    manifest = {
        "name": run.name, "lesson": run.lesson, "about": run.about,
        "command": f"mvae-course reference --rebuild {run.name}",
        "commit": _commit(), "seed": config.train.seed, "preset": config.name, "fusion": config.model.fusion,
        "machine": machine(), **cost, "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    return _evaluate_into(tmp, out, data_dir, manifest, judge_steps)


def _evaluate_into(tmp: Path, out: Path, data_dir: Path, manifest: dict[str, Any], judge_steps: int) -> Path:
    """Evaluate the exported run in `tmp` (metrics_check.json, metrics_val.json), keep the judge that scored
    it beside the runs (`out.parent/judges/`), write the manifest with every file's sha256, and move `tmp`
    into place as `out`."""
    for name, subset in (("metrics_check.json", CHECK), ("metrics_val.json", {})):
        evaluate_run(tmp, "val", device="cpu", data_dir=data_dir, figures=False, verbose=False,
                     classifier_steps=judge_steps, **subset)
        evaluation = json.loads((tmp / "metrics_val.json").read_text())
        evaluation["run"] = _shown(out)  # not the temporary folder it was evaluated in
        (tmp / "metrics_val.json").unlink()
        (tmp / name).write_text(json.dumps(evaluation, indent=2) + "\n")
    manifest["files"] = {f: sha256(tmp / f) for f in FILES}
    judge = _keep_judge(tmp, data_dir, out.parent / JUDGES.name, judge_steps)
    if judge is not None:  # its path from the run's folder
        manifest["judge"] = {"file": f"../{judge.parent.name}/{judge.name}", "sha256": sha256(judge),
                             "steps": judge_steps}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _keep_judge(run: Path, data_dir: Path, judges: Path, steps: int) -> Path | None:
    """Copy the attribute judge that evaluated `run` (shipped in `JUDGES`, or trained into the data's cache)
    into `judges/`, and return its path there; None for a data set without one (COCO)."""
    _, tokenizer, config = load_model(run, "cpu")
    if config.data.dataset != "shapes":
        return None
    _, train_cache, _ = prepare_data(config, data_dir, tokenizer)
    key = judge_key(train_cache, attributes_at_level(config.data.level), steps)
    found = saved_judge(key, data_dir / "cache")  # where evaluate_run read it from
    if found is None:
        raise FileNotFoundError(f"the judge that evaluated {run} is neither in {JUDGES} nor in {data_dir / 'cache'}")
    source, kept = found[1], judges / judge_file(key)
    if source.resolve() != kept.resolve():
        judges.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, kept)
    return kept


def reevaluate(names: Sequence[str | ReferenceRun] | None = None, root: str | Path = REFERENCE,
               data_dir: str | Path | None = None, progress: bool = True) -> list[Path]:
    """Evaluate the shipped weights of each reference run (all by default) again, with the evaluation and
    judge of this checkout, and record it: no training. For a change to the evaluation or the judge; the
    manifest keeps its training record and notes when and at which commit it was evaluated."""
    runs = [reference_run(n) if isinstance(n, str) else n for n in names] if names else list(RUNS)
    root = Path(root)
    data_dir = Path(data_dir) if data_dir is not None else ROOT / "data"
    written = []
    for run in tqdm(runs, desc="re-evaluating", unit="run", disable=not progress):
        out = root / run.name
        if not (out / "manifest.json").is_file():
            raise FileNotFoundError(f"reference run {run.name!r} is not in {out}: nothing to re-evaluate; build it "
                                    f"with `mvae-course reference --rebuild {run.name}`")
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["evaluated"] = {"commit": _commit(), "created": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        tmp = out.with_name(f".{out.name}.evaluating")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(out, tmp)
        written.append(_evaluate_into(tmp, out, data_dir, manifest, manifest.get("judge", {}).get("steps", STEPS)))
    return written
