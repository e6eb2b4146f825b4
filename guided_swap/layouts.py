"""Where the channels and the positions of a captured tensor are: read from the graph, applied before any CAM.

A CAM needs a feature map ``(B, C, *spatial)``. A CNN's capture is one already; a vision transformer's is a token
tensor ``(B, N, C)`` (class, distillation or register tokens first, then the ``h*w`` patches); a Swin's is
channels-last ``(B, h, w, C)``. The layout of each captured node is decided once, when the explainer is built, by
following every tensor of the graph from the input: each axis is the *batch*, the *channels* (features), a
*spatial* axis, or a *token* axis holding flattened positions (with the patch grid they were flattened from and the
tokens concatenated before and after them). Convolutions, pooling and batch norms make channels-first maps;
``Linear``/``LayerNorm`` over the last axis make it the channels; permutes, transposes, reshapes, slices and
``cat`` move or extend the axes; anything else that keeps a tensor's shape keeps its layout. Nothing is guessed
from ``N`` being a square: the grid is the one the patch-embedding convolution's output was flattened from.

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
import weakref
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, fx, nn

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


# --- reading the graph ------------------------------------------------------------------------------------

# An axis is "B" (batch), "C" (channels), "S" (spatial) or "T" (tokens: positions flattened from a grid).


@dataclass(frozen=True)
class _Axes:
    roles: Tuple[str, ...]
    grid: Optional[Tuple[int, ...]] = None  # the T axis's patch grid (None: not known)
    prefix: int = 0
    suffix: int = 0


def _first(rank: int) -> Optional[_Axes]:
    return _Axes(("B", "C") + ("S",) * (rank - 2)) if rank >= 3 else None


def _last(rank: int) -> Optional[_Axes]:
    if rank == 3:
        return _Axes(("B", "T", "C"))
    return _Axes(("B",) + ("S",) * (rank - 2) + ("C",)) if rank > 3 else None


_CHANNELS_FIRST_MODULES = (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                           nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
                           nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
                           nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.LPPool1d, nn.LPPool2d)
_CHANNELS_FIRST_FUNCTIONS = {
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "max_pool1d",
    "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "batch_norm",
    "group_norm", "instance_norm", "interpolate", "upsample", "pixel_shuffle", "pixel_unshuffle",
    "max_pool2d_with_indices", "conv2d_relu", "lp_pool2d"}
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_ATTENTION_FUNCTIONS = {"scaled_dot_product_attention", "multi_head_attention_forward", "softmax"}


def _name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", "")


class _Reader:
    """Every tensor node's axes, given the shapes of one run (:func:`read_graph`)."""

    def __init__(self, gm: fx.GraphModule, shapes: Dict[fx.Node, Tuple[int, ...]]):
        self.gm, self.shapes = gm, shapes
        self.axes: Dict[fx.Node, Optional[_Axes]] = {}
        for node in gm.graph.nodes:
            if node in shapes:
                self.axes[node] = self._read(node)

    def module(self, node: fx.Node) -> Optional[nn.Module]:
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None

    def _read(self, node: fx.Node) -> Optional[_Axes]:
        shape = self.shapes[node]
        rank = len(shape)
        module = self.module(node)
        name = _name(node.target)
        if node.op == "placeholder":
            return _first(rank)
        if node.op == "get_attr":
            return None
        if isinstance(module, _CHANNELS_FIRST_MODULES) or (node.op == "call_function" and
                                                          name in _CHANNELS_FIRST_FUNCTIONS):
            return _first(rank)
        norm = _feature_norm(module, node, shape)
        if norm == "first":
            return _first(rank)
        if norm == "last" or isinstance(module, nn.Linear) or (node.op == "call_function" and name == "linear"):
            return self._features_last(node, rank)
        if _is_permute(node, module):
            return self._permuted(node, module, rank)
        if node.op in ("call_method", "call_function") and name in _RESHAPES:
            return self._reshaped(node)
        if node.op == "call_function" and node.target is operator.getitem:
            return self._indexed(node)
        if node.op == "call_function" and node.target in (torch.cat, torch.concat, torch.concatenate):
            return self._concatenated(node)
        return self._same_shape(node)

    def _input(self, node: fx.Node) -> Optional[fx.Node]:
        first = node.args[0] if node.args else node.kwargs.get("input")
        return first if isinstance(first, fx.Node) and first in self.shapes else None

    def _features_last(self, node: fx.Node, rank: int) -> Optional[_Axes]:
        source = self._input(node)
        before = self.axes.get(source) if source is not None else None
        if before is None or len(before.roles) != rank:
            return _last(rank)
        if before.roles[-1] == "C":
            return before
        if before.roles[-1] == "T" and self.shapes[source][-1] == self.shapes[node][-1]:
            return before  # token mixing over the last axis (an MLP-Mixer's): positions keep their place
        return None

    def _permuted(self, node: fx.Node, module: Optional[nn.Module], rank: int) -> Optional[_Axes]:
        before = self.axes.get(self._input(node))
        perm = _permutation(node, module, rank)
        if before is None or perm is None or len(before.roles) != rank:
            return None
        return replace(before, roles=tuple(before.roles[p] for p in perm))

    def _reshaped(self, node: fx.Node) -> Optional[_Axes]:
        source = self._input(node)
        before = self.axes.get(source)
        if before is None:
            return None
        return _reshape_axes(before, self.shapes[source], self.shapes[node])

    def _indexed(self, node: fx.Node) -> Optional[_Axes]:
        source, index = node.args[0], node.args[1]
        if isinstance(source, fx.Node) and source not in self.shapes:
            return self._tuple_entry(source, index)
        before = self.axes.get(source)
        if before is None:
            return None
        return _index_axes(before, self.shapes[source], index)

    def _tuple_entry(self, source: fx.Node, index: Any) -> Optional[_Axes]:
        module = self.module(source)
        if isinstance(module, nn.MultiheadAttention) and module.batch_first and index == 0:
            return self.axes.get(self._input(source))
        return None

    def _concatenated(self, node: fx.Node) -> Optional[_Axes]:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
            return None
        rank = len(self.shapes[node])
        dim = dim % rank if isinstance(dim, int) else None
        known = [(i, self.axes.get(t)) for i, t in enumerate(tensors) if self.axes.get(t) is not None]
        if dim is None or not known or len({axes.roles for _, axes in known}) != 1:
            return None
        i, axes = min(known, key=lambda item: item[1].grid is None)
        role = axes.roles[dim]
        if role == "B":
            return None
        if role != "T":
            return axes
        if len(known) > 1:
            return None  # two token sources along the token axis: which holds the patches is not known
        before = sum(self.shapes[t][dim] for t in tensors[:i])
        after = sum(self.shapes[t][dim] for t in tensors[i + 1:])
        return replace(axes, prefix=axes.prefix + before, suffix=axes.suffix + after)

    def _same_shape(self, node: fx.Node) -> Optional[_Axes]:
        """Anything else keeps the layout of an input of exactly its shape (elementwise ops, norms, attention
        functions that return their query's shape, residual additions)."""
        shape = self.shapes[node]
        candidates: List[_Axes] = []
        for arg in node.all_input_nodes:
            axes = self.axes.get(arg)
            if axes is not None and self.shapes.get(arg) == shape:
                candidates.append(axes)
        if not candidates:
            return None
        return min(candidates, key=lambda axes: "T" in axes.roles and axes.grid is None)


