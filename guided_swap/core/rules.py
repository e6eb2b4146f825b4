"""Backprop rules as small objects, and the registry that names them.

A rule decides the gradient a rectifier (ReLU, ReLU6, ...) passes down; the forward is never changed. It
sees only the gradient arriving from above and the rectifier's *output*, the one tensor saved for backward
(``[x > 0] == [relu(x) > 0]``, so the output carries the forward mask). A rule is written for ReLU; the
library wraps bounded rectifiers around it: for ReLU6 = ``min(relu(x), 6)`` the clip at 6 keeps its ordinary
gradient (zero where the output sits at the bound) and the rule acts on the ReLU part.

The built-in rules (docs/methods.md) are written exactly as a user would write one:

=========  ===============================  ======================================================
gradient   ``g * [out > 0]``                Simonyan et al. 2013 (ordinary gradient, saliency)
deconvnet  ``max(g, 0)``                    Zeiler & Fergus 2014 (forward mask ignored)
guided     ``max(g, 0) * [out > 0]``        Springenberg et al. 2014 (guided backprop)
=========  ===============================  ======================================================

>>> import torch, guided_swap as gs
>>> class MyGuided(gs.Rule):
...     name = "my-guided"
...     def backward(self, grad_output, output):
...         return grad_output.clamp(min=0) * (output > 0)
>>> gs.register_rule(MyGuided())
MyGuided(name='my-guided')
>>> "my-guided" in gs.rules(), gs.rules()[:3]
(True, ('gradient', 'deconvnet', 'guided'))
>>> gs.unregister_rule("my-guided")
"""
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from .errors import RuleError


