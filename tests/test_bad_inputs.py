"""Bad inputs, one row each: what the user does, what the user sees, and that nothing already written is lost.

A row is `Row(name, act, sees, status=1, kept=cache_kept)`:

- `act(ws)` does the bad thing, through the command line where there is one (`cli(ws, "prepare", ...)`),
  and returns the `Outcome`: exit status, stdout, and stderr with the warnings as the user sees them.
- `sees`: a regex the user's output must contain. A failure says so in exactly one error line (`error: ...`
  from a command, `SomeError: ...` from a function), and nothing ends in a traceback.
- `kept(ws)`: what was there before the bad input is still there; by default the workspace's cache loads,
  byte for byte as it was, and its vocabulary file is untouched.

The workspace is a tiny COCO folder (3 images, 2 captions each) with a cache and vocabulary that `prepare`
built from it, copied afresh for every row. A new row (e.g. `train --max-steps 0`) is an `act` plus the
message it must show: `Row("train --max-steps 0", lambda ws: cli(ws, "train", ...), r"...")`; an act that
needs a signal (SIGTERM) can run a subprocess and return its `Outcome` just the same.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import png_bomb, three_images

from mvae_course.cli import main
from mvae_course.config import Config, preset
from mvae_course.data.cache import load_cache, read_meta


@dataclass
class Workspace:
    """A COCO folder (`root`, split "train") and the cache `prepare` built from it (`cache`, `vocabulary`)."""

    folder: Path
    before: dict[str, str] = field(default_factory=dict)  # `fingerprint()` before the bad input

    @property
    def root(self) -> Path:
        return self.folder / "coco"

    @property
    def cache(self) -> Path:
        return self.folder / "cache" / "train"

    @property
    def vocabulary(self) -> Path:
        return self.cache.with_suffix(".tokenizer.json")

    def edit_annotations(self, edit: Callable[[dict[str, Any]], Any]) -> None:
        path = self.root / "annotations" / "captions_train.json"
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))

    def fingerprint(self) -> dict[str, str]:
        """sha256 of every file of the cache and of its vocabulary."""
        files = [*sorted(self.cache.iterdir()), self.vocabulary]
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@dataclass
class Outcome:
    status: int
    out: str
    err: str

    def error_lines(self) -> list[str]:
        """`error: ...` (a command), `SomeError: ...` (a function), `mvae-course CMD: error: ...` (argparse)."""
        return [line for line in self.err.splitlines()
                if re.match(r"(error|[A-Z]\w*Error): |mvae-course \w+: error: ", line)]


@dataclass
class Row:
    name: str
    act: Callable[[Workspace], Outcome]
    sees: str
    status: int = 1
    kept: Callable[[Workspace], None] | None = None  # None: `cache_kept`


def cli(ws: Workspace, *argv: Any) -> Outcome:
    """Run `python -m mvae_course ARGV` in this process, with the output the user would see."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            status = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            status = e.code
    shown = "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
    return Outcome(status, out.getvalue(), err.getvalue() + shown)


def call(fn: Callable[[], Any]) -> Outcome:
    """Call a package function as a notebook would; an exception is what the user sees."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 (the row says which error is expected)
        return Outcome(1, "", f"{type(e).__name__}: {e}")
    return Outcome(0, "", "")


def prepare(ws: Workspace, *extra: Any, out: Path | None = None) -> Outcome:
    """`prepare` of the workspace's COCO folder, fitting a vocabulary: rebuilding its cache, or into `out`."""
    return cli(ws, "prepare", "--root", ws.root, "--split", "train", "--out", out or ws.cache,
               "--image-size", 8, "--workers", 1, *extra)


Act = Callable[[Workspace], Outcome]


def after(setup: Callable[[Workspace], Any], *extra: Any, out: str | None = None) -> Act:
    """An act: `setup(ws)` damages something, then `prepare` rebuilds the cache (or writes `out`, a path in
    the workspace). An `extra` argument may be a function of the workspace, e.g. `lambda ws: ws.folder / "x"`."""
    def act(ws: Workspace) -> Outcome:
        setup(ws)
        args = [a(ws) if callable(a) else a for a in extra]
        return prepare(ws, *args, out=ws.folder / out if out else None)
    return act


