"""Where the channels and the positions of a captured tensor are: read from the graph, applied before any CAM.

A CAM needs a feature map ``(B, C, *spatial)``. A CNN's capture is one already; a vision transformer's is a token
tensor ``(B, N, C)`` (class, distillation or register tokens first, then the ``h*w`` patches); a Swin's is
channels-last ``(B, h, w, C)``. The layout of each captured node is decided once, when the explainer is built:
channels first when the graph shows it without a run (a CNN), else read axis by axis from the graph and the shapes
of one run (:mod:`guided_swap.axes`). Nothing is guessed from ``N`` being a square: the grid is the one the
patch-embedding convolution's output was flattened from, the prefix the tokens concatenated before it.
``layer="auto"`` for transformers is chosen here too (:func:`auto_layer`).

>>> import torch
>>> tokens = torch.arange(2 * 5 * 3.).view(2, 5, 3)            # (B, 1 class token + 2x2 patches, C=3)
>>> layout = Layout("tokens", grid=(2, 2), prefix=1)
>>> layout.to_channels_first(tokens).shape, layout.describe()
(torch.Size([2, 3, 2, 2]), 'tokens (B, N, C): 1 prefix + 2x2 patches')
>>> Layout("nhwc").to_channels_first(torch.zeros(2, 7, 7, 768)).shape
torch.Size([2, 768, 7, 7])
"""
import math
import operator
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, fx, nn

from . import axes as graph_axes
from .capture import upstream as upstream_of
from .errors import LayerError

KINDS = ("nchw", "nhwc", "tokens")
FIX = ("convert with layout='tokens' | 'nhwc' | 'nchw', layout=gs.Layout('tokens', grid=(h, w), prefix=P), or "
       "reshape=fn taking the captured tensor to (B, C, *spatial)")


@dataclass(frozen=True)
class Layout:
    """How a captured tensor becomes the ``(B, C, *spatial)`` map the CAM maths take.

    ``kind``: ``"nchw"`` (channels first: nothing to do), ``"nhwc"`` (channels last), ``"tokens"`` (``(B, N, C)``:
    ``prefix`` tokens, then the ``grid`` of patches in row-major order, then ``suffix`` tokens), ``"reshape"`` (the
    user's ``reshape`` callable) or ``"unknown"`` (``reason`` says why; asking for a CAM raises).
    ``permutation`` puts the batch, the channels, then the positions first (set by the graph reading; the
    defaults fit the kinds). ``input_size`` is the input's spatial size the grid was read at: another input size
    scales the grid with it.
    """

    kind: str
    grid: Optional[Tuple[int, ...]] = None
    prefix: int = 0
    suffix: int = 0
    permutation: Optional[Tuple[int, ...]] = None
    input_size: Optional[Tuple[int, ...]] = None
    reshape: Optional[Callable[[Tensor], Tensor]] = None
    reason: str = ""

    def __post_init__(self):
        if self.kind not in KINDS + ("reshape", "unknown"):
            raise ValueError(f"layout kind {self.kind!r} is not one of {KINDS} (or a reshape= callable)")
        if self.kind == "tokens" and self.grid is not None:
            if not all(isinstance(g, int) and g > 0 for g in self.grid):
                raise ValueError(f"a token layout's grid must be positive ints, got {self.grid!r}")
        if min(self.prefix, self.suffix) < 0:
            raise ValueError(f"prefix and suffix token counts cannot be negative: {self.prefix}, {self.suffix}")

    def describe(self) -> str:
        """One phrase for the conversion report."""
        if self.kind == "tokens":
            grid = "x".join(map(str, self.grid)) if self.grid else "?"
            extra = f" + {self.suffix} suffix" if self.suffix else ""
            order = "(B, N, C)" if self._perm(3) == (0, 2, 1) else "(B, C, N)"
            return f"tokens {order}: {self.prefix} prefix + {grid} patches{extra}"
        if self.kind == "nhwc":
            return "channels last"
        if self.kind == "reshape":
            return f"reshape={getattr(self.reshape, '__name__', repr(self.reshape))}"
        if self.kind == "unknown":
            return f"layout not understood: {self.reason}"
        return "channels first"

    def _perm(self, rank: int) -> Tuple[int, ...]:
        if self.permutation is not None:
            return self.permutation
        if self.kind == "tokens":
            return (0, 2, 1)
        if self.kind == "nhwc":
            return (0, rank - 1) + tuple(range(1, rank - 1))
        return tuple(range(rank))

    def to_channels_first(self, t: Tensor, input_size: Optional[Sequence[int]] = None, name: str = "") -> Tensor:
        """``t`` as ``(B, C, *spatial)``; ``input_size`` (the explained input's spatial size) rescales the grid."""
        where = f"layer {name!r}: " if name else ""
        if self.kind == "unknown":
            raise LayerError(f"{where}the captured tensor {tuple(t.shape)} has a layout guided_swap cannot read "
                             f"({self.reason}), so it gives no class activation map; {FIX}")
        if self.kind == "reshape":
            return _checked_reshape(self.reshape, t, where)
        perm = self._perm(t.dim())
        if len(perm) != t.dim():
            raise LayerError(f"{where}layout {self.describe()!r} does not fit the captured tensor {tuple(t.shape)}; {FIX}")
        t = t.permute(perm)
        if self.kind != "tokens":
            return t
        if t.dim() != 3:
            raise LayerError(f"{where}a token layout needs a (B, N, C) capture, got {tuple(t.shape)}; {FIX}")
        grid = self._grid(t.shape[2], input_size, where)
        return t.narrow(2, self.prefix, math.prod(grid)).unflatten(2, grid)

    def _grid(self, tokens: int, input_size: Optional[Sequence[int]], where: str) -> Tuple[int, ...]:
        if self.grid is None:
            raise LayerError(f"{where}the patch grid of this token capture is not known; {FIX}")
        patches = tokens - self.prefix - self.suffix
        if math.prod(self.grid) == patches:
            return tuple(self.grid)
        if input_size is not None and self.input_size is not None and len(input_size) == len(self.input_size) == \
                len(self.grid):
            scaled = tuple(round(g * s / s0) for g, s, s0 in zip(self.grid, input_size, self.input_size))
            if math.prod(scaled) == patches:
                return scaled
        raise LayerError(f"{where}{tokens} tokens do not hold {self.prefix} prefix + {self.suffix} suffix tokens and "
                         f"a {'x'.join(map(str, self.grid))} patch grid (read at input size {self.input_size}); {FIX}")


