"""Awkward inputs never stop a folder run: links to nothing, named pipes, unreadable images, names too long for the
file system, results that would be folders other results go in, a result's path blocked in OUT. Each such input
gets a failed line in index.jsonl with its reason, or a result name of its own (mapped in the index); the rest of
the folder is explained; the inputs are untouched; a rerun skips what is done. Real files in temporary folders."""
import hashlib
import os
import struct
import sys
import unicodedata
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from guided_swap._files import PART_EXTRA
from guided_swap.app import results
from guided_swap.app.cli import main
from guided_swap.media.viz import printable
from guided_swap.app.results import INDEX, LOCK, MARKER, output_names, read_index, read_record

from test_folder import files, save_image


def explain(*args, writers: str = "0"):
    return main(["explain", *map(str, args), "--model", "demo", "--workers", "0", "--writers", writers])


def snapshot(folder) -> dict:
    """Every entry under ``folder`` by relative path: a file's md5, a link's target, a pipe as such."""
    seen = {}
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = os.path.join(root, name)
            key = os.path.relpath(path, folder)
            if os.path.islink(path):
                seen[key] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                seen[key] = ("folder",)
            elif not os.path.isfile(path):
                seen[key] = ("special",)
            else:
                with open(path, "rb") as stream:
                    seen[key] = ("file", hashlib.md5(stream.read()).hexdigest())
    return seen


def hidden(out) -> list:
    return [n for n in files(out) if any(p.startswith(".") for p in n.split(os.sep)) and n != MARKER]


LONG = "l" * 246 + ".png"  # 250 bytes: fits the file system, not with ".npz" and a temporary's suffix
WIDE = "\u00e9" * 120 + ".jpg"  # 244 bytes in UTF-8, 124 characters


def save_pil(path, mode: str, size=(40, 40)) -> None:
    """An image of ``mode`` (``RGBA``: with alpha, ``I;16``: 16-bit grey, ``L``: 8-bit grey)."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if mode == "I;16":
        image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(str(path))


def huge_header(path) -> None:
    """A PNG whose header claims 100000 x 100000 pixels (a decompression bomb), a few kilobytes on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\0" * 300001 * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


NFC, NFD = unicodedata.normalize("NFC", "caf\u00e9.png"), unicodedata.normalize("NFD", "caf\u00e9.png")
DEEP = "/".join(f"d{k:02d}" for k in range(20)) + "/deep.png"


@pytest.fixture()
def awkward(tmp_path):
    """A folder with every kind of awkward input at once, and what each should become."""
    root = tmp_path / "in"
    save_image(root / "a.png", "chelsea")
    save_image(root / "sub" / "b.jpg", "astronaut")
    save_image(root / LONG, "camera")
    save_image(root / "deep" / WIDE, "coffee")
    save_image(root / "c.png", "chelsea")  # its figure c.png.png would be the folder below
    save_image(root / "c.png.png" / "d.png", "astronaut")
    save_image(root / "c.png.npz" / "e.png", "camera")  # and its .npz this one
    save_image(tmp_path / "elsewhere" / "x.png", "coffee")
    os.symlink(tmp_path / "elsewhere" / "x.png", root / "linked_file.png")  # a link to a file: read through
    os.symlink(root / "nowhere.png", root / "dead.png")  # a link to nothing
    os.mkfifo(root / "pipe.png")  # reading it would wait forever
    (root / "broken.png").write_bytes(b"not a png")
    os.symlink(tmp_path / "elsewhere", root / "linked_folder")  # links to folders are not followed
    odd = {"$x^$.png": "chelsea", os.fsdecode(b"bad\xff.png"): "astronaut", "$\\alpha$.png": "camera",
           "new\nline.png": "coffee", "   .png": "chelsea", "Case.png": "astronaut", "case.png": "camera",
           NFC: "chelsea", NFD: "coffee", "index.jsonl/f.png": "astronaut", DEEP: "camera"}
    for name, image in odd.items():  # names a file system, a title or OUT's own files could trip on
        save_image(root / name, image)
    for mode, name in (("RGBA", "alpha.png"), ("I;16", "sixteen.png"), ("L", "grey.png")):
        save_pil(root / name, mode)
    save_pil(root / "one.png", "RGB", (1, 1))
    (root / "zero.png").write_bytes(b"")
    (root / "empty\nname.png").write_bytes(b"")  # named on one line, escaped
    save_image(root / "truncated.jpg", "astronaut")
    (root / "truncated.jpg").write_bytes((root / "truncated.jpg").read_bytes()[:600])
    huge_header(root / "huge.png")
    os.symlink("loop2.png", root / "loop1.png")  # links to each other
    os.symlink("loop1.png", root / "loop2.png")
    (tmp_path / "loopA").mkdir()
    os.symlink(tmp_path / "loopA", root / "sub" / "toA")  # folders linked to each other: never followed
    os.symlink(root / "sub", tmp_path / "loopA" / "toSub")
    save_image(root / "locked.png", "coffee")
    os.chmod(root / "locked.png", 0)  # root reads it all the same
    good = ["a.png", "sub/b.jpg", LONG, f"deep/{WIDE}", "c.png", "c.png.png/d.png", "c.png.npz/e.png",
            "linked_file.png", *odd, "alpha.png", "sixteen.png", "grey.png", "one.png"]
    bad = {"dead.png": "symbolic link", "pipe.png": "not a regular file", "broken.png": "cannot read image",
           "zero.png": "an empty file", "empty\nname.png": "an empty file", "truncated.jpg": "cannot read image",
           "huge.png": "decompression bomb",
           "loop1.png": "cannot be followed", "loop2.png": "cannot be followed"}
    if os.access(root / "locked.png", os.R_OK):
        good.append("locked.png")
    else:
        bad["locked.png"] = "Permission denied"
    return root, good, bad


