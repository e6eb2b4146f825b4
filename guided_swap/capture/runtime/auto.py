"""``layer="auto"`` on the run-time path: the map Grad-CAM needs, read from one recorded forward (a
:class:`~guided_swap.capture.runtime.tape.Tape`), by the graph paths' rule
(:func:`guided_swap.capture.graph.layers.cnn_layer`).

- A detector's backbone returns several feature maps: the first module to return several is the feature
  extractor, and ``auto`` takes the module inside it that produced the returned map with the most channels
  (ResNet's ``layer4``, MobileNetV3's last block).
- Any other model: the global pooling is the last call that ends the spatial maps (``adaptive_avg_pool2d``,
  ``x.mean((2, 3))``, a flatten, a class token's ``x[:, 0]``) and whose result reaches the output through no
  spatial map again (an SE gate's pooling multiplies back into a map, and a 1x1 conv head after the pooling
  is no map); ``auto`` takes the last map larger than 1x1 that every path into it crosses, after any residual
  addition, named by the outermost module that returned it (or by the call, DenseNet's functional ``relu``).
- Positions that reach the pooling as tokens (a vision transformer) are refused: name the layer.
- Without a global pooling (segmentation): the last backbone map read by the prediction head.

>>> import torch, torchvision
>>> from guided_swap.capture.runtime.live_swap import Run, private_mirror
>>> x = torch.randn(1, 3, 64, 64)
>>> with Run(private_mirror(torchvision.models.resnet18().eval()), None, sources=[x]) as run:
...     outputs = run.module(x)
>>> auto_layer(run.tape, outputs, None, {4})
LayerChoice(where='layer4', reason='auto: the last spatial map (2x2) before the global pooling at avgpool (nn.AdaptiveAvgPool2d)')
"""
import math
from typing import Any, Collection, Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_leaves

from ...core.errors import LayerError
from ..base import LayerChoice
from .tape import SOURCE, ModuleCall, Tape

CONVOLUTIONS = (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)
HINT = "pass layer=NAME, a module of the model"


def auto_layer(tape: Tape, outputs: Any, output: Any, ranks: Collection[int]) -> LayerChoice:
    """The call ``layer="auto"`` captures, and why (module docstring); a :class:`LayerError` when none fits.

    ``outputs`` is what the model returned and ``output`` the entry explained (None: all of it); ``ranks`` the
    ranks of the explained inputs (4 for images), which a feature map has too."""
    choice = feature_extractor(tape.calls)
    if choice is not None:
        return choice
    flow = Flow(tape, _targets(tape, outputs, output), ranks)
    pooling = flow.global_pooling()
    if pooling is None:
        return flow.map_feeding_head()
    flow.refuse_tokens(pooling)
    step, every_path = flow.dominating_map(pooling)
    if step is None:
        raise LayerError(f"layer='auto' found no feature map larger than 1x1 before {flow.describe(pooling)}; pass "
                         f"a larger input or layer=NAME: {last_modules(tape.calls)}")
    name = flow.name_of(step)
    why = f"the last spatial map ({flow.size(step)}) before {flow.pooling_kind(pooling)} at {flow.describe(pooling)}"
    if not every_path:
        why += "; other branches reach it too, so this map shows only part of the evidence"
    return LayerChoice(name, f"auto: {why}")


# --- detectors: a backbone returning several maps ---------------------------------------------------------

def feature_extractor(calls: List[ModuleCall]) -> Optional[LayerChoice]:
    """The deepest map of the first module that returns several feature maps (a detector's backbone), or None."""
    named = _nameable(calls)
    for position, call in enumerate(calls):
        maps = _feature_maps(call.output)
        if len(maps) < 2:
            continue
        inner = [c for c in calls[:position] if id(c) in named and c.path.startswith(call.path)
                 and any(c.output is m for m in maps)]
        if inner:
            best = max(reversed(inner), key=lambda c: c.output.shape[1])
            shape = "x".join(map(str, best.output.shape[2:]))
            return LayerChoice(best.name, f"auto: {call.path or 'the model'!r} returns {len(maps)} feature maps; "
                               f"{best.name!r} gives the one with the most channels ({best.output.shape[1]}, {shape})")
    return None


def _feature_maps(output: Any) -> List[Tensor]:
    """The maps among a module's returned values; a pooled (B, C, 1, 1) vector, such as the pooler output next
    to the last map in a Hugging Face backbone's ``ModelOutput``, is not one."""
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else ()
    return [v for v in values if isinstance(v, Tensor) and v.dim() >= 3 and v.is_floating_point()
            and math.prod(v.shape[2:]) > 1]


