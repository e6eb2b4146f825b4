"""The torch.export capture path: the same Traced as the fx path, for models that torch.fx cannot trace.

Exactness is checked against the model itself (logits bit for bit) and the fx-free reference (every ReLU
call counted at run time; the guided input gradient), never against the fx path's own output.
"""
import collections
import inspect
import io
import os
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import guided_swap as gs
from guided_swap.checks import reference
from guided_swap.capture.graph import rewrite
from guided_swap.capture import spellings
from guided_swap.core.errors import InputError, TraceError
from guided_swap.capture.graph.export_trace import fx_failure_site, trace_export
from guided_swap.core.rules import get_rule
from guided_swap.capture.graph.trace import trace

from conftest import assert_nontrivial, image_batch, lively_targets, make_model, randomise_batchnorm, relative_error
from models import FunctionalResNet
from untraceable_models import UNTRACEABLE, DataDependentNet, ShapeArithmeticNet, ShapeAssertNet

timm = pytest.importorskip("timm")


def swap_rectifiers(gm):
    """The rewrite's swap step with the guided rule."""
    swaps, _ = rewrite.swap_rectifiers(gm, get_rule("guided"))
    gm.recompile()
    return swaps


def timm_model(name, **kwargs):
    torch.manual_seed(0)
    return randomise_batchnorm(timm.create_model(name, pretrained=False, num_classes=10, **kwargs)).eval()


def hand_model(cls):
    torch.manual_seed(0)
    return randomise_batchnorm(cls()).eval()


# Models torch.fx cannot trace: timm's VGG (its ConvMlp head branches on the map size) and our own (ReLU6
# included). benchmarks/export_sweep_timm.py runs the same checks on every timm family fx cannot trace;
# tests/test_timm.py converts one of them end to end.
EXPORT_ONLY = {
    "timm_vgg11": lambda: timm_model("vgg11", mlp_ratio=0.0625),  # a narrow head keeps the test light
    **{name: (lambda cls=cls: hand_model(cls)) for name, cls in UNTRACEABLE.items()},
}


def snapshot(model):
    return {name: (tensor, tensor.detach().clone()) for name, tensor in model.state_dict(keep_vars=True).items()}


def assert_untouched(model, before, training=False):
    after = model.state_dict(keep_vars=True)
    assert sorted(after) == sorted(before)
    for name, (tensor, value) in before.items():
        assert after[name] is tensor, f"{name} was replaced"
        assert torch.equal(tensor.detach(), value), f"{name} changed"
    for module in model.modules():
        assert module.training == training
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks


@pytest.fixture(scope="module")
def x():
    return image_batch(64)


@pytest.mark.parametrize("name", sorted(EXPORT_ONLY))
def test_export_path_is_exact_where_fx_fails(name, x):
    model = EXPORT_ONLY[name]()
    with pytest.raises(TraceError):
        trace(model)
    before = snapshot(model)
    traced = trace_export(model, x)
    swaps = swap_rectifiers(traced.module)
    with torch.no_grad():
        assert torch.equal(traced.module(x), model(x))
    assert len(swaps) == reference.count_relu_calls(model, x) > 0
    target = model(x).argmax(dim=1)
    leaf = x.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(traced.module(leaf).gather(1, target.view(-1, 1)).sum(), leaf)
    expected = reference.input_gradient(model, x, target, "guided")
    assert_nontrivial(expected)
    assert relative_error(gradient, expected) <= 1e-5
    assert_untouched(model, before)


@pytest.mark.parametrize("name,layer", [("ShapeAssertNet", "block"), ("ShapeArithmeticNet", "layer")])
def test_cam_on_the_export_path_equals_a_hooked_gradcam(name, layer, x):
    """The export graph holds aten overloads (``aten.conv2d.default``): the CAM must still find its channels."""
    model = hand_model(UNTRACEABLE[name])
    target = lively_targets(model, x, model.get_submodule(layer), candidates=4)
    ex = gs.convert(model, layer=layer)
    e = ex.explain(x, target)
    assert ex.report.capture.startswith("export (fx failed at"), ex.report.capture
    expected = reference.gradcam(model, x, target, model.get_submodule(layer))
    assert_nontrivial(expected)
    assert relative_error(e.cam_raw, expected) <= 1e-5


