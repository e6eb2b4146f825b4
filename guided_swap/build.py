"""Building an explainer: ``convert`` traces the model once, swaps its rectifiers and adds the captures.

The contract between building and running is :class:`GraphOutputs`: the explain graph returns the model's
output, the activation at each captured layer, and (when rectifiers follow a capture) the plain fork's output
and captures. The plain forward (``ex(x)``) gets a graph of its own that computes only the model's output.

>>> import torch, torchvision, guided_swap as gs
>>> ex = gs.convert(torchvision.models.resnet18().eval(), layer="layer4", example_input=torch.zeros(1, 3, 64, 64))
>>> print(ex.report.summary())
fx capture; rule guided: 17 rectifier call site(s) swapped; layer 'layer4' captures node 'layer4.1.relu_1'
"""
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple, Union

from torch import Tensor, fx, nn

from . import capture as capture_layers
from . import layouts, rewrite
from .export_capture import fx_failure_site, trace_export
from .errors import OutputError, TraceError
from .explainer import Explainer
from .layouts import Layout
from .rules import Rule, get_rule
from .targets import OutputKey
from .trace import Traced, trace

AUTO = "auto"


class GraphOutputs(NamedTuple):
    """What the explain graph returns, by name."""

    model: Any                         # the model's own output
    captures: Tuple[Tensor, ...]       # the activation at each captured layer, in ``layers`` order
    fork_model: Any = None             # the plain fork's copy of the model output (None without a fork)
    fork_captures: Tuple[Tensor, ...] = ()  # the fork's detached leaves at the captures: G is taken there


@dataclass(frozen=True)
class ConversionReport:
    """What the conversion did: the swapped rectifier call sites, what was left alone and why."""

    rule: str
    swapped: Tuple[rewrite.Swap, ...]
    left_alone: Tuple[Tuple[str, str], ...]
    hidden_in_leaves: Tuple[str, ...]
    layers: Dict[str, str] = field(default_factory=dict)
    layer_reasons: Dict[str, str] = field(default_factory=dict)
    made_out_of_place: Tuple[str, ...] = ()
    forked: bool = False
    capture: str = "fx"
    ordinary_rule: bool = False
    layouts: Dict[str, Layout] = field(default_factory=dict)  # how each capture becomes (B, C, *spatial)

    def _layer_names(self):
        return list(dict.fromkeys(list(self.layers) + list(self.layer_reasons)))

    def _layer_line(self, name: str, reason_format: str) -> str:
        node = self.layers.get(name)
        line = f"layer {name!r} captures node {node!r}" if node else f"layer {name!r}"
        layout = getattr(self, "layouts", {}).get(name)  # reports saved before layouts had none
        if layout is not None and layout.kind != "nchw":
            line += f" [{layout.describe()}]"
        reason = self.layer_reasons.get(name)
        return line + (" " + reason_format.format(reason) if reason else "")

    def summary(self) -> str:
        """One line: the capture path, how many rectifiers carry the rule, the layers, what was left alone."""
        if self.ordinary_rule:
            parts = [f"{self.capture} capture; rule {self.rule}: ordinary gradients, nothing swapped"]
        elif "pending" in self.capture:
            parts = [f"{self.capture}; rule {self.rule}"]
        else:
            parts = [f"{self.capture} capture; rule {self.rule}: {len(self.swapped)} rectifier call site(s) swapped"]
        parts += [self._layer_line(name, "({})") for name in self._layer_names()]
        if self.left_alone:
            kinds = sorted({kind for _, kind in self.left_alone})
            parts.append(f"{len(self.left_alone)} other activation(s) left alone ({', '.join(kinds)})")
        return "; ".join(parts)

    def __str__(self) -> str:
        lines = [f"capture: {self.capture}", f"rule: {self.rule}"]
        if self.ordinary_rule:
            lines.append("the rule's gradient is the ordinary one: no rectifier needs swapping")
        else:
            lines.append(f"swapped {len(self.swapped)} rectifier call site(s):")
            lines += [f"  {s.name}  ({s.spelling}{', in place' if s.inplace else ''})" for s in self.swapped]
        if self.left_alone:
            lines.append(f"left alone, ordinary gradient ({len(self.left_alone)}): only rectifiers carry a rule")
            lines += [f"  {name}  ({kind})" for name, kind in self.left_alone]
        if self.hidden_in_leaves:
            lines.append("NOT swapped, ReLUs hidden inside leaf modules: " + ", ".join(self.hidden_in_leaves))
        lines += [self._layer_line(name, " [{}]") for name in self._layer_names()]
        if self.made_out_of_place:
            lines.append("made out of place to keep captures intact: " + ", ".join(self.made_out_of_place))
        if self.forked:
            lines.append("rectifiers follow a captured layer: Grad-CAM takes its gradient from a plain copy of that tail")
        return "\n".join(lines)


