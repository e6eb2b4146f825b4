"""Atomic writes: hidden temporaries no results glob matches, permissions from the umask, stale ones removed."""
import glob
import os
import stat
import subprocess
import sys

import pytest
from matplotlib.figure import Figure

from guided_swap._files import atomic_write, is_part, remove_stale_parts
from guided_swap.app import results


@pytest.fixture()
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_written_files_follow_the_umask(tmp_path, umask_022):
    target = tmp_path / "maps" / "a.npz"
    with atomic_write(str(target)) as temporary:
        open(temporary, "wb").write(b"x")
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
    os.umask(0o027)
    with atomic_write(str(target)) as temporary:
        open(temporary, "wb").write(b"y")
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640


def test_the_temporary_is_hidden_and_matches_no_results_glob(tmp_path):
    target = tmp_path / "cat.jpg.npz"
    with atomic_write(str(target)) as temporary:
        name = os.path.basename(temporary)
        assert name.startswith(".cat.jpg.npz.") and name.endswith(".part") and is_part(name)
        assert glob.glob(str(tmp_path / "*.npz")) == [] and list(tmp_path.glob("*.npz")) == []
        assert list(tmp_path.rglob("*.npz")) == []
    with atomic_write(str(tmp_path / "r18.pt2"), suffix=".pt2") as temporary:  # export's writer wants .pt2
        assert os.path.basename(temporary).startswith(".r18.pt2.") and temporary.endswith(".part.pt2")
        open(temporary, "w").write("x")
    assert sorted(os.listdir(tmp_path)) == ["cat.jpg.npz", "r18.pt2"]


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_write(str(tmp_path / "a.png")) as temporary:
            open(temporary, "w").write("half")
            raise RuntimeError("crash")
    assert os.listdir(tmp_path) == []


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporaries_of_dead_processes_are_removed_when_the_path_is_written_again(tmp_path):
    dead = tmp_path / f".r18.pt2.{_dead_pid()}-0123abcd.part.pt2"
    alive = tmp_path / f".r18.pt2.{os.getppid()}-0123abcd.part.pt2"  # a running process: left alone
    other = tmp_path / f".other.pt2.{_dead_pid()}-0123abcd.part.pt2"
    for path in (dead, alive, other):
        path.write_bytes(b"half")
    with atomic_write(str(tmp_path / "r18.pt2"), suffix=".pt2") as temporary:
        open(temporary, "w").write("whole")
    assert sorted(os.listdir(tmp_path)) == sorted(["r18.pt2", alive.name, other.name])


def test_remove_stale_parts_cleans_a_results_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    stale = [tmp_path / ".a.png.npz.123-89abcdef.part", tmp_path / "sub" / ".b.jpg.png.7-00000000.part"]
    kept = [tmp_path / "a.png.npz", tmp_path / ".hidden_but_not_ours", tmp_path / "x.part"]
    for path in stale + kept:
        path.write_bytes(b"")
    assert sorted(remove_stale_parts(str(tmp_path))) == sorted(map(str, stale))
    assert all(path.exists() for path in kept)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="zombies are read from Linux's /proc")
def test_a_part_of_a_process_that_exited_unreaped_is_stale(tmp_path):
    """A killed run's writer is orphaned; where process 1 of a container reaps no orphans it stays a zombie that
    os.kill(pid, 0) still finds: its temporary must be cleaned all the same, and a live process's kept."""
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        while open(f"/proc/{exited.pid}/stat").read().rpartition(")")[2].split()[0] != "Z":
            pass
        zombie = tmp_path / f".a.png.npz.{exited.pid}-89abcdef.part"
        running = tmp_path / f".b.png.npz.{live.pid}-89abcdef.part"
        for path in (zombie, running):
            path.write_bytes(b"half")
        assert remove_stale_parts(str(tmp_path), only_dead=True) == [str(zombie)]
        assert running.exists()
    finally:
        live.kill()
        live.wait()
        exited.wait()


# --- ``results.write_png`` saves a ``matplotlib.figure.Figure`` with its own canvas: no pyplot, atomically.

def _figure() -> Figure:
    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1], [1, 0])
    return fig


def test_write_png_needs_no_pyplot(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # any `import matplotlib.pyplot` now fails
    path = str(tmp_path / "a.png")
    results.write_png(_figure(), path, {"settings": {"rule": "guided"}})
    assert results.read_record(path) == {"settings": {"rule": "guided"}}
    assert os.listdir(tmp_path) == ["a.png"]


def test_a_failing_png_write_leaves_no_file(tmp_path):
    fig = _figure()

    def half_written(stream, **options):
        stream.write(b"\x89PNG half a file")
        raise RuntimeError("the disk is full")

    fig.savefig = half_written
    with pytest.raises(RuntimeError, match="disk is full"):
        results.write_png(fig, str(tmp_path / "a.png"), {})
    assert os.listdir(tmp_path) == []
