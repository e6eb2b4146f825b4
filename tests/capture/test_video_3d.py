"""Grad-CAM, pixel-wise CAM and Guided Grad-CAM over (T, H, W) and (L): torchvision's video models, our own 3-d
and 1-d CNNs, against a hook-based two-pass Grad-CAM written here (plain hooks, no fx)."""
import pytest
import torch
import torch.nn.functional as F
import torchvision

import guided_swap as gs
from guided_swap.capture.graph import layers
from guided_swap.capture.graph.trace import trace
from guided_swap.checks import reference
from models import SignalCNN, VolumeCNN

from conftest import assert_nontrivial, randomise_batchnorm, relative_error

LINEAR = {3: "linear", 4: "bilinear", 5: "trilinear"}


def hooked_pass(model, x, target, layer):
    """Activation and ordinary gradient at ``layer`` from a forward hook and a tensor hook."""
    seen = {}

    def keep(module, inputs, output):
        seen["A"] = output.detach().clone()
        output.register_hook(lambda g: seen.__setitem__("G", g.detach().clone()))

    handle = layer.register_forward_hook(keep)
    try:
        logits = model(x.clone().requires_grad_(True))
        logits.gather(1, torch.as_tensor(target).view(-1, 1)).sum().backward()
    finally:
        handle.remove()
    return seen["A"], seen["G"]


def two_pass_gradcam(model, x, layer):
    """Pass 1 at ``layer`` for the best-scoring class whose Grad-CAM is not empty; pass 2: guided gradient."""
    with torch.no_grad():
        ranked = model(x).argsort(dim=1, descending=True)[0]
    for target in ranked[:6].tolist():
        A, G = hooked_pass(model, x, [target] * x.shape[0], layer)
        cam_raw = torch.relu((G.mean(dim=tuple(range(2, A.dim())), keepdim=True) * A).sum(dim=1))
        if float((cam_raw != 0).float().mean()) >= 0.25:
            break
    cam = F.interpolate(cam_raw[:, None], size=x.shape[2:], mode=LINEAR[x.dim()], align_corners=False)[:, 0]
    guided = reference.input_gradient(model, x, [target] * x.shape[0])
    return target, cam_raw, cam, cam[:, None] * guided, torch.relu((G * A).sum(dim=1))


def video_model(name):
    torch.manual_seed(0)
    return randomise_batchnorm(torchvision.models.get_model(name, weights=None)).eval()


def own_model(cls):
    torch.manual_seed(0)
    return randomise_batchnorm(cls()).eval()


CASES = {
    "r3d_18": (lambda: video_model("r3d_18"), "layer4", (1, 3, 4, 32, 32)),
    "mc3_18": (lambda: video_model("mc3_18"), "layer4", (1, 3, 4, 32, 32)),
    "r2plus1d_18": (lambda: video_model("r2plus1d_18"), "layer4", (1, 3, 4, 32, 32)),
    "volume_cnn": (lambda: own_model(VolumeCNN), "block", (2, 1, 8, 16, 16)),
    "signal_cnn": (lambda: own_model(SignalCNN), "act2", (2, 2, 64)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cams_over_every_spatial_axis_match_two_hooked_passes(name):
    build, layer_name, shape = CASES[name]
    model = build()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    target, cam_raw, cam, guided_gradcam, pixelwise = two_pass_gradcam(model, x, model.get_submodule(layer_name))
    ex = gs.convert(model)  # layer="auto", resolved on the first input
    e = ex.explain(x, target)
    assert ex.report.layers["auto"].startswith(layer_name), ex.report.layers
    assert torch.equal(e.logits, model(x))
    assert e.cam_raw.shape == cam_raw.shape and e.cam.shape == (shape[0],) + shape[2:]
    assert_nontrivial(cam_raw)
    assert_nontrivial(e.gradient)
    assert relative_error(e.cam_raw, cam_raw) <= 1e-5
    assert relative_error(e.cam, cam) <= 1e-5
    assert relative_error(e.guided_gradcam, guided_gradcam) <= 1e-5
    assert relative_error(e.layers["auto"].pixelwise_cam_raw, pixelwise) <= 1e-5


def test_auto_reason_names_the_volume_map():
    model = own_model(VolumeCNN)
    traced = trace(model)
    node, reason = layers.auto_layer(traced.module, torch.zeros(1, 1, 8, 16, 16),
                                         module_outputs=traced.module_outputs)
    assert reason == ("block: the last spatial map (4x8x8) before the global pooling at "
                      "adaptive_avg_pool3d"), reason
