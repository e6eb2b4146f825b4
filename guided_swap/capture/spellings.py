"""The table of ReLU spellings: every way a model can call ReLU or ReLU6, and how to read such a call.

The rewrite pass walks the graph once and asks :func:`match` about every node; adding a spelling is one
entry here (in the manner of opacus' layer-type registry).

>>> import torch, torch.fx as fx
>>> gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU(inplace=True)))
>>> node = [n for n in gm.graph.nodes if n.op == "call_module"][0]
>>> call = match(node, gm.get_submodule(node.target))
>>> call.spelling, call.upper, call.inplace
('nn.ReLU', None, True)
"""
import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn


@dataclass(frozen=True)
class ReLUCall:
    """One ReLU call site as read from a node: its input, whether it writes in place, its upper bound."""

    spelling: str
    input: Any
    inplace: bool
    upper: Optional[float]


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_relu6_bounds(low: Any, high: Any) -> bool:
    return isinstance(low, (int, float)) and isinstance(high, (int, float)) and low == 0 and high == 6


# --- call_function and call_method spellings: target -> reader(node) -> ReLUCall or None -----------------

def _read_relu(spelling: str, inplace: Optional[bool] = None, upper: Optional[float] = None
               ) -> Callable[[fx.Node], ReLUCall]:
    """A reader for ``f(input, inplace=False)``-shaped calls; ``inplace`` fixes the flag for ``*_`` spellings."""
    def read(node: fx.Node) -> ReLUCall:
        flag = bool(_arg(node, 1, "inplace", False)) if inplace is None else inplace
        return ReLUCall(spelling, _arg(node, 0, "input"), flag, upper)

    return read


def _read_hardtanh(spelling: str, inplace: Optional[bool] = None) -> Callable[[fx.Node], Optional[ReLUCall]]:
    def read(node: fx.Node) -> Optional[ReLUCall]:
        low, high = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
        if not _is_relu6_bounds(low, high):
            return None
        flag = bool(_arg(node, 3, "inplace", False)) if inplace is None else inplace
        return ReLUCall(spelling, _arg(node, 0, "input"), flag, 6.0)

    return read


