"""FullGrad's graph: the explain graph's own copy with ordinary rectifiers, returning the output of every
convolution and BatchNorm that adds a bias, so that one ``autograd.grad`` gives the ordinary gradient there.

The layers are found in the graph: on the fx path the ``Conv1d/2d/3d`` and BatchNorm modules called (as
pytorch-grad-cam finds modules), on the export path the ``aten.conv*d`` and ``aten.batch_norm`` ops (which
also finds a functional call, and a BatchNorm inside another module, such as timm's ``BatchNormAct2d``). In-place
ops that would overwrite one of those outputs (the ReLU after a BatchNorm, ResNet's ``out += identity``) are
made out of place, so the gradient is taken at the layer's own output.

>>> import torch, torchvision, guided_swap as gs
>>> ex = gs.convert(torchvision.models.resnet18().eval(), layer="layer4")
>>> cut = bias_module(ex.graph_module)
>>> result = bias_pass(cut, torch.randn(2, 3, 64, 64), gs.core.targets.as_score(None))
>>> len(result.biases), tuple(result.biases[0][1].shape), tuple(result.input_grad.shape)
(20, (2, 64, 32, 32), (2, 3, 64, 64))
"""
import functools
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor, fx

from ...core.pass_cams import BiasPass, batchnorm_bias, module_bias
from ...core.targets import Score
from .. import ops
from ..base import gradients
from .cut import _output, explain_outputs, prune
from .plan import _copy_graph
from .rewrite import protect, qualname

aten = torch.ops.aten
_CONV_OPS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)


class BiasModule(NamedTuple):
    """The graph returning ``(model output, (bias layer outputs...))``, and each layer's bias."""

    module: fx.GraphModule
    biases: Tuple[Tensor, ...]


def bias_module(explain: fx.GraphModule) -> BiasModule:
    """FullGrad's graph cut from ``explain`` (an explain graph): see the module docstring."""
    graph, _ = _copy_graph(explain.graph)
    module = fx.GraphModule(explain, graph, class_name="BiasGraph")
    found = [(node, bias) for node in graph.nodes for bias in [_bias(module, node)] if bias is not None]
    nodes = [node for node, _ in found]
    protect(module, nodes)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is ops.rectify:  # ordinary gradients everywhere
            node.target, node.args = ops.plain_rectify, node.args[:1]
    _output(graph).args = ((explain_outputs(graph).model, tuple(nodes)),)
    prune(module)
    return BiasModule(module, tuple(bias.detach() for _, bias in found))


def bias_pass(cut: BiasModule, x: Tensor, score: Score, classes: Optional[Tensor] = None) -> BiasPass:
    """One forward and backward of ``cut``: the ordinary input gradient and the gradient at each bias layer."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        outputs, values = cut.module(leaf)
        main, _ = score(outputs, {}, x.shape[0], classes)
        grads = gradients(main.sum(), [leaf] + list(values))
    return BiasPass(outputs, main.detach(), grads[0], tuple(zip(cut.biases, grads[1:])))


def _bias(gm: fx.GraphModule, node: fx.Node) -> Optional[Tensor]:
    """The bias that ``node`` adds per channel, or None when it is not a convolution or BatchNorm with one."""
    if node.op == "call_module":
        return module_bias(qualname(node), gm.get_submodule(node.target))
    if node.op != "call_function":
        return None
    if node.target in _CONV_OPS:
        return _value(gm, _argument(node, 2, "bias"))
    if node.target is aten.batch_norm.default:
        weight, bias, mean, var = (_value(gm, _argument(node, i, name))
                                   for i, name in ((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var")))
        if bias is None:
            return None
        if _argument(node, 5, "training"):
            mean = var = None  # batch statistics: no fixed bias
        return batchnorm_bias(qualname(node), weight, bias, mean, var, _argument(node, 7, "eps"))
    return None


def _argument(node: fx.Node, index: int, name: str):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


def _value(gm: fx.GraphModule, arg) -> Optional[Tensor]:
    """The tensor a ``get_attr`` argument reads (None for None or anything computed in the graph)."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return functools.reduce(getattr, arg.target.split("."), gm)
    return None
