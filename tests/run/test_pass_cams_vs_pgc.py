"""Score-CAM, Ablation-CAM, EigenCAM and FullGrad against pytorch-grad-cam, batch sizes 1 and 3.

resnet18 at ``layer4`` (the layer pytorch-grad-cam's own examples use) and a DenseNet inside its last dense block
(``features.denseblock4.denselayer2.relu2``: what follows reads the block's earlier features too, so Ablation-CAM's
cut graph needs values from before the layer). Both layers follow a ReLU, where pytorch-grad-cam ablates to 0 as
guided_swap does (docs/cams.md says what it does elsewhere).
"""
import copy

import numpy as np
import pytest
import torch
import pytorch_grad_cam as pgc
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import guided_swap as gs
from conftest import assert_nontrivial, image_batch, make_model, relative_error, small_densenet

PASSES = ("scorecam", "ablationcam", "fullgrad")
LIBRARY = {"scorecam": pgc.ScoreCAM, "ablationcam": pgc.AblationCAM, "eigencam": pgc.EigenCAM}
MODELS = {"resnet18": ("layer4", 64), "densenet": ("features.denseblock4.denselayer2.relu2", 96)}
# resnet18's Score-CAM and pytorch-grad-cam's Ablation-CAM make 512 whole-model forwards per sample: minutes.
CASES = [pytest.param((name, batch), id=f"{name}-batch{batch}", marks=[pytest.mark.slow] if name == "resnet18" else [])
         for name in MODELS for batch in (1, 3)]


def _plain_copy(model):
    """pytorch-grad-cam keeps a view of the activation it hooks; its reference runs with out-of-place ReLUs."""
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
    return reference


def _library_capture(model, layer, x):
    """A and G as pytorch-grad-cam's own hooks capture them (G is not read by these methods)."""
    tool = pgc.GradCAM(model, [layer])
    outputs = tool.activations_and_grads(x)
    outputs.sum().backward()
    A = tool.activations_and_grads.activations[0].numpy()
    G = tool.activations_and_grads.gradients[0].numpy()
    tool.activations_and_grads.release()
    return A, G


@pytest.fixture(scope="module", params=CASES)
def case(request):
    name, batch = request.param
    layer_name, size = MODELS[name]
    model = small_densenet() if name == "densenet" else make_model(name)
    x = image_batch(size, names=("chelsea", "astronaut", "coffee")[:batch])
    with torch.no_grad():
        targets = model(x).argmax(dim=1)
    e = gs.convert(model, layer=layer_name).explain(x, targets, cams=PASSES, chunk=48)
    reference = _plain_copy(model)
    layer = reference.get_submodule(layer_name)
    A, G = _library_capture(reference, layer, x)
    return dict(name=name, model=reference, layer_name=layer_name, layer=layer, x=x, A=A, G=G, e=e,
                targets=[ClassifierOutputTarget(int(t)) for t in targets])


def _library_raw(name, case):
    """pytorch-grad-cam's map before its min-max scaling and resizing: get_cam_image, then its ReLU."""
    tool = LIBRARY[name](case["model"], [case["layer"]])
    try:
        raw = tool.get_cam_image(case["x"], case["layer"], case["targets"], case["A"], case["G"], eigen_smooth=False)
    finally:
        tool.activations_and_grads.release()
    if name == "eigencam":  # the SVD's sign is arbitrary: apply guided_swap's documented rule to its projection
        evidence = case["A"].sum(axis=1).reshape(len(raw), -1)
        evidence = evidence - evidence.mean(axis=1, keepdims=True)
        signs = np.where((raw.reshape(len(raw), -1) * evidence).sum(axis=1) >= 0, 1.0, -1.0)
        raw = raw * signs.reshape(-1, *([1] * (raw.ndim - 1)))
    return torch.from_numpy(np.maximum(raw, 0)).float()


@pytest.mark.parametrize("name", list(LIBRARY))
def test_each_map_equals_pytorch_grad_cam_before_its_scaling(case, name):
    ours = case["e"].layers[case["layer_name"]].cams_raw[name]
    expected = _library_raw(name, case)
    assert ours.shape == expected.shape
    assert_nontrivial(expected, 0.25)
    error = relative_error(ours, expected)
    print(f"\n{case['name']} batch {len(case['x'])} {name}: relative error {error:.1e}")  # seen with -s
    assert error < 1e-4, name


