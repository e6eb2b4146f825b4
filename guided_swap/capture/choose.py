"""Which capture path takes a model: torch.fx, then torch.export, then run time, each tried when the one before
fails; and the deferred capture, which picks the path on the first input when no example was given.

>>> import torch, torchvision, guided_swap as gs
>>> capture = capture_model(torchvision.models.resnet18().eval(), ["layer4"], gs.get_rule("guided"))
>>> type(capture).__name__, capture.report.capture
('GraphCapture', 'fx')
"""
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..core.errors import TraceError
from ..core.inputs import Inputs, Signature, call_signature, first_rows
from ..core.layout import Layout
from ..core.maps import PassResult
from ..core.report import ConversionReport
from ..core.rules import Rule
from ..core.targets import OutputKey, Score
from .base import Capture, InputShape, check_floating, own_parameters
from .hooks import DroppedHooks
from .graph.export_trace import fx_failure, trace_export
from .graph.graph_capture import capture_graph
from .graph.trace import default_signature, trace
from .runtime.runtime_capture import RuntimeCapture

PATHS = ("auto", "fx", "export", "runtime")


def capture_model(model: nn.Module, layers: Sequence[str], rule: Rule, output: OutputKey = None, *,
                  path: str = "auto", example: Any = None, tracer_kwargs: Optional[Dict[str, Any]] = None,
                  layouts: Optional[Dict[str, Layout]] = None, signature: Optional[Signature] = None) -> Capture:
    """The capture of ``model`` by ``path`` (one of :data:`PATHS`); ``"auto"`` falls back fx → export → run time
    and the report's ``capture`` says which path took it and why. Without ``example`` the export path (which
    needs an input) is chosen on the first input: a :class:`DeferredCapture`. ``signature`` is what the model
    is called with (several inputs, forward arguments; :mod:`guided_swap.core.inputs`): by default that of
    ``example``, else forward's arguments without a default."""
    if path not in PATHS:
        raise ValueError(f"capture={path!r} is not one of {PATHS}")
    layouts = dict(layouts or {})
    if signature is None:
        signature = call_signature(example) if example is not None else default_signature(model)

    def runtime(reason: Optional[str]) -> Capture:
        return capture_runtime(model, layers, rule, output, example, reason, layouts)

    fx_note, fx_error = None, None
    if path in ("auto", "fx"):
        try:
            traced = trace(model, tracer_kwargs, signature)
        except TraceError as error:
            if path == "fx":
                raise
            fx_error = error
            fx_note = fx_failure(error)
        else:
            return capture_graph(traced, model, layers, rule, output, "fx", layouts, example)
    if path == "runtime":
        return runtime(None)
    if path == "auto" and isinstance(fx_error, DroppedHooks) and not fx_error.another_graph_could_hold:
        return runtime(fx_note)  # export would skip these hooks too

    def export_or_runtime(x: Any) -> Capture:
        """The export capture for a tensor input; the run-time capture when export cannot take the model."""
        if not isinstance(x, Tensor) and path == "auto":
            why = "the export capture takes one input tensor" if isinstance(x, Inputs) else "the input is not a tensor"
            return runtime(f"{fx_note}; {why}")
        if isinstance(x, Inputs):
            raise TraceError("the export capture takes one input tensor, without forward_args; a model called with "
                             "several inputs or forward arguments goes through fx or the run-time capture "
                             "(capture='fx' or 'runtime')")
        check_floating(x)  # refused in the user's words before torch.export fails on it
        x = _like_model(x, model)  # an explainer moved or cast before its first input: traced as the model is
        try:
            traced = trace_export(model, x)
        except (TraceError, TypeError) as error:
            if path == "export":
                raise
            why = getattr(error, "short", None) or f"export failed: {str(error).splitlines()[0][:200]}"
            return runtime(f"{fx_note}; {why}")
        label = "export" + (f" ({fx_note})" if fx_note else "")
        return capture_graph(traced, model, layers, rule, output, label, layouts, x)

    if example is None:
        pending = (f"{fx_note}: " if fx_note else "") + "export (or run time if export fails)"
        return DeferredCapture(export_or_runtime, rule, layers, output, pending, signature)
    return export_or_runtime(example)


def _like_model(x: Tensor, model: nn.Module) -> Tensor:
    """``x`` on the device, and in the floating dtype, of ``model``'s first parameter (as it is without one)."""
    weight = next(model.parameters(), None)
    if weight is None or not x.is_floating_point() or not weight.is_floating_point():
        return x
    return x.to(device=weight.device, dtype=weight.dtype)


