"""The autograd op that puts a :class:`~guided_swap.rules.Rule` at a rectifier, and the graph's wrappers.

The forward is exactly ReLU's (or ReLU6's: ``upper=6``). The backward first passes the gradient through the
bound ``out < upper`` with its ordinary gradient (ReLU6 is ``min(relu(x), 6)``), then asks the rule. The
output is the only tensor saved, and only when the rule or the bound reads it, so a guided ReLU saves exactly
what ``torch.relu`` saves. In-place calls stay in place (``mark_dirty``).

>>> import torch
>>> from guided_swap.rules import get_rule
>>> x = torch.tensor([-1.0, 2.0, 3.0, 7.0], requires_grad=True)
>>> rectify(x, RuleSlot(get_rule("guided")), upper=6.0).backward(torch.tensor([5.0, -1.0, 4.0, 2.0]))
>>> x.grad
tensor([0., 0., 4., 0.])
"""
import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.fx.node import has_side_effect

from .rules import Rule

aten = torch.ops.aten


class RuleSlot(nn.Module):
    """Holds the explainer's rule inside its graph module (a ``get_attr`` target), so the rule travels with
    the graph when it is copied, saved or moved, and the graph's code stays plain."""

    def __init__(self, rule: Rule):
        super().__init__()
        self.rule = rule

    def extra_repr(self) -> str:
        return repr(self.rule)


def _forward(x: Tensor, upper: Optional[float], inplace: bool) -> Tensor:
    if upper is None:
        return torch.relu_(x) if inplace else torch.relu(x)
    if inplace:
        return torch.nn.functional.hardtanh_(x, 0.0, upper)
    return torch.nn.functional.hardtanh(x, 0.0, upper)


class RectifierFunction(torch.autograd.Function):
    """ReLU/ReLU6 forward; backward: the bound's ordinary gradient, then ``rule.backward``."""

    @staticmethod
    def forward(ctx, x, rule: Rule, upper, inplace):
        out = _forward(x, upper, inplace)
        if inplace:
            ctx.mark_dirty(x)
        if rule.needs_output or upper is not None:
            ctx.save_for_backward(out)
        ctx.rule, ctx.upper = rule, upper
        return out

    @staticmethod
    def backward(ctx, grad):
        out = ctx.saved_tensors[0] if ctx.saved_tensors else None
        if ctx.upper is not None:
            grad = aten.hardtanh_backward(grad, out, -math.inf, ctx.upper)  # zero where out sits at the bound
        return ctx.rule.backward(grad, out if ctx.rule.needs_output else None), None, None, None


# Module-level wrappers: these, not Function.apply, are the targets of the rewritten graph, so that the
# generated code is readable, picklable and re-traceable (they are autowrapped by the library's tracer).
# has_side_effect keeps an in-place call whose result is unused from being removed by dead-code elimination.


@has_side_effect
def rectify(x: Tensor, slot: RuleSlot, upper: Optional[float] = None, inplace: bool = False) -> Tensor:
    """ReLU (``upper=None``) or ReLU6 (``upper=6.0``) whose backward is the rule held by ``slot``."""
    return RectifierFunction.apply(x, slot.rule, upper, inplace)


def plain_rectify(x: Tensor, upper: Optional[float] = None, inplace: bool = False) -> Tensor:
    """Ordinary ReLU/ReLU6; the plain fork that gives Grad-CAM its gradient uses it (out of place)."""
    return _forward(x, upper, inplace)


def fork_leaf(t: Tensor) -> Tensor:
    """A detached copy-free alias of ``t`` that requires grad: the root of the plain fork."""
    return t.detach().requires_grad_(t.is_floating_point() or t.is_complex())


def fork_detach(t):
    """Detach a tensor entering the plain fork from outside it (no gradient may leak back to the input)."""
    return t.detach() if isinstance(t, Tensor) else t


#: The library's own graph functions: the tracer must treat them as leaves when a saved graph is re-traced.
GRAPH_FUNCTIONS = (rectify, plain_rectify, fork_leaf, fork_detach)
