"""Graphs cut from the explain graph for CAMs that need passes of their own, on the graph's own copy.

:func:`tail_module` is the model from a captured layer on: the captured node's value becomes an input, so
Ablation-CAM feeds it ablated copies of the activation and runs only what follows the layer. What the rest of the
model reads from before the layer (a skip connection around it, DenseNet's concatenated features) is computed
once for the clean batch and given to each row by its sample; only a value that is not batch-major (a size read
from the input) is recomputed from the input rows. No hook and no module replacement: the user's model and the
explain graph are never touched.

>>> import torch, torchvision, guided_swap as gs
>>> model = torchvision.models.resnet18().eval()
>>> ex = gs.convert(model, layer="layer3.0.conv2")    # the block's shortcut bypasses the layer
>>> x = torch.randn(2, 3, 64, 64)
>>> tail = tail_module(ex.graph_module, 0, x)
>>> A = ex.explain(x).layers["layer3.0.conv2"].activation
>>> tail.needs_input, len(tail.values), torch.allclose(tail(x, A, torch.arange(2)), model(x), atol=1e-5)
(False, 1, True)
"""
from typing import Any, Dict, List, Sequence, Set, Tuple

import torch
from torch import Tensor, fx

from .plan import GraphOutputs, _copy_graph
from .rewrite import descendants, mutated_input, protect


class Tail:
    """The model from one captured layer on: ``tail(x_rows, A_rows, samples)`` is the model's output when the
    layer's value is ``A_rows``, row ``i`` belonging to sample ``samples[i]`` of the batch the tail was cut for.
    ``x_rows`` (those samples' inputs) is read only when ``needs_input``."""

    def __init__(self, module: fx.GraphModule, needs_input: bool, values: Sequence[Tensor]):
        self.module, self.needs_input, self.values = module, needs_input, tuple(values)

    def __call__(self, x_rows: Any, substitute: Tensor, samples: Tensor) -> Any:
        return self.module(x_rows, substitute, *(value[samples] for value in self.values))


def explain_outputs(graph: fx.Graph) -> GraphOutputs:
    """What the explain graph's output node returns, as graph nodes."""
    return GraphOutputs(*_output(graph).args[0])


def tail_module(explain: fx.GraphModule, index: int, x: Tensor) -> Tail:
    """The model from capture ``index`` of ``explain`` (an explain graph) on, for the batch ``x``: a :class:`Tail`."""
    graph, _ = _copy_graph(explain.graph)
    outputs = explain_outputs(graph)
    captured = outputs.captures[index]
    output = _output(graph)
    output.args = (outputs.model,)
    module = fx.GraphModule(explain, graph, class_name="Tail")
    prune(module)  # the plain fork and the other captures go
    readers = descendants([captured]) | {output}
    boundary = _boundary(graph, captured, readers)
    values = _values(explain, [node.name for node in boundary], x)
    given = [(node, value) for node, value in zip(boundary, values) if _batch_major(value, x.shape[0])]
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    anchor = placeholders[-1]
    for i, (node, _) in enumerate([(captured, None)] + given):
        with graph.inserting_after(anchor):
            anchor = graph.placeholder("gs_substitute" if i == 0 else f"gs_before_{i - 1}")
        node.replace_all_uses_with(anchor, delete_user_cb=lambda user: user in readers)
    prune(module)
    return Tail(module, any(node.users for node in placeholders), [value for _, value in given])


def _boundary(graph: fx.Graph, captured: fx.Node, readers: Set[fx.Node]) -> List[fx.Node]:
    """The nodes computed from the input, not after the capture, that the tail reads."""
    from_input = descendants([n for n in graph.nodes if n.op == "placeholder"])
    return [node for node in graph.nodes if node in from_input and node is not captured and node not in readers
            and any(user in readers for user in node.users)]


def _values(explain: fx.GraphModule, names: List[str], x: Tensor) -> Tuple[Any, ...]:
    """The values of the nodes ``names`` for the input ``x``, as the tail reads them (before any later in-place
    op on them), from one forward of a copy of the explain graph that stops there."""
    if not names:
        return ()
    graph, _ = _copy_graph(explain.graph)
    module = fx.GraphModule(explain, graph, class_name="Head")
    by_name: Dict[str, fx.Node] = {node.name: node for node in graph.nodes}
    nodes = [by_name[name] for name in names]
    protect(module, nodes)
    _output(graph).args = (tuple(nodes),)
    prune(module)
    with torch.no_grad():
        return tuple(module(x))


def _batch_major(value: Any, batch: int) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch


def prune(gm: fx.GraphModule) -> None:
    """Erase every node the output does not need, and recompile. A node that writes in place into a tensor
    that is needed stays (with what it reads): dead-code elimination by use alone would drop it."""
    graph = gm.graph
    live: Set[fx.Node] = set()
    pending: List[fx.Node] = [_output(graph)]
    while pending:
        while pending:
            node = pending.pop()
            if node not in live:
                live.add(node)
                pending.extend(node.all_input_nodes)
        pending = [node for node in graph.nodes if node not in live and mutated_input(gm, node) in live]
    for node in reversed(list(graph.nodes)):
        if node not in live and node.op != "placeholder":
            graph.erase_node(node)
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


def _output(graph: fx.Graph) -> fx.Node:
    return next(node for node in reversed(graph.nodes) if node.op == "output")
