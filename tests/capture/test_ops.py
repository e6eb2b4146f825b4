"""The rectifier op on its own: forward unchanged, backward as docs/methods.md defines, saved tensors as ReLU's."""
import functools

import pytest
import torch

import guided_swap as gs
from guided_swap.capture import ops
from guided_swap.checks import reference
from guided_swap.core.errors import RuleError
from guided_swap.run.program import export_program
from guided_swap.core.rules import get_rule


def op(rule: str, upper=None):
    """The graph's wrapper with a rule and a bound fixed, as the rewrite calls it."""
    return functools.partial(ops.rectify, slot=ops.RuleSlot(get_rule(rule)), upper=upper)


def _grad(fn, x, g, **kwargs):
    x = x.clone().requires_grad_(True)
    fn(x * 1.0, **kwargs).backward(g)  # x * 1.0: a non-leaf, so in-place calls are allowed
    return x.grad


X = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0, 6.0, 7.0])
G = torch.tensor([1.0, -1.0, 2.0, -3.0, 4.0, -5.0, 6.0])


@pytest.mark.parametrize("inplace", [False, True])
def test_guided_relu_backward(inplace):
    assert torch.equal(_grad(op("guided"), X, G, inplace=inplace), G.clamp(min=0) * (X > 0))


@pytest.mark.parametrize("inplace", [False, True])
def test_guided_relu6_uses_its_own_mask(inplace):
    expected = G.clamp(min=0) * ((X > 0) & (X < 6))
    assert torch.equal(_grad(op("guided", 6.0), X, G, inplace=inplace), expected)


def test_deconvnet_ignores_forward_mask():
    assert torch.equal(_grad(op("deconvnet"), X, G), G.clamp(min=0))


def test_deconvnet_relu6_keeps_only_the_bound():
    """ReLU6 = min(relu(x), 6): the clip keeps its ordinary gradient, the rule acts on the ReLU part."""
    assert torch.equal(_grad(op("deconvnet", 6.0), X, G), G.clamp(min=0) * (X < 6))


@pytest.mark.parametrize("upper", [None, 6.0])
def test_gradient_rule_equals_autograd(upper):
    plain = torch.relu if upper is None else torch.nn.functional.relu6
    assert torch.equal(_grad(op("gradient", upper), X, G), _grad(plain, X, G))


@pytest.mark.parametrize("rule,upper", [("guided", None), ("deconvnet", None), ("guided", 6.0), ("gradient", 6.0)])
def test_forward_is_bitwise_plain(rule, upper):
    plain = torch.relu if upper is None else torch.nn.functional.relu6
    x = torch.randn(1000) * 5
    assert torch.equal(op(rule, upper)(x), plain(x))
    y = x.clone()
    assert op(rule, upper)(y, inplace=True) is y and torch.equal(y, plain(x))


def test_inplace_call_keeps_autograd_history():
    x = torch.randn(10, requires_grad=True)
    y = x * 2
    out = op("guided")(y, inplace=True)
    assert out is y and out.grad_fn is not None
    (out * torch.arange(10.0)).sum().backward()
    assert torch.equal(x.grad, 2 * torch.arange(10.0) * (x > 0))


def _saved_bytes(fn, x):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(storages.values())


def test_guided_saves_what_relu_saves_and_deconvnet_nothing():
    x = torch.randn(4, 8, requires_grad=True)
    plain = _saved_bytes(lambda t: torch.relu(t * 1.0), x)
    assert _saved_bytes(lambda t: op("guided")(t * 1.0), x) == plain == 4 * 8 * 4
    assert _saved_bytes(lambda t: op("deconvnet")(t * 1.0), x) == 0
    assert _saved_bytes(lambda t: op("guided")(t * 1.0, inplace=True), x) == plain


def test_double_precision_mask():
    x = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    g = torch.tensor([3.0, 2.0, -1.0], dtype=torch.float64)
    assert torch.equal(_grad(op("guided"), x, g), torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64))


def test_plain_rectify_is_relu_and_relu6():
    x = torch.randn(100) * 8
    assert torch.equal(ops.plain_rectify(x), torch.relu(x))
    assert torch.equal(ops.plain_rectify(x, upper=6.0), torch.nn.functional.relu6(x))


# --- the native-node path: any rule that defines incoming() -----------------------------------------------

class ScaledGuided(gs.Rule):
    """A user's rule in the incoming() form only: guided backprop of a gradient scaled by 3 (its backward is
    Rule's default, incoming(g) * [out > 0])."""

    name = "scaled-guided"

    def incoming(self, grad_output):
        return 3 * grad_output.clamp(min=0)


class NearlyGuided(gs.Rule):
    """A user's guided rule in the backward() form only: no incoming(), so the Function path."""

    name = "nearly-guided"

    def backward(self, grad_output, output):
        return grad_output.clamp(min=0) * (output > 0)


def _native_and_function(rule, upper, inplace, x, g):
    fast = _grad(lambda t: ops.rectify(t, ops.RuleSlot(rule), upper=upper, inplace=inplace), x, g)
    function = _grad(lambda t: ops.RectifierFunction.apply(t, rule, upper, inplace), x, g)
    return fast, function


