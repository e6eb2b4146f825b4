"""timm families that stress ``auto`` and the rewrite: SE, eSE and ECA gates, conv heads after the pooling,
a space-to-depth stem, ReLU6; against the fx-free reference and Captum, with guards against all-zero maps."""
import warnings

import pytest
import torch

import guided_swap as gs
from guided_swap.checks import reference
from models import CifarNet, FunctionalResNet

from conftest import assert_nontrivial, image_batch, lively_targets, randomise_batchnorm, relative_error

timm = pytest.importorskip("timm")

# model, the module whose output ``auto`` must capture, what it covers
CASES = [
    ("legacy_seresnet18", "layer4", "SE gates (legacy SE-ResNet)"),
    ("ese_vovnet19b_dw", "stages", "eSE gates (VoVNet)"),
    ("ecaresnet26t", "layer4", "ECA gates"),
    ("mobilenetv3_small_050", "blocks", "a 1x1 conv head after the pooling, SE gates, Hardswish left alone"),
    ("dla46_c", "level5", "the classifier is a 1x1 conv after the pooling"),
    ("tresnet_m", "body", "a space-to-depth stem (the first conv takes 48 channels)"),
    ("mobilenetv2_050", "bn2", "ReLU6"),
]
UNTRACEABLE = [  # symbolic tracing meets data-dependent control flow; convert falls back to torch.export
    ("tf_mobilenetv3_small_minimal_100", {}, "blocks", "TF 'same' padding computed from the input size"),
    ("vgg11", {"mlp_ratio": 1 / 16}, "features.19", "`if x.shape[-2] < self.input_kernel_size` in the head"),
]


def build(name, **kwargs):
    torch.manual_seed(0)
    return randomise_batchnorm(timm.create_model(name, pretrained=False, **kwargs)).eval()


@pytest.fixture(scope="module", params=CASES, ids=[name for name, _, _ in CASES])
def case(request):
    name, module, _ = request.param
    model = build(name)
    x = image_batch(64)[:1]
    target = lively_targets(model, x, model.get_submodule(module), candidates=4)
    return model, model.get_submodule(module), x, target


def test_exact_against_the_fx_free_reference(case):
    model, module, x, target = case
    counter = reference.ReLURule()
    with torch.no_grad(), counter:
        logits = model(x)
    ex = gs.convert(model)  # default arguments: layer="auto", resolved on the first input
    assert len(ex.swapped) == counter.calls > 0
    e = ex.explain(x, target)
    assert torch.equal(e.logits, logits)
    expected_gradient = reference.input_gradient(model, x, target)
    expected_cam = reference.gradcam(model, x, target, module)
    assert_nontrivial(expected_gradient)
    assert_nontrivial(expected_cam)
    assert e.cam_raw.shape[1:].numel() > 1
    assert relative_error(e.gradient, expected_gradient) <= 1e-5
    assert relative_error(e.cam_raw, expected_cam) <= 1e-5, f"auto chose {ex.report.layers['auto']}"


@pytest.mark.parametrize("name", ["legacy_seresnet18", "ecaresnet26t"])
def test_captum_agrees_where_its_hooks_see_every_relu(name):
    captum_attr = pytest.importorskip("captum.attr")
    model = build(name)
    x = image_batch(64)[:1]
    ours = gs.convert(model, layer=None).explain(x, 3).gradient
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = captum_attr.GuidedBackprop(model).attribute(x, target=3)
    assert_nontrivial(expected)
    assert relative_error(ours, expected) <= 1e-5


@pytest.mark.parametrize("name,kwargs,module,why", UNTRACEABLE, ids=[name for name, *_ in UNTRACEABLE])
def test_models_with_control_flow_go_through_the_export_path(name, kwargs, module, why):
    model = build(name, **kwargs)  # timm's vgg11 with a narrow head: 9M parameters instead of 133M
    x = image_batch(64)[:1]
    target = lively_targets(model, x, model.get_submodule(module), candidates=4)
    ex = gs.convert(model)  # default arguments: fx fails, export captures on the first input
    e = ex.explain(x, target)
    assert ex.report.capture.startswith("export (fx failed at"), ex.report.capture
    assert torch.equal(e.logits, model(x))
    assert len(ex.swapped) == reference.count_relu_calls(model, x)
    expected_gradient = reference.input_gradient(model, x, target)
    expected_cam = reference.gradcam(model, x, target, model.get_submodule(module))
    assert_nontrivial(expected_gradient)
    assert_nontrivial(expected_cam)
    assert relative_error(e.gradient, expected_gradient) <= 1e-5
    assert relative_error(e.cam_raw, expected_cam) <= 1e-5, f"auto chose {ex.report.layers['auto']}"