CHANNELS_FIRST = Layout("nchw", reason="channels first")
_ATTENTION_FUNCTIONS = {"scaled_dot_product_attention", "multi_head_attention_forward", "softmax"}


def _checked_reshape(fn: Callable, t: Tensor, where: str) -> Tensor:
    out = fn(t)
    if not isinstance(out, Tensor) or out.dim() < 3 or out.shape[0] != t.shape[0]:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise LayerError(f"{where}reshape={getattr(fn, '__name__', fn)!r} turned {tuple(t.shape)} into {shape}; it "
                         "must return (B, C, *spatial) with the same batch size")
    return out


# --- user overrides ---------------------------------------------------------------------------------------

LayoutSpec = Union[None, str, Layout, Mapping[str, Union[str, Layout]]]


def overrides(layout: LayoutSpec, reshape: Any, layers: Sequence[str]) -> Dict[str, Layout]:
    """The ``layout=`` / ``reshape=`` arguments of ``convert`` as one Layout per layer name (checked)."""
    by_layer: Dict[str, Layout] = {}
    for name, value in _per_layer(layout, layers, "layout").items():
        by_layer[name] = _as_layout(value)
    for name, fn in _per_layer(reshape, layers, "reshape").items():
        if not callable(fn):
            raise TypeError(f"reshape= takes a callable (B, ...) -> (B, C, *spatial), got {type(fn).__name__}")
        if name in by_layer:
            raise ValueError(f"layer {name!r} has both layout= and reshape=; give one")
        by_layer[name] = Layout("reshape", reshape=fn, reason="reshape= given")
    return by_layer