def edited(edit: Callable[[dict[str, Any]], Any], *extra: Any, out: str | None = None) -> Act:
    """An act: edit the annotation file, then `prepare`."""
    return after(lambda ws: ws.edit_annotations(edit), *extra, out=out)


def image_replaced(data: bytes, *extra: Any, out: str | None = None) -> Act:
    """An act: replace the bytes of image 2 (1.png), then `prepare`."""
    return after(lambda ws: (ws.root / "train" / "1.png").write_bytes(data), *extra, out=out)


SKIP = ("--on-bad-entry", "skip", "--on-bad-image", "skip")


def write(name: str, text: str) -> Callable[[Workspace], Any]:
    """A setup: write `text` to the workspace file `name` (e.g. "coco/annotations/captions_train.json")."""
    return lambda ws: (ws.folder / name).write_text(text)


def load_config(change: Callable[[dict[str, Any]], Any] | None = None, text: str | None = None) -> Act:
    """An act: write a config file (the tiny preset with `change`, or `text` as is) and load it."""
    def act(ws: Workspace) -> Outcome:
        d = preset("tiny").to_dict()
        if change:
            change(d)
        path = ws.folder / "run.yaml"
        path.write_text(text if text is not None else yaml.safe_dump(d))
        return call(lambda: Config.load(path))
    return act


def train_value(key: str, value: Any) -> Act:
    return load_config(lambda d: d["train"].__setitem__(key, value))


def model_value(key: str, value: Any) -> Act:
    return load_config(lambda d: d["model"].__setitem__(key, value))


def first_caption(d: dict[str, Any]) -> dict[str, Any]:
    return d["annotations"][0]


def cache_kept(ws: Workspace) -> None:
    assert ws.fingerprint() == ws.before, "the existing cache or its vocabulary changed"
    assert len(load_cache(ws.cache)) == 3


def new_cache_counts(**counts: int) -> Callable[[Workspace], None]:
    """`kept` for skip rows: the old cache is kept, the new one loads and counts what it left out."""
    def kept(ws: Workspace) -> None:
        cache_kept(ws)
        meta = read_meta(ws.folder / "new")
        found = {problem: n["count"] for problem, n in meta["bad_entries"].items()}
        found["unreadable images"] = len(meta["skipped"])
        assert {k: found.get(k.replace("_", " "), 0) for k in counts} == counts
        load_cache(ws.folder / "new")
    return kept


