"""Every capture path (fx, export, run time, and a deferred one) through the same checks of the contract.

The explainer, SmoothGrad, compile and export only use the :class:`guided_swap.Capture` contract, so each
kind of target, each option and each refusal must behave alike on every path: equal maps where the paths
compute the same thing, one clear error where a path cannot do something.
"""
import warnings

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import guided_swap as gs
from guided_swap.capture.base import Capture
from guided_swap.capture.choose import DeferredCapture
from guided_swap.capture.graph.graph_capture import GraphCapture
from guided_swap.capture.runtime.runtime_capture import RuntimeCapture
from guided_swap.checks import reference

from conftest import image_batch, make_model, relative_error

PATHS = ("fx", "export", "runtime", "deferred")
TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return make_model("resnet18")


@pytest.fixture(scope="module")
def x():
    return image_batch(48)


def convert(model, path, x, **kwargs):
    if path == "deferred":  # fx refused: the export path is taken on the first input
        return gs.convert(model, capture="export", **kwargs)
    return gs.convert(model, capture=path, example_input=x[:1], **kwargs)


@pytest.fixture(scope="module")
def explainers(model, x):
    return {path: convert(model, path, x, layer=["layer4", "layer3"]) for path in PATHS}


def test_every_path_is_one_explainer_class_holding_a_capture(explainers, x):
    kinds = {"fx": GraphCapture, "export": GraphCapture, "runtime": RuntimeCapture, "deferred": DeferredCapture}
    for path, ex in explainers.items():
        assert type(ex) is gs.Explainer and isinstance(ex.capture, kinds[path]), path
        assert isinstance(ex.capture, Capture)
    explainers["deferred"].explain(x[:1])
    assert isinstance(explainers["deferred"].capture.chosen, GraphCapture)
    assert explainers["deferred"].report.capture.startswith("export")


@pytest.mark.parametrize("target", [None, 7, [3, 900], torch.tensor([1, 2]),
                                    gs.Channel("layer3", 5), gs.Channel("layer3", 5, unit=(1, 1)),
                                    lambda out: out[:, 10] - out[:, 11]],
                         ids=["argmax", "int", "list", "tensor", "channel", "unit", "callable"])
def test_every_kind_of_target_gives_the_same_maps_on_every_path(explainers, x, target):
    maps = {path: ex.explain(x, target) for path, ex in explainers.items()}
    first = maps["fx"]
    assert first.gradient.abs().sum() > 0
    for path, e in maps.items():
        assert relative_error(e.gradient, first.gradient) <= TOL, path
        for layer in ("layer4", "layer3"):
            assert relative_error(e.layers[layer].cam_raw, first.layers[layer].cam_raw) <= TOL, (path, layer)
        assert torch.equal(e.logits, first.logits), path
        assert (e.target is None) == (first.target is None), path


@pytest.mark.parametrize("given, plain", [(np.int64(7), 7), (torch.tensor(7), 7), (np.array([3, 900]), [3, 900]),
                                          ([np.int64(3), np.int32(900)], [3, 900])],
                         ids=["numpy-int", "0d-tensor", "numpy-array", "list-of-numpy-ints"])
def test_numpy_and_0d_class_targets_are_the_classes_they_hold_on_every_path(explainers, x, given, plain):
    """A numpy integer, a numpy array and a 0-d tensor were refused ("not understood", or "1 entries" for a
    batch of 2), though an int and a list are taken; as_score now reads them as the same classes."""
    for path, ex in explainers.items():
        e, expected = ex.explain(x, given), ex.explain(x, plain)
        assert torch.equal(e.target, expected.target), path
        assert torch.equal(e.gradient, expected.gradient), path
    maps = torch.rand(2, 48, 48, generator=torch.Generator().manual_seed(0))
    ex = explainers["fx"]
    assert torch.equal(gs.metrics.deletion(ex, x, maps, given, steps=2).curve,
                       gs.metrics.deletion(ex, x, maps, plain, steps=2).curve)


def test_the_paths_equal_the_fx_free_reference(explainers, model, x):
    expected = reference.input_gradient(model, x, [5, 6], "guided")
    for path, ex in explainers.items():
        assert relative_error(ex.explain(x, [5, 6]).gradient, expected) <= TOL, path


