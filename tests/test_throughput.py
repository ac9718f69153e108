"""The throughput benchmark's pipelines: they train, and the naive one optimises the same objective.

No timing assertions here: speed is measured by benchmarks/train_throughput.py, not tested.
"""

import argparse
import dataclasses
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mvae_course.config import preset
from mvae_course.data.cache import CacheLoader
from mvae_course.data.text import BERT_VOCAB_SIZE, PAD, pad_captions
from mvae_course.models.mvae import MultimodalVAE
from mvae_course.throughput import (
    COURSE,
    MAX_TOKENS,
    NAIVE,
    OP_KINDS,
    FullLogitsVAE,
    Levers,
    bert_to_compact,
    build_pipeline,
    collate_bert,
    compare,
    flops_per_sample,
    format_table,
    gpu_epoch_check,
    lever_ladder,
    load_train_data,
    matmul_peak,
    op_kind,
    step_profile,
)
from mvae_course.data.synthetic import make_synthetic_coco, synthetic_cache, synthetic_captions

REPO = Path(__file__).resolve().parents[1]
TINY = preset("tiny").model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("throughput")
    root = make_synthetic_coco(tmp / "coco", n_images=8, size=(48, 40), n_words=60)
    return load_train_data(root, "train2017", tmp / "cache", image_size=TINY.image_size)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("levers", [NAIVE, COURSE, dataclasses.replace(COURSE, bf16=False)],
                         ids=["naive", "course", "course-fp32"])
def test_pipeline_takes_a_finite_step(data, levers):
    pipeline = build_pipeline(levers, data, batch_size=4, model_config=TINY)
    before = _params(pipeline.model)
    assert pipeline.step() == 4
    assert torch.isfinite(torch.tensor(pipeline.last_loss))
    changed = [not torch.equal(a, b) for a, b in zip(before, pipeline.model.parameters())]
    assert sum(changed) > len(changed) // 2  # the optimiser moved (nearly) every tensor


def test_pipelines_see_the_batches_their_levers_describe(data):
    naive = next(build_pipeline(NAIVE, data, batch_size=4, model_config=TINY).batches)
    course = next(build_pipeline(COURSE, data, batch_size=4, model_config=TINY).batches)
    assert naive["text"].shape == (4, MAX_TOKENS) and int(naive["text"].max()) >= BERT_VOCAB_SIZE // 100
    assert course["text"].shape[1] == int(course["lengths"].max()) < MAX_TOKENS
    assert int(course["text"].max()) < data.tokenizer.vocab_size
    assert naive["image"].shape == course["image"].shape == (4, 3, TINY.image_size, TINY.image_size)


def test_op_kinds_read_profiler_and_flop_counter_names():
    assert op_kind("aten::addmm") == op_kind("aten.bmm") == "matrix products"
    assert op_kind("aten::convolution_backward") == op_kind("aten.convolution") == "convolutions"
    assert op_kind("aten::add_") == op_kind("aten.sigmoid") == op_kind("Optimizer.step#AdamW.step") \
        == "everything else"


def test_flops_per_sample_counts_fewer_for_the_course_than_the_naive_pipeline(data):
    naive = flops_per_sample(build_pipeline(NAIVE, data, batch_size=4, model_config=TINY))
    course = flops_per_sample(build_pipeline(COURSE, data, batch_size=4, model_config=TINY))
    # The same networks; the naive decoder also scores every padded position against BERT's 30522 ids.
    assert 0 < course < naive


def test_step_profile_splits_the_step_by_kind_of_op(data):
    pipeline = build_pipeline(COURSE, data, batch_size=4, model_config=TINY)
    rows = step_profile(pipeline, steps=2, top=3)
    by_name = {r["ops"]: r for r in rows}
    assert [r["ops"] for r in rows[:3]] == list(OP_KINDS) and rows[-1]["ops"] == "the step"
    assert len(rows) == 3 + 3 + 1 and all(r["ops"].startswith("of which ") for r in rows[3:-1])
    step = by_name["the step"]
    assert step["ms / step"] == pytest.approx(sum(by_name[k]["ms / step"] for k in OP_KINDS))
    assert by_name["matrix products"]["GFLOP / step"] > 0 and by_name["convolutions"]["GFLOP / step"] > 0
    assert by_name["everything else"]["GFLOP / step"] == 0  # elementwise work does no counted FLOPs
    assert all(0 < r["ms / step"] <= by_name["everything else"]["ms / step"] for r in rows[3:-1])
    # per-step means, rounded (a batch's caption length sets how many GRU steps run)
    assert step["calls / step"] == pytest.approx(sum(by_name[k]["calls / step"] for k in OP_KINDS), abs=2)
    assert by_name["everything else"]["calls / step"] > by_name["matrix products"]["calls / step"] > 0


