"""guided-swap explain on folders: one result per input, no input ever replaced, reruns that check the settings,
an index, results that follow the umask. In-process (guided_swap.app.cli.main) on the tiny demo model."""
import json
import os
import stat

import numpy as np
import pytest
from skimage import data, io, transform

from guided_swap.app.cli import main
from guided_swap.app.results import INDEX, MARKER, read_index

CAT, ASTRONAUT = "chelsea", "astronaut"


def save_image(path, name: str, size: int = 64) -> None:
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = (transform.resize(getattr(data, name)(), (size, size), anti_aliasing=True) * 255).astype(np.uint8)
    io.imsave(path, image, check_contrast=False)


def explain(*args, workers: str = "0", writers: str = "0"):
    return main(["explain", *map(str, args), "--workers", workers, "--writers", writers])


def files(folder) -> list:
    return sorted(os.path.relpath(os.path.join(root, f), folder) for root, _, names in os.walk(folder) for f in names)


def record(path) -> dict:
    with np.load(path) as maps:
        return json.loads(str(maps["record"]))


@pytest.fixture()
def clashing(tmp_path):
    """Inputs whose names collide under the old flat naming: pic.jpg/pic.png, sub/pic.jpg/sub__pic.png."""
    root = tmp_path / "in"
    save_image(root / "pic.jpg", CAT)
    save_image(root / "pic.png", ASTRONAUT)
    save_image(root / "sub" / "pic.jpg", ASTRONAUT)
    save_image(root / "sub__pic.png", CAT)
    return root


def test_every_input_gets_its_own_result_mirroring_the_tree(tmp_path, clashing, capsys):
    out = tmp_path / "out"
    assert explain(clashing, "--model", "demo", "--out", out) == 0
    names = ["pic.jpg", "pic.png", "sub/pic.jpg", "sub__pic.png"]
    assert files(out) == sorted([MARKER, INDEX] + [n + ".npz" for n in names] + [n + ".png" for n in names])
    for name in names:
        assert record(out / (name + ".npz"))["input"] == str(clashing / name)
    with np.load(out / "pic.jpg.npz") as cat, np.load(out / "sub" / "pic.jpg.npz") as astronaut:
        assert not np.allclose(cat["input"], astronaut["input"])  # not one input's maps under two names
    assert sorted(line["name"] for line in read_index(out)) == sorted(names)
    assert "explained 4 image(s)" in capsys.readouterr().err


def test_several_inputs_are_named_from_the_folder_holding_them_all(tmp_path):
    save_image(tmp_path / "a" / "x.png", CAT)
    save_image(tmp_path / "b" / "x.png", ASTRONAUT)
    out = tmp_path / "out"
    assert explain(tmp_path / "a", tmp_path / "b" / "x.png", "--model", "demo", "--save", "npz", "--out", out) == 0
    assert files(out) == sorted([MARKER, INDEX, "a/x.png.npz", "b/x.png.npz"])


@pytest.mark.parametrize("where", ["same", "parent"])
def test_out_that_is_or_holds_an_input_folder_is_refused_before_anything(tmp_path, clashing, capsys, where):
    before = {name: (clashing / name).read_bytes() for name in files(clashing)}
    out = clashing if where == "same" else tmp_path
    assert explain(clashing, "--model", "demo", "--out", out) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "give --out a folder of its own" in error
    assert {name: (clashing / name).read_bytes() for name in files(clashing)} == before


def test_results_inside_an_input_folder_are_never_inputs(tmp_path, clashing, capsys):
    assert explain(clashing, "--model", "demo", "--out", clashing / "maps") == 0  # with PNGs: images
    # the figures in maps/ are images, but never inputs
    assert explain(clashing, "--model", "demo", "--save", "npz", "--out", clashing / "maps2") == 0
    assert len(read_index(clashing / "maps2")) == 4
    assert files(clashing / "maps2") == [n for n in files(clashing / "maps") if not n.endswith(".png")]
    assert explain(clashing / "maps", "--model", "demo", "--out", tmp_path / "x") == 2
    assert "is a guided-swap results folder" in capsys.readouterr().err