def capture_runtime(model: nn.Module, layers: Sequence[str], rule: Rule, output: OutputKey = None,
                    example: Any = None, reason: Optional[str] = None,
                    layouts: Optional[Dict[str, Layout]] = None) -> RuntimeCapture:
    """The run-time capture; with ``example``, ``auto`` is resolved and the call sites listed now. ``reason``
    (why the graph paths failed) is shown in the report as ``runtime (<reason>)``. ``layouts``: the user's,
    by layer name (``convert(layout=, reshape=)``); other captures' layouts are read from their shapes on the
    first explain (:mod:`guided_swap.capture.runtime.layouts`)."""
    capture = RuntimeCapture(model, layers, rule, output, reason, layouts)
    if example is not None:
        capture.check(example)
        capture.observe(example)
    return capture


class DeferredCapture(Capture):
    """A capture whose path is picked on the first input (the export path needs one); then every call goes to
    the capture picked."""

    def __init__(self, choose: Callable[[Any], Capture], rule: Rule, layers: Sequence[str], output: OutputKey,
                 pending: str, signature: Signature = Signature()):
        super().__init__(rule, layers, output)
        self._choose = choose
        self._signature = signature
        self.chosen: Optional[Capture] = None
        self._conversions: List[Callable] = []  # .to(), .double(), ... before the path was picked
        self._pending = ConversionReport(rule.name, (), (), (), capture=f"{pending}, pending: captured from the "
                                         "first input", ordinary_rule=rule.ordinary)
        self._lock = threading.Lock()

    def _picked(self) -> Capture:
        if self.chosen is None:
            raise TraceError("this explainer captures its graph from its first input: call explain(x) or ex(x) once, "
                             "or convert with example_input=")
        return self.chosen

    @property
    def output(self) -> OutputKey:
        """The entry explained: as given until the path is picked, then the picked capture's (which reads a
        ``logits`` entry by default)."""
        chosen = getattr(self, "chosen", None)
        return self._given_output if chosen is None else chosen.output

    @output.setter
    def output(self, key: OutputKey) -> None:
        self._given_output = key

    @property
    def report(self) -> ConversionReport:
        return self._pending if self.chosen is None else self.chosen.report

    @property
    def ready(self) -> bool:
        return self.chosen is not None and self.chosen.ready

    @property
    def signature(self) -> Optional[Signature]:
        """The calls this capture was made for until its path is picked; then the picked capture's."""
        return self._signature if self.chosen is None else self.chosen.signature

    @property
    def graph_module(self) -> Optional[nn.Module]:
        return None if self.chosen is None else self.chosen.graph_module

    @property
    def forward_module(self) -> Optional[nn.Module]:
        return None if self.chosen is None else self.chosen.forward_module

    def pick(self, x: Any) -> Capture:
        """The capture for inputs like ``x``, picked on the first call."""
        if self.chosen is None:
            with self._lock:
                if self.chosen is None:
                    chosen = self._choose(first_rows(x))
                    if self._conversions:  # built on the model's device and dtype: converted as this capture was
                        with own_parameters():
                            for fn in self._conversions:
                                chosen._apply(fn)
                    self._conversions = []
                    self.chosen = chosen
                    self._choose = None  # it holds the model; the capture picked holds its own copy
        return self.chosen

    def prepare(self, x: Any) -> None:
        self.pick(x).prepare(x)

    def check(self, x: Any, check_finite: Optional[bool] = None) -> InputShape:
        return self.pick(x).check(x, check_finite)

    def forward(self, x: Any) -> Any:
        return self.pick(x)(x)

    def run(self, x: Any, score: Score) -> PassResult:
        self.prepare(x)
        return self.chosen.run(x, score)

    def stack(self, x: Any) -> Tensor:
        return self._picked().stack(x)

    def unstack(self, x: Tensor, like: Any) -> Any:
        return self._picked().unstack(x, like)

    def before_save(self) -> None:
        self._picked().before_save()

    def tail(self, layer: str, x: Any):
        self.prepare(x)
        return self.chosen.tail(layer, x)

    def bias_pass(self, x: Any, score: Score, classes=None):
        self.prepare(x)
        return self.chosen.bias_pass(x, score, classes)

    def _apply(self, fn, recurse=True):
        if getattr(self, "chosen", None) is None:  # applied to the capture picked on the first input
            self._conversions.append(fn)
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state.pop("_lock", None)
        state["_choose"] = None
        state["_conversions"] = []
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_conversions", [])
        self._lock = threading.Lock()
