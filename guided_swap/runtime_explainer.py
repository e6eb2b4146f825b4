"""An explainer captured at run time, for models that neither torch.fx nor torch.export can take.

:func:`convert_runtime` builds it on the library's own mirror of the model (the user's model gets no hooks
and no swapped modules). Each ``explain`` runs the mirror once under :class:`~guided_swap.runtime_capture.Run`:
every rectifier call carries the rule, and the named layers are captured by forward hooks on the mirror.

Exact in one forward. The input gradient is taken with the rule. Grad-CAM needs the *ordinary* gradient
at a captured layer, which differs from the rule's when rectifiers follow the layer (a detector's FPN,
heads and box head do). The rectifiers of this forward read their rule when autograd reaches them, so a
first backward from the score to the captured layers runs with ordinary rectifier gradients (it only
passes the tail after those layers), and a second, from the score to the input, runs with the rule. No part
of the model runs twice forward; the tail runs twice backward.

It has the :class:`~guided_swap.Explainer` contract: ``explain(x, target) -> Explanation``, ``ex(x)``,
``report`` (``capture`` starts with ``runtime``), ``swapped``, ``save``. The input is what the model takes:
a (B, C, H, W) tensor, or a list of (C, H, W) images of one size for a torchvision detector.

>>> import torch, torchvision, guided_swap as gs
>>> ex = convert_runtime(torchvision.models.resnet18().eval(), layer="layer4")
>>> e = ex.explain(torch.randn(2, 3, 64, 64), target=[1, 2])
>>> tuple(e.gradient.shape), tuple(e.cam.shape), len(ex.swapped), ex.report.capture
((2, 3, 64, 64), (2, 64, 64), 17, 'runtime')
"""
import pickle
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import cam as cam_maths
from . import smoothing
from .build import AUTO, ConversionReport, warn_if_training
from .capture import layer_list
from .errors import ExportError, GuidedSwapError, InputError, LayerError, TargetError
from .explainer import Explainer, reads_values, warn_if_zero_gradients
from .maps import Explanation, PassResult, explanation_from_pass
from .rewrite import Swap
from .rules import Rule, get_rule
from .runtime_capture import Run, Site, auto_layer, private_mirror
from .targets import Box, Channel, OutputKey, box_score, callable_score, channel_score, class_score, select_output


@dataclass(frozen=True)
class RuntimeReport(ConversionReport):
    """The conversion report of a run-time explainer: call sites are those seen while the model ran."""

    runs: int = 0                 # forward passes the call sites were gathered from
    tail_backward: bool = False   # Grad-CAM's gradient came from a second backward through the captured tail

    def summary(self) -> str:
        if not self.runs:
            return super().summary() + "; call sites are listed once the model has run (or convert with example_input=)"
        return super().summary() + f" (seen in {self.runs} forward pass(es))"

    def __str__(self) -> str:
        lines = [super().__str__(),
                 f"call sites as seen while the model ran ({self.runs} forward pass(es)); a branch that has not run "
                 "is not listed, and every rectifier call that runs carries the rule"]
        if self.tail_backward:
            lines.append("rectifiers follow a captured layer: Grad-CAM's ordinary gradient comes from a second "
                         "backward through that tail with ordinary rectifier gradients (one forward)")
        return "\n".join(lines)


