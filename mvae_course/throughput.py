"""Training throughput: the pipeline a first attempt would write, the course's, and each lever between them.

Taught in notebooks/07_coco_training.ipynb.

The naive pipeline decodes every JPEG with PIL on every access (torchvision's `CocoCaptions` with
Resize / CenterCrop / ToTensor and a `DataLoader`), tokenises with BERT's full 30522-entry vocabulary,
pads every caption to 32 tokens and scores the decoder at every position: B x 32 x 30522 logits, with
padding dropped afterwards by `cross_entropy(..., ignore_index=PAD)`. The course's pipeline trains the
same networks on the same objective, and pulls five levers:

    cache               images decoded once into uint8 tensors, batches by tensor indexing (`CacheLoader`)
    compact_vocab       only the wordpieces the captions use (`CaptionTokenizer`): V ~ 7k, not 30522
    dynamic_padding     pad to the longest caption of the batch, not to 32
    real_token_logits   the output layer runs at the N real tokens only (N x V, `TextDecoder.log_likelihood`)
    bf16                bf16 autocast where the device computes bf16 natively (`device.autocast`, as `train`)

and, measured on top (not part of the course's training; benchmarks/README.md): compile (the convolutions).
Every pipeline trains with the same fused AdamW as `train`.

`Levers` names a set of them; `build_pipeline` builds one set-up; `measure_throughput` and `compare`
time full training steps (forward, backward, AdamW step), alternating set-ups so that a change in the
machine's load hits all of them alike. `benchmarks/train_throughput.py` is the command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import math
import os
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from torchvision.datasets import CocoCaptions

from mvae_course.config import ModelConfig, preset
from mvae_course.data.cache import CacheLoader, CaptionCache, ensure_cache
from mvae_course.data.coco import annotation_path, read_captions
from mvae_course.data.synthetic import (
    COCO_TRAIN_CAPTIONS,
    COCO_TRAIN_IMAGES,
    COCO_WORDPIECES,
    synthetic_cache,
)
from mvae_course.data.text import BERT_VOCAB_SIZE, PAD, UNK, CaptionTokenizer, wordpiece_dir
from mvae_course.device import amp_dtype, autocast, has_fused_adamw
from mvae_course.models.mvae import MultimodalVAE

MAX_TOKENS = 32  # the naive pipeline pads (and truncates) every caption to this, EOS included


# ---------------------------------------------------------------------------------------------
# Levers and pipelines
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Levers:
    """Which speed-ups a pipeline uses; all False is the naive pipeline.

    Taught in notebooks/07_coco_training.ipynb
    """

    cache: bool = False
    compact_vocab: bool = False
    dynamic_padding: bool = False
    real_token_logits: bool = False
    bf16: bool = False  # `device.autocast`: bf16 on CUDA and on CPUs with AVX512-BF16 or AMX, else fp32
    compile: bool = False

    def __post_init__(self) -> None:
        if self.real_token_logits and not self.compact_vocab:
            # The package's decoder prepends the compact BOS id; BERT ids need the naive loss's [CLS].
            raise ValueError("real_token_logits needs compact_vocab: the package's decoder reads compact ids")


NAIVE = Levers()
COURSE = Levers(cache=True, compact_vocab=True, dynamic_padding=True, real_token_logits=True, bf16=True)
LEVERS = tuple(f.name for f in dataclasses.fields(Levers))


def lever_ladder(extra: Iterable[str] = ()) -> list[tuple[str, Levers]]:
    """Naive, then one lever added at a time up to the course pipeline, then each of `extra` on top.

    Taught in notebooks/07_coco_training.ipynb

    Returns [(name, levers)]: ("naive", NAIVE), ("+ cache", ...), ..., ("+ bf16", COURSE), then the extras.
    """
    ladder, levers = [("naive", NAIVE)], NAIVE
    for name in ("cache", "compact_vocab", "dynamic_padding", "real_token_logits", "bf16", *extra):
        if name not in LEVERS:
            raise ValueError(f"unknown lever {name!r}; choose from {LEVERS}")
        levers = dataclasses.replace(levers, **{name: True})
        ladder.append((f"+ {name}", levers))
    return ladder


def benchmark_model_config(vocab_size: int) -> ModelConfig:
    """The coco_gpu preset's networks (conv 32-64-128 at 64 x 64, emb 300, bi-GRU 512, GRU 512, z 64).

    Taught in notebooks/07_coco_training.ipynb

    Word dropout is off: the naive pipeline's BERT ids have other special ids, and it costs nothing.
    """
    return dataclasses.replace(preset("coco_gpu").model, vocab_size=vocab_size, word_dropout=0.0)


def full_logits_log_likelihood(decoder: nn.Module, z: Tensor, text: Tensor, bos_id: int) -> Tensor:
    """log p(caption | z) the naive way: logits at every position, padding masked by ignore_index.

    decoder: a `TextDecoder` (its layers, not its `log_likelihood`); z: B x z_dim; text: B x T (content
    ids, EOS, PAD). The GRU runs over all T positions and the output layer makes B x T x V logits.
    Returns B, equal to `decoder.log_likelihood` (the GRU is causal, so padding never changes a real
    position's state) at a B x T x V / N times larger cost.
    """
    inputs = torch.cat([torch.full_like(text[:, :1], bos_id), text[:, :-1]], dim=1)  # B x T
    x = torch.cat([decoder.embedding(inputs), z.unsqueeze(1).expand(-1, text.shape[1], -1)], dim=-1)
    out, _ = decoder.gru(x, decoder.initial_state(z))  # B x T x H, padding included
    logits = decoder.out(out)  # B x T x V
    log_p = -F.cross_entropy(logits.flatten(0, 1), text.flatten(), ignore_index=PAD, reduction="none")  # B T
    return log_p.view(text.shape).sum(1)


class FullLogitsVAE(MultimodalVAE):
    """The package's `MultimodalVAE`, scoring captions with `full_logits_log_likelihood`.

    `bos_id`: the id the decoder reads first ([CLS] = 101 for BERT ids, BOS = 1 for compact ids).
    """

    def __init__(self, config: ModelConfig, bos_id: int) -> None:
        super().__init__(config)
        self.bos_id = bos_id

    def log_likelihood(self, z: Tensor, batch: dict[str, Tensor], modality: str) -> Tensor:
        if modality != "text":
            return super().log_likelihood(z, batch, modality)
        text = batch["text"]
        n = z[..., 0].numel() // text.shape[0]  # latents per caption, as in MultimodalVAE
        log_p = full_logits_log_likelihood(self.text_decoder, z.reshape(-1, z.shape[-1]), text.repeat(n, 1),
                                           self.bos_id)
        return log_p.view(z.shape[:-1])


def bert_to_compact(tokenizer: CaptionTokenizer) -> Tensor:
    """Lookup table BERT id -> compact id (UNK outside the vocabulary): 30522 (int64)."""
    table = torch.full((BERT_VOCAB_SIZE,), UNK, dtype=torch.long)
    table[tokenizer.wordpiece_ids] = torch.arange(tokenizer.vocab_size)
    return table


@functools.cache
def naive_tokenizer() -> Any:
    """transformers' BERT tokenizer, as a typical training script loads it (the same wordpieces as
    `bert_tokenizer`, which the course's pipeline uses)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read by huggingface_hub: never reach for the network
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(wordpiece_dir(), local_files_only=True)


def collate_bert(items: list[tuple[Tensor, list[str]]]) -> dict[str, Tensor]:
    """The naive collate: one random caption per image, BERT ids padded to MAX_TOKENS.

    items: (3 x H x W image, captions) from `CocoCaptions`. Returns image B x 3 x H x W, text B x 32
    (BERT content ids, [SEP] as EOS, [PAD] = 0 after), lengths B.
    """
    images, captions = zip(*items)
    chosen = [random.choice(c) for c in captions]
    # [CLS] + content + [SEP], padded to 33; dropping [CLS] leaves the batch layout with [SEP] as EOS.
    enc = naive_tokenizer()(chosen, padding="max_length", truncation=True, max_length=MAX_TOKENS + 1,
                            return_tensors="pt")
    text = enc["input_ids"][:, 1:]
    return {"image": torch.stack(images), "text": text, "lengths": enc["attention_mask"].sum(1) - 1}


def naive_loader(root: str | Path, split: str, image_size: int, batch_size: int,
                 workers: int = 0) -> DataLoader:
    """JPEGs decoded with PIL on every access: torchvision's `CocoCaptions`, transforms and `DataLoader`."""
    transform = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor()])
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        ds = CocoCaptions(str(Path(root) / split), str(annotation_path(root, split)), transform=transform)
    return DataLoader(ds, batch_size, shuffle=True, drop_last=True, num_workers=workers,
                      collate_fn=collate_bert)


