"""``convert`` a model once into an :class:`Explainer`; ``explain`` gives every map in one pass.

>>> import torch, torchvision, guided_swap as gs
>>> _ = torch.manual_seed(0)
>>> ex = gs.convert(torchvision.models.resnet18().eval(), layer="layer4")
>>> e = ex.explain(torch.randn(2, 3, 64, 64), target=[1, 2])
>>> e.gradient.shape, e.cam_raw.shape, e.cam.shape, e.guided_gradcam.shape, len(ex.swapped)
(torch.Size([2, 3, 64, 64]), torch.Size([2, 2, 2]), torch.Size([2, 64, 64]), torch.Size([2, 3, 64, 64]), 17)
"""
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, fx, nn

from . import cam as cam_maths
from . import capture, ops, rewrite
from .errors import GuidedSwapError, InputError, LayerError
from .targets import Channel, callable_score, channel_score, class_score
from .trace import trace

OutputKey = Union[None, int, str]


@dataclass(frozen=True)
class ConversionReport:
    """What the conversion did: the swapped ReLU call sites, what was left alone and why."""

    rule: str
    swapped: Tuple[rewrite.Swap, ...]
    left_alone: Tuple[Tuple[str, str], ...]
    hidden_in_leaves: Tuple[str, ...]
    layers: Dict[str, str]
    made_out_of_place: Tuple[str, ...]
    forked: bool

    def __str__(self) -> str:
        lines = [f"rule: {self.rule}", f"swapped {len(self.swapped)} ReLU call site(s):"]
        lines += [f"  {s.name}  ({s.spelling}{', in place' if s.inplace else ''})" for s in self.swapped]
        if self.left_alone:
            lines.append(f"left alone, ordinary gradient ({len(self.left_alone)}): only ReLU has a guided rule")
            lines += [f"  {name}  ({kind})" for name, kind in self.left_alone]
        if self.hidden_in_leaves:
            lines.append("NOT swapped, ReLUs hidden inside leaf modules: " + ", ".join(self.hidden_in_leaves))
        for name, node in self.layers.items():
            lines.append(f"layer {name!r} captures node {node!r}")
        if self.made_out_of_place:
            lines.append("made out of place to keep captures intact: " + ", ".join(self.made_out_of_place))
        if self.forked:
            lines.append("ReLUs follow a captured layer: Grad-CAM takes its gradient from a plain copy of that tail")
        return "\n".join(lines)


@dataclass
class LayerMaps:
    """The activation ``A`` and ordinary gradient ``G`` captured at one layer, and the maps made from them."""

    activation: Tensor
    grad: Tensor
    input_size: Tuple[int, ...]
    interpolate: str = "bilinear"

    @cached_property
    def cam_raw(self) -> Tensor:
        return cam_maths.gradcam(self.activation, self.grad)

    @cached_property
    def cam(self) -> Tensor:
        return cam_maths.upsample(self.cam_raw, self.input_size, self.interpolate)

    @cached_property
    def pixelwise_cam_raw(self) -> Tensor:
        return cam_maths.pixelwise_cam(self.activation, self.grad)

    @cached_property
    def guided_pixelwise_cam_raw(self) -> Tensor:
        return cam_maths.guided_pixelwise_cam(self.activation, self.grad)

    @property
    def pixelwise_cam(self) -> Tensor:
        return cam_maths.upsample(self.pixelwise_cam_raw, self.input_size, self.interpolate)

    @property
    def guided_pixelwise_cam(self) -> Tensor:
        return cam_maths.upsample(self.guided_pixelwise_cam_raw, self.input_size, self.interpolate)