class RuntimeExplainer(Explainer):
    """An :class:`~guided_swap.Explainer` whose rectifiers are swapped while the model runs. Build it with
    :func:`convert_runtime` (or ``guided_swap.convert``, which falls back to it)."""

    def __init__(self, model: nn.Module, layers: Sequence[str], rule: Rule, output: OutputKey,
                 reason: Optional[str] = None):
        super().__init__(None, None, rule=rule, layers=layers, output=output)  # no graph, no plan
        self.forked = False
        self.model = private_mirror(model)
        self.capture = "runtime" if not reason else f"runtime ({reason})"
        self._paths = {name: _check_layer(name, self.model) for name in self.layers if name != AUTO}
        self._layer_reasons: Dict[str, str] = {}
        self._sites: Dict[str, Site] = {}
        self._left_alone: Dict[str, Site] = {}
        self._runs = 0
        self._tail_backward = False
        self._refresh_report()
        self.train(False)

    # --- running ------------------------------------------------------------------------------------

    def forward(self, x: Any) -> Any:
        """The model's own output (the rule applies if you backpropagate through it)."""
        with self._lock:
            _, outputs = self._run(x, capture=())
        return outputs

    def explain(self, x: Any, target: Any = None, *, interpolate: str = "bilinear", smooth: Optional[int] = None,
                noise: Optional[float] = None, generator: Optional[torch.Generator] = None,
                chunk: Optional[int] = None, check_finite: Optional[bool] = None) -> Explanation:
        """One forward (two backward calls when rectifiers follow a captured layer): the rule's input gradient
        and every CAM at every captured layer. The options are :meth:`guided_swap.Explainer.explain`'s.

        ``x``: what the model takes, a (B, C, H, W) tensor or a list of B (C, H, W) images of one size.
        ``target``: :class:`guided_swap.Box` (one detection per image), a callable ``outputs -> (B,) score``,
        :class:`guided_swap.Channel`, or for a model that returns logits a class target (None, int, one per
        sample).
        ``smooth=N``: SmoothGrad (:mod:`guided_swap.smoothing`), with ``noise``, ``generator`` and ``chunk`` as
        on the graph paths; a list of images is smoothed as the (B, C, H, W) stack of its images, and a
        :class:`guided_swap.Box` target picks detection ``index`` of each noisy copy.
        ``check_finite``: as on the graph paths (the finiteness check and the zero-gradient warning; None: on the
        CPU only, elsewhere reading values waits for the device).
        """
        batch, size = self._check_input(x, check_finite)
        if interpolate not in cam_maths.INTERPOLATIONS:
            raise ValueError(f"interpolate={interpolate!r} is not one of {cam_maths.INTERPOLATIONS}")
        smoothing.check(smooth, noise, generator, chunk, x if isinstance(x, Tensor) else x[0])
        with self._lock:
            self._resolve_auto(x)
        if smooth is not None:
            stacked = x if isinstance(x, Tensor) else torch.stack(list(x))
            view = _SmoothingView(self, as_list=not isinstance(x, Tensor))
            return smoothing.smooth_explain(view, stacked, target, copies=smooth, noise=noise, generator=generator,
                                            chunk=chunk, interpolate=interpolate)
        result = self._pass(x, lambda outputs, captures, fixed: self._score(target, outputs, captures, batch))
        explanation = explanation_from_pass(result, layers=self.layers, logits=self._logits(result.outputs, batch),
                                            input_size=size, interpolate=interpolate, rule=self.rule.name,
                                            swapped=len(self.swapped))
        warn_if_zero_gradients(explanation, reads_values(result.input_grad, check_finite), target)
        return explanation

    def _pass(self, x: Any, scorer: Callable) -> PassResult:
        """The forward and backward every map comes from; ``scorer(outputs, captures_by_layer, None)`` gives
        (score (B,), classes), as for :meth:`guided_swap.Explainer.forward_backward`."""
        leaves, model_input = _leaves(x)
        with self._lock:
            with torch.enable_grad():
                run, outputs = self._run(model_input, capture=[self._paths[name] for name in self.layers])
            captures = self._captures(run)
        with torch.enable_grad():
            score, classes = scorer(outputs, dict(zip(self.layers, captures)), None)
            input_grads, layer_grads = _backward(score, leaves, captures, run)
        input_grad = input_grads[0] if isinstance(x, Tensor) else torch.stack(input_grads)
        return PassResult(outputs, tuple(captures), score, classes, input_grad, tuple(layer_grads))

    def _run(self, model_input: Any, capture: Sequence[str], record: bool = False) -> Tuple[Run, Any]:
        with Run(self.model, self.rule, capture=capture, record=record) as run:
            outputs = self.model(model_input)
        self._runs += 1
        self._sites.update((k, v) for k, v in run.sites.items() if k not in self._sites)
        self._left_alone.update((k, v) for k, v in run.left_alone.items() if k not in self._left_alone)
        self._tail_backward |= run.rectified_after_capture
        self._refresh_report()
        return run, outputs

    def _resolve_auto(self, x: Any) -> None:
        if AUTO not in self.layers or AUTO in self._paths:
            return
        with torch.no_grad():
            run, _ = self._run(_leaves(x)[1], capture=(), record=True)
        path, reason = auto_layer(run.calls)
        if path is None:
            raise LayerError(f"{reason}; pass layer=NAME, a module of the model: {_suggest('', self.model)}")
        self._paths[AUTO], self._layer_reasons[AUTO] = path, reason
        self._refresh_report()

    def _captures(self, run: Run) -> List[Tensor]:
        captures = []
        for name in self.layers:
            key = self._paths[name]
            values = run.captures.get(key, [])
            if not values:
                raise LayerError(f"layer {name!r} (module {key!r}) did not run in this forward; capture a module "
                                 "that runs for this input")
            if len(values) > 1:
                calls = ", ".join([key] + [f"{key}_{i}" for i in range(1, len(values))])
                raise LayerError(f"module {key!r} ran {len(values)} times in one forward; name one call: {calls}")
            if not isinstance(values[0], Tensor):
                raise LayerError(f"layer {name!r} returned a {type(values[0]).__name__}, not a tensor; capture a "
                                 f"module inside it that returns one feature map: {_suggest(key + '.', self.model)}")
            captures.append(values[0])
        return captures

    def _score(self, target, outputs, captures: Dict[str, Tensor], batch: int):
        if isinstance(target, Box):
            return box_score(target, outputs, batch), None
        if isinstance(target, Channel):
            return channel_score(target, captures), None
        if callable(target) and not isinstance(target, Tensor):
            return callable_score(target, outputs, batch), None
        if self.output is None and not isinstance(outputs, Tensor):
            raise TargetError(f"this model returns a {type(outputs).__name__}, not logits: explain a detection with "
                              "target=guided_swap.Box(i), or pass a callable outputs -> (B,) score (or convert with "
                              "output=KEY for a model that returns logits among other outputs)")
        return class_score(select_output(outputs, self.output), target)

    def _logits(self, outputs: Any, batch: int) -> Tensor:
        """The explained logits; a model whose output is not a tensor has none: (B, 0) (see ``e.outputs``)."""
        if self.output is not None or isinstance(outputs, Tensor):
            return select_output(outputs, self.output)
        parameter = next(self.model.parameters(), None)
        return torch.empty(batch, 0, device=None if parameter is None else parameter.device)

    def _check_input(self, x: Any, check_finite: Optional[bool] = None) -> Tuple[int, Tuple[int, ...]]:
        """(batch size, spatial size) of an input the model takes, after checking it."""
        if torch.is_inference_mode_enabled():
            raise GuidedSwapError("explain() needs autograd, which torch.inference_mode() turns off; call it outside")
        if isinstance(x, Tensor):
            images, batch, size = [x], x.shape[0] if x.dim() else 0, tuple(x.shape[2:])
            if x.dim() < 2:
                raise InputError(f"input has shape {tuple(x.shape)}; give a batch (B, C, ...)")
        elif isinstance(x, (list, tuple)) and x and all(isinstance(t, Tensor) for t in x):
            images, batch, size = list(x), len(x), tuple(x[0].shape[1:])
            if len({tuple(t.shape) for t in images}) > 1:
                raise InputError(f"the images differ in size {sorted({tuple(t.shape) for t in images})}; explain "
                                 "images of one size together, or one image at a time")
        else:
            raise TypeError("input must be a tensor (B, C, ...) or a non-empty list of (C, H, W) image tensors, got "
                            f"{type(x).__name__}")
        parameter = next(self.model.parameters(), None)
        for image in images:
            if not image.is_floating_point():
                raise TypeError(f"input must be floating point, got dtype {image.dtype}; convert it with .float()")
            if parameter is not None and (image.device != parameter.device or image.dtype != parameter.dtype):
                raise InputError(f"input is {image.dtype} on {image.device} but the explainer is {parameter.dtype} on "
                                 f"{parameter.device}: move one, e.g. x.to(device, dtype) or explainer.to(...)")
            if reads_values(image, check_finite) and not bool(torch.isfinite(image).all()):
                raise InputError("input holds NaN or Inf values; every map would be NaN. Clean the input first")
        return batch, size

    # --- what is not here -------------------------------------------------------------------------------

    def forward_backward(self, x, scorer, call=None):
        raise ExportError(_NO_GRAPH)

    def _ensure_built(self, example) -> None:
        raise ExportError(_NO_GRAPH)

    # --- saving -------------------------------------------------------------------------------------------

    def save(self, path: str) -> None:
        """Save this explainer to one file (:func:`guided_swap.load` reads it back).

        It has no graph: the file holds its copy of the model, so, as with ``torch.save(model)``, loading
        needs the model's classes importable by the same names (a class defined in a script's ``__main__``
        loads only in that script). A class that cannot be imported by name is refused here, before anything
        is written.
        """
        hidden = _unimportable_classes(self.model)
        if hidden:
            raise TypeError(f"this explainer was captured at run time and holds a copy of the model, whose classes "
                            f"{hidden} cannot be imported by name (defined inside a function?), so the file could "
                            "not be loaded: define them at the top level of a module, or convert again instead of "
                            "saving")
        try:
            super().save(path)
        except (pickle.PicklingError, AttributeError) as error:
            raise TypeError(f"this explainer was captured at run time and holds a copy of the model, which cannot be "
                            f"pickled ({error}); nothing was written: convert again instead of saving") from error

    # --- report, module behaviour -------------------------------------------------------------------------

    def _refresh_report(self) -> None:
        swapped = () if self.rule.ordinary else tuple(Swap(s.name, s.spelling, s.inplace) for s in self._sites.values())
        self._report = RuntimeReport(
            self.rule.name, swapped, tuple((s.name, s.spelling) for s in self._left_alone.values()), (),
            layers=dict(self._paths), layer_reasons=dict(self._layer_reasons), capture=self.capture,
            ordinary_rule=self.rule.ordinary, runs=self._runs, tail_backward=self._tail_backward)

    def extra_repr(self) -> str:
        return f"capture='runtime', rule={self.rule.name!r}, layers={self.layers}, swapped={len(self.swapped)}"


