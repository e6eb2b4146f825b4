"""Tracing a user's model with torch.fx, with torchvision-style qualified node names.

Node names follow ``torchvision.models.feature_extraction``: a call_module node is named by the module's
qualified name (``layer4.1.relu``), any other node by the enclosing module's name plus the op
(``layer4.1.add``), and repeated names get a per-scope ``_1``, ``_2`` postfix (``layer4.1.relu_1`` is the
second call of ``layer4.1.relu``). The tracer also records what every traced-through module *returned*, so a
module name captures the module's output exactly.

>>> import torchvision
>>> traced = trace(torchvision.models.resnet18())
>>> "layer4.1.relu_1" in traced.node_names, traced.module_outputs["layer4"][0].meta["qualname"]
(True, 'layer4.1.relu_1')
"""
import inspect
import math
import os
import re
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torchvision
from torch import fx, nn

from .. import ops
from ..hooks import HookRecorder, refuse_dropped
from ...core.errors import InputError, TraceError
from ...core.inputs import TENSOR, Signature
from ..mirror import mirror

TRACER_OPTIONS = ("leaf_modules", "autowrap_functions", "autowrap_modules", "concrete_args")
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # guided_swap/


def default_leaf_modules() -> List[type]:
    """torchvision.ops modules that hold no submodules: traced as single calls, as torchvision does.

    torchvision makes *every* torchvision.ops module a leaf; that would hide the ReLUs inside
    ``Conv2dNormActivation`` and ``SqueezeExcitation``, so modules with children are traced through.
    """
    leaves = []
    for _, obj in inspect.getmembers(torchvision.ops, inspect.isclass):
        if issubclass(obj, nn.Module) and not issubclass(obj, (nn.Sequential, nn.ModuleList)):
            if obj.__name__ not in ("SqueezeExcitation", "Conv2dNormActivation", "Conv3dNormActivation", "MLP"):
                leaves.append(obj)
    return leaves


class QualnameTracer(fx.Tracer):
    """fx.Tracer that names nodes the torchvision way and records module outputs."""

    def __init__(self, leaf_modules=(), autowrap_functions=(), autowrap_modules=(math,)):
        # The library's own graph functions are always leaves: GraphModule unpickling re-traces the saved code
        # with this tracer class, and must not trace into an autograd.Function.
        own = ops.GRAPH_FUNCTIONS
        super().__init__(autowrap_modules=tuple(autowrap_modules), autowrap_functions=own + tuple(autowrap_functions))
        self.leaf_modules = tuple(leaf_modules)
        self.current_qualname = ""
        self.module_outputs: Dict[str, List[fx.Node]] = {}
        self.module_inputs: Dict[str, List[fx.Node]] = {}  # the first tensor each call is given
        self.module_entries: Dict[str, List[List[Optional[fx.Node]]]] = {}  # calls that return a tuple
        self.node_names: Dict[fx.Node, str] = {}
        self._name_counts: Dict[str, int] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_modules and isinstance(m, self.leaf_modules):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        outer = self.current_qualname
        self.current_qualname = self.path_of_module(m)
        try:
            result = super().call_module(m, forward, args, kwargs)
        finally:
            name, self.current_qualname = self.current_qualname, outer
        if isinstance(result, fx.Proxy):
            self.module_outputs.setdefault(name, []).append(result.node)
        elif isinstance(result, (tuple, list)) and any(isinstance(item, fx.Proxy) for item in result):
            self.module_entries.setdefault(name, []).append(
                [item.node if isinstance(item, fx.Proxy) else None for item in result])
        first = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, fx.Proxy)), None)
        if first is not None:
            self.module_inputs.setdefault(name, []).append(first.node)
        return result

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        self._name(proxy.node)
        return proxy

    def _name(self, node: fx.Node) -> None:
        if node.op == "call_module":
            base = self.current_qualname
        else:
            # fx already postfixes names globally (relu_3); strip that and count per scope instead.
            op = re.sub(r"_[0-9]+$", "", node.name)
            base = f"{self.current_qualname}.{op}" if self.current_qualname else op
        count = self._name_counts.get(base, 0)
        self._name_counts[base] = count + 1
        qualname = base if count == 0 else f"{base}_{count}"
        self.node_names[node] = qualname
        node.meta["qualname"] = qualname


@dataclass
class Traced:
    """A traced model: its GraphModule (on the mirror), node names and module outputs."""

    module: fx.GraphModule
    module_outputs: Dict[str, List[fx.Node]]
    node_names: Dict[str, fx.Node] = field(default_factory=dict)
    leaf_modules: tuple = ()
    fixed_arguments: Dict[str, Any] = field(default_factory=dict)  # forward's arguments traced as these values
    module_inputs: Dict[str, List[fx.Node]] = field(default_factory=dict)  # the first tensor each call is given
    module_entries: Dict[str, List[List[Optional[fx.Node]]]] = field(default_factory=dict)  # tuple-returning calls
    signature: Signature = Signature()  # what the graph is called with: its explained inputs, then forward_args


