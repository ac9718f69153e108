"""The judges of generated images: degradations like a decoder's, the rule judge, the CNN judge's
robustness, and its cache on disk (atomic, rebuilt when corrupt or stale)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import ImageFilter
from safetensors import safe_open
from safetensors.torch import save_file

from mvae_course.data.cache import as_float_images, ensure_cache
from mvae_course.data.shapes import ATTRIBUTE_VALUES, attributes_at_level, ensure_shapes, render
from mvae_course.degrade import (
    DEGRADATIONS,
    add_noise,
    augment,
    gaussian_blur,
    pixel_sample,
    scale_intensity,
    shift,
)
from mvae_course.judge import judge_accuracy, load_or_train_classifier, train_attribute_classifier
from mvae_course.rule_judge import RuleJudge

SIZE = 32


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Small shapes sets at 32 px: {level: (train cache, val cache)}."""
    root = tmp_path_factory.mktemp("judges")
    out = {}
    for level, n_train in ((3, 40), (4, 400), (5, 40)):
        data = ensure_shapes(root / f"L{level}", n_train, 60, level=level, image_size=SIZE)
        out[level] = tuple(ensure_cache(data, split, root / f"L{level}-{split}", SIZE) for split in ("train", "val"))
    return out


def star(size: int = SIZE) -> tuple:
    image = render([{"shape": "star", "colour": "red", "center": [size / 2, size / 2], "diameter": 0.42 * size}], size)
    return image, torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


# --- degradations ------------------------------------------------------------------------------------