class _SmoothingView:
    """What :func:`guided_swap.smoothing.smooth_explain` asks of an explainer, on a run-time explainer.

    Smoothing works on a (B, C, H, W) tensor; a model that takes a list of images gets each batch as a list.
    """

    def __init__(self, explainer: RuntimeExplainer, as_list: bool):
        self.explainer, self.as_list = explainer, as_list
        self.layers, self.rule = explainer.layers, explainer.rule
        self._batch = 0

    @property
    def report(self) -> RuntimeReport:
        return self.explainer.report  # read when asked: the call sites are those of the runs so far

    @property
    def swapped(self) -> Tuple[str, ...]:
        return self.explainer.swapped

    def _model_input(self, x: Tensor) -> Any:
        self._batch = x.shape[0]
        return list(x) if self.as_list else x

    def forward_module(self, x: Tensor) -> Any:
        return self.explainer(self._model_input(x))

    def forward_backward(self, x: Tensor, scorer: Callable) -> PassResult:
        return self.explainer._pass(self._model_input(x), scorer)

    def _score(self, target, outputs, captures: Dict[str, Tensor], batch: int):
        return self.explainer._score(target, outputs, captures, batch)

    def _select(self, outputs: Any) -> Tensor:
        """The logits of the outputs of the last batch run (none, (B, 0), for a model without logits)."""
        return self.explainer._logits(outputs, self._batch)


