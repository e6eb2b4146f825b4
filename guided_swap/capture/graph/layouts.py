"""Where the channels and the positions of a captured tensor are, read from the graph.

The layout (:class:`~guided_swap.core.layout.Layout`) of each captured node is decided once, when the explain graph
is built: channels first when the graph shows it without a run (a CNN), else read axis by axis from the graph and
the shapes of one run (:mod:`guided_swap.capture.graph.axes`). Nothing is guessed from ``N`` being a square: the
grid is the one the patch-embedding convolution's output was flattened from, the prefix the tokens concatenated
before it. ``layer="auto"`` for transformers is chosen here too (:func:`auto_layer`).
"""
import math
import operator
from dataclasses import replace
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, fx, nn

from . import axes as graph_axes
from ...core.errors import LayerError
from ...core.inputs import first_tensor
from ...core.layout import CHANNELS_FIRST, Layout
from ..base import LayerChoice

_ATTENTION_FUNCTIONS = {"scaled_dot_product_attention", "multi_head_attention_forward", "softmax"}

def layout_of(axes: Optional[graph_axes.Axes], shape: Tuple[int, ...], input_size: Tuple[int, ...]) -> Layout:
    """The :class:`Layout` of a capture whose axes are ``axes`` (None: not understood)."""
    if axes is None and len(shape) == 2:
        return Layout("vector", reason="a (B, C) capture: one position")
    if axes is None:
        return Layout("unknown", reason=f"no channel axis could be followed to the capture {shape} from the input")
    roles = axes.roles
    inside = _inside_an_attention(roles)
    if inside:
        return Layout("unknown", reason=f"the capture {shape} is inside an attention: {inside}")
    if tuple(roles) == ("B", "C"):
        return Layout("vector", reason="read from the graph")
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


def _inside_an_attention(roles: Tuple[str, ...]) -> Optional[str]:
    """Why a tensor of these axes is no map, when it is an attention's working tensor (else None)."""
    if "H" in roles:
        return "its heads split the channels"
    if "X" in roles:
        return "it holds attention scores against the keys"
    if "BT" in roles:
        return "the batch and the tokens are folded into one axis"
    return None


# --- entry points: build.py calls these -------------------------------------------------------------------

