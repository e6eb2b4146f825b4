"""Hugging Face transformers image classifiers with default arguments: logits read from the ModelOutput,
the guided gradient against the fx-free reference, Grad-CAM at ``auto`` against plain hooks.

Small configs with random weights (no download). fx cannot trace these models, so they go through the
torch.export path; the run-time path and an fx-traceable model returning a ModelOutput are checked too.
"""
import os
import warnings

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import guided_swap as gs  # noqa: E402
from conftest import assert_nontrivial, image_batch, randomise_batchnorm, relative_error  # noqa: E402
from guided_swap.checks import reference  # noqa: E402

SIZE = 64


def channels_first(t):
    return t


def tokens(prefix, grid):
    def to_map(t):
        return t[:, prefix:].reshape(t.shape[0], *grid, t.shape[-1]).permute(0, 3, 1, 2)
    return to_map


def resnet():
    config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                       num_labels=5)
    model = transformers.ResNetForImageClassification(config)
    return model, "resnet.encoder.stages.3", channels_first


def regnet():
    config = transformers.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                       groups_width=8, num_labels=5)
    return transformers.RegNetForImageClassification(config), "regnet.encoder.stages.3", channels_first


def mobilenet_v2():
    config = transformers.MobileNetV2Config(image_size=SIZE, depth_multiplier=0.35, num_labels=5)
    return transformers.MobileNetV2ForImageClassification(config), "mobilenet_v2.conv_1x1", channels_first


def convnext():
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_labels=5)
    return transformers.ConvNextForImageClassification(config), "convnext.encoder.stages.3", channels_first


def vit():
    config = transformers.ViTConfig(image_size=SIZE, patch_size=16, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=5)
    model = transformers.ViTForImageClassification(config)
    last_norm = [name for name, _ in model.named_modules() if name.endswith("layernorm_before")][-1]
    grid = (config.image_size // config.patch_size,) * 2
    return model, last_norm, tokens(1, grid)  # the class token comes first


def swin():
    config = transformers.SwinConfig(image_size=SIZE, patch_size=4, embed_dim=16, depths=[1, 1, 1],
                                     num_heads=[1, 2, 4], window_size=4, num_labels=5)
    grid = (config.image_size // config.patch_size // 2 ** (len(config.depths) - 1),) * 2  # 4x4: the last stage
    return transformers.SwinForImageClassification(config), "swin.layernorm", tokens(0, grid)


def cvt():
    # depth must grow with the stage: transformers indexes each stage's drop-path rates by the stage number
    config = transformers.CvtConfig(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3], num_labels=5)
    size = SIZE
    for k, stride, pad in zip(config.patch_sizes, config.patch_stride, config.patch_padding):
        size = (size + 2 * pad - k) // stride + 1
    model = transformers.CvtForImageClassification(config)
    last_norm = [name for name, _ in model.named_modules() if name.endswith("layernorm_before")][-1]
    return model, last_norm, tokens(1, (size, size))  # the last stage adds a class token, split off for the head


def levit(size=SIZE):
    """LeViT pools by a mean over its tokens; each subsampling attention takes its queries from every other
    token of the grid. At 64 px the grid is 4x4, 2x2, then 1x1: ``auto`` takes the last map larger than 1x1,
    stage 1's, as for a CNN (at 128 px, the last stage's 2x2)."""
    config = transformers.LevitConfig(image_size=size, hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2],
                                      depths=[1, 1, 1], key_dim=[8, 8, 8], num_labels=5)
    model = transformers.LevitForImageClassification(config)
    for name, parameter in model.named_parameters():  # the defaults (weights of std 0.02, attention biases of
        if name.endswith("attention_biases"):         # zero) make every query attend alike: all tokens equal
            nn.init.normal_(parameter, std=2.0)
        elif name.endswith(("linear.weight", "convolution.weight")):
            nn.init.normal_(parameter, std=parameter[0].numel() ** -0.5)
    stages = model.levit.encoder.stages
    stage = max(i for i, s in enumerate(stages) if (stages[i - 1].get_resolution() if i else 0) > 1)
    grid = (stages[stage - 1].get_resolution(),) * 2  # the resolution after the previous stage's subsampling
    return model, f"levit.encoder.stages.{stage}.layers.1", tokens(0, grid)


MODELS = {"resnet": resnet, "regnet": regnet, "mobilenet_v2": mobilenet_v2, "convnext": convnext, "vit": vit,
          "swin": swin, "cvt": cvt, "levit": levit}


def build(name):
    torch.manual_seed(0)
    model, module, to_map = MODELS[name]()
    return randomise_batchnorm(model).eval(), module, to_map


def hooked_gradcam(model, module, x, target, to_map):
    """Grad-CAM from a forward hook on ``module`` and the ordinary backward of ``logits[target]``."""
    A, G = hooked_map(model, module, x, target, to_map)
    return torch.relu((G.mean(dim=(2, 3), keepdim=True) * A).sum(dim=1))


def hooked_map(model, module, x, target, to_map):
    """The activation and gradient at ``module``'s output, (B, C, h, w) by ``to_map``, from a forward hook and
    the ordinary backward of ``logits[target]``."""
    kept = {}

    def keep(_, __, output):
        output.retain_grad()
        kept["output"] = output

    handle = model.get_submodule(module).register_forward_hook(keep)
    try:
        model(x).logits.gather(1, target.view(-1, 1)).sum().backward()
    finally:
        handle.remove()
    return to_map(kept["output"].detach()), to_map(kept["output"].grad)


