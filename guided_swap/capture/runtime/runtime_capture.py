"""The run-time capture, for models that neither torch.fx nor torch.export can take (detectors, data-dependent
post-processing).

It runs the library's own mirror of the model under :class:`~guided_swap.capture.runtime.live_swap.Run`:
every rectifier call carries the rule, and the named layers are captured by forward hooks on the mirror (the
user's model gets no hooks and no swapped modules).

Exact in one forward. The input gradient is taken with the rule. Grad-CAM needs the *ordinary* gradient
at a captured layer, which differs from the rule's when rectifiers follow the layer (a detector's FPN,
heads and box head do). The rectifiers of this forward read their rule when autograd reaches them, so a
first backward from the score to the captured layers runs with ordinary rectifier gradients (it only
passes the tail after those layers), and a second, from the score to the input, runs with the rule. No part
of the model runs twice forward; the tail runs twice backward.

The input is what the model takes: a (B, C, H, W) tensor, or a list of (C, H, W) images of one size for a
torchvision detector. There is no graph: nothing to compile or export.

>>> import torch, torchvision, guided_swap as gs
>>> capture = RuntimeCapture(torchvision.models.resnet18().eval(), ["layer4"], gs.get_rule("guided"), None)
>>> x = torch.randn(2, 3, 64, 64)
>>> result = capture.run(x, gs.core.targets.as_score([1, 2]))
>>> tuple(result.input_grad.shape), len(capture.swapped), capture.report.capture, capture.graph_module
((2, 3, 64, 64), 17, 'runtime', None)
"""
import difflib
import sys
import threading
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor, nn

from ...core.errors import InputError, LayerError
from ...core.layout import Layout
from ...core.maps import PassResult
from ...core.pass_cams import BiasPass
from ...core.report import RuntimeReport, Swap
from ...core.rules import Rule
from ...core.targets import OutputKey, Score, default_output
from ...core.inputs import Inputs, batch_size, model_args
from ..base import (AUTO, Capture, InputShape, LayerPart, called_several_times, check_autograd, check_inputs,
                    check_tensor, gradients, input_gradient)
from . import bias_hooks
from ..hooks import listed, unpicklable_hooks
from .auto import auto_layer
from .layouts import channel_counts, read_layout, tokens_given
from .live_swap import Run, Site, private_mirror