def test_blur_is_pils_gaussian_blur_and_keeps_the_ink():
    image, x = star()
    for radius in (0.5, 1.0, 1.5):
        pil = np.asarray(image.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255
        ours = gaussian_blur(x, radius)[0].permute(1, 2, 0).numpy()
        assert np.abs(pil - ours).max() < 0.03, radius  # PIL rounds to 8 bits and approximates with boxes
        assert abs(float(gaussian_blur(x, radius).sum() - x.sum())) < 1e-3 * float(x.sum())  # mass kept
    assert (gaussian_blur(x, 1.5) - x).abs().mean() > (gaussian_blur(x, 0.5) - x).abs().mean()
    per_image = gaussian_blur(torch.cat([x, x]), torch.tensor([0.5, 1.5]))
    torch.testing.assert_close(per_image[1:], gaussian_blur(x, 1.5))


def test_noise_gain_contrast_shift_and_pixel_samples():
    _, x = star()
    g = torch.Generator().manual_seed(0)
    noisy = add_noise(x, 0.1, g)
    assert noisy.min() >= 0 and noisy.max() <= 1 and 0.02 < (noisy - x).abs().mean() < 0.1
    torch.testing.assert_close(scale_intensity(x, 0.5), x * 0.5)
    flat = scale_intensity(x, 1.0, contrast=0.0)
    assert torch.allclose(flat, flat.mean(), atol=1e-6)  # no contrast left: every pixel at the mean
    moved = shift(x, 2, -3)
    torch.testing.assert_close(moved[..., 2:, :-3], x[..., :-2, 3:])
    assert moved[..., :2, :].abs().sum() == 0 and moved[..., :, -3:].abs().sum() == 0  # black comes in
    sample = pixel_sample(x.expand(2000, -1, -1, -1), g)
    assert set(sample.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(sample.mean(0), x[0], atol=0.04, rtol=0)
    out = augment(x.expand(16, -1, -1, -1), g)
    assert out.shape == (16, 3, SIZE, SIZE) and 0 <= out.min() and out.max() <= 1
    assert (out - x).abs().flatten(1).mean(1).min() > 0  # every image degraded somehow
    assert next(iter(DEGRADATIONS)) == "real" and {"blur 0.5", "blur 1.0", "blur 1.5", "noise 0.1"} <= set(DEGRADATIONS)


# --- the rule judge ----------------------------------------------------------------------------------


@pytest.mark.parametrize("level", (3, 4, 5))
def test_rule_judge_reads_real_and_degraded_images(shapes, level):
    _, val = shapes[level]
    names = attributes_at_level(level)
    judge = RuleJudge(level, SIZE)
    report = judge_accuracy(judge, val.images, val.attributes, names)
    for degradation in ("real", "blur 0.5", "blur 1.0", "blur 1.5", "noise 0.05", "noise 0.1", "dim 0.6"):
        assert report[degradation]["strict"] == 1.0, (degradation, report[degradation])
    assert report["pixel sample"]["strict"] >= 0.9, report["pixel sample"]


def test_rule_judge_reads_nothing_where_nothing_is_drawn(shapes):
    _, val = shapes[5]
    images = as_float_images(val.images[:2]).clone()
    images[1] = 0.0  # a blank image
    first, blank = RuleJudge(5, SIZE).predict(images)
    assert all(v is not None for v in first.values())
    assert all(v is None for v in blank.values())
    with pytest.raises(ValueError, match="32 px"):
        RuleJudge(5, SIZE).predict(torch.zeros(1, 3, 64, 64))


# --- the CNN judge -----------------------------------------------------------------------------------


def test_cnn_judge_trained_on_degraded_images_reads_degraded_ones(shapes):
    """The weak version of the benchmark's check (benchmarks/README.md, "Quality"): 300 steps on 400
    images keep it above 85% under a blur of 1 px and 90% under noise of 0.1 (the full judge: 100%; the
    first judge, trained without degradations, read 41% right at 1 px)."""
    train, val = shapes[4]
    names = attributes_at_level(4)
    clf = train_attribute_classifier(train.images, train.attributes, {a: ATTRIBUTE_VALUES[a] for a in names},
                                     steps=300)
    report = judge_accuracy(clf, val.images, val.attributes, names,
                            {k: DEGRADATIONS[k] for k in ("real", "blur 1.0", "noise 0.1")})
    assert report["real"]["strict"] >= 0.95, report
    assert report["blur 1.0"]["strict"] >= 0.85 and report["noise 0.1"]["strict"] >= 0.9, report


def test_judge_cache_is_atomic_and_a_corrupt_or_stale_one_is_rebuilt(shapes, tmp_path, capsys):
    train, val = shapes[3]
    names = attributes_at_level(3)
    _, acc = load_or_train_classifier(train, val, names, tmp_path, steps=5)
    (path,) = tmp_path.glob("attribute_classifier_*.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left beside it
    assert capsys.readouterr().err == ""
    good = path.read_bytes()
    _, acc_again = load_or_train_classifier(train, val, names, tmp_path, steps=5)
    assert acc_again == acc and capsys.readouterr().err == ""  # read back, not retrained

    path.write_bytes(good[: len(good) // 2])  # a write cut short by a crash, as an old version could leave
    _, acc_rebuilt = load_or_train_classifier(train, val, names, tmp_path, steps=5)
    err = capsys.readouterr().err
    assert f"attribute judge {path} is corrupt or stale" in err and "not used" in err
    assert len(err.strip().splitlines()) == 1  # one line, not a traceback
    assert acc_rebuilt == acc and path.read_bytes() != good[: len(good) // 2]  # replaced, seeded: same judge
    with safe_open(path, framework="pt") as f:
        state, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    save_file(state, path, metadata | {"key": "another judge"})  # not the judge its name says (stale)
    load_or_train_classifier(train, val, names, tmp_path, steps=5)
    assert "another judge than its name says" in capsys.readouterr().err
    load_or_train_classifier(train, val, names, tmp_path, steps=5)
    assert capsys.readouterr().err == ""  # the rebuilt one is good again


def test_a_shipped_judge_is_read_before_the_cache_and_a_bad_one_is_passed_over(shapes, tmp_path, monkeypatch, capsys):
    from mvae_course import judge

    train, val = shapes[3]
    names = attributes_at_level(3)
    shipped, cache = tmp_path / "judges", tmp_path / "cache"
    monkeypatch.setattr(judge, "JUDGES", shipped)
    first, _ = load_or_train_classifier(train, val, names, tmp_path / "trained", steps=5)
    shipped.mkdir()
    (trained,) = (tmp_path / "trained").iterdir()
    (shipped / trained.name).write_bytes(trained.read_bytes())
    clf, _ = load_or_train_classifier(train, val, names, cache, steps=5)
    assert not cache.exists()  # read from JUDGES: nothing trained, nothing written
    for a, b in zip(clf.state_dict().values(), first.state_dict().values()):
        assert torch.equal(a, b)
    capsys.readouterr()
    (shipped / trained.name).write_bytes(b"not a judge")
    load_or_train_classifier(train, val, names, cache, steps=5)
    assert "is corrupt or stale" in capsys.readouterr().err and [p.name for p in cache.iterdir()] == [trained.name]
