"""Visualisation functions on values, figures (titles, colour bars, scales), image loading of every kind, and the
demo models."""
import io
import os
import re
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from skimage import data

import guided_swap as gs
from guided_swap.checks import demo
from guided_swap.media import images
from guided_swap.media import viz


def test_standardize_clip_and_minmax_on_values():
    m = np.array([[0.0, 1.0], [2.0, 3.0]])
    z = (m - 1.5) / m.std()
    assert np.allclose(viz.standardize_clip(m), np.clip(z * 0.1 + 0.5, 0, 1))
    assert np.allclose(viz.standardize_clip(np.ones((2, 2))), 0.5)
    assert np.allclose(viz.minmax(m), m / 3) and np.allclose(viz.minmax(np.ones(3)), 0)
    assert np.allclose(viz.standardize_clip(np.array([0.0, 100.0]), saturation=10), [0.0, 1.0])


def test_grayscale_overlay_and_denormalize():
    g = torch.tensor([[[1.0, -2.0]], [[0.5, 3.0]], [[-4.0, 0.0]]])
    assert np.allclose(viz.grayscale(g), [[1.0, 3.0]])
    assert np.allclose(viz.grayscale(g, absolute=True), [[4.0, 3.0]])
    image = np.zeros((2, 2, 3))
    blended = viz.overlay(image, np.ones((2, 2)), alpha=0.4, cmap="viridis")
    assert np.allclose(blended, 0.4 * viz.colormap(np.ones((2, 2)), "viridis"))
    with pytest.raises(ValueError, match="alpha"):
        viz.overlay(image, np.ones((2, 2)), alpha=2)
    with pytest.raises(ValueError, match="differ in size"):
        viz.overlay(image, np.ones((3, 3)))
    picture = viz.denormalize(torch.zeros(3, 4, 4))
    assert picture.shape == (4, 4, 3) and np.allclose(picture[0, 0], viz.IMAGENET_MEAN)


def test_figure_png(tmp_path):
    model, x, truth = demo.load_demo()
    ex = gs.convert(model, layer="auto", example_input=x[:1])
    fig = viz.figure(ex.explain(x[:2]), x[:2], explainer=ex, labels=list(demo.CLASSES), mean=(0.5,), std=(0.25,),
                     notes=truth[:2])
    titles = [ax.get_title() for ax in fig.axes[:4]]
    assert titles[0].startswith("face: p=") and titles[1:] == ["guided backprop", "Grad-CAM (relu_)",
                                                               "Guided Grad-CAM"]
    path = viz.save_png(fig, str(tmp_path / "fig.png"))
    assert viz.save_png(np.random.rand(8, 8, 3), str(tmp_path / "a.png"))
    from skimage import io

    assert io.imread(path).shape[2] in (3, 4)


@pytest.mark.parametrize("array", [
    data.chelsea(),                                          # 8-bit RGB
    data.camera(),                                           # 8-bit grey
    (data.camera().astype(np.uint16) * 257),                 # 16-bit grey
    np.dstack([data.chelsea(), np.full(data.chelsea().shape[:2], 255, np.uint8)]),  # RGBA
    data.chelsea() / 255.0,                                  # float in [0, 1]
])
def test_load_image_kinds(array):
    x = images.load_image(array, resize=64, crop=56)
    assert x.shape == (3, 56, 56) and x.dtype == torch.float32 and torch.isfinite(x).all()


