"""Detectors through the run-time capture path: exact against the fx-free reference and Captum, model untouched.

torchvision detectors need neither fx nor export here: their rectifier calls are swapped while the
explainer's mirror runs. The Faster R-CNN checks compare the top box's guided gradient with
guided_swap.checks.reference (its own TorchFunctionMode, sharing no code with the run-time path) and Grad-CAM at a
backbone layer with Captum's LayerGradCam, both over the same score function.
"""
import re

import numpy as np

import pytest
import torch
from torch import nn
from torchvision.models import detection

import guided_swap as gs
from guided_swap.checks import reference
from guided_swap import convert_runtime
from guided_swap.capture.runtime.runtime_capture import RuntimeCapture
from guided_swap.core.targets import box_score
from models import DISGUISED_LEFT_ALONE, DISGUISED_SWAPS, EVERY_SPELLING_SWAPS, DisguisedRectifiers, EverySpelling

from conftest import MEAN, STD, assert_nontrivial, image_batch, make_model, randomise_batchnorm, relative_error

SMALL = dict(weights=None, weights_backbone=None)


def photos(size: int) -> torch.Tensor:
    """Two real photographs in [0, 1], as detectors take them (they normalise inside)."""
    return (image_batch(size) * STD + MEAN).clamp(0, 1)


def top_box_score(outputs):
    return box_score(gs.Box(0), outputs, len(outputs))


def hooks(model: nn.Module):
    return [(name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
             len(m._backward_pre_hooks)) for name, m in model.named_modules()]


@pytest.fixture(scope="module")
def faster_rcnn():
    torch.manual_seed(0)
    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        **SMALL, min_size=128, max_size=128, box_score_thresh=0.0, rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=20, box_detections_per_img=10)
    return randomise_batchnorm(model).eval()


@pytest.fixture(scope="module")
def explained(faster_rcnn):
    """One explain of the top box of two photographs, with the model's state and hooks before and after."""
    x = photos(128)
    before = {k: v.clone() for k, v in faster_rcnn.state_dict().items()}
    hooks_before = hooks(faster_rcnn)
    ex = gs.convert(faster_rcnn, layer="backbone.body.16")  # fx fails; the first input, a list, goes to run time
    e = ex.explain(list(x), gs.Box(0))
    return ex, e, x, before, hooks_before


def test_guided_gradient_of_the_top_box_equals_the_fx_free_reference(faster_rcnn, explained):
    ex, e, x, _, _ = explained
    leaf = x.clone().requires_grad_(True)
    with reference.ReLURule("guided"):
        score = top_box_score(faster_rcnn(list(leaf)))
    (expected,) = torch.autograd.grad(score.sum(), leaf)
    assert_nontrivial(expected, 0.5)
    assert torch.equal(e.score, score.detach())
    assert relative_error(e.gradient, expected) < 1e-5


def test_gradcam_at_a_backbone_layer_equals_captum(faster_rcnn, explained):
    from captum.attr import LayerGradCam

    ex, e, x, _, _ = explained
    layer = faster_rcnn.get_submodule("backbone.body.16")
    expected = LayerGradCam(lambda batch: top_box_score(faster_rcnn(list(batch))), layer).attribute(
        x, relu_attributions=True).squeeze(1)
    assert_nontrivial(expected, 0.2)
    assert e.cam_raw.shape == expected.shape == (2, 4, 4)
    assert relative_error(e.cam_raw, expected) < 1e-5
    assert e.cam.shape == (2, 128, 128) and e.guided_gradcam.shape == (2, 3, 128, 128)


def test_the_model_is_untouched_and_the_report_names_the_path(faster_rcnn, explained):
    ex, e, x, before, hooks_before = explained
    after = faster_rcnn.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert hooks(faster_rcnn) == hooks_before and not faster_rcnn.training
    assert not any(p.grad is not None for p in faster_rcnn.parameters())
    report = ex.report
    failed = (r"runtime \(fx failed at torchvision/models/detection/generalized_rcnn\.py:\d+; "
              r"the input is not a tensor\)")
    assert re.fullmatch(failed, report.capture), report.capture
    assert re.match(failed + " capture; rule guided: 24 rectifier call site", report.summary())
    assert convert_runtime(faster_rcnn, reason="why").report.capture == "runtime (why)"
    assert {"roi_heads.box_head.relu", "roi_heads.box_head.relu_1", "rpn.head.conv.0.1",
            "backbone.body.1.block.0.2"} <= set(ex.swapped)
    assert report.layers == {"backbone.body.16": "backbone.body.16"} and report.tail_backward
    assert ("backbone.body.0.2", "nn.Hardswish") in report.left_alone
    assert "second backward" in str(report)
    assert isinstance(ex, gs.Explainer) and e.logits.shape == (2, 0) and e.swapped == len(ex.swapped)


