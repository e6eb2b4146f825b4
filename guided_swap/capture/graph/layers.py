"""Which graph node a layer name stands for, ``layer="auto"``, and suggestions for unknown names.

A name is resolved in this order:

1. a module's qualified name (``"layer4"``, ``"features.28"``): the value the module *returned* (DenseNet's
   ``"features"`` is norm5's output, before the functional ReLU that follows it);
2. a graph node name in torchvision's naming (``"layer4.1.relu_1"``, ``"relu"``): that node;
3. ``"auto"``: the feature map Grad-CAM needs (:func:`auto_layer`): the last map larger than 1x1 before the
   global pooling that leads to the output (ResNet ``layer4``, VGG ``features.29``, DenseNet ``relu``), or
   for a model without one (segmentation), the last backbone map that feeds the prediction head.
"""
import difflib
import math
import operator
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import fx, nn

from ...core.errors import LayerError
from ...core.inputs import Inputs, cloned_args, first_tensor
from ..base import LayerChoice, LayerPart
from .axes import upstream
from .layouts import transformer_layer
from .trace import Traced, trace

_CONV_MODULES = (nn.modules.conv._ConvNd,)
_CONV_FUNCTIONS = (torch.conv1d, torch.conv2d, torch.conv3d, torch.nn.functional.conv1d,
                   torch.nn.functional.conv2d, torch.nn.functional.conv3d)
_POOL_MODULES = (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
                 nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._LPPoolNd)
HINT = "see guided_swap.layer_names(model) for every name"


def resolve(name: str, traced: Traced, model: nn.Module) -> fx.Node:
    """The node that ``name`` captures: a module's output, a graph node, ``NAME:input`` (the first tensor the
    module is called with) or ``NAME[i]`` (entry ``i`` of the tuple it returns)."""
    base, part = LayerPart.parse(name)
    if part == "input":
        return _one_call(name, traced.module_inputs.get(base, []), base, traced, model)
    if isinstance(part, int):
        return _entry(name, base, part, traced, model)
    calls = traced.module_outputs.get(name, [])
    if len(calls) == 1:
        return calls[0]
    if name in traced.node_names:
        return traced.node_names[name]
    if len(calls) > 1:
        names = [c.meta["qualname"] for c in calls]
        raise LayerError(f"module {name!r} is called {len(calls)} times; name one call: {names}")
    entries = traced.module_entries.get(name)
    if entries:
        listed = ", ".join(f"{name}[{i}]" for i, node in enumerate(entries[0]) if node is not None)
        raise LayerError(f"module {name!r} returns a tuple of {len(entries[0])}; capture its entries by name, one "
                         f"map each: layer=[{listed}]")
    modules = dict(model.named_modules())
    if name in modules:
        raise LayerError(f"module {name!r} is never called as a module in the traced graph (it is unused, or "
                         f"inside a leaf module); capture a graph node instead; {HINT}")
    raise LayerError(f"layer {name!r} is not in {type(model).__name__}; closest names: "
                     f"{suggestions(name, traced, model)}; {HINT}")


def first_call_reason(name: str, traced: Traced) -> Optional[str]:
    """What the report says when ``name`` is a module called several times whose first call's node shares its
    name (a leaf module reused, such as torchvision's ``layer4.1.relu``): the capture is that first call, as
    pytorch-grad-cam's hooks read it, where Captum's ``LayerGradCam`` on the module reads its last."""
    calls = traced.module_outputs.get(name, [])
    if len(calls) < 2 or traced.node_names.get(name) is not calls[0]:
        return None
    last = next((node_name for node_name, node in traced.node_names.items() if node is calls[-1]),
                f"{name}_{len(calls) - 1}")
    return (f"the first of {len(calls)} calls of module {name!r}, as pytorch-grad-cam's hooks read it; Captum's "
            f"LayerGradCam on the module reads the last: {last}")


def _one_call(name: str, calls: List[fx.Node], base: str, traced: Traced, model: nn.Module) -> fx.Node:
    if len(calls) == 1:
        return calls[0]
    if len(calls) > 1:
        raise LayerError(f"module {base!r} is called {len(calls)} times, so {name!r} is ambiguous; capture the node "
                         f"that feeds the call you mean; {HINT}")
    raise LayerError(f"{name!r}: {base!r} is not a module called in the traced graph; closest names: "
                     f"{suggestions(base, traced, model)}; {HINT}")


