"""``convert``: a model, once, into an :class:`~guided_swap.Explainer`, by whichever capture path takes it.

>>> import torch, torchvision, guided_swap as gs
>>> ex = gs.convert(torchvision.models.resnet18().eval(), layer="layer4", example_input=torch.zeros(1, 3, 64, 64))
>>> print(ex.report.summary())
fx capture; rule guided: 17 rectifier call site(s) swapped; layer 'layer4' captures node 'layer4.1.relu_1'
"""
import warnings
from typing import Any, Dict, Optional, Sequence, Union

from torch import Tensor, nn

from ..capture.base import AUTO, Capture, layer_list
from ..capture.choose import PATHS, capture_model, capture_runtime
from ..capture.graph.layers import layer_names as graph_layer_names
from ..capture.graph.trace import trace
from ..core.inputs import Inputs, Signature
from ..core.layout import LayoutSpec
from ..core.layout import overrides as layout_overrides
from ..core.rules import Rule, get_rule
from ..core.targets import OutputKey
from .explainer import Explainer


def warn_if_training(model: nn.Module, stacklevel: int = 2) -> None:
    """Say that a model in training mode is explained as deployed (every capture path does so)."""
    if model.training:
        warnings.warn("the model is in training mode; the explainer explains it as deployed (eval mode: BatchNorm "
                      "running statistics, no dropout) and never updates its buffers. Call model.eval() before "
                      "convert() to silence this", stacklevel=stacklevel)


class Recipe:
    """How ``convert`` captured a model, to capture it again for a call of another
    :class:`~guided_swap.core.inputs.Signature` (``explain((x1, x2))`` after converting for ``x`` alone, a call
    with ``forward_args``): the explainer keeps one, and drops it when saved."""

    def __init__(self, model: nn.Module, names: Sequence[str], rule: Rule, output: OutputKey, path: str,
                 tracer_kwargs: Optional[Dict[str, Any]], layouts: Dict[str, Any]):
        self.model, self.names, self.rule, self.output, self.path = model, list(names), rule, output, path
        self.tracer_kwargs, self.layouts = tracer_kwargs, layouts

    def __call__(self, signature: Optional[Signature], example: Any) -> Capture:
        return capture_model(self.model, self.names, self.rule, self.output, path=self.path, example=example,
                             tracer_kwargs=self.tracer_kwargs, layouts=self.layouts, signature=signature)


def example_call(example: Any) -> Any:
    """``example_input`` as the captures take it: a tuple of tensors is a call with several inputs."""
    if isinstance(example, tuple):
        if not example or not all(isinstance(t, Tensor) for t in example):
            raise TypeError("example_input= takes a tensor, or a non-empty tuple of tensors for a model with several "
                            "inputs")
        return Inputs(example)
    return example