def test_a_folder_of_awkward_inputs_completes_with_every_input_recorded(tmp_path, awkward, capsys):
    root, good, bad = awkward
    out = tmp_path / "out"
    before = snapshot(root)
    assert explain(root, "--out", out, writers="2") == 1  # 1: some inputs could not be explained
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert "2 link(s) to folders not followed" in error and "linked_folder" in error, error
    assert "get result names of their own" in error, error
    lines = {os.path.relpath(line["input"], root): line for line in read_index(out)}
    assert sorted(lines) == sorted(good + list(bad))
    for name, reason in bad.items():
        assert reason in lines[name]["error"] and lines[name]["outputs"] == [], lines[name]
        assert f"could not explain {printable(str(root / name))}" in error
    limit = os.pathconf(out, "PC_NAME_MAX")
    for name in good:
        line = lines[name]
        assert line["error"] is None, line
        assert sorted(line["outputs"]) == [line["name"] + ".npz", line["name"] + ".png"]
        for output in line["outputs"]:
            assert read_record(str(out / output))["input"] == str(root / name)  # the index maps input to result
            assert len(os.fsencode(os.path.basename(output))) + 1 + PART_EXTRA <= limit  # room for a temporary
    assert lines["a.png"]["name"] == "a.png" and lines["c.png.png/d.png"]["name"] == "c.png.png/d.png"
    assert lines["c.png"]["name"] != "c.png" and lines["c.png"]["name"].endswith(".png")
    assert lines[LONG]["name"].startswith("l" * 100) and lines[LONG]["name"].endswith(".png")
    assert lines[f"deep/{WIDE}"]["name"].startswith("deep/\u00e9\u00e9")
    names = [line["name"] for line in lines.values()]
    assert len(set(names)) == len(names)  # two inputs never share a result, on any file system:
    assert len({unicodedata.normalize("NFC", name).casefold() for name in names}) == len(names)  # nor by case
    assert not lines["index.jsonl/f.png"]["name"].startswith("index.jsonl/")  # OUT's own index.jsonl is a file
    assert lines[DEEP]["name"] == DEEP
    assert all(message.startswith("guided-swap: ") for message in error.splitlines()), error  # one line each
    assert snapshot(root) == before  # inputs byte-identical, links and pipe untouched
    assert hidden(out) == [] and not (out / LOCK).exists()

    stamps = {n: os.stat(out / n).st_mtime_ns for n in files(out) if n not in (INDEX, MARKER)}
    assert explain(root, "--out", out) == 1  # the bad ones are tried (and recorded) again
    error = capsys.readouterr().err
    assert f"{len(good)} of {len(good) + len(bad)} input(s) already done" in error, error
    assert "drawing" not in error
    assert stamps == {n: os.stat(out / n).st_mtime_ns for n in files(out) if n not in (INDEX, MARKER)}
    assert {os.path.relpath(line["input"], root): line["error"] is None for line in read_index(out)} == \
        {**{name: True for name in good}, **{name: False for name in bad}}
    assert snapshot(root) == before