def test_fx_failure_site_names_the_model_line():
    for cls in UNTRACEABLE.values():
        with pytest.raises(TraceError) as caught:
            trace(cls())
        lines, start = inspect.getsourcelines(cls.forward)
        expected = start + next(i for i, line in enumerate(lines) if "# fx stops here" in line)
        assert fx_failure_site(caught.value) == f"untraceable_models.py:{expected}"


def _error_raised_in(torch_file, caller_file):
    """An error raised by a function "in" ``torch_file``, called from a function "in" ``caller_file``."""
    scope = {}
    exec(compile("def inner():\n    raise RuntimeError('inside torch')\n", torch_file, "exec"), scope)
    exec(compile("def outer(inner):\n    return inner()\n", caller_file, "exec"), scope)
    try:
        scope["outer"](scope["inner"])
    except RuntimeError as error:
        return error


def test_fx_failure_site_keeps_torchvision_frames_and_skips_torch():
    torch_dir = os.path.dirname(torch.__file__)
    vision_dir = os.path.dirname(torchvision.__file__)
    # torchvision's directory starts with torch's as a string: only a component-wise test keeps it.
    error = _error_raised_in(os.path.join(torch_dir, "nn", "fake.py"), os.path.join(vision_dir, "models", "fake.py"))
    assert fx_failure_site(error) == "torchvision/models/fake.py:2"
    wrapped = TraceError("fx could not trace")
    wrapped.__cause__ = error
    assert fx_failure_site(wrapped) == "torchvision/models/fake.py:2"


@pytest.mark.parametrize("name, layers", [
    ("resnet18", ["layer4", "layer3.1", "layer2.0.downsample", "layer4.1.relu", "layer4.1.relu_1", "maxpool"]),
    ("vgg11", ["features", "features.18", "features.19", "features.20", "avgpool", "classifier.1"]),
])
def test_names_and_module_outputs_match_the_fx_path(name, layers, x):
    model = make_model(name)
    by_fx, by_export = trace(model), trace_export(model, x)
    assert set(by_export.node_names) == set(by_fx.node_names)
    for layer, expected in zip(layers, _activations(by_fx, layers, x)):
        actual = _activations(by_export, [layer], x)[0]
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_nontrivial(e)
            assert torch.equal(a, e), layer


def _activations(traced, names, x):
    """Per name, the value of each node it resolves to (module outputs, else a node name), cloned when made."""
    graph = traced.module.graph
    groups = [traced.module_outputs.get(name) or [traced.node_names[name]] for name in names]
    clones = []
    for nodes in groups:
        group = []
        for node in nodes:
            with graph.inserting_after(node):
                group.append(graph.call_function(torch.clone, (node,)))
        clones.append(tuple(group))
    next(n for n in graph.nodes if n.op == "output").args = (tuple(clones),)
    traced.module.recompile()
    with torch.no_grad():
        return traced.module(x)


