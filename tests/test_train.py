"""The training loop: learning, exact resume, atomic checkpoints, clear errors, the command line."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mvae_course import device as device_module
from mvae_course.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mvae_course.config import Config, preset
from mvae_course.models.mvae import MultimodalVAE
from mvae_course.cli import add_train_arguments, config_from_args, main, run_train
from mvae_course.device import pick_device
from mvae_course.metrics_log import read_metrics
from mvae_course.runs import load_model, train_or_load
from mvae_course.train import NonFiniteLossError, Terminated, TrainResult, kl_beta, lr_factor, train
from conftest import need_coco_mini


def small_config(**train_opts) -> Config:
    """The tiny preset on an even smaller data set: 4 batches per epoch, a dozen steps."""
    cfg = preset("tiny").replace(
        data={"n_train": 64, "n_val": 32},
        train={"batch_size": 16, "max_steps": 12, "warmup_steps": 2, "kl_warmup_steps": 6,
               "eval_every": 6, "ckpt_every": 6, "log_every": 2, "device": "cpu"},
    )
    return cfg.replace(train=train_opts)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data_dir) -> TrainResult:
    """One uninterrupted run, shared by the tests that compare against it or read its files."""
    return train(small_config(), tmp_path_factory.mktemp("run") / "full", progress=False, data_dir=data_dir)


def fail_on_training_call(monkeypatch, k: int, make_error) -> None:
    """Make the model's k-th training-mode loss call (step k) raise, or return what `make_error` gives."""
    real_loss = MultimodalVAE.forward
    calls = {"n": 0}

    def loss(self, batch, beta=1.0):
        terms = real_loss(self, batch, beta)
        if self.training:
            calls["n"] += 1
            if calls["n"] == k:
                return make_error(terms)
        return terms

    monkeypatch.setattr(MultimodalVAE, "forward", loss)


def raise_(error: BaseException):
    def make(terms):
        raise error
    return make


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- schedules and devices ----------------------------------------------------------------------


def test_kl_beta_rises_linearly_then_stays_at_one():
    assert kl_beta(0, 10) == 0.0
    assert kl_beta(5, 10) == pytest.approx(0.5)
    assert kl_beta(10, 10) == kl_beta(1000, 10) == 1.0
    assert kl_beta(0, 0) == 1.0


def test_lr_factor_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, 4, 20) for s in range(21)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert factors[12] == pytest.approx(0.5)
    assert factors[20] == pytest.approx(0.0, abs=1e-12)


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert pick_device("auto") in (torch.device("cpu"), torch.device("mps"))
        with pytest.raises(ValueError, match="no CUDA"):
            pick_device("cuda")


# --- a real run -----------------------------------------------------------------------------------


def test_training_lowers_the_validation_loss_and_writes_its_files(full_run):
    out = full_run.out_dir
    for name in ("config.json", "tokenizer.json", "metrics.csv", "last.pt", "best.pt"):
        assert (out / name).is_file(), name
    rows = read_metrics(out / "metrics.csv")
    assert list(rows[0])[:3] == ["step", "epoch", "split"]
    assert {"loss", "kl", "lr", "beta", "samples_per_s"} <= set().union(*rows)  # empty cells are left out
    val = [r for r in rows if r["split"] == "val"]
    assert [int(r["step"]) for r in val] == [0, 6, 12]
    assert float(val[-1]["loss"]) < float(val[0]["loss"]) - 100  # the untrained model is far worse
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [int(r["step"]) for r in train_rows] == list(range(2, 13, 2))
    assert float(train_rows[-1]["beta"]) == 1.0 and float(train_rows[0]["beta"]) < 1.0
    assert float(train_rows[-1]["samples_per_s"]) > 0
    assert full_run.step == 12 and full_run.val["loss"] == pytest.approx(float(val[-1]["loss"]))
    saved = Config.load(out / "config.json")
    assert saved.model.vocab_size == full_run.tokenizer.vocab_size > 4


def test_load_model_rebuilds_the_trained_model(full_run):
    model, tokenizer, config = load_model(full_run.out_dir / "last.pt", device="cpu")
    assert not model.training and config.model.fusion == "poe"
    assert tokenizer.wordpieces == full_run.tokenizer.wordpieces
    assert same_weights(model.state_dict(), full_run.model.state_dict())
    best, _, _ = load_model(full_run.out_dir, device="cpu")  # a folder: its best.pt
    best_val = load_checkpoint(full_run.out_dir / "best.pt")["best_val"]
    assert best_val == pytest.approx(full_run.best_val_loss)
    assert isinstance(best, MultimodalVAE)


