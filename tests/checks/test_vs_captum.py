"""Against Captum on models where backward hooks see every ReLU: the maps must agree to 1e-5 relative."""
import warnings

import pytest
import torch

import guided_swap as gs

from conftest import assert_nontrivial, image_batch, lively_targets, make_model, relative_error

captum_attr = pytest.importorskip("captum.attr")

CASES = [("resnet18", "layer4"), ("vgg11", "features.18"), ("alexnet", "features.10"), ("squeezenet1_0", "features.12")]


@pytest.fixture(scope="module", params=CASES, ids=[name for name, _ in CASES])
def case(request):
    name, layer = request.param
    model = make_model(name)
    x = image_batch(96)
    target = lively_targets(model, x, model.get_submodule(layer))
    return model, layer, x, target


def _captum(method, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return method(*args, **kwargs)


def test_guided_backprop(case):
    model, layer, x, target = case
    expected = _captum(lambda: captum_attr.GuidedBackprop(model).attribute(x, target=target))
    e = gs.convert(model, layer=layer).explain(x, target)
    assert_nontrivial(expected)
    assert relative_error(e.gradient, expected) <= 1e-5


def test_deconvolution(case):
    model, layer, x, target = case
    expected = _captum(lambda: captum_attr.Deconvolution(model).attribute(x, target=target))
    e = gs.convert(model, layer=layer, rule="deconvnet").explain(x, target)
    assert_nontrivial(expected)
    assert relative_error(e.gradient, expected) <= 1e-5


def test_gradcam_uses_ordinary_gradients_in_the_same_pass(case):
    model, layer, x, target = case
    module = model.get_submodule(layer)
    expected = _captum(lambda: captum_attr.LayerGradCam(model, module).attribute(
        x, target=target, relu_attributions=True))[:, 0]
    e = gs.convert(model, layer=layer).explain(x, target)
    assert_nontrivial(expected)
    assert relative_error(e.cam_raw, expected) <= 1e-5


def test_guided_gradcam(case):
    model, layer, x, target = case
    expected = _captum(lambda: captum_attr.GuidedGradCam(model, model.get_submodule(layer)).attribute(
        x, target=target, interpolate_mode="nearest"))
    e = gs.convert(model, layer=layer).explain(x, target, interpolate="nearest")
    assert_nontrivial(expected)
    assert relative_error(e.guided_gradcam, expected) <= 1e-5


def test_vgg_needs_and_gets_the_plain_fork():
    """VGG's classifier has ReLUs after the last conv: one guided pass alone would give a wrong Grad-CAM."""
    model = make_model("vgg11")
    x = image_batch(64)
    ex = gs.convert(model, layer="features.18")
    assert ex.forked and ex.report.made_out_of_place == ("features.19",)
    guided_only = gs.convert(model, layer="features.18", rule="gradient")
    assert not guided_only.forked


# --- layers that are not spatial maps: Captum's LayerGradCam gives one value per sample -------------------

VECTOR_CASES = [("resnet18", "fc", 3), ("vgg11", "classifier.3", 1), ("densenet121", "classifier", 2),
                ("mobilenet_v3_small", "classifier.0", 3)]


@pytest.mark.parametrize("name, layer, batch", VECTOR_CASES, ids=[f"{n}-{l}" for n, l, _ in VECTOR_CASES])
@pytest.mark.parametrize("path", ["fx", "export", "runtime"])
def test_a_vector_layer_gives_captums_one_value_per_sample(name, layer, batch, path):
    """A (B, C) layer (a linear layer's output) was a LayerError; it is one position, as Captum reads it."""
    model = make_model(name)
    x = image_batch(64, names=("chelsea", "astronaut", "coffee")[:batch])
    target = [1, 500, 900][:batch]
    expected = _captum(lambda: captum_attr.LayerGradCam(model, model.get_submodule(layer)).attribute(
        x, target=target, relu_attributions=True))
    e = gs.convert(model, layer=layer, capture=path, example_input=x[:1]).explain(x, target)
    assert expected.shape == (batch, 1) and e.cam_raw.shape == (batch, 1, 1)
    assert relative_error(e.cam_raw.reshape(batch, 1), expected) <= 1e-5
    assert torch.allclose(e.cam, e.cam_raw.reshape(batch, 1, 1).expand(batch, 64, 64))  # that value everywhere
    assert e.layers[layer].grad.abs().sum() > 0


# --- a layer's input, and a module returning a tuple: Captum attribute_to_layer_input, a map per output ------

INPUT_CASES = [("resnet18", ["layer4", "layer4.1", "fc"]), ("densenet121", ["features.denseblock4", "classifier"]),
               ("vgg11", ["features.18", "classifier.3"])]


@pytest.mark.parametrize("name, modules", INPUT_CASES, ids=[n for n, _ in INPUT_CASES])
@pytest.mark.parametrize("path", ["fx", "export", "runtime"])
def test_a_layers_input_equals_captums_attribute_to_layer_input(name, modules, path):
    model = make_model(name)
    x = image_batch(64)
    layers = [f"{m}:input" for m in modules]
    e = gs.convert(model, layer=layers, capture=path, example_input=x[:1]).explain(x, [3, 700])
    for module, layer in zip(modules, layers):
        expected = _captum(lambda: captum_attr.LayerGradCam(model, model.get_submodule(module)).attribute(
            x, target=[3, 700], relu_attributions=True, attribute_to_layer_input=True))
        assert expected.abs().sum() > 0
        assert relative_error(e.layers[layer].cam_raw.reshape(expected.shape[:1] + expected.shape[2:]),
                              expected.squeeze(1)) <= 1e-5, layer


class TupleBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(y), torch.sigmoid(y) * 2


class TupleNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block, self.head = TupleBlock(), torch.nn.Linear(16, 4)

    def forward(self, x):
        a, b = self.block(x)
        return self.head(torch.cat([a.mean((2, 3)), (a * b).amax((2, 3))], dim=1))


@pytest.mark.parametrize("path", ["fx", "runtime"])
def test_each_entry_of_a_tuple_output_equals_captums_map_per_output(path):
    model, x = TupleNet().eval(), image_batch(32)
    expected = _captum(lambda: captum_attr.LayerGradCam(model, model.block).attribute(x, target=[2, 3],
                                                                                       relu_attributions=True))
    e = gs.convert(model, layer=["block[0]", "block[1]"], capture=path, example_input=x[:1]).explain(x, [2, 3])
    for i in range(2):
        assert expected[i].abs().sum() > 0
        assert relative_error(e.layers[f"block[{i}]"].cam_raw, expected[i].squeeze(1)) <= 1e-5


def test_a_tuple_output_is_named_by_its_entries_or_refused_where_unknown():
    model, x = TupleNet().eval(), image_batch(32)
    with pytest.raises(gs.LayerError, match=r"returns a tuple of 2.*block\[0\], block\[1\]"):
        gs.convert(model, layer="block")
    with pytest.raises(gs.LayerError, match=r"block\[0\], block\[1\], \.\.\."):
        gs.convert(model, layer="block", capture="runtime").explain(x)
    with pytest.raises(gs.LayerError, match="keeps no tuples"):
        gs.convert(model, layer="block[0]", capture="export", example_input=x[:1])
    with pytest.raises(gs.LayerError, match="returns 2 entries"):
        gs.convert(model, layer="block[2]")