@pytest.mark.parametrize("given", ["path", "link"])
def test_an_out_in_an_input_folder_that_holds_images_of_its_own_is_refused(tmp_path, clashing, capsys, given):
    # OUT is never searched for inputs: sub/ as OUT left sub/pic.jpg out of the run, unsaid, and mixed results
    # with it; and once marked a results folder, no later run took it as an input again
    before = {name: (clashing / name).read_bytes() for name in files(clashing)}
    out = clashing / "sub"
    if given == "link":
        os.symlink(clashing / "sub", tmp_path / "link")
        out = tmp_path / "link"
    assert explain(clashing, "--model", "demo", "--save", "npz", "--out", out) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "holds 1 image(s) of its own" in error and "pic.jpg" in error, error
    assert files(clashing) == sorted(before) and not (clashing / "sub" / MARKER).exists()
    assert {name: (clashing / name).read_bytes() for name in files(clashing)} == before
    (clashing / "empty").mkdir()  # an empty folder there is as good as a new one
    assert explain(clashing, "--model", "demo", "--save", "npz", "--out", clashing / "empty") == 0
    assert len(read_index(clashing / "empty")) == 4


def test_each_result_records_its_settings(tmp_path, clashing):
    out = tmp_path / "out"
    assert explain(clashing / "pic.jpg", "--model", "demo", "--layer", "conv3", "--target", "1", "--out", out) == 0
    settings = record(out / "pic.jpg.npz")["settings"]
    from guided_swap import __version__
    from guided_swap.checks import demo
    from guided_swap.app.model_spec import sha256

    stats = demo.checkpoint()
    assert settings["model"] == "demo" and settings["weights_sha256"] == sha256(demo.WEIGHTS)
    assert [settings[k] for k in ("layer", "method", "rule", "target")] == ["conv3", "all", "guided", 1]
    assert (settings["size"], settings["mean"], settings["std"]) == (48, [stats["mean"]], [stats["std"]])
    assert settings["version"] == __version__
    from PIL import Image

    with Image.open(out / "pic.jpg.png") as png:  # the figure carries the same record
        assert json.loads(png.info["guided-swap record"])["settings"] == settings


def test_a_rerun_skips_same_settings_and_refuses_other_settings_unless_forced(tmp_path, clashing, capsys):
    out = tmp_path / "out"
    assert explain(clashing, "--model", "demo", "--save", "npz", "--out", out) == 0
    stamps = {name: os.stat(out / name).st_mtime_ns for name in files(out) if name != INDEX}
    capsys.readouterr()
    assert explain(clashing, "--model", "demo", "--save", "npz", "--out", out) == 0
    assert "4 of 4 input(s) already done" in capsys.readouterr().err
    for change in (["--method", "guided-gradcam"], ["--target", "0"], ["--layer", "conv2"], ["--size", "40"]):
        assert explain(clashing, "--model", "demo", "--save", "npz", "--out", out, *change) == 2
        error = capsys.readouterr().err
        assert "4 result(s)" in error and "other settings" in error and "--force" in error, error
    assert stamps == {name: os.stat(out / name).st_mtime_ns for name in files(out) if name != INDEX}
    assert explain(clashing, "--model", "demo", "--save", "npz", "--out", out, "--target", "0", "--force") == 0
    assert record(out / "pic.png.npz")["settings"]["target"] == 0
    assert all(line["target"] == 0 for line in read_index(out))


def test_other_weights_are_other_settings(tmp_path, clashing, capsys):
    import torch

    from guided_swap.checks.demo import DemoCNN

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(tmp_path / f"w{seed}.pt")
        torch.save(DemoCNN().state_dict(), paths[-1])
    common = [clashing / "pic.png", "--model", "guided_swap.checks.demo:DemoCNN", "--size", "48", "--save", "npz",
              "--out", tmp_path / "out"]
    assert explain(*common, "--weights", paths[0]) == 0
    assert explain(*common, "--weights", paths[1]) == 2
    assert "weights_sha256" in capsys.readouterr().err


def test_a_changed_input_is_explained_again(tmp_path, clashing, capsys):
    out = tmp_path / "out"
    assert explain(clashing / "pic.png", "--model", "demo", "--save", "npz", "--out", out) == 0
    before = np.load(out / "pic.png.npz")["input"]
    save_image(clashing / "pic.png", "camera")
    capsys.readouterr()
    assert explain(clashing / "pic.png", "--model", "demo", "--save", "npz", "--out", out) == 0
    assert "1 input(s) changed" in capsys.readouterr().err
    assert not np.allclose(np.load(out / "pic.png.npz")["input"], before)


def test_a_file_guided_swap_did_not_write_is_never_replaced(tmp_path, clashing, capsys):
    out = tmp_path / "out"
    save_image(out / "pic.jpg.png", "camera")
    mine = (out / "pic.jpg.png").read_bytes()
    for force in ([], ["--force"]):
        assert explain(clashing, "--model", "demo", "--out", out, *force) == 2
        assert "did not write" in capsys.readouterr().err
    assert (out / "pic.jpg.png").read_bytes() == mine


