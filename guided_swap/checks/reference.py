"""An fx-free reference: every ReLU call intercepted at run time by a ``TorchFunctionMode``.

It shares no code with the rewrite or the rule ops, so tests and benchmarks use it as the independent truth
on models where backward hooks on ``nn.ReLU`` miss functional ReLUs (DenseNet, GoogLeNet, Inception). The
rules are made of plain autograd: a tensor hook ``g -> max(g, 0)`` on the ReLU's output, which the ordinary
ReLU backward then masks (guided), or an identity path that skips the mask (deconvnet).

>>> import torch, torchvision
>>> model = torchvision.models.densenet121().eval()
>>> count_relu_calls(model, torch.randn(1, 3, 64, 64))
121
"""
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..core.rules import get_rule

_RELU = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}
_RELU6 = {F.relu6}
_HARDTANH = {F.hardtanh, F.hardtanh_}
# rectifiers in disguise: clamp(x, min=0) / clamp(x, 0, 6), clamp_min(x, 0), threshold(x, 0, 0)
_CLAMP = {torch.clamp, torch.clamp_, torch.clip, torch.clip_,
          torch.Tensor.clamp, torch.Tensor.clamp_, torch.Tensor.clip, torch.Tensor.clip_}
_CLAMP_MIN = {torch.clamp_min, torch.clamp_min_, torch.Tensor.clamp_min, torch.Tensor.clamp_min_}
_THRESHOLD = {F.threshold, torch.threshold, torch.threshold_}
_INPLACE = {torch.relu_, torch.Tensor.relu_, F.hardtanh_, torch.clamp_, torch.clip_, torch.Tensor.clamp_,
            torch.Tensor.clip_, torch.clamp_min_, torch.Tensor.clamp_min_, torch.threshold_}


def _given(args, kwargs, index: int, name: str, default=None):
    return kwargs[name] if name in kwargs else (args[index] if len(args) > index else default)


