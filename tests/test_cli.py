"""The command line: `python -m mvae_course shapes` then `prepare` into folders that do not exist yet."""

from pathlib import Path

from mvae_course.cli import main
from mvae_course.data.cache import load_cache
from mvae_course.data.text import CaptionTokenizer


def test_shapes_then_prepare_fits_a_vocabulary_and_writes_the_cache(tmp_path: Path, capsys):
    data = tmp_path / "shapes"
    assert main(["shapes", "--out", str(data), "--train", "8", "--val", "4", "--image-size", "32"]) == 0
    out = tmp_path / "new" / "cache" / "val"
    assert main(["prepare", "--root", str(data), "--split", "val", "--fit-split", "train",
                 "--out", str(out), "--image-size", "32", "--workers", "1"]) == 0
    assert "vocabulary on train" in capsys.readouterr().out
    tokenizer = CaptionTokenizer.load(out.with_suffix(".tokenizer.json"))
    cache = load_cache(out)
    assert tuple(cache.images.shape) == (4, 3, 32, 32)
    assert len(cache.captions) == 20 and tokenizer.vocab_size > 4
