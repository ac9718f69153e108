"""Config values are checked when a config is built or loaded: one message per bad value, naming it."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import yaml

from mvae_course.config import PRESETS, Config, ConfigError, DataConfig, ModelConfig, TrainConfig, preset

# (section, key, bad value, what the message says is allowed)
BAD_VALUES = [
    ("train", "batch_size", "x", "must be a positive integer"),
    ("train", "batch_size", 0, "must be a positive integer"),
    ("train", "batch_size", 64.0, "must be a positive integer"),
    ("train", "batch_size", True, "must be a positive integer"),
    ("train", "lr", 0, "must be a number > 0"),
    ("train", "lr", -1e-3, "must be a number > 0"),
    ("train", "lr", float("nan"), "must be a number > 0"),
    ("train", "lr", "1e-3", r"not a string \(in YAML write 1e-3 as 1\.0e-3\)"),
    ("train", "weight_decay", -0.1, "must be a number >= 0"),
    ("train", "max_steps", 0, "must be a positive integer or null"),
    ("train", "max_steps", -5, "must be a positive integer or null"),
    ("train", "epochs", 0, "must be a positive integer or null"),
    ("train", "warmup_steps", -1, "must be an integer >= 0"),
    ("train", "kl_warmup_steps", 1.5, "must be an integer >= 0"),
    ("train", "grad_clip", 0, "must be a number > 0"),
    ("train", "beta", 0, "must be a number > 0"),
    ("train", "seed", -1, "must be an integer >= 0"),
    ("train", "device", "tpu", "must be one of 'auto', 'cpu', 'cuda', 'cuda:N'"),
    ("train", "device", "cuda:x", "must be one of 'auto', 'cpu', 'cuda', 'cuda:N'"),
    ("train", "amp", "yes", "must be true or false"),
    ("train", "threads", -1, "must be an integer >= 0"),
    ("train", "cache_on_device", 1, "must be true or false"),
    ("train", "eval_every", 0, "must be a positive integer"),
    ("train", "ckpt_every", 0, "must be a positive integer"),
    ("train", "log_every", -1, "must be a positive integer"),
    ("model", "fusion", "sum", "must be one of 'independent', 'poe', 'moe', 'mopoe'"),
    ("model", "z_dim", 0, "must be a positive integer"),
    ("model", "image_size", 0, "must be a positive integer"),
    ("model", "image_size", -8, "must be a positive integer"),
    ("model", "image_size", 36, r"must be a multiple of 8 \(halved once per entry of model\.image_channels"),
    ("model", "image_channels", [], "must be a non-empty list of positive integers"),
    ("model", "image_channels", [32, 0], "must be a non-empty list of positive integers"),
    ("model", "image_likelihood", "laplace", "must be one of 'gaussian', 'bernoulli', 'continuous_bernoulli'"),
    ("model", "image_sigma", 0.0, "must be a number > 0"),
    ("model", "vocab_size", -1, "must be an integer >= 0"),
    ("model", "emb_dim", "300", "must be a positive integer"),
    ("model", "enc_hidden", 0, "must be a positive integer"),
    ("model", "dec_hidden", None, "must be a positive integer"),
    ("model", "max_caption_len", 0, "must be a positive integer"),
    ("model", "word_dropout", 1.0, r"must be a number in \[0, 1\)"),
    ("model", "image_weight", -1, "must be a number >= 0"),
    ("model", "text_weight", float("inf"), "must be a number >= 0"),
    ("model", "private_dim", 0, "must be a positive integer"),
    ("model", "aux_prior_scale", 0.0, "must be a number > 0"),
    ("model", "learn_aux_prior", "yes", "must be true or false"),
    ("model", "k_samples", 0, "must be a positive integer"),
    ("model", "dreg", 1, "must be true or false"),
    ("data", "dataset", "imagenet", "must be one of 'shapes', 'coco'"),
    ("data", "root", "", "must be a non-empty string or null"),
    ("data", "train_split", None, "must be a non-empty string"),
    ("data", "val_split", 5, "must be a non-empty string"),
    ("data", "image_size", 0, "must be a positive integer"),
    ("data", "level", 6, "must be an integer from 1 to 5"),
    ("data", "n_train", 0, "must be a positive integer"),
    ("data", "n_val", -1, "must be a positive integer"),
    ("data", "min_count", 0, "must be a positive integer"),
    ("data", "max_caption_tokens", 0, "must be a positive integer or null"),
    ("data", "on_bad_entry", "ignore", "must be one of 'raise', 'skip'"),
    ("data", "on_bad_image", "drop", "must be one of 'raise', 'skip'"),
    ("data", "holdout", "", "must be a non-empty string or null"),
]


def test_every_field_has_a_check():
    checked = {(section, key) for section, key, _, _ in BAD_VALUES}
    for part in (DataConfig, ModelConfig, TrainConfig):
        fields = {f.name for f in dataclasses.fields(part)}
        assert set(part.CHECKS) == fields, f"{part.__name__}: unchecked fields {fields - set(part.CHECKS)}"
        assert {(part.SECTION, f) for f in fields} <= checked, "each field has a row in BAD_VALUES"


@pytest.mark.parametrize("section, key, value, allowed", BAD_VALUES, ids=lambda v: str(v)[:20])
def test_a_bad_value_is_named_with_what_is_allowed(section, key, value, allowed):
    d = preset("tiny").to_dict()
    d[section][key] = value
    with pytest.raises(ConfigError) as info:
        Config.from_dict(d)
    message = str(info.value)
    assert message.startswith(f"config: {section}.{key} = {value!r}: "), message
    assert len(info.value.problems) == 1 and "\n" not in message
    assert re.search(allowed, message), message


def test_every_preset_is_valid_and_round_trips(tmp_path):
    for name in PRESETS:
        cfg = preset(name)
        for suffix in (".json", ".yaml"):
            cfg.save(tmp_path / f"{name}{suffix}")
            assert Config.load(tmp_path / f"{name}{suffix}") == cfg
    assert preset("tiny").data.max_caption_tokens == 32 and preset("coco_gpu").data.on_bad_image == "raise"


def test_all_bad_values_of_a_section_in_one_message():
    with pytest.raises(ConfigError) as info:
        preset("tiny").replace(train={"batch_size": "x", "ckpt_every": 0, "device": "tpu"})
    assert info.value.problems == [
        "train.batch_size = 'x': must be a positive integer",
        "train.device = 'tpu': must be one of 'auto', 'cpu', 'cuda', 'cuda:N' (N = 0, 1, ...), 'mps'",
        "train.ckpt_every = 0: must be a positive integer",
    ]
    assert isinstance(info.value, ValueError), "callers that catch ValueError keep working"


def test_a_budget_is_needed():
    with pytest.raises(ConfigError, match="train.max_steps and train.epochs are both null: set one"):
        preset("tiny").replace(train={"max_steps": None, "epochs": None})
    assert preset("tiny").replace(train={"max_steps": None, "epochs": 3}).train.epochs == 3


def test_unknown_names_are_errors_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown keys in section 'train': \['batchsize'\] \(did you mean 'batch_size'\?\)"):
        Config.from_dict({"train": {"batchsize": 8}})
    with pytest.raises(ConfigError, match=r"unknown sections \['trian'\] \(did you mean 'train'\?\)"):
        Config.from_dict({"trian": {}})
    with pytest.raises(ConfigError, match=r"unknown sections \['trian'\]"):
        preset("tiny").replace(trian={"batch_size": 8})
    with pytest.raises(ConfigError, match="train = 5: must be a mapping"):
        Config.from_dict({"train": 5})
    with pytest.raises(ConfigError, match="expected a mapping with sections"):
        Config.from_dict(["not", "a", "mapping"])


def test_a_bad_file_is_named_in_the_message(tmp_path):
    path = tmp_path / "run.yaml"
    d = preset("tiny").to_dict()
    d["train"]["batch_size"] = "64"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match=rf"^{path}: train.batch_size = '64': must be a positive integer$"):
        Config.load(path)
    path.write_text("train:\n  batch_size: [64\n")
    with pytest.raises(ConfigError, match=rf"^{path}: not valid YAML: "):
        Config.load(path)
    bad_json = tmp_path / "run.json"
    bad_json.write_text('{"train": {"lr": 0.001,}}')
    with pytest.raises(ConfigError, match=rf"^{bad_json}: not valid JSON: .*line 1"):
        Config.load(bad_json)
    bad_json.write_text(json.dumps(None))
    with pytest.raises(ConfigError, match=rf"^{bad_json}: expected a mapping"):
        Config.load(bad_json)


def test_good_values_at_the_edges_are_accepted():
    cfg = preset("tiny").replace(
        data={"root": "/data/coco", "max_caption_tokens": None, "on_bad_entry": "skip", "on_bad_image": "skip"},
        model={"word_dropout": 0.0, "text_weight": 0, "image_size": 32},
        train={"device": "cuda:1", "lr": 1, "warmup_steps": 0, "max_steps": 1},
    )
    assert cfg.train.lr == 1 and cfg.data.max_caption_tokens is None and cfg.train.device == "cuda:1"
    assert ModelConfig(image_channels=[8, 16]).image_channels == (8, 16)


def test_the_coco_gpu_warm_up_ends_early_in_its_run():
    """A KL warm-up longer than the run never trains the ELBO: coco_gpu's must end in its first quarter."""
    from mvae_course.data.synthetic import COCO_TRAIN_IMAGES

    train = preset("coco_gpu").train
    steps = train.epochs * (COCO_TRAIN_IMAGES // train.batch_size)
    assert train.kl_warmup_steps <= steps / 4, (train.kl_warmup_steps, steps)
