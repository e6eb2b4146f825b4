"""Models called with several inputs and fixed forward arguments (Captum's tuple of inputs and
``additional_forward_args``): one gradient per input, CAMs at layers fed by any input, on every capture path."""
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import guided_swap as gs
from guided_swap.checks import reference

from conftest import assert_nontrivial, image_batch, randomise_batchnorm, relative_error

captum_attr = pytest.importorskip("captum.attr")
basic_models = pytest.importorskip("captum.testing.helpers.basic_models")


class TwoStream(nn.Module):
    """A photograph through torchvision's resnet18 trunk and a depth map of another size through a small CNN,
    fused before the head; ``mask`` (per sample) weighs the depth map, ``scale`` the logits. ``functional``
    writes the depth branch's ReLUs as ``F.relu`` (which backward hooks miss)."""

    def __init__(self, functional: bool = False, classes: int = 10):
        super().__init__()
        self.functional = functional
        self.rgb = nn.Sequential(*list(torchvision.models.resnet18().children())[:-2])
        self.depth1 = nn.Conv2d(1, 16, 3, padding=1)
        self.depth2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.head = nn.Linear(512 + 32, classes)

    def forward(self, rgb, depth, mask=None, scale=1.0):
        if mask is not None:
            depth = depth * mask
        if self.functional:
            d = F.relu(self.depth2(F.relu(self.depth1(depth))))
        else:
            d = self.relu2(self.depth2(self.relu1(self.depth1(depth))))
        fused = torch.cat([self.rgb(rgb).mean(dim=(2, 3)), d.mean(dim=(2, 3))], dim=1)
        return self.head(fused) * scale


def two_stream(functional: bool = False, seed: int = 0) -> TwoStream:
    torch.manual_seed(seed)
    return randomise_batchnorm(TwoStream(functional)).eval()


def inputs(batch: int = 2):
    rgb = image_batch(64, ("chelsea", "astronaut", "coffee")[:batch])
    depth = torch.linspace(-1, 1, 48 * 40).view(1, 1, 48, 40).repeat(batch, 1, 1, 1)
    depth = depth + 0.3 * torch.sin(torch.arange(batch, dtype=torch.float)).view(-1, 1, 1, 1)
    mask = (torch.arange(48 * 40).view(1, 1, 48, 40) % 3 != 0).float().repeat(batch, 1, 1, 1)
    return rgb, depth, mask