def test_box_with_a_label_and_bad_targets(faster_rcnn, explained):
    ex, e, x, _, _ = explained
    image = [x[0]]
    label = int(e.outputs[0]["labels"][1])
    explanation = ex.explain(image, gs.Box(0, label=label))
    picked = gs.Box(0, label=label).indices(explanation.outputs)[0]
    assert explanation.outputs[0]["labels"][picked] == label
    assert torch.equal(explanation.score, explanation.outputs[0]["scores"][picked].view(1))
    with pytest.raises(gs.TargetError, match="image 0 has 10 detections; Box\\(index=10\\) needs at least 11"):
        gs.Box(10).indices(e.outputs)
    with pytest.raises(gs.TargetError, match="gs.Box|guided_swap.Box"):
        ex.explain(image, 3)
    with pytest.raises(ValueError, match=">= 0"):
        gs.Box(-1)
    with pytest.raises(gs.InputError, match="differ in size"):
        ex.explain([x[0], x[1, :, :64]], gs.Box(0))


def test_layers_that_cannot_be_captured_say_why(faster_rcnn):
    with pytest.raises(gs.LayerError, match="closest names"):
        convert_runtime(faster_rcnn, layer="backbone.body.166")
    image = [photos(64)[0]]
    with pytest.raises(gs.LayerError, match=r"ran 3 times in one forward; name one call: a later one "
                                            r"\(rpn.head.conv.0.0_1, rpn.head.conv.0.0_2\)"):
        convert_runtime(faster_rcnn, layer="rpn.head.conv.0.0").explain(image, gs.Box(0))
    with pytest.raises(gs.LayerError, match="returned a OrderedDict, not a tensor"):
        convert_runtime(faster_rcnn, layer="backbone.body").explain(image, gs.Box(0))
    e = convert_runtime(faster_rcnn, layer="rpn.head.conv.0.0_1").explain(image, gs.Box(0))
    assert e.cam_raw.shape == (1, 4, 4)  # the second FPN level of a 64-px image resized to 128


DETECTORS = {
    "retinanet_resnet50_fpn": dict(score_thresh=0.0, topk_candidates=20, detections_per_img=5),
    "fcos_resnet50_fpn": dict(score_thresh=0.0, topk_candidates=20, detections_per_img=5),
    "ssdlite320_mobilenet_v3_large": dict(score_thresh=0.0, topk_candidates=20, detections_per_img=5),
    "maskrcnn_resnet50_fpn": dict(box_score_thresh=0.0, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=10,
                                  box_detections_per_img=5),
}
DEEPEST = {"retinanet_resnet50_fpn": "backbone.body.layer4", "fcos_resnet50_fpn": "backbone.body.layer4",
           "ssdlite320_mobilenet_v3_large": "backbone.features.0", "maskrcnn_resnet50_fpn": "backbone.body.layer4"}


@pytest.mark.parametrize("name", list(DETECTORS))
def test_other_detectors_convert_and_explain_exactly(name):
    torch.manual_seed(0)
    size = {} if name.startswith("ssdlite") else dict(min_size=64, max_size=64)
    model = randomise_batchnorm(getattr(detection, name)(**SMALL, **size, **DETECTORS[name])).eval()
    x = photos(64)[:1]
    before = hooks(model)
    ex = convert_runtime(model, example_input=list(x))
    assert ex.report.layer_reasons["auto"].startswith("auto: ") and len(ex.swapped) > 20
    assert ex.report.layers["auto"] == DEEPEST[name]  # the backbone's deepest map
    e = ex.explain(list(x), gs.Box(0))
    leaf = x.clone().requires_grad_(True)
    with reference.ReLURule("guided"):
        score = top_box_score(model(list(leaf)))
    (expected,) = torch.autograd.grad(score.sum(), leaf)
    assert float(expected.abs().max()) > 0
    assert relative_error(e.gradient, expected) < 1e-5
    assert e.cam.shape == (1, 64, 64) and bool(torch.isfinite(e.cam).all())
    assert hooks(model) == before


# --- the run-time path on models fx can take: the same sites and maps as the fx path ----------------------

def test_every_spelling_gets_the_fx_paths_names():
    model = EverySpelling().eval()
    ex = convert_runtime(model, layer="conv3", example_input=image_batch(16))
    assert {s.name: s.spelling for s in ex.report.swapped} == EVERY_SPELLING_SWAPS
    assert dict(ex.report.left_alone) == {"silu": "nn.SiLU", "sigmoid": "torch.sigmoid"}


