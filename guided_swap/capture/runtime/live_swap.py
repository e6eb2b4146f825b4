"""Run-time capture: rectifier calls rewritten while the model runs, for models no graph can take.

torch.fx stops at ``for img in images`` in a torchvision detector, and torch.export at its data-dependent
post-processing (non-maximum suppression keeps a data-dependent number of boxes). Both need the whole
forward as a graph; this path needs none. While the explainer's own mirror of the model runs (shallow
module copies that share the parameter storage; the user's model is never hooked), a ``TorchFunctionMode``
sees every torch call and hands each rectifier call (``F.relu``, ``torch.relu(_)``, ``Tensor.relu(_)``,
``nn.ReLU``, ``F.relu6``, ``nn.ReLU6``, ``hardtanh(0, 6)``, ``clamp(min=0)``, ``clamp(0, 6)``,
``clamp_min(0)``, ``threshold(0, 0)``) to the rule, as :func:`guided_swap.capture.ops.rectify` does: the native node
with the rule's ``incoming`` hooked on it, or :class:`~guided_swap.capture.ops.RectifierFunction`.
Forward hooks on the mirror's modules name each call site by its module path and capture the layers.

>>> import torch, torchvision
>>> from guided_swap.core.rules import get_rule
>>> model = torchvision.models.resnet18().eval()
>>> with Run(private_mirror(model), get_rule("guided"), capture=("layer4",)) as run:
...     logits = run.module(torch.randn(1, 3, 64, 64))
>>> len(run.sites), list(run.sites)[:3], tuple(run.captures["layer4"][0].shape)
(17, ['relu', 'layer1.0.relu', 'layer1.0.relu_1'], (1, 512, 2, 2))
"""
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .. import spellings
from ..mirror import mirror
from ..ops import RectifierFunction, native_path, native_rectify
from ...core.rules import Rule
from .layouts import channel_count
from .tape import Tape


# --- reading a call as a rectifier ---------------------------------------------------------------------

@dataclass(frozen=True)
class RectifierCall:
    """A torch call read as a rectifier: how it was spelled, its upper bound (6 for ReLU6), in place or not."""

    spelling: str
    upper: Optional[float]
    inplace: bool