ANN = r"captions_train\.json"
ANNOTATIONS = "coco/annotations/captions_train.json"
ROWS = [
    # --- the annotation file ---
    Row("duplicate image id", edited(lambda d: d["images"].append({"id": 1, "file_name": "2.png"})),
        ANN + r": bad entries: duplicate image ids: 1 \(image id 1 used 2 times\)\. .*--on-bad-entry skip"),
    Row("duplicate image id, skipped", edited(lambda d: d["images"].append({"id": 1, "file_name": "2.png"}),
                                              *SKIP, out="new"),
        r"wrote the cache to .*new: 2 images, 4 captions; left out duplicate image ids: 1", status=0,
        kept=new_cache_counts(duplicate_image_ids=1)),
    Row("caption of an unknown image id", edited(lambda d: d["annotations"].append(
        {"id": 500, "image_id": 42, "caption": "orphan"})),
        ANN + r": bad entries: captions of an image id not in 'images': 1 \(annotation id 500 refers to image id 42\)"),
    Row("empty caption", edited(lambda d: first_caption(d).__setitem__("caption", " ")),
        ANN + r": bad entries: empty captions: 1 \(annotation id 100\)"),
    Row("empty caption, skipped", edited(lambda d: first_caption(d).__setitem__("caption", " "), *SKIP, out="new"),
        r"left out empty captions: 1", status=0, kept=new_cache_counts(empty_captions=1)),
    Row("caption null", edited(lambda d: first_caption(d).__setitem__("caption", None)),
        ANN + r": bad entries: non-string captions: 1 \(annotation id 100 has caption None\)"),
    Row("caption a list", edited(lambda d: first_caption(d).__setitem__("caption", ["a", "dog"])),
        ANN + r": bad entries: non-string captions: 1 \(annotation id 100 has caption \['a', 'dog'\]\)"),
    Row("image without captions", edited(lambda d: d["images"].append({"id": 4, "file_name": "0.png"})),
        ANN + r": bad entries: images without captions: 1 \(image id 4\)"),
    Row("image without captions, skipped", edited(lambda d: d["images"].append({"id": 4, "file_name": "0.png"}),
                                                  *SKIP, out="new"),
        r"3 images, 6 captions; left out images without captions: 1", status=0,
        kept=new_cache_counts(images_without_captions=1)),
    Row("string image id", edited(lambda d: d["images"][1].__setitem__("id", "2")),
        ANN + r": bad entries: non-integer image ids: 1 \(images\[1\] has id '2'\)"),
    Row("image entry without file_name", edited(lambda d: d["images"][0].pop("file_name")),
        ANN + r": bad entries: image entries without an id and a file_name: 1 \(images\[0\]\)"),
    Row("all captions empty", edited(lambda d: [a.__setitem__("caption", "") for a in d["annotations"]]),
        ANN + r": no usable caption among its 6 annotations \(empty captions: 6 .*a vocabulary needs words"),
    Row("all captions empty, even when skipping", edited(
        lambda d: [a.__setitem__("caption", "") for a in d["annotations"]], *SKIP, out="new"),
        ANN + r": no usable caption among its 6 annotations"),
    Row("malformed JSON", after(write(ANNOTATIONS, '{"images": [,]}')),
        ANN + r": malformed JSON at line 1, column 13"),
    Row("annotation file is a list", after(write(ANNOTATIONS, "[]")),
        ANN + r": expected a JSON object with lists 'images' and 'annotations'"),
    Row("no such split", lambda ws: cli(ws, "prepare", "--root", ws.root, "--split", "nope", "--out", ws.cache),
        r"missing caption annotations: expected .*captions_nope\.json.*Annotation files present: \['captions_train"),
    Row("no such folder", lambda ws: cli(ws, "prepare", "--root", ws.folder / "nowhere", "--split", "train",
                                         "--out", ws.cache), r"\(the folder .*nowhere does not exist\)"),
    # --- the images ---
    Row("decompression bomb", image_replaced(png_bomb(20000, 20000)),
        r"1\.png: refused as a possible decompression bomb: Image size \(400000000 pixels\) exceeds limit"),
    Row("decompression bomb (warning size)", image_replaced(png_bomb(10000, 10000)),
        r"1\.png: refused as a possible decompression bomb: Image size \(100000000 pixels\)"),
    Row("decompression bomb, skipped", image_replaced(png_bomb(20000, 20000), *SKIP, out="new"),
        r"2 images, 4 captions; left out unreadable images: 1", status=0,
        kept=new_cache_counts(unreadable_images=1)),
    Row("image is not an image", image_replaced(b"GIF89a but not really" * 20),
        r"1\.png: cannot decode image: cannot identify image file"),
    Row("image file missing", after(lambda ws: (ws.root / "train" / "1.png").unlink()),
        r"1\.png: image listed in .*captions_train\.json is missing.*on_bad_image='skip'"),
    # --- the captions ---
    Row("a 5,000-word caption", edited(
        lambda d: first_caption(d).__setitem__("caption", " ".join(["a red square"] * 1700)), out="new"),
        r"train: cut 1 of 6 captions to 32 tokens\n.*6 captions; 1 cut to 32 tokens", status=0),
    # --- the arguments of prepare ---
    Row("--image-size 0", lambda ws: prepare(ws, "--image-size", 0),
        r"^error: image_size must be a positive integer \(pixels\), got 0$"),
    Row("--image-size -8", lambda ws: prepare(ws, "--image-size", -8), r"image_size must be a positive integer"),
    Row("--max-caption-tokens 0", lambda ws: prepare(ws, "--max-caption-tokens", 0),
        r"max_caption_tokens must be a positive integer or None, got 0"),
    Row("--out under a file", after(write("file", "x"), out="file/train"),
        r"cannot create the folder of the cache .*file/train: (File exists|Not a directory)"),
    Row("--tokenizer not JSON", after(write("vocab.json", "{oops"), "--tokenizer", lambda ws: ws.folder / "vocab.json"),
        r"tokenizer file .*vocab\.json is not valid JSON"),
    Row("--tokenizer missing", lambda ws: prepare(ws, "--tokenizer", ws.folder / "none.json"),
        r"tokenizer file .*none\.json does not exist"),
    # --- config files (Config.load; the train command reads them with --config) ---
    Row("batch size a string", train_value("batch_size", "x"),
        r"^ConfigError: .*run\.yaml: train\.batch_size = 'x': must be a positive integer$"),
    Row("ckpt_every 0", train_value("ckpt_every", 0), r"train\.ckpt_every = 0: must be a positive integer"),
    Row("max_steps 0", train_value("max_steps", 0), r"train\.max_steps = 0: must be a positive integer or null"),
    Row("max_steps -5", train_value("max_steps", -5), r"train\.max_steps = -5: must be a positive integer"),
    Row("epochs 0", load_config(lambda d: d["train"].update(max_steps=None, epochs=0)),
        r"train\.epochs = 0: must be a positive integer or null"),
    Row("device tpu", train_value("device", "tpu"), r"train\.device = 'tpu': must be one of 'auto', 'cpu'"),
    Row("lr 1e-3 in YAML", load_config(text="train:\n  lr: 1e-3\n"),
        r"train\.lr = '1e-3': must be a number > 0, not a string \(in YAML write 1e-3 as 1\.0e-3\)"),
    Row("image_size 0", model_value("image_size", 0), r"model\.image_size = 0: must be a positive integer"),
    Row("image_size -8", model_value("image_size", -8), r"model\.image_size = -8: must be a positive integer"),
    Row("image_size 36", model_value("image_size", 36), r"model\.image_size = 36: must be a multiple of 8"),
    Row("fusion unknown", model_value("fusion", "sum"), r"model\.fusion = 'sum': must be one of 'independent'"),
    Row("on_bad_image unknown", load_config(lambda d: d["data"].__setitem__("on_bad_image", "ignore")),
        r"data\.on_bad_image = 'ignore': must be one of 'raise', 'skip'"),
    Row("unknown key", load_config(lambda d: d["train"].__setitem__("batchsize", 8)),
        r"unknown keys in section 'train': \['batchsize'\] \(did you mean 'batch_size'\?\)"),
    Row("YAML syntax error", load_config(text="train: {batch_size: 8\n"), r"run\.yaml: not valid YAML: "),
]