class AtenSpellings(nn.Module):
    """Rectifiers in every spelling export lowers to, and look-alikes with other bounds."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu6 = nn.ReLU6(inplace=True)
        self.threshold = nn.Threshold(0.0, 0.0)

    def forward(self, x):
        x = self.conv(x)
        rectified = [
            F.relu(x), torch.relu_(x * 1), F.relu6(x), F.relu6(x * 1, inplace=True), self.relu6(x * 1),
            F.hardtanh(x, 0.0, 6.0), torch.clamp(x, min=0), x.clamp(0, 6), torch.clip(x, min=0), x.clamp_min(0),
            (x * 1).clamp_(min=0), (x * 1).clamp_min_(0), F.threshold(x, 0.0, 0.0), self.threshold(x),
            F.threshold(x * 1, 0, 0, inplace=True),
        ]
        others = [torch.clamp(x, 0, 3), torch.clamp(x, min=-1), x.clamp_min(0.5), F.threshold(x, 0.1, 0.0),
                  F.hardtanh(x), F.gelu(x), F.leaky_relu(x)]
        return sum(t.mean() for t in rectified + others).view(1)


def test_aten_spellings_are_read_at_their_bounds_only():
    model = AtenSpellings().eval()
    x = torch.randn(2, 3, 8, 8)
    traced = trace_export(model, x)
    swaps = swap_rectifiers(traced.module)
    assert sorted(s.spelling for s in swaps) == sorted([
        "aten.relu", "aten.relu_", "aten.relu6", "aten.relu6_", "aten.hardtanh_(0, 6)", "aten.hardtanh(0, 6)",
        "aten.clamp", "aten.clamp(0, 6)", "aten.clip", "aten.clamp_min", "aten.clamp_", "aten.clamp_min_",
        "aten.threshold", "aten.threshold", "aten.threshold_"])
    assert all(s.inplace == s.spelling.split("(")[0].endswith("_") for s in swaps)
    with torch.no_grad():
        assert torch.equal(traced.module(x), model(x))
    left, _ = rewrite.unswapped_activations(traced.module)
    assert sorted(kind for _, kind in left) == ["aten.gelu", "aten.hardtanh", "aten.leaky_relu"]


def test_spelling_reader_gives_bounds_and_flags():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    cases = {
        graph.call_function(torch.ops.aten.clamp.default, (x, 0, 6)): ("aten.clamp(0, 6)", False, 6.0),
        graph.call_function(torch.ops.aten.clamp_.default, (x,), {"min": 0.0}): ("aten.clamp_", True, None),
        graph.call_function(torch.ops.aten.hardtanh_.default, (x, 0.0, 6.0)): ("aten.hardtanh_(0, 6)", True, 6.0),
        graph.call_function(torch.ops.aten.relu6.default, (x,)): ("aten.relu6", False, 6.0),
        graph.call_function(torch.ops.aten.relu, (x,)): ("aten.relu", False, None),  # an overload packet
    }
    for node, (spelling, inplace, upper) in cases.items():
        call = spellings.match(node)
        assert (call.spelling, call.inplace, call.upper, call.input) == (spelling, inplace, upper, x)
    for args in [(x, 0, 5), (x, False), (x, None, 6), (x, 1)]:
        assert spellings.match(graph.call_function(torch.ops.aten.clamp.default, args)) is None


def test_rewrite_reads_in_place_aten_ops(x):
    traced = trace_export(hand_model(FunctionalResNet), x)  # its blocks do `out += self.shortcut(x)`
    gm, add, bn2 = traced.module, traced.node_names["layer2.1.add"], traced.node_names["layer2.1.bn2"]
    assert add.target is torch.ops.aten.add_.Tensor and rewrite.mutated_input(gm, add) is bn2
    with torch.no_grad():
        expected = gm(x)
        assert rewrite.protect(gm, [bn2]) == ["layer2.1.add"]
        gm.recompile()
        assert add.target is torch.ops.aten.add.Tensor and torch.equal(gm(x), expected)


def test_weights_are_shared_and_the_input_is_checked(x):
    model = hand_model(ShapeAssertNet)
    traced = trace_export(model, x)
    assert traced.module.get_parameter("stem.0.weight") is model.stem[0].weight
    assert traced.module.get_buffer("stem.1.running_mean") is model.stem[1].running_mean
    with torch.no_grad():
        model.stem[0].weight.mul_(1.5)  # an in-place update the graph must see
        assert torch.equal(traced.module(x[:1]), model(x[:1]))  # any batch size
        with pytest.raises(InputError, match="example of shape"):
            traced.module(image_batch(32))
        flexible = trace_export(model, x, dynamic_size=True)
        assert torch.equal(flexible.module(image_batch(32)), model(image_batch(32)))
        with pytest.raises(InputError, match="% 8"):  # the model's own assert, kept as a condition
            flexible.module(torch.randn(1, 3, 36, 36))


def test_training_mode_model_is_captured_as_deployed(x):
    model = hand_model(ShapeAssertNet).train()
    before = snapshot(model)
    traced = trace_export(model, x)
    out = traced.module(x)
    assert_untouched(model, before, training=True)
    with torch.no_grad():
        assert torch.equal(out, model.eval()(x))


class WritesState(nn.Module):
    """Counts its calls in a buffer and always normalises with batch statistics (updating the running ones)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.register_buffer("calls", torch.zeros(()))
        self.cache = {}

    def forward(self, x):
        self.calls += 1
        self.cache["last"] = x.shape[-1]
        y = F.batch_norm(self.conv(x), self.bn.running_mean, self.bn.running_var, training=True)
        return F.relu(y).mean(dim=(2, 3))


