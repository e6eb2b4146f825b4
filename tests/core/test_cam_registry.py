"""Every gradient CAM from one pass, by name, against pytorch-grad-cam; the registry."""
import copy

import numpy as np
import pytest
import torch
import pytorch_grad_cam as pgc
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import guided_swap as gs
from guided_swap.core import cam
from conftest import assert_nontrivial, image_batch, lively_targets, make_model, relative_error

LIBRARY = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM,
           "layercam": pgc.LayerCAM, "hirescam": pgc.HiResCAM, "elementwise": pgc.GradCAMElementWise,
           "eigengradcam": pgc.EigenGradCAM}
# With random weights a CAM that clips negative evidence can be sparse; these are the fractions of non-zero
# positions each map must have at least, so that no comparison passes on zeros.
MIN_NONZERO = {"gradcam": 0.1, "gradcam++": 0.1, "xgradcam": 0.1, "layercam": 0.1, "hirescam": 0.1,
               "elementwise": 0.1, "eigengradcam": 0.1}


def _plain_copy(model):
    """pytorch-grad-cam keeps a view of the activation it hooks: an in-place ReLU after the layer would overwrite
    it. Its reference runs on a copy whose ReLUs are out of place (the same maths)."""
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
    return reference


def _library_capture(model, layer_name, x, targets):
    """A and G as pytorch-grad-cam's own hooks capture them, after one forward and backward of the model."""
    layer = model.get_submodule(layer_name)
    tool = pgc.GradCAM(model, [layer])
    outputs = tool.activations_and_grads(x)
    model.zero_grad()
    sum(target(output) for target, output in zip(targets, outputs)).backward()
    A = tool.activations_and_grads.activations[0].numpy()
    G = tool.activations_and_grads.gradients[0].numpy()
    tool.activations_and_grads.release()
    return layer, A, G


def _library_raw(name, model, layer, x, targets, A, G):
    """pytorch-grad-cam's map before its per-image min-max scaling and resizing: get_cam_image, then its ReLU."""
    tool = LIBRARY[name](model, [layer])
    try:
        raw = tool.get_cam_image(x, layer, targets, A, G, eigen_smooth=False)
    finally:
        tool.activations_and_grads.release()
    if name == "eigengradcam":  # the SVD's sign is arbitrary; apply guided_swap's documented rule to its projection
        evidence = (G * A).sum(axis=1).reshape(len(raw), -1)
        evidence = evidence - evidence.mean(axis=1, keepdims=True)
        signs = np.where((raw.reshape(len(raw), -1) * evidence).sum(axis=1) >= 0, 1.0, -1.0)
        raw = raw * signs.reshape(-1, *([1] * (raw.ndim - 1)))
    return torch.from_numpy(np.maximum(raw, 0)).float()


CASES = [
    # resnet18 layer4: nothing after it but pooling; vgg11 features.18: a conv with ReLUs after it (a forked tail)
    pytest.param(("resnet18", "layer4", 96), id="resnet18-layer4"),
    pytest.param(("vgg11", "features.18", 64), id="vgg11-features.18-forked"),
]


@pytest.fixture(scope="module", params=CASES)
def case(request):
    name, layer, size = request.param
    model = make_model(name)
    x = image_batch(size)
    targets = lively_targets(model, x, model.get_submodule(layer))
    explainer = gs.convert(model, layer=layer)
    e = explainer.explain(x, targets)
    reference = _plain_copy(model)
    wrapped = [ClassifierOutputTarget(int(t)) for t in targets]
    module, A, G = _library_capture(reference, layer, x, wrapped)
    return dict(model=reference, layer_name=layer, layer=module, x=x, targets=wrapped, A=A, G=G, e=e,
                explainer=explainer)


@pytest.mark.parametrize("name", list(LIBRARY))
def test_each_cam_equals_pytorch_grad_cam_before_its_scaling(case, name):
    ours = case["e"].layers[case["layer_name"]].cams_raw[name]
    expected = _library_raw(name, case["model"], case["layer"], case["x"], case["targets"], case["A"], case["G"])
    assert ours.shape == expected.shape
    assert_nontrivial(expected, MIN_NONZERO[name])
    assert relative_error(ours, expected) < 1e-4, name


def test_the_forked_case_really_forks(case):
    if case["layer_name"] == "features.18":
        assert case["explainer"].report.forked
    else:
        assert not case["explainer"].report.forked


@pytest.mark.parametrize("case", CASES[:1], indirect=True)
@pytest.mark.parametrize("name", [n for n in LIBRARY if n != "eigengradcam"])
def test_whole_calls_equal_after_the_same_scaling(case, name):
    """pytorch-grad-cam's public call min-max scales each image and resizes it with OpenCV (scale_cam_image), then
    min-max scales again after averaging over its target layers: ours, put through the same two scalings, equals
    it (EigenGrad-CAM's sign is arbitrary there, so it is compared above only)."""
    x = case["x"]
    tool = LIBRARY[name](case["model"], [case["layer"]])
    try:
        theirs = tool(input_tensor=x, targets=case["targets"])
    finally:
        tool.activations_and_grads.release()
    raw = case["e"].layers[case["layer_name"]].cams_raw[name].numpy()
    ours = scale_cam_image(scale_cam_image(raw, (x.shape[-1], x.shape[-2])))
    assert_nontrivial(torch.from_numpy(theirs), 0.1)
    assert np.abs(ours - theirs).max() < 1e-4, name


@pytest.fixture(scope="module")
def resnet_explainer():
    return gs.convert(make_model("resnet18"), layer="layer4")


