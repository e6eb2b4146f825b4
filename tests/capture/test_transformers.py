"""Transformers: token (B, N, C) and channels-last captures read from the graph, against plain-hook references."""
import warnings

import pytest
import timm
import torch
import torchvision

import guided_swap as gs
from conftest import assert_nontrivial, image_batch, relative_error


def hooked_gradcam(model, modules, x, target, to_map):
    """Grad-CAM the usual way: forward hooks keep each module's output, the ordinary backward of the target
    score fills their .grad, and ``to_map`` (written from the model's own attributes) reshapes both."""
    kept, handles = {}, []
    for name, module in modules.items():
        def keep(_, __, output, name=name):
            output.retain_grad()
            kept[name] = output
        handles.append(module.register_forward_hook(keep))
    try:
        logits = model(x)
        logits.gather(1, target.view(-1, 1)).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    maps = {}
    for name, output in kept.items():
        A, G = to_map(output.detach()), to_map(output.grad)
        weights = G.mean(dim=tuple(range(2, G.dim())), keepdim=True)
        maps[name] = torch.relu((weights * A).sum(dim=1))
    return maps


def tokens_to_map(prefix, grid):
    def to_map(t):
        return t[:, prefix:].reshape(t.shape[0], *grid, t.shape[-1]).permute(0, 3, 1, 2)
    return to_map


def nhwc_to_map(t):
    return t.permute(0, 3, 1, 2)


def _quiet_explain(explainer, x, target):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-rectifier warning; tested on its own below
        return explainer.explain(x, target)


def _compare(e, references, names):
    for ours, theirs in names.items():
        expected = references[theirs]
        assert_nontrivial(expected, 0.05)
        assert e.layers[ours].cam_raw.shape == expected.shape
        assert relative_error(e.layers[ours].cam_raw, expected) < 1e-4, ours


