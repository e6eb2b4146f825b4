"""The graph passes on their own, on tiny hand-built graphs: one behaviour per test."""
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from guided_swap.capture.graph import layers as capture
from guided_swap.capture import ops
from guided_swap.capture.graph import rewrite
from guided_swap.capture.graph.plan import GraphOutputs, SwappedGraph
from guided_swap.core.errors import LayerError
from guided_swap.core.rules import get_rule
from guided_swap.capture.graph.trace import trace

GUIDED = get_rule("guided")


def _graph(fn, *modules):
    """A GraphModule from a function of ``x`` and modules held as ``m0``, ``m1``, ..."""
    root = nn.Module()
    for index, module in enumerate(modules):
        root.add_module(f"m{index}", module)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            for name, module in root.named_children():
                self.add_module(name, module)

        def forward(self, x):
            return fn(self, x)

    return fx.symbolic_trace(Wrapper())


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]


def test_swap_replaces_a_functional_relu_by_the_rule_op():
    gm = _graph(lambda self, x: F.relu(x))
    swaps, replaced = rewrite.swap_rectifiers(gm, GUIDED)
    assert [s.spelling for s in swaps] == ["F.relu"] and _targets(gm) == [ops.rectify]
    assert list(replaced.values())[0].kwargs == {"upper": None, "inplace": False}


def test_swap_keeps_an_inplace_call_in_place():
    gm = _graph(lambda self, x: x.relu_())
    rewrite.swap_rectifiers(gm, GUIDED)
    (node,) = [n for n in gm.graph.nodes if n.target is ops.rectify]
    assert node.kwargs["inplace"] is True


def test_swap_reads_relu6_bounds_from_the_module():
    gm = _graph(lambda self, x: self.m0(x), nn.ReLU6())
    rewrite.swap_rectifiers(gm, GUIDED)
    (node,) = [n for n in gm.graph.nodes if n.target is ops.rectify]
    assert node.kwargs["upper"] == 6.0


def test_swap_leaves_a_hardtanh_that_is_not_relu6():
    gm = _graph(lambda self, x: self.m0(x), nn.Hardtanh(-1.0, 1.0))
    swaps, _ = rewrite.swap_rectifiers(gm, GUIDED)
    assert swaps == [] and ops.rectify not in _targets(gm)


def test_swap_puts_the_rule_in_one_slot_module():
    gm = _graph(lambda self, x: torch.relu(F.relu(x)))
    rewrite.swap_rectifiers(gm, GUIDED)
    slots = [n for n in gm.graph.nodes if n.op == "get_attr"]
    assert len(slots) == 1 and gm.get_submodule(slots[0].target).rule is GUIDED


def test_an_ordinary_rule_swaps_nothing():
    gm = _graph(lambda self, x: F.relu(x))
    assert rewrite.swap_rectifiers(gm, get_rule("gradient")) == ([], {})
    assert _targets(gm) == [F.relu]


def test_protect_makes_an_inplace_user_of_a_capture_out_of_place():
    gm = _graph(lambda self, x: F.relu(self.m0(x), inplace=True) * 2, nn.Conv2d(1, 1, 1))
    conv = next(n for n in gm.graph.nodes if n.op == "call_module")
    changed = rewrite.protect(gm, [conv])
    relu = next(n for n in gm.graph.nodes if n.target is F.relu)
    assert changed == [relu.name] and rewrite.mutated_input(gm, relu) is None


def test_protect_redirects_later_uses_of_the_mutated_tensor():
    def fn(self, x):
        y = self.m0(x)
        y.relu_()  # result unused: later code reads y, which must now be the ReLU's result
        return y + 1

    gm = _graph(fn, nn.Conv2d(1, 1, 1))
    conv = next(n for n in gm.graph.nodes if n.op == "call_module")
    rewrite.protect(gm, [conv])
    add = next(n for n in gm.graph.nodes if n.target is operator.add)
    assert add.args[0].target == "relu"  # reads the (now out-of-place) relu, not the captured conv output


def test_protect_turns_an_aten_inplace_op_into_its_functional_twin():
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(torch.ops.aten.relu_.default, (x,))
    graph.output(y)
    gm = fx.GraphModule(nn.Module(), graph)
    rewrite.protect(gm, [x])
    assert y.target is torch.ops.aten.relu.default


def test_protect_refuses_an_inplace_op_without_an_out_of_place_form():
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.call_function(operator.setitem, (x, 0, 1.0))
    graph.output(x)
    gm = fx.GraphModule(nn.Module(), graph)
    with pytest.raises(LayerError, match="overwrites a captured tensor"):
        rewrite.protect(gm, [x])


def test_no_fork_when_no_rectifier_follows_the_capture():
    gm = _graph(lambda self, x: self.m0(F.relu(x)), nn.Conv2d(1, 1, 1))
    _, replaced = rewrite.swap_rectifiers(gm, GUIDED)
    conv = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert not rewrite.needs_fork([conv], list(replaced.values()))


def test_fork_copies_the_tail_with_plain_rectifiers_fed_by_a_detached_leaf():
    gm = _graph(lambda self, x: self.m1(F.relu(self.m0(x))), nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 1))
    _, replaced = rewrite.swap_rectifiers(gm, GUIDED)
    conv = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert rewrite.needs_fork([conv], list(replaced.values()))
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    fork_out, (fork_capture,) = rewrite.fork_plain(gm, [conv], output_node.args[0])
    assert fork_capture.target is ops.fork_leaf and fork_capture.args == (conv,)
    assert fork_out.target == "m1" and fork_out.args[0].target is ops.plain_rectify
    assert fork_out.args[0].args[0] is fork_capture


def test_fork_copies_of_inplace_ops_never_write_to_the_main_graph():
    def fn(self, x):
        y = self.m0(x)
        z = self.m1(y)
        z.relu_()
        return z.sum(dim=(2, 3))

    gm = _graph(fn, nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 1))
    _, replaced = rewrite.swap_rectifiers(gm, GUIDED)
    conv = next(n for n in gm.graph.nodes if n.target == "m0")
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    fork_out, _ = rewrite.fork_plain(gm, [conv], output_node.args[0])
    plain = next(n for n in gm.graph.nodes if n.target is ops.plain_rectify)
    assert plain.kwargs.get("inplace", False) is False
    assert fork_out.args[0] is plain  # the sum reads the plain ReLU's result, as the original reads z


def test_explain_graph_returns_named_outputs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.relu(self.conv(x)).mean(dim=(2, 3)))

    model = Net().eval()
    plan = SwappedGraph(trace(model), model, ["conv"], GUIDED, None)
    built = plan.build(None)
    out = GraphOutputs(*built.graph_module(torch.randn(1, 3, 8, 8)))
    assert built.forked and out.model.shape == (1, 2) and out.captures[0].shape == (1, 4, 6, 6)
    assert out.fork_model.shape == (1, 2) and out.fork_captures[0].requires_grad


def test_capture_resolves_a_module_to_what_it_returned():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())

        def forward(self, x):
            return self.block(x) * 2

    model = Net()
    traced = trace(model)
    assert capture.resolve("block", traced, model).meta["qualname"] == "block.1"
    assert capture.resolve("block.0", traced, model).meta["qualname"] == "block.0"


def test_capture_suggests_close_names_for_a_typo():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())
    with pytest.raises(LayerError, match="closest names"):
        capture.resolve("O", trace(model), model)
