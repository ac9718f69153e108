"""The training loop: one plain PyTorch loop, readable top to bottom.

Taught in notebooks/07_coco_training.ipynb (the loop, checkpoints, multi-GPU).

`train(config, out_dir)` prepares the data (generating the shapes set when needed), builds the model, and
runs AdamW with gradient clipping, a linear-then-cosine learning-rate schedule and a KL warm-up, under bf16
autocast where the device has bf16 arithmetic (`train.amp`; `device.autocast`). It writes
`config.json`, `tokenizer.json`, `metrics.csv` (and TensorBoard logs when `tensorboard` is installed),
`last.pt` and `best.pt` into `out_dir`. `train(..., resume=True)` continues a run exactly where it stopped;
under `torchrun --nproc_per_node N` the same function trains with DistributedDataParallel.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mvae_course.atomic import FileLock
from mvae_course.checkpoint import (
    CheckpointError,
    check_compatible,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mvae_course.config import Config
from mvae_course.data.cache import CacheLoader
from mvae_course.data.prepare import prepare_data
from mvae_course.data.text import CaptionTokenizer
from mvae_course.device import amp_dtype, autocast, has_fused_adamw, keep_freed_memory, seeded, set_seed
from mvae_course.distributed import (
    barrier,
    init_distributed,
    leave_distributed,
    mean_over_ranks,
    sum_over_ranks,
)
from mvae_course.metrics_log import MetricsLog
from mvae_course.models.mvae import MultimodalVAE
from mvae_course.progress import tqdm

VAL_SEED = 1234  # every validation pass draws the same latent noise, so its losses compare


class NonFiniteLossError(RuntimeError):
    """A loss term (or the gradient) became NaN or infinite; training stopped before saving it."""


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by SIGTERM (what SLURM, Kubernetes and `timeout` send).

    Handled like Ctrl-C: the step in progress finishes, `last.pt` is saved, and the run resumes exactly.
    Taught in notebooks/07_coco_training.ipynb.
    """


class RunInUseError(FileExistsError):
    """Another live training run is writing into the same output folder.

    Taught in notebooks/07_coco_training.ipynb.
    """


@dataclass
class TrainResult:
    """What `train` hands back: the trained model and tokenizer, where the run stands, where it is saved.

    `val` holds the last validation's loss terms (beta = 1); `seconds` is the wall time of the call.
    """

    model: MultimodalVAE
    tokenizer: CaptionTokenizer
    config: Config
    step: int
    val: dict[str, float]
    best_val_loss: float
    out_dir: Path
    seconds: float


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


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

    Taught in notebooks/07_coco_training.ipynb.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Pieces of a step
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def validate(model: MultimodalVAE, loader: CacheLoader, device: torch.device, world_size: int = 1,
             amp: bool = False) -> dict[str, float]:
    """Mean of every loss term over the validation set, at beta = 1 (the true negative ELBO).

    The latent noise comes from a fixed seed (and the training RNG is left untouched), so two
    validations of the same weights agree.
    """
    was_training = model.training
    model.eval()
    sums: torch.Tensor | None = None
    names: list[str] = []
    count = torch.zeros((), device=device)
    with seeded(VAL_SEED, device):
        for batch in loader:
            with autocast(device, amp):
                terms = model(batch, 1.0)
            n = batch["image"].shape[0]
            names = list(terms)
            values = torch.stack([terms[k].detach().float() for k in names]) * n
            sums = values if sums is None else sums + values
            count += n
    model.train(was_training)
    if sums is None:
        raise ValueError("the validation split is empty; check data.val_split and the data folder")
    totals = sum_over_ranks(torch.cat([sums, count.view(1)]), world_size)
    return dict(zip(names, (totals[:-1] / totals[-1]).tolist()))


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


