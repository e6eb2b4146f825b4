"""Writer processes end with the run: a SIGKILL of the main process ends them within seconds (they write nothing
more), and SIGTERM ends a writer (the run goes on without it and says which writes were lost). Real processes,
real signals; the processes are found through /proc (Linux)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from guided_swap.app.results import read_index

from test_folder import files, save_image
from test_folder_crash import start, wait_for_results

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds processes through /proc")

COUNT = 24


@pytest.fixture()
def many(tmp_path):
    root = tmp_path / "in"
    for i in range(COUNT):
        save_image(root / f"pic{i:02d}.png", ("chelsea", "astronaut", "camera", "coffee")[i % 4])
    return root


def _state(pid: int):
    """The process's state letter (``Z``: a zombie, done), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stream:
            return stream.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z", "X")


def children(pid: int) -> list:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as stream:
                    if int(stream.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def wait_for_writers(process, count: int, timeout: float = 60.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        writers = [pid for pid in children(process.pid) if alive(pid)]
        if len(writers) >= count:
            return writers
        time.sleep(0.05)
    pytest.fail(f"expected {count} writer processes, found {children(process.pid)}")


def handles(pid: int, number: int) -> bool:
    """Whether the process catches or ignores signal ``number`` (else it has the default action)."""
    with open(f"/proc/{pid}/status") as stream:
        masks = {key: int(value, 16) for key, value in (line.split(":") for line in stream) if key in ("SigCgt",
                                                                                                     "SigIgn")}
    return bool((masks["SigCgt"] | masks["SigIgn"]) & (1 << (number - 1)))


def gone_within(pids, seconds: float) -> list:
    """The pids still running after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.05)
    return [pid for pid in pids if alive(pid)]


def test_writers_end_when_the_main_process_is_killed(tmp_path, many):
    out = tmp_path / "out"
    process = start(many, out, "--workers", "0", "--writers", "2", "--scale", "per-image")
    try:
        wait_for_results(process, out, 2)
        writers = wait_for_writers(process, 2)
        os.kill(process.pid, signal.SIGKILL)  # the main process only, as the OOM killer or `kill -9 PID` does
        process.wait(timeout=30)  # not communicate(): a surviving writer would hold the pipes open
        assert gone_within(writers, 5.0) == [], "writer processes outlived the killed run"
        written = files(out)
        time.sleep(1.0)
        assert files(out) == written  # nothing more is written into OUT
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            pass
    assert subprocess.run([sys.executable, "-m", "guided_swap", "explain", str(many), "--model", "demo", "--out",
                           str(out), "--workers", "0", "--writers", "0", "--save", "npz", "--scale", "per-image"],
                          capture_output=True, env={**os.environ, "MPLBACKEND": "Agg"}).returncode == 0
    assert all(line["error"] is None for line in read_index(out))


def test_a_writer_obeys_sigterm_and_the_run_goes_on(tmp_path, many):
    out = tmp_path / "out"
    process = start(many, out, "--workers", "0", "--writers", "2", "--scale", "per-image")
    try:
        wait_for_results(process, out, 2)
        writers = wait_for_writers(process, 2)
        assert not any(handles(pid, signal.SIGTERM) for pid in writers)  # SIGTERM's default: the process ends
        os.kill(writers[0], signal.SIGTERM)
        assert gone_within(writers[:1], 5.0) == [], "a writer ignored SIGTERM"
        _, error = process.communicate(timeout=240)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            pass
    assert process.returncode in (0, 1), error  # 1 when writes it held were lost; never a crash
    assert "Traceback" not in error, error
    lines = read_index(out)
    assert len(lines) == COUNT
    lost = [line for line in lines if line["error"] is not None]
    assert all("writer process ended" in line["error"] for line in lost), lost
    assert all(os.path.exists(out / output) for line in lines if line["error"] is None for output in line["outputs"])


def test_sigterm_to_the_whole_process_group_stops_after_the_batch(tmp_path, many):
    """As `timeout`, Slurm and `kill -TERM -PGID` send it: the main process, its decode workers and its writers
    at once. The decode workers and writers end; the run stops after its batch with 130, as on Ctrl-C."""
    out = tmp_path / "out"
    process = start(many, out, "--workers", "2", "--writers", "2", "--scale", "per-image")
    try:
        wait_for_results(process, out, 2)
        helpers = wait_for_writers(process, 4)
        os.killpg(process.pid, signal.SIGTERM)
        _, error = process.communicate(timeout=120)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            pass
    assert process.returncode == 130, error
    assert "Traceback" not in error and "RuntimeError" not in error and "the run stopped" not in error, error
    assert gone_within(helpers, 5.0) == []
    lines = read_index(out)
    assert len(lines) == COUNT and any(line["error"] is None for line in lines)
    assert all(os.path.exists(out / output) for line in lines if line["error"] is None for output in line["outputs"])
    assert subprocess.run([sys.executable, "-m", "guided_swap", "explain", str(many), "--model", "demo", "--out",
                           str(out), "--workers", "0", "--writers", "0", "--scale", "per-image"],
                          capture_output=True, env={**os.environ, "MPLBACKEND": "Agg"}).returncode == 0
    assert all(line["error"] is None for line in read_index(out))
