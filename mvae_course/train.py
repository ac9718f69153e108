"""The training loop: one plain PyTorch loop, readable top to bottom.

Taught in notebooks/06_coco_training.ipynb (the loop, checkpoints, multi-GPU) and used from
notebooks/02_image_vae.ipynb on.

`train(config, out_dir)` prepares the data (generating the shapes set when needed), builds the
model, and runs AdamW with gradient clipping, a linear-then-cosine learning-rate schedule and a KL
warm-up. It writes `metrics.csv` (and TensorBoard logs when `tensorboard` is installed), `config.json`,
`tokenizer.json`, `last.pt` and `best.pt` into `out_dir`. `train(..., resume=True)` continues a run
exactly where it stopped; under `torchrun --nproc_per_node N` the same function trains with
DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mvae_course.checkpoint import (
    CheckpointError,
    check_compatible,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mvae_course.config import FUSIONS, Config, preset
from mvae_course.data.cache import (
    CacheLoader,
    CaptionCache,
    ensure_cache,
    load_cache,
    read_captions,
    tokenizer_hash,
)
from mvae_course.data.shapes import ensure_shapes
from mvae_course.data.text import CaptionTokenizer
from mvae_course.models.mvae import MultimodalVAE
from mvae_course.progress import tqdm

SHAPES_SEED = 0  # the synthetic data set does not change with the training seed
VAL_SEED = 1234  # every validation pass draws the same latent noise, so its losses compare


class NonFiniteLossError(RuntimeError):
    """A loss term (or the gradient) became NaN or infinite; training stopped before saving it.

    Taught in notebooks/06_coco_training.ipynb.
    """


# ---------------------------------------------------------------------------------------------
# Small pure pieces: device, seeds, schedules
# ---------------------------------------------------------------------------------------------


def pick_device(name: str | torch.device | None = "auto") -> torch.device:
    """`auto` (or None): CUDA, then Apple's MPS, then CPU; otherwise the device named.

    Taught in notebooks/00_setup.ipynb.
    """
    if name is None or str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but PyTorch sees no CUDA GPU; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} asked for, but MPS is not available; use --device cpu or auto")
    return device


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices). Taught in notebooks/00_setup.ipynb."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def kl_beta(step: int, warmup: int) -> float:
    """KL weight at `step`: rises linearly from 0 to 1 over `warmup` steps, then stays at 1.

    Starting with beta = 0 lets the decoders learn to use z before the KL pulls q(z|x) to the prior
    (a remedy for posterior collapse). Taught in notebooks/03_text_vae.ipynb.
    """
    if warmup <= 0:
        return 1.0
    return min(1.0, step / warmup)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Multiplier of the base learning rate: linear warm-up to 1, then cosine decay to 0 at `total`.

    Taught in notebooks/06_coco_training.ipynb.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def data_root(config: Config, data_dir: str | Path) -> Path:
    """Where the image-caption pairs live: `config.data.root`, or a shapes folder named by its settings.

    Taught in notebooks/02_image_vae.ipynb.
    """
    data = config.data
    if data.root is not None:
        return Path(data.root)
    if data.dataset != "shapes":
        raise ValueError(f"data.root must point to a COCO-style folder for dataset {data.dataset!r}")
    return Path(data_dir) / f"shapes-L{data.level}-n{data.n_train}-{data.n_val}-{data.image_size}px"


def prepare_data(
    config: Config, data_dir: str | Path, tokenizer: CaptionTokenizer | None = None, build: bool = True
) -> tuple[CaptionTokenizer, CaptionCache, CaptionCache]:
    """Generate the shapes set if needed, fit the tokenizer, and build (or reuse) both caches.

    Returns `(tokenizer, train_cache, val_cache)`; a `tokenizer` passed in (from a checkpoint) is kept.
    `build=False` only reads what another process (rank 0 under DDP) has already written.
    Taught in notebooks/05_coco_data.ipynb.
    """
    data = config.data
    if data.dataset not in ("shapes", "coco"):
        raise ValueError(f"data.dataset must be 'shapes' or 'coco', got {data.dataset!r}")
    root = data_root(config, data_dir)
    if data.dataset == "shapes" and build:
        ensure_shapes(root, n_train=data.n_train, n_val=data.n_val, level=data.level, seed=SHAPES_SEED,
                      image_size=data.image_size)
    elif not root.is_dir():
        raise FileNotFoundError(
            f"COCO folder {root} does not exist; download COCO 2017 there or pass --root DIR"
        )
    if tokenizer is None:
        tokenizer = CaptionTokenizer.fit(read_captions(root, data.train_split), min_count=data.min_count)
    caches = []
    for split in (data.train_split, data.val_split):
        # One cache folder per (data, split, size, vocabulary): runs with other tokenizers do not collide.
        name = f"{root.name}-{split}-{data.image_size}px-{tokenizer_hash(tokenizer)[:10]}"
        out = Path(data_dir) / "cache" / name
        if build:
            caches.append(ensure_cache(root, split, out, data.image_size, tokenizer))
        else:
            caches.append(load_cache(out))
    return tokenizer, caches[0], caches[1]


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------


class MetricsLog:
    """Rows of `metrics.csv` (step, epoch, split, loss terms, lr, beta, samples/s), mirrored to TensorBoard.

    On resume, rows logged after the checkpoint's step are dropped (they will be logged again).
    Taught in notebooks/06_coco_training.ipynb.
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


