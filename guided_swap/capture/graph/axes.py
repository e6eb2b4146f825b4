"""Reading a traced graph's tensors axis by axis: which axis of each tensor is the batch, the channels, a spatial
axis, or a token axis (positions flattened from a patch grid, with tokens concatenated before and after them).

:mod:`guided_swap.capture.graph.layouts` turns a captured node's axes into the :class:`~guided_swap.core.layout.Layout` the CAMs
apply. Every tensor is followed from the input with the shapes of one run (on fake tensors: no compute):
convolutions, pooling and batch norms make channels-first maps; ``Linear``/``LayerNorm`` over the last axis make it
the channels; permutes, transposes, reshapes, slices and ``cat`` move or extend the axes; anything else that keeps
a tensor's shape keeps its axes.

>>> import torch, torchvision
>>> from guided_swap.capture.graph.trace import trace
>>> traced = trace(torchvision.models.vit_b_16())
>>> reader = read_graph(traced.module, torch.zeros(1, 3, 224, 224))
>>> reader.axes[traced.node_names["encoder.ln"]]
Axes(roles=('B', 'T', 'C'), grid=(14, 14), prefix=1, suffix=0)
"""
import operator
import weakref
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ...core.inputs import empty_args, first_tensor, input_tensors, model_args

# An axis is "B" (batch), "C" (channels), "S" (spatial) or "T" (tokens: positions flattened from a grid); inside
# an attention also "H" (heads: the channels split, "C" then the channels of one head), "X" (the keys of an
# attention's scores: no positions of this tensor), or "BT" (batch and tokens folded into one axis, for a batch
# norm over every token: LeViT's ``bn(x.flatten(0, 1)).reshape_as(x)``).


@dataclass(frozen=True)
class Axes:
    roles: Tuple[str, ...]
    grid: Optional[Tuple[int, ...]] = None  # the T axis's patch grid (None: not known)
    prefix: int = 0
    suffix: int = 0


def channels_first_axes(rank: int) -> Optional[Axes]:
    return Axes(("B", "C") + ("S",) * (rank - 2)) if rank >= 3 else None


def channels_last_axes(rank: int) -> Optional[Axes]:
    if rank == 3:
        return Axes(("B", "T", "C"))
    return Axes(("B",) + ("S",) * (rank - 2) + ("C",)) if rank > 3 else None


CHANNELS_FIRST_MODULES = (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                           nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
                           nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
                           nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.LPPool1d, nn.LPPool2d)
_CHANNELS_FIRST_FUNCTIONS = {
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "max_pool1d",
    "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "batch_norm",
    "group_norm", "instance_norm", "interpolate", "upsample", "pixel_shuffle", "pixel_unshuffle",
    "max_pool2d_with_indices", "conv2d_relu", "lp_pool2d",
    # the aten forms the export path's graph holds
    "convolution", "_convolution", "max_pool1d_with_indices", "max_pool3d_with_indices", "native_batch_norm",
    "_native_batch_norm_legit", "_native_batch_norm_legit_no_training", "cudnn_batch_norm", "native_group_norm",
    "upsample_nearest2d", "upsample_bilinear2d", "upsample_nearest3d", "upsample_trilinear3d",
    "_adaptive_avg_pool2d", "_adaptive_avg_pool3d"}
RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}


def name_of(target: Any) -> str:
    """The op's plain name: ``conv2d`` for ``F.conv2d``, ``"conv2d"`` (a method) and ``aten.conv2d.default``
    alike (the export path's graph holds aten overloads)."""
    if isinstance(target, str):
        return target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return target._schema.name.split("::")[-1] if hasattr(target, "_schema") else target.__name__.split(".")[0]
    return getattr(target, "__name__", "")


