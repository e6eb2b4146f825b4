"""A converted graph (an ``fx.GraphModule``) as data, and rebuilt from data without running code from the file.

Each node is written as ``{"name", "op", "target", "args", "kwargs"}``: a ``call_function`` target by its
allow-list name (:mod:`guided_swap.run.allowed`: torch, ``torch.nn.functional``, aten, ``operator``, ``math``,
guided_swap's ops) or, for a named tuple the model builds, by its name and fields; a ``call_method`` target by a
``torch.Tensor`` method name from the allow-list; ``get_attr`` and ``call_module`` targets by their paths, bound
to the file's tensors and modules (:mod:`guided_swap.run.module_file`); arguments as tagged data
(:mod:`guided_swap.run.file_values`).

Rebuilding checks every name before torch.fx sees it: node names and placeholder targets are identifiers, paths
are dotted identifiers or indices, keyword names are identifiers, targets are allowed, ``getattr`` reads only a
tensor's data attributes or a field of the named result it reads (a named tuple the graph builds, torch's
``max(...).values``), the export path's shape conditions are arithmetic on the input's sizes only
(:mod:`guided_swap.capture.graph.guards`), and no named tuple stands where torch.fx writes a value with ``repr()``
(in a dict, a set or another named tuple: its repr would be a call of the name the file gives it,
:func:`written_as_data`). torch.fx then generates the forward's code from that checked graph, as it does for every
converted model; nothing from the file is executed or imported. A graph that uses anything else raises :class:`~guided_swap.run.file_values.NotData` when written,
and the caller pickles it instead (it then loads only with ``trust=True``).

>>> import torch
>>> from guided_swap.run.file_values import Packer, Unpacker
>>> from guided_swap.run.module_file import ModuleReader
>>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.ReLU()))
>>> packer = Packer(rule=None)
>>> data = pack_graph(gm, packer)
>>> [node["op"] for node in data["nodes"]]
['placeholder', 'call_module', 'call_module', 'output']
>>> unpacker = Unpacker(packer.tensor_info, {k: t.detach() for k, t in packer.tensors.items()}, None, None)
>>> reader = ModuleReader(packer.modules, unpacker)
>>> x = torch.randn(1, 3, 4, 4)
>>> torch.equal(unpack_graph(data, unpacker)(x), gm(x))
True
"""
import keyword
from typing import Any, Dict

import torch
from torch import Tensor, fx, nn

from ..capture.graph.export_trace import ExportGraphTracer, check_input_shape
from ..capture.graph.guards import is_size_condition
from ..capture.graph.trace import QualnameTracer
from ..core.errors import LoadError
from . import allowed
from .file_values import NotData, Packer, Unpacker, as_written, identifier_path, named_tuple, pack, unpack
from .module_file import pack_module

OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
TRACERS = {"fx": QualnameTracer, "export": ExportGraphTracer, "none": None}


# --- writing --------------------------------------------------------------------------------------------------

def pack_graph(gm: fx.GraphModule, packer: Packer) -> Dict[str, Any]:
    """``gm`` as data; :class:`NotData` (nothing left in ``packer``) when a node cannot be written as data."""
    mark = packer.mark()
    try:
        return _graph_data(gm, packer)
    except NotData:
        packer.roll_back(mark)
        raise


def _graph_data(gm: fx.GraphModule, packer: Packer) -> Dict[str, Any]:
    tracer = next((k for k, v in TRACERS.items() if v is getattr(gm.graph, "_tracer_cls", None)), "none")
    nodes = [_node_data(node, packer) for node in gm.graph.nodes]
    targets = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    return {"class_name": type(gm).__name__, "tracer": tracer, "nodes": nodes,
            "attributes": {target: _attribute_data(gm, target, packer) for target in sorted(targets)}}


def _node_data(node: fx.Node, packer: Packer) -> Dict[str, Any]:
    def name(n: fx.Node) -> str:
        return n.name

    if not written_as_data(node.args, node.kwargs):
        raise NotData(f"node {node.name} has a named tuple where torch.fx writes its repr")
    data = {"name": node.name, "op": node.op, "target": _target_data(node),
            "args": pack(node.args, packer, name), "kwargs": pack(dict(node.kwargs), packer, name)}
    if isinstance(node.meta.get("qualname"), str):
        data["qualname"] = node.meta["qualname"]
    return data


