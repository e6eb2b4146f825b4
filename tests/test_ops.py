"""The rule ops on their own: forward unchanged, backward as METHODS.md defines, saved tensors as ReLU's."""
import pytest
import torch

from guided_swap import ops


def _grad(fn, x, g, **kwargs):
    x = x.clone().requires_grad_(True)
    fn(x * 1.0, **kwargs).backward(g)  # x * 1.0: a non-leaf, so in-place calls are allowed
    return x.grad


X = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0, 6.0, 7.0])
G = torch.tensor([1.0, -1.0, 2.0, -3.0, 4.0, -5.0, 6.0])


@pytest.mark.parametrize("inplace", [False, True])
def test_guided_relu_backward(inplace):
    assert torch.equal(_grad(ops.guided_relu, X, G, inplace=inplace), G.clamp(min=0) * (X > 0))


@pytest.mark.parametrize("inplace", [False, True])
def test_guided_relu6_uses_its_own_mask(inplace):
    expected = G.clamp(min=0) * ((X > 0) & (X < 6))
    assert torch.equal(_grad(ops.guided_relu6, X, G, inplace=inplace), expected)


@pytest.mark.parametrize("op", [ops.deconvnet_relu, ops.deconvnet_relu6])
def test_deconvnet_ignores_forward_mask(op):
    assert torch.equal(_grad(op, X, G), G.clamp(min=0))


@pytest.mark.parametrize("op,plain", [(ops.guided_relu, torch.relu), (ops.deconvnet_relu, torch.relu),
                                      (ops.guided_relu6, torch.nn.functional.relu6)])
def test_forward_is_bitwise_plain(op, plain):
    x = torch.randn(1000)
    assert torch.equal(op(x), plain(x))
    y = x.clone()
    assert op(y, inplace=True) is y and torch.equal(y, plain(x))


def test_inplace_call_keeps_autograd_history():
    x = torch.randn(10, requires_grad=True)
    y = x * 2
    out = ops.guided_relu(y, inplace=True)
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
    assert _saved_bytes(lambda t: ops.guided_relu(t * 1.0), x) == plain == 4 * 8 * 4
    assert _saved_bytes(lambda t: ops.deconvnet_relu(t * 1.0), x) == 0
    assert _saved_bytes(lambda t: ops.guided_relu(t * 1.0, inplace=True), x) == plain


def test_double_precision_gradcheck_of_the_mask():
    x = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    g = torch.tensor([3.0, 2.0, -1.0], dtype=torch.float64)
    assert torch.equal(_grad(ops.guided_relu, x, g), torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64))
