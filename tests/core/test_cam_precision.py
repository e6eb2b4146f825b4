"""Half precision: a float16 or bfloat16 model's CAMs are computed in float32 and returned in float32.

In the model's own dtype Grad-CAM++'s ``G²`` and ``G³`` underflow in float16 (maps all zero) and XGrad-CAM's
sums over the positions overflow (infinite weights, NaN maps); in bfloat16 every sum keeps 8 significant bits
(maps off by ~3e-3). Tolerances are in units of the dtype's unit roundoff ``u`` (half its machine epsilon:
2^-11 ≈ 4.9e-4 for float16, 2^-8 ≈ 3.9e-3 for bfloat16), measured as a relative L2 error.
"""
import copy

import pytest
import torch
from torch import nn

import guided_swap as gs
from guided_swap.checks import reference
from guided_swap.core import cam, pass_cams

from conftest import MEAN, STD, assert_nontrivial, image_batch, make_model, randomise_batchnorm

HALF = [pytest.param(torch.float16, id="float16"), pytest.param(torch.bfloat16, id="bfloat16")]


def unit_roundoff(dtype) -> float:
    return torch.finfo(dtype).eps / 2


def rel_l2(actual, expected) -> float:
    expected = expected.detach().double()
    return float((actual.detach().double() - expected).norm() / expected.norm().clamp_min(1e-300))


def tiny_cnn(seed: int = 0) -> nn.Module:
    """Four 3x3 convolutions (BatchNorm in the first two) and a linear head: layer "7" has ReLUs after it (the
    plain fork), layer "9" only the pooling."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    return randomise_batchnorm(model).eval()


def pair(model, dtype):
    """The model in ``dtype`` and its float32 twin with the very same (rounded) weights: what differs between
    them is the rounding of every intermediate result, nothing else."""
    low = copy.deepcopy(model).to(dtype)
    return low, copy.deepcopy(low).float()


@pytest.fixture(scope="module")
def images():
    return image_batch(32, names=("chelsea", "astronaut", "coffee"))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("which", ["tiny", "resnet18"])
def test_cam_maths_add_no_rounding_of_the_models_dtype(images, dtype, which):
    """Every registered CAM of a half-precision model's own A and G equals the same maths in float64 on those
    values to float32's precision (~1e-7; 1e-5 allows sums over 16 channels x 256 positions), and is float32.
    In the model's dtype the error was 5e-4 to 7e-2 (float16) and 2e-3 to 6e-3 (bfloat16)."""
    model, layers = (tiny_cnn(), ("7", "9")) if which == "tiny" else (make_model("resnet18"), ("layer3", "layer4"))
    low, _ = pair(model, dtype)
    x = images if which == "tiny" else image_batch(64, names=("chelsea",))
    e = gs.convert(low, layer=list(layers)).explain(x.to(dtype), [1, 2, 3][:len(x)])
    for layer in layers:
        maps = e.layers[layer]
        assert maps.activation.dtype == dtype
        exact_a, exact_g = maps.feature_map.double(), maps.feature_grad.double()
        for name in gs.cam_methods():
            ours = maps.cams_raw[name]
            assert ours.dtype == torch.float32 and maps.cams[name].dtype == torch.float32, name
            assert_nontrivial(ours, 0.2)
            assert rel_l2(ours, cam.get_cam(name)(exact_a, exact_g)) < 1e-5, (layer, name)
    assert e.guided_gradcam.dtype == torch.float32


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", HALF)
def test_every_cam_and_rule_gradient_of_a_half_model_matches_the_float32_model(images, dtype, batch):
    """Against the float32 twin. A CAM is a sum of products of A and G, so its relative error is, to first order,
    that of A plus that of G (the rounding of the model's own pass, measured here), and the maths in float32 add
    nothing measurable: each map must be within 4 (eps_A + eps_G) + 4u. The input gradient goes back through five
    weighted layers, each a sum of up to 144 products rounded to the dtype (~12u each as a random walk, ~60u in
    all; measured 1u to 51u): within 128u. And under every rule it equals, to 4u, the fx-free reference run
    in the same dtype (the rules' ops are exact in any dtype)."""
    u = unit_roundoff(dtype)
    low, full = pair(tiny_cnn(), dtype)
    x, target = images[:batch].to(dtype), [1, 2, 3][:batch]
    for rule in gs.rules():
        e_low = gs.convert(low, layer=["7", "9"], rule=rule).explain(x, target)
        e_full = gs.convert(full, layer=["7", "9"], rule=rule).explain(x.float(), target)
        assert e_low.gradient.dtype == dtype
        assert_nontrivial(e_full.gradient, 0.3)
        assert rel_l2(e_low.gradient, e_full.gradient) < 128 * u, rule
        same_dtype = reference.input_gradient(low, x, torch.tensor(target), rule)
        assert rel_l2(e_low.gradient, same_dtype) < 4 * u, rule
    for layer in ("7", "9"):
        ours, theirs = e_low.layers[layer], e_full.layers[layer]
        inherited = rel_l2(ours.activation, theirs.activation) + rel_l2(ours.grad, theirs.grad)
        for name in gs.cam_methods():
            assert_nontrivial(theirs.cams_raw[name], 0.3)
            error = rel_l2(ours.cams_raw[name], theirs.cams_raw[name])
            assert error < 4 * inherited + 4 * u, (layer, name, error / u)


