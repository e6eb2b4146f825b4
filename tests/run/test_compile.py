"""The compiled explainer (``ex.compile``) and the eager fast paths: compiled maps equal eager ones, a new batch
size does not recompile, every kind of target works, failures fall back to eager with a warning.

Compiling is slow on a CPU, so the model is a tiny CNN and most tests trace with ``backend="eager"`` (dynamo and
the whole-pass trace, no code generation); one test runs inductor. No timing is asserted.
"""
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import guided_swap as gs
from guided_swap.run import compiled
from guided_swap.core.errors import InputError, TargetError

from conftest import assert_nontrivial, randomise_batchnorm, relative_error


def tiny_cnn(seed: int = 0) -> nn.Module:
    """BatchNorm, an in-place ReLU and a ReLU6, rectifiers after both captured layers (the plain fork), 5 classes."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                          nn.Conv2d(4, 6, 3, padding=1, stride=2), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 5))
    return randomise_batchnorm(model).eval()


LAYERS = ["1", "3"]  # rectifiers follow both: Grad-CAM takes its gradient from the plain fork


def maps(e):
    out = {"gradient": e.gradient, "score": e.score}
    for name, layer in e.layers.items():
        out[f"{name}.cam_raw"], out[f"{name}.cam"] = layer.cam_raw, layer.cam
    return out


def assert_same_maps(actual, expected, tolerance=0.0):
    """Every map equal; the input gradient and at least one CAM non-trivial (a Channel target at the first
    layer gives the second layer a zero gradient, rightly)."""
    actual, expected = maps(actual), maps(expected)
    assert_nontrivial(expected["gradient"], 0.03)  # a unit of the first layer sees a 3x3 patch: 3.5%
    assert max(float((v != 0).float().mean()) for k, v in expected.items() if k.endswith("cam")) >= 0.1
    for name in expected:
        assert relative_error(actual[name], expected[name]) <= tolerance, name


def counted(backend="eager", layers=LAYERS):
    """An explainer compiled with a backend that counts the graphs it compiles."""
    explainer = gs.convert(tiny_cnn(), layer=layers)
    counter = CompileCounterWithBackend(backend)
    explainer.compile(backend=counter)
    return explainer, counter


@pytest.mark.slow
def test_inductor_maps_match_eager_and_float64_and_batches_share_one_graph():
    model = tiny_cnn()
    eager = gs.convert(model, layer=LAYERS)
    explainer, counter = counted("inductor")
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    compiled_maps, eager_maps = maps(explainer.explain(x, [0, 1, 2, 3])), maps(eager.explain(x, [0, 1, 2, 3]))
    exact = maps(gs.convert(tiny_cnn().double(), layer=LAYERS).explain(x.double(), [0, 1, 2, 3]))
    for name, truth in exact.items():
        assert_nontrivial(truth)
        eager_error = relative_error(eager_maps[name].double(), truth)
        compiled_error = relative_error(compiled_maps[name].double(), truth)
        assert relative_error(compiled_maps[name], eager_maps[name]) <= 1e-2, name
        assert compiled_error <= 10 * eager_error + 1e-6, (name, compiled_error, eager_error)
    assert counter.frame_count == 1
    for batch in (2, 3):  # a second and a third batch size reuse the graph of batch 4
        x = torch.randn(batch, 3, 16, 16)
        assert_same_maps(explainer.explain(x, list(range(batch))), eager.explain(x, list(range(batch))), 1e-4)
    assert counter.frame_count == 1


def test_batch_one_compiles_once_and_later_batches_share_one_graph():
    explainer, counter = counted(layers=None)  # no layer: a smaller graph, faster to trace
    for batch in (1, 1, 2, 5, 3):
        explainer.explain(torch.randn(batch, 3, 16, 16))
    assert counter.frame_count == 2  # batch 1 (specialised by torch) and one dynamic graph for every batch >= 2


@pytest.fixture(scope="module")
def shared():
    """One compiled explainer for the target tests (each kind of target compiles once), and its eager twin."""
    explainer, counter = counted()
    return explainer, counter, gs.convert(tiny_cnn(), layer=LAYERS)


def score_difference(outputs):
    return outputs[:, 1] - outputs[:, 2]


@pytest.mark.parametrize("target", [None, 3, [4, 0, 1], gs.Channel("3", 5), gs.Channel("1", 2, unit=(5, 9)),
                                    score_difference], ids=str)
def test_every_target_kind_compiles_and_matches_eager(shared, target):
    explainer, counter, eager = shared
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    before = counter.frame_count
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no graph break, no fallback
        assert_same_maps(explainer.explain(x, target), eager.explain(x, target))
    assert counter.frame_count - before <= 1


def test_new_class_and_channel_values_do_not_recompile(shared):
    explainer, counter, eager = shared
    x = torch.randn(3, 3, 16, 16)
    for kind in ([0, 1, 2], gs.Channel("3", 1), gs.Channel("1", 0, unit=(1, 2))):
        explainer.explain(x, kind)  # compiled here, or by the test before
    before = counter.frame_count
    for target in ([4, 4, 3], 2, gs.Channel("3", 4), gs.Channel("1", 3, unit=(10, 3))):
        assert_same_maps(explainer.explain(x, target), eager.explain(x, target))
    assert counter.frame_count == before


@pytest.mark.parametrize("target,message", [([0, 5, 1], "out of range"), (-1, "out of range"), ([1, 2], "3 samples"),
                                            (gs.Channel("3", 6), "out of range"), (gs.Channel("7", 0), "not captured"),
                                            (gs.Channel("1", 0, unit=(16, 0)), "does not fit"),
                                            (gs.Channel("1", 0, unit=(1,)), "does not fit"),
                                            (lambda outputs: outputs, "one score per sample")], ids=str)
def test_bad_targets_raise_the_eager_errors(shared, target, message):
    explainer, _, _ = shared
    with pytest.raises(TargetError, match=message):
        explainer.explain(torch.randn(3, 3, 16, 16), target)


class DoubledGuided(gs.Rule):
    """A user's rule (guided backprop, doubled): it must run compiled like the built-in ones."""

    name = "doubled-guided"

    def backward(self, grad_output, output):
        return 2 * grad_output.clamp(min=0) * (output > 0)