def test_names_and_input_size_maps(resnet_explainer):
    assert gs.cam_methods()[:7] == ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "elementwise",
                                    "eigengradcam")
    e = resnet_explainer.explain(image_batch(64))
    assert set(e.cams) == set(gs.cam_methods())
    for name in gs.cam_methods():
        assert e.cams[name].shape == (2, 64, 64) and e.cams_raw[name].shape == (2, 2, 2)
        assert torch.equal(e.cams[name], cam.upsample(e.cams_raw[name], (64, 64)))
        assert (e.cams_raw[name] >= 0).all()
    # the classic names of the maps that were there before
    assert torch.equal(e.cam, e.cams["gradcam"]) and torch.equal(e.cam_raw, e.cams_raw["gradcam"])
    assert torch.equal(e.pixelwise_cam, e.cams["hirescam"])
    assert torch.equal(e.guided_pixelwise_cam, e.cams["layercam"])
    assert torch.equal(e[1].cams["xgradcam"], e.cams["xgradcam"][1:])
    assert torch.equal(e.to_dict(["cams.gradcam++"])["cams.gradcam++"], e.cams["gradcam++"])
    assert "cams.eigengradcam" not in e.to_dict()  # the default dict stays what it was


def test_cams_are_computed_on_first_access_only(resnet_explainer):
    calls = []

    def counting(A, G):
        calls.append(1)
        return G.sum(dim=1).abs()

    gs.register_cam("test-counting", counting)
    try:
        e = resnet_explainer.explain(image_batch(64))
        assert not calls
        first = e.cams_raw["test-counting"]
        assert e.cams_raw["test-counting"] is first and len(calls) == 1
        assert e.cams["test-counting"].shape == (2, 64, 64) and len(calls) == 1
        expected = e.layers["layer4"].grad.sum(dim=1).abs()
        assert torch.equal(first, expected)
    finally:
        gs.unregister_cam("test-counting")
    assert "test-counting" not in gs.cam_methods()


def test_a_provided_map_stands_for_its_cam_until_the_cam_is_replaced(resnet_explainer):
    """How the compiled pass hands over its Grad-CAM: provided once, not computed again, keyed to the function."""
    maps = resnet_explainer.explain(image_batch(64)).layers["layer4"]
    provided = torch.full((2, 2, 2), 7.0)
    maps.cams_raw.provide("gradcam", provided)
    assert maps.cams_raw["gradcam"] is provided
    gs.register_cam("test-provided", lambda A, G: G.sum(dim=1))
    try:
        maps.cams_raw.provide("test-provided", provided)
        assert maps.cams_raw["test-provided"] is provided
        gs.register_cam("test-provided", lambda A, G: A.sum(dim=1), replace=True)
        assert torch.equal(maps.cams_raw["test-provided"], maps.activation.sum(dim=1))
    finally:
        gs.unregister_cam("test-provided")
    with pytest.raises(gs.CamError, match="not a registered CAM"):
        maps.cams_raw.provide("test-provided", provided)


def test_registry_errors(resnet_explainer):
    with pytest.raises(gs.CamError, match="built-in"):
        gs.register_cam("gradcam", lambda A, G: A.sum(1))
    with pytest.raises(gs.CamError, match="callable"):
        gs.register_cam("test-bad", 3)
    gs.register_cam("test-wrong-shape", lambda A, G: A.sum(dim=(1, 2)))
    try:
        with pytest.raises(gs.CamError, match="already registered"):
            gs.register_cam("test-wrong-shape", lambda A, G: A.sum(1))
        e = resnet_explainer.explain(image_batch(64))
        with pytest.raises(gs.CamError, match="one map per sample"):
            e.cams_raw["test-wrong-shape"]
    finally:
        gs.unregister_cam("test-wrong-shape")
    with pytest.raises(KeyError, match="not a registered CAM"):  # also a ValueError and a GuidedSwapError
        e.cams["no-such-cam"]
    assert e.cams.get("no-such-cam") is None and "no-such-cam" not in e.cams
    with pytest.raises(gs.CamError, match="cannot be removed"):
        gs.unregister_cam("layercam")


def test_eigengradcam_sign_is_fixed_by_the_evidence():
    torch.manual_seed(0)
    A, G = torch.rand(3, 6, 4, 5), torch.randn(3, 6, 4, 5)
    for grad in (G, -G):  # flipping the gradient flips the evidence; the map follows the evidence, not the SVD
        out = cam.eigengradcam(A, grad)
        product = (grad * A).flatten(2).transpose(1, 2)
        centred = product - product.mean(dim=1, keepdim=True)
        component = torch.linalg.svd(centred, full_matrices=False)[2][:, 0]
        projection = centred @ component.unsqueeze(2)
        evidence = centred.sum(dim=2, keepdim=True)
        signs = torch.sign((projection * evidence).sum(dim=(1, 2))).view(-1, 1, 1)
        expected = torch.relu(projection * signs).view(3, 4, 5)
        assert_nontrivial(expected, 0.2)
        assert torch.allclose(out, expected, atol=1e-6)
    assert torch.equal(cam.eigengradcam(A, G), cam.eigengradcam(A.clone(), G.clone()))
    assert torch.equal(cam.eigengradcam(A[:, :, :1, :1], G[:, :, :1, :1]), torch.zeros(3, 1, 1))


def test_every_cam_works_for_1d_and_3d_maps():
    torch.manual_seed(0)
    for shape in ((2, 4, 9), (2, 4, 3, 4, 5)):
        A, G = torch.rand(shape), torch.randn(shape)
        for name in gs.cam_methods():
            out = cam.compute(name, A, G)
            assert out.shape == shape[:1] + shape[2:] and (out >= 0).all()
            assert cam.upsample(out, tuple(2 * s for s in shape[2:])).shape == shape[:1] + tuple(2 * s for s in shape[2:])