def _is_zero(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def _read_clamp(spelling: str, inplace: bool) -> Callable[[fx.Node], Optional[ReLUCall]]:
    """``clamp(x, min=0)`` is a ReLU and ``clamp(x, 0, 6)`` a ReLU6; other bounds are not rectifiers."""
    def read(node: fx.Node) -> Optional[ReLUCall]:
        low, high = _arg(node, 1, "min"), _arg(node, 2, "max")
        if "out" in node.kwargs or not _is_zero(low):
            return None
        if high is None:
            return ReLUCall(f"{spelling}(min=0)", _arg(node, 0, "input"), inplace, None)
        if _is_relu6_bounds(low, high):
            return ReLUCall(f"{spelling}(0, 6)", _arg(node, 0, "input"), inplace, 6.0)
        return None

    return read


def _read_clamp_min(spelling: str, inplace: bool) -> Callable[[fx.Node], Optional[ReLUCall]]:
    def read(node: fx.Node) -> Optional[ReLUCall]:
        if "out" in node.kwargs or not _is_zero(_arg(node, 1, "min")):
            return None
        return ReLUCall(f"{spelling}(0)", _arg(node, 0, "input"), inplace, None)

    return read


def _read_threshold(spelling: str, inplace: Optional[bool] = None) -> Callable[[fx.Node], Optional[ReLUCall]]:
    """``threshold(x, 0, 0)`` (x where x > 0, else 0) is a ReLU; other thresholds or values are not."""
    def read(node: fx.Node) -> Optional[ReLUCall]:
        if "out" in node.kwargs or not (_is_zero(_arg(node, 1, "threshold")) and _is_zero(_arg(node, 2, "value"))):
            return None
        flag = bool(_arg(node, 3, "inplace", False)) if inplace is None else inplace
        return ReLUCall(f"{spelling}(0, 0)", _arg(node, 0, "input"), flag, None)

    return read


FUNCTION_SPELLINGS: Dict[Any, Callable[[fx.Node], Optional[ReLUCall]]] = {
    F.relu: _read_relu("F.relu"),
    torch.relu: _read_relu("torch.relu", inplace=False),
    torch.relu_: _read_relu("torch.relu_", inplace=True),  # F.relu_ is torch.relu_
    F.relu6: _read_relu("F.relu6", upper=6.0),
    F.hardtanh: _read_hardtanh("F.hardtanh(0, 6)"),
    F.hardtanh_: _read_hardtanh("F.hardtanh_(0, 6)", inplace=True),
    # rectifiers in disguise: provably ReLU / ReLU6 only for these constant bounds
    torch.clamp: _read_clamp("torch.clamp", inplace=False),
    torch.clamp_: _read_clamp("torch.clamp_", inplace=True),
    torch.clip: _read_clamp("torch.clip", inplace=False),
    torch.clip_: _read_clamp("torch.clip_", inplace=True),
    torch.clamp_min: _read_clamp_min("torch.clamp_min", inplace=False),
    torch.clamp_min_: _read_clamp_min("torch.clamp_min_", inplace=True),
    F.threshold: _read_threshold("F.threshold"),
    torch.threshold: _read_threshold("torch.threshold", inplace=False),
    torch.threshold_: _read_threshold("torch.threshold_", inplace=True),  # F.threshold_ is torch.threshold_
}

METHOD_SPELLINGS: Dict[str, Callable[[fx.Node], Optional[ReLUCall]]] = {
    "relu": _read_relu("Tensor.relu", inplace=False),
    "relu_": _read_relu("Tensor.relu_", inplace=True),
    "clamp": _read_clamp("Tensor.clamp", inplace=False),
    "clamp_": _read_clamp("Tensor.clamp_", inplace=True),
    "clip": _read_clamp("Tensor.clip", inplace=False),
    "clip_": _read_clamp("Tensor.clip_", inplace=True),
    "clamp_min": _read_clamp_min("Tensor.clamp_min", inplace=False),
    "clamp_min_": _read_clamp_min("Tensor.clamp_min_", inplace=True),
}


# --- call_module spellings: module class -> reader(node, module) ------------------------------------------

def _read_relu_module(node: fx.Node, module: nn.Module) -> ReLUCall:
    return ReLUCall("nn.ReLU", _arg(node, 0, "input"), bool(module.inplace), None)


def _read_hardtanh_module(node: fx.Node, module: nn.Module) -> Optional[ReLUCall]:
    if not _is_relu6_bounds(module.min_val, module.max_val):
        return None
    name = "nn.ReLU6" if isinstance(module, nn.ReLU6) else "nn.Hardtanh(0, 6)"
    return ReLUCall(name, _arg(node, 0, "input"), bool(module.inplace), 6.0)


def _read_threshold_module(node: fx.Node, module: nn.Module) -> Optional[ReLUCall]:
    if not (_is_zero(module.threshold) and _is_zero(module.value)):
        return None
    return ReLUCall("nn.Threshold(0, 0)", _arg(node, 0, "input"), bool(module.inplace), None)


MODULE_SPELLINGS: Tuple[Tuple[type, Callable[[fx.Node, nn.Module], Optional[ReLUCall]]], ...] = (
    (nn.ReLU, _read_relu_module),
    (nn.Hardtanh, _read_hardtanh_module),  # covers nn.ReLU6, a Hardtanh(0, 6)
    (nn.Threshold, _read_threshold_module),
)


def match(node: fx.Node, module: Optional[nn.Module] = None) -> Optional[ReLUCall]:
    """Read ``node`` as a ReLU call, or return None. ``module`` is the called module for call_module nodes."""
    if node.op == "call_function":
        reader = _lookup(FUNCTION_SPELLINGS, node.target)
        return reader(node) if reader else None
    if node.op == "call_method":
        reader = METHOD_SPELLINGS.get(node.target)
        return reader(node) if reader else None
    if node.op == "call_module" and module is not None:
        for cls, read_module in MODULE_SPELLINGS:
            if isinstance(module, cls):
                return read_module(node, module)
    return None


def _lookup(table: Dict[Any, Any], target: Any) -> Any:
    try:
        return table.get(target)
    except TypeError:  # an unhashable call target
        return None


# --- activations that have no guided rule and are left alone (reported, never silently) -----------------

OTHER_ACTIVATION_MODULES = (
    nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.ELU, nn.SELU, nn.CELU,
    nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.Softplus, nn.Mish, nn.Hardtanh, nn.Softsign, nn.Tanhshrink,
)
OTHER_ACTIVATION_FUNCTIONS = {
    F.silu: "F.silu", F.gelu: "F.gelu", F.hardswish: "F.hardswish", F.hardsigmoid: "F.hardsigmoid",
    torch.sigmoid: "torch.sigmoid", F.sigmoid: "F.sigmoid", torch.tanh: "torch.tanh", F.tanh: "F.tanh",
    F.elu: "F.elu", F.selu: "F.selu", F.celu: "F.celu", F.leaky_relu: "F.leaky_relu", F.prelu: "F.prelu",
    F.softplus: "F.softplus", F.mish: "F.mish", F.hardtanh: "F.hardtanh", F.glu: "F.glu",
}
OTHER_ACTIVATION_METHODS = ("sigmoid", "sigmoid_", "tanh", "tanh_")


def other_activation(node: fx.Node, module: Optional[nn.Module] = None) -> Optional[str]:
    """The name of a non-ReLU activation at ``node`` (it keeps its ordinary gradient), or None.

    Besides the usual activations this names rectifiers written in ways the table does not swap:
    ``torch.maximum(x, 0)``, ``torch.where(x > 0, x, 0)``, ``x * (x > 0)``, ``clamp(x, 0, M)`` with M not 6,
    and ``threshold`` with other numbers.
    """
    if node.op == "call_module" and isinstance(module, OTHER_ACTIVATION_MODULES + (nn.Threshold,)):
        return "nn." + type(module).__name__
    if node.op == "call_function":
        return _lookup(OTHER_ACTIVATION_FUNCTIONS, node.target) or _rectifier_lookalike(node)
    if node.op == "call_method" and node.target in OTHER_ACTIVATION_METHODS:
        return "Tensor." + node.target
    if node.op == "call_method":
        return _rectifier_lookalike(node)
    return None


_MAXIMUM = {torch.maximum: "torch.maximum", torch.max: "torch.max", torch.fmax: "torch.fmax",
            "maximum": "Tensor.maximum", "max": "Tensor.max", "fmax": "Tensor.fmax"}
_CLAMPS = {torch.clamp: "torch.clamp", torch.clamp_: "torch.clamp_", torch.clip: "torch.clip",
           torch.clip_: "torch.clip_", "clamp": "Tensor.clamp", "clamp_": "Tensor.clamp_", "clip": "Tensor.clip",
           "clip_": "Tensor.clip_"}
_THRESHOLDS = {F.threshold: "F.threshold", torch.threshold: "torch.threshold", torch.threshold_: "torch.threshold_"}


def _rectifier_lookalike(node: fx.Node) -> Optional[str]:
    """A rectifier spelled so that it is not provably ReLU/ReLU6 to the table: it keeps its own gradient."""
    target = node.target
    if _lookup(_MAXIMUM, target) and len(node.args) == 2 and any(
            isinstance(a, fx.Node) and _is_zero_like(a) for a in node.args):  # torch.max(x, 0) reduces dim 0
        return f"{_MAXIMUM[target]}(x, 0)"
    if _lookup(_CLAMPS, target) and _is_zero(_arg(node, 1, "min")) and _arg(node, 2, "max") is not None:
        return f"{_CLAMPS[target]}(0, {_arg(node, 2, 'max')})"
    if _lookup(_THRESHOLDS, target):
        return _THRESHOLDS[target]
    if target is torch.where and len(node.args) == 3 and any(_is_zero_like(a) for a in node.args[1:]):
        return "torch.where(cond, x, 0)"
    if target in (operator.mul, torch.mul, "mul") and len(node.args) == 2 and any(_is_positive_mask(a) for a in node.args):
        return "x * (x > 0)"
    return None


def _is_zero_like(value: Any) -> bool:
    """0, ``torch.zeros_like(x)``, ``torch.zeros(...)``, ``x.new_zeros(...)`` or ``torch.tensor(0.)``."""
    if _is_zero(value):
        return True
    if not isinstance(value, fx.Node):
        return False
    if value.op == "call_method":
        return value.target == "new_zeros"
    if value.op != "call_function":
        return False
    if value.target in (torch.zeros_like, torch.zeros):
        return True
    return value.target in (torch.tensor, torch.scalar_tensor) and bool(value.args) and _is_zero(value.args[0])


_CASTS = ("float", "to", "type_as", "half", "double", "bfloat16")
_COMPARISONS = (operator.gt, operator.ge, torch.gt, torch.ge)


def _is_positive_mask(value: Any) -> bool:
    """``x > 0`` or ``x >= 0``, possibly cast (``.float()``, ``.to(dtype)``, ``.type_as(x)``)."""
    while isinstance(value, fx.Node) and value.op == "call_method" and value.target in _CASTS:
        value = value.args[0]
    if not isinstance(value, fx.Node) or len(value.args) != 2 or not _is_zero(value.args[1]):
        return False
    if value.op == "call_method":
        return value.target in ("gt", "ge")
    return value.op == "call_function" and value.target in _COMPARISONS


def contains_relu(module: nn.Module) -> bool:
    """Whether a module (a tracing leaf) hides ReLU modules inside it, which no rewrite can reach."""
    for sub in module.modules():
        if isinstance(sub, nn.ReLU) or (isinstance(sub, nn.Hardtanh) and _is_relu6_bounds(sub.min_val, sub.max_val)):
            return True
        if isinstance(sub, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and sub.activation is F.relu:
            return True
    return False


# --- aten-level spellings (graphs captured with torch.export) ---------------------------------------------
# What a rectifier lowers to in torch.export's training IR: nn.ReLU/F.relu -> aten.relu(_), F.relu6 ->
# aten.relu6(_), nn.ReLU6/F.hardtanh -> aten.hardtanh(_), torch.clamp/clip/clamp_min -> aten.clamp(_),
# aten.clip(_), aten.clamp_min(_), nn.Threshold/F.threshold -> aten.threshold(_). A call is a ReLU only for
# the bounds that make it one (``clamp(x, 0)``, ``clamp(x, 0, 6)``, ``threshold(x, 0, 0)``); any other
# bounds leave it alone. Keys are OpOverloads (what export records) and their packets (``torch.ops.aten.relu``).

def _aten_bounds(node: fx.Node, low_name: str, high_name: str) -> Tuple[Any, Any]:
    return _arg(node, 1, low_name), _arg(node, 2, high_name)


def _read_aten_relu(spelling: str, inplace: bool, upper: Optional[float] = None
                    ) -> Callable[[fx.Node], ReLUCall]:
    def read(node: fx.Node) -> ReLUCall:
        return ReLUCall(spelling, _arg(node, 0, "self"), inplace, upper)

    return read


def _read_aten_clamp(spelling: str, inplace: bool, low_name: str = "min", high_name: str = "max"
                     ) -> Callable[[fx.Node], Optional[ReLUCall]]:
    """``clamp(x, 0)``/``clamp(x, 0, None)`` is a ReLU, ``clamp(x, 0, 6)`` (and ``hardtanh(x, 0, 6)``) a ReLU6."""
    def read(node: fx.Node) -> Optional[ReLUCall]:
        low, high = _aten_bounds(node, low_name, high_name)
        if not _is_zero(low):
            return None
        if high is None and high_name == "max":
            return ReLUCall(spelling, _arg(node, 0, "self"), inplace, None)
        if _is_relu6_bounds(low, high) and not isinstance(high, bool):
            return ReLUCall(spelling + "(0, 6)", _arg(node, 0, "self"), inplace, 6.0)
        return None

    return read


def _read_aten_clamp_min(spelling: str, inplace: bool) -> Callable[[fx.Node], Optional[ReLUCall]]:
    def read(node: fx.Node) -> Optional[ReLUCall]:
        return ReLUCall(spelling, _arg(node, 0, "self"), inplace, None) if _is_zero(_arg(node, 1, "min")) else None

    return read


def _read_aten_threshold(spelling: str, inplace: bool) -> Callable[[fx.Node], Optional[ReLUCall]]:
    def read(node: fx.Node) -> Optional[ReLUCall]:
        if _is_zero(_arg(node, 1, "threshold")) and _is_zero(_arg(node, 2, "value")):
            return ReLUCall(spelling, _arg(node, 0, "self"), inplace, None)
        return None

    return read


def _aten_table() -> Dict[Any, Callable[[fx.Node], Optional[ReLUCall]]]:
    aten = torch.ops.aten
    readers = {
        "relu": _read_aten_relu("aten.relu", False), "relu_": _read_aten_relu("aten.relu_", True),
        "relu6": _read_aten_relu("aten.relu6", False, 6.0), "relu6_": _read_aten_relu("aten.relu6_", True, 6.0),
        "hardtanh": _read_aten_clamp("aten.hardtanh", False, "min_val", "max_val"),
        "hardtanh_": _read_aten_clamp("aten.hardtanh_", True, "min_val", "max_val"),
        "clamp": _read_aten_clamp("aten.clamp", False), "clamp_": _read_aten_clamp("aten.clamp_", True),
        "clip": _read_aten_clamp("aten.clip", False), "clip_": _read_aten_clamp("aten.clip_", True),
        "clamp_min": _read_aten_clamp_min("aten.clamp_min", False),
        "clamp_min_": _read_aten_clamp_min("aten.clamp_min_", True),
        "threshold": _read_aten_threshold("aten.threshold", False),
        "threshold_": _read_aten_threshold("aten.threshold_", True),
    }
    table: Dict[Any, Callable[[fx.Node], Optional[ReLUCall]]] = {}
    for name, reader in readers.items():
        packet = getattr(aten, name)
        table[packet] = reader
        # Only the overloads whose bounds are Python numbers: clamp.Tensor (tensor bounds) is no ReLU.
        table[packet.default] = reader
    return table


ATEN_SPELLINGS: Dict[Any, Callable[[fx.Node], Optional[ReLUCall]]] = _aten_table()
FUNCTION_SPELLINGS.update(ATEN_SPELLINGS)  # match() looks call_function targets up in FUNCTION_SPELLINGS

ATEN_OTHER_ACTIVATIONS = {
    getattr(torch.ops.aten, name).default: f"aten.{name}" for name in (
        "gelu", "gelu_", "silu", "silu_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "sigmoid",
        "sigmoid_", "tanh", "tanh_", "elu", "elu_", "selu", "selu_", "celu", "celu_", "leaky_relu",
        "leaky_relu_", "prelu", "rrelu", "softplus", "mish", "mish_", "glu", "hardtanh", "hardtanh_", "log_sigmoid")
}
OTHER_ACTIVATION_FUNCTIONS.update(ATEN_OTHER_ACTIVATIONS)  # hardtanh is listed only when not a ReLU6