def trace(model: nn.Module, tracer_kwargs: Optional[Dict[str, Any]] = None,
          signature: Optional[Signature] = None) -> Traced:
    """Trace ``model`` (via its mirror) and return the graph with qualified names.

    ``tracer_kwargs`` takes the options torchvision's ``create_feature_extractor`` takes: ``leaf_modules``
    (classes not to trace through), ``autowrap_functions``, ``autowrap_modules`` and ``concrete_args``.

    ``signature`` (:class:`~guided_swap.core.inputs.Signature`) says what ``forward`` is called with: its
    first arguments are the explained inputs, then the forward arguments, tensors as graph inputs and other
    values traced as they are. Every later argument with a default is traced as its default
    (``forward(self, x, mask=None)`` called with ``x`` alone is traced as if ``mask`` were absent: fx would
    otherwise take a placeholder for it and follow ``if mask is not None`` as if it were given). The default
    signature is the arguments without a default (at least one). ``concrete_args`` overrides all of this.
    """
    options = dict(tracer_kwargs or {})
    unknown = sorted(set(options) - set(TRACER_OPTIONS))
    if unknown:
        raise TypeError(f"unknown tracer option(s) {unknown}; the options are {list(TRACER_OPTIONS)}")
    signature = signature or default_signature(model)
    fixed = traced_arguments(model, signature)
    concrete_args = {**fixed, **(options.pop("concrete_args", None) or {})} or None
    leaves = tuple(default_leaf_modules()) + tuple(options.pop("leaf_modules", ()))
    autowrap_modules = (math,) + tuple(options.pop("autowrap_modules", ()))
    tracer = QualnameTracer(leaves, options.pop("autowrap_functions", ()), autowrap_modules)
    root = mirror(model)
    hooks = HookRecorder(root)
    try:
        graph = tracer.trace(root, concrete_args=concrete_args)
    except Exception as error:  # any failure inside fx or the model's forward
        raise TraceError(_trace_failure_message(model, error)) from error
    refuse_dropped(hooks.dropped(), "fx")
    hooks.remove()
    module = fx.GraphModule(root, graph, class_name=type(model).__name__)
    names = {name: node for node, name in tracer.node_names.items()}
    return Traced(module, tracer.module_outputs, names, leaves, dict(concrete_args or {}), tracer.module_inputs,
                  tracer.module_entries, signature)


def _positional_parameters(model: nn.Module) -> Optional[List[inspect.Parameter]]:
    """The parameters of ``model.forward`` that can be given by position; None when Python cannot read them."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a forward without a signature Python can read
        return None
    return parameters


def default_signature(model: nn.Module) -> Signature:
    """What ``forward`` is called with by default: every argument without a default (the first at least)."""
    parameters = _positional_parameters(model) or []
    positional = [p for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                      inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    required = 1
    while required < len(positional) and positional[required].default is inspect.Parameter.empty:
        required += 1
    return Signature(required)


def traced_arguments(model: nn.Module, signature: Signature) -> Dict[str, Any]:
    """The arguments of ``model.forward`` fixed in its graph for calls of ``signature``: forward arguments that
    are values (not tensors), and every argument not given that has a default, at its default."""
    parameters = _positional_parameters(model)
    if parameters is None:
        return {}
    given = signature.inputs + len(signature.extra)
    positional = [p for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                      inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    takes_more = any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in parameters)
    if given > len(positional) and not takes_more:
        names = ", ".join(p.name for p in positional)
        raise InputError(f"{type(model).__name__}.forward({names}) takes {len(positional)} argument(s) by position; "
                         f"this call gives {given} ({signature.describe()}): pass fewer inputs or forward_args")
    fixed = {}
    for index, parameter in enumerate(positional):
        if index < signature.inputs:
            continue
        if index < given:
            entry = signature.extra[index - signature.inputs]
            if entry != TENSOR:
                fixed[parameter.name] = entry[1]
        elif parameter.default is not inspect.Parameter.empty:
            fixed[parameter.name] = parameter.default
        else:
            raise InputError(f"{type(model).__name__}.forward needs {parameter.name!r}, which this call does not give "
                             f"({signature.describe()}): explain a tuple of inputs (x1, x2, ...) or pass it with "
                             "forward_args=")
    kinds = (inspect.Parameter.KEYWORD_ONLY,)
    fixed.update({p.name: p.default for p in parameters if p.kind in kinds and p.default is not inspect.Parameter.empty})
    return fixed


def optional_arguments(model: nn.Module) -> Dict[str, Any]:
    """The arguments of ``model.forward`` after the first that have a default, with their defaults."""
    return traced_arguments(model, Signature())


def _inside(filename: str, directory: str) -> bool:
    return os.path.commonpath([os.path.abspath(filename), directory]) == directory


def _trace_failure_message(model: nn.Module, error: Exception) -> str:
    # Compare whole path components: ".../site-packages/torchvision" is the model's code, not torch's.
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not _inside(f.filename, _TORCH_DIR) and not _inside(f.filename, _PACKAGE_DIR)]
    where = ""
    if frames:
        frame = frames[-1]
        where = f"\n  failing line: {frame.filename}:{frame.lineno} in {frame.name}: {frame.line}"
    return (
        f"torch.fx could not trace {type(model).__name__}: {type(error).__name__}: {error}{where}\n"
        "  hint: pass tracer_kwargs to convert(): {'leaf_modules': [TheModuleClass]} to keep the module that "
        "holds this line as one call (ReLUs inside it are then not swapped), {'autowrap_functions': [fn]} "
        "for a function with data-dependent control flow, or {'concrete_args': {...}} to fix an argument."
    )
