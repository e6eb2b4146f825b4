"""Running an explainer: ``ex(x)`` is the model's forward, ``ex.explain(x)`` gives every map in one pass.

Build one with :func:`guided_swap.convert`.

>>> import torch, torchvision, guided_swap as gs
>>> _ = torch.manual_seed(0)
>>> ex = gs.convert(torchvision.models.resnet18().eval(), layer="layer4")
>>> e = ex.explain(torch.randn(2, 3, 64, 64), target=[1, 2])
>>> e.gradient.shape, e.cam_raw.shape, e.cam.shape, e.guided_gradcam.shape, len(ex.swapped)
(torch.Size([2, 3, 64, 64]), torch.Size([2, 2, 2]), torch.Size([2, 64, 64]), torch.Size([2, 3, 64, 64]), 17)
"""
import pickle
import threading
import warnings
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import cam as cam_maths
from . import io, smoothing
from .errors import GuidedSwapError, InputError, LayerError, LoadError, RuleError, ZeroGradientWarning
from .maps import Explanation, PassResult, explanation_from_pass, zero_gradient_messages
from .rules import Rule
from .targets import Channel, callable_score, channel_score, class_score, select_output

if TYPE_CHECKING:  # build.py imports this module; the types are only named here
    from .build import Built, Plan