@dataclass
class Explanation:
    """Everything one ``explain`` call computed. Maps from CAMs are made on first access.

    ``gradient`` is the input gradient under the explainer's rule (guided backprop for ``"guided"``);
    ``cam_raw``, ``cam`` and ``guided_gradcam`` come from the first layer, ``layers[name]`` from any.
    """

    logits: Tensor
    target: Optional[Tensor]
    score: Tensor
    gradient: Tensor
    layers: Dict[str, LayerMaps]
    outputs: Any = field(repr=False, default=None)
    rule: str = "guided"

    def _first(self) -> LayerMaps:
        if not self.layers:
            raise LayerError("this explainer captures no layer: convert with layer=NAME (or 'auto') for CAMs")
        return next(iter(self.layers.values()))

    @property
    def cam_raw(self) -> Tensor:
        """Grad-CAM at the layer's resolution, (B, h, w)."""
        return self._first().cam_raw

    @property
    def cam(self) -> Tensor:
        """Grad-CAM resized to the input, (B, H, W)."""
        return self._first().cam

    @property
    def guided_gradcam(self) -> Tensor:
        """``cam * gradient`` per channel, (B, C, H, W)."""
        return cam_maths.guided_gradcam(self.cam, self.gradient)

    @property
    def pixelwise_cam(self) -> Tensor:
        return self._first().pixelwise_cam

    @property
    def guided_pixelwise_cam(self) -> Tensor:
        return self._first().guided_pixelwise_cam


class Explainer(nn.Module):
    """A converted model: forward is the model's, :meth:`explain` gives maps. Build it with :func:`convert`.

    It shares parameter and buffer storage with the model it came from (in-place weight updates are seen)
    but none of its module objects: ``.to()``, ``.eval()`` and ``.train()`` on it leave the model as it is.
    """

    def __init__(self, graph_module: fx.GraphModule, *, rule: str, layers: Sequence[str], report: ConversionReport,
                 output: OutputKey, forked: bool, input_spec: Optional[Tuple[int, int]]):
        super().__init__()
        self.graph_module = graph_module
        self.rule = rule
        self.layers = tuple(layers)
        self.report = report
        self.output = output
        self.forked = forked
        self.input_spec = input_spec

    @property
    def swapped(self) -> Tuple[str, ...]:
        """The qualified node name of every ReLU call site that was replaced."""
        return tuple(s.name for s in self.report.swapped)

    def forward(self, x: Tensor) -> Any:
        """The model's own output, bit for bit."""
        return self.graph_module(x)[0]

    def explain(self, x: Tensor, target: Any = None, *, interpolate: str = "bilinear") -> Explanation:
        """One forward and one backward: the rule's input gradient and Grad-CAM at every captured layer.

        ``target``: None (argmax), an int, one int per sample (sequence or LongTensor), a callable
        ``outputs -> (B,) score``, or :class:`guided_swap.Channel`.
        """
        self._check_input(x)
        if interpolate not in cam_maths.INTERPOLATIONS:
            raise ValueError(f"interpolate={interpolate!r} is not one of {cam_maths.INTERPOLATIONS}")
        outputs, captures, score, classes, grads = self.forward_backward(
            x, lambda out, caps, fixed: self._score(target if fixed is None else fixed, out, caps, x.shape[0]))
        layers = {name: LayerMaps(_detached(a, name), g, tuple(x.shape[2:]), interpolate)
                  for name, a, g in zip(self.layers, captures, grads[1:])}
        return Explanation(self._select(outputs).detach(), classes, score.detach(), grads[0], layers,
                           _detach_all(outputs), self.rule)

    def forward_backward(self, x: Tensor, scorer: Callable, call: Optional[Callable] = None):
        """The one forward and one backward every map comes from (shared by :meth:`explain` and export).

        ``scorer(outputs, captures_by_layer, classes_or_None) -> (score (B,), classes)`` is called on the
        main graph, then with the classes it chose on the plain fork, if there is one.
        Returns ``(outputs, captures, score, classes, [d score/dx, G at each layer])``.
        """
        call = self.graph_module if call is None else call
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            outputs, captures, fork_outputs, fork_captures = call(leaf)
            score, classes = scorer(outputs, dict(zip(self.layers, captures)), None)
            scores, grad_at = [score.sum()], list(captures)
            if self.forked:
                plain, _ = scorer(fork_outputs, dict(zip(self.layers, fork_captures)), classes)
                scores.append(plain.sum())
                grad_at = list(fork_captures)
            grads = _grad(scores, [leaf] + grad_at)
        return outputs, captures, score, classes, grads

    def _score(self, target, outputs, captures: Dict[str, Tensor], batch: int):
        if isinstance(target, Channel):
            return channel_score(target, captures), None
        if callable(target) and not isinstance(target, Tensor):
            return callable_score(target, outputs, batch), None
        return class_score(self._select(outputs), target)

    def _select(self, outputs: Any) -> Tensor:
        return select_output(outputs, self.output)

    def _check_input(self, x: Any) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got dtype {x.dtype}; convert it with x.float()")
        if torch.is_inference_mode_enabled():
            raise GuidedSwapError("explain() needs autograd, which torch.inference_mode() turns off; call it outside")
        if self.input_spec is not None:
            rank, channels = self.input_spec
            if x.dim() != rank:
                raise InputError(f"input has {x.dim()} dimensions {tuple(x.shape)}; the model expects {rank} "
                                 f"(batch, {channels} channels, spatial...): add a batch dimension with x.unsqueeze(0)")
            if x.shape[1] != channels:
                raise InputError(f"input has {x.shape[1]} channels; the model's first convolution takes {channels}")
        parameter = next(self.graph_module.parameters(), None)
        if parameter is not None and (x.device != parameter.device or x.dtype != parameter.dtype):
            raise InputError(f"input is {x.dtype} on {x.device} but the explainer is {parameter.dtype} on "
                             f"{parameter.device}: move one, e.g. x.to(device, dtype) or explainer.to(...)")
        if not bool(torch.isfinite(x).all()):
            raise InputError("input holds NaN or Inf values; every map would be NaN. Clean the input first")

    def save(self, path: str) -> None:
        """Save this explainer (graph, weights, layers, rule, report) to one file; see :func:`guided_swap.load`."""
        from .io import save

        save(self, path)

    def _apply(self, fn, recurse=True):
        # Give the explainer new Parameter objects instead of setting .data on the shared ones, so that
        # explainer.to(...) never moves or casts the user's model.
        previous = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        try:
            return super()._apply(fn, recurse)
        finally:
            torch.__future__.set_overwrite_module_params_on_conversion(previous)

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}, layers={self.layers}, swapped={len(self.swapped)}, forked={self.forked}"


