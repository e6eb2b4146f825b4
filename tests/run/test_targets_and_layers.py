"""Targets of every kind, structured outputs, several layers, layer naming."""
import collections

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import get_graph_node_names
from torch import nn

import guided_swap as gs
from guided_swap.checks import reference

from conftest import image_batch, make_model, relative_error


@pytest.fixture(scope="module")
def resnet():
    return make_model("resnet18")


def test_target_forms_agree(resnet):
    ex = gs.convert(resnet, layer="layer4")
    x = image_batch(32)
    by_list = ex.explain(x, [5, 9])
    by_tensor = ex.explain(x, torch.tensor([5, 9]))
    by_callable = ex.explain(x, lambda logits: logits[:, 5] * torch.tensor([1.0, 0.0]) + logits[:, 9] * torch.tensor([0.0, 1.0]))
    assert torch.equal(by_list.gradient, by_tensor.gradient)
    assert torch.allclose(by_list.gradient, by_callable.gradient, rtol=1e-5, atol=1e-9)
    assert by_callable.target is None and by_list.target.tolist() == [5, 9]
    best = ex.explain(x)
    assert best.target.tolist() == resnet(x).argmax(1).tolist()
    same = ex.explain(x, 7)
    assert same.target.tolist() == [7, 7]
    assert torch.equal(same.score, resnet(x)[:, 7].detach())


def test_a_callable_target_equals_the_fx_free_reference_of_the_same_score(resnet):
    x = image_batch(32)
    score = lambda logits: logits[:, 3] - 0.5 * logits[:, 8]  # no class of its own: mixed evidence
    expected = reference.input_gradient(resnet, x, score)
    assert expected.abs().max() > 0
    assert relative_error(gs.convert(resnet, layer=None).explain(x, score).gradient, expected) < 1e-5


def test_batching_gives_per_sample_results(resnet):
    ex = gs.convert(resnet, layer="layer4")
    x = image_batch(32, ("chelsea", "astronaut", "immunohistochemistry"))
    batch = ex.explain(x, [1, 2, 3])
    for i in range(3):
        single = ex.explain(x[i:i + 1], [i + 1])
        assert relative_error(batch.gradient[i:i + 1], single.gradient) <= 1e-5
        assert relative_error(batch.cam_raw[i:i + 1], single.cam_raw) <= 1e-5


def test_channel_target_is_feature_visualisation(resnet):
    ex = gs.convert(resnet, layer=["layer4", "layer3"])
    x = image_batch(32)
    e = ex.explain(x, gs.Channel("layer3", 12))
    x2 = x.clone().requires_grad_(True)
    with reference.ReLURule("guided"):
        activation = resnet.layer3(resnet.layer2(resnet.layer1(resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x2)))))))
    (expected,) = torch.autograd.grad(activation[:, 12].sum(), x2)
    assert relative_error(e.gradient, expected) <= 1e-5
    unit = ex.explain(x, gs.Channel("layer3", 12, unit=(1, 1)))
    assert unit.gradient.abs().sum() > 0 and not torch.equal(unit.gradient, e.gradient)


def test_several_layers_each_get_their_own_cam(resnet):
    x = image_batch(64)
    ex = gs.convert(resnet, layer=["layer4", "layer3", "layer2.0.relu_1"])
    e = ex.explain(x, [1, 2])
    for name, module_name in [("layer4", "layer4"), ("layer3", "layer3")]:
        expected = reference.gradcam(resnet, x, [1, 2], resnet.get_submodule(module_name))
        assert relative_error(e.layers[name].cam_raw, expected) <= 1e-5
    assert e.layers["layer2.0.relu_1"].cam_raw.shape == (2, 8, 8)
    assert torch.equal(e.cam_raw, e.layers["layer4"].cam_raw)
    assert e.pixelwise_cam.shape == e.guided_pixelwise_cam.shape == (2, 64, 64)


def test_several_layers_behind_relus_use_the_plain_fork():
    """Nested captures with ReLUs between them and after them: each gets the ordinary gradient."""
    model = make_model("vgg11")
    x = image_batch(64)
    ex = gs.convert(model, layer=["features.18", "features.13", "features.19"])
    assert ex.forked
    e = ex.explain(x, [3, 4])
    for name in ex.layers:
        expected = reference.gradcam(model, x, [3, 4], model.get_submodule(name))
        assert relative_error(e.layers[name].cam_raw, expected) <= 1e-5, name
    assert relative_error(e.gradient, reference.input_gradient(model, x, [3, 4])) <= 1e-5


class TupleOut(nn.Module):
    Out = collections.namedtuple("Out", ["logits", "features"])

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        features = torch.relu(self.conv(x))
        logits = self.fc(features.mean(dim=(2, 3)))
        if self.kind == "tuple":
            return features, logits
        if self.kind == "dict":
            return {"features": features, "logits": logits}
        if self.kind == "one entry":
            return {"scores": logits}
        return self.Out(logits, features)


@pytest.mark.parametrize("kind,key", [("tuple", 1), ("dict", "logits"), ("namedtuple", "logits"),
                                      ("one entry", "scores")])