def test_a_user_rule_compiles_without_graph_breaks():
    model = tiny_cnn()
    explainer = gs.convert(model, layer=LAYERS, rule=DoubledGuided())
    counter = CompileCounterWithBackend("eager")
    explainer.compile(backend=counter)
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e = explainer.explain(x, [1, 2])
    assert_same_maps(e, gs.convert(model, layer=LAYERS, rule=DoubledGuided()).explain(x, [1, 2]))
    assert counter.frame_count == 1


class ItemRule(gs.Rule):
    """A rule that reads a value on the host: torch.compile cannot trace it into the graph."""

    name = "item-guided"

    def backward(self, grad_output, output):
        scale = float(grad_output.abs().max().item()) > -1.0
        return grad_output.clamp(min=0) * (output > 0) * scale


def test_graph_breaks_warn_and_keep_the_eager_results():
    model = tiny_cnn()
    explainer = gs.convert(model, layer=None, rule=ItemRule())
    explainer.compile(backend="eager")
    x = torch.randn(2, 3, 16, 16)
    with pytest.warns(UserWarning, match="graph break"):
        e = explainer.explain(x, [1, 2])
    expected = gs.convert(model, layer=None, rule=ItemRule()).explain(x, [1, 2])
    assert_nontrivial(expected.gradient)
    assert torch.equal(e.gradient, expected.gradient)


def failing_backend(graph, example_inputs):
    raise RuntimeError("this backend always fails")


