"""``explain(x, cams=("scorecam", "ablationcam", "fullgrad"))``: the spelling, every capture path, the cut graphs
against hooked references, and the refusals. (The maps against pytorch-grad-cam: test_pass_cams_vs_pgc.py.)"""
import copy

import pytest
import torch

import guided_swap as gs
from guided_swap.core.pass_cams import PASS_CAMS, ablation_weights, weighted_cam
from conftest import assert_nontrivial, image_batch, make_model, relative_error

PASSES = ("scorecam", "ablationcam", "fullgrad")
PATHS = ("fx", "export", "runtime", "deferred")


@pytest.fixture(scope="module")
def model():
    return make_model("resnet18")


@pytest.fixture(scope="module")
def x():
    return image_batch(32)


def convert(model, path, x, **kwargs):
    if path == "deferred":
        return gs.convert(model, capture="export", **kwargs)
    return gs.convert(model, capture=path, example_input=x[:1], **kwargs)


@pytest.fixture(scope="module")
def explained(model, x):
    return gs.convert(model, layer="layer3").explain(x, [3, 7], cams=PASSES)


def test_the_maps_are_read_like_every_cam(explained):
    e = explained
    assert set(PASSES) <= set(e.cams) and "eigencam" in gs.cam_methods()
    assert e.cams_raw["scorecam"].shape == (2, 2, 2) and e.cams["scorecam"].shape == (2, 32, 32)
    assert e.cams_raw["fullgrad"].shape == (2, 32, 32) and torch.equal(e.cams["fullgrad"], e.cams_raw["fullgrad"])
    for name in PASSES:
        assert (e.cams_raw[name] >= 0).all()
        assert_nontrivial(e.cams_raw[name], 0.25)
        assert torch.equal(e[1].cams_raw[name], e.cams_raw[name][1:]), name
    assert torch.equal(e.to_dict(["cams.ablationcam"])["cams.ablationcam"], e.cams["ablationcam"])
    assert "cams.scorecam" in e.available() and "cams.scorecam" not in e.to_dict()


def test_without_cams_none_is_made(model, x):
    e = gs.convert(model, layer="layer3").explain(x)
    assert not set(PASSES) & set(e.cams)
    with pytest.raises(gs.CamError, match="not a registered CAM"):
        e.cams["scorecam"]


def test_chunks_do_not_change_the_maps(model, x, explained):
    ex = gs.convert(model, layer="layer3")
    small = ex.explain(x, [3, 7], cams=("scorecam", "ablationcam"), chunk=100)  # chunks across samples
    for name in ("scorecam", "ablationcam"):
        assert relative_error(small.cams_raw[name], explained.cams_raw[name]) < 1e-5, name


@pytest.mark.parametrize("path", PATHS[1:])
def test_every_path_gives_the_same_maps_or_refuses_ablation(model, x, path, explained):
    ex = convert(model, path, x, layer="layer3")
    names = ("scorecam", "fullgrad") if path == "runtime" else PASSES
    e = ex.explain(x, [3, 7], cams=names)
    for name in names:
        assert relative_error(e.cams_raw[name], explained.cams_raw[name]) < 1e-5, (path, name)
    if path == "runtime":
        with pytest.raises(gs.CamError, match="Ablation-CAM .* needs the model as a graph"):
            ex.explain(x, [3, 7], cams="ablationcam")


def test_fullgrad_reads_ordinary_gradients_whatever_the_rule(model, x, explained):
    for rule in ("gradient", "deconvnet"):
        e = gs.convert(model, layer="layer3", rule=rule).explain(x, [3, 7], cams="fullgrad")
        assert relative_error(e.cams_raw["fullgrad"], explained.cams_raw["fullgrad"]) < 1e-5, rule


def _hooked_ablation(model, layer, x, targets, rows=256):
    """Ablation-CAM the plain way: copies of the input run through a copy of the model whose forward hook on
    ``layer`` zeroes one channel per copy (every channel of every sample, ``rows`` copies per forward)."""
    reference = copy.deepcopy(model)
    state = {}

    def hook(module, inputs, out):
        if "keep" in state:
            return out * state["keep"]
        state["A"] = out.clone()  # kept before an in-place ReLU after the layer can overwrite it

    reference.get_submodule(layer).register_forward_hook(hook)
    with torch.no_grad():
        original = reference(x).gather(1, targets.view(-1, 1)).squeeze(1)
        A = state["A"]
        batch, channels = A.shape[:2]
        samples = torch.arange(batch).repeat_interleave(channels)
        ablated = torch.empty(batch * channels)
        for start in range(0, batch * channels, rows):
            part = torch.arange(start, min(start + rows, batch * channels))
            keep = torch.ones(part.numel(), channels)
            keep[torch.arange(part.numel()), part % channels] = 0
            state["keep"] = keep.view(part.numel(), channels, 1, 1)
            ablated[part] = reference(x[samples[part]]).gather(1, targets[samples[part]].view(-1, 1)).squeeze(1)
    return weighted_cam(A, ablation_weights(original, ablated.view(batch, channels)))