def test_runtime_maps_equal_the_fx_paths_with_an_in_place_rectifier_after_the_capture():
    model = make_model("vgg11")
    x = image_batch(32)
    layer = "features.8"  # a convolution whose output the next nn.ReLU(inplace=True) overwrites
    fx_e = gs.convert(model, layer=layer).explain(x, [1, 2])
    run_e = convert_runtime(model, layer=layer).explain(x, [1, 2])
    expected_cam = reference.gradcam(model, x, [1, 2], model.features[8])
    assert_nontrivial(expected_cam, 0.2)
    assert relative_error(run_e.cam_raw, expected_cam) < 1e-5
    assert torch.equal(run_e.gradient, fx_e.gradient) and torch.equal(run_e.cam_raw, fx_e.cam_raw)


@pytest.mark.parametrize("rule", ["guided", "deconvnet"])
def test_rules_with_and_without_incoming_take_the_fx_paths_route_and_give_its_maps(rule, monkeypatch):
    """guided (incoming: autograd's native ReLU node, hooked) and deconvnet (no incoming: the Function)."""
    from guided_swap.capture import ops

    calls = []
    original = ops.RectifierFunction.forward
    monkeypatch.setattr(ops.RectifierFunction, "forward", staticmethod(lambda *a: calls.append(1) or original(*a)))
    model = make_model("vgg11")
    x = image_batch(32)
    layer = "features.8"  # rectifiers after the capture: the tail's ordinary gradient goes through the switch
    run_e = convert_runtime(model, layer=layer, rule=rule).explain(x, [1, 2])
    functions_in_runtime = len(calls)
    fx_e = gs.convert(model, layer=layer, rule=rule).explain(x, [1, 2])
    assert functions_in_runtime == (0 if rule == "guided" else 10) == len(calls) - functions_in_runtime
    assert_nontrivial(fx_e.gradient, 0.2)
    assert torch.equal(run_e.gradient, fx_e.gradient) and torch.equal(run_e.cam_raw, fx_e.cam_raw)


def test_disguised_rectifiers_and_look_alikes_are_read_as_on_the_fx_path():
    torch.manual_seed(0)
    model = DisguisedRectifiers().eval()
    x = image_batch(16)
    ex = convert_runtime(model, layer="conv3")
    e = ex.explain(x, [1, 2])
    assert {s.name: s.spelling for s in ex.report.swapped} == DISGUISED_SWAPS
    assert dict(ex.report.left_alone) == DISGUISED_LEFT_ALONE
    expected = reference.input_gradient(model, x, [1, 2], "guided")
    assert_nontrivial(expected, 0.5)
    assert relative_error(e.gradient, expected) < 1e-6
    fx_e = gs.convert(model, layer="conv3").explain(x, [1, 2])
    assert torch.equal(e.gradient, fx_e.gradient) and torch.equal(e.cam_raw, fx_e.cam_raw)


def test_finiteness_is_checked_as_on_the_graph_paths():
    """None checks on the CPU only (reading values elsewhere waits for the device; the meta device has none)."""
    ex = convert_runtime(EverySpelling().eval(), layer="conv3")
    x = image_batch(16)
    x[0, 0, 0, 0] = float("nan")
    for check in (None, True):
        with pytest.raises(gs.InputError, match="NaN"):
            ex.explain(x, check_finite=check)
    assert not torch.isfinite(ex.explain(x, [1, 2], check_finite=False).logits[0]).all()
    for images in (x, list(x)):
        with pytest.raises(gs.InputError, match="NaN"):
            ex.explain(images)
    meta = convert_runtime(EverySpelling().eval().to("meta"), layer="conv3")
    meta.capture.check(torch.empty(2, 3, 16, 16, device="meta"))
    with pytest.raises((RuntimeError, NotImplementedError)):
        meta.capture.check(torch.empty(2, 3, 16, 16, device="meta"), check_finite=True)


def test_save_load_and_export_refused(tmp_path):
    model = make_model("resnet18")
    x = image_batch(32)
    ex = convert_runtime(model, layer="layer4")
    e = ex.explain(x, [1, 2])
    ex.save(str(tmp_path / "r.gsx"))
    with pytest.raises(gs.LoadError, match="trust=True"):  # it holds a copy of the model: a pickle
        gs.load(str(tmp_path / "r.gsx"))
    loaded = gs.load(str(tmp_path / "r.gsx"), trust=True)
    assert isinstance(loaded.capture, RuntimeCapture) and loaded.report.capture == "runtime"
    assert torch.equal(loaded.explain(x, [1, 2]).gradient, e.gradient)
    with pytest.raises(gs.ExportError, match="captured at run time"):
        gs.export_program(ex, x)
    plain = convert_runtime(model, layer="layer4", rule="gradient").explain(x, [1, 2])
    leaf = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(model(leaf).gather(1, torch.tensor([[1], [2]])).sum(), leaf)
    assert torch.allclose(plain.gradient, expected, rtol=1e-5, atol=1e-9)