def _per_layer(value: Any, layers: Sequence[str], what: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        unknown = [name for name in value if name not in layers]
        if unknown:
            raise ValueError(f"{what}= names {unknown}, which are not among the captured layers {list(layers)}")
        return dict(value)
    if not layers:
        raise ValueError(f"{what}= needs a captured layer (layer=NAME or 'auto')")
    return {name: value for name in layers}


def _as_layout(value: Union[str, Layout]) -> Layout:
    if isinstance(value, Layout):
        return value if value.reason else replace(value, reason="layout= given")
    if isinstance(value, str) and value in KINDS:
        return Layout(value, reason="layout= given")
    raise ValueError(f"layout={value!r} is not one of {KINDS} or a guided_swap.Layout")


def layout_of(axes: Optional[graph_axes.Axes], shape: Tuple[int, ...], input_size: Tuple[int, ...]) -> Layout:
    """The :class:`Layout` of a capture whose axes are ``axes`` (None: not understood)."""
    if axes is None:
        return Layout("unknown", reason=f"no channel axis could be followed to the capture {shape} from the input")
    roles = axes.roles
    if len(roles) < 3 or roles[0] != "B" or roles.count("C") != 1:
        return Layout("unknown", reason=f"the capture {shape} has no (batch, channels, positions) axes")
    channel = roles.index("C")
    rest = tuple(k for k in range(1, len(roles)) if k != channel)
    perm = (0, channel) + rest
    if "T" not in roles:
        if any(roles[k] != "S" for k in rest):
            return Layout("unknown", reason=f"the capture {shape} mixes positions in an unexpected way")
        kind = "nchw" if channel == 1 else "nhwc" if channel == len(roles) - 1 else None
        if kind is None:
            return Layout("unknown", reason=f"the channels of the capture {shape} are on axis {channel}")
        return Layout(kind, permutation=perm, reason="read from the graph")
    if len(roles) != 3:
        return Layout("unknown", reason=f"the capture {shape} holds tokens and other positions at once")
    if axes.grid is None:
        return Layout("unknown", reason=f"the token capture {shape}: no patch grid could be followed from a "
                                        "convolution's output to these tokens")
    return Layout("tokens", grid=axes.grid, prefix=axes.prefix, suffix=axes.suffix, permutation=perm,
                  input_size=tuple(input_size), reason="read from the graph")


# --- entry points: build.py calls these -------------------------------------------------------------------

def decide(gm: fx.GraphModule, nodes: Mapping[str, fx.Node], example: Optional[Tensor],
           given: Mapping[str, Layout], input_spec: Optional[Tuple[int, int]]) -> Dict[str, Layout]:
    """The layout of every captured layer: the user's, else channels first when the graph shows it without a
    run, else read from the shapes of one run on ``example`` (or a zero 224-pixel input)."""
    layouts = {name: given[name] for name in nodes if name in given and not _needs_grid(given[name])}
    pending = {name: node for name, node in nodes.items() if name not in layouts}
    for name, node in list(pending.items()):
        if name not in given and graph_axes.channels_first_by_structure(gm, node):
            layouts[name] = CHANNELS_FIRST
            del pending[name]
    if pending:
        stand_in = _zero_input(gm, input_spec) if example is None else None
        reader = graph_axes.read_graph(gm, example if example is not None else stand_in) if (example is not None or
                                                                                stand_in is not None) else None
        if reader is None and example is None:
            raise NeedsInput(f"the layout of {sorted(pending)} is read from a run, and the model did not run on a "
                             "zero 224-pixel stand-in: it is read from the first input given to explain()")
        for name, node in pending.items():
            if reader is None:
                layouts[name] = Layout("unknown", reason="the model did not run on the example input")
            elif node not in reader.shapes:
                layouts[name] = Layout("unknown", reason=f"node {node.name!r} does not produce a tensor")
            else:
                size = tuple((example if example is not None else stand_in).shape[2:])
                layouts[name] = layout_of(reader.axes.get(node), reader.shapes[node], size)
            if name in given:  # layout="tokens": the grid and prefix come from the graph when it holds them
                read = layouts[name]
                layouts[name] = replace(read, reason="layout='tokens' given; grid read from the graph") \
                    if read.kind == "tokens" else given[name]
    return {name: layouts[name] for name in nodes}


class NeedsInput(Exception):
    """Raised by :func:`decide` without an example when a layout needs a run: the build waits for an input."""


def _needs_grid(layout: Layout) -> bool:
    return layout.kind == "tokens" and layout.grid is None


def _zero_input(gm: fx.GraphModule, input_spec: Optional[Tuple[int, int]]) -> Optional[Tensor]:
    """A stand-in for the input, on the meta device: only its shape is used (on fake tensors)."""
    if input_spec is None:  # the graph did not show it plainly: the first convolution's input
        conv = next((m for m in gm.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
        input_spec = None if conv is None else (conv.weight.dim(), conv.in_channels)
    if input_spec is None:
        return None
    rank, channels = input_spec
    parameter = next(gm.parameters(), None)
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    return torch.empty((1, channels) + (224,) * (rank - 2), dtype=dtype, device="meta")


def auto_layer(gm: fx.GraphModule, example: Tensor) -> Optional[Tuple[fx.Node, str]]:
    """``layer="auto"`` for transformers (None for CNNs: the CNN rule applies).

    A model whose head reads its class token: the input of the last attention (the norm before it), the last
    token map whose patch tokens still reach that token. A pooled model (Swin, a ViT with average pooling): the
    last map of positions before the pooling.
    """
    if not _has_transformer_ops(gm):
        return None
    reader = graph_axes.read_graph(gm, example)
    if reader is None:
        return None
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    upstream = upstream_of([output]) - {output}
    maps = [n for n in gm.graph.nodes if n in upstream and _is_map(reader, n)]
    if not maps or not any(reader.axes[n].roles[1] != "C" for n in maps):
        return None  # channels-first all along: a CNN
    read = _class_token_read(reader, upstream)
    if read is not None:
        chosen = _attention_input(reader, read)
        if chosen is not None:
            return chosen, ("auto: the input of the last attention (its norm's output): the last token map whose "
                            "patch tokens still reach the class token the head reads")
    last = maps[-1]
    while _selects_or_permutes(reader, last) and _is_map(reader, last.args[0]):
        last = last.args[0]  # name the map itself, not a slice or a permuted view of it
    if _cnn_would_find(reader, last):
        return None
    return last, "auto: the last map of positions before the pooling"


def _selects_or_permutes(reader: graph_axes.Reader, node: fx.Node) -> bool:
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    return (node.op == "call_function" and node.target is operator.getitem) or graph_axes.is_permute(node, reader.module(node))


def _cnn_would_find(reader: graph_axes.Reader, node: fx.Node) -> bool:
    """A channels-first map with the last convolution's spatial size: the CNN rule finds it (ConvNeXt, MaxViT)."""
    convs = [n for n in reader.gm.graph.nodes if n in reader.shapes and
             (isinstance(reader.module(n), nn.modules.conv._ConvNd) or graph_axes.name_of(n.target) in ("conv1d", "conv2d", "conv3d"))]
    axes = reader.axes[node]
    return bool(convs) and axes.roles[1] == "C" and "T" not in axes.roles and \
        reader.shapes[node][2:] == reader.shapes[convs[-1]][2:]


def _has_transformer_ops(gm: fx.GraphModule) -> bool:
    """A layer norm or an attention somewhere: worth one run to read the axes (a CNN has neither)."""
    for node in gm.graph.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, (nn.LayerNorm, nn.MultiheadAttention)) or type(module).__name__ == "RMSNorm":
            return True
        if node.op in ("call_function", "call_method") and graph_axes.name_of(node.target) in (
                "layer_norm", "rms_norm", "scaled_dot_product_attention", "softmax"):
            return True
    return False


def _is_map(reader: graph_axes.Reader, node: fx.Node) -> bool:
    axes = reader.axes.get(node)
    if axes is None:
        return False
    layout = layout_of(axes, reader.shapes[node], ())
    if layout.kind == "unknown":
        return False
    if layout.kind != "tokens" and axes.roles.count("S") != reader.input_spatial_rank:
        return False  # e.g. Hiera's (B, h, 2, w, 2, C) unrolled blocks: not a map a CAM can be drawn on
    positions = math.prod(layout.grid) if layout.kind == "tokens" else \
        math.prod(reader.shapes[node][k] for k, r in enumerate(axes.roles) if r == "S")
    return positions > 1


def _class_token_read(reader: graph_axes.Reader, upstream: set) -> Optional[fx.Node]:
    """The last ``x[:, i]`` on a token map that picks a prefix token (the class token), on the way to the output."""
    found = None
    for node in reader.gm.graph.nodes:
        if node in upstream and node.op == "call_function" and _picks_a_prefix_token(reader, node):
            found = node
    return found


def _picks_a_prefix_token(reader: graph_axes.Reader, node: fx.Node) -> bool:
    """``x[:, i]`` (fx) or ``aten.select(x, token_axis, i)`` (the export path's graph) with ``i`` a prefix token."""
    source = node.args[0] if node.args else None
    axes = reader.axes.get(source) if isinstance(source, fx.Node) else None
    if axes is None or "T" not in axes.roles or not axes.prefix:
        return False
    token_axis = axes.roles.index("T")
    if node.target is operator.getitem:
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if len(index) <= token_axis or not all(i == slice(None) for i in index[:token_axis]):
            return False
        picked = index[token_axis]
    elif graph_axes.name_of(node.target) == "select" and len(node.args) == 3:
        dim, picked = node.args[1], node.args[2]
        if not isinstance(dim, int) or dim % len(axes.roles) != token_axis:
            return False
    else:
        return False
    return isinstance(picked, int) and 0 <= picked < axes.prefix


def _is_attention(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), (nn.MultiheadAttention, nn.Softmax))
    return node.op in ("call_function", "call_method") and graph_axes.name_of(node.target) in _ATTENTION_FUNCTIONS


def _attention_input(reader: graph_axes.Reader, read: fx.Node) -> Optional[fx.Node]:
    before = upstream_of([read]) - {read}
    attention = [n for n in reader.gm.graph.nodes if n in before and _is_attention(reader.gm, n)]
    if not attention:
        return None
    queue, seen = list(attention[-1].all_input_nodes), set()
    while queue:
        node = queue.pop(0)
        if node in seen:
            continue
        seen.add(node)
        module = reader.module(node)
        if graph_axes.feature_norm(module, node, reader.shapes.get(node, ())) == "last" and _is_map(reader, node):
            return node
        queue.extend(node.all_input_nodes)
    return None