def _grad(scores, inputs):
    wanted = [t.requires_grad for t in inputs]
    grads = torch.autograd.grad(scores, [t for t, w in zip(inputs, wanted) if w], allow_unused=True)
    grads = iter(grads)
    result = []
    for tensor, w in zip(inputs, wanted):
        g = next(grads) if w else None
        result.append(torch.zeros_like(tensor) if g is None else g)
    return result


def _detached(value: Any, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise LayerError(f"layer {name!r} produced a {type(value).__name__}, not a tensor; capture a tensor-valued node")
    return value.detach()


def _detach_all(outputs: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda v: v.detach() if isinstance(v, Tensor) else v, outputs)


def select_output(outputs: Any, key: OutputKey) -> Tensor:
    """The entry of a model's outputs that is explained: the tensor itself, or ``outputs[key]``."""
    if key is None:
        if not isinstance(outputs, Tensor):
            raise TypeError(f"the model returns a {type(outputs).__name__}; convert with output=KEY to say which "
                            "entry is explained")
        return outputs
    if isinstance(key, str) and hasattr(outputs, "_fields"):
        return getattr(outputs, key)
    return outputs[key]


def _output_entries(output_arg: Any) -> Optional[list]:
    """The entries of the model's output as fx sees it statically, or None for a single tensor."""
    if isinstance(output_arg, fx.Node):
        target = output_arg.target
        if output_arg.op == "call_function" and isinstance(target, type) and hasattr(target, "_fields"):
            return list(target._fields) + list(range(len(target._fields)))  # a namedtuple built in forward
        return None
    if isinstance(output_arg, dict):
        return list(output_arg.keys())
    if hasattr(output_arg, "_fields"):
        return list(output_arg._fields) + list(range(len(output_arg)))
    return list(range(len(output_arg)))


def _check_output_key(output_arg: Any, key: OutputKey) -> None:
    entries = _output_entries(output_arg)
    if key is None and entries is not None:
        raise TypeError(f"the model returns several outputs {entries}; convert with output=ENTRY to say which one is "
                        "explained")
    if key is not None and (entries is None or key not in entries):
        raise ValueError(f"output={key!r} is not an entry of the model's output (entries: {entries}); "
                         "leave output=None for a model that returns one tensor")


def convert(model: nn.Module, layer: Union[None, str, Sequence[str]] = "auto", rule: str = "guided", *,
            output: OutputKey = None, example_input: Optional[Tensor] = None,
            tracer_kwargs: Optional[Dict[str, Any]] = None) -> Explainer:
    """Convert ``model`` once into an :class:`Explainer`. The model itself is never changed.

    ``layer``: a module name (``"layer4"``), a graph node name (``"layer4.1.relu_1"``), a list of names,
    ``"auto"`` (the last convolutional feature map; runs one forward of ``example_input``) or None.
    ``rule``: ``"guided"``, ``"deconvnet"`` or ``"gradient"`` (plain; nothing swapped).
    ``output``: which entry of a tuple/namedtuple/dict output is explained.
    ``tracer_kwargs``: torch.fx options when the model does not trace (leaf_modules, autowrap_functions, ...).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() takes a torch.nn.Module, got {type(model).__name__}")
    if rule not in ops.RULES:
        raise ValueError(f"rule={rule!r} is not one of {ops.RULES}")
    if model.training:
        warnings.warn("the model is in training mode: BatchNorm uses batch statistics and updates its running stats, "
                      "Dropout is random. Call model.eval() before convert() to explain the model as deployed",
                      stacklevel=2)
    names = capture.layer_list(layer)
    traced = trace(model, tracer_kwargs)
    gm = traced.module
    nodes = [_resolve(name, traced, model, example_input) for name in names]
    layer_nodes = {name: node.meta.get("qualname", node.name) for name, node in zip(names, nodes)}
    swaps, replaced = rewrite.swap_relus(gm, rule)
    nodes = [replaced.get(node, node) for node in nodes]
    left_alone, hidden = rewrite.unswapped_activations(gm, traced.leaf_modules)
    if hidden:
        warnings.warn(f"ReLUs inside leaf modules cannot be swapped and keep their ordinary gradient: {hidden}",
                      stacklevel=2)
    made_out_of_place = rewrite.protect(gm, nodes)
    output_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    output_arg = output_node.args[0]
    _check_output_key(output_arg, output)
    forked = rewrite.needs_fork(nodes, list(replaced.values()))
    fork_output, fork_nodes = rewrite.fork_plain(gm, nodes, output_arg) if forked else (None, ())
    output_node.args = ((output_arg, tuple(nodes), fork_output, tuple(fork_nodes)),)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    report = ConversionReport(rule, tuple(swaps), tuple(left_alone), tuple(hidden), layer_nodes,
                              tuple(made_out_of_place), forked)
    return Explainer(gm, rule=rule, layers=names, report=report, output=output, forked=forked,
                     input_spec=capture.input_spec(model))


def _resolve(name: str, traced, model: nn.Module, example_input: Optional[Tensor]) -> fx.Node:
    if name != "auto":
        return capture.resolve(name, traced, model)
    example = capture.example_input(model) if example_input is None else example_input
    return capture.auto_layer(traced.module, example, module_outputs=traced.module_outputs)[0]