def _entry(name: str, base: str, index: int, traced: Traced, model: nn.Module) -> fx.Node:
    """Entry ``index`` of what module (or node) ``base`` returns: the tuple's own node, or a getitem added
    after a node whose value is a tuple (a leaf module's call)."""
    entries = traced.module_entries.get(base, [])
    if len(entries) > 1:
        raise LayerError(f"module {base!r} is called {len(entries)} times, so {name!r} is ambiguous; {HINT}")
    if entries:
        nodes = entries[0]
        if index >= len(nodes) or nodes[index] is None:
            raise LayerError(f"{name!r}: {base!r} returns {len(nodes)} entries, and entry {index} is not a tensor "
                             "computed by the model")
        return nodes[index]
    try:
        source = resolve(base, traced, model)
    except LayerError:
        if base not in dict(model.named_modules()):
            raise
        raise LayerError(f"{name!r}: the entries of what {base!r} returns are not known in this graph (an aten graph "
                         "from torch.export keeps no tuples); capture the node that computes the entry, or convert "
                         f"with capture='fx' or 'runtime'; {HINT}") from None
    graph = source.graph
    with graph.inserting_after(source):
        node = graph.call_function(operator.getitem, (source, index))
    node.meta["qualname"] = name
    traced.node_names[name] = node
    return node


def suggestions(name: str, traced: Traced, model: nn.Module, n: int = 5) -> List[str]:
    candidates = list(dict.fromkeys(list(traced.module_outputs) + list(traced.node_names)))
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    return close or [c for c in candidates if c.split(".")[0] == name.split(".")[0]][:n] or candidates[-n:]


def auto_layer(gm: fx.GraphModule, example: torch.Tensor, output: Any = None,
               module_outputs: Optional[Dict[str, List[fx.Node]]] = None) -> LayerChoice:
    """``layer="auto"`` on a graph: the node Grad-CAM needs, and a reason a report can show. A transformer's
    is read from its axes (:func:`guided_swap.capture.graph.layouts.transformer_layer`); a CNN's is
    :func:`cnn_layer`'s.
    """
    if not isinstance(example, (torch.Tensor, Inputs)):
        raise TypeError(f"layer='auto' needs an example input tensor, got {type(example).__name__}")
    return transformer_layer(gm, example) or cnn_layer(gm, example, output, module_outputs)


def cnn_layer(gm: fx.GraphModule, example: torch.Tensor, output: Any = None,
              module_outputs: Optional[Dict[str, List[fx.Node]]] = None) -> LayerChoice:
    """The feature map Grad-CAM needs in a CNN, and a reason a report can show.

    With a global pooling (or a flatten) whose result reaches the output without passing through a spatial
    map again, it is the last map larger than 1x1 that every path into that pooling crosses (ResNet's
    ``layer4``, VGG's ``features.29``). An SE, eSE or ECA gate pools too, but its result multiplies back into
    a spatial map, so it never counts, and neither does a 1x1 conv head that runs after the pooling.
    Without such a pooling (segmentation), it is the last backbone map that feeds the prediction head: the
    outermost module around the last convolution that does not hold the whole network (``classifier``).
    When branches meet only in the pooling, no map carries everything; the reason then says so.

    ``example`` runs once through an fx.Interpreter, in eval mode on copies of the buffers, so BatchNorm
    running statistics never change. ``output`` restricts the search to one entry of a structured output;
    ``module_outputs`` (from :class:`guided_swap.capture.graph.trace.Traced`) lets the reason name the module.

    >>> import torch, torchvision
    >>> from guided_swap.capture.graph.trace import trace
    >>> traced = trace(torchvision.models.resnet18())
    >>> node, reason = cnn_layer(traced.module, torch.zeros(1, 3, 64, 64), module_outputs=traced.module_outputs)
    >>> node.meta["qualname"], reason
    ('layer4.1.relu_1', 'layer4: the last spatial map (2x2) before the global pooling at avgpool (nn.AdaptiveAvgPool2d)')
    """
    first = first_tensor(example)
    graph = _Graph(gm, _shapes(gm, example), first.dim(), output)
    head = graph.global_pooling()
    if head is not None:
        node, every_path = graph.dominating_map(head)
        if node is None:
            raise LayerError(f"layer='auto' found no feature map larger than 1x1 before {_describe(gm, head)} "
                             f"for an input of shape {tuple(first.shape)}; pass a larger input or layer=NAME; {HINT}")
        why = f"the last spatial map ({graph.size(node)}) before {_pooling_kind(graph, head)} at {_describe(gm, head)}"
        if not every_path:
            why += "; other branches reach it too, so this map shows only part of the evidence"
    else:
        node, scope = graph.map_feeding_head()
        why = (f"the last backbone map ({graph.size(node)}) feeding the prediction head {scope!r}; "
               "the model has no global pooling")
    return LayerChoice(node, f"{display_name(node, module_outputs)}: {why}")


