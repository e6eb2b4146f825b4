"""``layer="auto"``: the last spatial map before the global pooling that reaches the output; never a gate or a
map after the pooling; the backbone's last map for segmentation; a reason; the input check from the graph."""
import warnings

import pytest
import torch
import torchvision
from torch import nn

import guided_swap as gs
from guided_swap.capture.graph import layers as capture
from guided_swap.checks import reference
from guided_swap.capture.graph.trace import trace
from models import FunctionalBatchNormNet, GatedNet, SpaceToDepthNet, TinySegmenter

from conftest import (assert_nontrivial, image_batch, lively_targets, make_model, randomise_batchnorm, relative_error,
                      small_densenet)


def auto(model, x, **kwargs):
    traced = trace(model)
    node, reason = capture.auto_layer(traced.module, x, module_outputs=traced.module_outputs, **kwargs)
    return node.meta["qualname"], reason


def test_gates_and_a_conv_head_after_pooling_are_never_chosen():
    torch.manual_seed(0)
    model = randomise_batchnorm(GatedNet()).eval()
    name, reason = auto(model, torch.zeros(1, 3, 32, 32))
    assert name == "gates.2.mul"
    assert reason == "gates: the last spatial map (16x16) before the global pooling at adaptive_avg_pool2d"
    x = image_batch(32)
    target = lively_targets(model, x, model.gates)
    e = gs.convert(model).explain(x, target)
    assert e.cam_raw.shape == (2, 16, 16)
    assert_nontrivial(e.cam_raw)
    assert relative_error(e.cam_raw, reference.gradcam(model, x, target, model.gates)) <= 1e-5


def test_resnet_reason_and_a_small_input_falls_back_to_the_last_map_above_1x1():
    model = make_model("resnet18")
    assert auto(model, torch.zeros(1, 3, 64, 64)) == (
        "layer4.1.relu_1", "layer4: the last spatial map (2x2) before the global pooling at avgpool (nn.AdaptiveAvgPool2d)")
    name, reason = auto(model, torch.zeros(1, 3, 32, 32))  # layer4 is 1x1 here: layer3 is the last real map
    assert name == "layer3.1.relu_1" and reason.startswith("layer3: the last spatial map (2x2) before")


def test_flatten_head_takes_the_last_conv_map_before_the_pools():
    name, reason = auto(make_model("vgg11"), torch.zeros(1, 3, 64, 64))
    assert name == "features.19" and "flatten" in reason


def test_segmentation_without_pooling_takes_the_map_feeding_the_head():
    torch.manual_seed(0)
    model = TinySegmenter().eval()
    x = torch.zeros(1, 3, 32, 32)
    assert auto(model, x, output="out") == (
        "backbone.3", "backbone.3: the last backbone map (8x8) feeding the prediction head 'head'; "
                      "the model has no global pooling")
    assert auto(model, x, output="aux")[0] == "backbone.1"


def hooked_gradcam(model, x, cls, module):
    """Grad-CAM at ``module`` for the mean ``cls`` logit over the pixels, from a plain hooked forward/backward."""
    seen = {}

    def keep(m, inputs, output):
        seen["A"] = output.detach().clone()
        output.register_hook(lambda g: seen.__setitem__("G", g))

    handle = module.register_forward_hook(keep)
    try:
        model(x)["out"][:, cls].mean().backward()
    finally:
        handle.remove()
    return torch.relu((seen["G"].mean((2, 3), keepdim=True) * seen["A"]).sum(1))


@pytest.mark.parametrize("name,module,node", [("fcn_resnet50", "backbone.layer4", "backbone.layer4.2.relu_2"),
                                              ("deeplabv3_mobilenet_v3_large", "backbone.16", "backbone.16.2"),
                                              ("lraspp_mobilenet_v3_large", "backbone.16", "backbone.16.2")])
