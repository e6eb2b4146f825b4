"""The figure composed with numpy and Pillow (viz.picture, media.render): it says what viz.figure says, shows the
maps' own colours pixel for pixel, a bar per map with its range, titles as plain text, and saves like a figure."""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from guided_swap.app import results
from guided_swap.media import render, viz

from test_viz_and_images import ODD_NAMES, SHOWN, fake_explanation, two_images_hundredfold_apart


def as_array(picture) -> np.ndarray:
    return np.asarray(picture.image)


def crop(picture, row: int, column: int) -> np.ndarray:
    left, top, right, bottom = picture.boxes[row][column]
    return as_array(picture)[top:bottom, left:right]


def test_picture_says_what_the_figure_says():
    e, x = two_images_hundredfold_apart()
    e.guided_gradcam = torch.zeros_like(e.guided_gradcam)  # titled "(zero everywhere)"
    for scale in viz.SCALES:
        fig = viz.figure(e, x, notes=["a.png", "b.png"], labels=["zero", "one"], scale=scale)
        picture = viz.picture(e, x, notes=["a.png", "b.png"], labels=["zero", "one"], scale=scale)
        assert [t for row in picture.titles for t in row] == [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert picture.titles[0][3].endswith(viz.ZERO_NOTE)


def test_each_panel_shows_its_map_pixel_for_pixel():
    e, x = two_images_hundredfold_apart()  # 8 x 8 maps: enlarged by whole pixels to 160 x 160
    picture = viz.picture(e, x, cmap="viridis")
    factor = render.MIN_SIDE // 8
    rows = viz.plan(e, x)
    for r, (image, cells) in enumerate(rows):
        expected = [image, viz.to_rgb(cells[1].values, cells[1].limits),
                    viz.overlay(image, viz.scale_to_unit(cells[2].values, cells[2].limits), 0.5, "viridis"),
                    viz.to_rgb(cells[3].values, cells[3].limits)]
        for c, shown in enumerate(expected):
            big = np.repeat(np.repeat(shown, factor, axis=0), factor, axis=1)
            assert np.array_equal(crop(picture, r, c), (big * 255 + 0.5).astype(np.uint8))
    assert picture.boxes[0][0][1] < picture.boxes[1][0][1]  # one row per image


def test_every_map_has_a_bar_from_its_low_to_its_high_colour():
    e, x = two_images_hundredfold_apart()
    picture = viz.picture(e, x[:1].expand(2, -1, -1, -1), panels=("input", "cam"), cmap="jet")
    left, top, right, bottom = picture.boxes[0][1]
    bar = as_array(picture)[top:bottom, right + render.BAR_GAP + render.BAR_WIDTH // 2]
    jet = (viz.colormap(np.array([1.0, 0.0]), "jet") * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(bar[[0, -1]], jet)  # high at the top, low at the bottom
    between = as_array(picture)[top:bottom, picture.boxes[0][0][2] + 1:left - 1]
    assert (between == 255).all()  # the input has no bar


@pytest.mark.parametrize("limits, labels, offset", [
    ((0.0, 0.17), ["0.000", "0.025", "0.050", "0.075", "0.100", "0.125", "0.150"], ""),
    ((-4.9e-3, 4.9e-3), ["−4", "−2", "0", "2", "4"], "1e−3"),
    ((-1.0, 1.0), ["−1.00", "−0.75", "−0.50", "−0.25", "0.00", "0.25", "0.50", "0.75", "1.00"], ""),
    ((0.0, 25000.0), ["0.0", "0.5", "1.0", "1.5", "2.0", "2.5"], "1e4"),
])
def test_bar_ticks_are_round_numbers_inside_the_range(limits, labels, offset):
    assert render.bar_ticks(limits, 224) == (labels, offset)


def test_titles_are_plain_text_and_long_ones_wrap_without_losing_a_character():
    e, x = two_images_hundredfold_apart()
    picture = viz.picture(e, x, panels=("input", "cam"), notes=ODD_NAMES[:2], labels=["zero", "$y_1$"])
    assert [title.split("\n", 1)[1] for title in (picture.titles[0][0], picture.titles[1][0])] == SHOWN[:2]
    long = "a_file_name_" * 12 + ".png"
    lines = render._wrap(long, 160)
    assert len(lines) > 1 and "".join(lines) == long
    assert all(render._font(render.TITLE_SIZE).getlength(line) <= 160 for line in lines)
    assert render._wrap("guided backprop (layer4)", 90) == ["guided", "backprop", "(layer4)"]
    assert render._wrap("photos/2024/cat.jpg", 100) == ["photos/2024/", "cat.jpg"]  # after a separator


def test_panels_keep_the_input_size_between_the_limits():
    for side, shown in ((8, 160), (224, 224), (600, 300)):
        picture = render.compose([[render.Cell(np.zeros((side, side, 3)), "x")]])
        left, top, right, bottom = picture.boxes[0][0]
        assert (right - left, bottom - top) == (shown, shown)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        render.compose([[render.Cell(np.zeros((4, 4)), "x")]])
    with pytest.raises(ValueError, match="at least one row"):
        render.compose([])


def test_a_picture_saves_as_a_figure_does(tmp_path):
    e, x = two_images_hundredfold_apart()
    picture = viz.picture(e, x)
    path = str(tmp_path / "result.png")
    results.write_png(picture, path, {"name": os.fsdecode(b"bad\xff.png")})
    assert results.read_record(path) == {"name": os.fsdecode(b"bad\xff.png")}
    with Image.open(path) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), as_array(picture))
    viz.save_png(picture, str(tmp_path / "again.png"))
    assert sorted(os.listdir(tmp_path)) == ["again.png", "result.png"]
    with pytest.raises(ValueError, match="PNG only"):
        picture.savefig(io.BytesIO(), format="svg")
    assert picture._repr_png_().startswith(b"\x89PNG")


def test_picture_checks_its_arguments_as_figure_does():
    e, x = two_images_hundredfold_apart()
    with pytest.raises(ValueError, match="unknown colour map"):
        viz.picture(e, x, cmap="no-such-map")
    with pytest.raises(ValueError, match="alpha"):
        viz.picture(e, x, alpha=2.0)
    with pytest.raises(ValueError, match="inputs has"):
        viz.picture(e, x[:1])
    gradient_only = fake_explanation(torch.ones(1, 3, 4, 4), torch.ones(1, 4, 4))
    gradient_only.layers = {}
    with pytest.raises(ValueError, match="need a captured layer"):
        viz.picture(gradient_only, torch.zeros(1, 3, 4, 4), panels=("input", "cam"))


def test_png_bytes_are_lossless_with_their_text_and_refuse_what_png_cannot_hold():
    generator = np.random.default_rng(0)
    for shape in ((1, 1, 3), (1, 7, 3), (5, 1, 3), (37, 53, 3)):
        pixels = generator.integers(0, 256, shape, dtype=np.uint8)
        data = render.png_bytes(pixels, {"Software": "guided_swap", "note": "€ $x^$"})
        with Image.open(io.BytesIO(data)) as image:
            assert np.array_equal(np.asarray(image), pixels)
            assert image.info["Software"] == "guided_swap" and image.info["note"] == "€ $x^$"
    with pytest.raises(ValueError, match="text key"):
        render.png_bytes(pixels, {"": "x"})
    with pytest.raises(ValueError, match="NUL"):
        render.png_bytes(pixels, {"key": "a\0b"})
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        render.png_bytes(np.zeros((4, 4), np.uint8))
