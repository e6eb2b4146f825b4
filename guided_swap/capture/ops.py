"""The autograd op that puts a :class:`~guided_swap.core.rules.Rule` at a rectifier, and the graph's wrappers.

The forward is exactly ReLU's (or ReLU6's: ``upper=6``). The backward first passes the gradient through the
bound ``out < upper`` with its ordinary gradient (ReLU6 is ``min(relu(x), 6)``), then asks the rule. The
output is the only tensor saved, and only when the rule or the bound reads it, so a guided ReLU saves exactly
what ``torch.relu`` saves. In-place calls stay in place (``mark_dirty``).

>>> import torch
>>> from guided_swap.core.rules import get_rule
>>> x = torch.tensor([-1.0, 2.0, 3.0, 7.0], requires_grad=True)
>>> rectify(x, RuleSlot(get_rule("guided")), upper=6.0).backward(torch.tensor([5.0, -1.0, 4.0, 2.0]))
>>> x.grad
tensor([0., 0., 4., 0.])

Speed. A Python ``autograd.Function`` costs about three times a native ReLU in CPU time per call (the Python
forward, its context object and a Python backward called from the engine): on a GPU at small batches that CPU time
*is* the explainer's time. A rule that defines :meth:`~guided_swap.core.rules.Rule.incoming` (guided backprop does:
``max(g, 0) * [out > 0]`` is autograd's own ReLU backward applied to ``max(g, 0)``) therefore takes a shorter path
in eager mode: the native ReLU (or ReLU6) runs unchanged and one gradient pre-hook on its backward node applies
``incoming`` to the arriving gradient: the Python forward and its context object go, and the Python backward
becomes one hook call (about a third of the cost a swapped rectifier adds over a plain ReLU;
benchmarks/results/rectifier_cpu.md). Registering and calling the hook, and the extra ``max(g, 0)`` kernel, are
the floor of eager mode: no native op has that backward. What is saved for backward is exactly what ``torch.relu``
saves; the map equals the rule's ``backward`` (bit for bit for the built-in rule). Rules without ``incoming``
(deconvnet ignores the mask), in-place calls on a view (the view's backward node belongs to its base), and every
rule under ``torch.compile`` (which traces the Function and fuses the rule into the surrounding kernels) use
:class:`RectifierFunction`. ``make_fx`` (the ``.pt2`` export) runs eagerly on proxy tensors, so it records the
pre-hook's ops like any others.

>>> slot = RuleSlot(get_rule("guided"))
>>> y = rectify(torch.tensor([-1.0, 2.0], requires_grad=True), slot)
>>> type(y.grad_fn).__name__, native_path(slot.rule, y, inplace=False)
('ReluBackward0', True)
"""
import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.fx.node import has_side_effect

from ..core.rules import Rule, has_incoming

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
            out = x  # the very input object: torch.compile traces mark_dirty only when the dirty input is returned
        if rule.needs_output or upper is not None:
            ctx.save_for_backward(out)
        ctx.rule, ctx.upper = rule, upper
        return out

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        out = saved[0] if saved else None
        if ctx.upper is not None:
            grad = aten.hardtanh_backward(grad, out, -math.inf, ctx.upper)  # zero where out sits at the bound
        return ctx.rule.backward(grad, out if ctx.rule.needs_output else None), None, None, None


# Module-level wrappers: these, not Function.apply, are the targets of the rewritten graph, so that the
# generated code is readable, picklable and re-traceable (they are autowrapped by the library's tracer).
# has_side_effect keeps an in-place call whose result is unused from being removed by dead-code elimination.


@has_side_effect
def rectify(x: Tensor, slot: RuleSlot, upper: Optional[float] = None, inplace: bool = False) -> Tensor:
    """ReLU (``upper=None``) or ReLU6 (``upper=6.0``) whose backward is the rule held by ``slot``."""
    rule = slot.rule
    if native_path(rule, x, inplace):
        return native_rectify(x, rule.incoming, upper, inplace)
    return RectifierFunction.apply(x, rule, upper, inplace)


def native_path(rule: Rule, x: Tensor, inplace: bool) -> bool:
    """Whether ``rectify`` keeps the native node and hooks ``rule.incoming`` on it (see the module docstring)."""
    return has_incoming(rule) and not torch.compiler.is_compiling() and not (inplace and x._is_view())


def native_rectify(x: Tensor, incoming: Callable[[Tensor], Tensor], upper: Optional[float] = None,
                   inplace: bool = False) -> Tensor:
    """The native ReLU/ReLU6 node, whose backward then masks ``incoming(g)`` instead of ``g``."""
    out = _forward(x, upper, inplace)
    node = out.grad_fn
    if node is not None:  # None under no_grad or for inputs that need no gradient: nothing to hook
        node.register_prehook(_IncomingHook(incoming))
    return out


class _IncomingHook:
    """A backward pre-hook applying ``incoming`` (a rule's) to the gradient arriving at a rectifier's node."""

    __slots__ = ("incoming",)

    def __init__(self, incoming: Callable[[Tensor], Tensor]):
        self.incoming = incoming

    def __call__(self, grad_outputs):
        grad = grad_outputs[0]
        return None if grad is None else (self.incoming(grad),)


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