def convert(model: nn.Module, layer: Union[None, str, Sequence[str]] = AUTO, rule: Union[str, Rule] = "guided", *,
            output: OutputKey = None, example_input: Any = None,
            tracer_kwargs: Optional[Dict[str, Any]] = None, capture: str = "auto", layout: LayoutSpec = None,
            reshape: Optional[Any] = None) -> Explainer:
    """Convert ``model`` once into an :class:`~guided_swap.Explainer`. The model itself is never changed.

    ``layer``: a module name (``"layer4"``), a graph node name (``"layer4.1.relu_1"``), a list of names,
    ``"auto"`` (the last spatial feature map before the global pooling; resolved on ``example_input``, or on
    the first input given to ``explain`` when there is none) or None.
    ``rule``: a registered rule name (``guided_swap.core.rules()``: ``"guided"``, ``"deconvnet"``, ``"gradient"``,
    and any the user registered) or a :class:`~guided_swap.Rule` instance.
    ``example_input``: an input (a tuple of tensors for a model called with several inputs): resolves
    ``"auto"``, picks the export path now, and fixes what the explainer is traced for. Without it, the model's
    arguments without a default are its inputs; a call of another form (``explain((x1, x2))``, ``forward_args=``)
    is traced again once, on its first use (:mod:`guided_swap.core.inputs`).
    ``output``: which entry of a tuple/namedtuple/dict output is explained. None: the output itself, or, for an
    output that names its entries (Hugging Face's ``ModelOutput``, a dict, a namedtuple), its ``logits`` entry (or
    its only entry); the report says which (``explains output 'logits' (by default)``).
    ``tracer_kwargs``: torch.fx options when the model does not trace (leaf_modules, autowrap_functions, ...).
    ``capture``: ``"fx"`` (symbolic tracing), ``"export"`` (torch.export, for models fx cannot trace: shape
    checks, loops over sizes; it captures for inputs shaped like the example, any batch size), ``"runtime"``
    (rectifier calls swapped while the model runs: detectors, data-dependent post-processing), or ``"auto"``: fx,
    then export, then run time, each tried when the one before fails (a non-tensor input, such as a detector's
    list of images, goes to run time). Without ``example_input`` the fallback happens on the first input. The
    report's ``capture`` says which path was used and why.
    ``layout``/``reshape``: how a capture becomes the (B, C, *spatial) map of the CAMs, when the graph cannot
    tell (it reads token (B, N, C) and channels-last captures itself): ``"tokens"``, ``"nhwc"``, ``"nchw"``, a
    :class:`~guided_swap.Layout`, or a callable ``reshape(t) -> (B, C, *spatial)``; one for every layer or a
    dict by layer name (docs/transformers.md). The run-time capture, which has no graph to read, takes them too
    and otherwise reads a layout from the capture's shape only where it is unambiguous (docs/transformers.md).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() takes a torch.nn.Module, got {type(model).__name__}")
    if capture not in PATHS:
        raise ValueError(f"capture={capture!r} is not one of {PATHS}")
    rule = get_rule(rule)
    warn_if_training(model, stacklevel=3)
    names = layer_list(layer)
    given = layout_overrides(layout, reshape, names)
    recipe = Recipe(model, names, rule, output, capture, tracer_kwargs, given)
    return Explainer(recipe(None, example_call(example_input)), recipe)


def convert_runtime(model: nn.Module, layer: Union[None, str, Sequence[str]] = AUTO, rule: Union[str, Rule] = "guided",
                    *, output: OutputKey = None, example_input: Any = None, reason: Optional[str] = None,
                    layout: LayoutSpec = None, reshape: Optional[Any] = None) -> Explainer:
    """Convert ``model`` with the run-time capture path (``convert(..., capture="runtime")``). The model itself
    is never changed.

    ``layer``: a module name (``"backbone.body.16"``), one call of a module that runs several times
    (``"rpn.head.conv.0.2_1"``), a list of them, ``"auto"`` (resolved on ``example_input`` or the first
    input: the deepest map of a detector's backbone, else the last map of the last convolution's size) or
    None. ``rule`` and ``output`` as in :func:`guided_swap.convert`. ``example_input`` (what the model
    takes) resolves ``auto`` and lists the call sites now. ``reason`` (why the graph paths could not take the
    model) shows in the report: ``capture="runtime (<reason>)"``. ``layout``/``reshape`` as in
    :func:`guided_swap.convert`; without them a capture is read channels first, channels last or as tokens
    only where its shape and the model's modules say so unambiguously, else its CAMs raise ``LayerError``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_runtime() takes a torch.nn.Module, got {type(model).__name__}")
    rule = get_rule(rule)
    warn_if_training(model, stacklevel=3)
    names = layer_list(layer)
    layouts = layout_overrides(layout, reshape, names)
    return Explainer(capture_runtime(model, names, rule, output, example_call(example_input), reason, layouts))


def layer_names(model: nn.Module, tracer_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, list]:
    """The names ``convert(layer=...)`` accepts: ``{"modules": [...], "nodes": [...]}`` in graph order."""
    return graph_layer_names(trace(model, tracer_kwargs))