def decide(gm: fx.GraphModule, nodes: Mapping[str, fx.Node], example: Any,
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
                size = tuple(first_tensor(example if example is not None else stand_in).shape[2:])
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


def transformer_layer(gm: fx.GraphModule, example: Any) -> Optional[LayerChoice]:
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
    upstream = graph_axes.upstream([output]) - {output}
    maps = [n for n in gm.graph.nodes if n in upstream and _is_map(reader, n)]
    if not maps or not any(reader.axes[n].roles[1] != "C" for n in maps):
        return None  # channels-first all along: a CNN
    read = _class_token_read(reader, upstream)
    if read is not None:
        chosen = _attention_input(reader, read)
        if chosen is not None:
            return LayerChoice(chosen, "auto: the input of the last attention (its norm's output): the last token map "
                                      "whose patch tokens still reach the class token the head reads")
    last = _last_outside_attention(reader, maps, output)
    if last is None:
        return None
    while _selects_or_permutes(reader, last) and _is_map(reader, last.args[0]):
        last = last.args[0]  # name the map itself, not a slice or a permuted view of it
    _refuse_if_positions_lost(reader, last, output)
    if _cnn_would_find(reader, last):
        return None
    return LayerChoice(last, "auto: the last map of positions before the pooling")


def _last_outside_attention(reader: graph_axes.Reader, maps: list, output: fx.Node) -> Optional[fx.Node]:
    """The last of ``maps`` that is not an attention's internal query, key or value projection
    (:func:`_feeds_one_side_only`): LeViT's subsampled queries are a map of positions, but their gradient is
    only what reaches the attention scores (about zero)."""
    from_input = graph_axes.downstream([n for n in reader.gm.graph.nodes if n.op == "placeholder"], reader.shapes)
    return next((node for node in reversed(maps) if not _feeds_one_side_only(reader, node, output, from_input)),
                None)


#: ops that combine two computed tensors the way an attention does (scores from queries and keys, the values
#: weighted by the scores); a tensor entering one of them on one side only is a query, key or value
_ATTENTION_MATHS = {"matmul", "bmm", "baddbmm", "einsum", "scaled_dot_product_attention",
                    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                    "multi_head_attention_forward"}


def _feeds_one_side_only(reader: graph_axes.Reader, node: fx.Node, output: fx.Node, from_input: set) -> bool:
    """Whether every path from ``node`` to the output enters attention maths (:data:`_ATTENTION_MATHS`) on one
    side only, where another side computed from the input is not reached from ``node``: a query, key or value
    projection. The attention's input reaches every side, and a map on the residual stream reaches the output
    around the attention. A fused key-value projection reaches the value product on both sides, the scores
    through its keys: what it reaches is narrowed until it holds only the paths not cut so."""
    reach = graph_axes.downstream([node], reader.shapes)
    while True:
        reached = _reached_on_every_side(reader, node, output, reach, from_input)
        if reached == reach or output not in reached:
            return output not in reached
        reach = reached


def _reached_on_every_side(reader: graph_axes.Reader, node: fx.Node, output: fx.Node, reach: set,
                           from_input: set) -> set:
    """The nodes reached from ``node`` without entering attention maths with a side computed from the input
    that is not in ``reach``."""
    reached, stack = {node}, [node]
    while stack:
        for user in stack.pop().users:
            if user in reached or (user is not output and not _carries_tensors(reader.shapes, user)):
                continue
            if _is_attention_maths(reader, user) and any(a in from_input and a not in reach
                                                         for a in user.all_input_nodes):
                continue  # entered on one side only: this path ends inside the attention
            reached.add(user)
            stack.append(user)
    return reached


def _is_attention_maths(reader: graph_axes.Reader, node: fx.Node) -> bool:
    return isinstance(reader.module(node), nn.MultiheadAttention) or (
        node.op in ("call_function", "call_method") and graph_axes.name_of(node.target) in _ATTENTION_MATHS)


def _refuse_if_positions_lost(reader: graph_axes.Reader, chosen: fx.Node, output: fx.Node) -> None:
    """Refuse ``chosen`` when the positions go on past it as tokens whose grid the graph reading lost: tokens on a
    tensor every path to the output crosses, rearranged from a map (a patch merging it cannot follow, say), and
    as many as no grid of ``chosen`` holds. ``chosen`` is then only the last map it could read, an earlier stage
    than the one before the pooling, and its map would be silently wrong. Tokens an attention made from
    queries of its own (a Perceiver's latents) are no positions, those of queries taken from a map (LeViT's
    subsampling attention) are; the same count of tokens (VOLO's class-attention blocks pass the
    patches on beside the class token) is the same grid."""
    order = {node: i for i, node in enumerate(reader.gm.graph.nodes)}
    for node in bottlenecks(reader.gm, output, set(reader.shapes)):
        axes = reader.axes.get(node)
        if order[node] <= order[chosen] or axes is None or "T" not in axes.roles or axes.grid is not None:
            continue
        count = reader.shapes[node][axes.roles.index("T")]
        if count > 1 and count not in _position_counts(reader, chosen) and _rearranged_from_a_map(reader, node):
            raise LayerError(
                f"layer='auto' cannot tell the last map before the pooling: after {_qualname(chosen)} "
                f"({_grid_size(reader, chosen)}), the last map whose layout it can read, the positions go on as the "
                f"tokens of {_qualname(node)} {reader.shapes[node]}, whose patch grid could not be followed through "
                "the graph (a patch merging it does not know). Pass layer=NAME with "
                "layout=guided_swap.Layout('tokens', grid=(h, w)) or reshape= (docs/transformers.md); see "
                "guided_swap.layer_names(model) for every name")


#: ops that move a tensor's values without mixing positions (the ops of a patch merging), those that act on
#: each position's features alone, and an attention's products, followed through their first operand (the
#: queries: an attention gives one output per query, LeViT's subsampled queries a smaller grid): back through
#: these from lost tokens, a map means the tokens are its positions
_REARRANGING = graph_axes.RESHAPES | {"permute", "transpose", "swapaxes", "movedim", "contiguous", "clone", "cat",
                                     "concat", "slice", "getitem", "unfold", "im2col", "pad", "constant_pad_nd",
                                     "dropout", "linear", "layer_norm", "rms_norm", "batch_norm", "add", "mul",
                                     "relu", "gelu", "silu", "hardswish", "softmax", "matmul", "bmm",
                                     "scaled_dot_product_attention"}
_PER_POSITION_MODULES = (nn.Linear, nn.LayerNorm, nn.Dropout, nn.Identity, nn.modules.batchnorm._BatchNorm, nn.ReLU,
                         nn.GELU, nn.SiLU, nn.Hardswish, nn.Softmax)


def _rearranged_from_a_map(reader: graph_axes.Reader, node: fx.Node, budget: int = 64) -> bool:
    """Whether ``node``'s tokens come from a readable map through rearranging ops only (:data:`_REARRANGING`)."""
    while budget > 0:
        budget -= 1
        name = graph_axes.name_of(node.target)
        module = reader.module(node)
        if module is not None and isinstance(module, _PER_POSITION_MODULES):
            name = "linear"
        if node.op not in ("call_function", "call_method", "call_module") or name not in _REARRANGING:
            return False
        first = node.args[0] if node.args else None
        if isinstance(first, (list, tuple)) and first:  # cat's tensors
            first = first[0]
        if not isinstance(first, fx.Node) or first not in reader.shapes:
            return False
        if _is_map(reader, first):
            return True
        node = first
    return False


def bottlenecks(gm: fx.GraphModule, output: fx.Node, tensors: set) -> list:
    """The nodes every tensor path from the input to ``output`` crosses, in graph order (``tensors``: the nodes
    whose value is a tensor; a size read off the input, the export graph's ``sym_size``, is no such path).

    In a graph in topological order, a node is on every path from the input to the output exactly when no
    edge between two nodes on such paths jumps over it: one sweep over the edges (a residual connection jumps
    over its block).
    """
    nodes = list(gm.graph.nodes)
    on_path = _on_input_paths(nodes, output, tensors)
    order = {node: i for i, node in enumerate(nodes)}
    cover = [0] * (len(nodes) + 1)
    for node in nodes:
        for arg in node.all_input_nodes if node in on_path else ():
            if arg in on_path:
                cover[order[arg] + 1] += 1
                cover[order[node]] -= 1
    found, jumps = [], 0
    for i, node in enumerate(nodes):
        jumps += cover[i]
        if node in on_path and jumps == 0:
            found.append(node)
    return found


def _on_input_paths(nodes: list, output: fx.Node, tensors: set) -> set:
    """The nodes on tensor paths from the input that the output is computed from: tensors, tuples of tensors
    (an attention module's output, a split) and the output; never a size read off a tensor."""
    from_input = set()
    for node in nodes:
        if node.op == "placeholder" or ((node is output or _carries_tensors(tensors, node)) and
                                        any(a in from_input for a in node.all_input_nodes)):
            from_input.add(node)
    return from_input & graph_axes.upstream([output])


def _position_counts(reader: graph_axes.Reader, node: fx.Node) -> set:
    """How many tokens hold the positions of the map ``node``: its grid, with and without prefix and suffix."""
    axes = reader.axes[node]
    if "T" in axes.roles:
        return {math.prod(axes.grid), math.prod(axes.grid) + axes.prefix + axes.suffix}
    return {math.prod(reader.shapes[node][k] for k, r in enumerate(axes.roles) if r == "S")}


def _grid_size(reader: graph_axes.Reader, node: fx.Node) -> str:
    """``16x16``: the grid of a token map, the spatial size of any other map."""
    axes = reader.axes[node]
    sizes = axes.grid if "T" in axes.roles else [reader.shapes[node][k] for k, r in enumerate(axes.roles) if r == "S"]
    return "x".join(str(size) for size in sizes)


def _qualname(node: fx.Node) -> str:
    return repr(node.meta.get("qualname", node.name))


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
    """The last read of prefix tokens (the class token) of a token map that reaches the output through such
    reads only: the head's read. A class-attention block's ``x[:, :1]`` (CaiT, VOLO) is no such read: its
    token map also goes, whole, into the attention."""
    reads = [node for node in reader.gm.graph.nodes
             if node in upstream and node.op == "call_function" and _picks_a_prefix_token(reader, node)]
    return next((read for read in reversed(reads) if _only_prefix_reaches_output(reader, read, upstream)), None)


def _only_prefix_reaches_output(reader: graph_axes.Reader, read: fx.Node, upstream: set) -> bool:
    """Whether the token map ``read`` reads reaches the output only through reads of its prefix tokens."""
    tensor, taken = read.args[0], {read}
    if tensor not in reader.shapes:  # a chunk of a split: every chunk used must be prefix tokens
        if not all(_picks_a_prefix_token(reader, chunk) for chunk in tensor.users if chunk in upstream):
            return False
        tensor, taken = tensor.args[0], {tensor}
    return all(user in taken or (user.op == "call_function" and _picks_a_prefix_token(reader, user))
               for user in tensor.users if user in upstream and _carries_tensors(reader.shapes, user))


def _carries_tensors(tensors, node: fx.Node) -> bool:
    """A tensor, or a tuple of them (an attention module's output, a split), not a size read off one."""
    return node in tensors or any(user.target is operator.getitem and user in tensors for user in node.users)


def _picks_a_prefix_token(reader: graph_axes.Reader, node: fx.Node) -> bool:
    """Whether ``node`` reads prefix tokens only (the class token) of a token map: ``x[:, i]`` or ``x[:, :1]``
    (fx), ``aten.select``/``aten.slice`` (the export path's graph), or a chunk of ``torch.split`` along the
    tokens (CvT splits its class token off this way)."""
    source = node.args[0] if node.args else None
    if node.target is operator.getitem and isinstance(source, fx.Node) and source not in reader.shapes:
        return _split_chunk_in_prefix(reader, source, node.args[1])
    axes = reader.axes.get(source) if isinstance(source, fx.Node) else None
    if axes is None or "T" not in axes.roles or not axes.prefix:
        return False
    token_axis = axes.roles.index("T")
    if node.target is operator.getitem:
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if len(index) <= token_axis or not all(i == slice(None) for i in index[:token_axis]):
            return False
        picked = index[token_axis]
    elif graph_axes.name_of(node.target) in ("select", "slice") and len(node.args) >= 3:
        dim = node.args[1]
        if not isinstance(dim, int) or dim % len(axes.roles) != token_axis:
            return False
        picked = node.args[2] if graph_axes.name_of(node.target) == "select" else slice(*node.args[2:5])
    else:
        return False
    return _within(picked, reader.shapes[source][token_axis], axes.prefix)


def _within(picked: Any, length: int, prefix: int) -> bool:
    """Whether an int or slice of an axis of ``length`` picks positions below ``prefix`` only (and some)."""
    if isinstance(picked, int) and not isinstance(picked, bool):
        return 0 <= picked % length < prefix
    if isinstance(picked, slice) and all(isinstance(v, (int, type(None))) for v in (picked.start, picked.stop,
                                                                                     picked.step)):
        chosen = range(*picked.indices(length))
        return len(chosen) > 0 and max(chosen) < prefix and min(chosen) >= 0
    return False


def _split_chunk_in_prefix(reader: graph_axes.Reader, split: fx.Node, chunk: Any) -> bool:
    """``torch.split(x, sizes, dim)[chunk]`` (or ``aten.split_with_sizes``) with that chunk in x's prefix tokens."""
    if split.op not in ("call_function", "call_method") or graph_axes.name_of(split.target) not in (
            "split", "split_with_sizes") or not isinstance(chunk, int) or not split.args:
        return False
    source = split.args[0]
    axes = reader.axes.get(source) if isinstance(source, fx.Node) else None
    sizes = split.args[1] if len(split.args) > 1 else split.kwargs.get("split_size_or_sections",
                                                                        split.kwargs.get("split_sizes"))
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if axes is None or "T" not in axes.roles or not axes.prefix or not isinstance(dim, int):
        return False
    token_axis, length = axes.roles.index("T"), reader.shapes[source][axes.roles.index("T")]
    if dim % len(axes.roles) != token_axis:
        return False
    if isinstance(sizes, int):
        sizes = [sizes] * -(-length // sizes)
    if not isinstance(sizes, (list, tuple)) or not 0 <= chunk < len(sizes) or \
            not all(isinstance(v, int) for v in sizes[:chunk + 1]):  # fx may hold later sizes as graph nodes
        return False
    start = sum(sizes[:chunk])
    return _within(slice(start, start + sizes[chunk]), length, axes.prefix)


def _is_attention(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), (nn.MultiheadAttention, nn.Softmax))
    return node.op in ("call_function", "call_method") and graph_axes.name_of(node.target) in _ATTENTION_FUNCTIONS


def _attention_input(reader: graph_axes.Reader, read: fx.Node) -> Optional[fx.Node]:
    before = graph_axes.upstream([read]) - {read}
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
