"""SmoothGrad in one call: the same noise gives Captum's NoiseTunnel(GuidedBackprop); what is averaged."""
import warnings

import pytest
import torch
from torchvision.models import detection

import guided_swap as gs
from guided_swap import convert_runtime

from conftest import MEAN, STD, assert_nontrivial, image_batch, make_model, randomise_batchnorm, relative_error

captum_attr = pytest.importorskip("captum.attr")

COPIES, NOISE, SEED = 4, 0.2, 7


@pytest.fixture(scope="module")
def setup():
    model = make_model("resnet18")
    x = image_batch(64)
    explainer = gs.convert(model, layer="layer4")
    return model, explainer, x, torch.tensor([1, 2])


def the_noise(x, copies, noise, seed):
    """The documented draw: copy by copy, sample-major, torch.randn(x.shape[1:]) from the generator, scaled by
    noise * (max - min) of each input."""
    generator = torch.Generator().manual_seed(seed)
    sigma = noise * (x.flatten(1).amax(dim=1) - x.flatten(1).amin(dim=1))
    eps = torch.stack([torch.randn(x.shape[1:], generator=generator) for _ in range(x.shape[0] * copies)])
    return sigma.repeat_interleave(copies).view(-1, 1, 1, 1) * eps


def test_equals_captum_noise_tunnel_with_the_same_noise(setup, monkeypatch):
    model, explainer, x, target = setup
    e = explainer.explain(x, target, smooth=COPIES, noise=NOISE, generator=torch.Generator().manual_seed(SEED))
    noise = the_noise(x, COPIES, NOISE, SEED)
    # Captum draws its noise with torch.normal inside _add_noise_to_input: hand it ours instead
    monkeypatch.setattr(captum_attr.NoiseTunnel, "_add_noise_to_input",
                        staticmethod(lambda input, stdev, n: input.repeat_interleave(n, dim=0) + noise))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = captum_attr.NoiseTunnel(captum_attr.GuidedBackprop(model)).attribute(
            x, nt_type="smoothgrad", nt_samples=COPIES, stdevs=1.0, target=target)
    assert_nontrivial(expected)
    assert relative_error(e.gradient, expected) <= 1e-5
    plain = explainer.explain(x, target)
    assert relative_error(e.gradient, plain.gradient) > 0.05  # the noise did something


def _captum_noise_tunnel(model, x, target, copies, eps, monkeypatch, **kwargs):
    """Captum's NoiseTunnel(GuidedBackprop) with our noise draws ``eps`` (unit normal, sample-major) scaled by
    the standard deviation Captum is given (its stdevs=) instead of its own torch.normal draw."""
    monkeypatch.setattr(captum_attr.NoiseTunnel, "_add_noise_to_input",
                        staticmethod(lambda input, stdev, n: input.repeat_interleave(n, dim=0) + stdev * eps))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return captum_attr.NoiseTunnel(captum_attr.GuidedBackprop(model)).attribute(
            x, nt_samples=copies, target=target, **kwargs)


VARIANT_CASES = [  # (model, image size, batch, smooth_type, absolute noise): other models and batch sizes too
    pytest.param(("resnet18", 64, 1, "vargrad", False), id="resnet18-batch1-vargrad"),
    pytest.param(("resnet18", 64, 1, "smoothgrad_sq", True), id="resnet18-batch1-smoothgrad_sq-absolute"),
    pytest.param(("resnet18", 64, 2, "smoothgrad", True), id="resnet18-batch2-smoothgrad-absolute"),
    pytest.param(("vgg11", 32, 3, "vargrad", True), id="vgg11-batch3-vargrad-absolute"),
    pytest.param(("vgg11", 32, 3, "smoothgrad_sq", False), id="vgg11-batch3-smoothgrad_sq"),
]


@pytest.fixture(scope="module")
def models():
    return {}


