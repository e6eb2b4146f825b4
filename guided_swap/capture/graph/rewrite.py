"""The graph pass: swap every ReLU spelling for a rule op, protect captured tensors, fork the plain tail.

Three steps, each a short function over an ``fx.GraphModule``:

1. :func:`swap_rectifiers` replaces each ReLU call site (see :mod:`guided_swap.capture.spellings`) by the rule's op,
   in place where the original was in place, so memory stays the plain model's.
2. :func:`protect` makes any in-place op that would overwrite a captured tensor out of place and points
   the later uses of the mutated tensor at the new node (fx would otherwise capture the mutated value).
3. :func:`fork_plain` copies the part of the graph downstream of the captures with ordinary ReLUs, fed by
   detached aliases of the captures. One ``autograd.grad`` over both scores then gives the guided input
   gradient and the ordinary gradient at each capture, exactly as two passes would (docs/methods.md).

>>> import torch
>>> from guided_swap.core.rules import get_rule
>>> from guided_swap.capture.graph.trace import trace
>>> gm = trace(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.ReLU())).module  # torchvision-style names
>>> swaps, _ = swap_rectifiers(gm, get_rule("guided"))
>>> [(s.name, s.spelling) for s in swaps]
[('1', 'nn.ReLU')]
"""
import copy
import inspect
import operator
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import fx, nn

from .. import ops
from .. import spellings
from ...core.errors import LayerError
from ...core.report import Swap
from ...core.rules import Rule


def qualname(node: fx.Node) -> str:
    return node.meta.get("qualname", node.name)


def _module(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


# --- 1. swapping --------------------------------------------------------------------------------------

SLOT = "gs_rule"


def swap_rectifiers(gm: fx.GraphModule, rule: Rule) -> Tuple[List[Swap], Dict[fx.Node, fx.Node]]:
    """Replace every rectifier call site by ``rule``'s op. Returns the swaps and a map old node -> new node.

    A rule whose gradient is autograd's own (``rule.ordinary``) needs no swap: the graph stays as it is.
    """
    if rule.ordinary:
        return [], {}
    swaps, replaced, slot = [], {}, None
    for node in list(gm.graph.nodes):
        call = spellings.match(node, _module(gm, node))
        if call is None:
            continue
        if slot is None:
            slot = _rule_slot(gm, rule)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(ops.rectify, (call.input, slot), {"upper": call.upper, "inplace": call.inplace})
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        swaps.append(Swap(qualname(new), call.spelling, call.inplace))
        replaced[node] = new
    return swaps, replaced


def _rule_slot(gm: fx.GraphModule, rule: Rule) -> fx.Node:
    """A ``get_attr`` node, placed after the inputs, for the module that holds ``rule`` in ``gm``."""
    gm.add_submodule(SLOT, ops.RuleSlot(rule))
    last_input = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last_input):
        slot = gm.graph.get_attr(SLOT)
    slot.meta["qualname"] = SLOT
    return slot


def unswapped_activations(gm: fx.GraphModule) -> Tuple[List[Tuple[str, str]], List[str]]:
    """Activations left with their ordinary gradient, and leaf modules that hide ReLUs from the rewrite."""
    left, hidden = [], []
    for node in gm.graph.nodes:
        module = _module(gm, node)
        kind = spellings.other_activation(node, module)
        if kind is not None:
            left.append((qualname(node), kind))
        elif module is not None and spellings.match(node, module) is None and spellings.contains_relu(module):
            hidden.append(qualname(node))
    return left, hidden


# --- 2. in-place ops ------------------------------------------------------------------------------------