def test_torchvision_segmentation_gets_a_nonzero_cam_from_the_backbone(name, module, node):
    torch.manual_seed(0)
    model = randomise_batchnorm(torchvision.models.get_model(name, weights=None, weights_backbone=None)).eval()
    x = image_batch(48)[:1]
    ex = gs.convert(model, output="out")  # the default layer="auto", resolved on the first input
    with torch.no_grad():
        ranked = model(x)["out"].mean((2, 3)).argsort(dim=1, descending=True)[0].tolist()
    for cls in ranked[:5]:  # random weights: the first class whose Grad-CAM is not empty
        expected = hooked_gradcam(model, x, cls, model.get_submodule(module))
        if float((expected != 0).float().mean()) >= 0.25:
            break
    e = ex.explain(x, lambda outputs: outputs["out"][:, cls].mean((1, 2)))
    assert ex.report.layers["auto"] == node
    assert "feeding the prediction head 'classifier'" in ex.report.layer_reasons["auto"]
    assert_nontrivial(e.cam_raw)
    assert relative_error(e.cam_raw, expected) <= 1e-5


def test_no_spatial_map_is_a_clear_error():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).eval()
    with pytest.raises(gs.LayerError, match="no spatial feature map"):
        auto(mlp, torch.zeros(1, 3, 8, 8))
    with pytest.raises(gs.LayerError, match="larger than 1x1"):
        auto(make_model("resnet18"), torch.zeros(1, 3, 1, 1))


@pytest.mark.parametrize("model_fn", [lambda: randomise_batchnorm(GatedNet()), FunctionalBatchNormNet])
def test_the_shape_probe_never_changes_buffers_even_in_training_mode(model_fn):
    torch.manual_seed(0)
    model = model_fn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    auto(model, torch.randn(2, 3, 16, 16))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules())


def test_input_spec_is_read_from_the_graph():
    assert capture.input_spec(make_model("resnet18")) == (4, 3)
    assert capture.input_spec(nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU())) == (3, 2)
    torch.manual_seed(0)
    model = SpaceToDepthNet().eval()
    assert capture.input_spec(model) is None  # a reshape comes first: no check, rather than a wrong one
    x = image_batch(16)
    e = gs.convert(model).explain(x)
    assert torch.equal(e.logits, model(x)) and e.cam_raw.shape == (2, 8, 8)


def test_input_spec_follows_normalisation_arithmetic():
    class Normalised(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.zeros(1, 3, 1, 1))
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv((x - self.mean) / 0.5).mean((2, 3))

    assert capture.input_spec(Normalised()) == (4, 3)


def test_input_spec_reads_a_functional_convolution_with_groups():
    class FunctionalConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 2, 3, 3))

        def forward(self, x):
            return torch.nn.functional.conv2d(x, self.weight, groups=2).mean((2, 3))

    assert capture.input_spec(FunctionalConv()) == (4, 4)