def quiet_explain(ex, x, target=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a GELU model has no ReLU to swap: tested in test_transformers.py
        return ex.explain(x, target)


@pytest.mark.parametrize("name", list(MODELS))
def test_defaults_read_logits_and_match_the_reference_and_hooks(name):
    model, module, to_map = build(name)
    x = image_batch(SIZE)
    ex = gs.convert(model)  # nothing but the model
    e = quiet_explain(ex, x)
    assert ex.output == "logits" and ex.report.output_by_default
    assert "explains output 'logits' (by default)" in ex.report.summary()
    with torch.no_grad():  # ex(x) is the model's forward (a plain dict, as fx records a ModelOutput)
        assert torch.equal(ex(x)["logits"], model(x).logits)
    logits = model(x.clone().requires_grad_(True)).logits.detach()  # explain runs with autograd on, as here
    assert torch.equal(e.logits, logits) and torch.equal(e.target, logits.argmax(dim=1))
    expected = reference.input_gradient(model, x, e.target, output="logits")
    assert_nontrivial(expected, 0.5)
    assert relative_error(e.gradient, expected) <= 1e-5
    # auto takes the last stage's map (Swin: 4x4 at 64 px, not stage 0's 16x16 inside its patch merging)
    assert ex.report.layers["auto"].startswith(module), ex.report.layers["auto"]
    theirs = hooked_gradcam(model, module, x, e.target, to_map)
    assert_nontrivial(theirs, 0.05)
    assert e.cam_raw.shape == theirs.shape and e.cam_raw.shape[1:] != (1, 1)
    assert relative_error(e.cam_raw, theirs) < 1e-4


def test_swin_auto_is_the_last_stage_not_a_slice_of_the_first_patch_merging():
    model, _, _ = build("swin")
    ex = gs.convert(model)
    quiet_explain(ex, image_batch(SIZE))
    assert ex.report.layers["auto"] == "swin.layernorm"
    layout = ex.report.layouts["auto"]
    assert (layout.kind, layout.grid, layout.prefix) == ("tokens", (4, 4), 0)


def test_levit_auto_follows_the_subsampling_attention_to_the_last_stage():
    """At 128 px LeViT's last stage is 2x2: ``auto`` reads its grid through both subsampling attentions and
    takes its last map, never an attention's query or key-value projection (whose gradient was about 1e-14).
    Its activation and gradient are the hooked ones, reshaped with the stage's resolution."""
    torch.manual_seed(0)
    model, module, to_map = levit(size=128)
    model = randomise_batchnorm(model).eval()
    x = image_batch(128)
    with torch.no_grad():  # LeViT caches its attention biases at its first call in eval mode: not in a graph
        model(x)
    ex = gs.convert(model)
    e = quiet_explain(ex, x)
    assert ex.report.layers["auto"] == "levit.encoder.stages.2.layers.1.add" and module.endswith("stages.2.layers.1")
    layout = ex.report.layouts["auto"]
    assert (layout.kind, layout.grid, layout.prefix) == ("tokens", (2, 2), 0)
    A, G = hooked_map(model, module, x, e.target, to_map)
    assert_nontrivial(G, 0.5)
    assert G.abs().max() > 1e-3
    captured = e.layers["auto"]
    assert relative_error(captured.feature_map, A) < 1e-5 and relative_error(captured.feature_grad, G) < 1e-5


def test_levit_auto_refuses_when_the_grid_is_lost_in_the_subsampling_attention(monkeypatch):
    """A graph reading that cannot follow the attention's products loses the grid after stage 0: ``auto``
    refuses, naming the way out, instead of taking stage 0's 4x4 map (or a projection inside the attention)."""
    from guided_swap.capture.graph import axes

    monkeypatch.setattr(axes.Reader, "_multiplied", lambda self, node: None)
    model, _, _ = build("levit")
    ex = gs.convert(model)
    with pytest.raises(gs.LayerError, match=r"stages\.0\.layers\.1\.add' \(4x4\).*layout=guided_swap\.Layout"):
        quiet_explain(ex, image_batch(SIZE))


@pytest.mark.parametrize("capture", ["export", "runtime"])
def test_every_capture_path_reads_the_logits_by_default(capture):
    model, _, _ = build("resnet")
    x = image_batch(SIZE)
    ex = gs.convert(model, capture=capture)
    e = ex.explain(x, [1, 3])
    assert ex.output == "logits" and "explains output 'logits'" in str(ex.report)
    assert torch.equal(e.logits, model(x.clone().requires_grad_(True)).logits.detach())
    assert relative_error(e.gradient, reference.input_gradient(model, x, [1, 3], output="logits")) <= 1e-5
    assert e.cam_raw.shape == (2, 2, 2)  # the last stage, on the run-time path too (not the 1x1 pooler output)
    explicit = gs.convert(model, capture=capture, output="logits")
    assert torch.equal(explicit.explain(x, [1, 3]).gradient, e.gradient) and not explicit.report.output_by_default


class ModelOutputNet(nn.Module):
    """A model fx traces that returns a Hugging Face ModelOutput (fx records it as a dict)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        features = torch.relu(self.conv(x))
        from transformers.modeling_outputs import ImageClassifierOutput

        return ImageClassifierOutput(logits=self.fc(features.mean(dim=(2, 3))), hidden_states=(features,))


def test_the_fx_path_reads_the_logits_of_a_model_output_by_default():
    torch.manual_seed(0)
    model = ModelOutputNet().eval()
    x = image_batch(16)
    ex = gs.convert(model, layer="conv")
    e = ex.explain(x, [0, 2])
    assert ex.report.capture == "fx" and ex.output == "logits"
    assert torch.equal(e.logits, model(x).logits)
    assert relative_error(e.gradient, reference.input_gradient(model, x, [0, 2], output="logits")) <= 1e-5
    with pytest.raises(gs.OutputError, match="not an entry"):
        gs.convert(model, layer="conv", output="scores")