def test_structured_outputs(kind, key):
    torch.manual_seed(0)
    model = TupleOut(kind).eval()
    x = image_batch(16)
    if kind == "tuple":  # nothing names the logits: the user says which entry
        with pytest.raises(TypeError, match="output="):
            gs.convert(model, layer="conv")
    else:  # an entry named 'logits', or the only entry, is read by default (Hugging Face's ModelOutput is a dict)
        default = gs.convert(model, layer="conv")
        assert (default.output, default.report.output_by_default) == (key, True)
        assert f"explains output {key!r} (by default)" in default.report.summary()
        assert torch.equal(default.explain(x, [1, 2]).gradient, gs.convert(model, layer="conv", output=key)
                           .explain(x, [1, 2]).gradient)
    ex = gs.convert(model, layer="conv", output=key)
    assert (ex.output, ex.report.output_by_default) == (key, False)
    assert f"explains output {key!r};" in ex.report.summary()
    e = ex.explain(x, [1, 2])
    logits = model(x)[key] if kind != "namedtuple" else model(x).logits
    assert torch.equal(e.logits, logits)
    assert type(e.outputs) is type(model(x))
    with pytest.raises(ValueError, match="not an entry"):
        gs.convert(model, layer="conv", output="nope" if kind != "tuple" else 5)


def test_layer_names_follow_torchvision(resnet):
    names = gs.layer_names(resnet)
    tv_train, tv_eval = get_graph_node_names(resnet)
    assert names["nodes"] == tv_eval
    assert "layer4" in names["modules"] and "layer4.1.relu_1" in names["nodes"]


def test_module_called_twice_needs_a_node_name():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)  # a leaf: its first call's node is named "conv"
            self.block = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())  # traced through

        def forward(self, x):
            return self.block(self.block(self.conv(self.conv(x)))).mean(dim=(2, 3))

    model = Twice().eval()
    first = gs.convert(model, layer="conv").report
    assert first.layers == {"conv": "conv"}
    # the module's name is its first call's node: the report says so, and that Captum reads the last call
    assert "the first of 2 calls of module 'conv'" in first.layer_reasons["conv"]
    assert "Captum's LayerGradCam on the module reads the last: conv_1" in first.layer_reasons["conv"]
    assert "conv_1" not in gs.convert(model, layer="conv_1").report.layer_reasons
    assert gs.convert(model, layer="conv_1").report.layers == {"conv_1": "conv_1"}
    with pytest.raises(gs.LayerError, match=r"called 2 times.*\['block.1', 'block.1_1'\]"):
        gs.convert(model, layer="block")


def test_the_run_time_refusal_of_a_module_run_twice_names_only_names_it_takes():
    """It listed the refused name itself as a call to name ("name one call: relu, relu_1")."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.randn(1, 3, 32, 32)
    runtime = gs.convert(model, layer="layer4.1.relu", capture="runtime")
    with pytest.raises(gs.LayerError, match=r"ran 2 times in one forward; name one call: a later one "
                                            r"\(layer4\.1\.relu_1\), or the first through .*NAME:input") as error:
        runtime.explain(x, [1])
    assert "relu, " not in str(error.value)
    ex = gs.convert(model, layer=["layer4.1.relu_1", "layer4.1.conv2:input"], capture="runtime")
    e, fx_e = ex.explain(x, [1]), gs.convert(model, layer=["layer4.1.relu_1", "layer4.1.relu"]).explain(x, [1])
    assert torch.equal(e.layers["layer4.1.relu_1"].cam_raw, fx_e.layers["layer4.1.relu_1"].cam_raw)
    assert torch.equal(e.layers["layer4.1.conv2:input"].cam_raw, fx_e.layers["layer4.1.relu"].cam_raw)


# --- a forward with optional arguments (Captum's own test model writes one) ------------------------------

class OptionalInputNet(nn.Module):
    """``forward(x, add_input=None, multidim_output=False)``, as Captum's BasicModel_MultiLayer: fx used to take a
    placeholder for ``add_input``, follow ``add_input is not None`` as if given, and explain(x) failed on x + None."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear0, self.relu, self.linear1 = nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)

    def forward(self, x, add_input=None, multidim_output=False):
        hidden = self.relu(self.linear0(x if add_input is None else x + add_input))
        out = self.linear1(hidden)
        return out.reshape(out.shape[0], 1, 2) if multidim_output else out


@pytest.mark.parametrize("path", ["fx", "export", "runtime"])
def test_optional_arguments_are_traced_as_absent_and_match_captum(path):
    captum_attr = pytest.importorskip("captum.attr")
    model = OptionalInputNet().eval()
    x = torch.tensor([[3.0, 4.0, -1.0], [0.5, -2.0, 1.0]])
    ex = gs.convert(model, layer="linear0", capture=path, example_input=x[:1])
    e = ex.explain(x, [0, 1])
    gradient = captum_attr.GuidedBackprop(model).attribute(x, target=[0, 1])
    cam = captum_attr.LayerGradCam(model, model.linear0).attribute(x, target=[0, 1], relu_attributions=True)
    assert gradient.abs().sum() > 0 and cam.abs().sum() > 0
    assert torch.allclose(e.gradient, gradient) and torch.allclose(e.cam_raw.reshape(2, 1), cam)
    if path != "runtime":
        assert "add_input=None, multidim_output=False" in str(ex.report)