def _target_data(node: fx.Node) -> Any:
    target = node.target
    if node.op in ("placeholder", "get_attr", "call_module", "call_method", "output"):
        if node.op == "call_method" and not allowed.method_allowed(target, node.args[1:]):
            raise NotData(f"the graph calls the method {target!r}")
        return target
    if isinstance(target, type) and issubclass(target, tuple) and hasattr(target, "_fields"):
        return {"namedtuple": [target.__name__, list(target._fields)]}
    name = allowed.function_name(target)
    if name is None:
        raise NotData(f"the graph calls {getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)}")
    if target is getattr and not (len(node.args) == 2 and allowed.attribute_allowed(
            node.args[1], allowed.result_fields(node.args[0]))):
        raise NotData(f"the graph reads the attribute {node.args[1:2]}")
    return {"function": name}


def _attribute_data(gm: fx.GraphModule, target: str, packer: Packer) -> Dict[str, str]:
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    if isinstance(value, Tensor):
        return {"tensor": packer.tensor(value)}
    if isinstance(value, nn.Module):
        return {"module": pack_module(value, packer)}
    raise NotData(f"the graph reads {target!r}, a {type(value).__name__}")


# --- reading --------------------------------------------------------------------------------------------------

def unpack_graph(data: Dict[str, Any], unpacker: Unpacker) -> fx.GraphModule:
    """The graph ``data`` describes, every name checked (module docstring); :class:`LoadError` for anything else."""
    if data.get("tracer") not in TRACERS or not _is_name(data.get("class_name")):
        raise LoadError("the file's graph has no valid class name or tracer: it is damaged or edited")
    root = {target: _attribute(target, ref, unpacker) for target, ref in _items(data.get("attributes"))}
    graph = fx.Graph(tracer_cls=TRACERS[data["tracer"]])
    nodes: Dict[str, fx.Node] = {}
    for node_data in _node_list(data.get("nodes")):
        _add_node(graph, node_data, nodes, root, unpacker)
    if not graph.nodes or next(iter(reversed(graph.nodes))).op != "output":
        raise LoadError("the file's graph does not end with its output: it is damaged or edited")
    try:
        graph.lint()
        return fx.GraphModule(root, graph, class_name=data["class_name"])
    except (RuntimeError, ValueError, AttributeError, TypeError, SyntaxError, NameError) as error:
        raise LoadError(f"the file's graph is not a valid graph ({error}): it is damaged or edited") from None


def _items(table: Any):
    if not isinstance(table, dict):
        raise LoadError("the file's graph has no attribute table: it is damaged or edited")
    return table.items()


def _attribute(target: Any, ref: Any, unpacker: Unpacker) -> Any:
    if not identifier_path(target) or not isinstance(ref, dict) or len(ref) != 1:
        raise LoadError(f"the file's graph names an attribute {str(target)[:80]!r} that is not a plain path: it is "
                        "damaged or edited")
    if "tensor" in ref:
        return unpacker.tensor(ref["tensor"])
    if "module" in ref and unpacker.module is not None:
        return unpacker.module(ref["module"])
    raise LoadError(f"the file's graph binds {target!r} to {str(ref)[:80]}: it is damaged or edited")


def _node_list(nodes: Any) -> list:
    if type(nodes) is not list or not all(isinstance(n, dict) for n in nodes):
        raise LoadError("the file's graph has no node list: it is damaged or edited")
    return nodes