def _feature_norm(module: Optional[nn.Module], node: fx.Node, shape: Tuple[int, ...]) -> Optional[str]:
    """"last" for a layer/RMS norm over the last axis, "first" for one over the channels of a channels-first map."""
    if module is not None:
        norms = tuple(t for t in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if t is not None)
        if not isinstance(module, norms) or len(module.normalized_shape) != 1:
            return None
        size = module.normalized_shape[0]
        plain = type(module).forward in (nn.LayerNorm.forward, getattr(getattr(nn, "RMSNorm", None), "forward", None))
        if shape[-1] == size and (plain or len(shape) < 3 or shape[1] != size or "2d" not in type(module).__name__.lower()):
            return "last"
        return "first" if len(shape) >= 3 and shape[1] == size else None
    if node.op == "call_function" and _name(node.target) in ("layer_norm", "rms_norm"):
        normalized = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        if isinstance(normalized, int):
            normalized = (normalized,)
        if isinstance(normalized, (tuple, list)) and len(normalized) == 1 and normalized[0] == shape[-1]:
            return "last"
    return None


def _is_permute(node: fx.Node, module: Optional[nn.Module]) -> bool:
    if module is not None:
        return type(module).__name__ == "Permute" and hasattr(module, "dims")
    name = _name(node.target)
    return node.op in ("call_method", "call_function") and name in ("permute", "transpose", "swapaxes", "movedim",
                                                                     "moveaxis")