@contextmanager
def _sigterm_stops_training() -> Iterator[None]:
    """For the whole run, SIGTERM raises `Terminated` (as SIGINT raises KeyboardInterrupt), so the run
    saves and exits with the conventional status instead of dying between checkpoints."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals can only be handled on the main thread
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, so an update or a save is done whole or not at all.

    Without this, an interrupt inside `optimizer.step()` would leave half-updated weights that the
    interrupt handler then saves under the previous step number, and resuming would not be exact; and
    one inside `torch.save` makes its zip writer fail with a RuntimeError ("unexpected pos") that hides
    the stop, so the run exits 1 without saying where it stands.
    """
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    if threading.current_thread() is not threading.main_thread() or None in handlers.values():
        yield  # signals can only be handled on the main thread
        return
    received: list[int] = []
    for s in STOP_SIGNALS:
        signal.signal(s, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if received:
        raise Terminated if received[0] == signal.SIGTERM else KeyboardInterrupt


@contextmanager
def _run_lock(out_dir: Path, is_main: bool) -> Iterator[None]:
    """One training run per folder: a second is refused, naming the first, unless the first is dead.

    Under the lock no other writer can be at work here, so any temporary checkpoint file is a killed
    run's leftover (a kill -9 during a save) and is removed.
    """
    if not is_main:  # rank 0 speaks for the whole DDP job
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out_dir / ".run.lock", f"training into {out_dir}", timeout=0)
    try:
        lock.__enter__()
    except TimeoutError:
        raise RunInUseError(
            f"{out_dir} is in use by another training run ({lock.holder()}); wait for it to finish, or "
            "choose another output folder"
        ) from None
    try:
        for name in ("last.pt", "best.pt"):
            for temp in out_dir.glob(f".{name}.*"):
                temp.unlink(missing_ok=True)
        yield
    finally:
        lock.__exit__(None, None, None)


def _check_finite(values: torch.Tensor, names: list[str], step: int, last_path: Path | None) -> None:
    """NonFiniteLossError naming the bad terms, before a NaN can reach the weights or a checkpoint."""
    if torch.isfinite(values).all():
        return
    bad = [f"{k}={v}" for k, v in zip(names, values.tolist()) if not math.isfinite(v)]
    raise NonFiniteLossError(
        f"non-finite loss at step {step}: {', '.join(bad)}. Training stopped; the last good checkpoint "
        f"({last_path or 'none yet'}) is untouched. Try a lower train.lr, a smaller train.grad_clip, "
        "or train.amp=False"
    )


def _loaders(cfg: Config, data_dir: Path, tokenizer: CaptionTokenizer | None, device: torch.device, rank: int,
             world_size: int) -> tuple[CaptionTokenizer, CacheLoader, CacheLoader]:
    """(tokenizer, training loader, validation loader); fills in `cfg.model.vocab_size`.

    Rank 0 writes the data files (shapes, caches), the other ranks then read them.
    """
    tc = cfg.train
    if rank == 0:
        tokenizer, train_cache, val_cache = prepare_data(cfg, data_dir, tokenizer)
    barrier(world_size)
    if rank != 0:
        tokenizer, train_cache, val_cache = prepare_data(cfg, data_dir, tokenizer, build=False)
    cfg.model.vocab_size = tokenizer.vocab_size
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
    return tokenizer, train_loader, val_loader


@dataclass
class _Position:
    """Where training stands: everything besides the weights that a checkpoint must carry."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_val: float = math.inf
    rng: dict[str, Any] | None = None  # the random streams right after `step` finished


def _restore(ckpt: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, path: Path) -> _Position:
    """Load a checkpoint's weights, optimiser and schedule; return the position it was saved at."""
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(
            path, f"does not fit this model/optimiser ({str(err).splitlines()[0]})",
            "It was written by other code or another config: start a new output folder",
        ) from err
    return _Position(ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["best_val"])