def test_matmul_peak_of_a_rectangular_product():
    rate = matmul_peak(torch.float32, n=48, m=8, k=16, seconds=0.02, repeats=1)
    assert 0 < rate < 1e5  # GFLOP per CPU s: positive, and not absurd for one core


def test_naive_and_course_text_losses_agree_when_the_vocabularies_map(data):
    """The course's real-token loss over compact ids = the naive ignore_index loss over the BERT ids they
    map to, when the BERT model's rows are the compact model's and every other logit is -inf."""
    tok = data.tokenizer
    captions = data.cache.captions[:6]
    text, lengths = pad_captions(tok.encode_batch(captions))
    # The naive collate tokenises the strings with BERT: the same ids, mapped, padded to 32.
    bert = collate_bert([(torch.zeros(3, 32, 32), [c]) for c in captions])
    assert torch.equal(bert["lengths"], lengths)
    assert torch.equal(bert["text"][:, : text.shape[1]], tok.wordpiece_ids[text])
    assert torch.equal(bert_to_compact(tok)[bert["text"]][:, : text.shape[1]], text)

    torch.manual_seed(0)
    course = MultimodalVAE(dataclasses.replace(TINY, vocab_size=tok.vocab_size)).eval()
    cls_id = int(tok.wordpiece_ids[1])  # BOS maps to BERT's [CLS]
    naive = FullLogitsVAE(dataclasses.replace(TINY, vocab_size=BERT_VOCAB_SIZE), bos_id=cls_id)
    with torch.no_grad():
        state = {k: v for k, v in course.state_dict().items() if v.shape[0] != tok.vocab_size}
        naive.load_state_dict(state, strict=False)
        for name in ("text_encoder.embedding", "text_decoder.embedding", "text_decoder.out"):
            small, big = course.get_submodule(name), naive.get_submodule(name)
            big.weight[tok.wordpiece_ids] = small.weight
        naive.text_decoder.out.bias.fill_(-torch.inf)
        naive.text_decoder.out.bias[tok.wordpiece_ids] = course.text_decoder.out.bias
    naive.eval()
    image = torch.rand(6, 3, TINY.image_size, TINY.image_size)
    terms = {}
    for name, model, batch_text in (("course", course, text), ("naive", naive, bert["text"])):
        torch.manual_seed(1)  # the same reparameterisation noise
        terms[name] = model({"image": image, "text": batch_text, "lengths": lengths})
    for key in ("loss", "rec_text", "elbo_text", "elbo_joint"):
        torch.testing.assert_close(terms["naive"][key], terms["course"][key], rtol=1e-5, atol=1e-4)
    assert bert["text"].eq(PAD).any()  # the naive batch really carried padding that ignore_index dropped


def test_levers_ladder_and_validation():
    ladder = lever_ladder(["compile"])
    assert ladder[0] == ("naive", NAIVE)
    assert ladder[5] == ("+ bf16", COURSE)
    assert ladder[-1] == ("+ compile", dataclasses.replace(COURSE, compile=True))
    with pytest.raises(ValueError, match="compact_vocab"):
        Levers(real_token_logits=True)
    with pytest.raises(ValueError, match="unknown lever"):
        lever_ladder(["turbo"])


def test_synthetic_captions_are_coco_like(data):
    captions = synthetic_captions(400, n_words=300, seed=3)
    counts = [len(ids) for ids in data.tokenizer.encode_batch(captions)]
    assert counts == [len(c.split()) for c in captions]  # one wordpiece per word
    assert 12.5 < sum(counts) / len(counts) < 15.0
    assert len({w for c in captions for w in c.split()}) > 150  # a long tail, not a handful of words