@dataclass
class Built:
    """The explain graph and what the report says about its captures."""

    graph_module: fx.GraphModule
    layers: Dict[str, str]
    layer_reasons: Dict[str, str]
    made_out_of_place: Tuple[str, ...]
    forked: bool
    layouts: Dict[str, Layout] = field(default_factory=dict)


class Plan:
    """A traced model with its rectifiers swapped: makes the forward graph, and the explain graph once the
    layers can be resolved (``auto`` needs an input: the user's first one unless an example was given)."""

    def __init__(self, traced: Traced, model: nn.Module, layers: Sequence[str], rule: Rule, output: OutputKey,
                 capture_path: str = "fx", given_layouts: Optional[Dict[str, Layout]] = None):
        self.traced, self.layers, self.rule, self.output = traced, list(layers), rule, output
        self.capture_path = capture_path
        self.given_layouts = dict(given_layouts or {})
        self.layouts_need_input = False  # a capture's layout is read from the first input (see layouts.decide)
        self.model_name = type(model).__name__
        self._model_modules = set(dict(model.named_modules()))
        gm = traced.module
        # Named layers resolve now (a wrong name is an error at convert, not at the first explain).
        self.named = {name: capture_layers.resolve(name, traced, model) for name in layers if name != AUTO}
        self.input_spec = capture_layers.input_spec(gm)  # read from the graph before the rectifiers change it
        self.swaps, replaced = rewrite.swap_rectifiers(gm, rule)
        self.named = {name: replaced.get(node, node) for name, node in self.named.items()}
        self.module_outputs = {name: [replaced.get(node, node) for node in nodes]
                               for name, nodes in traced.module_outputs.items()}
        self.swapped_nodes = list(replaced.values())
        self.left_alone, self.hidden = rewrite.unswapped_activations(gm)
        _check_output_key(_output_arg(gm.graph), output)

    @property
    def needs_example(self) -> bool:
        return AUTO in self.layers or self.layouts_need_input

    def forward_graph(self) -> fx.GraphModule:
        """The swapped graph computing only the model's output (no captures, no fork)."""
        graph, _ = _copy_graph(self.traced.module.graph)
        return fx.GraphModule(self.traced.module, graph, class_name=self.traced.module.__class__.__name__)

    def build(self, example: Optional[Tensor]) -> Built:
        """The explain graph: a copy of the swapped graph with captures, protection and the plain fork."""
        graph, env = _copy_graph(self.traced.module.graph)
        gm = fx.GraphModule(self.traced.module, graph, class_name=self.traced.module.__class__.__name__)
        nodes, reasons = {}, {}
        for name in self.layers:
            if name == AUTO:
                module_outputs = {module: [env[n] for n in outs if n in env]
                                  for module, outs in self.module_outputs.items()}
                chosen = layouts.auto_layer(gm, example)  # transformers; None for a CNN
                nodes[name], reasons[name] = chosen or capture_layers.auto_layer(gm, example, self.output,
                                                                                 module_outputs)
            else:
                nodes[name] = env[self.named[name]]
        captured = [nodes[name] for name in self.layers]
        read = layouts.decide(gm, nodes, example, self.given_layouts, self.input_spec)
        made_out_of_place = rewrite.protect(gm, captured)
        output_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        output_arg = output_node.args[0]
        forked = rewrite.needs_fork(captured, [env[n] for n in self.swapped_nodes])
        fork_output, fork_nodes = rewrite.fork_plain(gm, captured, output_arg) if forked else (None, ())
        output_node.args = (GraphOutputs(output_arg, tuple(captured), fork_output, tuple(fork_nodes)),)
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
        return Built(gm, {name: rewrite.qualname(node) for name, node in nodes.items()}, reasons,
                     tuple(made_out_of_place), forked, read)

    def report(self, built: Optional[Built]) -> ConversionReport:
        report = ConversionReport(self.rule.name, tuple(self.swaps), tuple(self.left_alone), tuple(self.hidden),
                                  capture=self.capture_path, ordinary_rule=self.rule.ordinary)
        if built is None:
            pending = {name: "resolved at the first explain() from its input" for name in self.layers if name == AUTO}
            return replace(report, layers={n: rewrite.qualname(node) for n, node in self.named.items()},
                           layer_reasons=pending)
        return replace(report, layers=built.layers, layer_reasons=built.layer_reasons,
                       made_out_of_place=built.made_out_of_place, forked=built.forked, layouts=built.layouts)


CAPTURE_PATHS = ("auto", "fx", "export", "runtime")


def warn_if_training(model: nn.Module, stacklevel: int = 2) -> None:
    """Say that a model in training mode is explained as deployed (every capture path does so)."""
    if model.training:
        warnings.warn("the model is in training mode; the explainer explains it as deployed (eval mode: BatchNorm "
                      "running statistics, no dropout) and never updates its buffers. Call model.eval() before "
                      "convert() to silence this", stacklevel=stacklevel)