# ---------------------------------------------------------------------------------------------
# Distributed helpers (all no-ops in a single process)
# ---------------------------------------------------------------------------------------------


class LossModule(nn.Module):
    """Wraps the model so that `forward` returns its loss terms: DistributedDataParallel calls `forward`.

    Taught in notebooks/06_coco_training.ipynb.
    """

    def __init__(self, model: MultimodalVAE):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], beta: float) -> dict[str, torch.Tensor]:
        return self.model.loss(batch, beta)


def _init_distributed(device: str | torch.device) -> tuple[int, int, torch.device, bool]:
    """(rank, world_size, device, joined): joins the process group `torchrun` describes in the environment."""
    device = pick_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device, False
    if device.type == "cuda":  # one GPU per process
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device, joined


def _mean_over_ranks(values: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(values)
        values = values / world_size
    return values


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def validate(model: MultimodalVAE, loader: CacheLoader, device: torch.device, world_size: int = 1,
             amp: bool = False) -> dict[str, float]:
    """Mean of every loss term over the validation set, at beta = 1 (the true negative ELBO).

    The latent noise comes from a fixed seed (and the training RNG is left untouched), so two
    validations of the same weights agree. Taught in notebooks/06_coco_training.ipynb.
    """
    was_training = model.training
    model.eval()
    sums: torch.Tensor | None = None
    names: list[str] = []
    count = torch.zeros((), device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(VAL_SEED)
        for batch in loader:
            with _autocast(device, amp):
                terms = model.loss(batch, 1.0)
            n = batch["image"].shape[0]
            values = torch.stack([terms[k].detach().float() for k in terms]) * n
            names = list(terms)
            sums = values if sums is None else sums + values
            count += n
    model.train(was_training)
    if sums is None:
        raise ValueError("the validation split is empty; check data.val_split and the data folder")
    totals = torch.cat([sums, count.view(1)])
    if world_size > 1:
        dist.all_reduce(totals)
    means = totals[:-1] / totals[-1]
    return dict(zip(names, means.tolist()))


def _autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA (no loss scaling needed, unlike fp16); full precision elsewhere."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def _whole_step() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, so an update is applied whole or not at all.

    Without this, an interrupt inside `optimizer.step()` would leave half-updated weights that the
    interrupt handler then saves under the previous step number, and resuming would not be exact.
    """
    handler = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or handler is None:
        yield  # signals can only be handled on the main thread
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
    if received:
        raise KeyboardInterrupt


def _skip(batches: Iterator[Any], n: int) -> None:
    """Advance past the `n` batches a resumed run already trained on in this epoch."""
    for _ in range(n):
        next(batches)


def train(
    config: Config,
    out_dir: str | Path,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    data_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train a multimodal VAE; return the final metrics, the paths written and the trained model.

    - `out_dir` receives `config.json`, `tokenizer.json`, `metrics.csv`, `last.pt`, `best.pt`.
    - `resume=True` continues from `out_dir/last.pt` (or starts afresh when there is none); the result
      is the same, weight for weight, as an uninterrupted run.
    - `device`: overrides `config.train.device` ("auto": CUDA, then MPS, then CPU).
    - `data_dir`: where generated shapes and caches go (default `out_dir/data`).

    Raises `NonFiniteLossError` when a loss term turns NaN/inf (the last good checkpoint stays), and
    `CheckpointError` when resuming from a checkpoint of another config. Ctrl-C saves `last.pt` first.

    Taught in notebooks/06_coco_training.ipynb.
    """
    out_dir = Path(out_dir)
    data_dir = Path(data_dir) if data_dir is not None else out_dir / "data"
    cfg = Config.from_dict(config.to_dict())  # a private copy: vocab_size is filled in below
    tc = cfg.train
    if cfg.model.image_size != cfg.data.image_size:
        raise ValueError(
            f"model.image_size ({cfg.model.image_size}) must equal data.image_size ({cfg.data.image_size})"
        )
    if tc.max_steps is None and tc.epochs is None:
        raise ValueError("set train.max_steps or train.epochs")

    rank, world_size, device, joined = _init_distributed(device if device is not None else tc.device)
    is_main = rank == 0
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"

    # --- checkpoint to resume from (read before the data: it carries the tokenizer) --------------
    ckpt = None
    if last_path.exists():
        if not resume:
            raise FileExistsError(
                f"{out_dir} already holds a run ({last_path}); pass resume=True (--resume) to continue it, "
                "or choose another output folder"
            )
        ckpt = load_checkpoint(last_path)
    tokenizer = CaptionTokenizer(ckpt["tokenizer"]["wordpieces"]) if ckpt else None

    # --- data: rank 0 generates files first, the others then read them ---------------------------
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer, train_cache, val_cache = prepare_data(cfg, data_dir, tokenizer)
    if world_size > 1:
        dist.barrier()
    if not is_main:
        tokenizer, train_cache, val_cache = prepare_data(cfg, data_dir, tokenizer, build=False)
    cfg.model.vocab_size = tokenizer.vocab_size
    if ckpt is not None:
        check_compatible(ckpt["config"], cfg.to_dict(), last_path)
    if tc.cache_on_device:
        train_cache, val_cache = train_cache.to(device), val_cache.to(device)
    train_loader = CacheLoader(train_cache, tc.batch_size, shuffle=True, seed=tc.seed, drop_last=True,
                               device=device, rank=rank, world_size=world_size)
    val_loader = CacheLoader(val_cache, tc.batch_size, shuffle=False, seed=tc.seed, device=device,
                             rank=rank, world_size=world_size)
    if len(train_loader) == 0:
        raise ValueError(
            f"batch_size {tc.batch_size} x {world_size} process(es) is larger than the training split; "
            "lower train.batch_size"
        )
    total_steps = tc.max_steps if tc.max_steps is not None else tc.epochs * len(train_loader)

    # --- model, optimiser, schedule ---------------------------------------------------------------
    set_seed(tc.seed)
    model = MultimodalVAE(cfg.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tc.warmup_steps, total_steps)
    )
    net: nn.Module = LossModule(model)
    if world_size > 1:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    step, epoch, batch_in_epoch, best_val = 0, 0, 0, math.inf
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(
                last_path, f"does not fit this model/optimiser ({str(err).splitlines()[0]})",
                "It was written by other code or another config: start a new output folder",
            ) from err
        step, epoch, batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        best_val = ckpt["best_val"]
    if ckpt is not None and world_size == 1 and ckpt["world_size"] == 1:
        set_rng_state(ckpt["rng"])  # the same random streams as before the stop: an exact continuation
    else:
        set_seed(tc.seed + rank + step)  # own noise per rank (the loader shuffles by seed and epoch)

    if is_main:
        cfg.save(out_dir / "config.json")
        tokenizer.save(out_dir / "tokenizer.json")
    log = MetricsLog(out_dir, resume_step=step if ckpt else None, enabled=is_main)

    def checkpoint() -> dict[str, Any]:
        """Everything needed to continue after the last finished step, as tensors and plain Python values."""
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch,
            "batch_in_epoch": batch_in_epoch, "best_val": best_val, "rng": rng_after_step,
            "world_size": world_size, "config": cfg.to_dict(),
            "tokenizer": {"wordpieces": tokenizer.wordpieces},
        }

    def evaluate() -> dict[str, float]:
        nonlocal best_val
        val = validate(model, val_loader, device, world_size, tc.amp)
        log.log(step, epoch, "val", val, lr=scheduler.get_last_lr()[0],
                beta=kl_beta(step, tc.kl_warmup_steps))
        if val["loss"] < best_val:
            best_val = val["loss"]
            if is_main:
                save_checkpoint(checkpoint(), best_path)
        return val

    # --- the loop ---------------------------------------------------------------------------------
    bar = tqdm(total=total_steps, initial=step, disable=not (progress and is_main), desc="train", unit="step")
    val: dict[str, float] = {}
    window_terms: torch.Tensor | None = None
    window_steps, window_samples, window_start = 0, 0, time.perf_counter()
    saved_step = step if ckpt else -1
    rng_after_step = rng_state()
    net.train()
    try:
        if ckpt is None:
            val = evaluate()  # the untrained model: where the curves start
        while step < total_steps:
            train_loader.set_epoch(epoch)
            batches = iter(train_loader)
            _skip(batches, batch_in_epoch)  # a resumed run: the batches of this epoch it trained on before
            for batch in batches:
                beta = kl_beta(step, tc.kl_warmup_steps)
                with _autocast(device, tc.amp):
                    terms = net(batch, beta)
                names = list(terms)
                values = _mean_over_ranks(torch.stack([terms[k].detach().float() for k in names]), world_size)
                if not torch.isfinite(values).all():
                    bad = [f"{k}={v}" for k, v in zip(names, values.tolist()) if not math.isfinite(v)]
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step + 1}: {', '.join(bad)}. Training stopped; the last "
                        f"good checkpoint ({last_path if saved_step >= 0 else 'none yet'}) is untouched. "
                        "Try a lower train.lr, a smaller train.grad_clip, or train.amp=False"
                    )
                optimizer.zero_grad(set_to_none=True)
                terms["loss"].backward()
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                if not torch.isfinite(grad_norm):
                    raise NonFiniteLossError(
                        f"non-finite gradient norm at step {step + 1} (loss terms were finite). Training "
                        "stopped; the last good checkpoint is untouched. Try a lower train.lr or "
                        "train.amp=False"
                    )
                with _whole_step():
                    optimizer.step()
                    scheduler.step()
                    step += 1
                    batch_in_epoch += 1
                    rng_after_step = rng_state()  # saved with this step, even if Ctrl-C comes mid-next-step

                window_terms = values if window_terms is None else window_terms + values
                window_steps += 1
                window_samples += batch["image"].shape[0] * world_size
                if step % tc.log_every == 0 or step == total_steps:
                    means = dict(zip(names, (window_terms / window_steps).tolist()))
                    elapsed = time.perf_counter() - window_start
                    log.log(step, epoch, "train", means, lr=scheduler.get_last_lr()[0], beta=beta,
                            samples_per_s=window_samples / max(elapsed, 1e-9))
                    bar.set_postfix({k: f"{v:.3g}" for k, v in means.items()})
                    window_terms, window_steps, window_samples = None, 0, 0
                    window_start = time.perf_counter()
                bar.update(1)
                pause = time.perf_counter()
                if step % tc.eval_every == 0 or step == total_steps:
                    val = evaluate()
                if (step % tc.ckpt_every == 0 or step == total_steps) and is_main:
                    save_checkpoint(checkpoint(), last_path)
                    saved_step = step
                window_start += time.perf_counter() - pause  # samples/s counts training time only
                if step >= total_steps:
                    break
            else:
                epoch += 1
                batch_in_epoch = 0
    except KeyboardInterrupt:
        if is_main and step > saved_step:
            save_checkpoint(checkpoint(), last_path)
            print(f"\ninterrupted at step {step}: saved {last_path}; continue with resume=True (--resume)",
                  file=sys.stderr)
        raise
    finally:
        bar.close()
        log.close()
        if joined:
            dist.destroy_process_group()

    if not val and is_main:  # resumed a finished run: report the saved model's validation loss
        val = validate(model, val_loader, device, 1, tc.amp)
    return {
        "step": step, "epoch": epoch, "val": val, "best_val_loss": best_val,
        "out_dir": out_dir, "last_checkpoint": last_path, "best_checkpoint": best_path,
        "metrics": log.path, "model": model, "tokenizer": tokenizer, "config": cfg,
    }