def _get(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_zero(value: Any) -> bool:
    return _number(value) and value == 0


def _bounded(spelling: str, low: Any, high: Any, inplace: bool) -> Optional[RectifierCall]:
    """``clamp(x, min=0)`` is a ReLU and ``clamp(x, 0, 6)`` a ReLU6; any other bounds are not a rectifier."""
    if not _is_zero(low):
        return None
    if high is None:
        return RectifierCall(f"{spelling}(min=0)", None, inplace)
    if _number(high) and high == 6:
        return RectifierCall(f"{spelling}(0, 6)", 6.0, inplace)
    return None


def _relu(spelling: str, inplace: Optional[bool] = None, upper: Optional[float] = None) -> Callable:
    """``f(x, inplace=False)``-shaped spellings; ``inplace`` fixes the flag of the ``*_`` ones."""
    return lambda args, kwargs: RectifierCall(
        spelling, upper, bool(_get(args, kwargs, 1, "inplace", False)) if inplace is None else inplace)


def _hardtanh(spelling: str, inplace: Optional[bool] = None) -> Callable:
    def read(args, kwargs):
        low, high = _get(args, kwargs, 1, "min_val", -1.0), _get(args, kwargs, 2, "max_val", 1.0)
        if not (_is_zero(low) and _number(high) and high == 6):
            return None
        return RectifierCall(spelling, 6.0, bool(_get(args, kwargs, 3, "inplace", False)) if inplace is None else inplace)
    return read


def _clamp(spelling: str, inplace: bool) -> Callable:
    return lambda args, kwargs: _bounded(spelling, _get(args, kwargs, 1, "min"), _get(args, kwargs, 2, "max"), inplace)


def _clamp_min(spelling: str, inplace: bool) -> Callable:
    def read(args, kwargs):
        return RectifierCall(f"{spelling}(0)", None, inplace) if _is_zero(_get(args, kwargs, 1, "min")) else None
    return read


def _threshold(spelling: str, inplace: Optional[bool] = None) -> Callable:
    def read(args, kwargs):
        if not (_is_zero(_get(args, kwargs, 1, "threshold")) and _is_zero(_get(args, kwargs, 2, "value"))):
            return None
        flag = bool(_get(args, kwargs, 3, "inplace", False)) if inplace is None else inplace
        return RectifierCall(f"{spelling}(0, 0)", None, flag)
    return read


# Spellings as the fx path reports them (guided_swap.capture.spellings), read here from a call's arguments.
_CLAMPS = {torch.clamp: "torch.clamp", torch.clamp_: "torch.clamp_", torch.clip: "torch.clip",
           torch.clip_: "torch.clip_", Tensor.clamp: "Tensor.clamp", Tensor.clamp_: "Tensor.clamp_",
           Tensor.clip: "Tensor.clip", Tensor.clip_: "Tensor.clip_"}
_THRESHOLDS = {F.threshold: "F.threshold", torch.threshold: "torch.threshold", torch.threshold_: "torch.threshold_"}
RECTIFIER_CALLS: Dict[Any, Callable[[tuple, dict], Optional[RectifierCall]]] = {
    F.relu: _relu("F.relu"), torch.relu: _relu("torch.relu", False), torch.relu_: _relu("torch.relu_", True),
    Tensor.relu: _relu("Tensor.relu", False), Tensor.relu_: _relu("Tensor.relu_", True),
    F.relu6: _relu("F.relu6", upper=6.0),
    F.hardtanh: _hardtanh("F.hardtanh(0, 6)"), F.hardtanh_: _hardtanh("F.hardtanh_(0, 6)", True),
    **{func: _clamp(name, name.endswith("_")) for func, name in _CLAMPS.items()},
    torch.clamp_min: _clamp_min("torch.clamp_min", False), torch.clamp_min_: _clamp_min("torch.clamp_min_", True),
    Tensor.clamp_min: _clamp_min("Tensor.clamp_min", False), Tensor.clamp_min_: _clamp_min("Tensor.clamp_min_", True),
    F.threshold: _threshold("F.threshold"), torch.threshold: _threshold("torch.threshold", False),
    torch.threshold_: _threshold("torch.threshold_", True),  # F.threshold_ is torch.threshold_
}


def read_rectifier(func: Any, args: tuple, kwargs: dict) -> Optional[RectifierCall]:
    """``func(*args, **kwargs)`` read as a rectifier on a floating-point tensor, or None.

    >>> read_rectifier(torch.clamp, (torch.ones(2),), {"min": 0})
    RectifierCall(spelling='torch.clamp(min=0)', upper=None, inplace=False)
    >>> read_rectifier(torch.clamp, (torch.ones(2), 0, 5), {}) is None
    True
    """
    reader = _lookup(RECTIFIER_CALLS, func)
    if reader is None or "out" in kwargs or not args or not isinstance(args[0], Tensor):
        return None
    if not args[0].is_floating_point():
        return None
    return reader(args, kwargs)


def _lookup(table: Dict[Any, Any], func: Any) -> Any:
    try:
        return table.get(func)
    except TypeError:  # an unhashable callable
        return None


# --- activations with no rule, and rectifier look-alikes: left alone, reported ----------------------------

_OTHER_METHODS = {getattr(Tensor, name): "Tensor." + name for name in spellings.OTHER_ACTIVATION_METHODS}
_MAXIMUM = {torch.maximum: "torch.maximum", torch.max: "torch.max", torch.fmax: "torch.fmax",
            Tensor.maximum: "Tensor.maximum", Tensor.max: "Tensor.max", Tensor.fmax: "Tensor.fmax"}
_COMPARISONS = dict.fromkeys((torch.gt, torch.ge, Tensor.gt, Tensor.ge, Tensor.__gt__, Tensor.__ge__), True)
_CASTS = dict.fromkeys((Tensor.float, Tensor.to, Tensor.type_as, Tensor.half, Tensor.double, Tensor.bfloat16), True)
_MULTIPLICATIONS = dict.fromkeys((torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__), True)


class Masks:
    """The ``x > 0`` tensors of one forward, by identity (a tensor's ``==`` is elementwise, so no set)."""

    def __init__(self):
        self._refs: Dict[int, "weakref.ref"] = {}

    def add(self, tensor: Tensor) -> None:
        self._refs[id(tensor)] = weakref.ref(tensor)

    def __contains__(self, value: Any) -> bool:
        ref = self._refs.get(id(value))
        return ref is not None and ref() is value


def other_activation(func: Any, args: tuple, kwargs: dict, masks: Masks) -> Optional[str]:
    """The name of a non-rectifier activation call, or of a rectifier written so that it is not provably one
    (``torch.maximum(x, 0)``, ``torch.where(x > 0, x, 0)``, ``x * (x > 0)``, ``clamp(x, 0, M)`` with M not 6,
    another threshold), as the fx path names them; None for any other call. ``masks`` holds the ``x > 0``
    tensors of this forward."""
    name = _lookup(spellings.OTHER_ACTIVATION_FUNCTIONS, func) or _lookup(_OTHER_METHODS, func)
    if name is not None:
        return name
    if _lookup(_CLAMPS, func) and _is_zero(_get(args, kwargs, 1, "min")) and _get(args, kwargs, 2, "max") is not None:
        return f"{_CLAMPS[func]}(0, {_get(args, kwargs, 2, 'max')})"
    if _lookup(_THRESHOLDS, func):
        return _THRESHOLDS[func]
    if _lookup(_MAXIMUM, func) and len(args) == 2 and any(_zero_tensor(a) for a in args):
        return f"{_MAXIMUM[func]}(x, 0)"  # torch.max(x, 0) with a number reduces a dimension: not this
    if func is torch.where and len(args) == 3 and any(_is_zero(a) or _zero_tensor(a) for a in args[1:]):
        return "torch.where(cond, x, 0)"
    if _lookup(_MULTIPLICATIONS, func) and len(args) == 2 and any(a in masks for a in args):
        return "x * (x > 0)"
    return None


def _zero_tensor(value: Any) -> bool:
    return isinstance(value, Tensor) and not bool(value.any())


def is_positive_mask(func: Any, args: tuple, masks: Masks) -> bool:
    """Whether the call's result is ``x > 0`` or ``x >= 0``, possibly cast: a mask for ``x * (x > 0)``."""
    if _lookup(_COMPARISONS, func):
        return len(args) == 2 and _is_zero(args[1])
    return bool(_lookup(_CASTS, func)) and bool(args) and args[0] in masks


# --- one forward under the swap: scopes, call sites, captures ------------------------------------------

class TailSwitch(Rule):
    """The rule as the rectifiers of one forward see it, switchable between backward calls.

    Autograd calls a rule's backward only when a gradient flows through it, so with ``ordinary`` set, a
    backward from the score to a captured layer passes the captured layer's *tail* (the rectifiers after
    it) with ordinary gradients: the gradient Grad-CAM needs. The input gradient is then taken with the
    rule. One forward, no copy of the tail.
    """

    needs_output = True  # the ordinary gradient reads the forward mask even where the rule does not

    def __init__(self, rule: Rule):
        self.rule, self.name, self.ordinary_now = rule, rule.name, False

    def backward(self, grad_output: Tensor, output: Tensor) -> Tensor:
        if self.ordinary_now:
            return torch.ops.aten.threshold_backward(grad_output, output, 0)
        return self.rule.backward(grad_output, output if self.rule.needs_output else None)

    def incoming_now(self, grad: Tensor) -> Tensor:
        """On the native path (a rule with ``incoming``): the native node's own mask then gives either map."""
        return grad if self.ordinary_now else self.rule.incoming(grad)

    def rectify(self, x: Tensor, upper: Optional[float], inplace: bool) -> Tensor:
        """The rectifier call with this switch's backward, as :func:`guided_swap.capture.ops.rectify` does it."""
        if native_path(self.rule, x, inplace):
            return native_rectify(x, self.incoming_now, upper, inplace)
        return RectifierFunction.apply(x, self, upper, inplace)


@dataclass(frozen=True)
class Site:
    """One rectifier (or other activation) call site seen at run time, named by its module path."""

    name: str
    spelling: str
    inplace: bool


@dataclass
class _Frame:
    path: str            # the module's qualified name
    name: str            # this call's name: the path, then path_1, path_2 for later calls (fx's naming)
    module: nn.Module
    own_call_named: bool = False


class _SwapMode(TorchFunctionMode):
    """Hands every rectifier call to the rule's autograd op (unless the rule is the ordinary gradient),
    names every call the fx path's way, and lists rectifiers and other activations."""

    def __init__(self, run: "Run"):
        super().__init__()
        self.run = run

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        run = self.run
        name, module = run.call_name(func)
        result = self._call(func, args, kwargs, name, module)
        return run.after_call(name, module, func, args, kwargs, result)

    def _call(self, func, args: tuple, kwargs: dict, name: str, module: Optional[nn.Module]) -> Any:
        """The call, a rectifier carrying the rule; every activation listed."""
        run = self.run
        call = read_rectifier(func, args, kwargs)
        if call is not None:
            run.note(run.sites, name, _rectifier_module_spelling(module) or call.spelling, call.inplace)
            if run.switch is not None:
                run.rectified_after_capture |= bool(run.captures)
                return run.switch.rectify(args[0], call.upper, call.inplace)
            return func(*args, **kwargs)
        kind = other_activation(func, args, kwargs, run.masks)
        if kind is not None:
            run.note(run.left_alone, name, _other_module_spelling(module) or kind, False)
        result = func(*args, **kwargs)
        if isinstance(result, Tensor) and is_positive_mask(func, args, run.masks):
            run.masks.add(result)
        return result


class Run:
    """One forward of ``module`` (a mirror) with its rectifiers swapped: a context manager.

    While it is open, the mirror's modules carry hooks that track which module is running, so that call
    sites are named the fx path's way (``layer1.0.relu``; a module's second call ``layer1.0.relu_1``; a
    functional call ``roi_heads.box_head.relu``), and capture the calls named in ``capture``: a module's
    (path, or one call of it), or a functional call's (DenseNet's ``relu``). The value is kept and a copy goes
    on, so an in-place op further on cannot change the capture. With ``sources`` (the explained input
    tensors) the run keeps a :class:`~guided_swap.capture.runtime.tape.Tape` of the forward for
    ``layer="auto"``. The hooks are removed on exit. ``rule=None`` or an ordinary rule swaps nothing (sites
    are still listed).
    """

    def __init__(self, module: nn.Module, rule: Optional[Rule], capture: Sequence[str] = (),
                 sources: Optional[Sequence[Tensor]] = None):
        self.module = module
        self.switch = None if rule is None or rule.ordinary else TailSwitch(rule)
        self.capture_names = frozenset(capture)
        self.tape = None if sources is None else Tape(sources)
        self.sites: Dict[str, Site] = {}
        self.left_alone: Dict[str, Site] = {}
        self.captures: Dict[str, List[Any]] = {}
        self.rectified_after_capture = False
        self.masks = Masks()
        self.grids: set = set()            # the spatial sizes of this forward's convolution outputs
        self.evidence: Dict[str, Optional[int]] = {}  # per capture: the channel count of the module before it
        self._channels: Optional[int] = None  # the channel count of the last module with one that returned
        self._counts: Dict[str, int] = {}
        self._stack: List[_Frame] = []
        self._handles: list = []
        self._mode = _SwapMode(self)

    def __enter__(self) -> "Run":
        for path, sub in self.module.named_modules():
            self._handles.append(sub.register_forward_pre_hook(self._enter_module(path)))
            self._handles.append(sub.register_forward_hook(self._leave_module, always_call=True))
        self._mode.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            self._mode.__exit__(*exc_info)
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._stack.clear()

    def _name(self, base: str) -> str:
        index = self._counts.get(base, 0)
        self._counts[base] = index + 1
        return base if index == 0 else f"{base}_{index}"

    def _enter_module(self, path: str):
        def hook(module, inputs):
            frame = _Frame(path, self._name(path), module)
            self._stack.append(frame)
            wanted = self.capture_names.intersection((f"{frame.path}:input", f"{frame.name}:input"))
            position = next((i for i, value in enumerate(inputs) if isinstance(value, Tensor)), None)
            if not wanted or position is None:
                return None
            for name in wanted:
                self._keep(name, inputs[position])
            # the module gets a copy, so an in-place op inside it cannot change the capture
            return inputs[:position] + (inputs[position].clone(),) + inputs[position + 1:]
        return hook

    def _leave_module(self, module, inputs, output):
        if not self._stack or self._stack[-1].module is not module:
            return None
        frame = self._stack.pop()
        count = channel_count(module)
        self._channels = count if count is not None else self._channels
        replaced = None
        wanted = self.capture_names.intersection((frame.path, frame.name))
        for name in wanted:  # a module path captures each of its calls (more than one is refused later)
            self._keep(name, output)
        if wanted and isinstance(output, Tensor):
            replaced = output = output.clone()  # what the rest of the model sees (and may change in place)
        entries = [(name, int(name[name.rindex("[") + 1:-1])) for name in self.capture_names
                   if name.endswith("]") and name[:name.rindex("[")] in (frame.path, frame.name)]
        if entries and isinstance(output, (tuple, list)):
            values = list(output)
            for name, index in entries:
                if index < len(values) and isinstance(values[index], Tensor):
                    self._keep(name, values[index])
                    values[index] = values[index].clone()
            replaced = output = type(output)(values) if not hasattr(output, "_fields") else type(output)(*values)
        if self.tape is not None:
            self.tape.module_call(frame.path, frame.name, module, output)
        return replaced

    def after_call(self, name: str, module: Optional[nn.Module], func: Any, args: tuple, kwargs: dict,
                   result: Any) -> Any:
        """Record a torch call on the tape, and capture it when it is named in ``capture`` (a functional call;
        an activation module's own call is captured by the module's hook)."""
        if self.tape is not None:
            self.tape.add(name, func, args, kwargs, result, self._scopes(), own=module is not None)
        if isinstance(result, Tensor) and result.dim() >= 3 and _lookup(_CONVOLUTIONS, func):
            self.grids.add(tuple(result.shape[2:]))
        if module is None and name in self.capture_names and isinstance(result, Tensor):
            self._keep(name, result)
            return result.clone()  # what the rest of the model sees (and may change in place)
        return result

    def _keep(self, name: str, value: Any) -> None:
        """Capture ``value`` as ``name``, with the channel count of the module that ran last (its layout's clue)."""
        self.captures.setdefault(name, []).append(value)
        self.evidence.setdefault(name, self._channels)

    def _scopes(self) -> Tuple[str, ...]:
        return tuple(frame.path for frame in self._stack if frame.path)

    def call_name(self, func: Any) -> Tuple[str, Optional[nn.Module]]:
        """This call's name, counted per name as fx counts nodes (``layer1.0.relu_1``), and the activation
        module whose own call it is (an ``nn.ReLU`` is named by its call, not by the ``F.relu`` inside)."""
        frame = self._stack[-1] if self._stack else None
        if frame is not None and not frame.own_call_named and isinstance(frame.module, _ACTIVATION_MODULES):
            frame.own_call_named = True
            return frame.name, frame.module
        op = getattr(func, "__name__", "call")
        if op.startswith("__") and op.endswith("__"):  # Tensor.__mul__ is fx's "mul", __rmul__ too
            op = op[2:-2].lstrip("r") if op[2:-2] not in _R_NAMES else op[2:-2]
        return self._name(f"{frame.path}.{op}" if frame is not None and frame.path else op), None

    @staticmethod
    def note(table: Dict[str, Site], name: str, spelling: str, inplace: bool) -> None:
        if name not in table:
            table[name] = Site(name, spelling, inplace)


_CONVOLUTIONS = dict.fromkeys((F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d), True)
_R_NAMES = {"rshift", "round", "repr"}  # dunder names that start with r without being reflected
_ACTIVATION_MODULES = (nn.ReLU, nn.Hardtanh, nn.Threshold) + tuple(spellings.OTHER_ACTIVATION_MODULES)


def _rectifier_module_spelling(module: Optional[nn.Module]) -> Optional[str]:
    """How a rectifier *module* is reported (as on the fx path) when the call is its own."""
    if isinstance(module, nn.ReLU6):
        return "nn.ReLU6"
    if isinstance(module, nn.ReLU):
        return "nn.ReLU"
    if isinstance(module, nn.Hardtanh):
        return "nn.Hardtanh(0, 6)"
    return "nn.Threshold(0, 0)" if isinstance(module, nn.Threshold) else None


def _other_module_spelling(module: Optional[nn.Module]) -> Optional[str]:
    return None if module is None else "nn." + type(module).__name__


# --- the mirror the run-time explainer owns ------------------------------------------------------------

def private_mirror(model: nn.Module) -> nn.Module:
    """:func:`guided_swap.capture.mirror.mirror` in eval mode: module copies with containers of their own (the run
    registers hooks on it, models write caches while running); tensors stay the model's storage."""
    return mirror(model).eval()