class Reader:
    """Every tensor node's axes, given the shapes of one run (:func:`read_graph`)."""

    def __init__(self, gm: fx.GraphModule, shapes: Dict[fx.Node, Tuple[int, ...]]):
        self.gm, self.shapes = gm, shapes
        inputs = [shapes[n] for n in gm.graph.nodes if n.op == "placeholder" and n in shapes]
        #: how many spatial axes the model's input has (2 for images); None if no input shape is known
        self.input_spatial_rank: Optional[int] = len(inputs[0]) - 2 if inputs else None
        self.axes: Dict[fx.Node, Optional[Axes]] = {}
        for node in gm.graph.nodes:
            if node in shapes:
                self.axes[node] = self._read(node)

    def module(self, node: fx.Node) -> Optional[nn.Module]:
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None

    def _read(self, node: fx.Node) -> Optional[Axes]:
        shape = self.shapes[node]
        rank = len(shape)
        module = self.module(node)
        name = name_of(node.target)
        if node.op == "placeholder":
            return channels_first_axes(rank)
        if node.op == "get_attr":
            return None
        if isinstance(module, CHANNELS_FIRST_MODULES) or (node.op == "call_function" and
                                                          name in _CHANNELS_FIRST_FUNCTIONS):
            return self._same_shape(node) if rank == 2 and _is_batch_norm(module, name) else channels_first_axes(rank)
        norm = feature_norm(module, node, shape)
        if norm == "first":
            return channels_first_axes(rank)
        if norm == "last" or isinstance(module, nn.Linear) or (node.op == "call_function" and name == "linear"):
            return self._features_last(node, rank)
        if is_permute(node, module):
            return self._permuted(node, module, rank)
        if node.op in ("call_method", "call_function") and name in RESHAPES:
            return self._reshaped(node)
        if node.op == "call_function" and node.target is operator.getitem:
            return self._indexed(node)
        if node.op == "call_function" and name == "slice" and isinstance(node.target, torch._ops.OpOverload):
            return self._sliced(node)
        if node.op == "call_function" and name in ("cat", "concat", "concatenate"):
            return self._concatenated(node)
        if node.op in ("call_method", "call_function") and name in ("matmul", "bmm"):
            return self._multiplied(node) or self._same_shape(node)
        return self._same_shape(node)

    def _input(self, node: fx.Node) -> Optional[fx.Node]:
        first = node.args[0] if node.args else node.kwargs.get("input")
        return first if isinstance(first, fx.Node) and first in self.shapes else None

    def _features_last(self, node: fx.Node, rank: int) -> Optional[Axes]:
        source = self._input(node)
        before = self.axes.get(source) if source is not None else None
        if before is None or len(before.roles) != rank:
            return channels_last_axes(rank)
        if before.roles[-1] == "C":
            return before
        if before.roles[-1] == "T" and self.shapes[source][-1] == self.shapes[node][-1]:
            return before  # token mixing over the last axis (an MLP-Mixer's): positions keep their place
        return None

    def _permuted(self, node: fx.Node, module: Optional[nn.Module], rank: int) -> Optional[Axes]:
        before = self.axes.get(self._input(node))
        perm = _permutation(node, module, rank)
        if before is None or perm is None or len(before.roles) != rank:
            return None
        return replace(before, roles=tuple(before.roles[p] for p in perm))

    def _reshaped(self, node: fx.Node) -> Optional[Axes]:
        source = self._input(node)
        before = self.axes.get(source)
        if before is None:
            return None
        return _reshape_axes(before, self.shapes[source], self.shapes[node])

    def _indexed(self, node: fx.Node) -> Optional[Axes]:
        source, index = node.args[0], node.args[1]
        if isinstance(source, fx.Node) and source not in self.shapes:
            return self._tuple_entry(source, index)
        before = self.axes.get(source)
        if before is None:
            return None
        return _index_axes(before, self.shapes[source], index)

    def _sliced(self, node: fx.Node) -> Optional[Axes]:
        """``aten.slice(x, dim, start, end, step)``: the export path's form of ``x[..., start:end:step]`` (Swin's
        patch merging takes ``x[:, 0::2, 0::2]``), read as that index."""
        source = self._input(node)
        before = self.axes.get(source) if source is not None else None
        args = list(node.args[1:]) + [None] * 4
        dim = node.kwargs.get("dim", args[0] if args[0] is not None else 0)
        start, end = node.kwargs.get("start", args[1]), node.kwargs.get("end", args[2])
        step = node.kwargs.get("step", args[3] if args[3] is not None else 1)
        shape = self.shapes[source] if source is not None else ()
        if before is None or not all(isinstance(v, (int, type(None))) for v in (dim, start, end, step)):
            return None
        index = (slice(None),) * (dim % len(shape)) + (slice(start, end, step),)
        return _index_axes(before, shape, index)

    def _tuple_entry(self, source: fx.Node, index: Any) -> Optional[Axes]:
        module = self.module(source)
        if isinstance(module, nn.MultiheadAttention) and module.batch_first and index == 0:
            return self.axes.get(self._input(source))
        if source.op in ("call_method", "call_function") and name_of(source.target) in ("split", "split_with_sizes"):
            return self._split_entry(source, index)
        return None

    def _split_entry(self, split: fx.Node, index: Any) -> Optional[Axes]:
        """Chunk ``index`` of ``torch.split(x, sizes, dim)``, read as the slice of ``x`` it is (an attention's
        ``qkv.split([k, k, v], dim=-1)`` splits the channels: each chunk keeps the axes)."""
        source = self._input(split)
        before = self.axes.get(source) if source is not None else None
        sizes = split.args[1] if len(split.args) > 1 else split.kwargs.get(
            "split_size_or_sections", split.kwargs.get("split_sizes"))
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        if before is None or not isinstance(index, int) or not isinstance(dim, int):
            return None
        shape = self.shapes[source]
        if isinstance(sizes, int):
            sizes = [sizes] * -(-shape[dim] // sizes)
        if not isinstance(sizes, (list, tuple)) or not 0 <= index < len(sizes) or \
                not all(isinstance(size, int) for size in sizes[:index + 1]):
            return None
        start = sum(sizes[:index])
        return _index_axes(before, shape, (slice(None),) * (dim % len(shape)) + (slice(start, start + sizes[index]),))

    def _multiplied(self, node: fx.Node) -> Optional[Axes]:
        """``a @ b`` inside an attention: the rows of ``a`` and the columns of ``b``, over the same leading axes.
        ``q @ k.transpose(-2, -1)`` gives the query's tokens by the keys ("X"); ``scores @ v`` the query's tokens
        by the value's channels; LeViT's convolutional ``v @ scores.transpose(-2, -1)`` channels by the query's
        tokens (columns are positions only when the keys are what is summed over)."""
        a, b = (node.args + (None, None))[:2]
        left, right = self.axes.get(a), self.axes.get(b)
        if left is None or right is None or len(left.roles) != len(right.roles) or len(left.roles) < 3 or \
                left.roles[:-2] != right.roles[:-2]:
            return None
        row, column = left.roles[-2], right.roles[-1]
        if column == "T" and (row == "T" or right.roles[-2] != "X"):
            column = "X"  # the keys a query is scored against: no positions of this tensor
        tokens = left if row == "T" else right if column == "T" else None
        roles = left.roles[:-2] + (row, column)
        if tokens is None:
            return Axes(roles)
        return Axes(roles, tokens.grid, tokens.prefix, tokens.suffix)

    def _concatenated(self, node: fx.Node) -> Optional[Axes]:
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

    def _same_shape(self, node: fx.Node) -> Optional[Axes]:
        """Anything else keeps the layout of an input of exactly its shape (elementwise ops, norms, attention
        functions that return their query's shape, residual additions)."""
        shape = self.shapes[node]
        candidates: List[Axes] = []
        for arg in node.all_input_nodes:
            axes = self.axes.get(arg)
            if axes is not None and self.shapes.get(arg) == shape:
                candidates.append(axes)
        if not candidates:
            return None
        return min(candidates, key=lambda axes: "T" in axes.roles and axes.grid is None)


def feature_norm(module: Optional[nn.Module], node: fx.Node, shape: Tuple[int, ...]) -> Optional[str]:
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
    if node.op == "call_function" and name_of(node.target) in ("layer_norm", "rms_norm"):
        normalized = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        if isinstance(normalized, int):
            normalized = (normalized,)
        if isinstance(normalized, (tuple, list)) and len(normalized) == 1 and normalized[0] == shape[-1]:
            return "last"
    return None


def _is_batch_norm(module: Optional[nn.Module], name: str) -> bool:
    """A batch norm, module or function: on a ``(N, C)`` input it normalises each channel over the rows."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or "batch_norm" in name


def is_permute(node: fx.Node, module: Optional[nn.Module]) -> bool:
    if module is not None:
        return type(module).__name__ == "Permute" and hasattr(module, "dims")
    name = name_of(node.target)
    return node.op in ("call_method", "call_function") and name in ("permute", "transpose", "swapaxes", "movedim",
                                                                     "moveaxis")


def _permutation(node: fx.Node, module: Optional[nn.Module], rank: int) -> Optional[Tuple[int, ...]]:
    """The output's axes as input axes (``out[i]`` comes from ``in[perm[i]]``)."""
    try:
        if module is not None:
            dims = list(module.dims)
        else:
            name, args = name_of(node.target), list(node.args[1:])
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


def _reshape_axes(axes: Axes, before: Tuple[int, ...], after: Tuple[int, ...]) -> Optional[Axes]:
    groups = _groups(before, after)
    if not groups or len(after) < 1:
        return None
    roles: List[Optional[str]] = [None] * len(after)
    grid = axes.grid
    for gin, gout in groups:
        inside = [k for k in gin if before[k] != 1]
        outside = [k for k in gout if after[k] != 1]
        in_roles = [axes.roles[k] for k in inside]
        for k in gout:
            roles[k] = "S"  # size-1 axes made here hold one position
        if 0 in gin:
            if not _regroup_batch([axes.roles[k] for k in gin], gin, gout, roles):
                return None
        elif len(inside) == 1 and len(outside) == 1:
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
        elif in_roles == ["C"] and len(outside) > 1:  # an attention's heads: (B, N, C) -> (B, N, heads, C / heads)
            for k in outside:
                roles[k] = "H" if k != outside[-1] else "C"
        elif len(outside) == 1 and in_roles[-1] == "C" and set(in_roles[:-1]) == {"H"}:
            roles[outside[0]] = "C"  # the heads joined again
        else:
            return None
    if roles.count("C") != 1 or roles[0] not in ("B", "BT") or roles.count("T") + roles.count("BT") > 1:
        return None
    keep_tokens = "T" in roles or "BT" in roles
    return Axes(tuple(roles), grid if keep_tokens else None, axes.prefix if keep_tokens else 0,
                 axes.suffix if keep_tokens else 0)


def _regroup_batch(in_roles: List[str], gin: List[int], gout: List[int], roles: List[Optional[str]]) -> bool:
    """The group holding the batch: kept as it is, tokens folded into it (``x.flatten(0, 1)`` of ``(B, N, C)``,
    for a batch norm over every token) or unfolded from it (``.reshape_as(x)`` back to ``(B, N, C)``)."""
    if gin == [0] and gout == [0]:
        roles[0] = in_roles[0]
        return roles[0] in ("B", "BT")
    if gout == [0] and gin == [0, 1] and in_roles == ["B", "T"]:
        roles[0] = "BT"
        return True
    if gin == [0] and gout == [0, 1] and in_roles == ["BT"]:
        roles[0], roles[1] = "B", "T"
        return True
    return False


def _index_axes(axes: Axes, shape: Tuple[int, ...], index: Any) -> Optional[Axes]:
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


_READERS: "weakref.WeakKeyDictionary[fx.GraphModule, Tuple[Any, Optional[Reader]]]" = weakref.WeakKeyDictionary()


def read_graph(gm: fx.GraphModule, example: Any) -> Optional[Reader]:
    """Shapes of one run of ``gm`` (on fake tensors: no compute; a real run when that fails), and every axis.
    ``example`` is an input tensor or an :class:`~guided_swap.core.inputs.Inputs`. The last reading of each
    graph is kept, so that ``auto`` and the layouts share one run."""
    key = (tuple((tuple(t.shape[1:]), t.dtype) for t in input_tensors(example)), len(gm.graph.nodes))
    cached = _READERS.get(gm)
    if cached is not None and cached[0] == key:
        return cached[1]
    shapes = _shapes(gm, example)
    reader = Reader(gm, shapes) if shapes is not None else None
    _READERS[gm] = (key, reader)
    return reader


def _shapes(gm: fx.GraphModule, example: Any) -> Optional[Dict[fx.Node, Tuple[int, ...]]]:
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
            ShapeRecorder(gm).run(*empty_args(example, 2, device))
        return shapes
    except Exception:  # data-dependent ops cannot run on fake tensors; fall back to a real run
        shapes.clear()
    if first_tensor(example).device.type == "meta":
        return None
    try:
        with torch.no_grad():
            ShapeRecorder(gm).run(*model_args(example))
        return shapes
    except Exception:  # the model does not run on this input: the layout stays unknown, with the reason
        return None


_KEEPS_LAYOUT_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                         nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Identity,
                         nn.modules.dropout._DropoutNd, nn.Softplus, nn.Hardtanh)
