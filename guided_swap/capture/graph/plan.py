"""The graph capture's two graphs: the swapped forward, and the explain graph with captures and the plain fork.

:class:`SwappedGraph` holds a traced model (fx or torch.export's aten graph) with every rectifier swapped for
the rule's op. From it come the forward graph (``ex(x)``: the model's output only) and, once the layers are
resolved, the explain graph (:class:`ExplainGraph`), which returns :class:`GraphOutputs`: the model's output,
the activation at each captured layer, and (when rectifiers follow a capture) the plain fork's output and
captures.
"""
from dataclasses import dataclass, field, replace
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

from torch import Tensor, fx, nn

from ...core.errors import OutputError
from ...core.layout import Layout
from ...core.report import ConversionReport
from ...core.rules import Rule
from ...core.targets import OutputKey, default_entry
from ..base import AUTO
from . import layers as layer_nodes
from . import layouts, rewrite
from .trace import Traced


class GraphOutputs(NamedTuple):
    """What the explain graph returns, by name."""

    model: Any                         # the model's own output
    captures: Tuple[Tensor, ...]       # the activation at each captured layer, in ``layers`` order
    fork_model: Any = None             # the plain fork's copy of the model output (None without a fork)
    fork_captures: Tuple[Tensor, ...] = ()  # the fork's detached leaves at the captures: G is taken there


@dataclass
class ExplainGraph:
    """The explain graph, and what the report says about its captures."""

    graph_module: fx.GraphModule
    layers: Dict[str, str]
    layer_reasons: Dict[str, str]
    made_out_of_place: Tuple[str, ...]
    forked: bool
    layouts: Dict[str, Layout] = field(default_factory=dict)


class SwappedGraph:
    """A traced model with its rectifiers swapped: makes the forward graph, and the explain graph once the
    layers can be resolved (``auto`` needs an input: the user's first one unless an example was given).

    >>> import torch, torchvision
    >>> from guided_swap.core.rules import get_rule
    >>> from guided_swap.capture.graph.trace import trace
    >>> model = torchvision.models.resnet18().eval()
    >>> swapped = SwappedGraph(trace(model), model, ["layer4"], get_rule("guided"), None)
    >>> built = swapped.build(None)
    >>> out = GraphOutputs(*built.graph_module(torch.zeros(1, 3, 64, 64)))
    >>> len(swapped.swaps), tuple(out.captures[0].shape), built.forked
    (17, (1, 512, 2, 2), False)
    """

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
        self.named = {name: layer_nodes.resolve(name, traced, model) for name in layers if name != AUTO}
        reasons = {name: layer_nodes.first_call_reason(name, traced) for name in self.named}
        self.named_reasons = {name: reason for name, reason in reasons.items() if reason}
        self.input_spec = layer_nodes.input_spec(gm)  # read from the graph before the rectifiers change it
        self.swaps, replaced = rewrite.swap_rectifiers(gm, rule)
        self.named = {name: replaced.get(node, node) for name, node in self.named.items()}
        self.module_outputs = {name: [replaced.get(node, node) for node in nodes]
                               for name, nodes in traced.module_outputs.items()}
        self.swapped_nodes = list(replaced.values())
        self.left_alone, self.hidden = rewrite.unswapped_activations(gm)
        self.output, self.output_by_default = explained_entry(_output_arg(gm.graph), output)

    @property
    def needs_example(self) -> bool:
        return AUTO in self.layers or self.layouts_need_input

    def forward_graph(self) -> fx.GraphModule:
        """The swapped graph computing only the model's output (no captures, no fork)."""
        graph, _ = _copy_graph(self.traced.module.graph)
        return fx.GraphModule(self.traced.module, graph, class_name=self.traced.module.__class__.__name__)

    def build(self, example: Optional[Tensor]) -> ExplainGraph:
        """The explain graph: a copy of the swapped graph with captures, protection and the plain fork."""
        graph, env = _copy_graph(self.traced.module.graph)
        gm = fx.GraphModule(self.traced.module, graph, class_name=self.traced.module.__class__.__name__)
        nodes, reasons = {}, {}
        for name in self.layers:
            if name == AUTO:
                module_outputs = {module: [env[n] for n in outs if n in env]
                                  for module, outs in self.module_outputs.items()}
                nodes[name], reasons[name] = layer_nodes.auto_layer(gm, example, self.output, module_outputs)
            else:
                nodes[name] = env[self.named[name]]
                if name in self.named_reasons:
                    reasons[name] = self.named_reasons[name]
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
        return ExplainGraph(gm, {name: rewrite.qualname(node) for name, node in nodes.items()}, reasons,
                     tuple(made_out_of_place), forked, read)

    def report(self, built: Optional[ExplainGraph]) -> ConversionReport:
        report = ConversionReport(self.rule.name, tuple(self.swaps), tuple(self.left_alone), tuple(self.hidden),
                                  capture=self.capture_path, ordinary_rule=self.rule.ordinary, output=self.output,
                                  output_by_default=self.output_by_default,
                                  fixed_arguments=tuple(f"{k}={v!r}" for k, v in
                                                        self.traced.fixed_arguments.items()))
        if built is None:
            pending = {name: "resolved at the first explain() from its input" for name in self.layers if name == AUTO}
            pending.update(self.named_reasons)
            return replace(report, layers={n: rewrite.qualname(node) for n, node in self.named.items()},
                           layer_reasons=pending)
        return replace(report, layers=built.layers, layer_reasons=built.layer_reasons,
                       made_out_of_place=built.made_out_of_place, forked=built.forked, layouts=built.layouts)


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
    if isinstance(output_arg, dict):  # fx and the export path record a ModelOutput (a dict) as a plain dict
        return list(output_arg.keys())
    if hasattr(output_arg, "_fields"):
        return list(output_arg._fields) + list(range(len(output_arg)))
    return list(range(len(output_arg)))


def _entry_names(output_arg: Any) -> Optional[list]:
    """The names of the entries of the graph's output (dict keys, namedtuple fields), or None."""
    if isinstance(output_arg, dict):
        return list(output_arg)
    target = output_arg.target if isinstance(output_arg, fx.Node) and output_arg.op == "call_function" else output_arg
    fields = getattr(target, "_fields", None)
    return list(fields) if isinstance(fields, tuple) else None


def explained_entry(output_arg: Any, key: OutputKey) -> Tuple[OutputKey, bool]:
    """The entry of the graph's output that is explained, and whether it was read by default: ``key`` when
    given (checked), else the ``logits`` entry, or the only entry, of an output that names its entries
    (:func:`~guided_swap.core.targets.default_entry`), else None for a single tensor."""
    entries = _output_entries(output_arg)
    named = default_entry(_entry_names(output_arg))
    if key is None and named is not None:
        return named, True
    if key is None and entries is not None:
        raise OutputError(f"the model returns several outputs {entries}; convert with output=ENTRY to say which one "
                          "is explained")
    if key is not None and (entries is None or key not in entries):
        raise OutputError(f"output={key!r} is not an entry of the model's output (entries: {entries}); "
                          "leave output=None for a model that returns one tensor")
    return key, False