_NO_GRAPH = ("this explainer was captured at run time (neither torch.fx nor torch.export could take the model), so "
             "it has no graph to export; explain eagerly, or save it with ex.save()")


def convert_runtime(model: nn.Module, layer: Union[None, str, Sequence[str]] = AUTO, rule: Union[str, Rule] = "guided",
                    *, output: OutputKey = None, example_input: Any = None,
                    reason: Optional[str] = None) -> RuntimeExplainer:
    """Convert ``model`` with the run-time capture path. The model itself is never changed.

    ``layer``: a module name (``"backbone.body.16"``), one call of a module that runs several times
    (``"rpn.head.conv.0.2_1"``), a list of them, ``"auto"`` (resolved on ``example_input`` or the first
    input: the deepest map of a detector's backbone, else the last map of the last convolution's size) or
    None. ``rule`` and ``output`` as in :func:`guided_swap.convert`. ``example_input`` (what the model
    takes) resolves ``auto`` and lists the call sites now. ``reason`` is why the graph paths failed; the
    report's ``capture`` reads ``runtime (<reason>)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_runtime() takes a torch.nn.Module, got {type(model).__name__}")
    rule = get_rule(rule)
    warn_if_training(model, stacklevel=3)
    return build_runtime(model, layer_list(layer), rule, output, example_input, reason)


def build_runtime(model: nn.Module, layers: Sequence[str], rule: Rule, output: OutputKey, example_input: Any = None,
                  reason: Optional[str] = None) -> RuntimeExplainer:
    """:func:`convert_runtime` after its argument checks and warnings (for ``guided_swap.convert``'s fallback,
    which has made them already)."""
    explainer = RuntimeExplainer(model, layers, rule, output, reason)
    if example_input is not None:
        explainer._check_input(example_input)
        with explainer._lock, torch.no_grad():
            explainer._resolve_auto(example_input)
            if AUTO not in explainer.layers:
                explainer._run(_leaves(example_input)[1], capture=())
    return explainer


def _leaves(x: Any) -> Tuple[List[Tensor], Any]:
    """Gradient leaves for the input and the input the model is called with (same container)."""
    if isinstance(x, Tensor):
        leaf = x.detach().requires_grad_(True)
        return [leaf], leaf
    leaves = [t.detach().requires_grad_(True) for t in x]
    return leaves, type(x)(leaves)


def _backward(score: Tensor, leaves: List[Tensor], captures: List[Tensor], run: Run):
    """The rule's gradient at each input leaf, and the ordinary gradient at each capture (module docstring)."""
    total = score.sum()
    if captures and run.switch is not None and run.rectified_after_capture:
        run.switch.ordinary_now = True
        layer_grads = _grad(total, captures, retain_graph=True)
        run.switch.ordinary_now = False
        input_grads = _grad(total, leaves)
    else:
        grads = _grad(total, leaves + captures)
        input_grads, layer_grads = grads[:len(leaves)], grads[len(leaves):]
    return input_grads, layer_grads