def train(*argv: Any) -> Act:
    """An act: `train` the tiny preset into the workspace's `run` folder (data under `data`), with `argv`."""
    return lambda ws: cli(ws, "train", "--preset", "tiny", "--out", ws.folder / "run", "--data-dir",
                          ws.folder / "data", "--no-progress", *(a(ws) if callable(a) else a for a in argv))


def config_file(change: Callable[[dict[str, Any]], Any]) -> Callable[[Workspace], Path]:
    """An argument: the tiny preset with `change`, written to the workspace as run.yaml."""
    def path(ws: Workspace) -> Path:
        d = preset("tiny").to_dict()
        change(d)
        (ws.folder / "run.yaml").write_text(yaml.safe_dump(d))
        return ws.folder / "run.yaml"
    return path


def nothing_trained(ws: Workspace) -> None:
    cache_kept(ws)
    assert not (ws.folder / "run" / "last.pt").exists(), "a checkpoint was written after all"


def train_under_a_file(ws: Workspace) -> Outcome:
    """An act: `--out` names a folder inside a file."""
    (ws.folder / "file").write_text("x")
    return train("--out", ws.folder / "file" / "run")(ws)


HOLD_LOCK = """
import sys, time
from mvae_course.atomic import FileLock
with FileLock(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(120)
"""