@pytest.mark.parametrize("case", VARIANT_CASES)
def test_smoothing_variants_equal_captum_noise_tunnel(case, models, monkeypatch):
    name, size, batch, smooth_type, absolute = case
    if name not in models:
        models[name] = make_model(name)
    model = models[name]
    x = image_batch(size, names=("chelsea", "astronaut", "coffee")[:batch])
    target = torch.tensor([1, 2, 3][:batch])
    generator = torch.Generator().manual_seed(SEED)
    unit = torch.stack([torch.randn(x.shape[1:], generator=generator) for _ in range(batch * COPIES)])
    if absolute:  # Captum's stdevs is one standard deviation in the input's units: the same as noise_absolute
        options, stdev, captum_stdevs = {"noise_absolute": 0.3}, 1.0, 0.3
    else:  # our relative noise: Captum is handed the already scaled noise
        options, captum_stdevs = {"noise": NOISE}, 1.0
        stdev = (NOISE * (x.flatten(1).amax(1) - x.flatten(1).amin(1))).repeat_interleave(COPIES).view(-1, 1, 1, 1)
    e = gs.convert(model, layer="layer4" if name == "resnet18" else "features.18").explain(
        x, target, smooth=COPIES, smooth_type=smooth_type, generator=torch.Generator().manual_seed(SEED), **options)
    expected = _captum_noise_tunnel(model, x, target, COPIES, stdev * unit, monkeypatch, nt_type=smooth_type,
                                    stdevs=captum_stdevs)
    assert_nontrivial(expected)
    # the variance is a difference of two close means: rounding relative to the mean of the squares
    scale = 1.0 if smooth_type != "vargrad" else float(expected.abs().max() / (e.gradient.abs().max() + 1e-30))
    assert relative_error(e.gradient, expected) <= 1e-5 * max(1.0, scale), (smooth_type, absolute)
    assert e.smoothing == {"copies": COPIES, "type": smooth_type, "noise": None if absolute else NOISE,
                           "noise_absolute": 0.3 if absolute else None, "chunk": batch}


def test_the_statistic_applies_to_every_cam_and_the_captures_stay_means(setup):
    model, explainer, x, _ = setup
    noisy = x.repeat_interleave(COPIES, dim=0) + 0.4 * _draws(x, COPIES, SEED)
    classes = explainer(x).argmax(dim=1)
    each = explainer.explain(noisy, classes.repeat_interleave(COPIES))

    def per_sample(t):
        return t.view(x.shape[0], COPIES, *t.shape[1:])

    for smooth_type, statistic in (("smoothgrad_sq", lambda t: (t * t).mean(1)),
                                   ("vargrad", lambda t: (t * t).mean(1) - t.mean(1) ** 2)):
        e = explainer.explain(x, smooth=COPIES, smooth_type=smooth_type, noise_absolute=0.4,
                              generator=torch.Generator().manual_seed(SEED), chunk=3)
        assert torch.allclose(e.gradient, statistic(per_sample(each.gradient)), rtol=1e-4, atol=1e-12)
        for name in gs.cam_methods():
            expected = statistic(per_sample(each.cams_raw[name]))
            assert_nontrivial(expected, 0.2)
            assert torch.allclose(e.cams_raw[name], expected, rtol=1e-4, atol=1e-9), (smooth_type, name)
            assert torch.equal(e.cams[name], gs.cam.upsample(e.cams_raw[name], x.shape[2:]))
        mean_activation = per_sample(each.layers["layer4"].activation).mean(1)
        assert torch.allclose(e.layers["layer4"].activation, mean_activation, rtol=1e-5, atol=1e-7)
        assert torch.allclose(e.score, per_sample(each.score).mean(1), rtol=1e-5)


def _draws(x, copies, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randn(x.shape[1:], generator=generator) for _ in range(x.shape[0] * copies)])