def test_sixteen_bit_matches_eight_bit():
    eight = images.load_image(data.camera(), resize=32, crop=32)
    sixteen = images.load_image(data.camera().astype(np.uint16) * 257, resize=32, crop=32)
    assert torch.allclose(eight, sixteen, atol=1e-5)


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        images.load_image(str(tmp_path / "missing.png"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.png"):
        images.load_image(str(bad))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        images.load_image(np.full((40, 40), 3.0))
    with pytest.raises(ValueError, match="smaller than the crop"), pytest.warns(UserWarning, match="512x512"):
        images.load_image(data.camera(), resize=None, crop=1000)


def test_demo_model_is_trained_and_uses_functional_relus():
    model, x, truth = demo.load_demo()
    predictions = model(x).argmax(1)
    assert [demo.CLASSES[int(p)] for p in predictions] == truth
    ex = gs.convert(model, layer="auto", example_input=x[:1])
    assert {s.spelling for s in ex.report.swapped} == {"nn.ReLU", "F.relu", "Tensor.relu_", "torch.relu"}
    assert ex.forked  # torch.relu in the head follows the captured layer
    checkpoint = torch.load(demo.WEIGHTS, weights_only=True)
    assert checkpoint["test_accuracy"] >= 0.9


# --- what the figure claims, and how it scales -------------------------------------------------------------

def fake_explanation(gradient: torch.Tensor, cam: torch.Tensor, rule: str = "guided"):
    """An explanation-shaped object with chosen maps (two classes, class 1 explained)."""
    batch = gradient.shape[0]
    return SimpleNamespace(logits=torch.zeros(batch, 2), target=torch.ones(batch, dtype=torch.long),
                           score=torch.zeros(batch), gradient=gradient, cam=cam, layers={"layer4": None},
                           guided_gradcam=cam[:, None] * gradient, rule=rule)


def two_images_hundredfold_apart():
    generator = torch.Generator().manual_seed(0)
    gradient = torch.randn(1, 3, 8, 8, generator=generator)
    cam = torch.rand(1, 8, 8, generator=generator)
    return fake_explanation(torch.cat([gradient, 100 * gradient]), torch.cat([cam, 100 * cam])), torch.zeros(2, 3, 8, 8)


def colorbar_limits(fig, panels: int, rows: int):
    """(vmin, vmax) of each colour bar, in drawing order (row by row, map panels left to right)."""
    bars = fig.axes[panels * rows:]
    return [(bar._colorbar.mappable.norm.vmin, bar._colorbar.mappable.norm.vmax) for bar in bars]


def drawn(fig, row: int, column: int, panels: int) -> np.ndarray:
    return np.asarray(fig.axes[row * panels + column].get_images()[0].get_array())


def test_every_map_panel_has_a_colorbar_and_the_input_none():
    e, x = two_images_hundredfold_apart()
    fig = viz.figure(e, x)
    assert len(fig.axes) == 2 * 4 + 2 * 3  # 8 panels, a bar for each of the 6 maps
    assert all(hasattr(bar, "_colorbar") for bar in fig.axes[8:])
    fig = viz.figure(e, x, panels=("input", "cam"))
    assert len(fig.axes) == 2 * 2 + 2 and [ax.get_title() for ax in fig.axes[:2]][1] == "Grad-CAM (layer4)"


def test_shared_scale_is_one_range_for_all_rows_and_per_image_stretches_each():
    e, x = two_images_hundredfold_apart()
    shared = viz.figure(e, x, scale="shared")
    bars = colorbar_limits(shared, 4, 2)
    assert bars[:3] == bars[3:]  # row 0 and row 1: the same range for gradient, cam, guided_gradcam
    assert bars[1] == pytest.approx((0.0, float(e.cam.max())))
    assert bars[0] == pytest.approx(viz.standardize_limits(e.gradient))
    # the weak image is drawn weak: its Grad-CAM overlay differs from the strong one's
    assert not np.allclose(drawn(shared, 0, 2, 4), drawn(shared, 1, 2, 4))

    per_image = viz.figure(e, x, scale="per-image")
    bars = colorbar_limits(per_image, 4, 2)
    assert bars[4] == pytest.approx((0.0, 100 * bars[1][1]))  # cam ranges 100x apart
    for column in (1, 2, 3):  # and both images drawn alike, each stretched to its own range
        assert np.allclose(drawn(per_image, 0, column, 4), drawn(per_image, 1, column, 4), atol=1e-6)


def test_explicit_limits_fix_a_panel_range_and_bad_ones_are_refused():
    e, x = two_images_hundredfold_apart()
    fig = viz.figure(e, x, panels=("cam",), scale="per-image", limits={"cam": (0, 5)})
    assert colorbar_limits(fig, 1, 2) == [(0.0, 5.0), (0.0, 5.0)]
    with pytest.raises(ValueError, match="low < high"):
        viz.figure(e, x, limits={"cam": (5, 0)})
    with pytest.raises(ValueError, match="unknown panel"):
        viz.figure(e, x, limits={"input": (0, 1)})
    with pytest.raises(ValueError, match="scale"):
        viz.figure(e, x, scale="global")


def test_shared_limits_over_sources_read_one_at_a_time():
    e, _ = two_images_hundredfold_apart()
    whole = viz.shared_limits([e])
    split = viz.shared_limits([{k: getattr(e, k)[i:i + 1].numpy() for k in viz.MAP_PANELS} for i in range(2)])
    for panel in viz.MAP_PANELS:
        assert split[panel] == pytest.approx(whole[panel])


def test_a_tiny_map_is_not_flat_grey():
    """A GELU net's Guided Grad-CAM sits near 1e-12: the floor is relative, so it is drawn like any map."""
    m = np.random.default_rng(0).normal(size=(3, 8, 8))
    assert np.allclose(viz.standardize_clip(m * 1e-12), viz.standardize_clip(m))
    assert viz.standardize_clip(m * 1e-12).std() > 0.05
    assert np.allclose(viz.standardize_clip(np.full((2, 2), 3e-12)), 0.5)  # a constant map is flat
    assert np.allclose(viz.standardize_clip(np.zeros((2, 2))), 0.5)
    assert viz.minmax(m * 1e-12).max() == pytest.approx(1.0)


def gelu_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GELU(), torch.nn.Conv2d(8, 8, 3),
                               torch.nn.GELU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(8, 3)).eval()


def test_titles_of_a_model_without_relu_say_plain_gradient():
    x = torch.randn(1, 3, 16, 16)
    ex = gs.convert(gelu_net(), layer="2")
    assert len(ex.swapped) == 0
    fig = viz.figure(ex.explain(x), x, explainer=ex)
    assert [ax.get_title() for ax in fig.axes[1:4]] == [
        "plain gradient (no ReLU swapped)", "Grad-CAM (2)", "Grad-CAM ×\nplain gradient (no ReLU swapped)"]
    fig = viz.figure(ex.explain(x), x, panels=("gradient",))  # the explanation says so by itself
    assert fig.axes[0].get_title() == "plain gradient (no ReLU swapped)"
    e, pictures = two_images_hundredfold_apart()
    assert viz.figure(e, pictures, swapped=0, panels=("gradient",)).axes[0].get_title().startswith("plain gradient")


def test_a_map_that_is_zero_everywhere_says_so_in_its_title():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.randn(2, 3, 16, 16)
    ex = gs.convert(net, layer="0")
    live = viz.figure(ex.explain(x), x, explainer=ex, panels=("gradient", "cam"))
    assert not any("zero everywhere" in ax.get_title() for ax in live.axes)
    torch.nn.init.zeros_(net[4].weight)  # the score no longer depends on the input (an untrained head)
    with pytest.warns(gs.ZeroGradientWarning):
        e = gs.convert(net, layer="0").explain(x)
    titles = [ax.get_title() for ax in viz.figure(e, x, panels=("gradient", "cam")).axes if ax.get_title()]
    assert titles == ["guided backprop" + viz.ZERO_NOTE, "Grad-CAM (0)" + viz.ZERO_NOTE] * 2


def test_titles_follow_the_rule_and_never_guess():
    model, x, _ = demo.load_demo()
    titles = {}
    for rule in ("guided", "deconvnet", "gradient"):
        ex = gs.convert(model, layer="auto", rule=rule, example_input=x[:1])
        fig = viz.figure(ex.explain(x[:1]), x[:1], explainer=ex, panels=("gradient", "guided_gradcam"))
        titles[rule] = [ax.get_title() for ax in fig.axes[:2]]
    assert titles == {"guided": ["guided backprop", "Guided Grad-CAM"],
                      "deconvnet": ["deconvnet", "Grad-CAM ×\ndeconvnet"],
                      "gradient": ["plain gradient", "Grad-CAM ×\nplain gradient"]}
    e = gs.convert(model, layer="auto", example_input=x[:1]).explain(x[:1])
    fig = viz.figure(e, x[:1], panels=("input", "gradient"))  # the explanation carries its swap count
    assert [ax.get_title() for ax in fig.axes[:2]] == ["class 1: p=1.00", "guided backprop"]
    e, pictures = two_images_hundredfold_apart()  # an object with no swap count: the title names only the rule
    assert viz.figure(e, pictures, panels=("gradient",)).axes[0].get_title() == "'guided' rule"


def test_only_computed_panels_are_drawn():
    model, x, _ = demo.load_demo()
    e = gs.convert(model, layer=None).explain(x[:1])
    assert len(viz.figure(e, x[:1]).axes) == 2 + 1  # input and gradient, one colour bar
    with pytest.raises(ValueError, match="captured layer"):
        viz.figure(e, x[:1], panels=("input", "cam"))
    with pytest.raises(ValueError, match="unknown panel"):
        viz.figure(e, x[:1], panels=("input", "saliency"))
    with pytest.raises(ValueError, match="has no name"):
        viz.figure(e, x[:1], labels=["only one"])


ODD_NAMES = ["$x^$.png", os.fsdecode(b"bad\xff.png"), "$\\alpha$.png", "two\nlines.png"]
SHOWN = ["$x^$.png", "bad\\xff.png", "$\\alpha$.png", "two\\nlines.png"]  # each character as it is


def test_titles_are_plain_text_whatever_the_bytes_of_a_name():
    e, x = two_images_hundredfold_apart()
    for pair in (0, 2):
        fig = viz.figure(e, x, panels=("input", "cam"), notes=ODD_NAMES[pair:pair + 2], labels=["zero", "$y_1$"])
        fig.savefig(io.BytesIO(), format="png")  # math text and set_text() complain when the text is drawn
        titles = [fig.axes[0].get_title(), fig.axes[2].get_title()]
        assert [title.split("\n", 1)[1] for title in titles] == SHOWN[pair:pair + 2]
        assert all(title.startswith("$y_1$: p=") for title in titles)
        assert all(not ax.title.get_parse_math() and not ax.title.get_usetex() for ax in fig.axes[:4])

def test_library_figures_leave_pyplot_and_the_backend_alone(monkeypatch):
    import matplotlib
    import matplotlib.pyplot as plt

    def refuse(*args, **kwargs):
        raise AssertionError("library code called matplotlib.use")

    monkeypatch.setattr(matplotlib, "use", refuse)
    backend, figures = matplotlib.get_backend(), plt.get_fignums()
    from guided_swap.checks import sanity

    model, x, _ = demo.load_demo()
    e, images_ = two_images_hundredfold_apart()
    made = [viz.figure(e, images_), sanity.randomization_figure(model, x[:1], max_steps=1)]
    assert all(type(fig).__name__ == "Figure" for fig in made)
    assert plt.get_fignums() == figures and matplotlib.get_backend() == backend


def test_library_source_never_switches_backend_and_pictures_never_use_pyplot():
    import pathlib

    package = pathlib.Path(gs.__file__).parent
    assert not [path.name for path in package.rglob("*.py") if "matplotlib.use(" in path.read_text()]
    pyplot = re.compile(r"import matplotlib\.pyplot|from matplotlib import pyplot")
    drawing = ("media/viz.py", "checks/demo.py", "checks/sanity.py", "media/images.py", "media/labels.py")
    assert not [name for name in drawing if pyplot.search((package / name).read_text())]


# --- images as users have them ------------------------------------------------------------------------------

@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pil(tmp_path, orientation):
    from PIL import Image, ImageOps

    pixels = (np.random.default_rng(orientation).random((20, 30, 3)) * 255).astype(np.uint8)
    picture = Image.fromarray(pixels)
    exif = picture.getexif()
    exif[images.EXIF_ORIENTATION] = orientation
    path = tmp_path / "photo.jpg"
    picture.save(path, exif=exif, quality=95)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)))
    assert np.array_equal(images.read_image(str(path)), expected)
    if orientation == 6:  # a phone held upright: stored 20 x 30, shown 30 x 20
        assert images.load_image(str(path), resize=None, crop=None).shape == (3, 30, 20)


