"""A metric's inputs checked and put in one form: the batch as one (B, C, *spatial) tensor, the maps as
(B, *spatial) float32 on its device, and the rows of perturbed copies cut into chunks.

>>> import torch
>>> x, like = as_batch(None, torch.zeros(2, 3, 4, 4))
>>> tuple(as_maps(torch.ones(2, 4, 4), x).shape)
(2, 4, 4)
>>> [len(rows) for rows in chunked(5, 2)]
[2, 2, 1]
"""
import numbers
from typing import Any, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ...core.errors import InputError
from ...run.explainer import Explainer


def as_batch(ex: Any, x: Any) -> Tuple[Tensor, Any]:
    """``x`` as one (B, C, *spatial) tensor and as given (a detector's list of images), checked by the
    explainer's capture when ``ex`` is an :class:`~guided_swap.Explainer`. A tuple is a model's several inputs
    (as ``explain`` reads it), which a metric does not perturb: refused."""
    if isinstance(x, tuple):
        raise InputError("a metric perturbs one input and reads the model's answer; a tuple is several inputs of one "
                         "model (explain((x1, x2))), which the metrics do not take: give one input tensor, or a "
                         "detector's list of images")
    if isinstance(ex, Explainer):
        ex.capture.check(x)
        return ex.capture.stack(x).detach(), x
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, Tensor) for t in x):
        return torch.stack(list(x)).detach(), list(x)
    if not isinstance(x, Tensor) or x.dim() < 3:
        raise InputError("a metric takes a batch (B, C, ...) tensor, or a detector's list of (C, H, W) images")
    return x.detach(), x


def as_maps(maps: Any, x: Tensor) -> Tensor:
    """The maps as a (B, *spatial) float32 tensor on ``x``'s device, for ``x`` (B, C, *spatial)."""
    if isinstance(maps, np.ndarray):
        maps = torch.from_numpy(np.ascontiguousarray(maps))
    if not isinstance(maps, Tensor):
        raise TypeError(f"maps must be a tensor or numpy array of shape (B, *spatial), got {type(maps).__name__}")
    expected = (x.shape[0],) + tuple(x.shape[2:])
    if tuple(maps.shape) != expected:
        raise InputError(f"maps have shape {tuple(maps.shape)}; for inputs {tuple(x.shape)} they must be {expected}"
                         + _shape_hint(tuple(maps.shape), expected))
    if not maps.is_floating_point():
        maps = maps.float()
    if not bool(torch.isfinite(maps).all()):
        raise InputError("maps hold NaN or Inf values; a metric needs an order of positions: clean the maps first")
    return maps.detach().to(device=x.device, dtype=torch.float32)


def _shape_hint(shape: Tuple[int, ...], expected: Tuple[int, ...]) -> str:
    """What to do about maps of ``shape`` where ``expected`` (B, *spatial) was wanted, for the usual near misses."""
    batch, spatial = expected[0], expected[1:]
    if shape == (batch, 1) + spatial:
        return "; drop the channel axis of one: maps[:, 0]"
    if len(shape) == len(expected) + 1 and shape[0] == batch and shape[2:] == spatial:
        return ("; a map with a channel axis (e.g. e.gradient) needs one value per position first, e.g. "
                "e.gradient.abs().amax(dim=1)")
    if batch == 1 and shape == spatial:
        return "; add the batch axis: maps[None]"
    if len(shape) == len(expected) and shape[0] == batch:
        return "; use the maps at input size (e.cam or e.cams[name], not cam_raw)"
    if len(shape) == len(expected) and shape[1:] == spatial:
        return f"; give one map per sample ({batch}), in the inputs' order"
    return ""


def positive_int(value: Any) -> Optional[int]:
    """``value`` as a Python int when it is an integer >= 1 (a Python or numpy integer, not a bool), else None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 1:
        return None
    return int(value)


def check_chunk(chunk: Any) -> int:
    """``chunk=`` checked: how many perturbed copies go through one forward."""
    checked = positive_int(chunk)
    if checked is None:
        raise ValueError(f"chunk= is how many perturbed copies go through one forward, an int >= 1; got {chunk!r}")
    return checked


def chunked(count: int, chunk: int) -> List[Tensor]:
    """Row indices 0..count-1 in consecutive chunks of ``chunk`` (none for an empty batch)."""
    return list(torch.arange(count).split(chunk)) if count else []
