"""Training throughput: the pipeline a first attempt would write, the course's, and each lever between them.

Taught in notebooks/06_coco_training.ipynb.

The naive pipeline decodes every JPEG with PIL on every access (torchvision's `CocoCaptions` with
Resize / CenterCrop / ToTensor and a `DataLoader`), tokenises with BERT's full 30522-entry vocabulary,
pads every caption to 32 tokens and scores the decoder at every position: B x 32 x 30522 logits, with
padding dropped afterwards by `cross_entropy(..., ignore_index=PAD)`. The course's pipeline trains the
same networks on the same objective, and pulls four levers:

    cache               images decoded once into uint8 tensors, batches by tensor indexing (`CacheLoader`)
    compact_vocab       only the wordpieces the captions use (`CaptionTokenizer`): V ~ 7k, not 30522
    dynamic_padding     pad to the longest caption of the batch, not to 32
    real_token_logits   the output layer runs at the N real tokens only (N x V, `TextDecoder.log_likelihood`)

and, measured on top (kept only where they pay): channels_last, compile (the convolutions), bf16.

`Levers` names a set of them; `build_pipeline` builds one set-up; `measure_throughput` and `compare`
time full training steps (forward, backward, AdamW step), alternating set-ups so that a change in the
machine's load hits all of them alike. `benchmarks/train_throughput.py` is the command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import random
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.datasets import CocoCaptions

from mvae_course.config import ModelConfig, preset
from mvae_course.data.cache import CacheLoader, CaptionCache, ensure_cache
from mvae_course.data.coco import annotation_path, read_captions
from mvae_course.data.text import BERT_VOCAB_SIZE, PAD, UNK, CaptionTokenizer, bert_tokenizer
from mvae_course.models.mvae import MultimodalVAE

MAX_TOKENS = 32  # the naive pipeline pads (and truncates) every caption to this, EOS included
COCO_TRAIN_IMAGES = 118_287  # COCO 2017 train: images and caption pairs, for epoch projections
COCO_TRAIN_CAPTIONS = 591_753
COCO_WORDPIECES = 6_700  # distinct wordpieces in COCO's training captions (order of magnitude)
COCO_MEAN_TOKENS = 13.8  # mean wordpieces per COCO caption


# ---------------------------------------------------------------------------------------------
# Levers and pipelines
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Levers:
    """Which speed-ups a pipeline uses; all False is the naive pipeline.

    Taught in notebooks/06_coco_training.ipynb
    """

    cache: bool = False
    compact_vocab: bool = False
    dynamic_padding: bool = False
    real_token_logits: bool = False
    channels_last: bool = False
    compile: bool = False
    bf16: bool = False  # autocast to bfloat16 (CUDA; CPUs with AVX512-BF16/AMX)

    def __post_init__(self) -> None:
        if self.real_token_logits and not self.compact_vocab:
            # The package's decoder prepends the compact BOS id; BERT ids need the naive loss's [CLS].
            raise ValueError("real_token_logits needs compact_vocab: the package's decoder reads compact ids")


NAIVE = Levers()
COURSE = Levers(cache=True, compact_vocab=True, dynamic_padding=True, real_token_logits=True)
LEVERS = tuple(f.name for f in dataclasses.fields(Levers))


def lever_ladder(extra: Iterable[str] = ()) -> list[tuple[str, Levers]]:
    """Naive, then one lever added at a time up to the course pipeline, then each of `extra` on top.

    Taught in notebooks/06_coco_training.ipynb

    Returns [(name, levers)], e.g. ("naive", NAIVE), ("+ cache", ...), ..., ("+ channels_last", ...).
    """
    ladder, levers = [("naive", NAIVE)], NAIVE
    for name in ("cache", "compact_vocab", "dynamic_padding", "real_token_logits", *extra):
        if name not in LEVERS:
            raise ValueError(f"unknown lever {name!r}; choose from {LEVERS}")
        levers = dataclasses.replace(levers, **{name: True})
        ladder.append((f"+ {name}", levers))
    return ladder


def benchmark_model_config(vocab_size: int) -> ModelConfig:
    """The coco_gpu preset's networks (conv 32-64-128 at 64 x 64, emb 300, bi-GRU 512, GRU 512, z 64).

    Taught in notebooks/06_coco_training.ipynb

    Word dropout is off: the naive pipeline's BERT ids have other special ids, and it costs nothing.
    """
    return dataclasses.replace(preset("coco_gpu").model, vocab_size=vocab_size, word_dropout=0.0)


def full_logits_log_likelihood(decoder: nn.Module, z: Tensor, text: Tensor, bos_id: int) -> Tensor:
    """log p(caption | z) the naive way: logits at every position, padding masked by ignore_index.

    Taught in notebooks/06_coco_training.ipynb

    decoder: a `TextDecoder` (its layers, not its packed forward); z: B x z_dim; text: B x T (content
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

    Taught in notebooks/06_coco_training.ipynb

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
    """Lookup table BERT id -> compact id (UNK outside the vocabulary): 30522 (int64).

    Taught in notebooks/06_coco_training.ipynb
    """
    table = torch.full((BERT_VOCAB_SIZE,), UNK, dtype=torch.long)
    table[tokenizer.wordpiece_ids] = torch.arange(tokenizer.vocab_size)
    return table


def collate_bert(items: list[tuple[Tensor, list[str]]]) -> dict[str, Tensor]:
    """The naive collate: one random caption per image, BERT ids padded to MAX_TOKENS.

    Taught in notebooks/06_coco_training.ipynb

    items: (3 x H x W image, captions) from `CocoCaptions`. Returns image B x 3 x H x W, text B x 32
    (BERT content ids, [SEP] as EOS, [PAD] = 0 after), lengths B.
    """
    images, captions = zip(*items)
    chosen = [random.choice(c) for c in captions]
    # [CLS] + content + [SEP], padded to 33; dropping [CLS] leaves the batch layout with [SEP] as EOS.
    enc = bert_tokenizer()(chosen, padding="max_length", truncation=True, max_length=MAX_TOKENS + 1,
                           return_tensors="pt")
    text = enc["input_ids"][:, 1:]
    return {"image": torch.stack(images), "text": text, "lengths": enc["attention_mask"].sum(1) - 1}


def naive_loader(root: str | Path, split: str, image_size: int, batch_size: int,
                 workers: int = 0) -> DataLoader:
    """JPEGs decoded with PIL on every access: torchvision's `CocoCaptions`, transforms and `DataLoader`.

    Taught in notebooks/06_coco_training.ipynb
    """
    transform = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor()])
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        ds = CocoCaptions(str(Path(root) / split), str(annotation_path(root, split)), transform=transform)
    return DataLoader(ds, batch_size, shuffle=True, drop_last=True, num_workers=workers,
                      collate_fn=collate_bert)