def test_resuming_a_finished_run_changes_nothing(full_run, tmp_path, data_dir):
    run = tmp_path / "again"
    shutil.copytree(full_run.out_dir, run, ignore=shutil.ignore_patterns("data"))
    result = train(small_config(), run, resume=True, progress=False, data_dir=data_dir)
    assert result.step == 12
    assert same_weights(result.model.state_dict(), full_run.model.state_dict())


def test_train_or_load_loads_a_finished_run_and_trains_an_empty_folder(full_run, tmp_path, data_dir):
    run = tmp_path / "lesson"
    shutil.copytree(full_run.out_dir, run, ignore=shutil.ignore_patterns("data"))
    loaded = train_or_load(small_config(), run, data_dir=data_dir)
    assert loaded.step == 12 and loaded.seconds >= 0
    assert same_weights(loaded.model.state_dict(), full_run.model.state_dict())
    fresh = train_or_load(small_config(max_steps=2), tmp_path / "new", data_dir=data_dir)
    assert fresh.step == 2 and (tmp_path / "new" / "last.pt").is_file()


def test_read_metrics_gives_numbers_by_split(full_run):
    val = read_metrics(full_run.out_dir, split="val")
    assert [row["step"] for row in val] == [0.0, 6.0, 12.0]
    assert all(row["split"] == "val" and isinstance(row["loss"], float) for row in val)
    assert len(read_metrics(full_run.out_dir / "metrics.csv")) == len(val) + len(read_metrics(full_run.out_dir, "train"))


def test_a_second_run_into_the_same_folder_is_refused(full_run, data_dir):
    with pytest.raises(FileExistsError, match="resume"):
        train(small_config(), full_run.out_dir, progress=False, data_dir=data_dir)


@pytest.mark.parametrize(
    "error, saved_step",
    [
        (RuntimeError("simulated crash"), 6),  # a crash (or kill) saves nothing: resume from step 6
        (KeyboardInterrupt(), 8),  # Ctrl-C saves the last finished step first
    ],
    ids=["killed", "interrupted"],
)
def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(
    full_run, tmp_path, data_dir, monkeypatch, error, saved_step
):
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        fail_on_training_call(patch, 9, raise_(error))  # during step 9, mid-epoch
        with pytest.raises(type(error)):
            train(small_config(), run, progress=False, data_dir=data_dir)
    assert load_checkpoint(run / "last.pt")["step"] == saved_step
    result = train(small_config(), run, resume=True, progress=False, data_dir=data_dir)
    assert result.step == 12
    assert same_weights(result.model.state_dict(), full_run.model.state_dict())
    rows = read_metrics(run / "metrics.csv")
    assert [(r["step"], r["split"]) for r in rows] == [
        (r["step"], r["split"]) for r in read_metrics(full_run.out_dir / "metrics.csv")
    ]  # rows logged after the checkpoint were dropped, not duplicated