def display_name(node: fx.Node, module_outputs: Optional[Dict[str, List[fx.Node]]] = None) -> str:
    """The outermost module whose only call returns ``node`` (``layer4``), else the node's qualified name."""
    names = [name for name, calls in (module_outputs or {}).items() if name and calls == [node]]
    return min(names, key=lambda n: (n.count("."), len(n))) if names else node.meta.get("qualname", node.name)


class _Graph:
    """A traced graph with the probed shapes: which nodes are feature maps, where the spatial maps end."""

    def __init__(self, gm: fx.GraphModule, shapes: Dict[fx.Node, Tuple[int, ...]], rank: int, output: Any):
        self.gm, self.shapes, self.rank = gm, shapes, rank
        self.nodes = list(gm.graph.nodes)
        self.order = {node: i for i, node in enumerate(self.nodes)}
        self.sources = [n for n in self.nodes if n.op == "placeholder"]
        self.convs = [n for n in self.nodes if _is_conv(gm, n)]
        self.derived = _downstream(self.convs, self.nodes)
        self.targets = _output_nodes(self.nodes[-1], output)

    def spatial(self, node: fx.Node) -> bool:
        """A map computed by a convolution, with two or more non-batch dimensions above 1.

        (B, C, 1, 1), a channels-last (B, 1, 1, C) and ECA's (B, 1, C) are vectors, not maps.
        """
        shape = self.shapes.get(node)
        return shape is not None and sum(s > 1 for s in shape[1:]) >= 2 and node in self.derived

    def is_map(self, node: fx.Node) -> bool:
        """A candidate for capture: a spatial map of the input's rank (a reshape to (B, C, h*w) is not one)."""
        shape = self.shapes.get(node)
        return (node.op != "placeholder" and self.spatial(node) and len(shape) == self.rank
                and math.prod(shape[2:]) > 1)

    def size(self, node: fx.Node) -> str:
        return "x".join(str(s) for s in self.shapes[node][2:])

    def global_pooling(self) -> Optional[fx.Node]:
        """The last node that ends the spatial maps and whose result reaches the output only through non-maps."""
        ends = [n for n in self.nodes if n in self.shapes and not self.spatial(n)
                and any(self.spatial(a) for a in n.all_input_nodes)]
        reaching = [n for n in ends if self._reaches_output_flat(n)]
        return reaching[-1] if reaching else None

    def _reaches_output_flat(self, start: fx.Node) -> bool:
        seen, stack = {start}, [start]
        while stack:
            node = stack.pop()
            if node in self.targets:
                return True
            for user in node.users:
                if user not in seen and not self.spatial(user):
                    seen.add(user)
                    stack.append(user)
        return False

    def dominating_map(self, end: fx.Node) -> Tuple[Optional[fx.Node], bool]:
        """The last map before ``end`` that every path from the input to ``end`` crosses (pooling steps skipped),
        and True; else, when branches reach ``end`` side by side (CrossViT's two patch sizes), the last map on
        a convolution's grid before it, and False; (None, False) when there is no map at all."""
        before = [n for n in sorted(upstream([end]) - {end}, key=self.order.__getitem__, reverse=True)
                  if self.is_map(n) and not _is_pool(self.gm, n)]
        for node in before:
            if self._dominates(node, end):
                return node, True
        # No single map carries everything: fall back to maps on a convolution's grid (never an attention
        # tensor of a transformer branch, which has the input's rank too).
        grids = {self.shapes[c][2:] for c in self.convs if c in self.shapes}
        on_grid = [n for n in before if self.shapes[n][2:] in grids]
        return (on_grid[0], False) if on_grid else (None, False)

    def _dominates(self, node: fx.Node, end: fx.Node) -> bool:
        """Whether every tensor path from the input to ``end`` crosses ``node`` (shapes read off do not count)."""
        seen = set(self.sources) | {node}
        stack = list(self.sources)
        while stack:
            for user in stack.pop().users:
                if user is end:
                    return False
                if user not in seen and user in self.shapes:
                    seen.add(user)
                    stack.append(user)
        return True

    def map_feeding_head(self) -> Tuple[fx.Node, str]:
        """For a model without global pooling: the last map outside the head module that the head reads."""
        feeding = upstream(self.targets)
        convs = [n for n in self.convs if n in feeding]
        if not convs or not any(self.is_map(n) for n in feeding):
            raise LayerError("layer='auto' found no spatial feature map (a convolution's output larger than 1x1) in "
                             f"the model; pass layer=NAME for a CNN, or use layer=None for gradients only; {HINT}")
        last = convs[-1]
        scope = next((path for path in _scopes(last) if not all(path in _scopes(c) for c in convs)), None)
        inside = (lambda n: scope in _scopes(n)) if scope else (lambda n: n is last)
        maps_read = [n for n in feeding if self.is_map(n) and not inside(n) and any(inside(u) for u in n.users)]
        if not maps_read:
            raise LayerError(f"layer='auto' found no feature map feeding the prediction head {scope or last.name!r}; "
                             f"pass layer=NAME; {HINT}")
        return max(maps_read, key=self.order.__getitem__), scope or last.meta.get("qualname", last.name)