@dataclass
class TrainData:
    """One training split, both ways: its COCO folder (for the naive loader) and its cache + tokenizer.

    Taught in notebooks/06_coco_training.ipynb
    """

    root: Path
    split: str
    image_size: int
    tokenizer: CaptionTokenizer
    cache: CaptionCache


def load_train_data(root: str | Path, split: str, work_dir: str | Path, image_size: int = 64,
                    min_count: int = 1) -> TrainData:
    """Fit the compact tokenizer on the split's captions and build (or reuse) its cache under `work_dir`.

    Taught in notebooks/06_coco_training.ipynb
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
    if levers.channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    return {"image": image, "text": text.to(device), "lengths": lengths.to(device)}


class Pipeline:
    """A training set-up: endless batches, a model, AdamW with gradient clipping; `step()` trains once.

    Taught in notebooks/06_coco_training.ipynb
    """

    def __init__(self, name: str, batches: Iterator[dict[str, Tensor]], model: MultimodalVAE,
                 device: torch.device, bf16: bool = False, lr: float = 1e-3, grad_clip: float = 5.0) -> None:
        self.name, self.batches, self.model, self.device = name, batches, model, device
        self.bf16, self.grad_clip = bf16, grad_clip
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        self.last_loss = math.nan

    def step(self) -> int:
        """One full training step (next batch, forward, backward, AdamW); returns the samples it saw."""
        batch = next(self.batches)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with autocast:
            loss = self.model.loss(batch, beta=1.0)["loss"]
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

    Taught in notebooks/06_coco_training.ipynb

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
    if levers.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if levers.compile:  # the convolutions; the packed GRUs are left to eager mode
        model.image_encoder.compile()
        model.image_decoder.compile()
    batches = (_adapt(b, levers, vocab, device) for b in _forever(loader))
    return Pipeline(name or str(levers), batches, model, device, levers.bf16)


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def measure_throughput(pipeline: Pipeline, steps: int, warmup: int = 1) -> float:
    """Samples per second of `steps` full training steps, after `warmup` untimed ones.

    Taught in notebooks/06_coco_training.ipynb
    """
    for _ in range(warmup):
        pipeline.step()
    start, samples = time.perf_counter(), 0
    for _ in range(steps):
        samples += pipeline.step()
    return samples / (time.perf_counter() - start)


@dataclass
class Comparison:
    """Samples/s of one pipeline over alternating rounds: overall (total samples / total time) and per round.

    Taught in notebooks/06_coco_training.ipynb
    """

    name: str
    samples_per_s: float
    rounds: list[float]


def compare(pipelines: list[Pipeline], rounds: int = 3, steps: int = 2, warmup: int = 1) -> list[Comparison]:
    """Time the pipelines in turn, A B C A B C ..., `steps` steps each per round, after `warmup` each.

    Taught in notebooks/06_coco_training.ipynb

    Alternating spreads a change in the machine's load over every pipeline instead of one.
    """
    for p in pipelines:
        measure_throughput(p, 0, warmup)
    per_round: list[list[float]] = [[] for _ in pipelines]
    for _ in range(rounds):
        for rates, p in zip(per_round, pipelines):
            rates.append(measure_throughput(p, steps, warmup=0))
    # Equal samples per round, so the overall rate is the harmonic mean of the round rates.
    return [Comparison(p.name, len(r) / sum(1 / x for x in r), r) for p, r in zip(pipelines, per_round)]


def format_table(results: list[Comparison], baseline: str | None = None) -> str:
    """A Markdown table: samples/s, the spread over rounds, and the speed-up over `baseline` (the first).

    Taught in notebooks/06_coco_training.ipynb
    """
    base = next(r for r in results if r.name == (baseline or results[0].name)).samples_per_s
    lines = ["| pipeline | samples/s | rounds (min - max) | x naive |", "|---|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.name} | {r.samples_per_s:.1f} | {min(r.rounds):.1f} - {max(r.rounds):.1f} "
                     f"| {r.samples_per_s / base:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Synthetic COCO-sized data
# ---------------------------------------------------------------------------------------------


def word_pool(n_words: int = COCO_WORDPIECES) -> list[str]:
    """The first `n_words` whole-word entries of BERT's vocabulary (roughly by frequency).

    Taught in notebooks/06_coco_training.ipynb

    Each is one wordpiece, so a caption of them joined by spaces tokenises back to exactly them.
    """
    vocab = sorted(bert_tokenizer().get_vocab().items(), key=lambda kv: kv[1])
    words = [w for w, _ in vocab if w.isascii() and w.isalpha()]
    if n_words > len(words):
        raise ValueError(f"n_words={n_words}: BERT has only {len(words)} whole-word entries")
    return words[:n_words]


def zipf_probs(n: int, s: float = 1.0) -> Tensor:
    """Zipf's law over n ranks, p(r) proportional to 1 / r^s: n (float64), summing to 1.

    Taught in notebooks/06_coco_training.ipynb
    """
    p = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** s
    return p / p.sum()


def caption_lengths(n: int, generator: torch.Generator, mean: float = COCO_MEAN_TOKENS, std: float = 3.5,
                    device: str | torch.device = "cpu") -> Tensor:
    """Content wordpieces per caption, COCO-like: rounded Normal(mean, std) clipped to [5, 48]: n (int64)."""
    x = torch.randn(n, generator=generator, device=device) * std + mean
    return x.round().clamp(5, 48).long()


def synthetic_captions(n: int, n_words: int = COCO_WORDPIECES, seed: int = 0) -> list[str]:
    """n captions of Zipf-distributed whole words with COCO's mean length (13.8 wordpieces).

    Taught in notebooks/06_coco_training.ipynb
    """
    g = torch.Generator().manual_seed(seed)
    words = word_pool(n_words)
    lengths = caption_lengths(n, g)
    ids = torch.multinomial(zipf_probs(n_words), int(lengths.sum()), replacement=True, generator=g).tolist()
    starts = [0, *torch.cumsum(lengths, 0).tolist()]
    return [" ".join(words[i] for i in ids[a:b]) for a, b in zip(starts, starts[1:])]


def synthetic_jpeg(rng: np.random.Generator, noise: np.ndarray, width: int = 640, height: int = 480) -> bytes:
    """A COCO-sized photo stand-in: smooth random colours plus grain, as JPEG (about 100 kB at 640 x 480)."""
    low = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), dtype=np.int16)
    pixels += noise[: height, : width]
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_synthetic_coco(root: str | Path, split: str = "train2017", n_images: int = 2000,
                        captions_per_image: int = 5, size: tuple[int, int] = (640, 480),
                        n_words: int = COCO_WORDPIECES, seed: int = 0) -> Path:
    """A COCO-layout folder of synthetic JPEGs (`size` = width, height) and COCO-like captions.

    Taught in notebooks/06_coco_training.ipynb

    Writes root/annotations/captions_<split>.json and root/<split>/<id>.jpg; returns root.
    """
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    noise = rng.integers(-12, 13, (height, width, 3)).astype(np.int16)
    captions = synthetic_captions(n_images * captions_per_image, n_words, seed)
    images, annotations = [], []
    for i in range(n_images):
        name = f"{i + 1:012d}.jpg"
        (root / split / name).write_bytes(synthetic_jpeg(rng, np.roll(noise, i * 7, axis=1), width, height))
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
        for k in range(captions_per_image):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "caption": captions[i * captions_per_image + k]})
    annotation_path(root, split).write_text(json.dumps({"images": images, "annotations": annotations}))
    return root


def synthetic_cache(n_images: int, captions_per_image: int = 5, vocab_size: int = COCO_WORDPIECES + 4,
                    image_size: int = 64, device: str | torch.device = "cpu", seed: int = 0) -> CaptionCache:
    """A `CaptionCache` of random images and Zipf-distributed compact ids, made straight on `device`.

    Taught in notebooks/06_coco_training.ipynb

    No files and no tokenizer: for timing training at COCO's size (118k images, 591k captions) in
    seconds. Images are uniform noise, so only the speed means anything, not the loss.
    """
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    images = torch.randint(0, 256, (n_images, 3, image_size, image_size), generator=g, device=device,
                           dtype=torch.uint8)
    n_captions = n_images * captions_per_image
    lengths = caption_lengths(n_captions, g, device=device)
    probs = zipf_probs(vocab_size - 4).float().to(device)
    tokens = (torch.multinomial(probs, int(lengths.sum()), replacement=True, generator=g) + 4).to(torch.int16)
    offsets = F.pad(torch.cumsum(lengths, 0), (1, 0))
    meta: dict[str, Any] = {"tokenizer": "synthetic", "vocab_size": vocab_size, "n_images": n_images,
                            "n_captions": n_captions, "image_size": image_size}
    return CaptionCache(
        images=images, image_ids=torch.arange(1, n_images + 1, device=device), tokens=tokens, offsets=offsets,
        caption_image=torch.arange(n_images, device=device).repeat_interleave(captions_per_image),
        captions=[], attributes=None, meta=meta,
    )


# ---------------------------------------------------------------------------------------------
# The GPU check: the coco_gpu preset at COCO's size
# ---------------------------------------------------------------------------------------------


def gpu_epoch_check(device: str | torch.device = "cuda", steps: int = 100, warmup: int = 10,
                    smoke: bool = False) -> dict[str, float]:
    """Train the coco_gpu preset (bf16, cache resident on the device) on a COCO-sized synthetic cache.

    Taught in notebooks/06_coco_training.ipynb

    Returns samples/s, peak device memory (GiB; 0 off CUDA) and the projected minutes for one epoch
    of images (118k, what `CacheLoader` serves per epoch) and of all 591k caption pairs. `smoke`: the
    tiny preset on 64 images, for checking the code on a CPU.
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
    bf16 = cfg.train.amp and device.type == "cuda"  # as train.py: autocast on CUDA only
    pipeline = Pipeline("coco_gpu", _forever(loader), model, device, bf16, lr=cfg.train.lr,
                        grad_clip=cfg.train.grad_clip)
    rate = measure_throughput(pipeline, steps, warmup)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return {
        "samples_per_s": rate, "batch_size": cfg.train.batch_size, "n_images": n_images,
        "peak_memory_gib": peak, "loss": pipeline.last_loss,
        "epoch_images_min": COCO_TRAIN_IMAGES / rate / 60,
        "epoch_captions_min": COCO_TRAIN_CAPTIONS / rate / 60,
    }