def test_torchvision_vit_b_16_class_token():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16().eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision initialises the head to zeros
    x, target = image_batch(224, names=("chelsea",)), torch.tensor([3])
    layer = "encoder.layers.encoder_layer_11.ln_1"
    ex = gs.convert(model, layer=["auto", layer])
    e = _quiet_explain(ex, x, target)
    assert ex.report.layers["auto"] == layer  # the input of the last attention: its patch tokens reach the class token
    grid = (model.image_size // model.patch_size,) * 2
    layout = ex.report.layouts[layer]
    assert (layout.kind, layout.grid, layout.prefix) == ("tokens", grid, 1)
    references = hooked_gradcam(model, {layer: model.get_submodule(layer)}, x, target, tokens_to_map(1, grid))
    _compare(e, references, {layer: layer, "auto": layer})
    assert e.cam.shape == (1, 224, 224) and "tokens (B, N, C): 1 prefix + 14x14 patches" in ex.report.summary()
    # nothing is swapped in a GELU net: the gradient is the plain one, Guided Grad-CAM is Grad-CAM times it
    leaf = x.clone().requires_grad_(True)
    model(leaf)[0, 3].backward()
    assert relative_error(e.gradient, leaf.grad) < 1e-5
    assert torch.equal(e.guided_gradcam, e.cam.unsqueeze(1) * e.gradient)


def test_torchvision_swin_t_channels_last():
    torch.manual_seed(0)
    model = torchvision.models.swin_t().eval()
    x, target = image_batch(96), torch.tensor([3, 7])
    ex = gs.convert(model, layer=["auto", "features.7.1.norm1"])
    e = _quiet_explain(ex, x, target)
    assert ex.report.layers["auto"] == "norm"  # the last stage's map, before the pooling
    assert ex.report.layouts["features.7.1.norm1"].kind == "nhwc" and ex.report.layouts["auto"].kind == "nhwc"
    references = hooked_gradcam(model, {"norm": model.norm, "block": model.features[7][1].norm1}, x, target,
                                nhwc_to_map)
    _compare(e, references, {"features.7.1.norm1": "block", "auto": "norm"})
    assert e.cam_raw.shape == (2, 3, 3) and e.cam.shape == (2, 96, 96)


@pytest.mark.parametrize("name, prefix", [("vit_tiny_patch16_224", 1), ("deit_tiny_distilled_patch16_224", 2)])
def test_timm_vits_read_grid_and_prefix_tokens_from_the_graph(name, prefix):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x, target = image_batch(224, names=("astronaut",)), torch.tensor([5])
    ex = gs.convert(model, layer=["auto", "blocks.11.norm1"])
    e = _quiet_explain(ex, x, target)
    layout = ex.report.layouts["blocks.11.norm1"]
    assert layout.grid == tuple(model.patch_embed.grid_size) and layout.prefix == model.num_prefix_tokens == prefix
    assert ex.report.layers["auto"] == ex.report.layers["blocks.11.norm1"]
    references = hooked_gradcam(model, {"norm1": model.blocks[11].norm1}, x, target,
                                tokens_to_map(model.num_prefix_tokens, tuple(model.patch_embed.grid_size)))
    _compare(e, references, {"blocks.11.norm1": "norm1", "auto": "norm1"})
    if prefix == 2:  # a named layer alone: read at convert time, on a zero 224-pixel stand-in
        named = gs.convert(model, layer="blocks.11.norm1")
        assert named.report.layouts["blocks.11.norm1"] == layout


@pytest.fixture(scope="module")
def small_vit():
    """A timm ViT on a 64x96 input: 1 class token + a 4x6 grid = 25 tokens, a square number that is no 5x5 grid."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=(64, 96), depth=2).eval()
    x = torch.nn.functional.interpolate(image_batch(96), size=(64, 96), mode="bilinear")
    return model, x, torch.tensor([1, 2])


def test_a_non_square_grid_is_read_not_guessed(small_vit):
    model, x, target = small_vit
    ex = gs.convert(model, layer="blocks.1.norm1")
    e = _quiet_explain(ex, x, target)
    assert ex.report.layouts["blocks.1.norm1"].grid == (4, 6)
    references = hooked_gradcam(model, {"n": model.blocks[1].norm1}, x, target, tokens_to_map(1, (4, 6)))
    _compare(e, references, {"blocks.1.norm1": "n"})
    assert e.cam.shape == (2, 64, 96)


def test_register_tokens_and_average_pooling():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, reg_tokens=4, class_token=False,
                              global_pool="avg").eval()
    x, target = image_batch(64), torch.tensor([1, 2])
    ex = gs.convert(model)  # auto: pooled, so the last map of positions
    e = _quiet_explain(ex, x, target)
    assert ex.report.layers["auto"] == "norm.layer_norm" or ex.report.layers["auto"] == "norm"
    assert ex.report.layouts["auto"].prefix == model.num_prefix_tokens == 4
    references = hooked_gradcam(model, {"norm": model.norm}, x, target, tokens_to_map(4, (4, 4)))
    _compare(e, references, {"auto": "norm"})


def test_overrides_and_what_cannot_be_read(small_vit):
    model, x, target = small_vit
    auto = _quiet_explain(gs.convert(model, layer="blocks.1.norm1"), x, target)
    by_hand = gs.convert(model, layer="blocks.1.norm1", reshape=tokens_to_map(1, (4, 6)))
    assert torch.equal(_quiet_explain(by_hand, x, target).cam_raw, auto.cam_raw)
    given = gs.convert(model, layer="blocks.1.norm1", layout=gs.Layout("tokens", grid=(4, 6), prefix=1))
    assert torch.equal(_quiet_explain(given, x, target).cam_raw, auto.cam_raw)
    named = gs.convert(model, layer="blocks.1.norm1", layout="tokens", example_input=x)  # grid and prefix: graph
    assert named.report.layouts["blocks.1.norm1"].grid == (4, 6)
    # inside the attention the heads split the channels: no map, a clear error, the gradient still there
    odd = gs.convert(model, layer="blocks.1.attn.reshape")
    e = _quiet_explain(odd, x, target)
    assert odd.report.layouts["blocks.1.attn.reshape"].kind == "unknown"
    with pytest.raises(gs.LayerError, match="layout guided_swap cannot read.*reshape=fn"):
        e.cam
    assert torch.equal(e.gradient, auto.gradient)
    with pytest.raises(ValueError, match="not one of"):
        gs.convert(model, layer="blocks.1.norm1", layout="hwc")
    with pytest.raises(ValueError, match="both layout= and reshape="):
        gs.convert(model, layer="blocks.1.norm1", layout="tokens", reshape=lambda t: t)
    with pytest.raises(ValueError, match="not among the captured layers"):
        gs.convert(model, layer="blocks.1.norm1", layout={"blocks.0.norm1": "tokens"})
    broken = gs.convert(model, layer="blocks.1.norm1", reshape=lambda t: t.flatten(1))
    with pytest.raises(gs.LayerError, match=r"must return \(B, C, \*spatial\)"):
        _quiet_explain(broken, x, target).cam


def test_no_rectifier_warns_once_and_names_what_was_left_alone(small_vit):
    model, x, target = small_vit
    ex = gs.convert(model, layer="blocks.1.norm1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ex.explain(x, target)
        ex.explain(x, target)
    messages = [str(w.message) for w in caught if "no ReLU" in str(w.message)]
    assert len(messages) == 1
    assert "plain gradient" in messages[0] and "2 x nn.GELU" in messages[0] and "blocks.0.mlp.act" in messages[0]
    ordinary = gs.convert(model, layer="blocks.1.norm1", rule="gradient")
    relu_net = gs.convert(torchvision.models.resnet18().eval(), layer="layer4")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ordinary.explain(x, target)
        relu_net.explain(image_batch(64))


def test_a_cnn_captured_through_export_is_read_channels_first():
    """The export path's graph holds aten overloads (aten.conv2d.default); its layouts are read like fx's."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(inplace=True),
                                torch.nn.Conv2d(8, 8, 3), torch.nn.ReLU6(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    x = image_batch(16)
    by_export = gs.convert(model, layer="3", capture="export", example_input=x[:1])
    by_fx = gs.convert(model, layer="3", capture="fx")
    assert by_export.report.layouts["3"].kind == "nchw"
    assert torch.equal(by_export.explain(x, 1).cam_raw, by_fx.explain(x, 1).cam_raw)


def test_a_hybrid_vit_through_export_reads_its_class_token():
    """timm's ResNet-stem ViTs go through export (fx fails on TF padding), where ``x[:, 0]`` is aten.select:
    auto must still find the class-token read and take the last attention's input, not a map with no gradient."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_r_s16_p8_224").eval()
    x, target = image_batch(224, names=("chelsea",)), torch.tensor([3])
    ex = gs.convert(model)
    e = _quiet_explain(ex, x, target)
    assert ex.report.capture.startswith("export"), ex.report.capture
    assert ex.report.layers["auto"].startswith("blocks.11.norm1")
    layout = ex.report.layouts["auto"]
    assert (layout.kind, layout.grid, layout.prefix) == ("tokens", (7, 7), 1)
    references = hooked_gradcam(model, {"norm1": model.blocks[11].norm1}, x, target, tokens_to_map(1, (7, 7)))
    assert_nontrivial(references["norm1"], 0.05)
    assert relative_error(e.cam_raw, references["norm1"]) < 1e-4


class UnrolledBlocks(torch.nn.Module):
    """Hiera's unroll in small: a channels-last map cut into 2 x 2 blocks, (B, h, 2, w, 2, C), then normed."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)
        b, h, w, c = x.shape
        x = self.norm(x.view(b, h // 2, 2, w // 2, 2, c))
        return self.head(x.mean(dim=(1, 2, 3, 4)))


def test_auto_never_takes_a_map_with_more_spatial_axes_than_the_input():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    ex = gs.convert(UnrolledBlocks().eval())
    e = ex.explain(x)
    assert ex.report.layers["auto"] == "embed" or ex.report.layers["auto"].startswith("permute")
    assert e.layers["auto"].feature_map.shape == (2, 8, 8, 8) and e.cam.shape == (2, 32, 32)


class SplitClassToken(torch.nn.Module):
    """A two-block ViT that splits its class token off with ``torch.split`` (as CvT does) for the head."""

    def __init__(self, dim=16):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, dim, 8, 8)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = torch.nn.ModuleList(torchvision.models.vision_transformer.EncoderBlock(2, dim, 32, 0.0, 0.0)
                                          for _ in range(2))
        self.head = torch.nn.Linear(dim, 4)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1)
        for block in self.blocks:
            t = block(t)
        cls, _patches = torch.split(t, [1, t.shape[1] - 1], dim=1)
        return self.head(cls.squeeze(1))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_class_token_split_off_is_read_as_one(capture):
    # The patch tokens after the last attention never reach the split-off class token: auto must take the
    # last attention's input (its norm), whose Grad-CAM the hooks give, not the last block's output.
    torch.manual_seed(0)
    model, x, target = SplitClassToken().eval(), image_batch(32), torch.tensor([1, 2])
    ex = gs.convert(model, capture=capture, example_input=x)
    assert ex.report.layers["auto"] == "blocks.1.ln_1"
    e = _quiet_explain(ex, x, target)
    references = hooked_gradcam(model, {"blocks.1.ln_1": model.blocks[1].ln_1}, x, target, tokens_to_map(1, (4, 4)))
    _compare(e, references, {"auto": "blocks.1.ln_1"})


class ClassAttentionHead(torch.nn.Module):
    """A ViT block, then a CaiT/VOLO class-attention block (only the class token is updated, from all tokens;
    the patches pass on beside it) and a head on the class token and the mean patch token."""

    def __init__(self, dim=16):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, dim, 8, 8)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.block = torchvision.models.vision_transformer.EncoderBlock(2, dim, 32, 0.0, 0.0)
        self.norm, self.attn = torch.nn.LayerNorm(dim), torch.nn.MultiheadAttention(dim, 2, batch_first=True)
        self.head, self.aux = torch.nn.Linear(dim, 4), torch.nn.Linear(dim, 4)
        self.keep = None  # a list: the plain-autograd reference keeps the last token map there

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = self.block(torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1))
        normed = self.norm(t)
        cls = t[:, :1] + self.attn(normed[:, :1], normed, normed)[0]   # the class token's slice: not the head's read
        t = torch.cat([cls, t[:, 1:]], dim=1)
        if self.keep is not None:
            t.retain_grad()
            self.keep.append(t)
        return self.head(t[:, 0]) + self.aux(t[:, 1:].mean(1))


