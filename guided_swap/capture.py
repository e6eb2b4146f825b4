"""Which graph node a layer name stands for, ``layer="auto"``, and suggestions for unknown names.

A name is resolved in this order:

1. a module's qualified name (``"layer4"``, ``"features.28"``): the value the module *returned* (DenseNet's
   ``"features"`` is norm5's output, before the functional ReLU that follows it);
2. a graph node name in torchvision's naming (``"layer4.1.relu_1"``, ``"relu"``): that node;
3. ``"auto"``: the last convolutional feature map: the last node after the model's last convolution that
   still has that convolution's spatial size (ResNet ``layer4``, VGG ``features.29``, DenseNet ``relu``).
"""
import difflib
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import fx, nn

from .errors import LayerError
from .trace import Traced

_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FUNCTIONS = (torch.conv1d, torch.conv2d, torch.conv3d, torch.nn.functional.conv1d,
                   torch.nn.functional.conv2d, torch.nn.functional.conv3d)
_POOL_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d,
                 nn.AvgPool2d, nn.MaxPool2d, nn.Flatten)
_POOL_FUNCTIONS = ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool2d",
                   "avg_pool2d", "max_pool2d", "flatten", "mean", "sum", "amax", "reshape")
HINT = "see guided_swap.layer_names(model) for every name"


def layer_list(layer: Union[None, str, Sequence[str]]) -> List[str]:
    """Normalise the ``layer`` argument to a list of names."""
    if layer is None:
        return []
    if isinstance(layer, str):
        return [layer]
    if isinstance(layer, Sequence) and all(isinstance(name, str) for name in layer):
        if len(set(layer)) != len(layer):
            raise LayerError(f"layer names repeat: {list(layer)}")
        return list(layer)
    raise TypeError(f"layer must be a name, a list of names, 'auto' or None; got {layer!r}")


def resolve(name: str, traced: Traced, model: nn.Module) -> fx.Node:
    """The node that ``name`` captures."""
    calls = traced.module_outputs.get(name, [])
    if len(calls) == 1:
        return calls[0]
    if name in traced.node_names:
        return traced.node_names[name]
    if len(calls) > 1:
        names = [c.meta["qualname"] for c in calls]
        raise LayerError(f"module {name!r} is called {len(calls)} times; name one call: {names}")
    modules = dict(model.named_modules())
    if name in modules:
        raise LayerError(f"module {name!r} is never called as a module in the traced graph (it is unused, or "
                         f"inside a leaf module); capture a graph node instead; {HINT}")
    raise LayerError(f"layer {name!r} is not in {type(model).__name__}; closest names: "
                     f"{suggestions(name, traced, model)}; {HINT}")


def suggestions(name: str, traced: Traced, model: nn.Module, n: int = 5) -> List[str]:
    candidates = list(dict.fromkeys(list(traced.module_outputs) + list(traced.node_names)))
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    return close or [c for c in candidates if c.split(".")[0] == name.split(".")[0]][:n] or candidates[-n:]


def auto_layer(gm: fx.GraphModule, example: torch.Tensor) -> fx.Node:
    """The last node with the spatial size of the model's last convolution (one forward of ``example``)."""
    shapes = _shapes(gm, example)
    convs = [n for n in gm.graph.nodes if _is_conv(gm, n) and n in shapes]
    if not convs:
        raise LayerError("layer='auto' found no convolution in the model; pass layer=NAME; " + HINT)
    chosen = convs[-1]
    spatial = shapes[chosen][2:]
    node = chosen.next
    while node.op != "output" and not _is_pooling(gm, node):
        shape = shapes.get(node)
        if shape is not None and len(shape) >= 3 and shape[2:] == spatial:
            chosen = node
        node = node.next
    return chosen


def _is_pooling(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Pooling, flattening or a reduction: the feature map ends here even when its size does not change."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _POOL_MODULES)
    if node.op == "call_method":
        return node.target in ("flatten", "view", "reshape", "mean", "sum", "amax")
    return node.op == "call_function" and getattr(node.target, "__name__", "") in _POOL_FUNCTIONS


def _is_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _CONV_MODULES)
    return node.op == "call_function" and node.target in _CONV_FUNCTIONS


def _shapes(gm: fx.GraphModule, example: torch.Tensor) -> Dict[fx.Node, Tuple[int, ...]]:
    shapes: Dict[fx.Node, Tuple[int, ...]] = {}

    class ShapeRecorder(fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if isinstance(value, torch.Tensor):
                shapes[node] = tuple(value.shape)
            return value

    with torch.no_grad():
        ShapeRecorder(gm).run(example)
    return shapes


def input_spec(model: nn.Module) -> Optional[Tuple[int, int]]:
    """(rank, channels) of the input the model's first convolution expects, or None without convolutions."""
    for module in model.modules():
        if isinstance(module, _CONV_MODULES):
            return module.weight.dim(), module.in_channels
    return None


def example_input(model: nn.Module, spatial: int = 224) -> torch.Tensor:
    """A zero input for the model's first convolution: (1, C, 224, 224) for a 2-d CNN."""
    spec = input_spec(model)
    if spec is None:
        raise LayerError("layer='auto' needs an example input for a model without convolutions; pass example_input=")
    rank, channels = spec
    parameter = next(model.parameters())
    return torch.zeros((1, channels) + (spatial,) * (rank - 2), dtype=parameter.dtype, device=parameter.device)


def layer_names(traced: Traced) -> Dict[str, List[str]]:
    """Names a user can pass as ``layer``: traced-through module outputs and graph nodes, in graph order."""
    return {"modules": [name for name in traced.module_outputs if name],
            "nodes": [name for name in traced.node_names]}
