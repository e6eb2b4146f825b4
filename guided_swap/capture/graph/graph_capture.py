"""The graph capture: the model as a graph (torch.fx, or torch.export's aten graph) with its rectifiers swapped.

:func:`capture_graph` makes one from a traced model; its explain graph is built at once, or on the first input
when ``layer="auto"`` or a layout must be read from a run. One ``autograd.grad`` through that graph gives the
rule's input gradient and, through the plain fork where rectifiers follow a capture, the ordinary gradient at
each captured layer.

>>> import torch, torchvision, guided_swap as gs
>>> from guided_swap.capture.graph.trace import trace
>>> model = torchvision.models.resnet18().eval()
>>> capture = capture_graph(trace(model), model, ["layer4"], gs.get_rule("guided"), None)
>>> capture.report.summary()
"fx capture; rule guided: 17 rectifier call site(s) swapped; layer 'layer4' captures node 'layer4.1.relu_1'"
"""
import threading
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, fx

from ...core.errors import InputError, LayerError
from ...core.layout import Layout
from ...core.maps import PassResult
from ...core.pass_cams import BiasPass
from ...core.report import ConversionReport
from ...core.rules import Rule
from ...core.targets import OutputKey, Score
from ...core.inputs import Inputs, Signature, first_rows, input_tensors, model_args
from ..base import Capture, InputShape, check_autograd, check_inputs, check_tensor, gradients, input_gradient
from . import bias_graph, layouts
from .axes import upstream
from .cut import Tail, tail_module
from .plan import ExplainGraph, GraphOutputs, SwappedGraph
from .trace import Traced


