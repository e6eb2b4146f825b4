"""torchrun with 2 CPU processes (gloo): every input explained exactly once, one index written by rank 0."""
import os
import subprocess
import sys

import pytest
import torch

from guided_swap.app.results import read_index, read_record

from test_folder import files, save_image

COUNT = 48


def torchrun(*args):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "guided_swap", "explain", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"})


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "in"
    for i in range(COUNT):
        save_image(root / ("sub" if i % 3 == 0 else "") / f"p{i:02d}.png",
                   ("chelsea", "astronaut", "camera", "coffee")[i % 4], size=32)
    return root


def test_two_processes_explain_every_input_once(tmp_path, folder):
    out = tmp_path / "out"
    done = torchrun(folder, "--model", "demo", "--save", "npz", "--workers", "0", "--batch-size", "4", "--out", out)
    assert done.returncode == 0, done.stderr
    results = [name for name in files(out) if name.endswith(".npz")]
    assert len(results) == COUNT
    lines = read_index(out)
    assert len(lines) == COUNT and sorted(line["name"] for line in lines) == sorted(n[:-4] for n in results)
    assert all(line["error"] is None for line in lines)
    ranks = [read_record(str(out / name))["made_by"]["rank"] for name in results]
    assert sorted(ranks) == [0] * (COUNT // 2) + [1] * (COUNT // 2)  # sharded, not done twice
    assert done.stderr.count("explained 48 image(s)") == 1  # rank 0 speaks for the run


def worker_pids(parent: int) -> list:
    import psutil

    return [child.pid for child in psutil.Process(parent).children(recursive=True)
            if "guided_swap" in " ".join(child.cmdline())]


@pytest.mark.slow
def test_a_killed_rank_s_work_is_done_by_the_next_run(tmp_path, folder):
    import signal
    import time

    out = tmp_path / "out"
    args = [folder, "--model", "demo", "--workers", "0", "--writers", "0", "--batch-size", "1", "--out", out]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "guided_swap", "explain", *map(str, args), "--save", "npz,png"]  # figures: slow, killed early
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and (not out.exists() or len([n for n in files(out) if n.endswith(".npz")]) < 2):
        time.sleep(0.02)  # kill early in the first pass: on a loaded machine a late kill found every map made
    os.kill(worker_pids(launcher.pid)[-1], signal.SIGKILL)
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    made = len([name for name in files(out) if name.endswith(".npz")])
    assert 0 < made < COUNT
    done = torchrun(*args, "--save", "npz")  # the maps are what was left to do
    assert done.returncode == 0, done.stderr
    assert len([name for name in files(out) if name.endswith(".npz")]) == COUNT
    assert len(read_index(out)) == COUNT and not [name for name in files(out) if name.endswith(".part")]


@pytest.mark.slow
def test_two_processes_draw_the_shared_scale_figures_from_their_own_maps(tmp_path):
    from test_folder_drawing import hidden, pixels

    from guided_swap.app.cli import main

    root = tmp_path / "in"
    for i in range(6):
        save_image(root / f"p{i}.png", ("chelsea", "astronaut", "camera")[i % 3], size=32)
    common = ["--model", "demo", "--size", "32", "--save", "png", "--workers", "0", "--batch-size", "1"]  # same maps
    done = torchrun(root, *common, "--out", tmp_path / "two")
    assert done.returncode == 0, done.stderr
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process runs: another thread count sums in another order (1e-9)
    try:
        assert main(["explain", str(root), *common, "--writers", "0", "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert hidden(tmp_path / "two") == [] and all(line["error"] is None for line in read_index(tmp_path / "two"))
    for i in range(6):  # the same pictures, on the same scale, as one process draws
        two, one = tmp_path / "two" / f"p{i}.png.png", tmp_path / "one" / f"p{i}.png.png"
        assert read_record(str(two))["limits"] == read_record(str(one))["limits"]
        assert (pixels(two) == pixels(one)).all()
    assert sorted(read_record(str(tmp_path / "two" / f"p{i}.png.png"))["made_by"]["rank"] for i in range(6)) \
        == [0, 0, 0, 1, 1, 1]


def test_the_ranks_of_a_run_share_its_lock_and_a_locked_out_refuses_them_once(tmp_path, folder):
    from guided_swap.app.results import LOCK, Lock

    out = tmp_path / "out"
    lock = Lock.take(str(out))  # another run holds --out
    try:
        done = torchrun(folder, "--model", "demo", "--save", "npz", "--workers", "0", "--out", out)
    finally:
        lock.release()
    assert done.returncode != 0
    assert done.stderr.count(f"is in use by another guided-swap run (pid {os.getpid()}") == 1, done.stderr
    assert "[rank 1]" not in done.stderr and not out.exists()
    done = torchrun(folder, "--model", "demo", "--save", "npz", "--workers", "0", "--out", out)  # both ranks in
    assert done.returncode == 0, done.stderr
    assert len(read_index(out)) == COUNT and not (out / LOCK).exists()