def _add_node(graph: fx.Graph, data: Dict[str, Any], nodes: Dict[str, fx.Node], root: Dict[str, Any],
              unpacker: Unpacker) -> None:
    name, op = data.get("name"), data.get("op")
    if not _is_name(name) or name in nodes or op not in OPS:
        raise LoadError(f"the file's graph has a node {str(name)[:40]!r} of kind {str(op)[:40]!r}: it is damaged or "
                        "edited")

    def node(reference: Any) -> fx.Node:
        if reference not in nodes:
            raise LoadError(f"node {name} uses {str(reference)[:40]!r}, which comes nowhere before it: the file is "
                            "damaged or edited")
        return nodes[reference]

    args = unpack(data.get("args"), unpacker, node)
    kwargs = unpack(data.get("kwargs"), unpacker, node)
    if type(args) is not tuple or type(kwargs) is not dict or not all(_is_name(k) for k in kwargs):
        raise LoadError(f"node {name} has arguments that are not a tuple and named keywords: the file is edited")
    if not written_as_data(args, kwargs):
        raise LoadError(f"node {name} has a named tuple inside a dict, a set or another named tuple, where torch.fx "
                        "would write it into the forward's code as a call of its name (which the file chooses): the "
                        "file is edited")
    target = _target(op, data.get("target"), args, kwargs, root, name)
    if op == "placeholder" and (target == "self" or any(n.op == op and n.target == target for n in nodes.values())):
        raise LoadError(f"the file's graph takes an input {target!r} that is 'self' or named twice: it is damaged or edited")
    created = graph.create_node(op, target, args, kwargs, name=name)
    if isinstance(data.get("qualname"), str):
        created.meta["qualname"] = data["qualname"]
    nodes[name] = created


def _target(op: str, target: Any, args: tuple, kwargs: dict, root: Dict[str, Any], name: str) -> Any:
    if op == "placeholder" and _is_name(target):
        return target
    if op == "output" and target == "output":
        return target
    if op == "get_attr" and target in root:
        return target
    if op == "call_module" and isinstance(root.get(target), nn.Module):
        return target
    if op == "call_method" and allowed.method_allowed(target, args[1:]) and args and isinstance(args[0], fx.Node):
        return target
    if op == "call_function" and isinstance(target, dict) and len(target) == 1:
        return _function(target, args, kwargs, name)
    raise LoadError(f"node {name} ({op}) has the target {str(target)[:80]!r}, which a saved explainer may not use "
                    "there: the file is damaged or edited")


def _function(target: Dict[str, Any], args: tuple, kwargs: dict, name: str) -> Any:
    if "namedtuple" in target and type(target["namedtuple"]) is list and len(target["namedtuple"]) == 2:
        return named_tuple(*target["namedtuple"])
    function = allowed.function(target.get("function"))
    if function is getattr and not (len(args) == 2 and allowed.attribute_allowed(args[1], allowed.result_fields(args[0]))):
        raise LoadError(f"node {name} reads the attribute {args[1:]!r}, which a saved explainer may not read")
    if function is check_input_shape and not (len(args) == 1 and _size_conditions(kwargs.get("guards", ()))):
        raise LoadError(f"node {name} checks the input with conditions that are not arithmetic on its sizes; the "
                        "file is edited")
    return function


_LITERALS = (type(None), bool, int, float, complex, str, type(Ellipsis), torch.dtype, torch.memory_format,
             torch.layout, torch.device, Tensor, fx.Node)


def written_as_data(args: tuple, kwargs: dict) -> bool:
    """Whether torch.fx writes these arguments into the forward's code as the values they are.

    torch.fx writes tuples, lists and slices item by item, a named tuple as a global bound to its class, and
    anything else with ``repr()``: a dict, a set, and a named tuple's items. A named tuple's repr is a call of its
    name (``open(file='x', mode='w')``), so one may not stand where repr writes it, or the forward would call
    whatever that name means in its code (a placeholder's default even runs as the forward is defined)."""
    return _as_data(args, False) and all(_as_data(value, False) for value in kwargs.values())


def _as_data(value: Any, by_repr: bool) -> bool:
    if isinstance(value, tuple) and hasattr(type(value), "_fields"):
        return not by_repr and all(_as_data(item, True) for item in value)
    if isinstance(value, (tuple, list)):
        return all(_as_data(item, by_repr) for item in value)
    if isinstance(value, slice):
        return all(_as_data(item, by_repr) for item in (value.start, value.stop, value.step))
    if isinstance(value, dict):
        return all(_as_data(key, True) and _as_data(item, True) for key, item in value.items())
    if isinstance(value, (set, frozenset)):
        return all(_as_data(item, True) for item in value)
    return isinstance(value, _LITERALS)


def _size_conditions(guards: Any) -> bool:
    return type(guards) in (tuple, list) and all(is_size_condition(code) for code in guards)


def _is_name(name: Any) -> bool:
    return as_written(name) and not keyword.iskeyword(name) and not name.startswith("__")