def test_ctrl_c_during_the_weight_update_still_resumes_exactly(full_run, tmp_path, data_dir, monkeypatch):
    run = tmp_path / "run"
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step_then_ctrl_c(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:
            os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of the update of step 9
        return real_step(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", step_then_ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            train(small_config(), run, progress=False, data_dir=data_dir)
    assert load_checkpoint(run / "last.pt")["step"] == 9  # the update finished, then Ctrl-C was honoured
    result = train(small_config(), run, resume=True, progress=False, data_dir=data_dir)
    assert same_weights(result.model.state_dict(), full_run.model.state_dict())


def test_resume_is_exact_under_bf16_autocast_too(full_run, tmp_path, data_dir, monkeypatch):
    # bf16 as on a CPU with AVX512-BF16 or AMX (emulated by PyTorch where this one has neither).
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: True)
    full = train(small_config(amp=True), tmp_path / "full", progress=False, data_dir=data_dir)
    assert not same_weights(full.model.state_dict(), full_run.model.state_dict())  # bf16 changed the run
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        fail_on_training_call(patch, 9, raise_(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            train(small_config(amp=True), run, progress=False, data_dir=data_dir)
    result = train(small_config(amp=True), run, resume=True, progress=False, data_dir=data_dir)
    assert same_weights(result.model.state_dict(), full.model.state_dict())


def test_training_uses_the_configured_threads_then_restores_the_callers(tmp_path, data_dir, monkeypatch):
    seen = []
    real_forward = MultimodalVAE.forward

    def forward(self, batch, beta=1.0):
        seen.append(torch.get_num_threads())
        return real_forward(self, batch, beta)

    monkeypatch.setattr(MultimodalVAE, "forward", forward)
    torch.set_num_threads(3)
    try:
        train(small_config(max_steps=2, threads=2), tmp_path / "run", progress=False, data_dir=data_dir)
        assert set(seen) == {2} and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(1)  # the test session's setting (conftest.one_thread)


# --- checkpoints ----------------------------------------------------------------------------------


def test_a_failed_save_leaves_the_previous_checkpoint_intact(full_run, tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    shutil.copy(full_run.out_dir / "last.pt", path)
    before = load_checkpoint(path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint({**before, "step": 999}, path)
    monkeypatch.undo()
    after = load_checkpoint(path)
    assert after["step"] == before["step"] == 12
    assert same_weights(after["model"], before["model"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # the temporary file is gone


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_an_unreadable_checkpoint_is_a_clear_error(full_run, tmp_path, damage):
    path = tmp_path / "last.pt"
    data = (full_run.out_dir / "last.pt").read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError) as info:
        load_model(path, device="cpu")
    message = str(info.value)
    assert str(path) in message
    assert ("no such file" if damage == "missing" else "truncated, corrupt") in message


def test_a_checkpoint_that_is_not_a_training_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(CheckpointError, match="is missing"):
        load_checkpoint(path)


@pytest.mark.parametrize("change", [{"fusion": "moe"}, {"z_dim": 8}])
def test_resuming_with_another_model_config_is_a_clear_error(full_run, tmp_path, data_dir, change):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(full_run.out_dir / "last.pt", run / "last.pt")
    cfg = small_config().replace(model=change)
    with pytest.raises(CheckpointError) as info:
        train(cfg, run, resume=True, progress=False, data_dir=data_dir)
    (key, value), = change.items()
    message = str(info.value)
    assert str(run / "last.pt") in message and f"model.{key}" in message and repr(value) in message
    assert "new output folder" in message


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(
    full_run, tmp_path, data_dir, monkeypatch
):
    def nan_kl(terms):
        terms["kl"] = terms["kl"] * float("nan")
        return terms

    fail_on_training_call(monkeypatch, 8, nan_kl)
    run = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"step 8: kl=nan") as info:
        train(small_config(), run, progress=False, data_dir=data_dir)
    assert "loss=" not in str(info.value)  # only the term that went bad is named
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["step"] == 6
    assert all(torch.isfinite(w).all() for w in ckpt["model"].values())


# --- command line ---------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parser.parse_args(argv)


def test_command_line_options_build_the_config(tmp_path):
    cfg = config_from_args(parse(["--preset", "tiny", "--fusion", "moe", "--epochs", "3", "--seed", "7",
                                  "--data", "coco", "--root", str(tmp_path)]))
    assert cfg.name == "tiny" and cfg.model.fusion == "moe"
    assert cfg.train.epochs == 3 and cfg.train.max_steps is None and cfg.train.seed == 7
    assert cfg.data.dataset == "coco" and cfg.data.root == str(tmp_path)
    assert (cfg.data.train_split, cfg.data.val_split) == ("train2017", "val2017")
    with pytest.raises(SystemExit):
        parse(["--max-steps", "3", "--epochs", "2"])


def test_run_train_from_a_config_file(tmp_path, data_dir, capsys):
    small_config().save(tmp_path / "small.yaml")
    argv = ["train", "--config", str(tmp_path / "small.yaml"), "--max-steps", "2",
            "--out", str(tmp_path / "run"), "--data-dir", str(data_dir), "--no-progress"]
    assert run_train(parse(argv[1:])) == 0
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 2
    assert "trained 2 steps" in capsys.readouterr().out
    assert main(argv) == 1  # the folder is taken and --resume was not given: one error line
    err = capsys.readouterr().err
    assert "--resume" in err and "Traceback" not in err


@pytest.mark.slow
def test_train_then_evaluate_on_coco_captions(tmp_path, capsys):

    root = need_coco_mini()
    cfg = small_config(max_steps=3, eval_every=3).replace(
        data={"dataset": "coco", "root": str(root), "train_split": "train2017", "val_split": "val2017"}
    )
    result = train(cfg, tmp_path / "run", progress=False, data_dir=tmp_path / "data")
    assert result.step == 3 and torch.isfinite(torch.tensor(result.val["loss"]))
    assert result.tokenizer.vocab_size > 100  # real captions have a real vocabulary

    # The COCO metrics from the command line: retrieval, caption metrics with the sentence model, IWAE.
    assert main(["evaluate", "--run", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data"), "--k", "2",
                 "--device", "cpu", "--no-figures"]) == 0
    assert "metrics_val.json" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "metrics_val.json").read_text())
    n_val = len(json.loads((root / "annotations" / "captions_val2017.json").read_text())["images"])
    assert metrics["dataset"] == "coco" and metrics["images"] == n_val and "coherence" not in metrics
    assert 1 <= metrics["retrieval"]["image_to_text"]["median_rank"] <= n_val
    assert 0 <= metrics["caption_metrics"]["bleu4"] <= 100
    assert -1 <= metrics["caption_metrics"]["semantic_similarity"] <= 1
    assert metrics["log_likelihood"]["log_p_joint"] < 0


def test_a_stop_just_after_a_checkpoint_still_says_where_the_run_stands(tmp_path, data_dir, monkeypatch, capsys):
    # A stop landing between step 6's save and step 7 once printed nothing (there was nothing new to save), and
    # the SIGTERM test below failed now and then under load for want of its message.
    import mvae_course.train as training

    def stop_after_step_6(step: int, warmup: int) -> float:
        if step == 6:  # the start of step 7: step 6 is trained and saved (ckpt_every = 6)
            raise KeyboardInterrupt
        return kl_beta(step, warmup)

    monkeypatch.setattr(training, "kl_beta", stop_after_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(small_config(eval_every=1000), tmp_path / "run", progress=False, data_dir=data_dir)
    assert re.search(r"interrupted at step 6: saved .*last\.pt", capsys.readouterr().err)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 6


def test_a_sigterm_during_a_save_is_held_until_the_checkpoint_is_whole(tmp_path, data_dir, monkeypatch):
    # A SIGTERM landing inside torch.save once made its zip writer raise RuntimeError ("unexpected pos"),
    # which hid the stop: the run exited 1 and said nothing (seen in CI on the test below).
    import mvae_course.checkpoint as checkpointing
    real_save, writes = torch.save, []

    class SignalAfterSecondWrite:
        """The file torch.save writes last.pt into; SIGTERM arrives after its second write."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            n = self.f.write(data)
            if ".last.pt.tmp" in self.f.name:
                writes.append(n)
                if len(writes) == 2:
                    os.kill(os.getpid(), signal.SIGTERM)
            return n

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(checkpointing.torch, "save",
                        lambda state, f: real_save(state, SignalAfterSecondWrite(f)))
    with pytest.raises(Terminated):
        train(small_config(eval_every=1000), tmp_path / "run", progress=False, data_dir=data_dir)
    assert len(writes) > 2  # the signal came mid-save, and the save went on to the end
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 6


def test_sigterm_saves_the_step_it_finished_and_exits_143(tmp_path, data_dir):
    """SLURM, Kubernetes and `timeout` stop a job with SIGTERM: the run saves last.pt, as for Ctrl-C."""
    small_config(log_every=1).save(tmp_path / "small.yaml")
    run = tmp_path / "run"
    job = subprocess.Popen(
        [sys.executable, "-m", "mvae_course", "train", "--config", str(tmp_path / "small.yaml"),
         "--max-steps", "100000", "--out", str(run), "--data-dir", str(data_dir), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while not any(r["split"] == "train" for r in _rows(run)) and time.monotonic() < deadline:
        time.sleep(0.2)  # until it is training
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 143, err
    stopped = re.search(r"stopped by SIGTERM at step (\d+): saved .*last\.pt", err)
    assert stopped and "Traceback" not in err, err
    step = int(stopped.group(1))
    assert step >= 1 and load_checkpoint(run / "last.pt")["step"] == step
    resumed = train(small_config(max_steps=step + 2), run, resume=True, progress=False, data_dir=data_dir)
    assert resumed.step == step + 2


def _rows(run: Path) -> list[dict]:
    return read_metrics(run) if (run / "metrics.csv").is_file() else []