class RuntimeCapture(Capture):
    """A model whose rectifiers are swapped while it runs (module docstring)."""

    def __init__(self, model: nn.Module, layers: Sequence[str], rule: Rule, output: OutputKey,
                 reason: Optional[str] = None, layouts: Optional[Dict[str, Layout]] = None):
        super().__init__(rule, layers, output)
        self.model = private_mirror(model)
        self.path = "runtime" if not reason else f"runtime ({reason})"
        self._paths = {name: _check_layer(name, self.model) for name in self.layers if name != AUTO}
        self._layer_reasons: Dict[str, str] = {}
        self._given = dict(layouts or {})  # convert(layout=, reshape=): how a capture becomes (B, C, *spatial)
        self._layouts: Dict[str, Layout] = {name: layout for name, layout in self._given.items()
                                            if not (layout.kind == "tokens" and layout.grid is None)}
        self._channels = channel_counts(self.model)
        self._sites: Dict[str, Site] = {}
        self._left_alone: Dict[str, Site] = {}
        self._runs = 0
        self._tail_backward = False
        self._output_by_default = False  # set when a run shows an output naming a 'logits' entry
        self._lock = threading.Lock()

    # --- the contract ------------------------------------------------------------------------------------

    @property
    def report(self) -> RuntimeReport:
        swapped = () if self.rule.ordinary else tuple(Swap(s.name, s.spelling, s.inplace)
                                                      for s in self._sites.values())
        return RuntimeReport(self.rule.name, swapped, tuple((s.name, s.spelling) for s in self._left_alone.values()),
                             (), layers=dict(self._paths), layer_reasons=dict(self._layer_reasons), capture=self.path,
                             ordinary_rule=self.rule.ordinary, runs=self._runs, tail_backward=self._tail_backward,
                             output=self.output, output_by_default=self._output_by_default,
                             layouts=dict(self._layouts))

    @property
    def ready(self) -> bool:
        return AUTO not in self.layers or AUTO in self._paths

    def prepare(self, x: Any) -> None:
        """Resolve ``layer="auto"`` from one recorded forward of ``x``."""
        with self._lock:
            if self.ready:
                return
            leaves, args = _leaves(x)
            with torch.no_grad():
                run, outputs = self._run(args, capture=(), sources=leaves)
            self._paths[AUTO], self._layer_reasons[AUTO] = auto_layer(run.tape, outputs, self.output, _ranks(x))

    def observe(self, x: Any) -> None:
        """Run ``x`` without autograd: ``auto`` is resolved, the call sites are listed in the report and the
        captures' layouts read."""
        self.prepare(x)
        with self._lock, torch.no_grad():
            run, _ = self._run(_leaves(x)[1], capture=[self._paths[name] for name in self.layers])
            self._read_layouts(run, _sizes(x))

    def check(self, x: Any, check_finite: Optional[bool] = None) -> InputShape:
        check_autograd()
        if isinstance(x, Inputs):
            return check_inputs(x, self.model, check_finite)
        if isinstance(x, Tensor):
            if x.dim() < 2:
                raise InputError(f"input has shape {tuple(x.shape)}; give a batch (B, C, ...)")
            images, shape = [x], InputShape(x.shape[0], tuple(x.shape[2:]))
        elif isinstance(x, (list, tuple)) and x and all(isinstance(t, Tensor) for t in x):
            images, shape = list(x), InputShape(len(x), tuple(x[0].shape[1:]))
            if len({tuple(t.shape) for t in images}) > 1:
                raise InputError(f"the images differ in size {sorted({tuple(t.shape) for t in images})}; explain "
                                 "images of one size together, or one image at a time")
        else:
            raise TypeError("input must be a tensor (B, C, ...) or a non-empty list of (C, H, W) image tensors, got "
                            f"{type(x).__name__}")
        for image in images:
            check_tensor(image, self.model, check_finite)
        return shape

    def forward(self, x: Any) -> Any:
        with self._lock:
            _, outputs = self._run(model_args(x), capture=())
        return outputs

    def run(self, x: Any, score: Score) -> PassResult:
        self.prepare(x)
        leaves, args = _leaves(x)
        with self._lock:
            with torch.enable_grad():
                run, outputs = self._run(args, capture=[self._paths[name] for name in self.layers])
            captures = self._captures(run)
            self._read_layouts(run, _sizes(x))
            if isinstance(x, Inputs) and len(leaves) > 1:  # each layer's maps are resized to an input it reads
                self._layer_inputs = {name: _fed_by(capture, leaves) for name, capture in zip(self.layers, captures)}
        with torch.enable_grad():
            main, classes = score(outputs, dict(zip(self.layers, captures)), batch_size(x))
            input_grads, layer_grads = _backward(main, leaves, captures, run)
        input_grad = input_gradient(x, input_grads) if isinstance(x, (Tensor, Inputs)) else torch.stack(input_grads)
        return PassResult(outputs, tuple(captures), main, classes, input_grad, tuple(layer_grads))

    @property
    def layer_inputs(self) -> Dict[str, Tuple[int, ...]]:
        """Which explained inputs each captured layer was computed from in the last pass of several inputs (read
        from its autograd graph, as the graph paths read their graph)."""
        return dict(getattr(self, "_layer_inputs", {}))

    def bias_pass(self, x: Any, score: Score, classes: Optional[Tensor] = None) -> BiasPass:
        """FullGrad's pass: the mirror with its own ordinary rectifiers, hooked at each bias layer (:mod:`.bias_hooks`)."""
        with self._lock:
            return bias_hooks.bias_pass(self.model, x, score, classes)

    def stack(self, x: Any) -> Tensor:
        return x if isinstance(x, Tensor) else torch.stack(list(x))

    def unstack(self, x: Tensor, like: Any) -> Any:
        return x if isinstance(like, Tensor) else list(x)

    def before_save(self) -> None:
        """Refuse, before anything is written, a model copy whose classes pickle could not find again."""
        unsaved = unpicklable_hooks(self.model)
        if unsaved:
            raise TypeError(f"this explainer was captured at run time and holds a copy of the model with its hooks, "
                            f"and pickle cannot save {listed(unsaved)} (a lambda or a function defined inside a "
                            "function): define the hook at the top level of a module, or convert again instead of "
                            "saving; nothing was written")
        hidden = _unimportable_classes(self.model)
        if hidden:
            raise TypeError(f"this explainer was captured at run time and holds a copy of the model, whose classes "
                            f"{hidden} cannot be imported by name (defined inside a function?), so the file could "
                            "not be loaded: define them at the top level of a module, or convert again instead of "
                            "saving")

    # --- one forward ----------------------------------------------------------------------------------

    def _run(self, args: Tuple[Any, ...], capture: Sequence[str],
             sources: Optional[Sequence[Tensor]] = None) -> Tuple[Run, Any]:
        with Run(self.model, self.rule, capture=capture, sources=sources) as run:
            outputs = _called_on(self.model, args)
        self._runs += 1
        self._sites.update((k, v) for k, v in run.sites.items() if k not in self._sites)
        self._left_alone.update((k, v) for k, v in run.left_alone.items() if k not in self._left_alone)
        self._tail_backward |= run.rectified_after_capture
        if self.output is None and default_output(outputs) is not None:  # the report says what is explained
            self.output, self._output_by_default = default_output(outputs), True
        return run, outputs

    def _captures(self, run: Run) -> List[Tensor]:
        captures = []
        for name in self.layers:
            key = self._paths[name]
            values = run.captures.get(key, [])
            if not values:
                raise LayerError(f"layer {name!r} (module {key!r}) did not run in this forward; capture a module "
                                 "that runs for this input")
            if len(values) > 1:
                raise LayerError(called_several_times(key, len(values)))
            if not isinstance(values[0], Tensor):
                entries = f"its entries {key}[0], {key}[1], ..., or " if isinstance(values[0], (tuple, list)) else ""
                raise LayerError(f"layer {name!r} returned a {type(values[0]).__name__}, not a tensor; capture "
                                 f"{entries}a module inside it that returns one feature map: "
                                 f"{_suggest(key + '.', self.model)}")
            captures.append(values[0])
        return captures

    def _read_layouts(self, run: Run, sizes: Sequence[Tuple[int, ...]]) -> None:
        """The layout of each capture of ``run`` not known yet: the one given, else read from its shape
        (:mod:`.layouts`), once; an unknown one makes every CAM of that layer raise, naming layout= and reshape=.
        A capture that is not one tensor is left to :meth:`_captures` to refuse."""
        for name in self.layers:
            values = run.captures.get(self._paths.get(name), [])
            if name in self._layouts or len(values) != 1 or not isinstance(values[0], Tensor):
                continue
            shape, given = tuple(values[0].shape), self._given.get(name)
            if given is not None:  # layout="tokens" without a grid
                self._layouts[name] = tokens_given(shape, given, run.grids, sizes)
            else:
                evidence = run.evidence.get(self._paths[name])
                self._layouts[name] = read_layout(shape, evidence, self._channels, run.grids, sizes)

    # --- module behaviour --------------------------------------------------------------------------------

    def __getstate__(self):
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._lock = threading.Lock()
        if "_layouts" not in self.__dict__:  # saved before run-time captures had layouts: read on the next explain
            self._given, self._layouts, self._channels = {}, {}, channel_counts(self.model)

    def extra_repr(self) -> str:
        return "capture='runtime', " + super().extra_repr()