def test_float16_gradcam_plusplus_of_a_probability_does_not_underflow(images):
    """Explaining a softmax probability makes G small (~5e-5 here, as for a trained model's logits): in float16
    G² ≈ 2e-9 is below its smallest subnormal (6e-8) and Grad-CAM++ was zero everywhere, with no warning."""
    low, full = pair(tiny_cnn(), torch.float16)
    probability = lambda logits: logits.float().softmax(dim=1)[:, 3]
    e_low = gs.convert(low, layer="9").explain(images.half(), probability)
    e_full = gs.convert(full, layer="9").explain(images.half().float(), probability)
    assert float(e_full.layers["9"].grad.abs().max()) < 2e-4  # what makes float16 underflow
    expected = e_full.cams_raw["gradcam++"]
    assert_nontrivial(expected, 0.5)
    inherited = rel_l2(e_low.layers["9"].activation, e_full.layers["9"].activation) + \
        rel_l2(e_low.layers["9"].grad, e_full.layers["9"].grad)
    assert rel_l2(e_low.cams_raw["gradcam++"], expected) < 4 * inherited + 4 * unit_roundoff(torch.float16)


def test_float16_xgradcam_of_large_activations_does_not_overflow():
    """A model fed raw 0-255 pixels: the first ReLU's activations reach ~130, and their sum over the 96x96
    positions of one channel exceeds float16's largest value (65504). XGrad-CAM divided by infinity (a wrong
    map) and Grad-CAM++ multiplied infinity by zero (NaN)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    pixels = ((image_batch(96) * STD + MEAN) * 255).round()
    low, full = pair(model, torch.float16)
    e_low = gs.convert(low, layer="1").explain(pixels.half(), [1, 2])
    e_full = gs.convert(full, layer="1").explain(pixels, [1, 2])
    assert float(e_full.layers["1"].activation.sum(dim=(2, 3)).max()) > torch.finfo(torch.float16).max
    inherited = rel_l2(e_low.layers["1"].activation, e_full.layers["1"].activation) + \
        rel_l2(e_low.layers["1"].grad, e_full.layers["1"].grad)
    for name in ("xgradcam", "gradcam++"):
        ours = e_low.cams_raw[name]
        assert torch.isfinite(ours).all(), name
        assert_nontrivial(e_full.cams_raw[name], 0.1)
        assert rel_l2(ours, e_full.cams_raw[name]) < 4 * inherited + 4 * unit_roundoff(torch.float16), name


PASSES = ("scorecam", "ablationcam", "fullgrad")


@pytest.fixture(scope="module", params=HALF)
def pass_cams_pair(request, images):
    """Score-CAM, Ablation-CAM and FullGrad of a half-precision tiny CNN and of its float32 twin, at both layers."""
    dtype = request.param
    low, full = pair(tiny_cnn(), dtype)
    x = images.to(dtype)
    e_low = gs.convert(low, layer=["7", "9"]).explain(x, [1, 2, 3], cams=PASSES)
    e_full = gs.convert(full, layer=["7", "9"]).explain(x.float(), [1, 2, 3], cams=PASSES)
    return dict(dtype=dtype, low=low, x=x, e_low=e_low, e_full=e_full)


def test_pass_cams_of_a_half_model_are_float32_and_finite(pass_cams_pair):
    """In float16 Score-CAM's mask of a constant channel was 0 / (0 + 1e-8), and 1e-8 is 0 there: NaN maps. Every
    map of these CAMs is float32 (their maths run in float32, as every CAM's), finite and not empty."""
    e_low = pass_cams_pair["e_low"]
    for layer in ("7", "9"):
        maps = e_low.layers[layer]
        flat = maps.feature_map.flatten(2)
        assert (flat.amax(dim=2) == flat.amin(dim=2)).any(), layer  # constant channels: Score-CAM's blank masks
        for name in PASSES:
            ours = maps.cams_raw[name]
            assert ours.dtype == torch.float32 and maps.cams[name].dtype == torch.float32, (layer, name)
            assert torch.isfinite(ours).all(), (layer, name)
            assert_nontrivial(ours, 0.2)
        for name in ("scorecam", "ablationcam"):
            assert maps.pass_weights[name].dtype == torch.float32, name
            assert maps.cam_map(name, eigen_smooth=True).dtype == torch.float32, name


def test_pass_cam_maths_add_no_rounding_of_the_models_dtype(pass_cams_pair):
    """From the half model's own values, the maths in float64 give the same maps to float32's precision: Score-CAM
    and Ablation-CAM from its A and the weights its passes measured, Ablation-CAM's weights ``(y - y_k) / y`` from
    its own scores (the tail after layer "9" run by hand in its dtype), FullGrad from its own bias pass."""
    dtype, low, x, e_low = (pass_cams_pair[k] for k in ("dtype", "low", "x", "e_low"))
    for layer in ("7", "9"):
        maps = e_low.layers[layer]
        for name in ("scorecam", "ablationcam"):
            weights = maps.pass_weights[name].double()
            exact = torch.relu((weights[:, :, None, None] * maps.feature_map.double()).sum(dim=1))
            assert rel_l2(maps.cams_raw[name], exact) < 1e-6, (layer, name)
    A, target = e_low.layers["9"].activation, e_low.target
    with torch.no_grad():
        original = low[10:](A).double().gather(1, target[:, None])[:, 0]
        ablated = torch.stack([low[10:](A * (torch.arange(A.shape[1]) != k).to(dtype)[None, :, None, None])
                               .double().gather(1, target[:, None])[:, 0] for k in range(A.shape[1])], dim=1)
    exact_weights = (original[:, None] - ablated) / original[:, None]
    assert rel_l2(e_low.layers["9"].pass_weights["ablationcam"], exact_weights) < 1e-6
    bias = gs.convert(low, layer="9").capture.bias_pass(x, gs.core.targets.as_score([1, 2, 3]), target)
    exact_fullgrad = pass_cams.fullgrad(x.double(), bias.input_grad.double(),
                                        [(b.double(), g.double()) for b, g in bias.biases if g.dim() == 4])
    assert rel_l2(e_low.cams_raw["fullgrad"], exact_fullgrad) < 1e-5


@pytest.mark.parametrize("name", PASSES)
def test_pass_cams_of_a_half_model_match_the_float32_model(pass_cams_pair, name):
    """Against the float32 twin. Score-CAM and Ablation-CAM are ``sum_k w_k A_k``: each map is within
    4 (eps_A + eps_w) + 4u, the errors of A and of the weights being the model's own rounding (measured here).
    Score-CAM's weights are a softmax of the masked inputs' scores (eps_w ~0.05u); Ablation-CAM's ``(y - y_k) / y``
    divide the rounding of the scores (~0.5u) by the small drops ``y - y_k`` (eps_w 16u to 130u): that is the half
    model's, not the maths'. FullGrad is made of the ordinary gradients at the input and at every bias layer, which
    come back through up to five weighted layers as the input gradient does: within its 128u (measured 4u to 11u;
    21u in float16 before its maths ran in float32)."""
    e_low, e_full = pass_cams_pair["e_low"], pass_cams_pair["e_full"]
    u = unit_roundoff(pass_cams_pair["dtype"])
    for layer in ("7", "9"):
        ours, theirs = e_low.layers[layer], e_full.layers[layer]
        assert_nontrivial(theirs.cams_raw[name], 0.2)
        error = rel_l2(ours.cams_raw[name], theirs.cams_raw[name])
        if name == "fullgrad":
            assert error < 128 * u, (layer, error / u)
            continue
        inherited = rel_l2(ours.activation, theirs.activation) + rel_l2(ours.pass_weights[name],
                                                                        theirs.pass_weights[name])
        assert error < 4 * inherited + 4 * u, (layer, error / u, inherited / u)


def test_float64_maps_stay_float64():
    A, G = torch.rand(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for name in gs.cam_methods():
        assert cam.compute(name, A, G).dtype == torch.float64, name