def _grad(total: Tensor, inputs: List[Tensor], retain_graph: bool = False) -> List[Tensor]:
    """``d total / d input`` for each input; zeros where the score does not depend on it."""
    needed = [t for t in inputs if t.requires_grad]
    grads = iter(torch.autograd.grad(total, needed, retain_graph=retain_graph, allow_unused=True) if needed else ())
    result = []
    for tensor in inputs:
        grad = next(grads) if tensor.requires_grad else None
        result.append(torch.zeros_like(tensor) if grad is None else grad)
    return result


def _unimportable_classes(model: nn.Module) -> List[str]:
    """The qualified names of the model's module classes that pickle cannot find again by name."""
    hidden = []
    for cls in {type(m) for m in model.modules()}:
        found = sys.modules.get(cls.__module__)
        for part in cls.__qualname__.split("."):
            found = getattr(found, part, None)
        if found is not cls:
            hidden.append(f"{cls.__module__}.{cls.__qualname__}")
    return sorted(hidden)


def _check_layer(name: str, model: nn.Module) -> str:
    """A module path, or one call of it (``path_1``): the name itself, validated."""
    modules = dict(model.named_modules())
    base, _, index = name.rpartition("_")
    if name in modules or (base in modules and index.isdigit()):
        return name
    import difflib

    close = difflib.get_close_matches(name, [m for m in modules if m], n=5, cutoff=0.5)
    raise LayerError(f"layer {name!r} is not a module of {type(model).__name__}; closest names: "
                     f"{close or _suggest('', model)}")


def _suggest(prefix: str, model: nn.Module, n: int = 5) -> List[str]:
    names = [name for name, _ in model.named_modules() if name.startswith(prefix) and name != prefix.rstrip(".")]
    return names[-n:] if names else [name for name, _ in model.named_modules() if name][:n]
