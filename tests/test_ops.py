"""The rectifier op on its own: forward unchanged, backward as docs/methods.md defines, saved tensors as ReLU's."""
import functools

import pytest
import torch

from guided_swap import ops
from guided_swap.rules import get_rule


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
