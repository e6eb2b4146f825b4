"""Running an explainer: ``ex(x)`` is the model's forward, ``ex.explain(x)`` gives every map in one pass.

Build one with :func:`guided_swap.convert`. An :class:`Explainer` runs one
:class:`~guided_swap.capture.base.Capture` (fx, export or run time: the same calls on each) and turns each pass
into an :class:`~guided_swap.core.maps.Explanation`.

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
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..capture.base import Capture, InputShape, own_parameters, reads_values
from ..core import cam as cam_maths
from ..core.errors import GuidedSwapError, InputError, LayerError, LoadError, RuleError, ZeroGradientWarning
from ..core.inputs import Inputs, Signature, call_signature, first_rows, first_tensor, same_signature, several
from ..core.maps import Explanation, zero_gradient_messages
from ..core.report import ConversionReport
from ..core.rules import Rule
from ..core.targets import ChannelScore, Score, as_score
from . import augment, explainer_file, extra_cams, saved, smoothing
from .assemble import explanation_of
from . import compiled
from .compiled import CompiledExplain


class Explainer(nn.Module):
    """A converted model: forward is the model's, :meth:`explain` gives maps. Build it with ``convert``.

    It shares parameter and buffer storage with the model it came from (in-place weight updates are seen)
    but none of its module objects: ``.to()`` and ``.eval()`` on it leave the model as it is. It always
    runs the model as deployed (eval mode), so it never updates BatchNorm statistics.
    """

    def __init__(self, capture: Capture, recipe: Optional[Callable[[Signature, Any], Capture]] = None):
        super().__init__()
        if not isinstance(capture, Capture):
            raise TypeError(f"Explainer takes a guided_swap Capture (use guided_swap.convert), got "
                            f"{type(capture).__name__}")
        self.capture = capture
        self._recipe = recipe  # builds the capture for a call of another signature (convert's; None once loaded)
        self._variants: List[Tuple[Signature, Capture]] = []
        self._variants_lock = threading.Lock()
        self.train(False)

    # --- what the capture holds ----------------------------------------------------------------------

    @property
    def rule(self) -> Rule:
        return self.capture.rule

    @property
    def layers(self) -> Tuple[str, ...]:
        return self.capture.layers

    @property
    def output(self) -> Any:
        return self.capture.output

    @property
    def report(self) -> ConversionReport:
        """The :class:`~guided_swap.core.report.ConversionReport`: what was swapped, left alone and captured."""
        return self.capture.report

    @property
    def swapped(self) -> Tuple[str, ...]:
        """The qualified node name of every rectifier call site that carries the rule."""
        return self.capture.swapped

    @property
    def graph_module(self) -> Optional[nn.Module]:
        """The explain graph (None for the run-time capture, or before a deferred capture's first input)."""
        return self.capture.graph_module

    @property
    def forward_module(self) -> Optional[nn.Module]:
        """The forward graph ``ex(x)`` runs (graph captures only)."""
        return self.capture.forward_module

    @property
    def forked(self) -> bool:
        """Whether rectifiers follow a captured layer (Grad-CAM's gradient then comes from a plain tail)."""
        return self.report.forked

    # --- running ------------------------------------------------------------------------------------

    def forward(self, *args: Any) -> Any:
        """The model's own output, bit for bit (the rule applies if you backpropagate through it):
        ``ex(x)``, or ``ex(x1, x2, ...)`` for a model called with several arguments."""
        if not args:
            raise TypeError("the explainer's forward takes the model's input: ex(x) or ex(x1, x2, ...)")
        x = args[0] if len(args) == 1 else positional_call(args, self.capture.signature)
        capture = self.capture_for(x)
        if self._compiled is not None and capture is self.capture and self.forward_module is not None \
                and isinstance(x, Tensor):
            return self._compiled.forward(self.forward_module, x)
        return capture(x)

    def capture_for(self, x: Any) -> Capture:
        """The capture that takes calls like ``x``: the one ``convert`` made, or one traced again for another
        :class:`~guided_swap.core.inputs.Signature` (several inputs, forward arguments; built once, then kept)."""
        wanted = call_signature(x)
        primary = self.capture.signature
        if primary is None or same_signature(primary, wanted):
            return self.capture
        with self._variants_lock:
            for signature, capture in self._variants:
                if same_signature(signature, wanted):
                    return capture
            if self._recipe is None:
                raise InputError(f"this explainer takes {primary.describe()}, and this call gives {wanted.describe()}; "
                                 "a loaded explainer cannot be traced again for other calls: convert the model with "
                                 "example_input= shaped like this call (a tuple for several inputs)")
            capture = self._recipe(wanted, first_rows(x))
            self._variants.append((wanted, self._matched(capture)))
            return capture

    def _matched(self, capture: Capture) -> Capture:
        """``capture`` on the device and dtype of this explainer's weights (it was built on the model's)."""
        mine, theirs = next(self.capture.parameters(), None), next(capture.parameters(), None)
        if mine is not None and theirs is not None and (mine.device, mine.dtype) != (theirs.device, theirs.dtype):
            with own_parameters():
                capture.to(device=mine.device, dtype=mine.dtype if mine.is_floating_point() else None)
        return capture

    def explain(self, x: Any, target: Any = None, *, forward_args: Optional[Sequence[Any]] = None,
                cams: Sequence[str] = (), interpolate: str = "bilinear",
                smooth: Optional[int] = None, noise: Optional[float] = None,
                generator: Optional[torch.Generator] = None, chunk: Optional[int] = None,
                check_finite: Optional[bool] = None, smooth_type: Optional[str] = None,
                noise_absolute: Optional[float] = None) -> Explanation:
        """One forward and one backward: the rule's input gradient and every CAM at every captured layer.

        ``x``: what the model takes, a (B, C, ...) tensor (or, for the run-time capture of a detector, a list
        of B (C, H, W) images of one size), or a tuple of tensors for a model called with several inputs
        (``model(x1, x2)``; Captum's tuple of inputs): ``e.gradient`` and ``e.guided_gradcam`` are then tuples,
        one entry per input. ``forward_args``: a tuple of further arguments passed after the inputs and not
        explained (Captum's ``additional_forward_args``); a forward argument with a default that is not given is
        traced as absent (its default). See :mod:`guided_swap.core.inputs`.
        ``target``: None (argmax), an int, one int per sample (sequence or LongTensor), a callable
        ``outputs -> (B,) score``, :class:`guided_swap.Channel`, or :class:`guided_swap.Box` (one detection per
        image of a detector).
        ``smooth=N``: SmoothGrad, the mean map over N noisy copies of each input, noise ``noise`` (default 0.15)
        times each input's value range, drawn from ``generator``, ``chunk`` inputs per pass (default: the
        batch size); see :mod:`guided_swap.run.smoothing` for what is averaged. ``smooth_type``: ``"smoothgrad"``
        (the mean, default), ``"smoothgrad_sq"`` or ``"vargrad"`` (Captum's ``nt_type``); ``noise_absolute``: one
        standard deviation in the input's units (Captum's ``stdevs``) instead of ``noise``.
        ``cams``: CAMs that need passes of their own, made in this call: ``"scorecam"``, ``"ablationcam"``,
        ``"fullgrad"`` (then ``e.cams["scorecam"]``...), their perturbed copies ``chunk`` per forward (default 64;
        16 for Score-CAM on a CPU); see :mod:`guided_swap.run.extra_cams`.
        ``check_finite``: read values to refuse an input holding NaN or Inf, and to warn when a gradient is zero
        everywhere for a sample (its maps would show nothing). None reads them on the CPU only: on a GPU that
        would wait for the device on every call; True reads them there too, False never.
        """
        x = as_call(x, forward_args)
        capture = self.capture_for(x)
        shape = capture.check(x, check_finite)
        if interpolate not in cam_maths.INTERPOLATIONS:
            raise ValueError(f"interpolate={interpolate!r} is not one of {cam_maths.INTERPOLATIONS}")
        passes = extra_cams.requested(cams, smooth, chunk)
        if passes and several(x):
            raise InputError(f"cams={tuple(passes)} perturb one input tensor and run the model on the copies; this call "
                             "has several inputs or forward_args. Explain without cams= (every gradient CAM is in "
                             "e.cams), or explain a model that takes one input")
        smoothing.check(smooth, noise, generator, None if passes else chunk, first_tensor(x), smooth_type, noise_absolute)
        score = as_score(target, capture.output, capture.layers)
        capture.prepare(x)
        if smooth is not None:
            if self._compiled is not None:
                self._compiled.warn_eager("smooth=", "SmoothGrad's chunks run the eager pass")
            explanation = smoothing.smooth_explain(capture, x, score, copies=smooth, noise=noise,
                                                   generator=generator, chunk=chunk, interpolate=interpolate,
                                                   smooth_type=smooth_type, noise_absolute=noise_absolute)
        else:
            explanation = self._one_pass(capture, x, score, shape, interpolate)
            if passes:
                extra_cams.add_pass_cams(capture, x, score, explanation, passes, chunk, interpolate)
        self._warn_if_nothing_swapped()
        warn_if_zero_gradients(explanation, reads_values(first_tensor(x), check_finite), score)
        return explanation

    def aug_smooth(self, x: Tensor, target: Any = None, cam: str = "gradcam", *, layers: Optional[Sequence[str]] = None,
                   eigen_smooth: bool = False, chunk: Optional[int] = None, interpolate: str = "bilinear") -> Tensor:
        """pytorch-grad-cam's ``cam(x, targets, aug_smooth=True, eigen_smooth=...)``: the (B, *spatial) map in [0, 1]
        of the CAM ``cam`` fused over ``layers`` (default: every captured layer), averaged over six flipped and
        rescaled copies of each input, which go through :meth:`explain` ``chunk`` at a time (default: all in one
        pass). See :mod:`guided_swap.run.augment`.

        >>> import torch, torchvision, guided_swap as gs
        >>> ex = gs.convert(torchvision.models.resnet18().eval(), layer=["layer3", "layer4"])
        >>> ex.aug_smooth(torch.randn(1, 3, 64, 64), [7], "layercam", layers=["layer4"], chunk=3).shape
        torch.Size([1, 64, 64])
        """
        if isinstance(x, tuple):
            raise InputError("aug_smooth flips and rescales one image batch and explains the copies; it takes one "
                             "input tensor, not a tuple of inputs")
        return augment.aug_smooth(self, x, target, cam, layers=layers, eigen_smooth=eigen_smooth, chunk=chunk,
                                  interpolate=interpolate)

    def _one_pass(self, capture: Capture, x: Any, score: Score, shape: InputShape, interpolate: str) -> Explanation:
        if self._compiled is not None:  # None back: this pass runs eagerly, a warning said why
            if several(x):
                self._compiled.warn_eager("several inputs or forward_args", "the compiled pass takes one input tensor")
            else:
                explanation = self._compiled.explain(capture, x, score, interpolate)
                if explanation is not None:
                    return explanation
        return explanation_of(capture, capture.run(x, score), shape.spatial, interpolate, shape.sizes)

    def _warn_if_nothing_swapped(self) -> None:
        """Once per explainer: with no rectifier swapped, the rule's "guided" map is the plain gradient."""
        if self.swapped or self.rule.ordinary or self.__dict__.get("_warned_nothing_swapped"):
            return
        self._warned_nothing_swapped = True
        warnings.warn(_nothing_swapped_message(self.report), stacklevel=3)

    # --- compiling -------------------------------------------------------------------------------------

    _compiled: Optional[CompiledExplain] = None  # set by compile() (a class default: never saved)

    def compile(self, **torch_compile_options) -> None:
        """Compile in place, like ``nn.Module.compile``: ``explain`` then runs one compiled pass (forward, the
        rule's backward and the CAM maths; ``mode="reduce-overhead"`` on CUDA replays it as a CUDA graph) and
        ``ex(x)`` runs the compiled forward. The options go to ``torch.compile``. See
        :mod:`guided_swap.run.compiled` for which shapes and targets compile once, and when it runs eagerly (a
        capture with no graph, such as the run-time capture of a detector, runs eagerly with a warning).
        """
        compiled_pass = CompiledExplain(torch_compile_options)  # refuses options torch.compile does not take
        if self.capture.ready and self.capture.graph_module is None:
            compiled_pass.warn_eager("compile()", compiled.NO_GRAPH)
            return
        self._compiled = compiled_pass

    @property
    def compiled(self) -> bool:
        """Whether :meth:`compile` was called (a saved and loaded explainer is not compiled)."""
        return self._compiled is not None

    # --- module behaviour -----------------------------------------------------------------------------

    def __getstate__(self):
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state.pop("_compiled", None)  # compiled code is not saved: compile again after loading
        # The recipe holds the model; captures for other calls are traced again where the model is at hand.
        state.update(_recipe=None, _variants=[])
        state.pop("_variants_lock", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_recipe", None)
        self.__dict__.setdefault("_variants", [])
        self._variants_lock = threading.Lock()

    def train(self, mode: bool = True) -> "Explainer":
        """Explainers run the model as deployed: ``train(True)`` is refused (it would update the model's
        BatchNorm statistics, which the explainer shares)."""
        if mode:
            raise GuidedSwapError("an Explainer always runs the model in eval mode (it shares the model's BatchNorm "
                                  "buffers and must not update them); convert a model in the mode you want to explain")
        return super().train(False)

    def _apply(self, fn, recurse=True):
        # New Parameter objects instead of .data set on the shared ones: explainer.to(...) never moves or casts
        # the user's model. Captures traced for other calls are not submodules (not saved) but move along.
        with own_parameters():
            for _, capture in self.__dict__.get("_variants", ()):
                capture._apply(fn, recurse)
            return super()._apply(fn, recurse)

    def save(self, path: str) -> None:
        """Save this explainer (graphs, weights, layers, rule, report) to one file, as data that loads without
        running code from the file; see :func:`load` and :mod:`guided_swap.run.saved` for what needs
        ``trust=True`` (a user's rule not registered where it loads, custom leaf modules, a run-time capture).
        Nothing is written when it cannot be saved."""
        if not self.capture.ready:
            raise LayerError("this explainer is resolved from its first input (layer='auto' or the export capture): "
                             "call explain(x) once, or convert with example_input=, before saving")
        self.capture.before_save()
        description, packer = explainer_file.describe(self.capture)
        try:
            saved.write(path, _header(self), description, packer.tensors, packer.pickled, packer.needs)
        except (pickle.PicklingError, AttributeError, TypeError) as error:
            if not _picklable(self.rule):
                raise RuleError(f"the rule {type(self.rule).__qualname__} cannot be saved ({error}); define the rule "
                                "class at the top level of an importable module so that it can be pickled") from None
            raise TypeError(f"this explainer cannot be pickled ({error}); nothing was written. A run-time capture "
                            "holds a copy of the model: its classes and attributes must pickle") from error

    def extra_repr(self) -> str:
        return f"rule={self.rule.name!r}, layers={self.layers}, swapped={len(self.swapped)}, forked={self.forked}"



def positional_call(args: Sequence[Any], signature: Optional[Signature]) -> Inputs:
    """``ex(a, b, c)`` as a call: split as ``signature`` splits a call of this length, else the leading tensors
    are the inputs and the rest forward arguments."""
    if signature is not None and signature.inputs + len(signature.extra) == len(args):
        count = signature.inputs
    else:
        count = next((i for i, value in enumerate(args) if not isinstance(value, Tensor)), len(args))
    return Inputs(tuple(args[:count]), tuple(args[count:]))


def as_call(x: Any, forward_args: Optional[Sequence[Any]]) -> Any:
    """What ``explain`` was given, as the captures take it: a tensor (or a detector's list of images) as it is,
    a tuple of inputs or any forward arguments as an :class:`~guided_swap.core.inputs.Inputs`."""
    if forward_args is not None and not isinstance(forward_args, (tuple, list)):
        raise TypeError(f"forward_args= takes a tuple of the arguments passed after the inputs, got "
                        f"{type(forward_args).__name__}; write forward_args=(value,) for one")
    extra = tuple(forward_args or ())
    if isinstance(x, tuple):
        if not x:
            raise InputError("explain got an empty tuple of inputs; give the input tensor(s)")
        for index, value in enumerate(x):
            if not isinstance(value, Tensor):
                raise TypeError(f"input {index} of the tuple is a {type(value).__name__}; every explained input is a "
                                "tensor: pass values that are not explained with forward_args=")
        return Inputs(tuple(x), extra)
    if not extra:
        return x
    if not isinstance(x, Tensor):
        raise TypeError(f"forward_args= go with tensor inputs; got a {type(x).__name__} input")
    return Inputs((x,), extra)


def load(path: str, map_location=None, *, trust: bool = False) -> Explainer:
    """Load an explainer written by :meth:`Explainer.save`, running no code from the file.

    The graphs, modules, weights, rule and report are rebuilt from data: functions, methods and module classes
    only from guided_swap's allow-list (:mod:`guided_swap.run.allowed`), weights from safetensors. A file that
    also holds pickled objects (a user's rule not registered here, a custom leaf module, a ``reshape=`` function,
    a run-time capture's copy of the model, or any file in the older format 3) raises :class:`LoadError` naming
    them, unless ``trust=True``: unpickling runs code from the file, so pass it only for files you trust.
    ``map_location``: a device, its name, or a dict from saved device names to new ones.

    >>> import torch, torchvision, guided_swap as gs, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "vgg.gsx")
    >>> gs.convert(torchvision.models.vgg11().eval(), layer="features.18").save(path)
    >>> gs.load(path, map_location="cpu").layers
    ('features.18',)
    """
    if not (map_location is None or isinstance(map_location, (str, torch.device, dict)) or trust):
        raise TypeError("map_location takes a device, a device name, or a dict from saved device names to new ones "
                        f"(anything torch.load takes only with trust=True); got {type(map_location).__name__}")
    contents = saved.read(path, trust, map_location)
    if contents.legacy is not None:
        explainer = contents.legacy
        if not isinstance(explainer, Explainer):
            raise LoadError(f"{path!r} holds a {type(explainer).__name__}, not an Explainer")
        return explainer
    try:
        explainer = Explainer(explainer_file.rebuild(contents.description, contents.tensors, contents.pickled,
                                                     map_location))
    except LoadError as error:
        raise LoadError(f"{path!r}: {error}") from None
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RecursionError, RuntimeError) as error:
        raise LoadError(f"{path!r} is damaged or edited: its description does not rebuild an explainer "
                        f"({type(error).__name__}: {error})") from None
    _check_header(path, contents.header, explainer)
    return explainer


def _header(explainer: Explainer) -> dict:
    rule = explainer.rule
    return {"rule": rule.name, "rule_class": f"{type(rule).__module__}.{type(rule).__qualname__}",
            "layers": list(explainer.layers), "swapped": len(explainer.swapped), "capture": explainer.report.capture}


def _check_header(path: str, header: dict, explainer: Explainer) -> None:
    """The header must say what the contents are: an edited header is refused, not believed."""
    wrong = [key for key, value in _header(explainer).items() if header.get(key) != value]
    if wrong:
        raise LoadError(f"{path!r}: its header does not match its contents ({', '.join(wrong)}), so it was edited or "
                        "damaged after saving; save or convert it again")


def _picklable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
        return True
    except Exception:  # pickling raises many types
        return False


def warn_if_zero_gradients(explanation: Explanation, reads: bool, score: Score) -> None:
    """Warn (one warning per line) when a gradient of ``explanation`` is zero everywhere for a sample."""
    layers = not isinstance(score, ChannelScore)  # layers after a channel's own get no gradient, by design
    for message in zero_gradient_messages(explanation, layers=layers) if reads else ():
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