def _fed_by(capture: Tensor, leaves: Sequence[Tensor]) -> Tuple[int, ...]:
    """The positions of the ``leaves`` that ``capture`` is computed from: the gradient leaves its autograd graph
    reaches."""
    positions = {id(leaf): i for i, leaf in enumerate(leaves)}
    if id(capture) in positions:
        return (positions[id(capture)],)
    found, seen = set(), set()
    stack = [capture.grad_fn] if capture.grad_fn is not None else []
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        variable = getattr(fn, "variable", None)
        if variable is not None and id(variable) in positions:
            found.add(positions[id(variable)])
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return tuple(sorted(found))


def _leaves(x: Any) -> Tuple[List[Tensor], Tuple[Any, ...]]:
    """Gradient leaves for the input and the arguments the model is called with (holding those leaves)."""
    if isinstance(x, Tensor):
        leaf = x.detach().requires_grad_(True)
        return [leaf], (leaf,)
    if isinstance(x, Inputs):
        leaves = [t.detach().requires_grad_(True) for t in x.tensors]
        return leaves, tuple(leaves) + tuple(x.extra)
    leaves = [t.detach().requires_grad_(True) for t in x]
    return leaves, (type(x)(leaves),)


def _sizes(x: Any) -> List[Tuple[int, ...]]:
    """The spatial size of each explained input as the model sees it batched."""
    if isinstance(x, Tensor):
        return [tuple(x.shape[2:])]
    if isinstance(x, Inputs):
        return [tuple(t.shape[2:]) for t in x.tensors]
    return [tuple(x[0].shape[1:])]