class _Window:
    """Loss terms and throughput averaged over the steps since the last log line."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.steps, self.samples, self.start = 0, 0, time.perf_counter()

    def add(self, values: torch.Tensor, samples: int) -> None:
        self.sums = values if self.sums is None else self.sums + values
        self.steps += 1
        self.samples += samples

    def pause(self, seconds: float) -> None:
        """Leave validation and checkpoint time out of samples/s."""
        self.start += seconds

    def flush(self, names: list[str]) -> tuple[dict[str, float], float]:
        """(mean of each term, samples/s) since the last flush; starts a new window."""
        assert self.sums is not None
        means = dict(zip(names, (self.sums / self.steps).tolist()))
        rate = self.samples / max(time.perf_counter() - self.start, 1e-9)
        self.__init__()
        return means, rate


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def train(
    config: Config,
    out_dir: str | Path,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    data_dir: str | Path | None = None,
) -> TrainResult:
    """Train a multimodal VAE into `out_dir`; return the trained model and where the run stands.

    - `out_dir` receives `config.json`, `tokenizer.json`, `metrics.csv`, `last.pt`, `best.pt`. A second
      run into the same folder while the first is alive is refused (`RunInUseError`).
    - `resume=True` continues from `out_dir/last.pt` (or starts afresh when there is none); the result
      is the same, weight for weight, as an uninterrupted run.
    - `device`: overrides `config.train.device` ("auto": CUDA, then MPS, then CPU).
    - `data_dir`: where generated shapes and caches go (default `out_dir/data`).

    Raises `NonFiniteLossError` when a loss term turns NaN/inf (the last good checkpoint stays), and
    `CheckpointError` when resuming from a checkpoint of another config. Ctrl-C (KeyboardInterrupt) and
    SIGTERM (`Terminated`) let the step finish and save `last.pt` first.

    Taught in notebooks/07_coco_training.ipynb.
    """
    start = time.perf_counter()
    cfg = Config.from_dict(config.to_dict())  # a private copy: vocab_size is filled in below
    if cfg.model.image_size != cfg.data.image_size:
        raise ValueError(
            f"model.image_size ({cfg.model.image_size}) must equal data.image_size ({cfg.data.image_size})"
        )
    if cfg.train.max_steps is None and cfg.train.epochs is None:
        raise ValueError("set train.max_steps or train.epochs")
    out_dir = Path(out_dir)
    data_dir = Path(data_dir) if data_dir is not None else out_dir / "data"
    rank, world_size, device, joined = init_distributed(device if device is not None else cfg.train.device)
    try:
        with _run_lock(out_dir, rank == 0), _sigterm_stops_training():
            result = _train(cfg, out_dir, data_dir, resume, device, rank, world_size, progress)
    finally:
        if joined:
            leave_distributed()
    result.seconds = time.perf_counter() - start
    return result


def _train(cfg: Config, out_dir: Path, data_dir: Path, resume: bool, device: torch.device, rank: int,
           world_size: int, progress: bool) -> TrainResult:
    """The run itself, once the folder is this process's and the signals are set (see `train`)."""
    tc = cfg.train
    is_main = rank == 0
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"

    # --- the checkpoint to resume from: read before the data, since it carries the tokenizer -----
    ckpt = None
    if last_path.exists():
        if not resume:
            raise FileExistsError(
                f"{out_dir} already holds a run ({last_path}); pass resume=True (--resume) to continue it, "
                "or choose another output folder"
            )
        ckpt = load_checkpoint(last_path)
    tokenizer = CaptionTokenizer(ckpt["tokenizer"]["wordpieces"]) if ckpt else None
    tokenizer, train_loader, val_loader = _loaders(cfg, data_dir, tokenizer, device, rank, world_size)
    if ckpt is not None:
        check_compatible(ckpt["config"], cfg.to_dict(), last_path)
    total_steps = tc.max_steps if tc.max_steps is not None else tc.epochs * len(train_loader)

    # --- model, optimiser, schedule, and where to start --------------------------------------------
    set_seed(tc.seed)
    model = MultimodalVAE(cfg.model).to(device)
    # fused: one kernel updates every parameter (half the optimiser's time on a CPU; benchmarks/README.md)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay,
                                  fused=has_fused_adamw(device))

    def schedule(step: int) -> float:
        return lr_factor(step, tc.warmup_steps, total_steps)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    net: nn.Module = model
    if world_size > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    at = _restore(ckpt, model, optimizer, scheduler, last_path) if ckpt is not None else _Position()
    if ckpt is not None and world_size == 1 and ckpt["world_size"] == 1:
        set_rng_state(ckpt["rng"])  # the same random streams as before the stop: an exact continuation
    else:
        set_seed(tc.seed + rank + at.step)  # own noise per rank (the loader shuffles by seed and epoch)
    at.rng = rng_state()
    saved_step = at.step if ckpt else -1

    if is_main:
        cfg.save(out_dir / "config.json")
        tokenizer.save(out_dir / "tokenizer.json")
    log = MetricsLog(out_dir, resume_step=at.step if ckpt else None, enabled=is_main)

    def checkpoint() -> dict[str, Any]:
        """Everything needed to continue after the last finished step, as tensors and plain values."""
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": at.step, "epoch": at.epoch,
            "batch_in_epoch": at.batch_in_epoch, "best_val": at.best_val, "rng": at.rng,
            "world_size": world_size, "config": cfg.to_dict(),
            "tokenizer": {"wordpieces": tokenizer.wordpieces},
        }

    def save(path: Path) -> None:
        with _signals_held():
            save_checkpoint(checkpoint(), path)

    def validate_and_keep_best() -> dict[str, float]:
        val = validate(model, val_loader, device, world_size, tc.amp)
        log.log(at.step, at.epoch, "val", val, lr=scheduler.get_last_lr()[0],
                beta=tc.beta * kl_beta(at.step, tc.kl_warmup_steps))
        if val["loss"] < at.best_val:
            at.best_val = val["loss"]
            if is_main:
                save(best_path)
        return val

    precision = "bf16" if amp_dtype(device, tc.amp) == torch.bfloat16 else "fp32"
    bar = tqdm(total=total_steps, initial=at.step, disable=not (progress and is_main),
               desc=f"train ({precision})", unit="step")
    window = _Window()
    val: dict[str, float] = {}
    net.train()
    caller_threads = torch.get_num_threads()
    keep_freed_memory()  # each step reuses the last one's memory instead of faulting it in again
    if tc.threads:
        torch.set_num_threads(tc.threads)
    try:
        if ckpt is None:
            val = validate_and_keep_best()  # the untrained model: where the curves start
        while at.step < total_steps:
            train_loader.set_epoch(at.epoch)
            batches = iter(train_loader)
            for _ in range(at.batch_in_epoch):  # a resumed run: skip the batches of this epoch it trained on
                next(batches)
            for batch in batches:
                # One step: loss terms, a finite check, the backward pass, a clipped update.
                beta = tc.beta * kl_beta(at.step, tc.kl_warmup_steps)
                with autocast(device, tc.amp):
                    terms = net(batch, beta)
                names = list(terms)
                values = mean_over_ranks(torch.stack([terms[k].detach().float() for k in names]), world_size)
                _check_finite(values, names, at.step + 1, last_path if saved_step >= 0 else None)
                optimizer.zero_grad(set_to_none=True)
                terms["loss"].backward()
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                if not torch.isfinite(grad_norm):
                    raise NonFiniteLossError(
                        f"non-finite gradient norm at step {at.step + 1} (loss terms were finite). Training "
                        "stopped; the last good checkpoint is untouched. Try a lower train.lr or "
                        "train.amp=False"
                    )
                with _signals_held():
                    optimizer.step()
                    scheduler.step()
                    at.step += 1
                    at.batch_in_epoch += 1
                    at.rng = rng_state()  # saved with this step, even if Ctrl-C comes mid-next-step

                # Bookkeeping: the log, the bar, validation and checkpoints on their schedules.
                window.add(values, batch["image"].shape[0] * world_size)
                if at.step % tc.log_every == 0 or at.step == total_steps:
                    means, rate = window.flush(names)
                    log.log(at.step, at.epoch, "train", means, lr=scheduler.get_last_lr()[0], beta=beta,
                            samples_per_s=rate)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in means.items()})
                bar.update(1)
                pause = time.perf_counter()
                if at.step % tc.eval_every == 0 or at.step == total_steps:
                    val = validate_and_keep_best()
                if (at.step % tc.ckpt_every == 0 or at.step == total_steps) and is_main:
                    save(last_path)
                    saved_step = at.step
                window.pause(time.perf_counter() - pause)
                if at.step >= total_steps:
                    break
            else:
                at.epoch += 1
                at.batch_in_epoch = 0
    except KeyboardInterrupt as stop:
        if is_main:  # say where the run stands even when last.pt already holds this step
            if at.step > saved_step:
                save(last_path)  # a second signal must not cut the save short
            why = "stopped by SIGTERM" if isinstance(stop, Terminated) else "interrupted"
            print(f"\n{why} at step {at.step}: saved {last_path}; continue with resume=True (--resume)",
                  file=sys.stderr)
        raise
    finally:
        torch.set_num_threads(caller_threads)  # a notebook that trains, then evaluates, keeps its own setting
        bar.close()
        log.close()

    if not val and is_main:  # resumed a finished run: report the saved model's validation loss
        val = validate(model, val_loader, device, 1, tc.amp)
    return TrainResult(model, tokenizer, cfg, at.step, val, at.best_val, out_dir, seconds=0.0)