class Explainer(nn.Module):
    """A converted model: forward is the model's, :meth:`explain` gives maps. Build it with ``convert``.

    It shares parameter and buffer storage with the model it came from (in-place weight updates are seen)
    but none of its module objects: ``.to()`` and ``.eval()`` on it leave the model as it is. It always
    runs the model as deployed (eval mode), so it never updates BatchNorm statistics.
    """

    def __init__(self, plan: Optional["Plan"], built: Optional["Built"], *, rule: Optional[Rule] = None,
                 layers: Sequence[str] = (), output: Any = None, report: Any = None,
                 make_plan: Optional[Callable[[Tensor], "Plan"]] = None):
        super().__init__()
        self.rule: Rule = plan.rule if plan is not None else rule
        self.layers = tuple(plan.layers if plan is not None else layers)
        self.output = plan.output if plan is not None else output
        self.forward_module = None
        self.graph_module = None
        self.input_spec = None
        self._plan: Optional[Plan] = None
        self._make_plan = make_plan
        self._delegate: Optional[Explainer] = None  # the run-time explainer a deferred capture fell back to
        self._lock = threading.Lock()
        self._report = report
        if plan is not None:
            self._set_plan(plan)
        if built is not None:
            self._install(built)
        self.train(False)

    @classmethod
    def deferred(cls, make_plan: Callable[[Tensor], "Plan"], rule: Rule, layers: Sequence[str], output: Any,
                 capture: str) -> "Explainer":
        """An explainer whose graph is captured from its first input (the export path needs one)."""
        from .build import ConversionReport

        report = ConversionReport(rule.name, (), (), (), capture=f"{capture}, pending: captured from the first input",
                                  ordinary_rule=rule.ordinary)
        return cls(None, None, rule=rule, layers=layers, output=output, report=report, make_plan=make_plan)

    # --- building on demand -------------------------------------------------------------------------

    def _set_plan(self, plan: "Plan") -> None:
        self._plan, self._make_plan = plan, None
        self.input_spec = plan.input_spec
        self.forward_module = plan.forward_graph()
        self._report = plan.report(None)
        self.train(False)

    def _ensure_captured(self, example: Any) -> None:
        """Capture on the first input: a plan for this explainer, or an explainer of another path to delegate to."""
        if self._make_plan is None:
            return
        with self._lock:
            if self._make_plan is not None:
                result = self._make_plan(example[:1].detach() if isinstance(example, Tensor) else example)
                if isinstance(result, Explainer):
                    self._delegate, self._make_plan = result, None
                    self._report = result.report
                else:
                    self._set_plan(result)

    def _install(self, built: "Built") -> None:
        self.graph_module = built.graph_module
        self.forked = built.forked
        self._report = self._plan.report(built)
        self._plan = None
        self.train(False)

    def _ensure_built(self, example: Optional[Tensor]) -> None:
        """Capture the graph and resolve ``layer="auto"`` on ``example`` (the first input) when first needed."""
        if self._plan is None and self._make_plan is None:
            return
        if example is None:
            raise LayerError("this explainer is resolved from an input: call explain(x) once, or convert with "
                             "example_input=")
        self._ensure_captured(example)
        with self._lock:
            if self._plan is not None:
                self._install(self._plan.build(example[:1].detach()))

    @property
    def report(self):
        """The :class:`~guided_swap.build.ConversionReport`: what was swapped, left alone and captured."""
        return self._report if self._delegate is None else self._delegate.report

    @property
    def swapped(self) -> Tuple[str, ...]:
        """The qualified node name of every rectifier call site that carries the rule."""
        return tuple(s.name for s in self.report.swapped)

    # --- running ------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Any:
        """The model's own output, bit for bit (the rule applies if you backpropagate through it)."""
        self._ensure_captured(x)
        if self._delegate is not None:
            return self._delegate(x)
        if self._compiled is not None:
            return self._compiled.forward(self.forward_module, x)
        return self.forward_module(x)

    def explain(self, x: Tensor, target: Any = None, *, interpolate: str = "bilinear", smooth: Optional[int] = None,
                noise: Optional[float] = None, generator: Optional[torch.Generator] = None,
                chunk: Optional[int] = None, check_finite: Optional[bool] = None) -> Explanation:
        """One forward and one backward: the rule's input gradient and every CAM at every captured layer.

        ``target``: None (argmax), an int, one int per sample (sequence or LongTensor), a callable
        ``outputs -> (B,) score``, or :class:`guided_swap.Channel`.
        ``smooth=N``: SmoothGrad, the mean map over N noisy copies of each input, noise ``noise`` (default 0.15)
        times each input's value range, drawn from ``generator``, ``chunk`` inputs per pass (default: the
        batch size); see :mod:`guided_swap.smoothing` for what is averaged.
        ``check_finite``: read values to refuse an input holding NaN or Inf, and to warn when a gradient is zero
        everywhere for a sample (its maps would show nothing). None reads them on the CPU only: on a GPU that
        would wait for the device on every call; True reads them there too, False never.
        """
        self._ensure_captured(x)
        if self._delegate is not None:
            self._compile_delegate()
            given = dict(smooth=smooth, noise=noise, generator=generator, chunk=chunk, check_finite=check_finite)
            return self._delegate.explain(x, target, interpolate=interpolate,
                                          **{k: v for k, v in given.items() if v is not None})
        self._check_input(x, check_finite)
        if interpolate not in cam_maths.INTERPOLATIONS:
            raise ValueError(f"interpolate={interpolate!r} is not one of {cam_maths.INTERPOLATIONS}")
        smoothing.check(smooth, noise, generator, chunk, x)
        self._ensure_built(x)
        self._warn_if_nothing_swapped()
        if smooth is not None:
            if self._compiled is not None:
                self._compiled.warn_eager("smooth=", "SmoothGrad's chunks run the eager pass")
            return smoothing.smooth_explain(self, x, target, copies=smooth, noise=noise, generator=generator,
                                            chunk=chunk, interpolate=interpolate)
        explanation = None
        if self._compiled is not None:  # None back: this kind of target runs eagerly, a warning said why
            explanation = self._compiled.explain(self, x, target, interpolate)
        if explanation is None:
            result = self.forward_backward(
                x, lambda out, caps, fixed: self._score(target if fixed is None else fixed, out, caps, x.shape[0]))
            explanation = self.explanation_of(result, x, interpolate)
        warn_if_zero_gradients(explanation, reads_values(x, check_finite), target)
        return explanation

    def explanation_of(self, result: PassResult, x: Tensor, interpolate: str) -> Explanation:
        """The :class:`Explanation` of one pass over ``x`` (eager or compiled), read with this explainer's
        layers, output, rule and layouts."""
        return explanation_from_pass(result, layers=self.layers, logits=self._select(result.outputs),
                                     input_size=tuple(x.shape[2:]), interpolate=interpolate, rule=self.rule.name,
                                     swapped=len(self.swapped), layouts=getattr(self.report, "layouts", None))

    def _warn_if_nothing_swapped(self) -> None:
        """Once per explainer: with no rectifier swapped, the rule's "guided" map is the plain gradient."""
        if self.swapped or self.rule.ordinary or self.__dict__.get("_warned_nothing_swapped"):
            return
        self._warned_nothing_swapped = True
        warnings.warn(_nothing_swapped_message(self.report), stacklevel=3)

    def forward_backward(self, x: Tensor, scorer: Callable, call: Optional[Callable] = None) -> PassResult:
        """The one forward and one backward every map comes from (shared by :meth:`explain` and export).

        ``scorer(outputs, captures_by_layer, classes_or_None) -> (score (B,), classes)`` is called on the
        main graph, then, with the classes it chose, on the plain fork if there is one. The explain graph
        returns a :class:`guided_swap.build.GraphOutputs`, read here by name.
        """
        self._ensure_built(x)
        call = self.graph_module if call is None else call
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            out = call(leaf)
            score, classes = scorer(out.model, dict(zip(self.layers, out.captures)), None)
            scores, grad_at = [score.sum()], list(out.captures)
            if self.forked:
                plain, _ = scorer(out.fork_model, dict(zip(self.layers, out.fork_captures)), classes)
                scores.append(plain.sum())
                grad_at = list(out.fork_captures)
            grads = _grad(scores, [leaf] + grad_at)
        return PassResult(out.model, tuple(out.captures), score, classes, grads[0], tuple(grads[1:]))

    def _score(self, target, outputs, captures: Dict[str, Tensor], batch: int):
        if isinstance(target, Channel):
            return channel_score(target, captures), None
        if callable(target) and not isinstance(target, Tensor):
            return callable_score(target, outputs, batch), None
        return class_score(self._select(outputs), target)

    def _select(self, outputs: Any) -> Tensor:
        return select_output(outputs, self.output)

    def _check_input(self, x: Any, check_finite: Optional[bool] = None) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got dtype {x.dtype}; convert it with x.float()")
        if torch.is_inference_mode_enabled():
            raise GuidedSwapError("explain() needs autograd, which torch.inference_mode() turns off; call it outside")
        self._ensure_captured(x)
        if self.input_spec is not None:
            rank, channels = self.input_spec
            if x.dim() != rank:
                raise InputError(f"input has {x.dim()} dimensions {tuple(x.shape)}; the model expects {rank} "
                                 f"(batch, {channels} channels, spatial...): add a batch dimension with x.unsqueeze(0)")
            if x.shape[1] != channels:
                raise InputError(f"input has {x.shape[1]} channels; the model's first convolution takes {channels}")
        parameter = next(self.forward_module.parameters(), None)
        if parameter is not None and (x.device != parameter.device or x.dtype != parameter.dtype):
            raise InputError(f"input is {x.dtype} on {x.device} but the explainer is {parameter.dtype} on "
                             f"{parameter.device}: move one, e.g. x.to(device, dtype) or explainer.to(...)")
        if reads_values(x, check_finite) and not bool(torch.isfinite(x).all()):
            raise InputError("input holds NaN or Inf values; every map would be NaN. Clean the input first")

    # --- compiling -------------------------------------------------------------------------------------

    _compiled = None  # a CompiledExplain once compile() was called (a class default: old saved files lack it)

    def compile(self, **torch_compile_options) -> None:
        """Compile in place, like ``nn.Module.compile``: ``explain`` then runs one compiled pass (forward, the
        rule's backward and the CAM maths; ``mode="reduce-overhead"`` on CUDA replays it as a CUDA graph) and
        ``ex(x)`` runs the compiled forward. The options go to ``torch.compile``. See
        :mod:`guided_swap.compiled` for which shapes and targets compile once, and when it runs eagerly.
        """
        from .compiled import CompiledExplain

        compiled = CompiledExplain(torch_compile_options)  # refuses options torch.compile does not take
        if type(self).explain is not Explainer.explain:  # the run-time capture: a Python hook on every call
            compiled.warn_eager("compile()", f"{type(self).__name__} captures its graph at run time, "
                                "which torch.compile cannot trace; explain runs eagerly")
            return
        self._compiled = compiled
        self._compile_delegate()

    def _compile_delegate(self) -> None:
        """A deferred explainer compiled before its capture passes compile() on to the explainer it delegates to."""
        if self._compiled is not None and self._delegate is not None and not self._delegate.compiled:
            self._delegate.compile(**self._compiled.options)

    @property
    def compiled(self) -> bool:
        """Whether :meth:`compile` was called (a saved and loaded explainer is not compiled)."""
        return self._compiled is not None

    # --- module behaviour -----------------------------------------------------------------------------

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_lock", None)
        state.pop("_compiled", None)  # compiled code is not saved: compile again after loading
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._lock = threading.Lock()

    def train(self, mode: bool = True) -> "Explainer":
        """Explainers run the model as deployed: ``train(True)`` is refused (it would update the model's
        BatchNorm statistics, which the explainer shares)."""
        if mode:
            raise GuidedSwapError("an Explainer always runs the model in eval mode (it shares the model's BatchNorm "
                                  "buffers and must not update them); convert a model in the mode you want to explain")
        return super().train(False)

    def _apply(self, fn, recurse=True):
        # Give the explainer new Parameter objects instead of setting .data on the shared ones, so that
        # explainer.to(...) never moves or casts the user's model.
        previous = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        try:
            return super()._apply(fn, recurse)
        finally:
            torch.__future__.set_overwrite_module_params_on_conversion(previous)

    def save(self, path: str) -> None:
        """Save this explainer (graphs, weights, layers, rule, report) to one file; see :func:`load`."""
        if self._delegate is not None:
            return self._delegate.save(path)
        if self._plan is not None or self._make_plan is not None:
            raise LayerError("this explainer is resolved from its first input (layer='auto' or the export capture): "
                             "call explain(x) once, or convert with example_input=, before saving")
        header = {"rule": self.rule.name, "rule_class": f"{type(self.rule).__module__}.{type(self.rule).__qualname__}",
                  "layers": list(self.layers), "swapped": len(self.swapped)}
        try:
            io.save_object(self, path, header)
        except (pickle.PicklingError, AttributeError, TypeError) as error:
            if _picklable(self.rule):
                raise
            raise RuleError(f"the rule {type(self.rule).__qualname__} cannot be saved ({error}); define the rule class "
                            "at the top level of an importable module so that it can be pickled") from None

    def extra_repr(self) -> str:
        forked = getattr(self, "forked", None)
        return f"rule={self.rule.name!r}, layers={self.layers}, swapped={len(self.swapped)}, forked={forked}"