_KEEPS_LAYOUT_FUNCTIONS = {"relu", "relu_", "relu6", "rectify", "add", "iadd", "sub", "mul", "imul", "truediv",
                           "sigmoid", "tanh", "silu", "gelu", "hardswish", "hardsigmoid", "leaky_relu", "elu", "clone",
                           "contiguous", "dropout", "add_", "mul_", "clamp", "clamp_", "clamp_min", "hardtanh", "neg"}


def channels_first_by_structure(gm: fx.GraphModule, node: fx.Node, budget: int = 64) -> bool:
    """True when the chain of first inputs back from ``node``, through elementwise ops and channel
    concatenations, reaches a convolution, pooling or batch norm (a CNN's capture): channels first, no run
    needed. False means "not shown": the layout is read from a run."""
    stack, seen = [node], set()
    while stack and budget > 0:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        budget -= 1
        module = gm.get_submodule(current.target) if current.op == "call_module" else None
        name = name_of(current.target)
        if isinstance(module, CHANNELS_FIRST_MODULES) or (current.op == "call_function" and
                                                           name in _CHANNELS_FIRST_FUNCTIONS):
            return True
        keeps = isinstance(module, _KEEPS_LAYOUT_MODULES) or (current.op in ("call_function", "call_method") and
                                                               name in _KEEPS_LAYOUT_FUNCTIONS)
        if current.op == "call_function" and name in ("cat", "concat") and cat_dim(current) == 1:
            stack.extend(t for t in current.args[0] if isinstance(t, fx.Node))  # channels joined: Inception
            continue
        if not keeps:
            return False
        first = current.args[0] if current.args else None
        if not isinstance(first, fx.Node):
            return False
        stack.append(first)
    return False


def cat_dim(node: fx.Node) -> Any:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)


def downstream(nodes, tensors) -> set:
    """``nodes`` and every node computed from them through tensors (or tuples of tensors: a split, an attention
    module's output); never through a size read off a tensor."""
    seen, stack = set(nodes), list(nodes)
    while stack:
        for user in stack.pop().users:
            if user not in seen and (user in tensors or any(u.target is operator.getitem and u in tensors
                                                            for u in user.users)):
                seen.add(user)
                stack.append(user)
    return seen


def upstream(nodes) -> set:
    """``nodes`` and every node they are computed from."""
    seen, stack = set(nodes), list(nodes)
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                stack.append(arg)
    return seen