def _captum(method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return method()


# --- Captum's own cases (captum/tests/attr), with their expected numbers --------------------------------------

ONE_CONV_GUIDED = [[1.0, 2.0, 2.0, 1.0], [2.0, 4.0, 4.0, 2.0], [2.0, 4.0, 4.0, 2.0], [1.0, 2.0, 2.0, 1.0]]
ONE_CONV_DECONV = [[2.0, 3.0, 3.0, 1.0], [3.0, 5.0, 5.0, 2.0], [3.0, 5.0, 5.0, 2.0], [1.0, 2.0, 2.0, 1.0]]
ONE_CONV_GUIDED_GRADCAM = [[14.5, 29.0, 38.0, 19.0], [29.0, 58.0, 76.0, 38.0], [65.0, 130.0, 148.0, 74.0],
                           [32.5, 65.0, 74.0, 37.0]]


def one_conv(inplace: bool = False):
    net = basic_models.BasicModel_ConvNet_One_Conv(inplace=inplace).eval()
    return net, torch.arange(16, dtype=torch.float).view(1, 1, 4, 4), torch.ones(1, 1, 4, 4)


@pytest.mark.parametrize("rule, expected", [("guided", ONE_CONV_GUIDED), ("deconvnet", ONE_CONV_DECONV)])
def test_captums_multi_input_guided_backprop_and_deconvolution(rule, expected):
    net, inp, inp2 = one_conv()
    gradient = gs.convert(net, layer=None, rule=rule).explain((inp, inp2), 0).gradient
    assert isinstance(gradient, tuple) and len(gradient) == 2
    for g in gradient:
        assert torch.allclose(g, torch.tensor(expected).view(1, 1, 4, 4), atol=0.01)


def test_captums_multi_input_layer_gradcam_and_guided_gradcam():
    for inplace, layer in ((False, "conv1"), (True, "conv1"), (True, "relu1:input")):
        net, inp, inp2 = one_conv(inplace)
        e = gs.convert(net, layer=layer).explain((inp, inp2), 0, interpolate="nearest")
        assert torch.allclose(e.cam_raw, torch.tensor([[[14.5, 19.0], [32.5, 37.0]]]), atol=0.01)
        for g in e.guided_gradcam:
            assert torch.allclose(g, torch.tensor(ONE_CONV_GUIDED_GRADCAM).view(1, 1, 4, 4), atol=0.01)


def test_an_input_of_another_rank_gets_no_guided_gradcam():
    """Captum's test_improper_dims_multi_input_conv: inp2 of shape (1,) broadcasts into the sum; Guided Grad-CAM
    cannot be formed for it (Captum gives an empty tensor, we give None) and is still right for inp."""
    net, inp, _ = one_conv()
    e = gs.convert(net, layer="conv1").explain((inp, torch.ones(1)), 0, interpolate="nearest")
    first, second = e.guided_gradcam
    assert torch.allclose(first, torch.tensor(ONE_CONV_GUIDED_GRADCAM).view(1, 1, 4, 4), atol=0.01)
    assert second is None and e.gradient[1].shape == (1,)
    assert "guided_gradcam.1" not in e.available() and "gradient.1" in e.available()


def test_an_optional_argument_is_absent_unless_given():
    """Captum's model is forward(x, x2=None): one explainer explains x alone (x2 traced as absent) and (x, x2)."""
    net, inp, inp2 = one_conv()
    ex = gs.convert(net, layer="conv1")
    alone = ex.explain(inp, 0)
    assert torch.allclose(alone.gradient, captum_attr.GuidedBackprop(net).attribute(inp, target=0), atol=1e-6)
    both = ex.explain((inp, inp2), 0)
    expected = _captum(lambda: captum_attr.GuidedBackprop(net).attribute((inp, inp2), target=0))
    for ours, theirs in zip(both.gradient, expected):
        assert torch.equal(ours, theirs)
    assert torch.equal(ex(inp, inp2), net(inp, inp2)) and torch.equal(ex(inp), net(inp))
    assert ex.explain(inp, 0).gradient.shape == inp.shape  # the first capture still serves single inputs
    assert "x2=None" in str(ex.report)


# --- a real model with two inputs of different sizes -----------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 3])
def test_two_inputs_equal_captum_where_hooks_see_every_relu(batch):
    model = two_stream()
    rgb, depth, mask = inputs(batch)
    target = torch.arange(batch) + 2
    ex = gs.convert(model, layer=["rgb.7", "depth2"])
    e = ex.explain((rgb, depth), target, forward_args=(mask, 2.0), interpolate="nearest")
    args = dict(target=target, additional_forward_args=(mask, 2.0))
    guided = _captum(lambda: captum_attr.GuidedBackprop(model).attribute((rgb, depth), **args))
    for ours, theirs in zip(e.gradient, guided):
        assert_nontrivial(theirs)
        assert relative_error(ours, theirs) <= 1e-5
    for layer, module in (("rgb.7", model.rgb[7]), ("depth2", model.depth2)):
        cam = _captum(lambda: captum_attr.LayerGradCam(model, module).attribute(
            (rgb, depth), relu_attributions=True, **args))[:, 0]
        assert_nontrivial(cam, 0.01)
        assert relative_error(e.layers[layer].cam_raw, cam) <= 1e-5
    guided_gradcam = _captum(lambda: captum_attr.GuidedGradCam(model, model.rgb[7]).attribute(
        (rgb, depth), interpolate_mode="nearest", **args))
    for ours, theirs in zip(e.guided_gradcam, guided_gradcam):
        assert relative_error(ours, theirs) <= 1e-5


@pytest.mark.parametrize("path", ["fx", "runtime"])
def test_each_layer_is_resized_to_the_input_it_is_computed_from(path):
    """The run-time capture resized every layer to the first input (the depth map's layer to the photograph's
    64 x 64); it reads which inputs a layer comes from in its autograd graph, as the graph paths in theirs."""
    model = two_stream()
    rgb, depth, mask = inputs()
    ex = gs.convert(model, layer=["rgb.7", "depth2"], capture=path)
    e = ex.explain((rgb, depth), 1, forward_args=(mask,))
    assert e.layers["rgb.7"].cam.shape == (2, 64, 64) and e.layers["depth2"].cam.shape == (2, 48, 40)
    assert ex.capture_for(gs.core.inputs.Inputs((rgb, depth), (mask,))).layer_inputs == \
        {"rgb.7": (0,), "depth2": (1,)}


@pytest.mark.parametrize("path", ["fx", "runtime"])
def test_functional_relus_with_two_inputs_equal_the_fx_free_reference(path):
    model = two_stream(functional=True)
    rgb, depth, mask = inputs()
    ex = gs.convert(model, layer="depth2", capture=path)
    e = ex.explain((rgb, depth), [3, 4], forward_args=(mask, 0.5))
    expected = reference.input_gradient(model, (rgb, depth), [3, 4], forward_args=(mask, 0.5))
    for ours, theirs in zip(e.gradient, expected):
        assert_nontrivial(theirs)
        assert relative_error(ours, theirs) <= 1e-5
    hooks = _captum(lambda: captum_attr.GuidedBackprop(model).attribute(
        (rgb, depth), target=[3, 4], additional_forward_args=(mask, 0.5)))
    assert relative_error(hooks[1], expected[1]) > 1e-3  # hooks miss the depth branch's F.relu
    plain = reference.gradcam(model, (rgb, depth), [3, 4], model.depth2, forward_args=(mask, 0.5))
    assert relative_error(e.cam_raw, plain) <= 1e-5


def test_the_paths_agree_and_the_model_is_untouched():
    model = two_stream(functional=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rgb, depth, mask = inputs()
    maps = [gs.convert(model, layer="rgb.7", capture=path).explain((rgb, depth), 5, forward_args=(mask,))
            for path in ("fx", "runtime")]
    for a, b in zip(maps[0].gradient, maps[1].gradient):
        assert torch.equal(a, b)
    assert torch.equal(maps[0].cam, maps[1].cam)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in model.modules())


def test_the_export_capture_refuses_several_inputs_and_auto_falls_back_to_run_time():
    model = two_stream()
    rgb, depth, _ = inputs()
    with pytest.raises(gs.TraceError, match="export capture takes one input tensor"):
        gs.convert(model, layer="depth2", capture="export", example_input=(rgb, depth))
    untraceable = Untraceable(model)
    ex = gs.convert(untraceable, layer="inner.depth2", example_input=(rgb, depth))
    assert ex.report.capture.startswith("runtime") and "one input tensor" in ex.report.capture
    expected = reference.input_gradient(untraceable, (rgb, depth), [1, 2])
    for ours, theirs in zip(ex.explain((rgb, depth), [1, 2]).gradient, expected):
        assert relative_error(ours, theirs) <= 1e-5


class Untraceable(nn.Module):
    """The two-stream model behind a branch on a tensor's value, which fx cannot trace."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, rgb, depth):
        if depth.sum() > -1e9:
            return self.inner(rgb, depth)
        return self.inner(rgb, -depth)


# --- forward arguments -----------------------------------------------------------------------------------------

def test_forward_arguments_that_are_values_are_traced_once_per_value():
    model = two_stream()
    rgb, depth, mask = inputs()
    ex = gs.convert(model, layer="rgb.7")
    halves = ex.explain((rgb, depth), 1, forward_args=(mask, 0.5)).score
    doubles = ex.explain((rgb, depth), 1, forward_args=(mask, 2.0)).score
    assert torch.allclose(doubles, 4 * halves)
    assert torch.allclose(doubles, model(rgb, depth, mask, 2.0)[:, 1])
    assert len(ex._variants) == 2  # traced once for (mask, 0.5), once for (mask, 2.0); the first capture: neither


def test_smoothing_takes_per_sample_forward_arguments_row_by_row():
    model = two_stream()
    rgb, depth, mask = inputs(3)
    mask[1] = 0  # sample 1's depth map is masked out: its depth gradient must be zero
    ex = gs.convert(model, layer="depth2")
    warnings.simplefilter("ignore", gs.ZeroGradientWarning)  # sample 1's, by design (pytest restores filters)
    kwargs = dict(forward_args=(mask,), smooth=4, noise=0.1)
    whole = ex.explain((rgb, depth), 2, generator=torch.Generator().manual_seed(0), **kwargs)
    chunked = ex.explain((rgb, depth), 2, generator=torch.Generator().manual_seed(0), chunk=5, **kwargs)
    for a, b in zip(whole.gradient, chunked.gradient):
        assert torch.allclose(a, b, atol=1e-6)
    assert float(whole.gradient[1][1].abs().max()) == 0.0 and float(whole.gradient[1][0].abs().max()) > 0
    still = ex.explain((rgb, depth), 2, forward_args=(mask,), smooth=3, noise_absolute=0.0)
    plain = ex.explain((rgb, depth), 2, forward_args=(mask,))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(still.gradient, plain.gradient))
    assert torch.allclose(still.cam, plain.cam, atol=1e-6)


# --- saving, exporting, refusing -------------------------------------------------------------------------------

def test_a_two_input_explainer_saves_loads_and_exports(tmp_path):
    model = two_stream(functional=True)
    rgb, depth, _ = inputs()
    ex = gs.convert(model, layer="depth2", example_input=(rgb, depth))
    ex.save(os.path.join(tmp_path, "two.gsx"))
    loaded = gs.load(os.path.join(tmp_path, "two.gsx"))
    ours, theirs = ex.explain((rgb, depth), [1, 2]), loaded.explain((rgb, depth), [1, 2])
    assert all(torch.equal(a, b) for a, b in zip(ours.gradient, theirs.gradient))
    with pytest.raises(gs.InputError, match="cannot be traced again"):
        loaded.explain(rgb, 1)
    program = gs.export(ex, (rgb[:1], depth[:1]), os.path.join(tmp_path, "two.pt2"))
    out = torch.export.load(os.path.join(tmp_path, "two.pt2")).module()(rgb, depth, torch.tensor([1, 2]))
    assert sorted(out) == ["cam", "cam_raw", "gradient.0", "gradient.1", "guided_gradcam.0", "guided_gradcam.1",
                           "logits"] and program is not None
    for name, value in out.items():
        assert torch.allclose(value, ours.to_dict([name])[name], atol=1e-5), name


def test_what_several_inputs_cannot_do_is_refused_clearly():
    model = two_stream()
    rgb, depth, mask = inputs()
    ex = gs.convert(model, layer="rgb.7")
    with pytest.raises(gs.InputError, match="different batch sizes"):
        ex.explain((rgb, depth[:1]))
    with pytest.raises(TypeError, match="forward_args="):
        ex.explain((rgb, depth, 0.5))
    with pytest.raises(TypeError, match="tuple"):
        ex.explain((rgb, depth), forward_args=mask)
    with pytest.raises(gs.InputError, match="takes 4 argument"):
        ex.explain((rgb, depth), forward_args=(mask, 1.0, 2.0))
    with pytest.raises(gs.InputError, match="cams="):
        ex.explain((rgb, depth), cams=("scorecam",))
    with pytest.raises(gs.InputError, match="one image batch"):
        ex.aug_smooth((rgb, depth))
    with pytest.raises(gs.InputError, match="needs 'depth'"):
        ex.explain(rgb)


def test_a_compiled_explainer_explains_several_inputs_eagerly_and_says_so():
    model = two_stream()
    rgb, depth, mask = inputs()
    ex = gs.convert(model, layer="depth2")
    eager = ex.explain((rgb, depth), 1, forward_args=(mask,))
    ex.compile(backend="eager")
    with pytest.warns(UserWarning, match="several inputs or forward_args runs eagerly"):
        compiled = ex.explain((rgb, depth), 1, forward_args=(mask,))
    assert all(torch.equal(a, b) for a, b in zip(eager.gradient, compiled.gradient))
    assert torch.equal(eager.cam, compiled.cam)


def test_one_input_of_several_is_drawn_and_measured_on_its_own():
    model = two_stream()
    rgb, depth, mask = inputs()
    ex = gs.convert(model, layer=["rgb.7", "depth2"])
    e = ex.explain((rgb, depth), 1, forward_args=(mask,))
    with pytest.raises(ValueError, match="of_input"):
        gs.viz.plan(e, (rgb, depth))
    depth_only = e.of_input(1)
    assert torch.equal(depth_only.gradient, e.gradient[1]) and depth_only.cam.shape == (2, 48, 40)
    assert torch.equal(depth_only.guided_gradcam, e.guided_gradcam[1])
    rows = gs.viz.plan(depth_only, depth.repeat(1, 3, 1, 1), mean=(0.0,) * 3, std=(1.0,) * 3)
    assert len(rows) == 2
    with pytest.raises(gs.InputError, match="perturbs one input"):
        gs.metrics.deletion(ex, (rgb, depth), e.cam)