def test_a_class_attention_slice_is_not_taken_for_the_heads_read():
    # The last slice of the class token feeds a class attention whose token map also goes, whole, into the
    # attention: taken for the head's read, auto would take that attention's input (norm), whose gradient
    # misses the patches the aux head reads. The last token map is the concatenation after the class attention.
    torch.manual_seed(0)
    model, x, target = ClassAttentionHead().eval(), image_batch(32), torch.tensor([1, 2])
    ex = gs.convert(model)
    e = _quiet_explain(ex, x, target)
    assert ex.report.layers["auto"] == "cat_1"
    model.keep = kept = []
    model(x).gather(1, target.view(-1, 1)).sum().backward()
    to_map = tokens_to_map(1, (4, 4))
    A, G = to_map(kept[0].detach()), to_map(kept[0].grad)
    expected = torch.relu((G.mean(dim=(2, 3), keepdim=True) * A).sum(dim=1))
    assert_nontrivial(expected, 0.05)
    assert relative_error(e.cam_raw, expected) < 1e-4


# --- the run-time path: no graph to read, the same maps -----------------------------------------------------

def _tiny_vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=5).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision initialises the head to zeros
    return model


def test_the_runtime_path_reads_tokens_and_channels_last_as_the_graph_does(small_vit):
    vit, x = _tiny_vit(), image_batch(32)
    layer = "encoder.layers.encoder_layer_1.ln_1"
    expected = _quiet_explain(gs.convert(vit, layer=layer), x, torch.tensor([1, 2])).cam_raw
    vit.encoder.register_forward_hook(lambda module, inputs, output: None)  # a side effect: fx would skip it
    ex = gs.convert(vit, layer=layer)
    e = _quiet_explain(ex, x, torch.tensor([1, 2]))
    assert ex.report.capture.startswith("runtime") and "1 prefix + 4x4 patches" in ex.report.summary()
    assert_nontrivial(expected, 0.25)
    assert e.cam_raw.shape == (2, 4, 4) and relative_error(e.cam_raw, expected) < 1e-5
    # a non-square grid, read from the patch embedding's output: 25 tokens are 1 + 4x6, not 5x5
    model, x, target = small_vit
    e = _quiet_explain(gs.convert(model, layer="blocks.1.norm1", capture="runtime"), x, target)
    references = hooked_gradcam(model, {"n": model.blocks[1].norm1}, x, target, tokens_to_map(1, (4, 6)))
    _compare(e, references, {"blocks.1.norm1": "n"})
    torch.manual_seed(0)
    swin = torchvision.models.SwinTransformer([4, 4], 16, [1, 1], [1, 2], [2, 2], num_classes=5).eval()
    x, target = image_batch(32), torch.tensor([0, 3])
    graph = gs.convert(swin, layer="norm")
    runtime = gs.convert(swin, layer="norm", capture="runtime", example_input=x[:1])
    assert runtime.report.layouts["norm"].kind == "nhwc"  # read at convert, from the example
    expected = _quiet_explain(graph, x, target).cam_raw
    assert_nontrivial(expected, 0.25)
    assert relative_error(_quiet_explain(runtime, x, target).cam_raw, expected) < 1e-5