class Rule:
    """Base class of a backprop rule at rectifiers. Subclass it, set ``name``, write :meth:`backward`.

    Class attributes a rule may set:

    - ``name``: how the rule is registered and reported.
    - ``needs_output`` (default True): whether :meth:`backward` reads ``output``. A rule that does not (the
      deconvnet rule) saves nothing for backward; it then receives ``output=None``.
    - ``ordinary`` (default False): the rule's gradient *is* autograd's own ReLU gradient. ``convert`` then
      leaves every rectifier as it is (nothing to swap, no plain fork needed) and maps are plain gradients.

    An optional method, for speed: a rule whose gradient is "change the incoming gradient, then the ordinary
    ReLU mask" may say so with :meth:`incoming`. In eager mode the rectifier then stays autograd's native
    ReLU/ReLU6 node, with one gradient pre-hook that applies ``incoming``, instead of a Python
    ``autograd.Function`` (less CPU time per rectifier; see :mod:`guided_swap.capture.ops`). A rule that
    defines only ``incoming`` gets ``backward = incoming(g) * [output > 0]``; one that defines both must make
    them agree (``backward`` runs under ``torch.compile`` and on the run-time capture path).

    A rule must be picklable (defined at the top level of an importable module) for ``Explainer.save``.
    """

    name: str = ""
    needs_output: bool = True
    ordinary: bool = False

    def backward(self, grad_output: Tensor, output: Optional[Tensor]) -> Tensor:
        """The gradient passed to the rectifier's input, from ``grad_output`` and the rectifier's output."""
        if has_incoming(self):
            return torch.ops.aten.threshold_backward(self.incoming(grad_output), output, 0)
        raise NotImplementedError(f"{type(self).__name__} must define backward(grad_output, output)")

    def incoming(self, grad_output: Tensor) -> Tensor:
        """Optional: the gradient the ordinary ReLU mask is then applied to (``backward`` is
        ``incoming(g) * [output > 0]``). Define it only when that is your rule; see the class docstring."""
        raise NotImplementedError(f"{type(self).__name__} does not define incoming(grad_output)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), self.name))


class Gradient(Rule):
    """The ordinary gradient (saliency): ``g * [out > 0]``."""

    name = "gradient"
    ordinary = True

    def backward(self, grad_output: Tensor, output: Tensor) -> Tensor:
        return torch.ops.aten.threshold_backward(grad_output, output, 0)


class Deconvnet(Rule):
    """Deconvnet: ``max(g, 0)``; the forward mask is ignored, so nothing is saved."""

    name = "deconvnet"
    needs_output = False

    def backward(self, grad_output: Tensor, output: None) -> Tensor:
        return grad_output.clamp(min=0)


class Guided(Rule):
    """Guided backprop: ``max(g, 0) * [out > 0]``: the ordinary ReLU mask applied to ``max(g, 0)``."""

    name = "guided"

    def incoming(self, grad_output: Tensor) -> Tensor:
        return grad_output.clamp(min=0)

    def backward(self, grad_output: Tensor, output: Tensor) -> Tensor:
        # The same values as incoming(g) masked, with one temporary: the ordinary ReLU backward kernel, then an
        # in-place clamp of its fresh result.
        return torch.ops.aten.threshold_backward(grad_output, output, 0).clamp_(min=0)


_REGISTRY: Dict[str, Rule] = {}
BUILT_IN = ("gradient", "deconvnet", "guided")


def register_rule(rule: Rule, *, replace: bool = False) -> Rule:
    """Make ``rule`` usable by name (``convert(rule=rule.name)``, the CLI, the reference). Returns it."""
    _check_rule(rule)
    if rule.name in _REGISTRY and not replace and _REGISTRY[rule.name] is not rule:
        raise RuleError(f"a rule named {rule.name!r} is already registered ({_REGISTRY[rule.name]!r}); "
                        "pass replace=True to replace it, or give yours another name")
    if rule.name in BUILT_IN and _REGISTRY.get(rule.name) is not rule:
        raise RuleError(f"{rule.name!r} is a built-in rule and cannot be replaced; give your rule another name")
    _REGISTRY[rule.name] = rule
    return rule


def unregister_rule(name: str) -> None:
    """Remove a user's rule from the registry (built-in rules stay)."""
    if name in BUILT_IN:
        raise RuleError(f"{name!r} is a built-in rule and cannot be removed")
    if name not in _REGISTRY:
        raise RuleError(f"no rule named {name!r} is registered; registered: {rules()}")
    del _REGISTRY[name]


def rules() -> Tuple[str, ...]:
    """The names of every usable rule, built-in first, then in the order they were registered."""
    return tuple(_REGISTRY)


def get_rule(rule: Union[str, Rule]) -> Rule:
    """The rule object for a registered name, or ``rule`` itself when it is a :class:`Rule` instance."""
    if isinstance(rule, Rule):
        _check_rule(rule)
        return rule
    if isinstance(rule, type) and issubclass(rule, Rule):
        raise TypeError(f"rule={rule.__name__} is a class; pass an instance: rule={rule.__name__}()")
    if not isinstance(rule, str):
        raise TypeError(f"rule must be a rule name {rules()} or a guided_swap.Rule instance, got {type(rule).__name__}")
    if rule not in _REGISTRY:
        raise RuleError(f"rule={rule!r} is not a registered rule; the rules are {rules()} "
                        "(add your own with guided_swap.register_rule)")
    return _REGISTRY[rule]


def _check_rule(rule: Rule) -> None:
    if not isinstance(rule, Rule):
        raise TypeError(f"a rule must be an instance of guided_swap.Rule, got {type(rule).__name__}")
    if not isinstance(rule.name, str) or not rule.name:
        raise RuleError(f"{type(rule).__name__} has no name: set the class attribute name = '...'")
    if type(rule).backward is Rule.backward and not has_incoming(rule):
        raise RuleError(f"{type(rule).__name__} does not define backward(grad_output, output)")
    if has_incoming(rule) and not rule.needs_output:
        raise RuleError(f"{type(rule).__name__} defines incoming(), which promises the ordinary ReLU mask after it, "
                        "and that mask reads the output: remove incoming() or needs_output = False")


def has_incoming(rule: Rule) -> bool:
    """Whether ``rule`` defines the optional :meth:`Rule.incoming` (the native-node fast path)."""
    return type(rule).incoming is not Rule.incoming


for _rule in (Gradient(), Deconvnet(), Guided()):
    _REGISTRY[_rule.name] = _rule