def test_a_failing_compile_falls_back_to_eager_with_the_reason():
    model = tiny_cnn()
    explainer = gs.convert(model, layer=None)
    explainer.compile(backend=failing_backend)
    x = torch.randn(2, 3, 16, 16)
    with pytest.warns(UserWarning, match="this backend always fails.*runs eagerly"):
        e = explainer.explain(x)
    assert torch.equal(e.gradient, gs.convert(model, layer=None).explain(x).gradient)
    assert "this backend always fails" in explainer._compiled.eager_kinds["argmax"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once; later calls run eagerly in silence
        explainer.explain(x)


def test_compile_refuses_options_torch_does_not_take():
    explainer = gs.convert(tiny_cnn(), layer=LAYERS)
    with pytest.raises(TypeError, match="torch.compile"):
        explainer.compile(no_such_option=True)
    with pytest.raises(ValueError, match="torch.compile refused"):
        explainer.compile(mode="reduce-overhead", options={"triton.cudagraphs": True})
    assert not explainer.compiled


def test_compile_is_in_place_and_not_saved(tmp_path):
    model = tiny_cnn()
    explainer = gs.convert(model, layer=None)
    x = torch.randn(2, 3, 16, 16)
    assert explainer.compile(backend="eager") is None and explainer.compiled
    assert torch.equal(explainer(x), model(x))  # the compiled forward
    compiled_gradient = explainer.explain(x).gradient
    explainer.save(str(tmp_path / "ex.gs"))
    loaded = gs.load(str(tmp_path / "ex.gs"))
    assert not loaded.compiled
    assert_nontrivial(compiled_gradient)
    assert torch.equal(loaded.explain(x).gradient, compiled_gradient)


def test_cudagraph_outputs_are_copied():
    assert compiled.uses_cudagraphs({"mode": "reduce-overhead"}) and compiled.uses_cudagraphs({"mode": "max-autotune"})
    assert not compiled.uses_cudagraphs({}) and not compiled.uses_cudagraphs({"mode": "max-autotune-no-cudagraphs"})
    assert compiled.uses_cudagraphs({"options": {"triton.cudagraphs": True}})
    tree = {"a": torch.ones(2), "b": (torch.zeros(1), 3)}
    copy = compiled.detached_copy(tree)
    assert copy["b"][1] == 3 and torch.equal(copy["a"], tree["a"]) and copy["a"].data_ptr() != tree["a"].data_ptr()


# --- eager: no host synchronisation for the finiteness check --------------------------

def test_finiteness_is_checked_on_cpu_by_default_and_on_request():
    explainer = gs.convert(tiny_cnn(), layer=None)
    x = torch.randn(2, 3, 16, 16)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        explainer.explain(x)
    with pytest.raises(InputError, match="NaN"):
        explainer.explain(x, check_finite=True)
    assert torch.isnan(explainer.explain(x, check_finite=False).logits[0]).all()


def test_finiteness_is_not_read_off_other_devices_by_default():
    """The meta device holds no values: reading them, as a check would on a GPU (a synchronisation), fails."""
    explainer = gs.convert(tiny_cnn(), layer=None).to("meta")
    x = torch.empty(2, 3, 16, 16, device="meta")
    explainer.capture.check(x)
    with pytest.raises((RuntimeError, NotImplementedError)):
        explainer.capture.check(x, check_finite=True)


# --- what the compiled pass hands to eager code, and says so ----------------------------------------------

def test_smoothing_runs_eagerly_with_a_warning_and_the_eager_maps():
    explainer, counter = counted()
    x = torch.randn(2, 3, 16, 16)
    with pytest.warns(UserWarning, match=r"smooth= runs eagerly \(SmoothGrad"):
        e = explainer.explain(x, [1, 2], smooth=3, generator=torch.Generator().manual_seed(0))
    expected = gs.convert(tiny_cnn(), layer=LAYERS).explain(x, [1, 2], smooth=3,
                                                             generator=torch.Generator().manual_seed(0))
    assert_same_maps(e, expected)
    assert counter.frame_count == 0


def channels_last_view(t):
    return t.permute(0, 2, 3, 1)


def test_layouts_reach_the_compiled_cams():
    """A channels-last layout is applied inside the pass; a reshape= layout's CAMs are made eagerly on access.
    Either way every CAM equals the eager explainer's with the same layouts."""
    layouts = dict(layout={"1": "nhwc"}, reshape={"3": channels_last_view})
    explainer = gs.convert(tiny_cnn(), layer=LAYERS, **layouts)
    explainer.compile(backend="eager")
    x = torch.randn(2, 3, 16, 16)
    e, expected = explainer.explain(x, [0, 3]), gs.convert(tiny_cnn(), layer=LAYERS, **layouts).explain(x, [0, 3])
    assert tuple(e.layers["1"].cam_raw.shape) == (2, 4, 16)  # the layout was used: (C, H, W) read as (H, W, C)
    key = ("gradcam", gs.cam.gradcam)
    assert key in e.layers["1"].cams_raw._cache and key not in e.layers["3"].cams_raw._cache  # made in the pass, or not
    assert_same_maps(e, expected)
    for name in ("gradcam++", "layercam"):
        assert torch.equal(e.layers["3"].cams[name], expected.layers["3"].cams[name])


def test_the_run_time_capture_explains_eagerly_with_a_warning():
    explainer = gs.convert(tiny_cnn(), layer="3", capture="runtime")
    with pytest.warns(UserWarning, match="captures the model at run time.*runs eagerly"):
        explainer.compile(backend="eager")
    assert not explainer.compiled
    x = torch.randn(2, 3, 16, 16)
    assert_nontrivial(explainer.explain(x, [0, 1]).gradient, 0.03)


def test_a_deferred_explainer_compiled_before_its_capture():
    """capture="export" captures from the first input: compile() before it applies to the captured graph, whose
    shape check (eval of torch.export's guards) is traced without a graph break and still refuses a misfit."""
    explainer = gs.convert(tiny_cnn(), layer="3", capture="export", layout="nchw")
    counter = CompileCounterWithBackend("eager")
    explainer.compile(backend=counter)
    eager = gs.convert(tiny_cnn(), layer="3", capture="export", layout="nchw")
    for batch in (2, 3):
        x = torch.randn(batch, 3, 16, 16)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            e = explainer.explain(x, list(range(batch)))
        assert_same_maps(e, eager.explain(x, list(range(batch))), 1e-5)
    assert counter.frame_count == 1 and "export" in explainer.report.capture
    with pytest.raises(InputError, match="does not fit"):
        explainer.explain(torch.randn(2, 3, 20, 20))