@pytest.mark.parametrize("mode", ["CMYK", "LAB"])
def test_a_file_in_another_colour_space_is_read_as_rgb_like_pil(tmp_path, mode):
    # read as stored, a CMYK JPEG's K channel was taken for alpha (a white picture) and Lab's channels for RGB
    from PIL import Image, ImageOps

    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[:, :15] = (200, 30, 30)
    pixels[:, 15:] = (20, 40, 180)
    path = tmp_path / ("photo.tif" if mode == "LAB" else "photo.jpg")
    Image.fromarray(pixels).convert(mode).save(path, **({"quality": 95} if mode == "CMYK" else {}))
    with Image.open(path) as image:
        assert image.mode == mode
        expected = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    read = images.read_image(str(path))
    assert read.shape == (20, 30, 3) and np.array_equal(read, expected)
    assert np.abs(read.astype(int) - pixels).max() < 40  # red on the left, blue on the right: the picture


def test_an_animated_image_gives_its_first_frame_and_says_so(tmp_path):
    from PIL import Image

    frames = [Image.fromarray(np.full((20, 30, 3), value, np.uint8)) for value in (40, 120, 250)]
    path = tmp_path / "moving.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with pytest.warns(UserWarning, match="3 frames .*the first is explained"):
        read = images.read_image(str(path))
    assert read.shape[:2] == (20, 30) and abs(int(read.mean()) - 40) <= 2