def test_the_runtime_path_takes_layout_and_reshape():
    vit, x, target = _tiny_vit(), image_batch(32), torch.tensor([1, 2])
    layer = "encoder.layers.encoder_layer_1.ln_1"
    expected = _quiet_explain(gs.convert(vit, layer=layer), x, target).cam_raw
    given = {"layout": gs.Layout("tokens", grid=(4, 4), prefix=1), "reshape": tokens_to_map(1, (4, 4)),
             "layout='tokens'": "tokens"}
    for what, value in given.items():
        keyword = "reshape" if what == "reshape" else "layout"
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no "graph captures only" warning
            ex = gs.convert(vit, layer=layer, capture="runtime", **{keyword: value})
        assert relative_error(_quiet_explain(ex, x, target).cam_raw, expected) < 1e-5, what
    ex = gs.convert_runtime(vit, layer=layer, layout="nchw")  # what the user says is what is done
    assert _quiet_explain(ex, x, target).cam_raw.shape == (2, 16)  # (B, N=17, C=16) read as (B, C, L)


class LinearPatches(torch.nn.Module):
    """Patches cut by F.unfold and embedded by a linear layer: tokens with no convolution to give their grid."""

    def __init__(self, c=16):
        super().__init__()
        self.embed, self.norm, self.head = torch.nn.Linear(3 * 64, c), torch.nn.LayerNorm(c), torch.nn.Linear(c, 5)

    def forward(self, x):
        tokens = torch.nn.functional.unfold(x, 8, stride=8).transpose(1, 2)
        return self.head(torch.relu(self.norm(self.embed(tokens))).mean(1))


def test_a_runtime_capture_whose_layout_cannot_be_read_is_refused_not_read_channels_first():
    torch.manual_seed(0)
    model, x, target = LinearPatches().eval(), image_batch(32), torch.tensor([1, 2])
    ex = gs.convert(model, layer="norm", capture="runtime")
    e = ex.explain(x, target)
    assert ex.report.layouts["norm"].kind == "unknown" and "fit no grid" in ex.report.layouts["norm"].reason
    with pytest.raises(gs.LayerError, match=r"\(2, 16, 16\).*layout='tokens'.*reshape=fn"):
        e.cam_raw
    assert e.gradient.shape == x.shape  # the gradient is still there
    layout = gs.Layout("tokens", grid=(4, 4))
    expected = gs.convert(model, layer="norm", layout=layout).explain(x, target).cam_raw
    assert_nontrivial(expected, 0.25)
    ours = gs.convert(model, layer="norm", capture="runtime", layout=layout).explain(x, target).cam_raw
    assert relative_error(ours, expected) < 1e-5