def test_every_map_is_the_mean_over_the_copies(setup):
    model, explainer, x, _ = setup
    e = explainer.explain(x, smooth=COPIES, noise=NOISE, generator=torch.Generator().manual_seed(SEED), chunk=3)
    with torch.no_grad():
        clean_classes = model(x).argmax(dim=1)
    assert torch.equal(e.target, clean_classes)  # resolved once, on the clean input
    assert torch.equal(e.logits, explainer(x))
    noisy = x.repeat_interleave(COPIES, dim=0) + the_noise(x, COPIES, NOISE, SEED)
    each = explainer.explain(noisy, clean_classes.repeat_interleave(COPIES))
    assert not torch.equal(each.target, each.logits.argmax(dim=1))  # some copies' own argmax differs: not used

    def mean(t):
        return t.view(x.shape[0], COPIES, *t.shape[1:]).mean(dim=1)

    assert torch.allclose(e.gradient, mean(each.gradient), rtol=1e-5, atol=1e-8)
    assert torch.allclose(e.score, mean(each.score), rtol=1e-5)
    for name in gs.cam_methods():
        assert_nontrivial(mean(each.cams_raw[name]), 0.2)
        assert torch.allclose(e.cams_raw[name], mean(each.cams_raw[name]), rtol=1e-5, atol=1e-7), name
        assert torch.allclose(e.cams[name], mean(each.cams[name]), rtol=1e-4, atol=1e-6), name
    assert torch.equal(e.cam, e.cams["gradcam"])
    assert torch.equal(e.guided_gradcam, e.cam.unsqueeze(1) * e.gradient)
    assert torch.allclose(e.layers["layer4"].activation, mean(each.layers["layer4"].activation), rtol=1e-5, atol=1e-7)
    assert torch.equal(e[1].cams_raw["layercam"], e.cams_raw["layercam"][1:])
    assert e.smoothing == {"copies": COPIES, "type": "smoothgrad", "noise": NOISE, "noise_absolute": None,
                          "chunk": 3} and e[1].smoothing == e.smoothing


def test_zero_noise_is_no_smoothing_and_chunks_only_bound_memory(setup):
    _, explainer, x, target = setup
    plain = explainer.explain(x, target)
    still = explainer.explain(x, target, smooth=COPIES, noise=0.0)
    for name in ("gradient", "cam_raw", "cam", "guided_gradcam"):
        assert torch.allclose(getattr(still, name), getattr(plain, name), rtol=1e-6, atol=1e-9), name
    for name in gs.cam_methods():
        assert torch.allclose(still.cams_raw[name], plain.cams_raw[name], rtol=1e-6, atol=1e-9), name

    sizes = []
    handle = explainer.graph_module.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
    try:
        one = explainer.explain(x, target, smooth=3, generator=torch.Generator().manual_seed(1), chunk=2)
    finally:
        handle.remove()
    assert sizes == [2, 2, 2]
    whole = explainer.explain(x, target, smooth=3, generator=torch.Generator().manual_seed(1), chunk=6)
    assert torch.allclose(one.gradient, whole.gradient, rtol=1e-6, atol=1e-9)
    assert torch.allclose(one.cams_raw["eigengradcam"], whole.cams_raw["eigengradcam"], rtol=1e-5, atol=1e-8)


def test_score_functions_apply_to_each_copy(setup):
    _, explainer, x, _ = setup
    e = explainer.explain(x, lambda logits: logits[:, 0] - logits[:, 1], smooth=2,
                          generator=torch.Generator().manual_seed(0))
    assert e.target is None and e.gradient.shape == x.shape and e.score.shape == (2,)
    channel = explainer.explain(x, gs.Channel("layer4", 3), smooth=2, generator=torch.Generator().manual_seed(0))
    assert_nontrivial(channel.gradient)


def test_a_finer_target_is_resolved_on_the_clean_input(setup):
    _, explainer, x, _ = setup
    plain = explainer.explain(x, gs.Finer(alpha=0.5))
    still = explainer.explain(x, gs.Finer(alpha=0.5), smooth=2, noise=0.0)
    assert torch.equal(still.target, plain.target)
    assert torch.allclose(still.gradient, plain.gradient, rtol=1e-5, atol=1e-9)
    assert torch.allclose(still.cams_raw["gradcam"], plain.cams_raw["gradcam"], rtol=1e-5, atol=1e-9)


