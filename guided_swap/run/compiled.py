"""``Explainer.compile``: the whole explain pass (forward, the rule's backward, the CAM maths) as one compiled graph.

One function runs the explainer's graph, scores the target, takes ``torch.autograd.grad`` and makes the CAMs;
``torch.compile`` traces it whole (``torch._dynamo.config.trace_autograd_ops``, torch >= 2.11), so inductor
fuses each rule's backward into the surrounding kernels and, with ``mode="reduce-overhead"`` on CUDA, one CUDA
graph replays the whole pass. On an older torch the same function still runs, compiled in pieces around the
``autograd.grad`` call (a warning says so).

Shapes. Batch size 1 gets a graph of its own (torch specialises size-1 dimensions); every batch size >= 2
shares one graph with a dynamic batch dimension, so a new batch size does not recompile (with CUDA graphs it
records one new graph per batch size, which takes milliseconds). A new image size, dtype or device, and each
kind of target (argmax, class indices, :class:`~guided_swap.Channel`, a callable), compile once more. Pass
``dynamic=`` yourself to take over that choice.

Targets are checked on the host before the pass, without a device synchronisation, when they are host data
(None, an int, a list, a CPU tensor); a CUDA tensor of classes is checked after the pass, at the cost of one
synchronisation. Class indices and channels are tensors inside the graph, so new values never recompile.

Several captured layers are one pass, as in eager mode. Grad-CAM is computed inside the pass for channels-first
and channels-last captures; a token or ``reshape=`` capture's CAMs, and every other registered CAM
(``e.cams[name]``), are computed on first access, eagerly, from the compiled pass's activations and gradients.
What runs eagerly, with a warning that says why (once): ``explain(smooth=N)`` (SmoothGrad's chunks), an explainer
of the run-time capture path (``capture="runtime"``, or the one a deferred capture fell back to: its Python
hooks on every call cannot be traced), and a kind of target whose pass torch.compile could not compile.

>>> import torch, guided_swap as gs
>>> from torch import nn
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
>>> ex = gs.convert(model.eval(), layer="1")
>>> eager = ex.explain(torch.randn(2, 3, 8, 8), target=[0, 2])
>>> ex.compile(backend="eager")  # "inductor" (the default) generates kernels; "eager" only traces: fast here
>>> e = ex.explain(torch.randn(2, 3, 8, 8), target=[0, 2])
>>> e.cam.shape, ex.compiled
(torch.Size([2, 8, 8]), True)
"""
import re
import types
import warnings
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..capture.base import Capture
from ..capture.graph import export_trace
from ..core import cam as cam_maths
from ..core.errors import GuidedSwapError
from ..core.maps import Explanation, PassResult, detach_tree
from ..core.targets import Score
from .assemble import explanation_of

_substitute_in_graph = getattr(torch.compiler, "substitute_in_graph", None) or \
    torch._dynamo.decorators.substitute_in_graph

#: torch >= 2.11 traces ``torch.autograd.grad`` into the graph; older versions break the graph there.
TRACES_AUTOGRAD = hasattr(torch._dynamo.config, "trace_autograd_ops")
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
NO_GRAPH = ("this explainer captures the model at run time (a Python hook on every call), which torch.compile "
            "cannot trace; explain runs eagerly")


def uses_cudagraphs(options: Dict[str, Any]) -> bool:
    """Whether ``torch.compile(**options)`` records CUDA graphs (on a CUDA device)."""
    inductor = options.get("options") or {}
    if "triton.cudagraphs" in inductor:
        return bool(inductor["triton.cudagraphs"])
    return options.get("mode") in _CUDAGRAPH_MODES


def compile_pass(fn: Callable, options: Dict[str, Any]) -> Callable:
    """``torch.compile(fn, **options)``, with a clear error for options torch does not take."""
    try:
        return torch.compile(fn, **options)
    except TypeError as error:
        raise TypeError(f"compile() passes its options to torch.compile, which refused them: {error}") from None
    except RuntimeError as error:  # e.g. both mode= and options=
        raise ValueError(f"torch.compile refused these options {options}: {error}") from None


def mark_batch_dynamic(tensors: Sequence[Optional[Tensor]]) -> None:
    """Mark dimension 0 dynamic on each tensor of batch >= 2 (the rule in this module's docstring)."""
    for tensor in tensors:
        if isinstance(tensor, Tensor) and tensor.dim() and tensor.shape[0] >= 2:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)


def run_traced(fn: Callable, *args):
    """Call a compiled pass with ``torch.autograd.grad`` traced into the graph where torch can."""
    if not TRACES_AUTOGRAD:
        return fn(*args)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        return fn(*args)