# ---------------------------------------------------------------------------------------------
# Loading a trained model
# ---------------------------------------------------------------------------------------------


def load_model(
    run_dir_or_ckpt: str | Path, device: str | torch.device | None = "auto"
) -> tuple[MultimodalVAE, CaptionTokenizer, Config]:
    """Rebuild `(model, tokenizer, config)` from a run folder (its `best.pt`, else `last.pt`) or a `.pt` file.

    The model is in eval mode on `device` ("auto": CUDA, then MPS, then CPU).
    Taught in notebooks/07_evaluation.ipynb.
    """
    path = Path(run_dir_or_ckpt)
    if path.is_dir():
        path = path / "best.pt" if (path / "best.pt").exists() else path / "last.pt"
    ckpt = load_checkpoint(path)
    try:
        config = Config.from_dict(ckpt["config"])
        model = MultimodalVAE(config.model)
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, ValueError, TypeError) as err:
        raise CheckpointError(
            path, f"cannot rebuild its model ({str(err).splitlines()[0]})",
            "It was written by an incompatible version of mvae_course: train it again",
        ) from err
    tokenizer = CaptionTokenizer(ckpt["tokenizer"]["wordpieces"])
    return model.to(pick_device(device)).eval(), tokenizer, config


def train_or_load(
    config: Config, out_dir: str | Path, data_dir: str | Path | None = None,
    device: str | torch.device | None = None, progress: bool = False,
) -> dict[str, Any]:
    """Train a run into `out_dir`, or pick it up where it is: "load if present, else train".

    A finished run is loaded (train() only re-validates it), an interrupted one resumes from its last
    checkpoint, and an empty folder trains from scratch; so a lesson never makes a reader wait twice.
    Returns train()'s result, plus `seconds`: the wall time this call took.
    Taught in notebooks/02_image_vae.ipynb.
    """
    start = time.perf_counter()
    resume = (Path(out_dir) / "last.pt").exists()
    result = train(config, out_dir, resume=resume, device=device, progress=progress, data_dir=data_dir)
    return {**result, "seconds": time.perf_counter() - start}