@pytest.mark.parametrize("upper", [None, 6.0])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("rule", [get_rule("guided"), ScaledGuided()], ids=["guided", "user"])
def test_the_native_path_equals_the_rule_function_bit_for_bit(rule, upper, inplace):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 5
    x[0, :8] = torch.tensor([0.0, 6.0, -0.0, 5.999, 6.001, 1e-30, -1e-30, 0.5])
    g = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    fast, function = _native_and_function(rule, upper, inplace, x, g)
    mask = (x > 0) & (x < (upper or float("inf")))
    expected = (3 if isinstance(rule, ScaledGuided) else 1) * g.clamp(min=0) * mask
    assert float((fast != 0).float().mean()) > 0.1
    assert torch.equal(fast, function) and torch.equal(fast, expected)


def test_which_rules_take_the_native_path():
    """Every rule that defines incoming(), built-in or not; never deconvnet (no mask), a backward()-only rule,
    an in-place call on a view, or a compiled trace."""
    y = torch.randn(6, requires_grad=True) * 1.0
    assert [ops.native_path(r, y, False) for r in (get_rule("guided"), ScaledGuided(), get_rule("deconvnet"),
                                                   NearlyGuided())] == [True, True, False, False]
    assert not ops.native_path(get_rule("guided"), y[:3], inplace=True) and ops.native_path(get_rule("guided"), y[:3], False)
    assert type(ops.rectify(y, ops.RuleSlot(ScaledGuided())).grad_fn).__name__ == "ReluBackward0"
    assert type(ops.rectify(y, ops.RuleSlot(ScaledGuided()), upper=6.0).grad_fn).__name__ == "HardtanhBackward0"
    assert type(ops.rectify(y, ops.RuleSlot(NearlyGuided())).grad_fn).__name__ == "RectifierFunctionBackward"
    seen = []
    torch.compile(lambda t: seen.append(ops.native_path(get_rule("guided"), t, False)) or t, backend="eager",
                  fullgraph=False)(torch.ones(2))
    assert seen == [False]


def test_the_native_path_saves_what_relu_saves_and_stays_in_place():
    x = torch.randn(4, 8, requires_grad=True)
    for upper, plain in ((None, torch.relu), (6.0, torch.nn.functional.relu6)):
        op_ = functools.partial(ops.rectify, slot=ops.RuleSlot(ScaledGuided()), upper=upper)
        assert _saved_bytes(lambda t: op_(t * 1.0), x) == _saved_bytes(lambda t: plain(t * 1.0), x) == 4 * 8 * 4
        y = x * 1.0
        assert op_(y, inplace=True) is y and torch.equal(y, plain(x))


def test_hooks_nothing_without_grad_and_an_inplace_view_takes_the_function():
    slot = ops.RuleSlot(get_rule("guided"))
    with torch.no_grad():
        x = torch.randn(8)
        assert torch.equal(ops.rectify(x, slot), torch.relu(x))
    base = torch.randn(4, 6, requires_grad=True)
    y = base * 1.0
    ops.rectify(y[:, :3], slot, inplace=True)  # the view's node is its base's: a pre-hook would clamp all of it
    g = torch.randn(4, 6)
    (y * g).sum().backward()
    expected = torch.where(torch.arange(6) < 3, g.clamp(min=0) * (base > 0), g)
    assert torch.equal(base.grad, expected.detach())


def test_incoming_rules_are_checked():
    class Masked(gs.Rule):
        name = "masked-nothing"
        needs_output = False

        def incoming(self, grad_output):
            return grad_output

    with pytest.raises(RuleError, match="incoming"):
        get_rule(Masked())

    class Neither(gs.Rule):
        name = "neither"

    with pytest.raises(RuleError, match="does not define backward"):
        get_rule(Neither())


def test_a_user_incoming_rule_explains_exports_and_saves(tmp_path):
    """A user's incoming() rule on a model: the map equals the fx-free reference (which applies the rule's
    backward, never incoming), the .pt2 program records the pre-hook (its map is the rule's, not the plain
    gradient), and save/load keeps it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(inplace=True),
                                torch.nn.Conv2d(4, 5, 3, padding=1), torch.nn.ReLU6(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(5, 3)).eval()
    x, target = torch.randn(2, 3, 12, 12), torch.tensor([0, 2])
    explainer = gs.convert(model, layer=None, rule=ScaledGuided())
    gradient = explainer.explain(x, target).gradient
    expected = reference.input_gradient(model, x, target, ScaledGuided())
    plain = gs.convert(model, layer=None, rule="gradient").explain(x, target).gradient
    assert float((gradient != 0).float().mean()) > 0.3 and not torch.allclose(gradient, plain)
    assert torch.allclose(gradient, expected, rtol=1e-5, atol=1e-7)
    program = export_program(explainer, x).module()
    assert torch.allclose(program(x, target)["gradient"], expected, rtol=1e-5, atol=1e-7)
    explainer.save(str(tmp_path / "ex.gs"))
    with pytest.raises(gs.LoadError, match="register_rule"):  # a rule of the user's is code: not run from a file
        gs.load(str(tmp_path / "ex.gs"))
    assert torch.equal(gs.load(str(tmp_path / "ex.gs"), trust=True).explain(x, target).gradient, gradient)