def test_fullgrad_equals_pytorch_grad_cam_before_and_after_its_scaling(case):
    x, ours = case["x"], case["e"].cams_raw["fullgrad"]
    tool = pgc.FullGrad(case["model"], [])
    try:
        public = tool(input_tensor=x, targets=case["targets"])
        leaf = x.clone().requires_grad_(True)  # its forward, step by step, to read the sum before the scaling
        outputs = tool.activations_and_grads(leaf)
        sum(target(output) for target, output in zip(case["targets"], outputs)).backward()
        summed = torch.from_numpy(tool.compute_cam_per_layer(leaf, case["targets"], False)[:, 0])
    finally:
        tool.activations_and_grads.release()
    assert_nontrivial(summed, 0.9)
    assert float(summed.std()) > 0.01 * float(summed.abs().max())  # a map, not a constant
    error, after = relative_error(ours, summed), np.abs(scale_cam_image(scale_cam_image(ours.numpy())) - public).max()
    print(f"\n{case['name']} batch {len(x)} fullgrad: relative error {error:.1e}, after scaling {after:.1e}")
    assert error < 1e-4
    assert after < 1e-4


@pytest.mark.parametrize("name", ["scorecam", "ablationcam"])
def test_options_equal_pytorch_grad_cam_on_its_weighted_activations(case, name, signed_eigen):
    """signed=, per_channel= and eigen_smooth= on Score-CAM and Ablation-CAM: pytorch-grad-cam's weights times its
    activation (its ``weighted_activations``), their sum without the ReLU, and its ``eigen_smooth=True`` map."""
    tool = LIBRARY[name](case["model"], [case["layer"]])
    try:
        weights = tool.get_cam_weights(case["x"], case["layer"], case["targets"], case["A"], case["G"])
        smooth = tool.get_cam_image(case["x"], case["layer"], case["targets"], case["A"], case["G"],
                                    eigen_smooth=True)
    finally:
        tool.activations_and_grads.release()
    weighted = torch.from_numpy(weights[:, :, None, None] * case["A"]).float()
    maps = case["e"].layers[case["layer_name"]]
    assert_nontrivial(torch.from_numpy(np.maximum(smooth, 0)), 0.1)
    errors = (relative_error(maps.cam_map(name, signed=True, per_channel=True), weighted),
              relative_error(maps.cam_map(name, signed=True), weighted.sum(dim=1)),
              relative_error(maps.cam_map(name, eigen_smooth=True), torch.from_numpy(np.maximum(smooth, 0))))
    print(f"\n{case['name']} batch {len(case['x'])} {name} options: relative errors {errors}")  # seen with -s
    assert max(errors) < 1e-4, errors


@pytest.mark.parametrize("case", CASES[3:], indirect=True)  # the DenseNet, batch 3
@pytest.mark.parametrize("name", ["scorecam", "ablationcam"])
def test_whole_calls_with_eigen_smooth_equal_fused(case, name, signed_eigen):
    """``ScoreCAM(model, [layer])(x, targets, eigen_smooth=True)`` is ``e.fused("scorecam", [layer],
    eigen_smooth=True)`` (the projection's sign by guided_swap's rule)."""
    tool = LIBRARY[name](case["model"], [case["layer"]])
    try:
        theirs = tool(input_tensor=case["x"], targets=case["targets"], eigen_smooth=True)
    finally:
        tool.activations_and_grads.release()
    ours = case["e"].fused(name, [case["layer_name"]], eigen_smooth=True).numpy()
    assert_nontrivial(torch.from_numpy(theirs), 0.1)
    assert np.abs(ours - theirs).max() < 1e-4, name


@pytest.mark.parametrize("case", CASES[3:], indirect=True)  # the DenseNet, batch 3
@pytest.mark.parametrize("name", ["scorecam", "ablationcam"])
def test_whole_calls_equal_after_the_same_scaling(case, name):
    """pytorch-grad-cam's public call min-max scales each image, resizes it with OpenCV, and scales again: ours
    through the same two scalings equals it."""
    x = case["x"]
    tool = LIBRARY[name](case["model"], [case["layer"]])
    try:
        theirs = tool(input_tensor=x, targets=case["targets"])
    finally:
        tool.activations_and_grads.release()
    raw = case["e"].layers[case["layer_name"]].cams_raw[name].numpy()
    ours = scale_cam_image(scale_cam_image(raw, (x.shape[-1], x.shape[-2])))
    assert_nontrivial(torch.from_numpy(theirs), 0.25)
    assert np.abs(ours - theirs).max() < 1e-4, name
