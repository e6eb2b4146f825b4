"""The capture contract: what every capture path (fx, export, run time) gives the explainer.

A :class:`Capture` holds a model's rectifiers swapped for a rule and the layers it captures. The explainer
(:class:`guided_swap.Explainer`), SmoothGrad, ``compile`` and ``export`` use nothing else of it:

- ``layers``, ``rule``, ``output``, ``report`` (a :class:`~guided_swap.core.report.ConversionReport`), ``layouts``;
- :meth:`Capture.prepare` on the first input (a capture that resolves ``layer="auto"`` or picks its path then);
- :meth:`Capture.check`: the input's batch size and spatial size, or a clear error;
- :meth:`Capture.forward`: the model's own output; :meth:`Capture.run`: the one forward and backward every map
  comes from, a :class:`~guided_swap.core.maps.PassResult`, for a :class:`~guided_swap.core.targets.Score`;
- :attr:`Capture.graph_module`: the explain graph when there is one (``None``: nothing to compile or export);
- :meth:`Capture.stack` / :meth:`Capture.unstack`: the input as one ``(B, C, ...)`` tensor and back (SmoothGrad
  adds its noise to that tensor).

A capture is an ``nn.Module`` holding the modules it runs, so ``.to()``, ``state_dict()`` and saving go through
it. Adding a capture path means writing one subclass; nothing else changes.

>>> import torch, torchvision, guided_swap as gs
>>> ex = gs.convert(torchvision.models.resnet18().eval(), layer="layer4")
>>> capture = ex.capture
>>> x = torch.randn(2, 3, 64, 64)
>>> capture.check(x), capture.graph_module is not None
(InputShape(batch=2, spatial=(64, 64), sizes=()), True)
>>> result = capture.run(x, gs.core.targets.as_score(None))
>>> tuple(result.input_grad.shape), tuple(result.layer_grads[0].shape)
((2, 3, 64, 64), (2, 512, 2, 2))
"""
import abc
import contextlib
import re
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..core.cam import CamError
from ..core.errors import GuidedSwapError, InputError, LayerError
from ..core.inputs import Inputs, Signature
from ..core.layout import Layout
from ..core.maps import PassResult
from ..core.pass_cams import BiasPass
from ..core.report import ConversionReport
from ..core.rules import Rule
from ..core.targets import OutputKey, Score

AUTO = "auto"


class LayerChoice(NamedTuple):
    """What ``layer="auto"`` chose, on any path: a graph node or a module path, and why."""

    where: Any
    reason: str


class InputShape(NamedTuple):
    """The batch size and the spatial size of the (first) input; ``sizes`` holds every input's spatial size when
    there are several (:class:`~guided_swap.core.inputs.Inputs`)."""

    batch: int
    spatial: Tuple[int, ...]
    sizes: Tuple[Tuple[int, ...], ...] = ()