def read_metrics(run_dir: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """The rows of a run's `metrics.csv` (numbers as floats, empty cells left out), optionally of one split.

    Taught in notebooks/06_coco_training.ipynb.
    """
    path = Path(run_dir) / "metrics.csv" if Path(run_dir).is_dir() else Path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path} not found; train a run first (it writes metrics.csv)")
    with path.open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if split is None or row["split"] == split]
    return [{k: v if k == "split" else float(v) for k, v in row.items() if v != ""} for row in rows]


# ---------------------------------------------------------------------------------------------
# Command line: python -m mvae_course train ...
# ---------------------------------------------------------------------------------------------


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `python -m mvae_course train`. Taught in notebooks/06_coco_training.ipynb."""
    parser.add_argument("--preset", default="cpu", choices=["tiny", "cpu", "coco_gpu"],
                        help="named configuration to start from (default: cpu)")
    parser.add_argument("--config", type=Path, help="a config .json/.yaml file; replaces --preset")
    parser.add_argument("--data", choices=["shapes", "coco"], help="data set (default: the preset's)")
    parser.add_argument("--root", type=Path, help="data folder (COCO 2017 layout); shapes are written there")
    parser.add_argument("--fusion", choices=FUSIONS, help="how the experts are fused")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--max-steps", type=int, help="optimiser steps to train for")
    budget.add_argument("--epochs", type=int, help="passes over the training split (instead of --max-steps)")
    parser.add_argument("--seed", type=int, help="random seed (default: the preset's)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:1, mps (default: auto)")
    parser.add_argument("--out", type=Path, help="run folder (default: runs/<preset>-<data>-<fusion>)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"),
                        help="where generated shapes data and caches go (default: ./data)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> Config:
    """The config the command-line options describe. Taught in notebooks/06_coco_training.ipynb."""
    cfg = Config.load(args.config) if args.config else preset(args.preset)
    data: dict[str, Any] = {}
    if args.data and args.data != cfg.data.dataset:
        splits = ("train2017", "val2017") if args.data == "coco" else ("train", "val")
        data.update(dataset=args.data, train_split=splits[0], val_split=splits[1])
    if args.root:
        data["root"] = str(args.root)
    train_opts: dict[str, Any] = {}
    if args.max_steps is not None:
        train_opts.update(max_steps=args.max_steps, epochs=None)
    if args.epochs is not None:
        train_opts.update(max_steps=None, epochs=args.epochs)
    if args.seed is not None:
        train_opts["seed"] = args.seed
    if args.device:
        train_opts["device"] = args.device
    return cfg.replace(data=data, model={"fusion": args.fusion} if args.fusion else {}, train=train_opts)


def run_train(args: argparse.Namespace) -> int:
    """Run `python -m mvae_course train`; returns the exit status.

    Taught in notebooks/06_coco_training.ipynb.
    """
    cfg = config_from_args(args)
    out = args.out or Path("runs") / f"{cfg.name}-{cfg.data.dataset}-{cfg.model.fusion}"
    try:
        result = train(cfg, out, resume=args.resume, progress=not args.no_progress, data_dir=args.data_dir)
    except KeyboardInterrupt:
        return 130
    except (NonFiniteLossError, CheckpointError, FileExistsError, FileNotFoundError, ValueError) as err:
        # Bad input (a config, a data folder, a checkpoint): one clear line, not a traceback.
        print(f"error: {err}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        val = ", ".join(f"{k} {v:.4g}" for k, v in result["val"].items())
        print(f"trained {result['step']} steps; validation: {val}")
        print(f"run folder: {result['out_dir']} (last.pt, best.pt, metrics.csv)")
    return 0