def _permutation(node: fx.Node, module: Optional[nn.Module], rank: int) -> Optional[Tuple[int, ...]]:
    """The output's axes as input axes (``out[i]`` comes from ``in[perm[i]]``)."""
    try:
        if module is not None:
            dims = list(module.dims)
        else:
            name, args = _name(node.target), list(node.args[1:])
            if name == "permute":
                dims = list(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
                dims = dims or list(node.kwargs.get("dims", ()))
            elif name in ("transpose", "swapaxes"):
                a, b = (args + [node.kwargs.get("dim0"), node.kwargs.get("dim1")])[:2]
                dims = list(range(rank))
                dims[a % rank], dims[b % rank] = dims[b % rank], dims[a % rank]
            else:  # movedim / moveaxis
                source, destination = args[:2]
                order = [d for d in range(rank) if d != source % rank]
                order.insert(destination % rank, source % rank)
                dims = order
        dims = [d % rank for d in dims]
    except (TypeError, ValueError, IndexError):
        return None
    return tuple(dims) if sorted(dims) == list(range(rank)) else None


def _groups(before: Sequence[int], after: Sequence[int]) -> Optional[List[Tuple[List[int], List[int]]]]:
    """Pair runs of input and output axes with equal products (how a reshape regroups contiguous axes)."""
    i = j = 0
    groups: List[Tuple[List[int], List[int]]] = []
    while i < len(before) and j < len(after):
        gi, gj, pi, pj = [i], [j], before[i], after[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                if i == len(before):
                    return None
                gi.append(i)
                pi, i = pi * before[i], i + 1
            else:
                if j == len(after):
                    return None
                gj.append(j)
                pj, j = pj * after[j], j + 1
        groups.append((gi, gj))
    if any(before[k] != 1 for k in range(i, len(before))) or any(after[k] != 1 for k in range(j, len(after))):
        return None
    if groups:
        groups[-1][0].extend(range(i, len(before)))
        groups[-1][1].extend(range(j, len(after)))
    return groups


def _reshape_axes(axes: _Axes, before: Tuple[int, ...], after: Tuple[int, ...]) -> Optional[_Axes]:
    groups = _groups(before, after)
    if not groups or groups[0] != ([0], [0]) or len(after) < 1:
        return None
    roles: List[Optional[str]] = [None] * len(after)
    grid = axes.grid
    for gin, gout in groups:
        inside = [k for k in gin if before[k] != 1]
        outside = [k for k in gout if after[k] != 1]
        in_roles = [axes.roles[k] for k in inside]
        for k in gout:
            roles[k] = "S"  # size-1 axes made here hold one position
        if len(inside) == 1 and len(outside) == 1:
            roles[outside[0]] = in_roles[0]
        elif not inside and not outside:
            continue
        elif len(outside) == 1 and set(in_roles) == {"S"} and "T" not in axes.roles:
            roles[outside[0]], grid = "T", tuple(before[k] for k in inside)  # positions flattened into tokens
        elif len(inside) == 1 and in_roles == ["T"] and not axes.prefix and not axes.suffix and \
                tuple(after[k] for k in outside) == axes.grid:
            grid = None  # tokens unflattened back into their grid
        elif set(in_roles) == {"S"}:
            continue
        else:
            return None
    if roles.count("C") != 1 or roles[0] != "B" or roles.count("T") > 1:
        return None
    keep_tokens = "T" in roles
    return _Axes(tuple(roles), grid if keep_tokens else None, axes.prefix if keep_tokens else 0,
                 axes.suffix if keep_tokens else 0)


def _index_axes(axes: _Axes, shape: Tuple[int, ...], index: Any) -> Optional[_Axes]:
    """Basic indexing with slices (and Ellipsis): axes stay; slicing the token axis drops prefix/suffix tokens."""
    index = index if isinstance(index, tuple) else (index,)
    if any(not isinstance(i, slice) and i is not Ellipsis for i in index) or list(index).count(Ellipsis) > 1:
        return None
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(shape) - len(index) + 1) + index[at + 1:]
    prefix, suffix = axes.prefix, axes.suffix
    for axis, part in enumerate(index):
        if part == slice(None):
            continue
        if not all(isinstance(v, (int, type(None))) for v in (part.start, part.stop, part.step)):
            return None
        start, stop, step = part.indices(shape[axis])
        if axes.roles[axis] == "T":
            if step != 1:
                return None
            first, end = prefix, shape[axis] - suffix  # the patches occupy [first, end)
            if start > first or stop < end:
                return None
            prefix, suffix = first - start, stop - end
    return replace(axes, prefix=prefix, suffix=suffix)


def layout_of(axes: Optional[_Axes], shape: Tuple[int, ...], input_size: Tuple[int, ...]) -> Layout:
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
        if name not in given and _channels_first_by_structure(gm, node):
            layouts[name] = CHANNELS_FIRST
            del pending[name]
    if pending:
        example = example if example is not None else _zero_input(gm, input_spec)
        reader = read_graph(gm, example) if example is not None else None
        for name, node in pending.items():
            if reader is None:
                layouts[name] = Layout("unknown", reason="the graph needs a run to tell: convert with example_input=")
            elif node not in reader.shapes:
                layouts[name] = Layout("unknown", reason=f"node {node.name!r} does not produce a tensor")
            else:
                layouts[name] = layout_of(reader.axes.get(node), reader.shapes[node], tuple(example.shape[2:]))
            if name in given:  # layout="tokens": the grid and prefix come from the graph when it holds them
                read = layouts[name]
                layouts[name] = replace(read, reason="layout='tokens' given; grid read from the graph") \
                    if read.kind == "tokens" else given[name]
    return {name: layouts[name] for name in nodes}


def _needs_grid(layout: Layout) -> bool:
    return layout.kind == "tokens" and layout.grid is None


_READERS: "weakref.WeakKeyDictionary[fx.GraphModule, Tuple[Any, Optional[_Reader]]]" = weakref.WeakKeyDictionary()


def read_graph(gm: fx.GraphModule, example: Tensor) -> Optional[_Reader]:
    """Shapes of one run of ``gm`` (on fake tensors: no compute; a real run when that fails), and every axis.
    The last reading of each graph is kept, so that ``auto`` and the layouts share one run."""
    key = (tuple(example.shape[1:]), example.dtype, len(gm.graph.nodes))
    cached = _READERS.get(gm)
    if cached is not None and cached[0] == key:
        return cached[1]
    shapes = _shapes(gm, example)
    reader = _Reader(gm, shapes) if shapes is not None else None
    _READERS[gm] = (key, reader)
    return reader


def _shapes(gm: fx.GraphModule, example: Tensor) -> Optional[Dict[fx.Node, Tuple[int, ...]]]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    shapes: Dict[fx.Node, Tuple[int, ...]] = {}

    class ShapeRecorder(fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if isinstance(value, Tensor):
                shapes[node] = tuple(int(s) for s in value.shape)
            return value

    parameter = next(gm.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    try:  # a batch of 2 on fake tensors: free, and a reshape that folds the batch away shows
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            ShapeRecorder(gm).run(torch.empty((2,) + tuple(example.shape[1:]), dtype=example.dtype, device=device))
        return shapes
    except Exception:  # data-dependent ops cannot run on fake tensors; fall back to a real run
        shapes.clear()
    if example.device.type == "meta":
        return None
    try:
        with torch.no_grad():
            ShapeRecorder(gm).run(example)
        return shapes
    except Exception:  # the model does not run on this input: the layout stays unknown, with the reason
        return None


def _zero_input(gm: fx.GraphModule, input_spec: Optional[Tuple[int, int]]) -> Optional[Tensor]:
    """A stand-in for the input, on the meta device: only its shape is used (on fake tensors)."""
    if input_spec is None:
        return None
    rank, channels = input_spec
    parameter = next(gm.parameters(), None)
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    return torch.empty((1, channels) + (224,) * (rank - 2), dtype=dtype, device="meta")


_KEEPS_LAYOUT_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                         nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Identity,
                         nn.modules.dropout._DropoutNd, nn.Softplus, nn.Hardtanh)
_KEEPS_LAYOUT_FUNCTIONS = {"relu", "relu_", "relu6", "rectify", "add", "iadd", "sub", "mul", "imul", "truediv",
                           "sigmoid", "tanh", "silu", "gelu", "hardswish", "hardsigmoid", "leaky_relu", "elu", "clone",
                           "contiguous", "dropout", "add_", "mul_", "clamp", "clamp_", "clamp_min", "hardtanh", "neg"}


def _channels_first_by_structure(gm: fx.GraphModule, node: fx.Node, budget: int = 64) -> bool:
    """True when every path back from ``node`` through elementwise ops ends at a convolution, pooling or batch
    norm (a CNN's capture): channels first, no run needed. False means "not shown": read it from a run."""
    stack, seen = [node], set()
    while stack and budget > 0:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        budget -= 1
        module = gm.get_submodule(current.target) if current.op == "call_module" else None
        name = _name(current.target)
        if isinstance(module, _CHANNELS_FIRST_MODULES) or (current.op == "call_function" and
                                                           name in _CHANNELS_FIRST_FUNCTIONS):
            return True
        keeps = isinstance(module, _KEEPS_LAYOUT_MODULES) or (current.op in ("call_function", "call_method") and
                                                               name in _KEEPS_LAYOUT_FUNCTIONS)
        if not keeps:
            return False
        first = current.args[0] if current.args else None
        if not isinstance(first, fx.Node):
            return False
        stack.append(first)
    return False


def auto_layer(gm: fx.GraphModule, example: Tensor) -> Optional[Tuple[fx.Node, str]]:
    """``layer="auto"`` for transformers (None for CNNs: the CNN rule applies).

    A model whose head reads its class token: the input of the last attention (the norm before it), the last
    token map whose patch tokens still reach that token. A pooled model (Swin, a ViT with average pooling): the
    last map of positions before the pooling.
    """
    if not _has_transformer_ops(gm):
        return None
    reader = read_graph(gm, example)
    if reader is None:
        return None
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    upstream = _ancestors([output])
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


def _selects_or_permutes(reader: _Reader, node: fx.Node) -> bool:
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    return (node.op == "call_function" and node.target is operator.getitem) or _is_permute(node, reader.module(node))


def _cnn_would_find(reader: _Reader, node: fx.Node) -> bool:
    """A channels-first map with the last convolution's spatial size: the CNN rule finds it (ConvNeXt, MaxViT)."""
    convs = [n for n in reader.gm.graph.nodes if n in reader.shapes and
             (isinstance(reader.module(n), nn.modules.conv._ConvNd) or _name(n.target) in ("conv1d", "conv2d", "conv3d"))]
    axes = reader.axes[node]
    return bool(convs) and axes.roles[1] == "C" and "T" not in axes.roles and \
        reader.shapes[node][2:] == reader.shapes[convs[-1]][2:]


def _has_transformer_ops(gm: fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, (nn.LayerNorm, nn.MultiheadAttention)) or type(module).__name__ == "Permute":
            return True
        if node.op in ("call_function", "call_method") and _name(node.target) in (
                "layer_norm", "permute", "transpose", "scaled_dot_product_attention", "softmax"):
            return True
    return False


def _is_map(reader: _Reader, node: fx.Node) -> bool:
    axes = reader.axes.get(node)
    if axes is None:
        return False
    layout = layout_of(axes, reader.shapes[node], ())
    if layout.kind == "unknown":
        return False
    positions = math.prod(layout.grid) if layout.kind == "tokens" else \
        math.prod(reader.shapes[node][k] for k, r in enumerate(axes.roles) if r == "S")
    return positions > 1


def _ancestors(nodes: Sequence[fx.Node]) -> set:
    seen, stack = set(), list(nodes)
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                stack.append(arg)
    return seen


def _class_token_read(reader: _Reader, upstream: set) -> Optional[fx.Node]:
    """The last ``x[:, i]`` on a token map that picks a prefix token (the class token), on the way to the output."""
    found = None
    for node in reader.gm.graph.nodes:
        if node not in upstream or node.op != "call_function" or node.target is not operator.getitem:
            continue
        source, index = node.args
        axes = reader.axes.get(source) if isinstance(source, fx.Node) else None
        if axes is None or "T" not in axes.roles or not axes.prefix:
            continue
        index = index if isinstance(index, tuple) else (index,)
        token_axis = axes.roles.index("T")
        if len(index) > token_axis and isinstance(index[token_axis], int) and \
                0 <= index[token_axis] < axes.prefix and all(i == slice(None) for i in index[:token_axis]):
            found = node
    return found


def _is_attention(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), (nn.MultiheadAttention, nn.Softmax))
    return node.op in ("call_function", "call_method") and _name(node.target) in _ATTENTION_FUNCTIONS


def _attention_input(reader: _Reader, read: fx.Node) -> Optional[fx.Node]:
    before = _ancestors([read])
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
        if _feature_norm(module, node, reader.shapes.get(node, ())) == "last" and _is_map(reader, node):
            return node
        queue.extend(node.all_input_nodes)
    return None
