"""One run at a time on an --out: a second run is refused, naming the first's pid, and the first is not disturbed; a
lock left by a killed run never blocks; a run never removes the temporaries of a process still running. (The
processes of one torchrun run share their rank 0's lock: test_folder_torchrun.py runs two of them on one --out.)"""
import json
import os
import subprocess
import sys

import pytest

from guided_swap.app.cli import main
from guided_swap.app.results import LOCK, Lock, read_index

from test_folder import files, save_image
from test_folder_crash import start, wait_for_results

fcntl = pytest.importorskip("fcntl")


def explain(*args):
    return main(["explain", *map(str, args), "--model", "demo", "--workers", "0", "--writers", "0", "--save", "npz"])


@pytest.fixture()
def some(tmp_path):
    root = tmp_path / "in"
    for i in range(12):
        save_image(root / f"p{i:02d}.png", ("chelsea", "astronaut", "camera")[i % 3])
    return root


def test_a_second_run_on_the_same_out_is_refused_naming_the_first(tmp_path, some, capsys):
    out = tmp_path / "out"
    first = start(some, out, "--workers", "0", "--writers", "0", "--scale", "per-image")
    try:
        wait_for_results(first, out, 1)
        before = files(out)
        assert explain(some, "--out", out) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and f"is in use by another guided-swap run (pid {first.pid} on" in error, error
        assert "choose another --out" in error
        assert set(before) <= set(files(out))  # the second run removed nothing of the first's
        _, first_error = first.communicate(timeout=240)
    finally:
        first.kill()
    assert first.returncode == 0, first_error
    assert len(read_index(out)) == 12 and all(line["error"] is None for line in read_index(out))
    assert not (out / LOCK).exists()
    assert explain(some, "--out", out, "--scale", "per-image") == 0  # free again
    assert "12 of 12 input(s) already done" in capsys.readouterr().err


def test_the_lock_is_the_kernel_s_a_stale_file_never_blocks(tmp_path, some):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK).write_text(json.dumps({"pid": dead.pid, "host": "here", "since": "then"}))  # as a SIGKILL leaves
    assert explain(some, "--out", out) == 0
    assert not (out / LOCK).exists()


def test_a_held_lock_refuses_and_a_released_one_lets_in(tmp_path, some, capsys):
    out = tmp_path / "out"
    lock = Lock.take(str(out))
    try:
        assert explain(some, "--out", out) == 2
        assert f"pid {os.getpid()} on" in capsys.readouterr().err
    finally:
        lock.release()
    assert explain(some, "--out", out) == 0


def test_a_live_process_s_temporaries_are_never_removed(tmp_path, some):
    out = tmp_path / "out"
    out.mkdir()
    live = out / f".p00.png.npz.{os.getppid()}-0123abcd.part"  # a process still running (pytest's parent)
    live.write_bytes(b"being written")
    assert explain(some, "--out", out) == 0
    assert live.read_bytes() == b"being written"


@pytest.mark.parametrize("where", ["a file", "under a file", "lock taken by a folder"])
def test_an_out_that_cannot_be_written_is_a_usage_error_and_nothing_is_left(tmp_path, some, capsys, where):
    (tmp_path / "file").write_bytes(b"")
    out = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "out"}.get(where, tmp_path / "taken")
    if where == "lock taken by a folder":
        (out / LOCK).mkdir(parents=True)
    before = files(tmp_path), sorted(os.listdir(tmp_path))
    assert explain(some, "--out", out) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"--out {str(out)!r}" in error, error
    assert ("give a folder for the results" if where == "a file" else "choose another --out") in error, error
    assert (files(tmp_path), sorted(os.listdir(tmp_path))) == before


def test_a_run_refused_after_taking_the_lock_leaves_no_folder_it_made(tmp_path, some, capsys):
    out = tmp_path / "new" / "deeper" / "out"
    assert explain(some, "--out", out, "--target", "5") == 2  # the demo model has 2 classes: found once it is built
    assert "not a class of this model" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["in"]
