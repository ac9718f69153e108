"""The command line: `shapes` then `prepare` into folders that do not exist yet; no Jupyter needed."""

import subprocess
import sys
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


JUPYTER = ("IPython", "ipykernel", "ipywidgets", "jupyter_client", "jupyter_core", "jupyterlab", "nbclient",
           "nbconvert", "nbformat", "papermill")


def test_every_command_but_course_works_without_jupyter(tmp_path: Path):
    """A training machine need not have Jupyter: the CLI imports it only for `course` (and grading's kernels)."""
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in JUPYTER)  # makes `import name` fail
    script = (
        f"import sys; {blocked}\n"
        "from mvae_course.cli import build_parser, main\n"
        "parser = build_parser()\n"
        "for command in ('shapes', 'prepare', 'train', 'evaluate', 'compare', 'exercises', 'grade', 'course'):\n"
        "    try:\n"
        "        parser.parse_args([command, '--help'])\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, command\n"
        f"assert main(['shapes', '--out', {str(tmp_path / 'shapes')!r}, '--train', '4', '--val', '2',"
        " '--image-size', '16']) == 0\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "shapes" / "annotations" / "captions_train.json").is_file()