class GraphCapture(Capture):
    """A model captured as a graph: a forward graph for ``ex(x)`` and an explain graph for every map."""

    def __init__(self, swapped: SwappedGraph):
        super().__init__(swapped.rule, swapped.layers, swapped.output)
        self.input_spec = swapped.input_spec
        self.call_signature = swapped.traced.signature
        self.forward_graph: fx.GraphModule = swapped.forward_graph()
        self.explain_module: Optional[fx.GraphModule] = None
        self.forked = False
        self._swapped: Optional[SwappedGraph] = swapped  # until the explain graph is built
        self._report = swapped.report(None)
        self._lock = threading.Lock()

    @classmethod
    def restored(cls, rule: Rule, layers: Sequence[str], output: OutputKey, input_spec: Optional[tuple],
                 forward_module: fx.GraphModule, explain_module: fx.GraphModule, forked: bool,
                 report: ConversionReport, signature: Signature = Signature()) -> "GraphCapture":
        """A built capture from its parts (those of a saved file): what building leaves, with no traced model."""
        capture = cls.__new__(cls)
        Capture.__init__(capture, rule, layers, output)
        capture.input_spec, capture.call_signature = input_spec, signature
        capture.forward_graph, capture.explain_module = forward_module, explain_module
        capture.forked, capture._swapped, capture._report = forked, None, report
        capture._lock = threading.Lock()
        capture.train(False)
        return capture

    # --- building on the first input ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._swapped is None

    def build_now(self, example: Optional[Tensor]) -> None:
        """Build the explain graph, unless it waits for an input (auto, or a layout read from a run)."""
        if self._swapped.needs_example and example is None:
            return
        try:
            self._install(self._swapped.build(example))
        except layouts.NeedsInput:
            self._swapped.layouts_need_input = True

    def prepare(self, x: Any) -> None:
        if self._swapped is None:
            return
        if not isinstance(x, (Tensor, Inputs)):
            raise LayerError("this explainer is resolved from an input: call explain(x) once, or convert with "
                             "example_input=")
        with self._lock:
            if self._swapped is not None:
                self._install(self._swapped.build(first_rows(x)))

    def _install(self, built: ExplainGraph) -> None:
        self.explain_module = built.graph_module
        self.forked = built.forked
        self._report = self._swapped.report(built)
        self._swapped = None
        self.train(False)

    # --- the contract ------------------------------------------------------------------------------------

    @property
    def report(self) -> ConversionReport:
        return self._report

    @property
    def graph_module(self) -> Optional[fx.GraphModule]:
        return self.explain_module

    @property
    def signature(self) -> Signature:
        return self.call_signature

    @property
    def layer_inputs(self) -> Dict[str, Tuple[int, ...]]:
        """Which explained inputs (graph placeholders, in order) each captured layer is computed from."""
        if self.explain_module is None:
            return {}
        cached = self.__dict__.get("_layer_inputs")
        if cached is not None and cached[0] is self.explain_module:
            return dict(cached[1])
        graph = self.explain_module.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"][:self.call_signature.inputs]
        captured = GraphOutputs(*next(n for n in reversed(graph.nodes) if n.op == "output").args[0]).captures
        found = {name: tuple(i for i, p in enumerate(placeholders) if p in upstream([node]))
                 for name, node in zip(self.layers, captured)}
        self.__dict__["_layer_inputs"] = (self.explain_module, found)
        return dict(found)

    @property
    def forward_module(self) -> fx.GraphModule:
        return self.forward_graph

    def check(self, x: Any, check_finite: Optional[bool] = None) -> InputShape:
        check_autograd()
        if isinstance(x, Inputs):
            return check_inputs(x, self.forward_graph, check_finite)
        if not isinstance(x, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if self.input_spec is not None:
            rank, channels = self.input_spec
            if x.dim() != rank:
                raise InputError(f"input has {x.dim()} dimensions {tuple(x.shape)}; the model expects {rank} "
                                 f"(batch, {channels} channels, spatial...): add a batch dimension with x.unsqueeze(0)")
            if x.shape[1] != channels:
                raise InputError(f"input has {x.shape[1]} channels; the model's first convolution takes {channels}")
        check_tensor(x, self.forward_graph, check_finite)
        return InputShape(x.shape[0], tuple(x.shape[2:]))

    def forward(self, x: Any) -> Any:
        return self.forward_graph(*model_args(x))

    def run(self, x: Any, score: Score) -> PassResult:
        """Score the main graph, then the plain fork with the classes the main graph chose; one
        ``autograd.grad`` over both gives the rule's input gradient and the ordinary layer gradients."""
        self.prepare(x)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in input_tensors(x)]
            extra = x.extra if isinstance(x, Inputs) else ()
            out = GraphOutputs(*self.explain_module(*leaves, *extra))
            batch = leaves[0].shape[0]
            main, classes = score(out.model, dict(zip(self.layers, out.captures)), batch)
            scores, grad_at = [main.sum()], list(out.captures)
            if self.forked:
                plain, _ = score(out.fork_model, dict(zip(self.layers, out.fork_captures)), batch, classes)
                scores.append(plain.sum())
                grad_at = list(out.fork_captures)
            grads = gradients(scores, leaves + grad_at)
        inputs = len(leaves)
        return PassResult(out.model, tuple(out.captures), main, classes, input_gradient(x, grads[:inputs]),
                          tuple(grads[inputs:]))

    def tail(self, layer: str, x: Tensor) -> Tail:
        """The model from captured ``layer`` on for the batch ``x``, cut from the explain graph (:mod:`.cut`)."""
        self.prepare(x)
        return tail_module(self.explain_module, self.layers.index(layer), x)

    def bias_pass(self, x: Tensor, score: Score, classes: Optional[Tensor] = None) -> BiasPass:
        """FullGrad's pass through a copy of the explain graph with ordinary rectifiers (:mod:`.bias_graph`)."""
        self.prepare(x)
        return bias_graph.bias_pass(bias_graph.bias_module(self.explain_module), x, score, classes)

    # --- module behaviour --------------------------------------------------------------------------------

    def __getstate__(self):
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state.pop("_lock", None)
        state.pop("_layer_inputs", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._lock = threading.Lock()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", forked={self.forked}"


def capture_graph(traced: Traced, model, layers: Sequence[str], rule: Rule, output: OutputKey,
                  path: str = "fx", given_layouts: Optional[Dict[str, Layout]] = None,
                  example: Optional[Tensor] = None) -> GraphCapture:
    """The graph capture of a traced model; its explain graph is built on ``example`` (or on the first input
    when ``auto`` or a layout needs one). ``path`` is how the report names the capture."""
    swapped = SwappedGraph(traced, model, layers, rule, output, path, given_layouts)
    if swapped.hidden:
        warnings.warn(f"ReLUs inside leaf modules cannot be swapped and keep their ordinary gradient: "
                      f"{swapped.hidden}", stacklevel=4)
    capture = GraphCapture(swapped)
    capture.build_now(example)
    return capture
