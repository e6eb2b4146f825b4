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


FUNCTION_SPELLINGS: Dict[Any, Callable[[fx.Node], Optional[ReLUCall]]] = {
    F.relu: _read_relu("F.relu"),
    torch.relu: _read_relu("torch.relu", inplace=False),
    torch.relu_: _read_relu("torch.relu_", inplace=True),  # F.relu_ is torch.relu_
    F.relu6: _read_relu("F.relu6", upper=6.0),
    F.hardtanh: _read_hardtanh("F.hardtanh(0, 6)"),
    F.hardtanh_: _read_hardtanh("F.hardtanh_(0, 6)", inplace=True),
}

METHOD_SPELLINGS: Dict[str, Callable[[fx.Node], Optional[ReLUCall]]] = {
    "relu": _read_relu("Tensor.relu", inplace=False),
    "relu_": _read_relu("Tensor.relu_", inplace=True),
}


# --- call_module spellings: module class -> reader(node, module) ------------------------------------------

def _read_relu_module(node: fx.Node, module: nn.Module) -> ReLUCall:
    return ReLUCall("nn.ReLU", _arg(node, 0, "input"), bool(module.inplace), None)


def _read_hardtanh_module(node: fx.Node, module: nn.Module) -> Optional[ReLUCall]:
    if not _is_relu6_bounds(module.min_val, module.max_val):
        return None
    name = "nn.ReLU6" if isinstance(module, nn.ReLU6) else "nn.Hardtanh(0, 6)"
    return ReLUCall(name, _arg(node, 0, "input"), bool(module.inplace), 6.0)


MODULE_SPELLINGS: Tuple[Tuple[type, Callable[[fx.Node, nn.Module], Optional[ReLUCall]]], ...] = (
    (nn.ReLU, _read_relu_module),
    (nn.Hardtanh, _read_hardtanh_module),  # covers nn.ReLU6, a Hardtanh(0, 6)
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
    """The name of a non-ReLU activation at ``node`` (it keeps its ordinary gradient), or None."""
    if node.op == "call_module" and isinstance(module, OTHER_ACTIVATION_MODULES):
        return "nn." + type(module).__name__
    if node.op == "call_function":
        return _lookup(OTHER_ACTIVATION_FUNCTIONS, node.target)
    if node.op == "call_method" and node.target in OTHER_ACTIVATION_METHODS:
        return "Tensor." + node.target
    return None


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

def _is_zero(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


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
