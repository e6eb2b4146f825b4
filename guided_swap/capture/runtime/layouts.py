"""The layout of a run-time capture, read from its shape and the model, since no graph says which axis is which.

The graph paths follow every axis from the input (:mod:`guided_swap.capture.graph.axes`); the run-time path sees
only the captured tensor. A capture is channels first only where that is known: a map of an input's rank
whose axis 1 holds the channels of the last module that ran before it (a convolution's, a norm's, a linear
layer's), or, without such a module, a count no axis but axis 1 matches. Otherwise:

- a map whose *last* axis holds those channels (after a ``LayerNorm`` over the last axis: a Swin's ``norm``) is
  channels last, where its other axes are a grid the model's convolutions made (or a merging of one);
- a ``(B, N, C)`` capture of an image model is tokens where exactly one grid fits: a convolution's output grid
  (the patch embedding's: input size / stride), or that grid halved by patch mergings, with ``N - h*w``
  class or register tokens first (fewer than the patches, at most :data:`MAX_PREFIX`);
- anything else is a :class:`~guided_swap.core.layout.Layout` of kind ``"unknown"``: asking for a CAM raises
  :class:`~guided_swap.core.errors.LayerError` naming ``layout=`` and ``reshape=``.

``convert(layout=..., reshape=...)`` always wins; ``layout="tokens"`` without a grid gets the grid read here.

>>> read_layout((2, 17, 32), 32, {3, 32}, {(4, 4)}, ((32, 32),)).describe()
'tokens (B, N, C): 1 prefix + 4x4 patches'
>>> read_layout((2, 2, 2, 768), 768, {2, 768}, {(16, 16)}, ((64, 64),)).kind
'nhwc'
>>> read_layout((2, 17, 32), 32, {32}, set(), ((32, 32),)).kind
'unknown'
"""
import math
from dataclasses import replace
from typing import AbstractSet, Iterable, Optional, Sequence, Set, Tuple

from torch import nn

from ...core.layout import CHANNELS_FIRST, VECTOR, Layout

MAX_PREFIX = 16  # class, distillation and register tokens before the patches: DeiT 2, register ViTs 5
Shape = Tuple[int, ...]


def channel_count(module: nn.Module) -> Optional[int]:
    """How many channels ``module`` returns, where its kind says (convolutions, norms, linear layers)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.modules.batchnorm._NormBase):  # batch and instance norms
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1] if module.normalized_shape else None
    if isinstance(module, nn.Linear):
        return module.out_features
    return None


def channel_counts(model: nn.Module) -> Set[int]:
    """Every channel count the model's modules take or return."""
    counts = set()
    for module in model.modules():
        counts.update(c for c in (channel_count(module), getattr(module, "in_channels", None),
                                  getattr(module, "in_features", None), getattr(module, "embed_dim", None))
                      if isinstance(c, int))
    return counts


def read_layout(shape: Shape, evidence: Optional[int], channels: AbstractSet[int], grids: Iterable[Shape],
                sizes: Sequence[Shape]) -> Layout:
    """The layout of a capture of ``shape`` (module docstring). ``evidence``: the channel count of the last
    module that ran before the capture was taken (None: none said); ``channels``: every count the model's
    modules use; ``grids``: the spatial sizes of this forward's convolution outputs; ``sizes``: the explained
    inputs' spatial sizes."""
    rank, ranks = len(shape), {len(size) + 2 for size in sizes}
    if rank == 2:
        return VECTOR
    if rank in ranks:
        return _map_layout(shape, evidence, channels, grids)
    if rank + 1 in ranks:
        size = next(s for s in sizes if len(s) + 2 == rank + 1)
        return _token_layout(shape, evidence, channels, grids, size)
    return _unknown(f"a {rank}-D capture of a model whose inputs have {sorted(ranks)} dimensions is neither a map "
                    "nor tokens")


