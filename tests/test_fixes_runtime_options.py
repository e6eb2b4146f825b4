"""The run-time explainer takes ``Explainer.explain``'s options (SmoothGrad: smooth, noise, generator, chunk),
directly and through a deferred explainer that fell back to it; none is dropped."""
import pytest
import torch
from torchvision.models import detection

import guided_swap as gs
from guided_swap.runtime_explainer import convert_runtime

from conftest import MEAN, STD, assert_nontrivial, image_batch, make_model, randomise_batchnorm, relative_error


def _seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def test_runtime_smoothgrad_equals_the_fx_paths():
    model = make_model("resnet18")
    x = image_batch(32)
    options = dict(smooth=2, noise=0.2, chunk=3)
    fx_e = gs.convert(model, layer="layer4").explain(x, [1, 2], generator=_seeded(), **options)
    run_e = convert_runtime(model, layer="layer4").explain(x, [1, 2], generator=_seeded(), **options)
    assert_nontrivial(fx_e.gradient, 0.5)
    assert run_e.smoothing == fx_e.smoothing == {"copies": 2, "noise": 0.2, "chunk": 3}
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
    assert ex.report.capture.startswith("runtime") and e.smoothing == {"copies": 2, "noise": 0.1, "chunk": 2}
    # The reference: the mean of plain explanations of the same noisy copies (sample-major, one draw each).
    generator, sigma = _seeded(3), 0.1 * (x.flatten(1).amax(1) - x.flatten(1).amin(1))
    noisy = [x[b] + sigma[b] * torch.randn(x.shape[1:], generator=generator) for b in (0, 0, 1, 1)]
    plain = [ex.explain([image], gs.Box(0)) for image in noisy]
    expected_gradient = torch.stack([(plain[0].gradient + plain[1].gradient)[0], (plain[2].gradient + plain[3].gradient)[0]]) / 2
    expected_cam = torch.stack([(plain[0].cam_raw + plain[1].cam_raw)[0], (plain[2].cam_raw + plain[3].cam_raw)[0]]) / 2
    assert_nontrivial(expected_gradient, 0.5)
    assert e.gradient.shape == x.shape and relative_error(e.gradient, expected_gradient) < 1e-4
    assert relative_error(e.cam_raw, expected_cam) < 1e-4