@dataclass
class TrainData:
    """One training split, both ways: its COCO folder (for the naive loader) and its cache + tokenizer."""

    root: Path
    split: str
    image_size: int
    tokenizer: CaptionTokenizer
    cache: CaptionCache


def load_train_data(root: str | Path, split: str, work_dir: str | Path, image_size: int = 64,
                    min_count: int = 1) -> TrainData:
    """Fit the compact tokenizer on the split's captions and build (or reuse) its cache under `work_dir`.

    Taught in notebooks/07_coco_training.ipynb
    """
    root = Path(root)
    tokenizer = CaptionTokenizer.fit(read_captions(root, split), min_count=min_count)
    out = Path(work_dir) / f"{root.name}-{split}-{image_size}px"
    cache = ensure_cache(root, split, out, image_size, tokenizer)
    return TrainData(root, split, image_size, tokenizer, cache)


def _forever(loader: Iterable[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
    """Epoch after epoch of a loader (a small split holds only a batch or two)."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _adapt(batch: dict[str, Tensor], levers: Levers, vocab: Tensor | None, device: torch.device
           ) -> dict[str, Tensor]:
    """The batch in the vocabulary (`vocab`: a lookup table; None keeps the ids) and padding of `levers`."""
    text, lengths = batch["text"], batch["lengths"]
    if vocab is not None:
        text = vocab[text]
    if levers.dynamic_padding:
        text = text[:, : int(lengths.max())]
    elif text.shape[1] < MAX_TOKENS:
        text = F.pad(text, (0, MAX_TOKENS - text.shape[1]), value=PAD)
    image = batch["image"].to(device, non_blocking=True)
    return {"image": image, "text": text.to(device), "lengths": lengths.to(device)}


class Pipeline:
    """A training set-up: endless batches, a model, AdamW with gradient clipping; `step()` trains once.

    `bf16`: the step runs under `device.autocast` (bf16 only where the device computes it natively).
    """

    def __init__(self, name: str, batches: Iterator[dict[str, Tensor]], model: MultimodalVAE,
                 device: torch.device, bf16: bool = False, lr: float = 1e-3, grad_clip: float = 5.0) -> None:
        self.name, self.batches, self.model, self.device = name, batches, model, device
        self.bf16, self.grad_clip = bf16, grad_clip
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=has_fused_adamw(device))
        self.last_loss = math.nan

    def step(self) -> int:
        """One full training step (next batch, forward, backward, AdamW); returns the samples it saw."""
        batch = next(self.batches)
        with autocast(self.device, self.bf16):
            loss = self.model(batch, beta=1.0)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.last_loss = loss.item()  # also waits for the device, so a step's time is its own
        return batch["image"].shape[0]


def build_pipeline(levers: Levers, data: TrainData, batch_size: int = 64, device: str | torch.device = "cpu",
                   model_config: ModelConfig | None = None, workers: int = 0,
                   seed: int = 0, name: str = "") -> Pipeline:
    """The pipeline `levers` describe, on `data`, with the benchmark's networks (or `model_config`'s).

    Taught in notebooks/07_coco_training.ipynb

    Both loaders drop the last partial batch, so every step trains on exactly `batch_size` samples.
    """
    device = torch.device(device)
    tokenizer = data.tokenizer
    if levers.cache:  # compact ids from the cache; BERT ids through the wordpiece table
        loader: Iterable = CacheLoader(data.cache, batch_size, seed=seed, drop_last=True)
        vocab = None if levers.compact_vocab else tokenizer.wordpiece_ids
    else:  # BERT ids from the naive collate
        loader = naive_loader(data.root, data.split, data.image_size, batch_size, workers)
        vocab = bert_to_compact(tokenizer) if levers.compact_vocab else None
    if len(loader) == 0:
        raise ValueError(f"batch_size {batch_size} is larger than {data.root / data.split}; lower it")
    vocab_size = tokenizer.vocab_size if levers.compact_vocab else BERT_VOCAB_SIZE
    config = dataclasses.replace(model_config or benchmark_model_config(vocab_size), vocab_size=vocab_size)
    torch.manual_seed(seed)
    if levers.real_token_logits:
        model = MultimodalVAE(config)
    else:
        bos_id = tokenizer.wordpiece_ids[1].item() if not levers.compact_vocab else tokenizer.bos_id
        model = FullLogitsVAE(config, bos_id)
    model = model.to(device).train()
    if levers.compile:  # the convolutions; the GRUs are left to eager mode
        model.image_encoder.compile()
        model.image_decoder.compile()
    batches = (_adapt(b, levers, vocab, device) for b in _forever(loader))
    return Pipeline(name or str(levers), batches, model, device, levers.bf16)


# ---------------------------------------------------------------------------------------------
# Closeness to the limit: FLOPs per sample against the machine's matrix-product peak
# ---------------------------------------------------------------------------------------------


def flops_per_sample(pipeline: Pipeline) -> float:
    """FLOPs of one full training step (forward and backward) per sample, as `FlopCounterMode` counts them.

    It counts the matrix products and convolutions (2 FLOPs per multiply-add), the GRUs' included; the
    elementwise work, the softmax and the optimiser are not counted (they are memory-bound, not FLOP-bound).
    """
    with FlopCounterMode(display=False) as counter:
        samples = pipeline.step()
    return counter.get_total_flops() / samples


def matmul_peak(dtype: torch.dtype, n: int = 1024, seconds: float = 1.0, repeats: int = 3,
                m: int | None = None, k: int | None = None) -> float:
    """GFLOP per CPU second of (m x k) @ (k x n) matrix products in `dtype` (m = k = n unless given): with
    the default 1024 x 1024, this machine's practical peak; with a step's own sizes, what those reach.

    CPU seconds (`time.process_time`), not wall seconds: on a shared machine they leave out the time the
    process waits for a core, and with several threads they count each thread's time (a per-core figure).
    The best of `repeats` runs of `seconds` each.
    """
    m, k = m or n, k or n
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b  # the first call picks and builds the kernel
    best = 0.0
    for _ in range(repeats):
        start, calls = time.process_time(), 0
        while time.process_time() - start < seconds:
            a @ b
            calls += 1
        best = max(best, 2 * m * k * n * calls / (time.process_time() - start) / 1e9)
    return best


# What a profiled op's leaf name does: matrix products and convolutions do the FLOPs `FlopCounterMode` counts;
# everything else (elementwise arithmetic, the GRUs' gates, copies, reductions, the optimiser) does none.
MATRIX_PRODUCTS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mv",
                             "aten::addmv"})
OP_KINDS = ("matrix products", "convolutions", "everything else")


def op_kind(name: str) -> str:
    """One of OP_KINDS for an op name, the profiler's ("aten::mm") or `FlopCounterMode`'s ("aten.mm")."""
    name = name.replace(".", "::", 1) if "::" not in name else name
    if name in MATRIX_PRODUCTS:
        return "matrix products"
    return "convolutions" if "convolution" in name else "everything else"


def step_profile(pipeline: Pipeline, steps: int = 5, warmup: int = 1,
                 top: int = 5) -> list[dict[str, float | str]]:
    """Where a training step's CPU time goes, by OP_KINDS, then the `top` costliest ops of "everything else":
    op calls per step (those that other ops make included), ms per step (`torch.profiler`'s self CPU time of
    each op, summed), share of the step, GFLOP per step (`FlopCounterMode`, over one more step: counting
    beside the profiler would slow the profiled steps) and GFLOP/s.

    The profiler adds a few microseconds to every op, so the many small ops of "everything else" weigh a
    little more here than in an unprofiled step; the matrix products' and convolutions' rates are their own.
    """
    for _ in range(warmup):
        pipeline.step()
    with FlopCounterMode(display=False) as counter:
        pipeline.step()
    flops = dict.fromkeys(OP_KINDS, 0.0)
    for op, count in counter.get_flop_counts()["Global"].items():
        flops[op_kind(str(op))] += count
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in range(steps):
            pipeline.step()
    ms, calls = dict.fromkeys(OP_KINDS, 0.0), dict.fromkeys(OP_KINDS, 0.0)
    other: dict[str, tuple[float, float]] = {}  # op: (ms, calls) per step
    for event in profile.key_averages():
        kind, event_ms = op_kind(event.key), event.self_cpu_time_total / 1e3 / steps
        event_calls = event.count / steps
        ms[kind] += event_ms
        calls[kind] += event_calls
        if kind == "everything else":
            other[event.key] = (event_ms, event_calls)
    total = sum(ms.values())

    def row(name: str, op_calls: float, op_ms: float, op_flops: float) -> dict[str, float | str]:
        return {"ops": name, "calls / step": round(op_calls), "ms / step": op_ms,
                "share": f"{100 * op_ms / total:.0f}%", "GFLOP / step": op_flops / 1e9,
                "GFLOP/s": op_flops / 1e6 / op_ms if op_flops else 0.0}

    rows = [row(kind, calls[kind], ms[kind], flops[kind]) for kind in OP_KINDS]
    costliest = sorted(other, key=lambda name: other[name][0], reverse=True)[:top]
    rows += [row(f"of which {name}", other[name][1], other[name][0], 0.0) for name in costliest]
    return rows + [row("the step", sum(calls.values()), total, sum(flops.values()))]


def cpu_samples_per_s(pipelines: list[Pipeline], rounds: int = 10, warmup: int = 1) -> list[float]:
    """Training samples per CPU second of each pipeline, timed one step at a time, in turn (A B C A B C)."""
    for p in pipelines:
        measure_throughput(p, 0, warmup)
    samples, cpu = [0] * len(pipelines), [0.0] * len(pipelines)
    for _ in range(rounds):
        for i, p in enumerate(pipelines):
            start = time.process_time()
            samples[i] += p.step()
            cpu[i] += time.process_time() - start
    return [n / t for n, t in zip(samples, cpu)]


def measure_throughput(pipeline: Pipeline, steps: int, warmup: int = 1) -> float:
    """Samples per second of `steps` full training steps, after `warmup` untimed ones."""
    for _ in range(warmup):
        pipeline.step()
    start, samples = time.perf_counter(), 0
    for _ in range(steps):
        samples += pipeline.step()
    return samples / (time.perf_counter() - start)


@dataclass
class Comparison:
    """Samples/s of one pipeline over alternating rounds: overall (total samples / total time) and per round;
    `warmup_s`: the wall seconds of its untimed first steps (which include `torch.compile`'s compilation).
    """

    name: str
    samples_per_s: float
    rounds: list[float]
    warmup_s: float


def compare(pipelines: list[Pipeline], rounds: int = 3, steps: int = 2, warmup: int = 1) -> list[Comparison]:
    """Time the pipelines in turn, A B C A B C ..., `steps` steps each per round, after `warmup` each.

    Taught in notebooks/07_coco_training.ipynb

    Alternating spreads a change in the machine's load over every pipeline instead of one.
    """
    warmup_s = []
    for p in pipelines:
        start = time.perf_counter()
        measure_throughput(p, 0, warmup)
        warmup_s.append(time.perf_counter() - start)
    per_round: list[list[float]] = [[] for _ in pipelines]
    for _ in range(rounds):
        for rates, p in zip(per_round, pipelines):
            rates.append(measure_throughput(p, steps, warmup=0))
    # Equal samples per round, so the overall rate is the harmonic mean of the round rates.
    return [Comparison(p.name, len(r) / sum(1 / x for x in r), r, w)
            for p, r, w in zip(pipelines, per_round, warmup_s)]


def format_table(results: list[Comparison], baseline: str | None = None) -> str:
    """A Markdown table: samples/s, the spread over rounds, the speed-up over `baseline` (the first) and the
    wall seconds of the warm-up steps.

    Taught in notebooks/07_coco_training.ipynb
    """
    base = next(r for r in results if r.name == (baseline or results[0].name)).samples_per_s
    lines = ["| pipeline | samples/s | rounds (min - max) | x naive | warm-up s |", "|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.name} | {r.samples_per_s:.1f} | {min(r.rounds):.1f} - {max(r.rounds):.1f} "
                     f"| {r.samples_per_s / base:.2f} | {r.warmup_s:.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The GPU check: the coco_gpu preset at COCO's size
# ---------------------------------------------------------------------------------------------


def gpu_epoch_check(device: str | torch.device = "cuda", steps: int = 100, warmup: int = 10,
                    smoke: bool = False) -> dict[str, float]:
    """Train the coco_gpu preset (bf16 autocast, the cache on the device) on a COCO-sized synthetic cache.

    Taught in notebooks/07_coco_training.ipynb

    Returns samples/s, the precision, peak device memory (GiB; 0 off CUDA) and the projected minutes for
    one epoch of images (118k, what `CacheLoader` serves per epoch) and of all 591k caption pairs. `smoke`:
    the tiny preset on 64 images, for checking the code on a CPU.
    """
    device = torch.device(device)
    cfg = preset("tiny" if smoke else "coco_gpu")
    n_images = 64 if smoke else COCO_TRAIN_IMAGES
    vocab_size = 200 if smoke else COCO_WORDPIECES + 4
    cache = synthetic_cache(n_images, 5, vocab_size, cfg.model.image_size, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loader = CacheLoader(cache, cfg.train.batch_size, drop_last=True, device=device)
    torch.manual_seed(cfg.train.seed)
    model = MultimodalVAE(dataclasses.replace(cfg.model, vocab_size=vocab_size)).to(device).train()
    pipeline = Pipeline("coco_gpu", _forever(loader), model, device, cfg.train.amp, lr=cfg.train.lr,
                        grad_clip=cfg.train.grad_clip)
    rate = measure_throughput(pipeline, steps, warmup)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return {
        "samples_per_s": rate, "batch_size": cfg.train.batch_size, "n_images": n_images,
        "precision": str(amp_dtype(device, cfg.train.amp)).removeprefix("torch."),
        "peak_memory_gib": peak, "loss": pipeline.last_loss,
        "epoch_images_min": COCO_TRAIN_IMAGES / rate / 60,
        "epoch_captions_min": COCO_TRAIN_CAPTIONS / rate / 60,
    }