@pytest.mark.parametrize("path, layer", [("fx", "layer3.0.conv2"), ("export", "layer3.1.bn1")])
def test_ablation_cuts_the_graph_where_a_hook_would_replace_the_output(model, x, path, layer):
    """Inside a block the tail reads the shortcut from before the layer; a BatchNorm's output is signed."""
    targets = torch.tensor([3, 7])
    e = convert(model, path, x, layer=layer).explain(x, targets, cams="ablationcam", chunk=100)
    expected = _hooked_ablation(model, layer, x, targets)
    assert_nontrivial(expected, 0.25)
    assert relative_error(e.cams_raw["ablationcam"], expected) < 1e-4


def test_ablation_behind_relus_of_a_forked_tail_uses_plain_forwards():
    """vgg11's classifier has ReLUs after features.19: the explain graph forks there; the cut runs it plainly."""
    model = make_model("vgg11")
    x = image_batch(32)
    e = gs.convert(model, layer="features.19").explain(x, [1, 2], cams="ablationcam")
    assert gs.convert(model, layer="features.19").report.forked
    expected = _hooked_ablation(model, "features.19", x, torch.tensor([1, 2]))
    assert_nontrivial(expected, 0.25)
    assert relative_error(e.cams_raw["ablationcam"], expected) < 1e-4


def test_the_model_is_left_as_it_was(model, x):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for path in PATHS:
        names = ("scorecam", "fullgrad") if path == "runtime" else ("ablationcam", "fullgrad")
        convert(model, path, x, layer="layer3").explain(x, [3, 7], cams=names)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert not model.training


@pytest.mark.parametrize("cams, settings, error, match", [
    (("scorecam", "gradcam", "nope"), {}, gs.CamError, r"\['nope'\] are not CAMs"),
    (("scorecam",), {"smooth": 2}, ValueError, "not smoothed"),
    (("ablationcam",), {"chunk": 0}, ValueError, "chunk= is how many perturbed copies"),
    ((), {"chunk": 4}, ValueError, "only apply with smooth=N"),
])
def test_settings_that_do_not_fit_are_refused(model, x, cams, settings, error, match):
    with pytest.raises(error, match=match):
        gs.convert(model, layer="layer3").explain(x, cams=cams, **settings)


def test_targets_and_explainers_they_cannot_explain_are_refused(model, x):
    ex = gs.convert(model, layer="layer3")
    with pytest.raises(gs.CamError, match="Channel target explains a layer"):
        ex.explain(x, gs.Channel("layer3", 4), cams="scorecam")
    with pytest.raises(gs.TargetError, match="exactly 0 for sample"):
        ex.explain(x, lambda out: out[:, 0] * 0, cams="ablationcam")
    with pytest.raises(gs.LayerError, match="needs a captured layer"):
        gs.convert(model, layer=None).explain(x, cams="fullgrad")


def test_options_on_score_and_ablation_cam_read_their_channel_weights(explained):
    """signed=, per_channel= and eigen_smooth= apply to w_k A_k, with the weights w_k the passes computed."""
    maps = explained.layers["layer3"]
    for name in ("scorecam", "ablationcam"):
        per_channel = maps.cam_map(name, signed=True, per_channel=True)
        assert per_channel.shape == maps.feature_map.shape and per_channel.dtype == torch.float32
        assert torch.allclose(torch.relu(per_channel.sum(dim=1)), maps.cams_raw[name], atol=1e-6), name
        assert torch.allclose(maps.cam_map(name, signed=True), per_channel.sum(dim=1), atol=1e-6), name
        assert torch.equal(maps.cam_map(name, per_channel=True), torch.relu(per_channel)), name
        smoothed = maps.cam_map(name, eigen_smooth=True, resize=True)
        assert smoothed.shape == (2, 32, 32) and (smoothed >= 0).all()
        assert torch.equal(explained[1].cam_map(name, signed=True), maps.cam_map(name, signed=True)[1:]), name
        assert explained.fused(name, eigen_smooth=True).shape == (2, 32, 32)
    with pytest.raises(gs.CamError, match="no channel"):
        maps.cam_map("scorecam", per_channel=True, eigen_smooth=True)


def test_options_on_fullgrad_and_on_pass_cams_not_made_are_refused(model, x, explained):
    for options in ({"signed": True}, {"per_channel": True}, {"eigen_smooth": True}):
        with pytest.raises(gs.CamError, match="FullGrad .* no weighted activations"):
            explained.cam_map("fullgrad", **options)
    with pytest.raises(gs.CamError, match="FullGrad"):
        explained.fused("fullgrad", eigen_smooth=True)
    assert explained.fused("fullgrad").shape == (2, 32, 32)
    plain = gs.convert(model, layer="layer3").explain(x, [3, 7])
    with pytest.raises(gs.CamError, match=r"cams=\('scorecam',\)"):
        plain.cam_map("scorecam", signed=True)


def test_pass_cam_names_are_exported():
    assert PASS_CAMS == PASSES