def test_integer_pixels_of_unknown_range_are_refused_not_scaled_to_black(tmp_path):
    # a 32-bit grey TIFF holding 0..255 was scaled by 2 ** 31: a black input, explained without a word
    from PIL import Image

    path = tmp_path / "wide.tif"
    Image.fromarray(np.arange(600, dtype=np.int32).reshape(20, 30) % 256).save(path)
    with pytest.raises(ValueError, match="int32 .*values 0 to 255.*range is not known"):
        images.load_image(str(path), resize=None, crop=None)


def test_an_image_smaller_than_the_input_warns_with_its_size():
    with pytest.warns(UserWarning, match=r"20x30 pixels, smaller than the model's 56x56"):
        images.load_image(np.zeros((20, 30), np.uint8), resize=64, crop=56)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images.load_image(np.zeros((80, 90), np.uint8), resize=64, crop=56)


# --- demo training ------------------------------------------------------------------------------------------

def test_demo_training_is_deterministic_and_never_overwrites(tmp_path):
    threads = torch.get_num_threads()
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.set_num_threads(1)
    try:
        demo.train(str(first), epochs=1)
    finally:
        torch.set_num_threads(threads)
    demo.train(str(second), epochs=1)  # another ambient thread count: training fixes its own
    assert torch.get_num_threads() == threads
    assert demo.largest_difference(str(first), str(second)) == 0.0
    with pytest.raises(FileExistsError, match="overwrite"):
        demo.train(str(first), epochs=1)
    with pytest.raises(SystemExit):
        demo.main(["--train", "--out", str(first)])


def test_photo_model_knows_its_photographs():
    model, x, names = demo.load_photos(size=64)
    assert names == list(demo.PHOTO_CLASSES) and x.shape == (4, 3, 64, 64)
    assert model(x).argmax(1).tolist() == [0, 1, 2, 3]
    assert demo.photo_checkpoint()["test_accuracy"] >= 0.9
