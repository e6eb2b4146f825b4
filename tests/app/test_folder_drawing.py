"""Figures on the run's shared colour scale are drawn from the maps the run saved (the .npz, or hidden temporaries
for PNG-only runs): every input is explained exactly once per run, the pictures are those of its explanation, and
no temporary outlives the run (nor a stopped run followed by a rerun)."""
import io
import os
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from guided_swap.app import folder, results
from guided_swap.app.cli import main, make_job, parser
from guided_swap.run.explainer import Explainer
from guided_swap.app.results import MARKER, read_index, read_record

from test_folder import ASTRONAUT, CAT, files, save_image


@pytest.fixture()
def three(tmp_path):
    root = tmp_path / "in"
    for name, image in (("a.png", CAT), ("b.png", ASTRONAUT), ("c.png", "camera")):
        save_image(root / name, image, size=40)
    return root


@pytest.fixture()
def explained(monkeypatch):
    """How many times each input (by its bytes) went through ``Explainer.explain`` (SmoothGrad's inner calls on
    noisy copies are not counted)."""
    counts, inside = Counter(), []
    original = Explainer.explain

    def counting(self, x, *args, **kwargs):
        if not inside:
            counts.update(row.numpy().tobytes() for row in x.detach().cpu())
        inside.append(1)
        try:
            return original(self, x, *args, **kwargs)
        finally:
            inside.pop()

    monkeypatch.setattr(Explainer, "explain", counting)
    return counts


def arguments(inputs, out, *extra):
    return ["explain", str(inputs), "--model", "demo", "--size", "32", "--resize", "36", "--out", str(out),
            "--batch-size", "2", "--workers", "0", "--writers", "0", *extra]


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def hidden(out) -> list:
    return [name for name in files(out) if any(part.startswith(".") for part in name.split(os.sep))
            and name != MARKER]


def figure_as_before(args, name: str, limits) -> np.ndarray:
    """The figure as the runner drew it before it kept maps: the input explained again, the explanation drawn."""
    from guided_swap.app import distributed
    from guided_swap.media import viz
    from guided_swap.app.decoding import Decoded
    from guided_swap.app.results import discover
    from guided_swap.app.writing import panels

    job = make_job(parser().parse_args(args))
    group = distributed.start("cpu")
    explainer, _, channels = folder.build_explainer(job, group, lambda message: None)
    items = discover(job.inputs, job.out)
    index = [item.name for item in items].index(name)
    _, x, _ = Decoded(items, [index], job.preprocessing, channels)[0]
    one = explainer.explain(x[None], job.target)[0]
    nodes = dict(explainer.report.layers)
    one = replace(one, layers={nodes.get(key, key): maps for key, maps in one.layers.items()})
    p = job.preprocessing
    fig = viz.picture(one, x[None], panels(job.method, job.cams), labels=job.labels, notes=[name], mean=p.mean,
                      std=p.std, cmap=job.cmap, scale="shared" if limits else "per-image",
                      limits={k: tuple(v) for k, v in limits.items()} if limits else None)
    stream = io.BytesIO()
    fig.savefig(stream)
    return pixels(stream)


@pytest.mark.parametrize("save", ["png,npz", "png"])
def test_each_input_is_explained_once_and_drawn_as_its_explanation(tmp_path, three, explained, save):
    out = tmp_path / "out"
    assert main(arguments(three, out, "--save", save)) == 0
    assert len(explained) == 3 and set(explained.values()) == {1}
    assert hidden(out) == [] and all(line["error"] is None for line in read_index(out))
    limits = read_record(str(out / "a.png.png"))["limits"]
    assert limits == read_record(str(out / "c.png.png"))["limits"]  # one scale over the run
    assert np.array_equal(pixels(out / "a.png.png"), figure_as_before(arguments(three, out), "a.png", limits))


@pytest.mark.parametrize("extra", [("--scale", "per-image"), ("--method", "gradcam", "--save", "png")])
def test_per_image_and_grad_cam_only_figures_are_those_of_the_explanation(tmp_path, three, extra):
    args = arguments(three / "b.png", tmp_path / "out", *extra)
    assert main(args) == 0
    limits = read_record(str(tmp_path / "out" / "b.png.png"))["limits"]
    assert (limits is None) == ("per-image" in extra)
    assert np.array_equal(pixels(tmp_path / "out" / "b.png.png"), figure_as_before(args, "b.png", limits))


def test_png_only_and_png_with_npz_draw_the_same_pictures_with_smoothgrad(tmp_path, three, explained):
    smooth = ("--smooth", "2", "--method", "all", "--cam", "layercam")
    assert main(arguments(three, tmp_path / "png", "--save", "png", *smooth)) == 0
    assert main(arguments(three, tmp_path / "both", "--save", "png,npz", *smooth)) == 0
    assert set(explained.values()) == {2}  # once per run
    for name in ("a.png.png", "b.png.png", "c.png.png"):
        assert np.array_equal(pixels(tmp_path / "png" / name), pixels(tmp_path / "both" / name))
    record = read_record(str(tmp_path / "png" / "a.png.png"))
    assert record["settings"]["smooth"]["copies"] == 2 and "cams.layercam" in record["limits"]
    assert hidden(tmp_path / "png") == []