def detached_copy(tree: Any) -> Any:
    """Every tensor of ``tree`` copied: outputs of a CUDA graph live in memory its next replay overwrites."""
    return torch.utils._pytree.tree_map(lambda v: v.detach().clone() if isinstance(v, Tensor) else v, tree)


class CompiledExplain:
    """The compiled explain pass of one explainer, and its fallback to eager."""

    def __init__(self, options: Dict[str, Any]):
        self.options = dict(options)
        self.dynamic_batch = "dynamic" not in self.options
        self.cudagraphs = uses_cudagraphs(self.options)
        compile_pass(_explain_pass, self.options)  # refuse bad options now, not at the first explain
        self.functions: Dict[str, Callable] = {}
        self.eager_kinds: Dict[str, str] = {}  # kind of target -> why it runs eagerly
        self._warned_breaks = False
        self._last_compiled_callable: Any = None
        self._forward: Optional[Callable] = None
        self._warned_eager: set = set()

    def function(self, kind: str) -> Callable:
        """The compiled pass for one kind of target. Each kind gets a code object of its own, so each has its
        own torch.compile cache and recompile limit (torch keys both on the code object)."""
        if kind not in self.functions:
            self.functions[kind] = compile_pass(fresh_function(_explain_pass, f"explain_{kind}"), self.options)
        return self.functions[kind]

    def explain(self, capture: Capture, x: Any, score: Score, interpolate: str) -> Optional[Explanation]:
        """The explanation, or None when this pass runs eagerly (a warning says why, once): a capture without
        a graph, or a kind of target whose pass torch.compile could not compile."""
        if capture.graph_module is None:
            self.warn_eager("compile()", NO_GRAPH)
            return None
        kind = score.kind
        if kind in self.eager_kinds:
            return None
        x = x.detach()  # a new tensor object: the marks below stay off the user's tensor
        argument = score.traceable(x.device, x.shape[0])
        if self.dynamic_batch:
            mark_batch_dynamic([x, argument.target if kind == "classes" else None])
        breaks, graphs = _graph_breaks(), _graphs_compiled()
        try:
            result, cams = run_traced(self.function(kind), capture, x, argument, interpolate)
        except torch._dynamo.exc.TorchDynamoException as error:
            cause = error.__cause__ or getattr(error, "inner_exception", None)
            if isinstance(cause, GuidedSwapError):
                raise cause from None  # the user's error, raised while tracing
            self.eager_kinds[kind] = _reason(error)
            warnings.warn(f"torch.compile could not compile this explainer's pass for {kind} targets "
                          f"({self.eager_kinds[kind]}); explain runs eagerly for them from now on", stacklevel=3)
            return None
        self._warn_on_graph_breaks(breaks)
        if kind == "callable" and _graphs_compiled() > graphs:
            self._warn_on_new_callable(score.fn)
        if self.cudagraphs and x.is_cuda:
            result, cams = detached_copy((result, cams))
        argument.check_after(result.outputs, dict(zip(capture.layers, result.captures)))
        explanation = explanation_of(capture, result, x.shape[2:], interpolate)
        for maps, computed in zip(explanation.layers.values(), cams):
            if computed is not None:
                _keep_gradcam(maps, *computed)
        return explanation

    def forward(self, module: Callable, x: Tensor) -> Any:
        """``module(x)`` compiled, with the batch dimension dynamic by this module's rule."""
        if self._forward is None:
            self._forward = compile_pass(fresh_function(_call, "explainer_forward"), self.options)
        if self.dynamic_batch and isinstance(x, Tensor) and x.dim() and x.shape[0] >= 2:
            x = x.view(x.shape)  # an alias that autograd follows back to x: the mark stays off the user's tensor
            mark_batch_dynamic([x])
        return self._forward(module, x)

    def warn_eager(self, what: str, reason: str) -> None:
        """Warn once per ``what`` that it runs eagerly, and why."""
        if what not in self._warned_eager:
            self._warned_eager.add(what)
            warnings.warn(f"compiled explainer: {what} runs eagerly ({reason})", stacklevel=4)

    def _warn_on_graph_breaks(self, before: int) -> None:
        new = _graph_breaks() - before
        if new and not self._warned_breaks:
            self._warned_breaks = True
            reasons = sorted({reason.splitlines()[0] for reason in torch._dynamo.utils.counters["graph_break"]})
            hint = "" if TRACES_AUTOGRAD else " (this torch cannot trace torch.autograd.grad: torch >= 2.11 can)"
            warnings.warn(f"the compiled explain pass has {new} graph break(s){hint}: those parts run eagerly, slower "
                          f"but with the same results. Reasons: {reasons[:5]}", stacklevel=4)


    def _warn_on_new_callable(self, target: Callable) -> None:
        previous, self._last_compiled_callable = self._last_compiled_callable, target
        if previous is not None and previous is not target:
            warnings.warn("a new callable target compiled the pass again: torch.compile guards on the function and "
                          "on the values it closes over. Reuse one function (lambdas written once in the code are "
                          f"fine); after {torch._dynamo.config.recompile_limit} compiles torch runs it eagerly",
                          stacklevel=4)


