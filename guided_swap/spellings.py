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
