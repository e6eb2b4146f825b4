"""pytorch-grad-cam's aug_smooth=True: six flipped and rescaled copies, batched through the explainer's own explain."""
import warnings

import numpy as np
import pytest
import torch
import pytorch_grad_cam as pgc
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import guided_swap as gs

from conftest import assert_nontrivial, image_batch, lively_targets, make_model, plain_copy, small_densenet

LIBRARY = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM,
           "layercam": pgc.LayerCAM, "hirescam": pgc.HiResCAM}
TOL = 1e-4  # the maps lie in [0, 1]

CASES = {  # name: (model, layers, image size, batch, chunk)
    "resnet18": (lambda: make_model("resnet18"), ["layer4"], 96, 3, None),
    "resnet18-two-layers": (lambda: make_model("resnet18"), ["layer3", "layer4"], 96, 1, None),
    "densenet": (lambda: small_densenet(), ["features.denseblock3"], 96, 1, None),
    # A gradient is discontinuous at a max-pooling near-tie or a ReLU input near zero: in one batch of six, other
    # kernels' rounding (1e-7) moves such a decision for two of vgg11's copies and their Grad-CAM by 1e-2, in
    # pytorch-grad-cam as in guided_swap (its map of those six copies in one call differs as much from its maps of
    # one copy at a time). Compared here at pytorch-grad-cam's batch size, one input per pass.
    "vgg11-forked": (lambda: make_model("vgg11"), ["features.18"], 64, 1, 1),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    make, layers, size, batch, chunk = CASES[request.param]
    model = make()
    x = image_batch(size, names=("chelsea", "astronaut", "coffee"))[:batch]
    targets = lively_targets(model, x, model.get_submodule(layers[-1]))
    return dict(model=model, reference=plain_copy(model), layers=layers, x=x, targets=targets, chunk=chunk,
                explainer=gs.convert(model, layer=layers))


def pgc_aug_smooth(case, name, **kwargs):
    model = case["reference"]
    tool = LIBRARY[name](model, [model.get_submodule(layer) for layer in case["layers"]])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tool(case["x"], [ClassifierOutputTarget(int(t)) for t in case["targets"]], aug_smooth=True,
                        **kwargs)
    finally:
        tool.activations_and_grads.release()


def batch_sizes(explainer):
    sizes = []
    handle = explainer.graph_module.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
    return sizes, handle


@pytest.mark.parametrize("name", ["gradcam", "gradcam++", "layercam"])
def test_equals_pytorch_grad_cam_in_one_batched_pass(case, name):
    theirs = pgc_aug_smooth(case, name)
    sizes, handle = batch_sizes(case["explainer"])
    try:
        ours = case["explainer"].aug_smooth(case["x"], case["targets"], name, chunk=case["chunk"])
    finally:
        handle.remove()
    assert sizes == [6 * len(case["x"])] if case["chunk"] is None else [case["chunk"]] * 6  # one explain per chunk
    assert ours.shape == theirs.shape and ours.dtype == torch.float32
    assert_nontrivial(torch.from_numpy(theirs), 0.3)
    assert np.abs(ours.numpy() - theirs).max() <= TOL, name


def test_with_eigen_smooth(case, signed_eigen):
    theirs = pgc_aug_smooth(case, "xgradcam", eigen_smooth=True)
    ours = case["explainer"].aug_smooth(case["x"], case["targets"], "xgradcam", eigen_smooth=True, chunk=case["chunk"])
    assert_nontrivial(torch.from_numpy(theirs), 0.1)
    assert np.abs(ours.numpy() - theirs).max() <= TOL


def test_chunks_bound_the_pass_and_the_target_is_the_clean_inputs():
    model = make_model("resnet18")
    explainer = gs.convert(model, layer="layer4")
    x = image_batch(64, names=("chelsea", "astronaut", "coffee"))
    whole = explainer.aug_smooth(x, None, "layercam")
    sizes, handle = batch_sizes(explainer)
    try:
        chunked = explainer.aug_smooth(x, None, "layercam", chunk=5)
    finally:
        handle.remove()
    assert sizes == [5, 5, 5, 3]
    assert torch.allclose(chunked, whole, atol=1e-6)
    with torch.no_grad():
        clean = model(x).argmax(dim=1)
    assert torch.allclose(explainer.aug_smooth(x, clean, "layercam"), whole, atol=1e-6)
    flipped = explainer.aug_smooth(x.flip(-1), clean, "layercam")  # the six copies are closed under the flip
    assert torch.allclose(flipped.flip(-1), whole, atol=1e-5)


def test_bad_calls_are_refused():
    explainer = gs.convert(make_model("resnet18"), layer="layer4")
    x = image_batch(32)
    with pytest.raises(TypeError, match="floating"):
        explainer.aug_smooth(list(x))
    with pytest.raises(TypeError, match="floating"):
        explainer.aug_smooth(x.long())
    with pytest.raises(ValueError, match="chunk="):
        explainer.aug_smooth(x, chunk=0)
    with pytest.raises(gs.CamError, match="not a registered CAM"):
        explainer.aug_smooth(x, cam="no-such-cam")
    with pytest.raises(gs.LayerError, match="not captured"):
        explainer.aug_smooth(x, layers=["layer3"])