def test_names_are_shortened_to_the_file_system_s_limit(tmp_path, monkeypatch):
    """OUT on a file system with shorter names than the inputs' (64 bytes here): folders and files shortened."""
    root = tmp_path / "in"
    folder = "f" * 70
    save_image(root / folder / ("g" * 60 + ".png"), "chelsea")
    save_image(root / folder / ("g" * 61 + ".png"), "astronaut")
    save_image(root / "ok.png", "camera")
    monkeypatch.setattr(results, "name_max", lambda out: 64)
    out = tmp_path / "out"
    assert explain(root, "--out", out, "--save", "npz") == 0
    lines = read_index(out)
    assert len({line["name"] for line in lines}) == 3
    for line in lines:
        parts = line["name"].split("/")
        assert all(len(part.encode()) <= 64 for part in parts[:-1])
        assert len(parts[-1].encode()) + len(".maps") + PART_EXTRA <= 64
        assert (out / (line["name"] + ".npz")).exists()
    assert explain(root, "--out", out, "--save", "npz") == 0  # the same names again: all done


def test_output_names_are_stable_unique_and_fit():
    names = ["c.png", "c.png.png/d.png", "c.png.npz/e.png", "x" * 300 + ".png", "y/" + "z" * 300 + ".png"]
    first, problems = output_names(names, 255)
    assert problems == {} and output_names(names, 255)[0] == first  # the same inputs, the same names
    assert first[1:3] == names[1:3] and first[0].startswith("c~") and first[0].endswith(".png")
    assert len(set(first)) == len(first)
    folders = {name.rsplit("/", 1)[0] for name in first if "/" in name}
    assert not any(f"{name}.{kind}" in folders for name in first for kind in ("npz", "png"))
    assert all(len(name.split("/")[-1].encode()) <= 255 - 5 - PART_EXTRA for name in first)


def test_a_result_whose_place_in_out_is_taken_is_recorded_and_the_rest_done(tmp_path, capsys):
    root = tmp_path / "in"
    for name in ("a.png", "b.png", "sub/c.png"):
        save_image(root / name, "chelsea")
    out = tmp_path / "out"
    (out / "a.png.npz").mkdir(parents=True)  # a folder where a result must go
    (out / "sub").write_bytes(b"")  # a file where a result's folder must go
    assert explain(root, "--out", out) == 1
    lines = {line["name"]: line for line in read_index(out)}
    assert "is a folder where this result must go" in lines["a.png"]["error"]
    assert "is a file where this result's folder must go" in lines["sub/c.png"]["error"]
    assert lines["b.png"]["error"] is None and (out / "b.png.png").exists()
    assert "Traceback" not in capsys.readouterr().err


def test_an_input_whose_result_cannot_be_written_is_recorded_and_the_rest_done(tmp_path, monkeypatch, capsys):
    root = tmp_path / "in"
    for name in ("a.png", "b.png", "c.png"):
        save_image(root / name, "chelsea")
    write = results.write_npz

    def refuse(path, arrays, record):
        if path.endswith("b.png.npz"):
            raise OSError(36, "File name too long", path)
        write(path, arrays, record)

    monkeypatch.setattr(results, "write_npz", refuse)
    out = tmp_path / "out"
    assert explain(root, "--out", out) == 1
    lines = {line["name"]: line for line in read_index(out)}
    assert "could not write its result: OSError: [Errno 36] File name too long" in lines["b.png"]["error"]
    assert lines["a.png"]["error"] is None and lines["c.png"]["error"] is None
    assert not (out / "b.png.png").exists() and hidden(out) == []
    assert "could not explain" in capsys.readouterr().err