class TwoScales(nn.Module):
    """Two conv stems at two scales whose tokens meet only in the pooling (CrossViT's layout)."""

    def __init__(self):
        super().__init__()
        self.fine = nn.Conv2d(3, 8, 4, 4)
        self.coarse = nn.Conv2d(3, 8, 8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        tokens = torch.cat([torch.relu(self.fine(x)).flatten(2), torch.relu(self.coarse(x)).flatten(2)], dim=2)
        return self.fc(tokens.mean(-1))


def test_branches_that_meet_in_the_pooling_take_the_last_map_and_say_it_is_partial():
    name, reason = auto(TwoScales().eval(), torch.zeros(1, 3, 32, 32))
    assert name == "relu_1"
    assert reason.startswith("relu_1: the last spatial map (4x4) before the global pooling at mean")
    assert reason.endswith("other branches reach it too, so this map shows only part of the evidence")


class UnfoldMerge(nn.Module):
    """Tokens from a conv stem, one block, then a patch merging written with ``F.unfold`` (which the graph
    reading cannot follow) and a pooled head: the last stage is the 4x4 grid after the merging."""

    def __init__(self, c=8):
        super().__init__()
        self.embed, self.norm1, self.fc1 = nn.Conv2d(3, c, 4, 4), nn.LayerNorm(c), nn.Linear(c, c)
        self.reduce, self.norm2, self.head = nn.Linear(4 * c, 2 * c), nn.LayerNorm(2 * c), nn.Linear(2 * c, 5)

    def forward(self, x):
        t = self.embed(x)
        b, c, h, w = t.shape
        t = t.flatten(2).transpose(1, 2)
        t = t + torch.relu(self.fc1(self.norm1(t)))
        merged = torch.nn.functional.unfold(t.transpose(1, 2).reshape(b, c, h, w), 2, stride=2).transpose(1, 2)
        return self.head(self.norm2(self.reduce(merged)).mean(1))


def test_auto_refuses_an_earlier_map_when_the_token_grid_is_lost_after_it():
    # The last map auto can read is the 8x8 grid before the merging; taking it would silently explain an
    # earlier stage than the one the head pools, so auto says where the grid was lost and what to pass.
    torch.manual_seed(0)
    model, x = UnfoldMerge().eval(), image_batch(32)
    with pytest.raises(gs.LayerError, match=r"after 'reshape' \(8x8\).*tokens of 'reduce' \(2, 16, 16\).*layout="):
        gs.convert(model).explain(x)
    ex = gs.convert(model, layer="norm2", layout=gs.Layout("tokens", grid=(4, 4)))  # what the message says to do
    e = ex.explain(x, [1, 3])
    kept = {}

    def keep(_, __, out):
        out.retain_grad()
        kept["out"] = out

    handle = model.norm2.register_forward_hook(keep)
    try:
        model(x).gather(1, torch.tensor([[1], [3]])).sum().backward()
    finally:
        handle.remove()
    to_map = lambda t: t.reshape(2, 4, 4, -1).permute(0, 3, 1, 2)  # noqa: E731
    A, G = to_map(kept["out"].detach()), to_map(kept["out"].grad)
    expected = torch.relu((G.mean(dim=(2, 3), keepdim=True) * A).sum(dim=1))
    assert_nontrivial(expected, 0.05)
    assert relative_error(e.cam_raw, expected) < 1e-5


class LatentCrossAttention(nn.Module):
    """A Perceiver in small: learned latents attend to the image tokens once, then are pooled. The latent
    tokens come out of an attention: no grid was lost, they are no positions at all."""

    def __init__(self, c=8, latents=6):
        super().__init__()
        self.embed, self.norm, self.latents = nn.Conv2d(3, c, 4, 4), nn.LayerNorm(c), nn.Parameter(torch.randn(1, latents, c))
        self.attend, self.mlp, self.head = nn.MultiheadAttention(c, 2, batch_first=True), nn.Linear(c, c), nn.Linear(c, 5)

    def forward(self, x):
        t = self.norm(self.embed(x).flatten(2).transpose(1, 2))
        latents, _ = self.attend(self.latents.expand(x.shape[0], -1, -1), t, t)
        return self.head(torch.relu(self.mlp(latents)).mean(1))


def test_tokens_an_attention_made_are_not_taken_for_lost_positions():
    torch.manual_seed(0)
    model, x, target = LatentCrossAttention().eval(), image_batch(32), torch.tensor([0, 4])
    ex = gs.convert(model)
    e = ex.explain(x, target)
    assert ex.report.layers["auto"] == "norm"  # the last map of positions: the tokens the latents attend to
    kept = {}

    def keep(_, __, out):
        out.retain_grad()
        kept["out"] = out

    handle = model.norm.register_forward_hook(keep)
    try:
        model(x).gather(1, target.view(-1, 1)).sum().backward()
    finally:
        handle.remove()
    A, G = (t.reshape(2, 8, 8, -1).permute(0, 3, 1, 2) for t in (kept["out"].detach(), kept["out"].grad))
    expected = torch.relu((G.mean(dim=(2, 3), keepdim=True) * A).sum(dim=1))
    assert_nontrivial(expected, 0.05)
    assert relative_error(e.cam_raw, expected) < 1e-5


# --- the run-time path: the same map as the graph paths ----------------------------------------------------

class SharedReLU(nn.Module):
    """One ReLU module called after each convolution: its last call is the last map."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, stride=2), nn.Conv2d(8, 16, 3, stride=2)
        self.relu, self.pool, self.fc = nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.conv2(self.relu(self.conv1(x))))).flatten(1))


def _seresnet():
    monai_nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    return randomise_batchnorm(monai_nets.SENet(2, 3, "se_resnet_bottleneck", [1, 1, 1, 1], groups=1, reduction=4,
                                                inplanes=16, downsample_kernel_size=1, input_3x3=False,
                                                dropout_prob=None, num_classes=5)).eval()


def _timm_mobilenet():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return randomise_batchnorm(timm.create_model("mobilenetv3_small_050", num_classes=5)).eval()


RUNTIME_CASES = {
    # functional pooling (x.mean) in the SE gates and the head, and a 1x1 conv head after the pooling
    "timm mobilenetv3": (_timm_mobilenet, "blocks"),
    # SE gates pooled by nn.AdaptiveAvgPool2d inside each block; the map is after the residual addition
    "monai seresnet": (_seresnet, "layer4"),
    # the map is DenseNet.forward's functional, in-place F.relu after `features`, no module's output
    "densenet": (small_densenet, "relu"),
    # a module called twice: its second call
    "shared relu": (lambda: SharedReLU().eval(), "relu_1"),
}


@pytest.mark.parametrize("case", list(RUNTIME_CASES))
def test_runtime_auto_takes_the_map_the_graph_path_takes(case):
    build, name = RUNTIME_CASES[case]
    model, x = build(), image_batch(64)
    graph = gs.convert(model, capture="fx")
    runtime = gs.convert(model, capture="runtime", example_input=x[:1])
    assert runtime.report.layers["auto"] == name
    assert runtime.report.layer_reasons["auto"].startswith("auto: the last spatial map (")
    target, expected = _lively(graph, x)
    assert relative_error(runtime.explain(x, target).cam_raw, expected) <= 1e-5


def _lively(explainer, x, classes=5):
    """The first class whose Grad-CAM is not mostly zero on both images (random weights), and that map."""
    for cls in range(classes):
        cam = explainer.explain(x, [cls, cls]).cam_raw
        if float((cam != 0).float().mean()) >= 0.25:
            return [cls, cls], cam
    raise AssertionError("every class gives an empty map: the comparison would be vacuous")


def test_runtime_auto_takes_a_swins_last_map_and_refuses_a_vits_tokens():
    torch.manual_seed(0)
    swin = torchvision.models.SwinTransformer([4, 4], 16, [1, 1], [1, 2], [2, 2], num_classes=5).eval()
    x = image_batch(32)
    graph = gs.convert(swin)
    runtime = gs.convert(swin, capture="runtime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no rectifier to swap in a GELU net
        target, expected = _lively(graph, x)
        ours = runtime.explain(x, target).cam_raw
    assert graph.report.layers["auto"] == "norm" and expected.shape == (2, 4, 4)
    assert runtime.report.layers["auto"] == "permute"  # norm's (B, h, w, C) as (B, C, h, w): the same map
    assert relative_error(ours, expected) <= 1e-5
    vit = torchvision.models.VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=5).eval()
    with pytest.raises(gs.LayerError, match=r"(?s)positions reach getitem as a \(1, 17, 16\) tensor.*pass layer=NAME"):
        gs.convert(vit, capture="runtime", example_input=x[:1])