def mutated_input(gm: fx.GraphModule, node: fx.Node) -> Optional[fx.Node]:
    """The node whose tensor ``node`` overwrites in place, or None."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    first = node.args[0]
    if node.op == "call_module":
        return first if getattr(_module(gm, node), "inplace", False) is True else None
    if node.op == "call_method":
        name = node.target
        return first if name.endswith("_") and not name.endswith("__") else None
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        return first if _writes_first_argument(node.target) else None
    if node.op == "call_function":
        if node.kwargs.get("inplace") is True or node.target is operator.setitem:
            return first
        if _positional_inplace(node):
            return first
        name = getattr(node.target, "__name__", "")
        return first if name.endswith("_") and not name.startswith("_") else None
    return None


def _writes_first_argument(op: "torch._ops.OpOverload") -> bool:
    """Whether an aten op writes its first argument (``relu_``, ``add_``; not ``out=`` variants)."""
    arguments = op._schema.arguments
    alias = arguments[0].alias_info if arguments else None
    return alias is not None and alias.is_write and not arguments[0].kwarg_only


def _functional_twin(op: "torch._ops.OpOverload"):
    """``aten.relu.default`` for ``aten.relu_.default``; None when there is none."""
    name = op._schema.name.split("::")[-1]
    packet = getattr(torch.ops.aten, name[:-1], None) if name.endswith("_") else None
    return getattr(packet, op._overloadname, None) if packet is not None else None


def _positional_inplace(node: fx.Node) -> bool:
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return False
    return bound.arguments.get("inplace") is True


def make_out_of_place(gm: fx.GraphModule, node: fx.Node) -> None:
    """Turn the in-place op at ``node`` into its out-of-place twin (same values, new tensor)."""
    if node.op == "call_module":
        twin = copy.copy(gm.get_submodule(node.target))
        twin.inplace = False
        name = f"{node.target}_out_of_place"
        if not _has_submodule(gm, name):
            gm.add_submodule(name, twin)
        node.target = name
        return
    if node.op == "call_method" and hasattr(torch.Tensor, node.target[:-1]):
        node.target = node.target[:-1]
        return
    if node.op == "call_function" and node.target is ops.rectify:
        node.kwargs = {**node.kwargs, "inplace": False}
        return
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        twin = _functional_twin(node.target)
        if twin is not None:
            node.target = twin
            return
    elif node.op == "call_function" and node.target is not operator.setitem:
        if "inplace" in node.kwargs or _positional_inplace(node):
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
            bound.arguments["inplace"] = False
            node.args, node.kwargs = bound.args, bound.kwargs
            return
        name = getattr(node.target, "__name__", "")
        twin = getattr(torch, name[:-1], None)
        if twin is not None:
            node.target = twin
            return
    raise LayerError(
        f"node {qualname(node)!r} ({node.format_node()}) overwrites a captured tensor in place and has no "
        "out-of-place form; capture a node after it instead (see guided_swap.layer_names(model))"
    )


def _has_submodule(gm: nn.Module, name: str) -> bool:
    try:
        gm.get_submodule(name)
        return True
    except AttributeError:
        return False


def protect(gm: fx.GraphModule, protected: Sequence[fx.Node]) -> List[str]:
    """Make in-place ops on ``protected`` nodes out of place; later uses read the op's result instead.

    Returns the names of the ops changed. Without this, an in-place ReLU after a captured conv (VGG's
    ``features.29`` after ``features.28``, DenseNet's ``F.relu(features, inplace=True)``) would overwrite the
    captured activation and move the gradient taken at it past the ReLU.
    """
    changed, pending = [], list(protected)
    while pending:
        target = pending.pop()
        for user in list(target.users):
            if mutated_input(gm, user) is not target:
                continue
            make_out_of_place(gm, user)
            _redirect_later_uses(gm.graph, target, user)
            changed.append(qualname(user))
    return changed


def _redirect_later_uses(graph: fx.Graph, mutated: fx.Node, result: fx.Node) -> None:
    position = {node: i for i, node in enumerate(graph.nodes)}
    mutated.replace_all_uses_with(
        result, delete_user_cb=lambda user: user is not result and position[user] > position[result]
    )


# --- 3. the plain fork --------------------------------------------------------------------------------

def descendants(nodes: Sequence[fx.Node]) -> Set[fx.Node]:
    """Every node that depends on one of ``nodes`` (the nodes themselves excluded), the output excluded."""
    seen: Set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        for user in stack.pop().users:
            if user.op != "output" and user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


def needs_fork(captures: Sequence[fx.Node], swapped: Sequence[fx.Node]) -> bool:
    """Whether a swapped ReLU lies after a capture, so the gradient there differs from the ordinary one."""
    downstream = descendants(captures)
    return any(node in downstream for node in swapped)


def fork_plain(gm: fx.GraphModule, captures: Sequence[fx.Node], output_arg) -> Tuple[object, Tuple[fx.Node, ...]]:
    """Copy everything downstream of ``captures`` with ordinary ReLUs; return the fork's output and captures.

    Each copy is inserted right after its original, so it reads every outside tensor at the same point of
    execution. Outside tensors enter detached; the captures that no other capture precedes enter as
    detached leaves; every in-place op in the copy is made out of place, so the fork never writes to a
    tensor of the main graph.
    """
    graph = gm.graph
    downstream = descendants(captures)
    env: Dict[fx.Node, fx.Node] = {}

    def outside(node: fx.Node) -> fx.Node:
        if node not in env:
            with graph.inserting_after(node):
                env[node] = graph.call_function(ops.fork_detach, (node,))
        return env[node]

    def lookup(value):
        return fx.node.map_arg(value, lambda a: env[a] if a in env else outside(a))

    for capture in captures:
        if capture not in downstream:
            with graph.inserting_after(capture):
                env[capture] = graph.call_function(ops.fork_leaf, (capture,))
    for node in [n for n in graph.nodes if n in downstream]:
        with graph.inserting_before(node.next):
            twin, mutated = _plain_twin(gm, node, lookup)
        twin.meta = {"qualname": qualname(node) + "[plain]"}
        env[node] = twin
        if mutated is not None:  # later copies that read the mutated tensor read this result
            env[mutated] = twin
    fork_output = fx.node.map_arg(output_arg, lambda a: env[a] if a in env else _detach_before_output(graph, a))
    fork_captures = tuple(env[c] if c in env else c for c in captures)
    return fork_output, fork_captures


def _plain_twin(gm: fx.GraphModule, node: fx.Node, lookup) -> Tuple[fx.Node, Optional[fx.Node]]:
    """The fork's copy of ``node`` (out of place, ordinary rectifiers) and the tensor ``node`` mutates, if any."""
    name = f"{node.name}_plain"
    if node.op == "call_function" and node.target is ops.rectify:
        source = node.args[0]
        twin = gm.graph.create_node("call_function", ops.plain_rectify, (lookup(source),),
                                    {"upper": node.kwargs["upper"]}, name=name)
        return twin, source if node.kwargs["inplace"] else None
    args, kwargs = lookup((node.args, node.kwargs))
    twin = gm.graph.create_node(node.op, node.target, args, kwargs, name=name)
    if mutated_input(gm, twin) is None:
        return twin, None
    make_out_of_place(gm, twin)
    return twin, node.args[0]


def _detach_before_output(graph: fx.Graph, node: fx.Node) -> fx.Node:
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    with graph.inserting_before(output):
        return graph.call_function(ops.fork_detach, (node,))