def test_several_layers_and_a_channel_target_equal_the_fx_path():
    model = make_model("resnet18")
    x = image_batch(32)
    layers = ["layer3", "layer4.0.relu_1"]  # a module, and the second call of a module that runs twice
    target = gs.Channel("layer3", 5)
    fx_e = gs.convert(model, layer=layers).explain(x, target)
    run_e = convert_runtime(model, layer=layers).explain(x, target)
    assert_nontrivial(fx_e.gradient, 0.5)
    assert torch.equal(run_e.gradient, fx_e.gradient) and torch.equal(run_e.score, fx_e.score)
    for name in layers:
        assert torch.equal(run_e.layers[name].grad, fx_e.layers[name].grad), name
        assert torch.equal(run_e.layers[name].activation, fx_e.layers[name].activation), name


def test_a_model_in_training_mode_is_explained_as_deployed_and_left_in_training_mode():
    model = make_model("resnet18").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="training mode"):
        ex = convert_runtime(model, layer="layer4")
    e = ex.explain(image_batch(32), [1, 2])
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    model.eval()
    assert torch.equal(e.logits, model(image_batch(32)).detach())


# --- pytorch-grad-cam's box target ------------------------------------------------------------------------

def _pgc_scores(outputs, boxes, labels):
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget  # optional: a dev dependency

    target = FasterRCNNBoxScoreTarget(labels=labels, bounding_boxes=boxes)
    return torch.cat([target(o) for o in outputs])


def test_a_box_match_target_equals_pytorch_grad_cams_box_score_target(explained, faster_rcnn):
    """pgc's FasterRCNNBoxScoreTarget as a gs.BoxMatch: the same score and the same maps, 0 without a match."""
    pytest.importorskip("pytorch_grad_cam")
    ex, e, x, _, _ = explained
    detections = e.outputs
    boxes = [d["boxes"][:2].detach() for d in detections]  # each image's own two top boxes, as pgc's tutorial does
    labels = [d["labels"][:2] for d in detections]
    match = gs.BoxMatch(boxes, labels)
    ours = ex.explain(list(x), match)
    theirs = ex.explain(list(x), lambda out: torch.cat([_pgc_scores([o], b, l) for o, b, l in
                                                       zip(out, boxes, labels)]))
    assert torch.allclose(ours.score, theirs.score) and bool((ours.score > 1).all())
    assert relative_error(ours.gradient, theirs.gradient) <= 1e-6
    assert relative_error(ours.cam_raw, theirs.cam_raw) <= 1e-6
    assert_nontrivial(ours.gradient)
    far = gs.BoxMatch([[0.0, 0.0, 1.0, 1.0]], [1])  # the same reference for both images, matching nothing
    with pytest.warns(gs.ZeroGradientWarning):
        nothing = ex.explain(list(x), far)
    assert torch.equal(nothing.score, torch.zeros(2)) and not nothing.gradient.any()


def test_a_box_match_target_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="iou_threshold"):
        gs.BoxMatch([[0, 0, 1, 1]], [1], iou_threshold=1.5)
    with pytest.raises(gs.TargetError, match="one label per box"):
        gs.BoxMatch([[0, 0, 1, 1], [1, 1, 2, 2]], [1]).scores([{"boxes": torch.zeros(1, 4), "scores": torch.ones(1),
                                                                 "labels": torch.ones(1, dtype=torch.long)}])
    with pytest.raises(gs.TargetError, match="detector"):
        gs.BoxMatch([[0, 0, 1, 1]], [1]).scores(torch.zeros(2, 5))


def test_a_box_match_of_numpy_arrays_per_image_is_read_per_image_as_tensors_are():
    """A list of (K, 4) numpy arrays, one per image, was read as one shared set (every image scored against every
    image's boxes: a silently larger score); it is now per image, as a list of (K, 4) tensors is."""
    found = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]),
             "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 1])}
    first, second = [[0.0, 0.0, 10.0, 10.0]], [[20.0, 20.0, 30.0, 30.0]]
    as_tensors = gs.BoxMatch([torch.tensor(first), torch.tensor(second)], [torch.tensor([1]), torch.tensor([1])])
    as_arrays = gs.BoxMatch([np.array(first), np.array(second)], [np.array([1]), np.array([1])])
    expected = torch.tensor([1.9, 1.8])
    assert torch.allclose(as_tensors.scores([found, found]), expected)
    assert torch.allclose(as_arrays.scores([found, found]), expected)
    shared = gs.BoxMatch(np.array(first + second), np.array([1, 1]))  # one (K, 4) array: every image's references
    assert torch.allclose(shared.scores([found, found]), torch.tensor([3.7, 3.7]))