def test_the_index_has_one_line_per_input_with_failures(tmp_path, clashing):
    (clashing / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert explain(clashing, "--model", "demo", "--out", out) == 1
    lines = {line["name"]: line for line in read_index(out)}
    assert sorted(lines) == ["broken.png", "pic.jpg", "pic.png", "sub/pic.jpg", "sub__pic.png"]
    assert "cannot read image" in lines["broken.png"]["error"] and lines["broken.png"]["outputs"] == []
    line = lines["sub/pic.jpg"]
    assert line["error"] is None and line["outputs"] == ["sub/pic.jpg.npz", "sub/pic.jpg.png"]
    with np.load(out / "sub" / "pic.jpg.npz") as maps:
        assert line["target"] == int(maps["target"]) == int(maps["logits"].argmax())
        assert line["cam_peak"] == list(np.unravel_index(maps["cam"].argmax(), maps["cam"].shape))
        assert [c["class"] for c in line["top5"]] == list(np.argsort(-maps["logits"]))
    assert line["target_name"] in ("face", "non-face") and line["top5"][0]["name"] == line["target_name"]
    assert line["settings"]["model"] == "demo" and abs(sum(c["probability"] for c in line["top5"]) - 1) < 1e-6


def test_results_follow_the_umask(tmp_path, clashing):
    previous = os.umask(0o022)
    try:
        assert explain(clashing / "pic.png", "--model", "demo", "--out", tmp_path / "out") == 0
    finally:
        os.umask(previous)
    modes = {name: stat.S_IMODE(os.stat(tmp_path / "out" / name).st_mode) for name in files(tmp_path / "out")}
    assert modes == {MARKER: 0o644, INDEX: 0o644, "pic.png.npz": 0o644, "pic.png.png": 0o644}


def test_decode_and_write_workers_give_the_same_results(tmp_path, clashing):
    assert explain(clashing, "--model", "demo", "--out", tmp_path / "a") == 0
    assert explain(clashing, "--model", "demo", "--out", tmp_path / "b", workers="2", writers="2") == 0
    assert files(tmp_path / "a") == files(tmp_path / "b")
    for name in ("pic.jpg", "sub/pic.jpg"):
        with np.load(tmp_path / "a" / (name + ".npz")) as a, np.load(tmp_path / "b" / (name + ".npz")) as b:
            assert np.array_equal(a["gradient"], b["gradient"]) and np.array_equal(a["cam"], b["cam"])


def test_figures_share_one_colour_scale_over_the_run(tmp_path, clashing, capsys):
    from guided_swap.media import viz
    from guided_swap.app.results import read_record

    out = tmp_path / "out"
    assert explain(clashing / "pic.jpg", clashing / "sub" / "pic.jpg", "--model", "demo", "--out", out) == 0
    names = ["pic.jpg", "sub/pic.jpg"]
    limits = [read_record(str(out / (name + ".png")))["limits"] for name in names]
    with np.load(out / "pic.jpg.npz") as a, np.load(out / "sub" / "pic.jpg.npz") as b:
        assert not np.isclose(a["cam"].max(), b["cam"].max())  # two ranges, one scale
        expected = viz.shared_limits([dict(a), dict(b)], ("gradient", "cam", "guided_gradcam"))
    assert limits[0] == limits[1] and limits[0].keys() == expected.keys()
    assert all(np.allclose(limits[0][panel], expected[panel]) for panel in expected)
    capsys.readouterr()
    assert explain(clashing / "pic.jpg", clashing / "sub" / "pic.jpg", "--model", "demo", "--out", out) == 0
    assert "drawing" not in capsys.readouterr().err  # same inputs, same scale: nothing to redraw
    save_image(clashing / "sub" / "dark.png", "camera")
    assert explain(clashing / "pic.jpg", clashing / "sub", "--model", "demo", "--out", out) == 0
    assert "drawing 3 figure(s) on one colour scale shared by the 3 input(s)" in capsys.readouterr().err
    assert len({json.dumps(read_record(str(out / (n + ".png")))["limits"]) for n in names + ["sub/dark.png"]}) == 1


def test_per_image_figures_are_drawn_on_their_own_ranges(tmp_path, clashing, capsys):
    from guided_swap.app.results import read_record

    out = tmp_path / "out"
    assert explain(clashing / "pic.jpg", "--model", "demo", "--scale", "per-image", "--out", out) == 0
    assert read_record(str(out / "pic.jpg.png"))["limits"] is None and "drawing" not in capsys.readouterr().err
