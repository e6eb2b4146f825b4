"""A result's files and its index line are replaced together or not at all: a write that fails mid-replacement
(a full disk under --force) leaves the earlier .npz and .png whole, and the index says so; an error that stops the
run after it began writing exits with 1 (docs/cli.md), with an index that agrees with the files."""
import errno
import hashlib
import os

import pytest

from guided_swap.app import folder, results
from guided_swap.app.cli import main
from guided_swap.app.results import read_index, read_record, replace_together

from test_folder import files, save_image
from test_folder_odd import hidden


def explain(*args):
    return main(["explain", *map(str, args), "--model", "demo", "--workers", "0", "--writers", "0"])


def md5(path) -> str:
    return hashlib.md5(open(path, "rb").read()).hexdigest()


@pytest.fixture()
def three(tmp_path):
    root = tmp_path / "in"
    for name, image in (("a.png", "chelsea"), ("b.png", "astronaut"), ("c.png", "camera")):
        save_image(root / name, image)
    return root


@pytest.mark.parametrize("scale", ["shared", "per-image"])
def test_a_full_disk_mid_replacement_leaves_the_earlier_pair_whole(tmp_path, three, monkeypatch, capsys, scale):
    out = tmp_path / "out"
    common = [three, "--out", out, "--scale", scale]
    assert explain(*common, "--size", "40") == 0
    before = {name: md5(out / name) for name in ("b.png.npz", "b.png.png")}
    write = results.write_png

    def disk_full(fig, path, record):  # the .npz is written (shared: in the pass before); the figure fails
        if path.endswith("b.png.png") or ".b.png.png." in path:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(fig, path, record)

    monkeypatch.setattr(results, "write_png", disk_full)
    capsys.readouterr()
    assert explain(*common, "--size", "48", "--force") == 1
    error = capsys.readouterr().err
    assert "could not explain" in error
    assert "explained 2 image(s)" in error and "1 could not be explained" in error, error  # 2 + 1 = 3 inputs
    assert {name: md5(out / name) for name in before} == before  # the earlier pair, whole
    assert {read_record(str(out / name))["settings"]["size"] for name in before} == {40}
    lines = {line["name"]: line for line in read_index(out)}
    assert "No space left on device" in lines["b.png"]["error"] and lines["b.png"]["outputs"] == []
    for name in ("a.png", "c.png"):  # the others replaced, files and lines alike
        assert lines[name]["error"] is None and lines[name]["settings"]["size"] == 48
        assert {read_record(str(out / f"{name}.{kind}"))["settings"]["size"] for kind in ("npz", "png")} == {48}
    assert hidden(out) == []
    monkeypatch.setattr(results, "write_png", write)
    assert explain(*common, "--size", "48", "--force") == 0  # the same command finishes the job
    assert {read_record(str(out / name))["settings"]["size"] for name in before} == {48}
    assert all(line["error"] is None for line in read_index(out))


def test_a_failed_rename_puts_back_the_files_renamed_before_it(tmp_path, monkeypatch):
    for name in ("x.npz", "x.png"):
        (tmp_path / name).write_text("old " + name)
        (tmp_path / ("new." + name)).write_text("new " + name)
    replace = os.replace

    def second_fails(source, target):
        if str(target).endswith("x.png") and "new." in str(source):
            raise OSError(errno.EIO, "Input/output error")
        replace(source, target)

    monkeypatch.setattr(results.os, "replace", second_fails)
    with pytest.raises(OSError, match="Input/output"):
        replace_together([(str(tmp_path / "new.x.npz"), str(tmp_path / "x.npz")),
                          (str(tmp_path / "new.x.png"), str(tmp_path / "x.png"))])
    assert (tmp_path / "x.npz").read_text() == "old x.npz" and (tmp_path / "x.png").read_text() == "old x.png"
    assert sorted(os.listdir(tmp_path)) == ["new.x.png", "x.npz", "x.png"]  # no backup left; the caller's temporary


def test_an_error_that_stops_the_run_exits_1_with_an_index_that_agrees(tmp_path, three, monkeypatch, capsys):
    """A ValueError mid-run is not a usage error (2 would say nothing was written): 1, one line, an index."""
    calls = []
    explain_batch = folder.explain_batch

    def fails_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("a map came out wrong")
        return explain_batch(*args, **kwargs)

    monkeypatch.setattr(folder, "explain_batch", fails_second)
    out = tmp_path / "out"
    assert explain(three, "--out", out, "--batch-size", "1", "--scale", "per-image") == 1
    error = capsys.readouterr().err
    assert error.count("\n") == error.count("guided-swap:") and "Traceback" not in error
    stopped = [line for line in error.splitlines() if "error:" in line]
    assert len(stopped) == 1 and "the run stopped: ValueError: a map came out wrong" in stopped[0], error
    assert "1 of 3 input(s) done" in stopped[0] and "run the same command again" in stopped[0]
    lines = {line["name"]: line for line in read_index(out)}
    assert lines["a.png"]["error"] is None and (out / "a.png.npz").exists()
    assert all(lines[n]["error"].startswith("not explained: the run stopped") for n in ("b.png", "c.png"))
    assert hidden(out) == []
    monkeypatch.setattr(folder, "explain_batch", explain_batch)
    assert explain(three, "--out", out, "--batch-size", "1", "--scale", "per-image") == 0
    assert "1 of 3 input(s) already done" in capsys.readouterr().err


def test_a_usage_error_found_after_planning_writes_nothing(tmp_path, three, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("one\ntwo\nthree\n")  # the demo model has two classes
    out = tmp_path / "out"
    assert explain(three, "--out", out, "--labels", labels) == 2
    assert "class names" in capsys.readouterr().err
    assert not out.exists()  # not even the lock's folder
    out.mkdir()
    assert explain(three, "--out", out, "--labels", labels) == 2
    assert files(out) == []


def test_an_index_that_cannot_be_written_at_the_end_never_describes_the_results_replaced(tmp_path, three,
                                                                                       monkeypatch, capsys):
    """index.jsonl says which inputs a run is making before it replaces any result; a run killed then, or whose
    last index write fails (a full disk), leaves that, never lines of the results it replaced."""
    out = tmp_path / "out"
    assert explain(three, "--out", out, "--size", "40", "--scale", "per-image") == 0
    write = results.write_index
    calls = []

    def last_fails(folder_, lines):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(folder_, lines)

    monkeypatch.setattr(results, "write_index", last_fails)
    assert explain(three, "--out", out, "--size", "48", "--scale", "per-image", "--force") == 1
    assert "No space left on device" in capsys.readouterr().err
    for line in read_index(out):  # no line describes a size-40 result: those files are size 48 now
        assert line["error"] is not None and "did not finish" in line["error"], line
        assert read_record(str(out / (line["name"] + ".npz")))["settings"]["size"] == 48
    monkeypatch.setattr(results, "write_index", write)
    assert explain(three, "--out", out, "--size", "48", "--scale", "per-image") == 0
    assert [line["settings"]["size"] for line in read_index(out)] == [48, 48, 48]