def convert(model: nn.Module, layer: Union[None, str, Sequence[str]] = AUTO, rule: Union[str, Rule] = "guided", *,
            output: OutputKey = None, example_input: Optional[Tensor] = None,
            tracer_kwargs: Optional[Dict[str, Any]] = None, capture: str = "auto", layout: layouts.LayoutSpec = None,
            reshape: Optional[Any] = None) -> Explainer:
    """Convert ``model`` once into an :class:`~guided_swap.Explainer`. The model itself is never changed.

    ``layer``: a module name (``"layer4"``), a graph node name (``"layer4.1.relu_1"``), a list of names,
    ``"auto"`` (the last spatial feature map before the global pooling; resolved on ``example_input``, or on
    the first input given to ``explain`` when there is none) or None.
    ``rule``: a registered rule name (``guided_swap.rules()``: ``"guided"``, ``"deconvnet"``, ``"gradient"``,
    and any the user registered) or a :class:`~guided_swap.Rule` instance.
    ``output``: which entry of a tuple/namedtuple/dict output is explained.
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
    dict by layer name (docs/transformers.md). Graph capture paths only.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() takes a torch.nn.Module, got {type(model).__name__}")
    if capture not in CAPTURE_PATHS:
        raise ValueError(f"capture={capture!r} is not one of {CAPTURE_PATHS}")
    rule = get_rule(rule)
    warn_if_training(model, stacklevel=3)
    names = capture_layers.layer_list(layer)
    given = layouts.overrides(layout, reshape, names)

    def make_plan(traced: Traced, path: str) -> Plan:
        plan = Plan(traced, model, names, rule, output, path, given)
        if plan.hidden:
            warnings.warn(f"ReLUs inside leaf modules cannot be swapped and keep their ordinary gradient: "
                          f"{plan.hidden}", stacklevel=3)
        return plan

    def runtime(example: Any, reason: Optional[str]) -> Explainer:
        if given:
            warnings.warn("layout=/reshape= apply to graph captures (fx, export); the run-time capture takes every "
                          "captured layer as a channels-first map", stacklevel=4)
        return _runtime(model, names, rule, output, example, reason)

    fx_error = None
    if capture in ("auto", "fx"):
        try:
            plan = make_plan(trace(model, tracer_kwargs), "fx")
        except TraceError as error:
            if capture == "fx":
                raise
            fx_error = error
        else:
            return Explainer(plan, _build_now(plan, example_input))
    if capture == "runtime":
        return runtime(example_input, None)
    fx_note = None if fx_error is None else f"fx failed at {fx_failure_site(fx_error)}"

    def export_or_runtime(example: Any) -> Union[Plan, Explainer]:
        """The export capture for a tensor input; the run-time capture when export cannot take the model."""
        if not isinstance(example, Tensor) and capture == "auto":
            return runtime(None, f"{fx_note}; the input is not a tensor")
        try:
            return make_plan(trace_export(model, example), "export" + (f" ({fx_note})" if fx_note else ""))
        except (TraceError, TypeError) as export_error:
            if capture == "export":
                raise
            reason = f"{fx_note}; export failed: {str(export_error).splitlines()[0][:200]}"
            return runtime(None, reason)

    if example_input is None:
        path = (f"{fx_note}: " if fx_note else "") + "export (or run time if export fails)"
        return Explainer.deferred(export_or_runtime, rule, names, output, path)
    result = export_or_runtime(example_input)
    return result if isinstance(result, Explainer) else Explainer(result, result.build(example_input))


def _build_now(plan: Plan, example: Optional[Tensor]) -> Optional[Built]:
    """The explain graph now, or None when it waits for the first input (auto, or a layout read from a run)."""
    if plan.needs_example and example is None:
        return None
    try:
        return plan.build(example)
    except layouts.NeedsInput:
        plan.layouts_need_input = True
        return None


def _runtime(model: nn.Module, names, rule: Rule, output: OutputKey, example: Any, reason: Optional[str]):
    from .runtime_explainer import build_runtime  # it builds on this module's report classes

    return build_runtime(model, names, rule, output, example, reason)


def _copy_graph(graph: fx.Graph) -> Tuple[fx.Graph, Dict[fx.Node, fx.Node]]:
    """A copy of ``graph`` (same names and meta) and the map from old nodes to new ones."""
    new = fx.Graph(tracer_cls=getattr(graph, "_tracer_cls", None))
    env: Dict[fx.Node, fx.Node] = {}
    output = new.graph_copy(graph, env)
    new.output(output)
    return new, env


def _output_arg(graph: fx.Graph) -> Any:
    return next(n for n in reversed(graph.nodes) if n.op == "output").args[0]


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
        raise OutputError(f"the model returns several outputs {entries}; convert with output=ENTRY to say which one "
                          "is explained")
    if key is not None and (entries is None or key not in entries):
        raise OutputError(f"output={key!r} is not an entry of the model's output (entries: {entries}); "
                          "leave output=None for a model that returns one tensor")
