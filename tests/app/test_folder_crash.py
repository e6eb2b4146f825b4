"""A run killed with SIGKILL leaves only whole results and hidden temporaries; Ctrl-C stops after the batch with
one line; the same command then finishes the job."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from guided_swap.app.cli import main
from guided_swap.app.results import INDEX, MARKER, read_index, read_record

from test_folder import files, save_image

COUNT = 16


@pytest.fixture()
def many(tmp_path):
    root = tmp_path / "in"
    for i in range(COUNT):
        save_image(root / f"pic{i:02d}.png", ("chelsea", "astronaut", "camera", "coffee")[i % 4])
    return root


def start(inputs, out, *extra):
    command = [sys.executable, "-m", "guided_swap", "explain", str(inputs), "--model", "demo", "--out", str(out),
               "--batch-size", "1", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MPLBACKEND": "Agg"}, start_new_session=True)


def wait_for_results(process, out, count: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists() and len([n for n in files(out) if n.endswith(".npz")]) >= count:
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended before it could be stopped: {process.communicate()[1]}")
        time.sleep(0.05)
    process.kill()
    pytest.fail("no results appeared")


def test_sigkill_leaves_whole_results_only_and_the_next_run_finishes(tmp_path, many, capsys):
    out = tmp_path / "out"
    process = start(many, out, "--workers", "0")
    wait_for_results(process, out, 3)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    visible = [n for n in files(out) if not os.path.basename(n).startswith(".")]
    assert set(visible) <= {f"pic{i:02d}.png.{kind}" for i in range(COUNT) for kind in ("npz", "png")} | {INDEX}
    assert all("not explained yet" in line["error"] for line in read_index(out))  # what the run was making
    for name in set(visible) - {INDEX}:  # every file a glob would find is whole and says what made it
        assert read_record(str(out / name))["settings"]["model"] == "demo", name
    complete = sum((out / f"pic{i:02d}.png.npz").exists() for i in range(COUNT))
    (out / ".pic15.png.npz.999999999-0badc0de.part").write_bytes(b"half")  # as a kill mid-write leaves
    assert main(["explain", str(many), "--model", "demo", "--out", str(out), "--batch-size", "4", "--save", "npz",
                 "--workers", "0", "--writers", "0"]) == 0
    assert f"{complete} of {COUNT} input(s) already done" in capsys.readouterr().err
    assert [n for n in files(out) if os.path.basename(n).startswith(".")] == [MARKER]
    assert len(read_index(out)) == COUNT and all(line["error"] is None for line in read_index(out))


def test_ctrl_c_stops_after_the_batch_with_one_line(tmp_path, many, capsys):
    out = tmp_path / "out"
    process = start(many, out, "--workers", "2", "--scale", "per-image")  # figures drawn as it goes
    wait_for_results(process, out, 2)
    os.killpg(process.pid, signal.SIGINT)  # as a terminal does: the main process and its decode workers
    _, error = process.communicate(timeout=120)
    assert process.returncode == 130, error
    assert "Traceback" not in error and "Error" not in error, error
    stopped = [line for line in error.splitlines() if "interrupt" in line]
    assert len(stopped) == 1 and "run the same command again" in stopped[0], error
    lines = read_index(out)
    done = [line for line in lines if line["error"] is None]
    assert len(lines) == COUNT and 2 <= len(done) < COUNT
    assert all(os.path.exists(out / output) for line in done for output in line["outputs"])
    assert main(["explain", str(many), "--model", "demo", "--out", str(out), "--save", "npz", "--workers", "0",
                 "--writers", "0", "--scale", "per-image"]) == 0
    assert f"{len(done)} of {COUNT} input(s) already done" in capsys.readouterr().err
    assert all(line["error"] is None for line in read_index(out))
    assert np.load(out / "pic15.png.npz")["cam"].shape == (48, 48)


def test_sigkill_during_force_leaves_no_index_line_describing_a_replaced_result(tmp_path, many):
    out = tmp_path / "out"
    common = ["explain", str(many), "--model", "demo", "--out", str(out), "--workers", "0", "--writers", "0",
              "--scale", "per-image"]
    assert main(common + ["--size", "40"]) == 0
    process = start(many, out, "--workers", "0", "--writers", "0", "--scale", "per-image", "--size", "44", "--force")
    deadline = time.monotonic() + 180
    while not any((read_record(str(out / f"pic{i:02d}.png.npz")) or {}).get("settings", {}).get("size") == 44
                  for i in range(COUNT)):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    for line in read_index(out):  # every line is the result on disk, or says the input is not done
        if line["error"] is None:
            for output in line["outputs"]:
                assert read_record(str(out / output))["settings"] == line["settings"], line["name"]
        else:
            assert "not explained yet" in line["error"]
    assert main(common + ["--size", "44", "--force"]) == 0  # the same command finishes the job
    assert {line["settings"]["size"] for line in read_index(out)} == {44}


SIGTERM_WHILE_BUILDING = """
import os, signal, sys, time
from guided_swap.app import cli, folder
build = folder.build_explainer
def build_and_stop(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler stops a job that is still starting
    time.sleep(1.0)
    return build(*args, **kwargs)
folder.build_explainer = build_and_stop
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_before_the_first_batch_exits_130_and_leaves_nothing(tmp_path, many):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", SIGTERM_WHILE_BUILDING, "explain", str(many), "--model", "demo",
                           "--out", str(out), "--workers", "0", "--writers", "0"], capture_output=True, text=True,
                          env={**os.environ, "MPLBACKEND": "Agg"})
    assert done.returncode == 130, done.stderr
    assert "interrupted" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()  # nor its lock