def while_another_run_trains(ws: Workspace) -> Outcome:
    """An act: a live process holds the run folder's lock (as a training run does); a second run starts."""
    (ws.folder / "run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(ws.folder / "run" / ".run.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        outcome = train("--max-steps", 2)(ws)
        return Outcome(outcome.status, outcome.out, outcome.err.replace(str(holder.pid), "<PID>"))
    finally:
        holder.kill()
        holder.wait()


ROWS += [
    # --- the arguments of train (one line from the config's checks, before anything is written) ---
    Row("train --max-steps 0", train("--max-steps", 0),
        r"^error: config: train\.max_steps = 0: must be a positive integer or null$", kept=nothing_trained),
    Row("train --max-steps -5", train("--max-steps", -5), r"train\.max_steps = -5: must be a positive integer",
        kept=nothing_trained),
    Row("train --epochs 0", train("--epochs", 0), r"train\.epochs = 0: must be a positive integer or null",
        kept=nothing_trained),
    Row("train --device tpu", train("--device", "tpu"), r"train\.device = 'tpu': must be one of 'auto', 'cpu'",
        kept=nothing_trained),
    Row("train --config with ckpt_every 0", train("--config", config_file(lambda d: d["train"].update(ckpt_every=0))),
        r"run\.yaml: train\.ckpt_every = 0: must be a positive integer", kept=nothing_trained),
    Row("train --config with a string batch size",
        train("--config", config_file(lambda d: d["train"].update(batch_size="64"))),
        r"run\.yaml: train\.batch_size = '64': must be a positive integer", kept=nothing_trained),
    Row("train --config missing", train("--config", lambda ws: ws.folder / "none.yaml"), r"none\.yaml",
        kept=nothing_trained),
    Row("train --out under a file", train_under_a_file, r"^error: .*file/run: (File exists|Not a directory)"),
    Row("two runs into one --out", while_another_run_trains,
        r"run is in use by another training run \(PID <PID> on host .*\); wait for it to finish",
        kept=nothing_trained),
    # --- the arguments of evaluate (argparse: a usage line and one error line, status 2) ---
    Row("evaluate --k 0", lambda ws: cli(ws, "evaluate", "--run", ws.folder, "--k", 0),
        r"argument --k: must be a positive integer, got 0", status=2),
    Row("evaluate --n -1", lambda ws: cli(ws, "evaluate", "--run", ws.folder, "--n", -1),
        r"argument --n: must be a positive integer, got -1", status=2),
    Row("evaluate a folder that is not a run", lambda ws: cli(ws, "evaluate", "--run", ws.folder / "coco"),
        r"^error: checkpoint .*coco/last\.pt: no such file"),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("workspace")
    ws = Workspace(folder)
    three_images(ws.root)
    outcome = prepare(ws)
    assert outcome.status == 0, outcome.err
    return folder


@pytest.fixture
def ws(built, tmp_path) -> Workspace:
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(built, ws.folder)
    ws.before = ws.fingerprint()
    return ws


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_a_bad_input(ws, row):
    outcome = row.act(ws)
    seen = outcome.out + outcome.err
    assert "Traceback" not in seen, seen
    assert outcome.status == row.status, seen
    if row.status:
        errors = outcome.error_lines()
        assert len(errors) == 1, f"expected one error line, got {errors}: {seen}"
        assert re.search(row.sees, errors[0]), errors[0]
    else:
        assert not outcome.error_lines() and re.search(row.sees, seen, re.DOTALL), seen
    (row.kept or cache_kept)(ws)


def test_the_table_names_each_input_once():
    names = [row.name for row in ROWS]
    assert len(names) == len(set(names))


def test_an_unexpected_error_is_one_line_too(ws, monkeypatch):
    from mvae_course import cli

    def bug(*args, **kwargs):
        raise KeyError("n_images")

    monkeypatch.setattr(cli, "prepare_cache", bug)
    outcome = prepare(ws)
    assert outcome.status == 1 and "Traceback" not in outcome.err
    assert outcome.error_lines() == [
        "error: KeyError: 'n_images' (unexpected: rerun with --debug for the traceback)"
    ]


def test_debug_shows_the_traceback(ws):
    ws.edit_annotations(lambda d: d["images"].append({"id": 1, "file_name": "2.png"}))
    assert prepare(ws).status == 1
    with pytest.raises(ValueError, match="duplicate image ids"):
        prepare(ws, "--debug")