def tokens_given(shape: Shape, given: Layout, grids: Iterable[Shape], sizes: Sequence[Shape]) -> Layout:
    """``layout="tokens"`` given without a grid: the grid and prefix read as for an inferred token layout."""
    size = next((s for s in sizes if len(s) + 2 == len(shape) + 1), None)
    if size is None:
        return _unknown(f"layout='tokens' was given, but the capture {shape} is no (B, N, C) tensor of this input")
    read = _fit_grid(shape[1], grids, size)
    if read.kind != "tokens":
        return _unknown(f"layout='tokens' was given, but {read.reason}; give the grid: layout=gs.Layout('tokens', "
                        "grid=(h, w), prefix=P)")
    return replace(read, reason="layout='tokens' given; grid inferred at run time")


def _map_layout(shape: Shape, evidence: Optional[int], channels: AbstractSet[int], grids: Iterable[Shape]) -> Layout:
    first, last = shape[1], shape[-1]
    if first == 1 or (evidence is not None and first == evidence):
        return CHANNELS_FIRST
    if evidence is not None and last == evidence:
        why = f"its last axis holds the {last} channels of the module that made it"
    elif last in channels and first not in channels:
        why = f"its last axis ({last}) is a channel count of the model's modules and axis 1 ({first}) is none"
    else:
        return CHANNELS_FIRST
    known = _grids(grids, len(shape) - 2)
    if tuple(shape[1:-1]) in known and not (first in channels and tuple(shape[2:]) in known):
        return Layout("nhwc", reason=f"channels last, read at run time: {why}")
    if first in channels:  # a channel count first and no grid of the convolutions on the other axes
        return CHANNELS_FIRST
    return _unknown(f"{why}, but its other axes {tuple(shape[1:-1])} are no grid of the model's convolutions, so it "
                    "is neither known channels first nor channels last")


def _token_layout(shape: Shape, evidence: Optional[int], channels: AbstractSet[int], grids: Iterable[Shape],
                  size: Shape) -> Layout:
    first, last = shape[1], shape[-1]
    if evidence is not None and first == evidence and last != evidence:
        return _unknown(f"axis 1 of {shape} holds the channels of the module that made it: a map flattened to "
                        "(B, C, N), not tokens")
    if last != evidence and last not in channels:
        return _unknown(f"a (B, N, C) reading of {shape} needs its last axis to hold channels, and {last} is no "
                        "channel count of the model's modules")
    return _fit_grid(shape[1], grids, size)


def _fit_grid(tokens: int, grids: Iterable[Shape], size: Shape) -> Layout:
    """The one grid (and prefix) that ``tokens`` positions fit, or an unknown layout saying why not."""
    fits = sorted({(grid, tokens - math.prod(grid)) for grid in _grids(grids, len(size))
                   if 0 <= tokens - math.prod(grid) <= MAX_PREFIX and tokens - math.prod(grid) < math.prod(grid)})
    if len(fits) == 1:
        (grid, prefix), = fits
        return Layout("tokens", grid=grid, prefix=prefix, input_size=tuple(size),
                      reason="tokens, read at run time: the patch grid of a convolution of this forward")
    if not fits:
        return _unknown(f"{tokens} tokens fit no grid of the model's convolutions (or a merging of one) with a few "
                        "class tokens first")
    listed = ", ".join(f"{prefix} + {'x'.join(map(str, grid))}" for grid, prefix in fits)
    return _unknown(f"{tokens} tokens fit several grids ({listed})")


def _grids(grids: Iterable[Shape], rank: int) -> Set[Shape]:
    """The convolutions' output grids of ``rank`` axes, and each halved (rounding up) by patch mergings."""
    found = set()
    for grid in grids:
        grid = tuple(grid)
        while len(grid) == rank and grid not in found and math.prod(grid) > 1:
            found.add(grid)
            grid = tuple((g + 1) // 2 for g in grid)
    return found


def _unknown(reason: str) -> Layout:
    return Layout("unknown", reason=reason)