def test_links_to_folders_are_named_not_followed(tmp_path, capsys):
    save_image(tmp_path / "in" / "a.png", "chelsea")
    save_image(tmp_path / "other" / "b.png", "astronaut")
    os.symlink(tmp_path / "other", tmp_path / "in" / "more")
    out = tmp_path / "out"
    assert explain(tmp_path / "in", "--out", out, "--save", "npz") == 0
    error = capsys.readouterr().err
    assert "warning: 1 link(s) to folders not followed" in error and "more" in error, error
    assert [line["name"] for line in read_index(out)] == ["a.png"]
    assert explain(tmp_path / "in" / "more", "--out", tmp_path / "out2", "--save", "npz") == 0  # given: followed
    assert [line["name"] for line in read_index(tmp_path / "out2")] == ["b.png"]


def test_names_one_file_system_would_take_for_one_get_names_of_their_own():
    """Case and Unicode normalisation (macOS, Windows, exFAT, SMB shares ignore them), and OUT's own files."""
    names = ["Case.png", "case.png", NFC, NFD, "Sub/a.png", "sub/a.png", "C.png", "c.png.PNG/d.png",
             "index.jsonl/f.png", "INDEX.JSONL/g.png", "keep/index.jsonl.png"]
    out, problems = output_names(names)
    assert problems == {} and output_names(names)[0] == out
    keys = [unicodedata.normalize("NFC", name).casefold() for name in out]
    assert len(set(keys)) == len(keys)
    assert out[0] == "Case.png" and out[2] == NFC and out[4] == "Sub/a.png"  # the first of each keeps its name
    assert out[1].startswith("case~") and out[3].endswith(".png") and out[5].startswith("sub/a~")
    assert out[6].startswith("C~")  # its figure C.png.png would be the folder c.png.PNG/ there
    folders = {key.rsplit("/", 1)[0] for key in keys if "/" in key}
    assert not folders & {"index.jsonl", ".guided-swap", ".guided-swap.lock"}
    assert out[8].startswith("index~") and out[8].endswith(".jsonl/f.png") and out[9].startswith("INDEX~")
    assert out[10] == "keep/index.jsonl.png"


def test_a_folder_that_cannot_be_listed_is_named_not_skipped_silently(tmp_path, monkeypatch, capsys):
    """As a folder with mode 000 is for anyone but root (who reads it all the same), here for everyone."""
    root = tmp_path / "in"
    save_image(root / "a.png", "chelsea")
    save_image(root / "locked" / "b.png", "astronaut")
    scandir = os.scandir

    def refuse(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    out = tmp_path / "out"
    assert explain(root, "--out", out, "--save", "npz") == 0
    error = capsys.readouterr().err
    assert "warning: 1 folder(s) could not be read" in error and "locked" in error and "Permission denied" in error
    assert explain(root / "locked", "--out", tmp_path / "out2", "--save", "npz") == 2
    error = capsys.readouterr().err
    assert "no images found" in error and "could not be read" in error and "Permission denied" in error, error


def test_a_second_path_to_one_file_is_named_not_dropped_silently(tmp_path, capsys):
    root = tmp_path / "in"
    save_image(root / "a.png", "chelsea")
    os.symlink("a.png", root / "alias.png")  # explained once, as a.png
    out = tmp_path / "out"
    assert explain(root, "--out", out, "--save", "npz") == 0
    error = capsys.readouterr().err
    assert "1 input(s) are the same file as another" in error and "alias.png" in error, error
    assert [line["name"] for line in read_index(out)] == ["a.png"]


def show_on_stderr(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))  # as Python does


def test_a_warning_naming_an_odd_file_name_is_one_line(tmp_path, capsys):
    # an image smaller than the model's input is named in a warning: its name's newline, tab and byte that is not
    # UTF-8 are escaped there as in every other line the run prints
    root = tmp_path / "in"
    names = ["new\nline.png", "tab\there.png", os.fsdecode(b"bad\xff.png")]
    for name in names:
        save_image(root / name, "chelsea", size=40)  # the demo model takes 48 x 48
    out = tmp_path / "out"
    with warnings.catch_warnings():  # as outside pytest: warnings are shown, not recorded
        warnings.simplefilter("always")
        warnings.showwarning = show_on_stderr
        assert explain(root, "--out", out, "--save", "npz") == 0
    error = capsys.readouterr().err
    assert error.count("smaller than the model's") == len(names), error
    assert all(message.startswith("guided-swap: ") for message in error.splitlines()), error
    for name in names:
        assert printable(str(root / name)) in error
