"""CAM options (signed, per channel, eigen_smooth), min-max scaling and fusion as pure functions; FinerCAM's score."""
import pytest
import torch

import guided_swap as gs
from guided_swap.core import cam, cam_options
from guided_swap.core.maps import Explanation, LayerMaps

WEIGHTED = [name for name in cam.BUILT_IN if name not in cam.ALWAYS_EIGEN]


@pytest.fixture
def AG():
    torch.manual_seed(0)
    return torch.randn(3, 6, 4, 5), torch.randn(3, 6, 4, 5)  # signed activations: every option changes something


def test_no_option_is_the_registered_map(AG):
    for name in gs.cam_methods():
        assert torch.equal(cam_options.cam_map(name, *AG), cam.compute(name, *AG)), name


@pytest.mark.parametrize("name", WEIGHTED)
def test_signed_per_channel_and_their_relus(AG, name):
    signed_channels = cam_options.cam_map(name, *AG, signed=True, per_channel=True)
    signed = cam_options.cam_map(name, *AG, signed=True)
    assert signed_channels.shape == AG[0].shape and signed.shape == (3, 4, 5)
    assert torch.allclose(signed_channels.sum(dim=1), signed, atol=1e-6)
    assert torch.equal(torch.relu(signed), cam.compute(name, *AG))
    assert torch.equal(cam_options.cam_map(name, *AG, per_channel=True), torch.relu(signed_channels))
    if name != "elementwise":  # a sum of ReLUs has no sign
        assert bool((signed < 0).any())


def test_gradcam_per_channel_is_the_weighted_activation(AG):
    A, G = AG
    expected = G.mean(dim=(2, 3), keepdim=True) * A
    assert torch.allclose(cam_options.cam_map("gradcam", A, G, signed=True, per_channel=True), expected)


@pytest.mark.parametrize("name", WEIGHTED)
def test_eigen_smooth_is_the_principal_component_of_the_weighted_activations(AG, name):
    weighted = cam.WEIGHTED[name](*AG)
    signed = cam_options.cam_map(name, *AG, eigen_smooth=True, signed=True)
    assert torch.equal(signed, cam.principal_component(weighted))
    assert torch.equal(cam_options.cam_map(name, *AG, eigen_smooth=True), torch.relu(signed))
    centred = weighted.flatten(2) - weighted.flatten(2).mean(dim=2, keepdim=True)
    assert bool(((signed.flatten(1) * centred.sum(dim=1)).sum(dim=1) >= 0).all())  # the documented sign
    assert torch.equal(cam_options.cam_map("hirescam", *AG, eigen_smooth=True), cam.compute("eigengradcam", *AG))


def test_options_that_do_not_apply_are_refused(AG):
    with pytest.raises(gs.CamError, match="principal component"):
        cam_options.cam_map("gradcam", *AG, per_channel=True, eigen_smooth=True)
    with pytest.raises(gs.CamError, match="principal component"):
        cam_options.cam_map("eigengradcam", *AG, per_channel=True)
    with pytest.raises(TypeError, match="signed= is True or False"):
        cam_options.cam_map("gradcam", *AG, signed=1)
    with pytest.raises(gs.CamError, match="not a registered CAM"):
        cam_options.cam_map("nope", *AG, signed=True)
    gs.register_cam("test-norm", lambda A, G: G.norm(dim=1))
    try:
        assert cam_options.cam_map("test-norm", *AG).shape == (3, 4, 5)
        with pytest.raises(gs.CamError, match="weighted activations"):
            cam_options.cam_map("test-norm", *AG, signed=True)
    finally:
        gs.unregister_cam("test-norm")


def test_min_max_and_fusion_by_hand():
    maps = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])
    assert torch.allclose(cam_options.min_max(maps), maps / (4 + 1e-7))
    assert torch.equal(cam_options.min_max(torch.full((1, 2, 2), 3.0)), torch.zeros(1, 2, 2))
    a, b = torch.tensor([[[0.0, 2.0, 4.0]]]), torch.tensor([[[1.0, 1.0, 3.0]]])
    mean = cam_options.fuse([a, b], (1, 3), "mean")
    assert torch.allclose(mean, cam_options.min_max(torch.tensor([[[0.0, 0.5, 2.0]]]) / 2), atol=1e-6)
    product = cam_options.fuse([a, b], (1, 3), "product")
    assert torch.allclose(product, torch.tensor([[[0.0, 0.0, 1.0]]]), atol=1e-6)
    assert cam_options.fuse([a, torch.tensor([[[1.0]]])], (1, 3), "mean").shape == (1, 1, 3)  # resized first
    with pytest.raises(ValueError, match="how="):
        cam_options.fuse([a], (1, 3), "max")
    with pytest.raises(ValueError, match="at least one layer"):
        cam_options.fuse([], (1, 3))