@pytest.mark.parametrize("target, error", [
    (gs.Channel("layer2", 0), gs.TargetError),       # not captured
    (True, TypeError),                                 # a bool is no class
    ("cat", TypeError),                                # nor a string
    ([1, 2, 3], gs.TargetError),                       # one class per sample
    (1000, gs.TargetError),                            # out of range
    (gs.Box(0), gs.TargetError),                       # not a detector
])
def test_a_bad_target_fails_alike_on_every_path(explainers, x, target, error):
    for path, ex in explainers.items():
        with pytest.raises(error):
            ex.explain(x, target)


def test_bad_inputs_fail_alike_on_every_path(explainers, x):
    for path, ex in explainers.items():
        with pytest.raises(TypeError, match="floating"):
            ex.explain(x.long())
        with pytest.raises(gs.InputError, match="NaN"):
            ex.explain(torch.full_like(x, float("nan")))
        with pytest.raises(gs.InputError, match="float64"):
            ex.explain(x.double())
        with pytest.raises(TypeError, match="torch.stack|torch.Tensor"):  # a classifier given a list of images
            ex.explain(list(x))


def test_smoothgrad_is_the_same_on_every_path(explainers, x):
    maps = {path: ex.explain(x, [1, 2], smooth=3, noise=0.1, generator=torch.Generator().manual_seed(4))
            for path, ex in explainers.items()}
    for path, e in maps.items():
        assert e.smoothing == {"copies": 3, "type": "smoothgrad", "noise": 0.1, "noise_absolute": None, "chunk": 2}
        assert relative_error(e.gradient, maps["fx"].gradient) <= TOL, path
        assert relative_error(e.cams["layercam"], maps["fx"].cams["layercam"]) <= TOL, path


def test_compile_runs_graph_paths_compiled_and_the_runtime_path_eagerly_with_one_warning(model, x):
    for path in PATHS:
        ex = convert(model, path, x, layer="layer4")
        eager = ex.explain(x, [1, 2])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ex.compile(backend="eager")
            compiled = ex.explain(x, [1, 2])
            ex.explain(x, [1, 2])
        eager_warnings = [w for w in caught if "runs eagerly" in str(w.message)]
        assert len(eager_warnings) == (1 if path == "runtime" else 0), (path, [str(w.message) for w in caught])
        assert relative_error(compiled.gradient, eager.gradient) <= TOL, path
        assert relative_error(compiled.cam, eager.cam) <= TOL, path


def test_export_takes_graph_paths_and_refuses_the_runtime_one(explainers, x):
    for path, ex in explainers.items():
        if path == "runtime":
            # asked for here: the message does not say that fx and export failed, only that they may have
            with pytest.raises(gs.ExportError, match=r"capture='runtime': chosen with convert\(capture=...\), or "
                                                     r"taken because .* no graph to export"):
                gs.export_program(ex, x)
            continue
        program = gs.export_program(ex, x).module()
        out = program(x, torch.tensor([3, 4]))
        e = ex.explain(x, [3, 4])
        assert relative_error(out["gradient"], e.gradient) <= 1e-4, path
        assert relative_error(out["cam"], e.cam) <= 1e-4, path


def test_save_and_load_on_every_path(explainers, x, tmp_path):
    for path, ex in explainers.items():
        ex.explain(x[:1])  # the deferred one is captured by now
        file = tmp_path / f"{path}.gsx"
        ex.save(str(file))
        if path == "runtime":  # it holds a copy of the model: pickled, so it loads only with trust=True
            with pytest.raises(gs.LoadError, match="trust=True"):
                gs.load(str(file))
        loaded = gs.load(str(file), trust=path == "runtime")
        assert type(loaded.capture) is type(ex.capture)
        assert torch.equal(loaded.explain(x, [1, 2]).gradient, ex.explain(x, [1, 2]).gradient), path


def test_an_unresolved_capture_refuses_to_save_and_says_how(model, tmp_path):
    ex = gs.convert(model, layer="auto")
    with pytest.raises(gs.LayerError, match="explain"):
        ex.save(str(tmp_path / "a.gsx"))
    assert not list(tmp_path.iterdir())