def load(path: str, map_location=None) -> Explainer:
    """Load an explainer written by :meth:`Explainer.save`."""
    explainer = io.load_object(path, map_location)
    if not isinstance(explainer, Explainer):
        raise LoadError(f"{path!r} holds a {type(explainer).__name__}, not an Explainer")
    return explainer


def reads_values(x: Tensor, check_finite: Optional[bool]) -> bool:
    """Whether ``explain`` reads values (the finiteness check, the zero-gradient warning): None means on the
    CPU only, since elsewhere reading one waits for the device."""
    return x.device.type == "cpu" if check_finite is None else bool(check_finite)


def warn_if_zero_gradients(explanation: Explanation, reads: bool, target: Any) -> None:
    """Warn (one warning per line) when a gradient of ``explanation`` is zero everywhere for a sample."""
    for message in zero_gradient_messages(explanation, layers=not isinstance(target, Channel)) if reads else ():
        warnings.warn(message, ZeroGradientWarning, stacklevel=3)


def _nothing_swapped_message(report) -> str:
    kinds = Counter(kind for _, kind in report.left_alone)
    names = [name for name, _ in report.left_alone]
    if kinds:
        alone = ", ".join(f"{count} x {kind}" for kind, count in kinds.items())
        alone = f"left alone with their ordinary gradient: {alone} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
    else:
        alone = "no other activation was found either"
    hidden = f"; ReLUs hidden in leaf modules: {', '.join(report.hidden_in_leaves)}" if report.hidden_in_leaves else ""
    return (f"no ReLU was found in this model, so nothing carries the {report.rule!r} rule: e.gradient is the plain "
            f"gradient, not {report.rule} backprop, and Guided Grad-CAM is Grad-CAM times that plain gradient. "
            f"Activations {alone}{hidden}")


def _picklable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
        return True
    except Exception:  # pickling raises many types
        return False


def _grad(scores, inputs):
    wanted = [t.requires_grad for t in inputs]
    grads = iter(torch.autograd.grad(scores, [t for t, w in zip(inputs, wanted) if w], allow_unused=True))
    result = []
    for tensor, w in zip(inputs, wanted):
        g = next(grads) if w else None
        result.append(torch.zeros_like(tensor) if g is None else g)
    return result
