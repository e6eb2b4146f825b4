"""CAM options against their peers: Captum's LayerGradCam (signed, per channel), pytorch-grad-cam's several target
layers, RefineCAM, FinerCAM and eigen_smooth. Models, layers and batch sizes: resnet18 (batch 3), a small DenseNet
(batch 1), vgg11 with ReLUs after its layers (the plain fork, batch 1); mobilenet_v2 for Captum (batch 1)."""
import warnings

import numpy as np
import pytest
import torch
import pytorch_grad_cam as pgc
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import guided_swap as gs

from conftest import (assert_nontrivial, image_batch, lively_targets, make_model, plain_copy, relative_error,
                      small_densenet)

captum_attr = pytest.importorskip("captum.attr")

LIBRARY = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM,
           "layercam": pgc.LayerCAM, "hirescam": pgc.HiResCAM, "elementwise": pgc.GradCAMElementWise}
#: pytorch-grad-cam's scaled maps lie in [0, 1]: an absolute difference is relative to their range.
SCALED_TOL = 1e-4


def three_images(size):
    return image_batch(size, names=("chelsea", "astronaut", "coffee"))


CASES = {  # name: (model, layers, image size, batch)
    "resnet18": (lambda: make_model("resnet18"), ["layer3", "layer4"], 96, 3),
    "densenet": (lambda: small_densenet(), ["features.denseblock3", "features.denseblock4"], 96, 1),
    "vgg11": (lambda: make_model("vgg11"), ["features.15", "features.18"], 64, 1),  # ReLUs after: the plain fork
}
#: With random weights mobilenet_v2's Grad-CAMs are nearly flat (max - min ~1% of max): min-max scaling would
#: amplify float32 rounding 100-fold, so it is compared before any scaling only (Captum's signed maps).
CAPTUM_CASES = dict(CASES, mobilenet_v2=(lambda: make_model("mobilenet_v2"), ["features.14", "features.18"], 96, 1))


def _case(name):
    make, layers, size, batch = CAPTUM_CASES[name]
    model = make()
    x = three_images(size)[:batch]
    targets = lively_targets(model, x, model.get_submodule(layers[-1]))
    explainer = gs.convert(model, layer=layers)
    return dict(name=name, model=plain_copy(model), layers=layers, x=x, targets=targets,
                e=explainer.explain(x, targets), explainer=explainer)


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    return _case(request.param)


@pytest.fixture(scope="module", params=list(CAPTUM_CASES))
def captum_case(request):
    return _case(request.param)


def contrast(maps):
    """(max - min) / max of each map, the least over the batch: min-max scaling amplifies rounding by its inverse."""
    flat = maps.flatten(1)
    return float(((flat.amax(1) - flat.amin(1)) / flat.amax(1).clamp_min(1e-30)).min())


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def _pgc(cls, model, layers, x, targets, **kwargs):
    tool = cls(model, [model.get_submodule(name) for name in layers])
    try:
        return _quiet(lambda: tool(x, [ClassifierOutputTarget(int(t)) for t in targets], **kwargs))
    finally:
        tool.activations_and_grads.release()


# --- Captum: signed and per-channel Grad-CAM ------------------------------------------------------------------

@pytest.mark.parametrize("relu,summation", [(False, False), (True, False), (False, True)])
def test_signed_and_per_channel_gradcam_equal_captum(captum_case, relu, summation):
    """For the lively targets and for each sample's least likely class (whose Grad-CAM is mostly negative)."""
    case, negative = captum_case, False
    with torch.no_grad():
        least = case["model"](case["x"]).argmin(dim=1)
    for targets, e in ((case["targets"], case["e"]), (least, case["explainer"].explain(case["x"], least))):
        for layer in case["layers"]:
            tool = captum_attr.LayerGradCam(case["model"], case["model"].get_submodule(layer))
            theirs = _quiet(lambda: tool.attribute(case["x"], target=targets, relu_attributions=relu,
                                                   attr_dim_summation=summation))
            theirs = theirs[:, 0] if summation else theirs
            ours = e.cam_map("gradcam", layer=layer, signed=not relu, per_channel=not summation)
            assert ours.shape == theirs.shape
            assert_nontrivial(theirs, 0.1)
            negative = negative or bool((theirs < 0).any())
            assert relative_error(ours, theirs) <= 1e-5, (layer, relu, summation)
    assert negative or relu, "signed maps with no negative value would not test signed="


# --- pytorch-grad-cam: several layers, RefineCAM, FinerCAM -----------------------------------------------------

