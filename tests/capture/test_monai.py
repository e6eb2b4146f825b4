"""MONAI's DenseNet, ResNet and SEResNet in 2D and 3D with default arguments: the guided gradient against the
fx-free reference, Grad-CAM at ``auto`` against a plain-hook Grad-CAM at the module the report names.

Small configs of MONAI's own classes (random weights), one grey channel; a 3D input is a small volume.
"""
import pytest
import torch

monai_nets = pytest.importorskip("monai.networks.nets")

import guided_swap as gs  # noqa: E402
from conftest import assert_nontrivial, randomise_batchnorm, relative_error  # noqa: E402
from guided_swap.checks import reference  # noqa: E402


def densenet(dims):
    return monai_nets.DenseNet(spatial_dims=dims, in_channels=1, out_channels=5, init_features=8, growth_rate=4,
                               block_config=(2, 2, 2), bn_size=2)


def resnet(dims):
    return monai_nets.ResNet("basic", [1, 1, 1, 1], [8, 16, 16, 32], spatial_dims=dims, n_input_channels=1,
                             num_classes=5)


def seresnet(dims):
    return monai_nets.SENet(dims, 1, "se_resnet_bottleneck", [1, 1, 1, 1], groups=1, reduction=4, inplanes=16,
                            downsample_kernel_size=1, input_3x3=False, dropout_prob=None, num_classes=5)


MODELS = {"densenet": densenet, "resnet": resnet, "seresnet": seresnet}
SIZES = {2: (64, 64), 3: (32, 32, 32)}


def build(name, dims):
    torch.manual_seed(0)
    return randomise_batchnorm(MODELS[name](dims)).eval()


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", list(MODELS))
def test_defaults_match_the_reference_and_hooks(name, dims):
    model = build(name, dims)
    x = torch.randn((2, 1) + SIZES[dims], generator=torch.Generator().manual_seed(1))
    ex = gs.convert(model)  # nothing but the model
    e = ex.explain(x)
    assert ex.report.capture == "fx" and ex.output is None  # MONAI returns the logits tensor itself
    assert "explains output" not in ex.report.summary()
    logits = model(x.clone().requires_grad_(True)).detach()
    assert torch.equal(e.logits, logits) and torch.equal(e.target, logits.argmax(dim=1))
    assert len(ex.swapped) == reference.count_relu_calls(model, x)
    expected = reference.input_gradient(model, x, e.target)
    assert_nontrivial(expected, 0.5)
    assert relative_error(e.gradient, expected) <= 1e-5
    module = ex.report.layer_reasons["auto"].split(":")[0]  # the module the report says auto captures
    theirs = reference.gradcam(model, x, e.target, model.get_submodule(module))
    assert_nontrivial(theirs, 0.05)
    assert e.cam_raw.shape == theirs.shape and e.cam_raw.dim() == dims + 1 and e.cam_raw[0].numel() > 1
    assert relative_error(e.cam_raw, theirs) < 1e-5