def _tiny_vit():
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=16, mlp_dim=32, num_classes=5).eval()


def test_an_exported_token_explainer_reads_its_captures_with_their_layout():
    """The exported program built its CAMs channels first: a ViT's (B, N, C) token capture then gave a map over
    channels, not positions. It now reads each capture with the explainer's layouts, as explain does."""
    vit = _tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GELU only: nothing is swapped
        ex = gs.convert(vit, layer="encoder.layers.encoder_layer_1.ln_1", example_input=x[:1])
        assert ex.report.layouts["encoder.layers.encoder_layer_1.ln_1"].kind == "tokens"
        e = ex.explain(x, [1, 3])
        out = gs.export_program(ex, x).module()(x, torch.tensor([1, 3]))
    assert tuple(out["cam_raw"].shape) == (2, 4, 4) == tuple(e.cam_raw.shape)
    assert relative_error(out["cam_raw"], e.cam_raw) <= 1e-4
    assert relative_error(out["cam"], e.cam) <= 1e-4


class _Detections(nn.Module):
    """A tiny model returning torchvision's detection format, for the Box target on every path it reaches."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, images):
        out = []
        for scores in self.head(self.body(torch.stack(list(images))).mean(dim=(2, 3))).sigmoid():
            order = scores.argsort(descending=True)
            out.append({"scores": scores[order], "labels": order})
        return out


def test_a_box_target_and_a_list_of_images_work_on_the_runtime_path_with_smoothing():
    torch.manual_seed(0)
    ex = gs.convert(_Detections().eval(), layer="body", capture="runtime")
    images = [torch.randn(3, 12, 12), torch.randn(3, 12, 12)]
    e = ex.explain(images, gs.Box(0))
    assert tuple(e.gradient.shape) == (2, 3, 12, 12) and e.logits.shape == (2, 0)
    smooth = ex.explain(images, gs.Box(1), smooth=2, noise=0.05, generator=torch.Generator().manual_seed(0))
    assert tuple(smooth.gradient.shape) == (2, 3, 12, 12) and smooth.gradient.abs().sum() > 0
    with pytest.raises(gs.TargetError, match="not logits"):
        ex.explain(images, 1)


def test_a_model_without_rectifiers_says_so_once_on_every_path():
    """The run-time path explained a model with no ReLU as "guided" without a word (the graph paths warned)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.randn(2, 3, 12, 12)
    for path in PATHS:
        ex = convert(model, path, x, layer="0")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ex.explain(x)
            ex.explain(x)
        said = [w for w in caught if "no ReLU was found" in str(w.message)]
        assert len(said) == 1 and "gelu" in str(said[0].message).lower(), path


def test_a_conversion_before_the_first_input_reaches_the_capture_picked_then(model, x):
    """``ex.double()`` on a deferred capture (no example: the export path is picked on the first input) was lost:
    the capture was built later on the model's float32 weights and refused the float64 input. The conversion
    is now applied to the capture picked, and the model is left as it was."""
    deferred = convert(model, "deferred", x, layer="layer4").double()
    expected = convert(model, "fx", x, layer="layer4").double().explain(x.double(), [1, 2])
    e = deferred.explain(x.double(), [1, 2])
    assert e.gradient.dtype == torch.float64 and e.cam.dtype == torch.float64
    assert relative_error(e.gradient, expected.gradient) <= 1e-9
    assert next(model.parameters()).dtype == torch.float32


def test_a_callable_target_of_integers_or_of_a_constant_is_handled_alike_on_every_path(explainers, x):
    """A callable returning an integer or boolean tensor, or a constant, reached autograd and raised its raw
    "element 0 of tensors does not require grad". Integers are refused as a TargetError; a constant (a score
    that depends on nothing) gives zero maps and the zero-gradient warning, as a score ignoring the input does."""
    for path, ex in explainers.items():
        for fn in (lambda out: out.argmax(dim=1), lambda out: out[:, 0] > 0):
            with pytest.raises(gs.TargetError, match="floating-point"):
                ex.explain(x, fn)
        with pytest.warns(gs.ZeroGradientWarning):
            e = ex.explain(x, lambda out: torch.ones(out.shape[0]))
        assert not e.gradient.any() and not e.cam.any(), path