def _nameable(calls: List[ModuleCall]) -> Set[int]:
    """The calls a name captures alone: a module's only call, or a later call (``path_1``); a module's path
    captures each of its calls, so the first of several has no name of its own."""
    counts: Dict[str, int] = {}
    for call in calls:
        counts[call.path] = counts.get(call.path, 0) + 1
    return {id(c) for c in calls if c.path and (counts[c.path] == 1 or c.name != c.path)}


def last_modules(calls: List[ModuleCall], n: int = 5) -> List[str]:
    """The last few module paths of a forward, latest first, for an error message."""
    return list(dict.fromkeys(call.path for call in reversed(calls) if call.path))[:n]


def _targets(tape: Tape, outputs: Any, key: Any) -> Set[int]:
    """The steps that made the explained output (its entry ``key`` when given and found)."""
    value = outputs
    if key is not None:
        try:
            value = getattr(outputs, key) if isinstance(key, str) and hasattr(outputs, key) else outputs[key]
        except (KeyError, IndexError, TypeError):
            value = outputs
    steps = (tape.step_of(t) for t in tree_leaves(value) if isinstance(t, Tensor))
    return {s for s in steps if s is not None and s != SOURCE}


# --- the data flow of one forward ---------------------------------------------------------------------

class Flow:
    """A recorded forward read as a graph: which steps are feature maps, where the spatial maps end."""

    def __init__(self, tape: Tape, targets: Set[int], ranks: Collection[int]):
        self.tape, self.steps, self.targets, self.ranks = tape, tape.steps, targets, set(ranks)
        self.children: List[List[int]] = [[] for _ in self.steps]
        self.roots: List[int] = []  # the steps that read an explained input
        for index, step in enumerate(self.steps):
            for parent in step.parents:
                (self.roots if parent == SOURCE else self.children[parent]).append(index)
        self.convs = [i for i, s in enumerate(self.steps) if _lookup(s.func)]
        self.derived = self._downstream(self.convs)

    def _downstream(self, starts: List[int]) -> Set[int]:
        derived = set(starts)
        for index, step in enumerate(self.steps):
            if index not in derived and any(p in derived for p in step.parents):
                derived.add(index)
        return derived

    def spatial(self, index: int) -> bool:
        """A tensor computed from a convolution with two or more non-batch dimensions above 1."""
        return index in self.derived and any(sum(s > 1 for s in t.shape[1:]) >= 2 for t in self.steps[index].tensors)

    def is_map(self, index: int) -> bool:
        """A candidate for capture: one spatial tensor of an input's rank, larger than 1x1."""
        t = self.steps[index].tensor
        return t is not None and self.spatial(index) and t.dim() in self.ranks and math.prod(t.shape[2:]) > 1

    def is_pool(self, index: int) -> bool:
        return "pool" in self.steps[index].op

    def size(self, index: int) -> str:
        return "x".join(str(s) for s in self.steps[index].tensors[0].shape[2:])

    def global_pooling(self) -> Optional[int]:
        """The last step that ends the spatial maps and whose result reaches the output only through non-maps."""
        for index in range(len(self.steps) - 1, -1, -1):
            if not self.spatial(index) and any(p != SOURCE and self.spatial(p) for p in self.steps[index].parents) \
                    and self._reaches_output_flat(index):
                return index
        return None

    def _reaches_output_flat(self, start: int) -> bool:
        seen, stack = {start}, [start]
        while stack:
            index = stack.pop()
            if index in self.targets:
                return True
            for child in self.children[index]:
                if child not in seen and not self.spatial(child):
                    seen.add(child)
                    stack.append(child)
        return False

    def upstream(self, ends: Collection[int]) -> Set[int]:
        seen, stack = set(ends), list(ends)
        while stack:
            for parent in self.steps[stack.pop()].parents:
                if parent != SOURCE and parent not in seen:
                    seen.add(parent)
                    stack.append(parent)
        return seen

    def refuse_tokens(self, pooling: int) -> None:
        """A LayerError when the positions reach the pooling as tokens, not as a map of the input's rank."""
        pooled = [self.steps[p] for p in self.steps[pooling].parents if p != SOURCE and self.spatial(p)]
        if any(t.dim() in self.ranks for s in pooled for t in s.tensors):
            return
        shape = tuple(pooled[0].tensors[0].shape)
        near = [c.name for c in reversed(self.tape.calls) if isinstance(c.output, Tensor)
                and tuple(c.output.shape) == shape][:4]
        raise LayerError(f"layer='auto' on the run-time capture: the positions reach {self.describe(pooling)} as a "
                         f"{shape} tensor, not a feature map of the input's rank (a transformer's tokens), and this "
                         f"path cannot tell which layer Grad-CAM needs there; pass layer=NAME (for a class-token "
                         f"ViT, the last block's first norm; modules returning that shape, latest first: {near}; "
                         "docs/transformers.md)")

    def dominating_map(self, end: int) -> Tuple[Optional[int], bool]:
        """The last map before ``end`` that every path from the input to ``end`` crosses (pooling steps skipped),
        and True; else the last map on a convolution's grid before it, and False; (None, False) when none."""
        before = [i for i in sorted(self.upstream([end]) - {end}, reverse=True)
                  if self.is_map(i) and not self.is_pool(i)]
        for index in before:
            if self._dominates(index, end):
                return index, True
        grids = {tuple(self.steps[c].tensors[0].shape[2:]) for c in self.convs}
        on_grid = [i for i in before if tuple(self.steps[i].tensors[0].shape[2:]) in grids]
        return (on_grid[0], False) if on_grid else (None, False)

    def _dominates(self, node: int, end: int) -> bool:
        """Whether every path from the explained inputs to ``end`` crosses ``node``."""
        if any(p == SOURCE for p in self.steps[end].parents):
            return False
        seen = {node}
        stack = [r for r in self.roots if r != node]
        seen.update(stack)
        while stack:
            for child in self.children[stack.pop()]:
                if child == end:
                    return False
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
        return True

    def map_feeding_head(self) -> LayerChoice:
        """For a model without global pooling: the last map outside the head module that the head reads."""
        feeding = self.upstream(self.targets)
        convs = [i for i in self.convs if i in feeding]
        if not convs or not any(self.is_map(i) for i in feeding):
            raise LayerError("layer='auto' found no spatial feature map (a convolution's output larger than 1x1) in "
                             f"the model; {HINT}: {last_modules(self.tape.calls)}, or layer=None for gradients only")
        last = self.steps[convs[-1]]
        scope = next((path for path in last.scopes if not all(path in self.steps[c].scopes for c in convs)), None)
        inside = (lambda i: scope in self.steps[i].scopes) if scope else (lambda i: i == convs[-1])
        read = [i for i in feeding if self.is_map(i) and not inside(i) and any(inside(c) for c in self.children[i])]
        if not read:
            raise LayerError(f"layer='auto' found no feature map feeding the prediction head {scope or last.name!r}; "
                             f"{HINT}: {last_modules(self.tape.calls)}")
        index = max(read)
        return LayerChoice(self.name_of(index), f"auto: the last backbone map ({self.size(index)}) feeding the "
                           f"prediction head {scope or last.name!r}; the model has no global pooling")

    # --- names ------------------------------------------------------------------------------------------

    def name_of(self, index: int) -> str:
        """The name that captures step ``index``'s tensor: the outermost module call that returned that value
        (the latest of equals: ConvNeXt's ``norm_pre`` rather than ``stages``), else the call itself."""
        step = self.steps[index]
        named = _nameable(self.tape.calls)
        calls = [(position, c) for position, c in enumerate(self.tape.calls)
                 if c.output is step.tensor and c.version == step.versions[0] and id(c) in named]
        if calls:
            return min(calls, key=lambda pc: (pc[1].path.count("."), -pc[0]))[1].name
        if step.own:  # the first of several calls of an activation module: no name captures it alone
            raise LayerError(f"layer='auto' would take the first call of module {step.name!r}, which runs several "
                             f"times; a module's name captures each call, so {HINT} (or one of its later calls)")
        return step.name

    def pooling_kind(self, index: int) -> str:
        step = self.steps[index]
        inputs = [self.steps[p].tensors[0] for p in step.parents if p != SOURCE and self.spatial(p)]
        shape, before = tuple(step.tensors[0].shape), tuple(inputs[0].shape)
        if len(shape) == 2 and shape[1] == math.prod(before[1:]):
            return "the flatten"
        if shape[:2] == before[:2]:
            return "the global pooling"
        return "the spatial reduction"

    def describe(self, index: int) -> str:
        """The innermost module that returned the step's tensor (``avgpool (nn.AdaptiveAvgPool2d)``), else the
        call (``mean``, ``encoder.getitem``)."""
        step = self.steps[index]
        call = next((c for c in self.tape.calls if c.output is step.tensors[0]), None)
        return f"{call.name} (nn.{type(call.module).__name__})" if call is not None else step.name


def _lookup(func: Any) -> bool:
    try:
        return func in CONVOLUTIONS
    except TypeError:
        return False