@pytest.mark.parametrize("name", list(LIBRARY))
def test_mean_fusion_equals_pytorch_grad_cam_with_several_target_layers(case, name):
    theirs = _pgc(LIBRARY[name], case["model"], case["layers"], case["x"], case["targets"])
    assert min(contrast(case["e"].layers[layer].cams_raw[name]) for layer in case["layers"]) > 0.2
    ours = case["e"].fused(name, case["layers"], how="mean")
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    assert_nontrivial(torch.from_numpy(theirs), 0.3)
    assert np.abs(ours.numpy() - theirs).max() <= SCALED_TOL, name


@pytest.mark.parametrize("name", ["gradcam++", "gradcam", "layercam"])
def test_product_fusion_equals_refinecam(case, name):
    layers = [case["model"].get_submodule(layer) for layer in case["layers"]]
    tool = pgc.RefineCAM(case["model"], layers, base_method=LIBRARY[name])
    try:
        theirs = _quiet(lambda: tool(case["x"], [ClassifierOutputTarget(int(t)) for t in case["targets"]]))
    finally:
        for one in tool.base_cam_per_layer:
            one.activations_and_grads.release()
    assert min(contrast(case["e"].layers[layer].cams_raw[name]) for layer in case["layers"]) > 0.2
    ours = case["e"].fused(name, case["layers"], how="product")
    assert_nontrivial(torch.from_numpy(theirs), 0.1)
    assert np.abs(ours.numpy() - theirs).max() <= SCALED_TOL, name


def test_one_layer_fusion_is_pytorch_grad_cams_map(case):
    layer = case["layers"][-1]
    theirs = _pgc(pgc.GradCAMPlusPlus, case["model"], [layer], case["x"], case["targets"])
    assert np.abs(case["e"].fused("gradcam++", layer).numpy() - theirs).max() <= SCALED_TOL


@pytest.mark.parametrize("options", [{}, {"alpha": 0.5, "compare": (1, 2)}], ids=["defaults", "alpha-compare"])
def test_finer_target_equals_finercam(case, options):
    layer = case["layers"][-1]
    e = case["explainer"].explain(case["x"], gs.Finer(**options))
    module = case["model"].get_submodule(layer)
    tool = pgc.FinerCAM(case["model"], [module])
    try:
        kwargs = {} if not options else {"alpha": options["alpha"], "comparison_categories": list(options["compare"])}
        theirs = _quiet(lambda: tool(case["x"], **kwargs))
    finally:
        tool.base_cam.activations_and_grads.release()
    with torch.no_grad():
        assert torch.equal(e.target, case["model"](case["x"]).argmax(dim=1))
    assert_nontrivial(torch.from_numpy(theirs), 0.1)
    assert np.abs(e.fused("gradcam", layer).numpy() - theirs).max() <= SCALED_TOL


# --- eigen_smooth ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(LIBRARY))
def test_eigen_smooth_equals_pytorch_grad_cams(case, name, signed_eigen):
    """Before its scaling (get_cam_image(eigen_smooth=True) on its own hooks' A and G: signed, then its ReLU), and
    through its whole call with several target layers."""
    layer = case["layers"][-1]
    model, x = case["model"], case["x"]
    module = model.get_submodule(layer)
    tool = LIBRARY[name](model, [module])
    try:
        outputs = tool.activations_and_grads(x)
        model.zero_grad()
        sum(ClassifierOutputTarget(int(t))(o) for t, o in zip(case["targets"], outputs)).backward()
        A = tool.activations_and_grads.activations[0].numpy()
        G = tool.activations_and_grads.gradients[0].numpy()
        raw = _quiet(lambda: tool.get_cam_image(x, module, None, A, G, eigen_smooth=True))
    finally:
        tool.activations_and_grads.release()
    signed = case["e"].cam_map(name, layer=layer, eigen_smooth=True, signed=True)
    assert_nontrivial(torch.from_numpy(np.maximum(raw, 0)), 0.1)
    assert relative_error(signed, torch.from_numpy(raw)) <= 1e-4, name
    assert torch.equal(case["e"].cam_map(name, layer=layer, eigen_smooth=True), torch.relu(signed))
    theirs = _pgc(LIBRARY[name], model, case["layers"], x, case["targets"], eigen_smooth=True)
    ours = case["e"].fused(name, case["layers"], eigen_smooth=True)
    assert np.abs(ours.numpy() - theirs).max() <= SCALED_TOL, name