def test_bad_settings_are_refused(setup):
    _, explainer, x, _ = setup
    for kwargs, match in [({"smooth": 0}, "number of noisy copies"), ({"smooth": True}, "number of noisy copies"),
                          ({"smooth": 2.0}, "number of noisy copies"), ({"smooth": 2, "noise": -0.1}, "noise="),
                          ({"smooth": 2, "noise": float("nan")}, "noise="), ({"smooth": 2, "chunk": 0}, "chunk="),
                          ({"noise": 0.1}, "only apply with smooth=N"), ({"chunk": 4}, "only apply with smooth=N"),
                          ({"smooth_type": "vargrad"}, "smooth_type= only apply with smooth=N"),
                          ({"noise_absolute": 0.2}, "noise_absolute= only apply with smooth=N"),
                          ({"smooth": 2, "noise": 0.1, "noise_absolute": 0.2}, "not both"),
                          ({"smooth": 2, "noise_absolute": -1.0}, "noise_absolute="),
                          ({"smooth": 2, "noise_absolute": float("inf")}, "noise_absolute="),
                          ({"smooth": 2, "smooth_type": "var"}, "smooth_type='var' is not one of")]:
        with pytest.raises(ValueError, match=match):
            explainer.explain(x, **kwargs)
    with pytest.raises(TypeError, match="torch.Generator"):
        explainer.explain(x, smooth=2, generator=0)
    with pytest.raises(TypeError, match="smooth_type= is one of"):
        explainer.explain(x, smooth=2, smooth_type=3)


# --- The run-time explainer takes ``Explainer.explain``'s options (SmoothGrad: smooth, noise, generator, chunk),

def _seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def test_runtime_smoothgrad_equals_the_fx_paths():
    model = make_model("resnet18")
    x = image_batch(32)
    options = dict(smooth=2, noise=0.2, chunk=3)
    fx_e = gs.convert(model, layer="layer4").explain(x, [1, 2], generator=_seeded(), **options)
    run_e = convert_runtime(model, layer="layer4").explain(x, [1, 2], generator=_seeded(), **options)
    assert_nontrivial(fx_e.gradient, 0.5)
    assert run_e.smoothing == fx_e.smoothing == {"copies": 2, "type": "smoothgrad", "noise": 0.2,
                                              "noise_absolute": None, "chunk": 3}
    assert relative_error(run_e.gradient, fx_e.gradient) < 1e-5
    assert relative_error(run_e.cam_raw, fx_e.cam_raw) < 1e-5
    assert relative_error(run_e.score, fx_e.score) < 1e-5
    assert run_e.swapped == fx_e.swapped == 17


def test_options_that_do_not_apply_are_refused_by_name():
    ex = convert_runtime(make_model("resnet18"), layer="layer4")
    x = image_batch(32)
    with pytest.raises(ValueError, match="noise, chunk= only apply with smooth=N"):
        ex.explain(x, 1, noise=0.1, chunk=1)
    with pytest.raises(ValueError, match="smooth= is the number of noisy copies"):
        ex.explain(x, 1, smooth=0)
    with pytest.raises(TypeError, match="generator= takes a torch.Generator"):
        ex.explain(x, 1, smooth=2, generator=0)


def test_a_detector_is_smoothed_through_the_deferred_explainer():
    torch.manual_seed(0)
    model = randomise_batchnorm(detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, min_size=64, max_size=64, box_score_thresh=0.0,
        rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=10, box_detections_per_img=5)).eval()
    x = (image_batch(64) * STD + MEAN).clamp(0, 1)
    ex = gs.convert(model, layer="backbone.body.16")  # deferred: the first input, a list, goes to run time
    e = ex.explain(list(x), gs.Box(0), smooth=2, noise=0.1, generator=_seeded(3))
    assert ex.report.capture.startswith("runtime") and e.smoothing == {
        "copies": 2, "type": "smoothgrad", "noise": 0.1, "noise_absolute": None, "chunk": 2}
    # The reference: the mean of plain explanations of the same noisy copies (sample-major, one draw each).
    generator, sigma = _seeded(3), 0.1 * (x.flatten(1).amax(1) - x.flatten(1).amin(1))
    noisy = [x[b] + sigma[b] * torch.randn(x.shape[1:], generator=generator) for b in (0, 0, 1, 1)]
    plain = [ex.explain([image], gs.Box(0)) for image in noisy]
    expected_gradient = torch.stack([(plain[0].gradient + plain[1].gradient)[0], (plain[2].gradient + plain[3].gradient)[0]]) / 2
    expected_cam = torch.stack([(plain[0].cam_raw + plain[1].cam_raw)[0], (plain[2].cam_raw + plain[3].cam_raw)[0]]) / 2
    assert_nontrivial(expected_gradient, 0.5)
    assert e.gradient.shape == x.shape and relative_error(e.gradient, expected_gradient) < 1e-4
    assert relative_error(e.cam_raw, expected_cam) < 1e-4
