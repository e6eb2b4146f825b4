"""How a captured tensor becomes the ``(B, C, *spatial)`` map every CAM is computed from.

A CNN's capture is one already; a vision transformer's is a token tensor ``(B, N, C)`` (class, distillation or
register tokens first, then the ``h*w`` patches); a Swin's is channels-last ``(B, h, w, C)``. A :class:`Layout`
says which, and turns the capture into a feature map. The graph capture reads each layout from the graph
(:mod:`guided_swap.capture.graph.layouts`); ``convert(layout=..., reshape=...)`` gives one (:func:`overrides`).

>>> import torch
>>> tokens = torch.arange(2 * 5 * 3.).view(2, 5, 3)            # (B, 1 class token + 2x2 patches, C=3)
>>> layout = Layout("tokens", grid=(2, 2), prefix=1)
>>> layout.to_channels_first(tokens).shape, layout.describe()
(torch.Size([2, 3, 2, 2]), 'tokens (B, N, C): 1 prefix + 2x2 patches')
>>> Layout("nhwc").to_channels_first(torch.zeros(2, 7, 7, 768)).shape
torch.Size([2, 768, 7, 7])
"""
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

from torch import Tensor

from .errors import LayerError

KINDS = ("nchw", "nhwc", "tokens", "vector")
FIX = ("convert with layout='tokens' | 'nhwc' | 'nchw', layout=gs.Layout('tokens', grid=(h, w), prefix=P), or "
       "reshape=fn taking the captured tensor to (B, C, *spatial)")


@dataclass(frozen=True)
class Layout:
    """How a captured tensor becomes the ``(B, C, *spatial)`` map the CAM maths take.

    ``kind``: ``"nchw"`` (channels first: nothing to do), ``"nhwc"`` (channels last), ``"tokens"`` (``(B, N, C)``:
    ``prefix`` tokens, then the ``grid`` of patches in row-major order, then ``suffix`` tokens), ``"vector"`` (a
    ``(B, C)`` layer such as a linear layer's output: one position, so every CAM is one value per sample, Captum
    LayerGradCam's ``(B, 1)``, and its resized map is that value everywhere), ``"reshape"`` (the user's ``reshape``
    callable) or ``"unknown"`` (``reason`` says why; asking for a CAM raises).
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
        if self.kind == "vector":
            return "(B, C): one position"
        return "channels first"

    def _perm(self, rank: int) -> Tuple[int, ...]:
        if self.permutation is not None:
            return self.permutation
        if self.kind == "tokens":
            return (0, 2, 1)
        if self.kind == "nhwc":
            return (0, rank - 1) + tuple(range(1, rank - 1))
        return tuple(range(rank))

    def channel_axis(self, rank: int) -> int:
        """The axis of a captured tensor of ``rank`` dimensions that holds its channels (``"reshape"`` and
        ``"unknown"`` layouts do not say: a :class:`LayerError`).

        >>> Layout("tokens").channel_axis(3), Layout("nhwc").channel_axis(4), CHANNELS_FIRST.channel_axis(4)
        (2, 3, 1)
        """
        if self.kind in ("reshape", "unknown"):
            raise LayerError(f"a {self.describe()!r} layout does not say which axis of the capture holds the channels")
        return self._perm(rank)[1]

    def to_channels_first(self, t: Tensor, input_size: Optional[Sequence[int]] = None, name: str = "") -> Tensor:
        """``t`` as ``(B, C, *spatial)``; ``input_size`` (the explained input's spatial size) rescales the grid."""
        where = f"layer {name!r}: " if name else ""
        if self.kind == "unknown":
            raise LayerError(f"{where}the captured tensor {tuple(t.shape)} has a layout guided_swap cannot read "
                             f"({self.reason}), so it gives no class activation map; {FIX}")
        if self.kind == "reshape":
            return _checked_reshape(self.reshape, t, where)
        if self.kind == "vector":
            if t.dim() != 2:
                raise LayerError(f"{where}a vector layout needs a (B, C) capture, got {tuple(t.shape)}; {FIX}")
            return t.reshape(t.shape + (1,) * len(input_size or (1,)))  # one position, of the input's rank
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
VECTOR = Layout("vector", reason="a (B, C) capture: one position")
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
