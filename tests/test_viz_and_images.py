"""Visualisation functions on values, image loading of every kind, and the demo model's trained weights."""
import numpy as np
import pytest
import torch
from skimage import data

import guided_swap as gs
from guided_swap import demo, images, viz


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
    e = gs.convert(model, layer="auto", example_input=x[:1]).explain(x[:2])
    fig = viz.figure(e, x[:2], labels=list(demo.CLASSES), mean=(0.5,), std=(0.25,), notes=truth[:2])
    assert len(fig.axes) == 8 and fig.axes[0].get_title().startswith("face: p=")
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
    with pytest.raises(ValueError, match="smaller than the crop"):
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