def _ranks(x: Any) -> Set[int]:
    """The ranks of the explained inputs as the model sees them batched (a list of (C, H, W) images: 4)."""
    return {len(size) + 2 for size in _sizes(x)}


def _backward(score: Tensor, leaves: List[Tensor], captures: List[Tensor], run: Run):
    """The rule's gradient at each input leaf, and the ordinary gradient at each capture (module docstring)."""
    total = score.sum()
    if captures and run.switch is not None and run.rectified_after_capture:
        run.switch.ordinary_now = True
        layer_grads = gradients(total, captures, retain_graph=True)
        run.switch.ordinary_now = False
        input_grads = gradients(total, leaves)
    else:
        grads = gradients(total, leaves + captures)
        input_grads, layer_grads = grads[:len(leaves)], grads[len(leaves):]
    return input_grads, layer_grads


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
    """A module path, or one call of it (``path_1``), with ``:input`` or ``[i]`` after it: the name itself,
    validated."""
    modules = dict(model.named_modules())
    module = LayerPart.parse(name).base
    base, _, index = module.rpartition("_")
    if module in modules or (base in modules and index.isdigit()):
        return name
    close = difflib.get_close_matches(name, [m for m in modules if m], n=5, cutoff=0.5)
    raise LayerError(f"layer {name!r} is not a module of {type(model).__name__}; closest names: "
                     f"{close or _suggest('', model)}")


def _suggest(prefix: str, model: nn.Module, n: int = 5) -> List[str]:
    names = [name for name, _ in model.named_modules() if name.startswith(prefix) and name != prefix.rstrip(".")]
    return names[-n:] if names else [name for name, _ in model.named_modules() if name][:n]


def _called_on(model: nn.Module, args: Tuple[Any, ...]) -> Any:
    """``model(*args)``; a model that cannot take the list of images it was given (a classifier handed
    ``list(x)``) is told how to give a batch, instead of failing deep inside its first layer."""
    try:
        return model(*args)
    except (TypeError, AttributeError) as error:
        if len(args) == 1 and isinstance(args[0], list):
            raise TypeError(f"{type(model).__name__} failed on the list of {len(args[0])} image tensors it was "
                            f"given ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}): "
                            "a model that takes one (B, C, ...) batch is given torch.stack(images); a list is for "
                            "models that take one, such as torchvision's detectors") from error
        raise