def test_state_written_in_forward_gets_a_private_copy():
    model = WritesState().eval()
    before = snapshot(model)
    traced = trace_export(model, torch.randn(2, 3, 8, 8))
    traced.module(torch.randn(2, 3, 8, 8))
    assert traced.module.meta["guided_swap_private_state"] == ["bn.running_mean", "bn.running_var", "calls"]
    assert float(traced.module.calls) == 1
    assert_untouched(model, before)
    assert model.cache == {}


def test_save_load_and_make_fx(x):
    from torch.fx.experimental.proxy_tensor import make_fx

    model = hand_model(ShapeArithmeticNet)
    traced = trace_export(model, x)
    swap_rectifiers(traced.module)
    loaded = torch.load(_saved(traced.module), weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(InputError):  # the shape check survives a round trip
        loaded(image_batch(32))
    state = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    graph = make_fx(lambda s, t: torch.func.functional_call(loaded, s, (t,)), tracing_mode="symbolic")(state, x)
    with torch.no_grad():
        assert torch.equal(graph(state, x[:1]), model(x[:1]))


Pair = collections.namedtuple("Pair", "logits features")


class StructuredOutput(nn.Module):
    """Returns a namedtuple inside a dict, and asserts on the input (so fx cannot trace it)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        assert x.dim() == 4, "a batch of images"
        features = F.relu(self.conv(x))
        return {"pair": Pair(self.fc(features.mean(dim=(2, 3))), features), "scale": x.abs().amax()}


def test_output_structure_is_kept():
    model, x = StructuredOutput().eval(), torch.randn(2, 3, 8, 8)
    traced = trace_export(model, x)
    loaded = torch.load(_saved(traced.module), weights_only=False)
    for module in (traced.module, loaded):
        with torch.no_grad():
            out, expected = module(x), model(x)
        assert type(out["pair"]) is Pair and out.keys() == expected.keys()
        assert all(torch.equal(a, b) for a, b in zip(out["pair"], expected["pair"]))


def _saved(module) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return buffer


def test_errors_are_clear(x):
    with pytest.raises(TypeError, match="needs one input tensor.*got a list"):
        trace_export(ShapeAssertNet(), [1, 2, 3])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        trace_export(lambda t: t, x)
    with pytest.raises(TraceError, match="torch.export could not capture DataDependentNet"):
        trace_export(DataDependentNet(), x)
    with pytest.raises(TraceError, match="the model itself fails"):
        trace_export(ShapeAssertNet(), torch.randn(1, 3, 60, 60))


def test_a_failure_inside_torch_s_own_modules_says_what_failed():
    """DataParallel fails inside torch's code, where no line is the user's: the reason names torch's line and the
    error, not "unknown"."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    ex = gs.convert(nn.DataParallel(net).eval(), layer=None, example_input=torch.zeros(1, 3, 16, 16))
    capture = ex.report.capture
    assert "unknown" not in capture, capture
    assert re.search(r"fx failed at torch/nn/parallel/data_parallel\.py:\d+ in forward \(inside torch\): "
                     r"TraceError: Proxy object cannot be iterated", capture), capture
