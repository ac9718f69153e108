"""Whole-or-absent files: atomic writes, the lock between processes, and cleaning up after dead writers."""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mvae_course import atomic
from mvae_course.atomic import (
    HOST,
    FileLock,
    atomic_dir,
    atomic_write,
    clean_stale_temps,
    temp_path,
    writer_alive,
)
from mvae_course.checkpoint import save_checkpoint

needs_fork = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")


def dead_pid() -> int:
    """The PID of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_temp_names_record_their_writer(tmp_path):
    temp = temp_path(tmp_path / "last.pt")
    assert temp.parent == tmp_path and temp.name.startswith(".last.pt.tmp-")
    assert temp.name.endswith(f"-{os.getpid()}@{HOST}") and temp != temp_path(tmp_path / "last.pt")
    assert writer_alive(temp)
    pid = dead_pid()
    assert not writer_alive(tmp_path / f".last.pt.tmp-0a1b2c3d-{pid}@{HOST}")
    assert not writer_alive(tmp_path / f".train.tmp-{pid}"), "names from before the host was recorded"
    assert writer_alive(tmp_path / f".last.pt.tmp-0a1b2c3d-{pid}@another-host"), "cannot be checked: kept"
    assert writer_alive(tmp_path / ".last.pt.x7k2q9.tmp"), "no writer recorded: kept"


def test_only_the_temps_of_dead_writers_are_removed(tmp_path):
    pid = dead_pid()
    dead_file = tmp_path / f".last.pt.tmp-00000001-{pid}@{HOST}"
    dead_folder = tmp_path / f".last.pt.tmp-00000002-{pid}@{HOST}"
    live = temp_path(tmp_path / "last.pt")
    elsewhere = tmp_path / f".last.pt.tmp-00000003-{pid}@another-host"
    other_name = tmp_path / f".best.pt.tmp-00000004-{pid}@{HOST}"
    for path in (dead_file, live, elsewhere, other_name):
        path.write_bytes(b"half a checkpoint")
    dead_folder.mkdir()
    (dead_folder / "images.npy").write_bytes(b"x")
    removed = clean_stale_temps(tmp_path, ".last.pt.tmp-*")
    assert sorted(removed) == sorted([dead_file, dead_folder])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, elsewhere, other_name))


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "state.bin"
    path.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"), atomic_write(path) as f:
        f.write(b"half of the new")
        raise OSError("disk full")
    assert path.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [path]
    with atomic_write(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [path]


def test_atomic_dir_swaps_the_folder_whole_or_not_at_all(tmp_path):
    out = tmp_path / "cache"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("killed half way")
    assert (out / "a").read_text() == "1" and sorted(tmp_path.iterdir()) == [out]
    with atomic_dir(out) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["b"] and sorted(tmp_path.iterdir()) == [out]


def _die_while_writing(path: Path) -> None:
    with atomic_write(path) as f:
        f.write(b"PK\x03\x04 a third of a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)


@needs_fork
def test_a_checkpoint_save_cleans_up_after_writers_killed_mid_save(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)
    ctx = multiprocessing.get_context("fork")
    for _ in range(3):
        child = ctx.Process(target=_die_while_writing, args=(path,))
        child.start()
        child.join()
        assert child.exitcode == -signal.SIGKILL
    assert len(list(tmp_path.glob(".last.pt.tmp-*"))) == 3, "kill -9 leaves the temporary files"
    assert torch.load(path, weights_only=True) == {"step": 1}, "and the previous checkpoint"
    save_checkpoint({"step": 2}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert torch.load(path, weights_only=True) == {"step": 2}


def _hold(path: Path, ready, release) -> None:
    with FileLock(path):
        ready.set()
        release.wait(30)


def _start_holder(path: Path):
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(path, ready, release))
    holder.start()
    assert ready.wait(30), "the holder never took the lock"
    return holder, release


@needs_fork
def test_a_second_process_waits_for_the_lock_and_is_told_who_holds_it(tmp_path, capsys):
    path = tmp_path / ".cache.lock"
    holder, release = _start_holder(path)
    try:
        with pytest.raises(TimeoutError, match=f"still held by PID {holder.pid} on host .* building x"), FileLock(
            path, "building x", timeout=0.3
        ):
            pass
        assert f"waiting for PID {holder.pid} on host {HOST} building x" in capsys.readouterr().err
        threading.Timer(0.5, release.set).start()
        start = time.monotonic()
        with FileLock(path, "building x"):
            waited = time.monotonic() - start
            assert path.read_text() == f"{os.getpid()}@{HOST}\n"
        assert waited >= 0.4, "it waited for the holder to let go"
    finally:
        release.set()
        holder.join()
    assert not path.exists(), "the last holder removes the lock file as it lets go"


@needs_fork
def test_a_killed_holder_leaves_no_lock_behind(tmp_path):
    path = tmp_path / ".cache.lock"
    holder, _ = _start_holder(path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    assert path.exists(), "a killed holder leaves its lock file"
    start = time.monotonic()
    with FileLock(path, timeout=5):
        assert time.monotonic() - start < 1, "but not its lock"


@pytest.mark.skipif(atomic.fcntl is None, reason="no POSIX locks here at all")
def test_without_file_locks_it_warns_and_goes_on(tmp_path, monkeypatch):
    def unsupported(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(atomic.fcntl, "lockf", unsupported)
    with pytest.warns(UserWarning, match=r"\.cache\.lock: this file system does not support locks"), FileLock(
        tmp_path / ".cache.lock"
    ):
        ran = True
    assert ran


def _count(lock: Path, counter: Path, times: int) -> None:
    for _ in range(times):
        with FileLock(lock):
            n = int(counter.read_text())
            time.sleep(0.001)  # a lost update would show if two processes were in here at once
            counter.write_text(str(n + 1))


@needs_fork
def test_only_one_process_at_a_time_holds_the_lock(tmp_path):
    lock, counter = tmp_path / ".counter.lock", tmp_path / "counter"
    counter.write_text("0")
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_count, args=(lock, counter, 10)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0] * 4
    assert counter.read_text() == "40" and not lock.exists()