def _explanation(A, G):
    return Explanation(logits=torch.zeros(3, 4), target=None, score=torch.zeros(3), gradient=torch.zeros(3, 3, 8, 10),
                       layers={"a": LayerMaps(A, G, (8, 10)), "b": LayerMaps(A[..., :2, :2], G[..., :2, :2], (8, 10))})


def test_explanation_methods(AG):
    e = _explanation(*AG)
    assert torch.equal(e.cam_map(), e.cams_raw["gradcam"])
    assert torch.equal(e.cam_map("layercam", resize=True), e.cams["layercam"])
    assert torch.equal(e.cam_map("gradcam", layer="b", signed=True),
                       cam_options.cam_map("gradcam", *e.layers["b"]._feature, signed=True))
    channels = e.cam_map("gradcam", signed=True, per_channel=True, resize=True)
    assert channels.shape == (3, 6, 8, 10)
    assert torch.allclose(channels[:, 2], cam.upsample(e.cam_map(signed=True, per_channel=True)[:, 2], (8, 10)))
    fused = e.fused("gradcam++")
    assert fused.shape == (3, 8, 10)
    assert torch.equal(fused, cam_options.fuse([e.layers["a"].cams_raw["gradcam++"],
                                                e.layers["b"].cams_raw["gradcam++"]], (8, 10)))
    assert torch.equal(e.fused("gradcam", "b"), e.fused("gradcam", ["b"]))
    with pytest.raises(gs.LayerError, match="not captured"):
        e.cam_map(layer="c")
    with pytest.raises(gs.LayerError, match="at least one layer"):
        e.fused(layers=[])
    with pytest.raises(TypeError, match="resize="):
        e.cam_map(resize="yes")


def test_a_smoothed_explanation_has_no_options(AG):
    A, G = AG
    means = {"gradcam": torch.rand(3, 4, 5)}
    e = Explanation(torch.zeros(3, 4), None, torch.zeros(3), torch.zeros(3, 3, 8, 10),
                    {"a": LayerMaps(A, G, (8, 10), fixed_cams=means)})
    assert e.cam_map() is means["gradcam"]
    assert e.fused().shape == (3, 8, 10)
    with pytest.raises(gs.CamError, match="smoothed explanation"):
        e.cam_map(signed=True)
    with pytest.raises(gs.CamError, match="smoothed explanation"):
        e.fused(eigen_smooth=True)


# --- FinerCAM's score ------------------------------------------------------------------------------------------

def test_finer_score_by_hand():
    logits = torch.tensor([[4.0, 3.5, 0.0, 3.9], [0.0, 1.0, 2.0, 9.0]], requires_grad=True)
    score, main = gs.Finer()(logits, {}, 2)
    assert main.tolist() == [0, 3]
    p = logits.softmax(dim=1)
    first = (p[0, 3] * (4.0 - 3.9) + p[0, 1] * (4.0 - 3.5) + p[0, 2] * (4.0 - 0.0)) / (p[0, [3, 1, 2]].sum() + 1e-9)
    assert torch.allclose(score[0], first)
    targeted, main = gs.Finer(target=[1, 1], alpha=0.5, compare=(1,))(logits, {}, 2)
    assert main.tolist() == [1, 1]
    assert torch.allclose(targeted[0], logits[0, 1] - 0.5 * logits[0, 3])  # class 3 is nearest to 3.5
    score.sum().backward()  # the softmax weights are part of the score
    assert logits.grad is not None and bool((logits.grad != 0).all())


def test_finer_settings_are_checked():
    with pytest.raises(TypeError, match="alpha="):
        gs.Finer(alpha=True)
    with pytest.raises(TypeError, match="compare="):
        gs.Finer(compare=(1, -2))
    with pytest.raises(TypeError, match="compare="):
        gs.Finer(compare=())
    with pytest.raises(gs.TargetError, match="rank 5"):
        gs.Finer(compare=(5,))(torch.randn(2, 4), {}, 2)
    score, _ = gs.Finer()(torch.tensor([[1.0, 2.0]]), {}, 1)  # two classes: the default compares with the other one
    assert score.shape == (1,)
    with pytest.raises(gs.TargetError, match="K >= 2"):
        gs.Finer()(torch.randn(2, 1), {}, 2)


def test_finer_on_a_detector_says_it_needs_class_scores():
    """A detector's list of dicts has no class scores to compare: a TargetError, as for an int target, not the
    OutputError suggesting output=KEY (no key of a detection holds (B, K) logits)."""
    detections = [{"boxes": torch.zeros(1, 4), "labels": torch.tensor([1]), "scores": torch.tensor([0.9])}] * 2
    with pytest.raises(gs.TargetError, match="FinerCAM compares a model's class scores.*list.*Box"):
        gs.Finer()(detections, {}, 2)