# --- the export path's shape check, traceable -----------------------------------------------------------
# A graph captured with torch.export starts with check_input_shape, which evaluates torch.export's guard
# strings with eval(): torch.compile cannot trace that, and the graph break splits the explain pass. Traced,
# the check below takes its place: "x.size()[i] == N" guards (the usual ones: sizes fixed at capture) become
# comparisons torch.compile resolves while tracing; any other guard, or a misfit, runs the original eagerly
# (which raises the usual InputError).

_SIZE_GUARD = re.compile(r"x\.size\(\)\[([0-9]+)\] == ([0-9]+)")


@torch._dynamo.assume_constant_result
def _fixed_sizes(guards: Tuple[str, ...]) -> Optional[Tuple[Tuple[int, int], ...]]:
    matches = [_SIZE_GUARD.fullmatch(guard) for guard in guards]
    return None if not all(matches) else tuple((int(m[1]), int(m[2])) for m in matches)


_check_eagerly = torch._dynamo.disable(export_trace.check_input_shape)


@_substitute_in_graph(export_trace.check_input_shape)
def _traceable_check_input_shape(x: Tensor, guards: Tuple[str, ...] = (), example: Tuple[int, ...] = (),
                                 dynamic_size: bool = False) -> None:
    sizes = _fixed_sizes(tuple(guards))
    fits = sizes is not None
    for dim, size in sizes or ():
        fits = fits and x.dim() > dim and x.shape[dim] == size
    if not fits:
        _check_eagerly(x, guards, example, dynamic_size)


def _call(module: Callable, x: Tensor) -> Any:
    return module(x)


def _reason(error: BaseException) -> str:
    """One line: the error and, when it wraps one, the error underneath."""
    lines = [f"{type(error).__name__}: {next((l for l in str(error).splitlines() if l.strip()), '')}"]
    cause = error.__cause__ or getattr(error, "inner_exception", None)
    if cause is not None and cause is not error:
        lines.append(f"{type(cause).__name__}: {next((l for l in str(cause).splitlines() if l.strip()), '')}")
    return " <- ".join(line[:300] for line in lines)


def fresh_function(fn: Callable, name: str) -> Callable:
    """A copy of ``fn`` with a code object of its own (torch.compile caches compiled code per code object)."""
    code = fn.__code__.replace(co_name=name, co_qualname=name) if hasattr(fn.__code__, "co_qualname") \
        else fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _graph_breaks() -> int:
    return sum(torch._dynamo.utils.counters["graph_break"].values())


# --- the pass that is compiled --------------------------------------------------------------------------

def _explain_pass(capture: Capture, x: Tensor, score: Score, interpolate: str):
    """Forward, score, one ``autograd.grad``, and Grad-CAM at every captured layer: what gets compiled."""
    result = capture.run(x, score)
    layouts = capture.layouts
    cams = tuple(_cams(a, g, x.shape[2:], interpolate, layouts.get(name), name)
                 for name, a, g in zip(capture.layers, result.captures, result.layer_grads))
    return PassResult(*(detach_tree(v) for v in result)), cams


#: Layouts whose Grad-CAM the compiled pass computes (a permutation at most). A token or reshape= layout's
#: CAMs are computed on first access, eagerly, like every other registered CAM.
_IN_PASS_LAYOUTS = ("nchw", "nhwc")


def _cams(activation: Any, grad: Tensor, size, interpolate: str, layout: Any, name: str
          ) -> Optional[Tuple[Tensor, Tensor]]:
    if not isinstance(activation, Tensor) or activation.dim() < 3:
        return None  # LayerMaps raises the usual error when such a map is asked for
    if layout is not None:
        if layout.kind not in _IN_PASS_LAYOUTS:
            return None
        activation, grad = layout.to_channels_first(activation, size, name), layout.to_channels_first(grad, size, name)
    raw = cam_maths.gradcam(activation.detach(), grad)
    return raw, cam_maths.upsample(raw, size, interpolate)


def _keep_gradcam(maps, raw: Tensor, resized: Tensor) -> None:
    """Hand the pass's Grad-CAM to the layer's maps, so ``cam``/``cams["gradcam"]`` are not computed again."""
    maps.cams_raw.provide("gradcam", raw)
    maps.cams.provide("gradcam", resized)