def _scopes(node: fx.Node) -> List[str]:
    """The module paths around ``node``, outermost first (a call_module node's own module included)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [value[0] if isinstance(value, tuple) else str(value) for value in stack.values()]
    return [p for p in paths if p]


def _output_nodes(output: fx.Node, key: Any) -> set:
    """The nodes the output (or its entry ``key``) is made of."""
    value = output.args[0]
    if key is not None:
        if isinstance(value, fx.Node) and isinstance(value.target, type) and hasattr(value.target, "_fields"):
            fields = value.target._fields
            value = value.args[fields.index(key) if key in fields else key]
        elif isinstance(value, (dict, list, tuple)):
            value = value[key]
    nodes: List[fx.Node] = []
    fx.node.map_arg(value, nodes.append)
    return set(nodes)


def _downstream(starts: List[fx.Node], ordered: List[fx.Node]) -> set:
    derived = set(starts)
    for node in ordered:
        if node not in derived and any(a in derived for a in node.all_input_nodes):
            derived.add(node)
    return derived


def _pooling_kind(graph: _Graph, node: fx.Node) -> str:
    inputs = [a for a in node.all_input_nodes if graph.spatial(a)]
    shape, before = graph.shapes[node], graph.shapes[inputs[0]]
    if len(shape) == 2 and shape[1] == math.prod(before[1:]):
        return "the flatten"
    if shape[:2] == before[:2]:
        return "the global pooling"
    return "the spatial reduction"


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    name = node.meta.get("qualname", node.name)
    if node.op == "call_module":
        return f"{name} (nn.{type(gm.get_submodule(node.target)).__name__})"
    op = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return name if name.split(".")[-1].startswith(op) else f"{name} ({op})"


def _is_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A pooling step: never the captured map (VGG's max pool and 7x7 adaptive pool come after features.29)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _POOL_MODULES)
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return node.op in ("call_function", "call_method") and "pool" in str(name)


def _is_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A convolution: a conv module (or any module with a weight of rank 3 or more), or a conv function."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, _CONV_MODULES) or any(p.dim() >= 3 for p in module.parameters(recurse=False))
    return node.op == "call_function" and (node.target in _CONV_FUNCTIONS
                                           or getattr(node.target, "__name__", "").startswith("conv"))


def _shapes(gm: fx.GraphModule, example: Any) -> Dict[fx.Node, Tuple[int, ...]]:
    """The shape of every tensor node for one forward of ``example``, leaving every buffer as it was.

    The probe runs in eval mode on copies of the buffers: a model in training mode would otherwise update
    its BatchNorm running statistics (a traced-through functional batch_norm bakes ``training`` in).
    """
    shapes: Dict[fx.Node, Tuple[int, ...]] = {}

    class ShapeRecorder(fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if isinstance(value, torch.Tensor):
                shapes[node] = tuple(value.shape)
            return value

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.gm = gm

        def forward(self, *args):
            return ShapeRecorder(self.gm).run(*args)

    copies = {f"gm.{name}": buffer.clone() for name, buffer in gm.named_buffers()}
    modes = [(module, module.training) for module in gm.modules()]
    for module, _ in modes:  # not gm.eval(): an exported program's module refuses it
        module.training = False
    try:
        with torch.no_grad():
            torch.func.functional_call(Probe(), copies, cloned_args(example))
    except Exception as error:
        raise LayerError(f"layer='auto' could not run the model on an example input of shape "
                         f"{tuple(first_tensor(example).shape)}: {type(error).__name__}: {error}; pass example_input= "
                         "shaped like the model's real input, or layer=NAME") from error
    finally:
        for module, training in modes:
            module.training = training
    return shapes


def input_spec(model: nn.Module) -> Optional[Tuple[int, int]]:
    """(rank, channels) of the input, read from how the graph uses it; None when that is not plain to see.

    The input must go straight into convolutions (through nothing but elementwise arithmetic with numbers
    or buffers), all taking the same channel count. A model that reshapes its input first (TResNet's
    space-to-depth stem) gets None: no check, rather than refusing a model that runs. A plain module is
    traced first; pass the traced GraphModule to skip that.

    >>> import torchvision
    >>> input_spec(torchvision.models.resnet18())
    (4, 3)
    """
    gm = model if isinstance(model, fx.GraphModule) else _try_trace(model)
    if gm is None:
        return None
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return None
    specs = _conv_specs(gm, inputs[0])
    return specs.pop() if specs is not None and len(specs) == 1 else None


def _conv_specs(gm: fx.GraphModule, node: fx.Node) -> Optional[set]:
    """The (rank, channels) of every convolution ``node`` flows into directly; None if it flows elsewhere."""
    specs = set()
    for user in node.users:
        spec = _conv_spec(gm, user, node)
        if spec is not None:
            specs.add(spec)
        elif _is_elementwise_with_constants(gm, user, node):
            more = _conv_specs(gm, user)
            if more is None:
                return None
            specs |= more
        else:
            return None
    return specs


def _conv_spec(gm: fx.GraphModule, user: fx.Node, node: fx.Node) -> Optional[Tuple[int, int]]:
    """(rank, in channels) when ``user`` convolves ``node``: a conv module, or a conv function with a stored weight."""
    if not user.args or user.args[0] is not node:
        return None
    if user.op == "call_module" and isinstance(gm.get_submodule(user.target), _CONV_MODULES):
        module = gm.get_submodule(user.target)
        return (module.weight.dim(), module.in_channels) if not module.transposed else None
    if user.op == "call_function" and user.target in _CONV_FUNCTIONS and len(user.args) > 1:
        weight, groups = user.args[1], user.kwargs.get("groups", user.args[6] if len(user.args) > 6 else 1)
        if isinstance(weight, fx.Node) and weight.op == "get_attr" and isinstance(groups, int):
            tensor = gm.get_parameter(weight.target) if weight.target in dict(gm.named_parameters()) else None
            return None if tensor is None else (tensor.dim(), tensor.shape[1] * groups)
    return None


_ELEMENTWISE = {"add", "sub", "mul", "truediv", "div", "neg"}


def _is_elementwise_with_constants(gm: fx.GraphModule, user: fx.Node, node: fx.Node) -> bool:
    """``x - mean``, ``x / 255``: arithmetic whose other operands are numbers or 1-element/broadcast buffers."""
    name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
    if user.op not in ("call_function", "call_method") or name not in _ELEMENTWISE:
        return False
    others = [a for a in user.args if a is not node]
    return all(isinstance(a, (int, float)) or (isinstance(a, fx.Node) and a.op == "get_attr") for a in others)


def _try_trace(model: nn.Module) -> Optional[fx.GraphModule]:
    try:
        return trace(model).module
    except Exception:  # an untraceable model gets no input check
        return None


def example_input(model: nn.Module, spatial: int = 224) -> torch.Tensor:
    """A zero input shaped as the model's graph expects: (1, C, 224, 224) for a 2-d CNN."""
    spec = input_spec(model)
    if spec is None:
        raise LayerError("layer='auto' cannot tell the model's input shape from its graph; pass example_input=")
    rank, channels = spec
    parameter = next(model.parameters())
    return torch.zeros((1, channels) + (spatial,) * (rank - 2), dtype=parameter.dtype, device=parameter.device)


def layer_names(traced: Traced) -> Dict[str, List[str]]:
    """Names a user can pass as ``layer``: traced-through module outputs and graph nodes, in graph order."""
    return {"modules": [name for name in traced.module_outputs if name],
            "nodes": [name for name in traced.node_names]}