def test_a_rerun_redraws_old_scale_figures_from_their_npz_without_explaining(tmp_path, three, explained, capsys):
    out = tmp_path / "out"
    assert main(arguments(three, out, "--save", "png,npz")) == 0
    before = read_record(str(out / "a.png.png"))["limits"]
    save_image(three / "d.png", "coffee", size=40)
    explained.clear()
    assert main(arguments(three, out, "--save", "png,npz")) == 0
    assert sum(explained.values()) == 1  # only the new input; the other three drawn from their .npz
    assert "drawing 4 figure(s)" in capsys.readouterr().err
    after = read_record(str(out / "a.png.png"))["limits"]
    assert after != before and after == read_record(str(out / "d.png.png"))["limits"]
    assert np.array_equal(pixels(out / "b.png.png"), figure_as_before(arguments(three, out), "b.png", after))


def test_a_png_only_rerun_explains_again_only_what_it_must(tmp_path, three, explained):
    out = tmp_path / "out"
    assert main(arguments(three, out, "--save", "png")) == 0
    explained.clear()
    assert main(arguments(three, out, "--save", "png")) == 0
    assert sum(explained.values()) == 0  # same inputs, same scale: nothing to do
    save_image(three / "d.png", "coffee", size=40)
    assert main(arguments(three, out, "--save", "png")) == 0  # the scale moved: no maps kept, so explained again
    assert len(explained) == 4 and set(explained.values()) == {1} and hidden(out) == []


class _Raised:
    raised = True


def stopped_at_once():
    yield _Raised()


@pytest.mark.parametrize("save", ["png", "png,npz"])
def test_a_stopped_run_and_a_killed_one_leave_no_temporaries_after_the_rerun(tmp_path, three, monkeypatch, save):
    from contextlib import contextmanager

    out = tmp_path / "out"
    with monkeypatch.context() as patch:  # Ctrl-C during the first batch
        patch.setattr(folder, "stop_after_batch", contextmanager(stopped_at_once))
        assert main(arguments(three, out, "--save", save)) == 130
    assert hidden(out) == []  # the stashed maps of the explained batch went with the stopped run
    assert [line["error"] is None for line in read_index(out)] == [False] * 3
    (out / ".a.png.maps.999999999-0badc0de.part").write_bytes(b"half")  # as a killed run leaves
    assert main(arguments(three, out, "--save", save)) == 0
    assert hidden(out) == [] and all(line["error"] is None for line in read_index(out))
    assert all((out / f"{name}.png.png").exists() for name in "abc")


def test_a_figure_whose_maps_changed_under_the_run_is_not_drawn_from_them(tmp_path, three, monkeypatch):
    out = tmp_path / "out"
    original = folder._draw

    def tampered(explainer, job, plan, mine, drawing, stashed, *rest):
        from guided_swap.app.results import write_npz

        path = str(out / "a.png.npz")
        with np.load(path) as data:
            maps = {k: data[k] for k in data.files if k != "record"}
        write_npz(path, dict(maps, cam=maps["cam"] * 2), dict(read_record(path), score=-1.0))  # another writer
        return original(explainer, job, plan, mine, drawing, stashed, *rest)

    monkeypatch.setattr(folder, "_draw", tampered)
    assert main(arguments(three, out, "--save", "png,npz")) == 1
    lines = {line["name"]: line for line in read_index(out)}
    assert "changed during the run" in lines["a.png"]["error"] and lines["b.png"]["error"] is None
    assert not (out / "a.png.png").exists() and (out / "b.png.png").exists()


# File names (bytes on disk) and how a figure titles them: each character as it is, undecodable bytes and control
# characters as escapes, never math text.
ODD_NAMES = {b"$x^$.png": "$x^$.png", b"bad\xff.png": "bad\\xff.png", b"$\\alpha$.png": "$\\alpha$.png",
             b"two\nlines.png": "two\\nlines.png"}


def test_any_file_name_is_a_plain_text_title(tmp_path, monkeypatch, capsys):
    root, out = tmp_path / "in", tmp_path / "out"
    for name in ODD_NAMES:
        save_image(root / os.fsdecode(name), CAT, size=40)
    titles, write = {}, results.write_png

    def spy(fig, path, record):
        titles[record["name"]] = fig.titles[0][0]
        write(fig, path, record)

    monkeypatch.setattr(results, "write_png", spy)
    assert main(arguments(root, out, "--save", "png,npz")) == 0
    lines = {line["name"]: line for line in read_index(out)}
    assert sorted(os.fsencode(name) for name in lines) == sorted(ODD_NAMES)
    assert all(line["error"] is None for line in lines.values())
    assert {os.fsencode(name): title.split("\n")[1:] for name, title in titles.items()} == \
        {name: [shown] for name, shown in ODD_NAMES.items()}
    for name in lines:  # each figure is on disk, with its record
        assert read_record(str(out / name) + ".png")["name"] == name
    capsys.readouterr()
    assert main(arguments(root, out, "--save", "png,npz")) == 0  # a rerun finds them done
    assert "4 of 4 input(s) already done" in capsys.readouterr().err


def test_writer_processes_draw_odd_names_as_this_process_does(tmp_path):
    root = tmp_path / "in"
    for name in ODD_NAMES:
        save_image(root / os.fsdecode(name), ASTRONAUT, size=40)
    here, pool = arguments(root, tmp_path / "here"), arguments(root, tmp_path / "pool")
    assert main(here) == 0 and main(pool[:pool.index("--writers") + 1] + ["2"]) == 0
    for name in os.listdir(tmp_path / "here"):
        if name.endswith(".png.png"):
            assert np.array_equal(pixels(tmp_path / "here" / name), pixels(tmp_path / "pool" / name))