def _number(value, wanted: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == wanted


def _relu_call(func, args, kwargs) -> Optional[tuple]:
    """(upper bound, in place) when ``func(*args, **kwargs)`` is a ReLU or ReLU6, else None."""
    inplace = func in _INPLACE or bool(kwargs.get("inplace", False))
    if "out" in kwargs:
        return None
    if func in _RELU or func in _RELU6:
        return (6.0 if func in _RELU6 else None), inplace or bool(_given(args, kwargs, 1, "inplace", False))
    if func in _HARDTANH:
        low, high = _given(args, kwargs, 1, "min_val", -1.0), _given(args, kwargs, 2, "max_val", 1.0)
        if low == 0 and high == 6:
            return 6.0, inplace or bool(_given(args, kwargs, 3, "inplace", False))
    if func in _CLAMP and _number(_given(args, kwargs, 1, "min"), 0):
        high = _given(args, kwargs, 2, "max")
        if high is None or _number(high, 6):
            return (None if high is None else 6.0), inplace
    if func in _CLAMP_MIN and _number(_given(args, kwargs, 1, "min"), 0):
        return None, inplace
    if func in _THRESHOLD and _number(_given(args, kwargs, 1, "threshold"), 0) and \
            _number(_given(args, kwargs, 2, "value"), 0):
        return None, inplace or bool(_given(args, kwargs, 3, "inplace", False))
    return None


def _rectify(x: Tensor, upper: Optional[float], inplace: bool) -> Tensor:
    """The canonical ReLU / ReLU6 call, whatever the spelling: its backward masks ``0 < x (< 6)``.

    ``clamp``'s own backward would also pass the gradient where ``x`` is exactly 0 (or 6); a rule is
    defined by the rectifier, not by how it was written, so every spelling gets the same mask.
    """
    if upper is None:
        return torch.relu_(x) if inplace else torch.relu(x)
    return F.hardtanh(x, 0.0, upper, inplace=inplace)


class ReLURule(TorchFunctionMode):
    """Counts rectifier calls, and with ``rule`` set applies that rule's backward to each one.

    ``rule`` is a registered rule name or a :class:`~guided_swap.Rule`. The built-in ``guided`` and
    ``deconvnet`` rules are written here again from their definitions (tensor hooks on plain autograd), so the
    reference does not depend on the rule objects it checks; any other rule's ``backward`` is applied through a
    tensor hook on an identity-backward copy of the rectifier. ReLU6 is ``min(relu(x), 6)``: the rule acts on
    the ReLU part, the clip keeps its ordinary gradient.
    """

    def __init__(self, rule=None):
        super().__init__()
        self.rule = None if rule is None else get_rule(rule)
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        call = _relu_call(func, args, kwargs)
        if call is None:
            return func(*args, **kwargs)
        self.calls += 1
        x = args[0]
        if self.rule is None or self.rule.name == "gradient" or not x.requires_grad:
            return func(*args, **kwargs)
        if self.rule.name == "guided":  # the canonical backward masks [0 < x < upper] after the clamp
            out = _rectify(x, *call)
            out.register_hook(lambda g: g.clamp(min=0))
            return out
        upper, inplace = call
        hook = (lambda g: g.clamp(min=0)) if self.rule.name == "deconvnet" else _rule_hook(self.rule, x)
        out = _rectified_with_hook(x, upper, hook)
        return x.copy_(out) if inplace else out


def _rule_hook(rule, x: Tensor):
    relu_out = torch.relu(x.detach())
    return lambda g: rule.backward(g, relu_out if rule.needs_output else None)


def _rectified_with_hook(x: Tensor, upper, hook) -> Tensor:
    """``min(relu(x), upper)`` whose ReLU part passes the gradient through ``hook`` instead of its mask."""
    relu = torch.relu(x.detach()) + (x - x.detach())  # forward ReLU (exactly: the added term is 0), backward identity
    relu.register_hook(hook)
    if upper is None:
        return relu
    return torch.where(relu.detach() < upper, relu, relu.detach().clamp(max=upper))


def count_relu_calls(model: nn.Module, x: Tensor) -> int:
    """How many ReLU/ReLU6 calls one forward of ``model`` makes, in every spelling."""
    mode = ReLURule()
    with torch.no_grad(), mode:
        model(x)
    return mode.calls


def input_gradient(model: nn.Module, x: Any, target: Any, rule: str = "guided", output=None,
                   forward_args: Sequence[Any] = ()) -> Any:
    """``d score / d x`` with ``rule`` applied at every ReLU, for one class per sample, or for a callable
    ``target(outputs) -> (B,) score``. ``x`` may be a tuple of inputs (``model(x1, x2, *forward_args)``): the
    gradients are then a tuple, zeros for an input the score does not depend on."""
    inputs = x if isinstance(x, tuple) else (x,)
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    with ReLURule(rule):
        out = model(*leaves, *forward_args)
    if callable(target) and not isinstance(target, Tensor):
        score = target(out).sum()
    else:
        logits = out if output is None else out[output]
        score = logits.gather(1, torch.as_tensor(target).view(-1, 1)).sum()
    grads = torch.autograd.grad(score, leaves, allow_unused=True)
    grads = tuple(torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads))
    return grads if isinstance(x, tuple) else grads[0]


def gradcam(model: nn.Module, x: Any, target: Any, layer: nn.Module, output=None,
            forward_args: Sequence[Any] = ()) -> Tensor:
    """Grad-CAM (B, *spatial) at ``layer``'s output with ordinary gradients, from a forward hook. ``x`` may be a
    tuple of inputs (``model(x1, x2, *forward_args)``).

    The activation is cloned and the gradient read by a tensor hook at the moment the module returns, so an
    in-place op after the module (DenseNet's ``F.relu(features, inplace=True)``) changes neither.
    """
    seen = {}

    def keep(module, inputs, output):
        seen["activation"] = output.detach().clone()
        output.register_hook(lambda g: seen.__setitem__("grad", g))

    handle = layer.register_forward_hook(keep)
    try:
        inputs = [t.detach().clone().requires_grad_(True) for t in (x if isinstance(x, tuple) else (x,))]
        out = model(*inputs, *forward_args)
        logits = out if output is None else out[output]
        logits.gather(1, torch.as_tensor(target).view(-1, 1)).sum().backward()
    finally:
        handle.remove()
    weights = seen["grad"].mean(dim=tuple(range(2, seen["grad"].dim())), keepdim=True)
    return torch.relu((weights * seen["activation"]).sum(dim=1))