def test_synthetic_cache_serves_valid_batches():
    cache = synthetic_cache(20, captions_per_image=5, vocab_size=50, image_size=32)
    assert cache.images.dtype == torch.uint8 and len(cache) == 20 and cache.offsets.shape == (101,)
    batch = next(iter(CacheLoader(cache, 8)))
    assert batch["image"].shape == (8, 3, 32, 32)
    assert bool((batch["text"] < 50).all()) and bool((batch["lengths"] >= 6).all())
    assert torch.equal(batch["text"].gather(1, batch["lengths"][:, None] - 1).squeeze(1), torch.full((8,), 2))


def test_compare_alternates_and_tabulates(data):
    pipelines = [build_pipeline(lv, data, 4, model_config=TINY, name=n) for n, lv in (("naive", NAIVE),
                                                                                      ("course", COURSE))]
    results = compare(pipelines, rounds=2, steps=1, warmup=1)
    assert [r.name for r in results] == ["naive", "course"] and all(len(r.rounds) == 2 for r in results)
    assert all(min(r.rounds) <= r.samples_per_s <= max(r.rounds) for r in results)
    table = format_table(results)
    assert "| naive |" in table and "| 1.00 |" in table.splitlines()[2]
    assert all(r.warmup_s > 0 for r in results)  # the untimed first step, timed on its own


def test_gpu_epoch_check_smoke_on_cpu():
    check = gpu_epoch_check("cpu", steps=1, warmup=0, smoke=True)
    assert check["samples_per_s"] > 0 and torch.isfinite(torch.tensor(check["loss"]))
    assert check["epoch_captions_min"] == pytest.approx(5 * check["epoch_images_min"], rel=0.01)


@pytest.mark.slow
def test_gpu_check_command_smoke_on_cpu():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "gpu",
                           "--device", "cpu", "--smoke"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "projected epoch" in done.stdout and "| course" in done.stdout  # "course (bf16)" where bf16 runs


def test_lesson_workload_command_smoke(tmp_path, monkeypatch, capsys):
    # Its 1-step baseline once broke unnoticed (a 0-step run became an error): run its main, tiny, with two
    # variants, each job in this process (the script starts an interpreter per job: only slower here).
    path = REPO / "benchmarks" / "lesson_workload.py"
    script = importlib.util.module_from_spec(importlib.util.spec_from_file_location("lesson_workload", path))
    monkeypatch.setitem(sys.modules, "lesson_workload", script)  # its dataclasses look their module up there
    script.__spec__.loader.exec_module(script)
    monkeypatch.setattr(script, "run_job", lambda v, job: script.work({**job, "amp": v.amp,
                                                                        "threads": v.threads}))
    monkeypatch.setattr(sys, "argv", ["lesson_workload.py", "--preset", "tiny", "--fusions", "poe", "--steps",
                                      "3", "--data-dir", str(tmp_path), "--variant", f"a={REPO}",
                                      "--variant", f"b={REPO}:amp=off"])
    threads = torch.get_num_threads()
    try:
        script.main()
    finally:
        torch.set_num_threads(threads)  # a job sets the variant's
    out = capsys.readouterr().out
    assert "### The tiny preset per fusion (3 steps, batch 32)" in out
    row = next(line for line in out.splitlines() if line.startswith("| poe |"))
    cells = [float(c) for c in row.strip("|").split("|")[1:]]  # a's, b's samples/s, CPU s / 1000 steps; a / b
    assert len(cells) == 5 and all(math.isfinite(c) for c in cells)
    assert cells[0] > 0 and cells[2] > 0  # samples/s from the logs (CPU s differences are noise at 3 steps)
    # each variant prepares its data, untimed, in a folder of its own: an older checkout's data cannot make
    # another variant rebuild its cache inside a timed run
    assert "a: data prepared" in out and "b: data prepared" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    # The options a variant takes, and a clear error for one it does not
    variant = script.Variant.parse(f"c={REPO}:amp=off:threads=2:compile=on")
    assert (variant.amp, variant.threads, variant.compile) == (False, 2, True)
    assert script.Variant.parse(f"d={REPO}").compile is False
    with pytest.raises(argparse.ArgumentTypeError, match="unknown option 'compile=yes'"):
        script.Variant.parse(f"e={REPO}:compile=yes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_course_pipeline_bf16_on_cuda(data):
    pipeline = build_pipeline(dataclasses.replace(COURSE, bf16=True), data, 4, "cuda", model_config=TINY)
    pipeline.step()
    assert torch.isfinite(torch.tensor(pipeline.last_loss))