@pytest.mark.parametrize("cls,module", [(CifarNet, "features.6"), (FunctionalResNet, "layer2")])
def test_cifar_size_models_with_auto(cls, module):
    torch.manual_seed(0)
    model = randomise_batchnorm(cls()).eval()
    x = image_batch(32)
    target = lively_targets(model, x, model.get_submodule(module), candidates=4)
    e = gs.convert(model).explain(x, target)  # auto resolved on this 32 px input: the fixed head cannot take more
    assert_nontrivial(e.cam_raw)
    assert relative_error(e.cam_raw, reference.gradcam(model, x, target, model.get_submodule(module))) <= 1e-5
    assert relative_error(e.gradient, reference.input_gradient(model, x, target)) <= 1e-5


def test_levit_auto_reads_the_grid_through_the_subsampling_attention():
    """timm's LeViT (64 px: a 4x4 grid, 2x2 after the first subsampling attention, 1x1 after the second) pools
    by a mean over its tokens: ``auto`` takes stage 1's last map, read as 2x2 tokens through the attention whose
    queries are every other token, never that attention's query projection. Against hooks on ``stages.1``."""
    model = build("levit_128s", img_size=64, num_classes=5)
    for name, parameter in model.named_parameters():  # timm's init (attention biases of zero, small weights)
        if name.endswith("attention_biases"):         # makes every query attend alike: all tokens equal
            torch.nn.init.normal_(parameter, std=2.0)
        elif name.endswith("linear.weight"):
            torch.nn.init.normal_(parameter, std=parameter[0].numel() ** -0.5)
    x = image_batch(64)
    with torch.no_grad():  # LeViT caches its attention biases at its first call in eval mode: not in a graph
        model(x)
    grid = model.stages[1].blocks[-1].attn.resolution
    maps = [_hooked_tokens(model, model.stages[1], x, torch.tensor([k, k]), grid) for k in range(5)]
    cams = torch.stack([torch.relu((G.mean(dim=(2, 3), keepdim=True) * A).sum(dim=1)) for A, G in maps])
    target = (cams.flatten(2).amax(dim=2) > 0).int().argmax(dim=0)  # per sample, a class with a non-empty map
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Hardswish, no ReLU: the plain gradient
        ex = gs.convert(model)
        e = ex.explain(x, target)
    assert ex.report.layers["auto"] == "stages.1.blocks.2.add_1", ex.report.layers["auto"]
    layout = ex.report.layouts["auto"]
    assert (layout.kind, layout.grid, layout.prefix) == ("tokens", tuple(grid), 0)
    A, G = _hooked_tokens(model, model.stages[1], x, target, grid)
    captured = e.layers["auto"]
    assert relative_error(captured.feature_map, A) < 1e-5 and relative_error(captured.feature_grad, G) < 1e-5
    theirs = cams[target, torch.arange(len(x))]
    assert_nontrivial(theirs, 0.5)
    assert relative_error(e.cam_raw, theirs) < 1e-4


def _hooked_tokens(model, module, x, target, grid):
    """The (B, N, C) output of ``module`` and its ordinary gradient from hooks, as (B, C, h, w) maps."""
    kept = {}

    def keep(_, __, output):
        output.retain_grad()
        kept["output"] = output

    handle = module.register_forward_hook(keep)
    try:
        model(x).gather(1, target.view(-1, 1)).sum().backward()
    finally:
        handle.remove()
    to_map = lambda t: t.reshape(t.shape[0], *grid, t.shape[-1]).permute(0, 3, 1, 2)  # noqa: E731
    return to_map(kept["output"].detach()), to_map(kept["output"].grad)
