"""The backward rules as autograd ops, and the module-level wrappers that the rewritten graph calls.

Every rule keeps the forward of ReLU (or ReLU6) exactly and changes only the gradient passed down
(METHODS.md):

=========  =============================================
guided     ``max(g, 0) * [0 < x < upper]``
deconvnet  ``max(g, 0)``  (the forward mask is ignored)
=========  =============================================

The mask is read from the op's *output* (``[x > 0] == [relu(x) > 0]``), which is the only tensor saved, so
a guided ReLU saves exactly what ``torch.relu`` saves. In-place calls stay in place (``mark_dirty``).

>>> import torch
>>> x = torch.tensor([-1.0, 2.0, 3.0], requires_grad=True)
>>> guided_relu(x).backward(torch.tensor([5.0, -1.0, 4.0]))
>>> x.grad
tensor([0., 0., 4.])
"""
from typing import Optional

import torch
from torch import Tensor
from torch.fx.node import has_side_effect

aten = torch.ops.aten


def _forward(x: Tensor, upper: Optional[float], inplace: bool) -> Tensor:
    if upper is None:
        return torch.relu_(x) if inplace else torch.relu(x)
    if inplace:
        return torch.nn.functional.hardtanh_(x, 0.0, upper)
    return torch.nn.functional.hardtanh(x, 0.0, upper)


def _mask_by_output(grad: Tensor, out: Tensor, upper: Optional[float]) -> Tensor:
    """``grad * [0 < out < upper]`` with the same kernel the ordinary ReLU/ReLU6 backward uses."""
    if upper is None:
        return aten.threshold_backward(grad, out, 0)
    return aten.hardtanh_backward(grad, out, 0.0, upper)


class GuidedReLUFunction(torch.autograd.Function):
    """ReLU/ReLU6 forward; backward ``max(g, 0)`` masked by the forward's support."""

    @staticmethod
    def forward(ctx, x, upper, inplace):
        out = _forward(x, upper, inplace)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(out)
        ctx.upper = upper
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        # Mask first, then clamp the fresh tensor in place: one temporary instead of two.
        return _mask_by_output(grad, out, ctx.upper).clamp_(min=0), None, None


class DeconvnetReLUFunction(torch.autograd.Function):
    """ReLU/ReLU6 forward; backward ``max(g, 0)``. Saves nothing."""

    @staticmethod
    def forward(ctx, x, upper, inplace):
        out = _forward(x, upper, inplace)
        if inplace:
            ctx.mark_dirty(x)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(min=0), None, None


# Module-level wrappers: these, not Function.apply, are the targets of the rewritten graph, so that the
# generated code is readable, picklable and re-traceable (list them in ``autowrap_functions`` if you re-trace).
# has_side_effect keeps an in-place call whose result is unused from being removed by dead-code elimination.


@has_side_effect
def guided_relu(x: Tensor, inplace: bool = False) -> Tensor:
    """ReLU with the guided-backprop backward."""
    return GuidedReLUFunction.apply(x, None, inplace)


@has_side_effect
def guided_relu6(x: Tensor, inplace: bool = False) -> Tensor:
    """ReLU6 with the guided-backprop backward (mask ``0 < x < 6``)."""
    return GuidedReLUFunction.apply(x, 6.0, inplace)


@has_side_effect
def deconvnet_relu(x: Tensor, inplace: bool = False) -> Tensor:
    """ReLU with the deconvnet backward."""
    return DeconvnetReLUFunction.apply(x, None, inplace)


@has_side_effect
def deconvnet_relu6(x: Tensor, inplace: bool = False) -> Tensor:
    """ReLU6 with the deconvnet backward."""
    return DeconvnetReLUFunction.apply(x, 6.0, inplace)


def plain_relu(x: Tensor, inplace: bool = False) -> Tensor:
    """Ordinary ReLU; the rewrite uses it (out of place) in the plain fork that gives Grad-CAM its gradient."""
    return _forward(x, None, inplace)


def plain_relu6(x: Tensor, inplace: bool = False) -> Tensor:
    """Ordinary ReLU6, as :func:`plain_relu`."""
    return _forward(x, 6.0, inplace)


#: rule name -> (op for ReLU, op for ReLU6). ``gradient`` swaps nothing.
RULE_OPS = {
    "guided": (guided_relu, guided_relu6),
    "deconvnet": (deconvnet_relu, deconvnet_relu6),
}
RULES = ("guided", "deconvnet", "gradient")
PLAIN_OPS = (plain_relu, plain_relu6)
ALL_OPS = tuple(op for pair in RULE_OPS.values() for op in pair) + PLAIN_OPS


def fork_leaf(t: Tensor) -> Tensor:
    """A detached copy-free alias of ``t`` that requires grad: the root of the plain fork."""
    return t.detach().requires_grad_(t.is_floating_point() or t.is_complex())


def fork_detach(t):
    """Detach a tensor entering the plain fork from outside it (no gradient may leak back to the input)."""
    return t.detach() if isinstance(t, Tensor) else t