class Capture(nn.Module, abc.ABC):
    """One capture path's model with its rectifiers swapped and its layers captured (module docstring)."""

    def __init__(self, rule: Rule, layers: Sequence[str], output: OutputKey):
        super().__init__()
        self.rule, self.layers, self.output = rule, tuple(layers), output

    @property
    @abc.abstractmethod
    def report(self) -> ConversionReport:
        """What was swapped, left alone and captured."""

    @property
    def layouts(self) -> Dict[str, Layout]:
        """How each captured layer becomes (B, C, *spatial) (a layer missing here is channels first)."""
        return dict(self.report.layouts)

    @property
    def swapped(self) -> Tuple[str, ...]:
        return tuple(s.name for s in self.report.swapped)

    @property
    def graph_module(self) -> Optional[nn.Module]:
        """The explain graph (returns :class:`~guided_swap.capture.graph.plan.GraphOutputs`), or None for a path
        that has none to compile or export."""
        return None

    @property
    def forward_module(self) -> Optional[nn.Module]:
        """The module ``forward`` runs when it is a graph (what ``compile`` compiles for ``ex(x)``), or None."""
        return None

    @property
    def ready(self) -> bool:
        """Whether everything is resolved (False: :meth:`prepare` still needs an input)."""
        return True

    @property
    def layer_inputs(self) -> Dict[str, Tuple[int, ...]]:
        """For each captured layer, which explained inputs it is computed from (by position); a layer missing here
        may depend on any (a map is resized to the first input of its rank)."""
        return {}

    @property
    def signature(self) -> Optional[Signature]:
        """What this capture is called with (:class:`~guided_swap.core.inputs.Signature`: how many explained
        inputs, which forward arguments are tensors or fixed values); None takes any call the model takes (the
        run-time capture runs the model's own code)."""
        return None

    def prepare(self, x: Any) -> None:
        """Resolve what waits for an input (``layer="auto"``, the path itself) from ``x``; idempotent."""

    @abc.abstractmethod
    def check(self, x: Any, check_finite: Optional[bool] = None) -> InputShape:
        """The batch size and spatial size of ``x``, after refusing an input the model cannot take."""

    @abc.abstractmethod
    def forward(self, x: Any) -> Any:
        """The model's own output (the rule applies if you backpropagate through it)."""

    @abc.abstractmethod
    def run(self, x: Any, score: Score) -> PassResult:
        """One forward and one backward: the rule's input gradient and the ordinary gradient at each capture."""

    def stack(self, x: Any) -> Tensor:
        """The input as one (B, C, ...) tensor."""
        return x

    def unstack(self, x: Tensor, like: Any) -> Any:
        """A (B, C, ...) tensor as an input of the form of ``like`` (what the model was given)."""
        return x

    def before_save(self) -> None:
        """Refuse, before anything is written, what a saved file could not hold (default: nothing)."""

    # --- for CAMs that need passes of their own (guided_swap.run.extra_cams); a path may refuse them ----------

    def tail(self, layer: str, x: Any) -> Callable[[Any, Tensor, Tensor], Any]:
        """The model from captured ``layer`` on, for the batch ``x``: ``tail(x_rows, A_rows, samples)`` is the
        output when the layer's value is ``A_rows``, row ``i`` being sample ``samples[i]`` of ``x``
        (Ablation-CAM). Only a graph capture can cut its graph there."""
        raise CamError(f"Ablation-CAM runs the model from layer {layer!r} on with each channel ablated, which needs "
                       f"the model as a graph to start from that layer; this explainer's {self.report.capture!r} "
                       "capture runs the model's own code, which always starts at the input. Use Score-CAM, or "
                       "convert a model that torch.fx or torch.export can take")

    def bias_pass(self, x: Any, score: Score, classes: Optional[Tensor] = None) -> BiasPass:
        """One forward and backward with ordinary gradients, giving the input gradient and the gradient at the
        output of every convolution and BatchNorm that adds a bias, with that bias (FullGrad)."""
        raise CamError(f"FullGrad needs the gradient at every layer that adds a bias; the {self.report.capture!r} "
                       "capture cannot give them")

    def extra_repr(self) -> str:
        return f"rule={self.rule.name!r}, layers={self.layers}, swapped={len(self.swapped)}"


def layer_list(layer: Union[None, str, Sequence[str]]) -> List[str]:
    """``convert(layer=...)`` as a list of names."""
    if layer is None:
        return []
    if isinstance(layer, str):
        return [layer]
    if isinstance(layer, Sequence) and all(isinstance(name, str) for name in layer):
        if len(set(layer)) != len(layer):
            raise LayerError(f"layer names repeat: {list(layer)}")
        return list(layer)
    raise TypeError(f"layer must be a name, a list of names, 'auto' or None; got {layer!r}")


def called_several_times(name: str, count: int) -> str:
    """Why the run-time capture refuses the name of a module that ran ``count`` times in one forward, and the
    names that capture one call."""
    later = ", ".join(f"{name}_{i}" for i in range(1, count))
    return (f"module {name!r} ran {count} times in one forward; name one call: a later one ({later}), or the "
            f"first through the input of the module it feeds (NAME:input)")


class LayerPart(NamedTuple):
    """A layer name read as a module (or node) name and which of its tensors is captured: ``"layer4"`` its
    output, ``"layer4:input"`` its input (the first tensor it is called with; Captum's
    ``attribute_to_layer_input=True``), ``"block[1]"`` entry 1 of the tuple it returns."""

    base: str
    part: Union[None, str, int] = None

    @classmethod
    def parse(cls, name: str) -> "LayerPart":
        if name.endswith(":input"):
            return cls(name[:-len(":input")], "input")
        match = _ENTRY.fullmatch(name)
        return cls(match[1], int(match[2])) if match else cls(name)


