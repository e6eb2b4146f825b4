"""Models that call F.relu / torch.relu: hooks miss those ReLUs; guided_swap must match the fx-free reference."""
import warnings

import pytest
import torch

import guided_swap as gs
from guided_swap.core import cam
from guided_swap.checks import reference

from conftest import assert_nontrivial, image_batch, lively_targets, make_model, relative_error

CASES = [("densenet121", "features", 64), ("googlenet", "inception5b", 96), ("inception_v3", "Mixed_7c", 139)]


@pytest.fixture(scope="module", params=CASES, ids=[name for name, _, _ in CASES])
def case(request):
    name, layer, size = request.param
    model = make_model(name)
    x = image_batch(size)
    target = lively_targets(model, x, model.get_submodule(layer))
    return name, model, layer, x, target


@pytest.mark.parametrize("rule", ["guided", "deconvnet"])
def test_gradient_matches_reference(case, rule):
    name, model, layer, x, target = case
    e = gs.convert(model, layer=layer, rule=rule).explain(x, target)
    expected = reference.input_gradient(model, x, target, rule)
    assert_nontrivial(expected)
    assert relative_error(e.gradient, expected) <= 1e-5


def test_cams_match_reference(case):
    name, model, layer, x, target = case
    e = gs.convert(model, layer=layer).explain(x, target)
    expected_cam = reference.gradcam(model, x, target, model.get_submodule(layer))
    assert_nontrivial(expected_cam)
    assert relative_error(e.cam_raw, expected_cam) <= 1e-5
    expected_ggc = cam.guided_gradcam(cam.upsample(expected_cam, x.shape[2:]), reference.input_gradient(model, x, target))
    assert relative_error(e.guided_gradcam, expected_ggc) <= 1e-5


def test_every_relu_call_is_swapped(case):
    name, model, layer, x, target = case
    ex = gs.convert(model, layer=layer)
    assert len(ex.swapped) == reference.count_relu_calls(model, x)
    spellings = {s.spelling for s in ex.report.swapped}
    assert spellings & {"F.relu", "torch.relu", "Tensor.relu", "Tensor.relu_", "torch.relu_"}, spellings


def test_captum_guided_backprop_is_wrong_here_and_guided_swap_is_not(case):
    name, model, layer, x, target = case
    captum_attr = pytest.importorskip("captum.attr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hooks = captum_attr.GuidedBackprop(model).attribute(x, target=target)
    truth = reference.input_gradient(model, x, target)
    ours = gs.convert(model, layer=layer).explain(x, target).gradient
    assert relative_error(hooks, truth) > 0.05, "Captum's hooks see nn.ReLU only; they should miss F.relu here"
    assert relative_error(ours, truth) <= 1e-5


def test_densenet_features_is_norm5_before_the_functional_relu():
    model = make_model("densenet121")
    ex = gs.convert(model, layer="features")
    assert ex.report.layers == {"features": "features.norm5"}
    x = image_batch(64)
    e = ex.explain(x, 0)
    with torch.no_grad():
        norm5 = model.features(x)
    assert torch.equal(e.layers["features"].activation, norm5)
    assert (norm5 < 0).any()  # the captured value is really pre-ReLU
