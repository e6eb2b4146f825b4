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
from guided_swap.core import cam

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


def test_float64_maps_stay_float64():
    A, G = torch.rand(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for name in gs.cam_methods():
        assert cam.compute(name, A, G).dtype == torch.float64, name