_ENTRY = re.compile(r"(.+)\[([0-9]+)\]")


def reads_values(x: Tensor, check_finite: Optional[bool]) -> bool:
    """Whether ``explain`` reads values (the finiteness check, the zero-gradient warning): None means on the
    CPU only, since elsewhere reading one waits for the device."""
    return x.device.type == "cpu" if check_finite is None else bool(check_finite)


def check_autograd() -> None:
    if torch.is_inference_mode_enabled():
        raise GuidedSwapError("explain() needs autograd, which torch.inference_mode() turns off; call it outside")


def check_floating(x: Tensor, what: str = "input") -> None:
    """Refuse an input tensor that is not floating point (there is no gradient to take through integers)."""
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {x.dtype}; convert it with x.float()")


def check_tensor(x: Tensor, module: nn.Module, check_finite: Optional[bool], what: str = "input") -> None:
    """Refuse an input tensor that is not floating point, not where ``module``'s weights are, or not finite."""
    check_floating(x, what)
    parameter = next(module.parameters(), None)
    if parameter is not None and (x.device != parameter.device or x.dtype != parameter.dtype):
        raise InputError(f"{what} is {x.dtype} on {x.device} but the explainer is {parameter.dtype} on "
                         f"{parameter.device}: move one, e.g. x.to(device, dtype) or explainer.to(...)")
    if reads_values(x, check_finite) and not bool(torch.isfinite(x).all()):
        raise InputError(f"{what} holds NaN or Inf values; every map would be NaN. Clean the input first")


def check_inputs(x: Inputs, module: nn.Module, check_finite: Optional[bool]) -> InputShape:
    """Refuse a call whose explained inputs are not tensors of one batch size (each checked by
    :func:`check_tensor`); the shape of each."""
    if not x.tensors:
        raise InputError("explain needs at least one input tensor to explain; got an empty tuple")
    for index, tensor in enumerate(x.tensors):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"input {index} of the tuple is a {type(tensor).__name__}; every explained input must be a "
                            "tensor (pass values that are not explained with forward_args=)")
        if tensor.dim() < 1:
            raise InputError(f"input {index} is a scalar; every input needs a batch dimension first")
        check_tensor(tensor, module, check_finite, f"input {index}")
    batches = [t.shape[0] for t in x.tensors]
    if len(set(batches)) > 1:
        raise InputError(f"the inputs have different batch sizes {batches}; give every input one row per sample")
    sizes = tuple(tuple(t.shape[2:]) for t in x.tensors)
    return InputShape(batches[0], sizes[0], sizes)


def input_gradient(x: Any, grads: Sequence[Tensor]) -> Any:
    """The input gradient of a pass in the form of its input: a tensor, or a tuple for several inputs."""
    return tuple(grads) if isinstance(x, Inputs) else grads[0]


def gradients(total: Any, inputs: Sequence[Tensor], retain_graph: bool = False) -> List[Tensor]:
    """``d total / d input`` for each input (``total``: a scalar, or a list of scalars summed); zeros where the
    score does not depend on it, and everywhere for a score that depends on nothing (a callable target returning
    a constant: the zero-gradient warning then says so)."""
    totals = [t for t in ([total] if isinstance(total, Tensor) else total) if t.requires_grad]
    needed = [t for t in inputs if t.requires_grad] if totals else []
    grads = iter(torch.autograd.grad(totals, needed, retain_graph=retain_graph, allow_unused=True) if needed else ())
    result = []
    for tensor in inputs:
        grad = next(grads) if tensor.requires_grad and totals else None
        result.append(torch.zeros_like(tensor) if grad is None else grad)
    return result


@contextlib.contextmanager
def own_parameters():
    """Module conversions (``.to()``, ``.double()``) give new Parameter objects instead of setting ``.data`` on the
    ones a capture or explainer shares with the model, which would move or cast the model too."""
    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(previous)
