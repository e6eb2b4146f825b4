"""What a removed position becomes in the deletion and insertion curves: zeros, each image blurred, each
image's per-channel mean, or a tensor of your own.

The blur is RISE's (Petsiuk et al. 2018): a Gaussian of σ = 5 over an 11-position window with zero padding,
the window made as ``scipy.ndimage.gaussian_filter`` makes it from a unit impulse (so its weights sum to 1).
RISE's 2D kernel is the outer product of that 1D window, so it is applied axis by axis, for any spatial rank.

>>> import torch
>>> x = torch.ones(1, 2, 5, 5)
>>> baseline(x, "zeros").abs().sum().item(), baseline(x, "mean").mean().item()
(0.0, 1.0)
>>> float(baseline(x, "blur")[0, 0, 2, 2]) < 1  # zero padding darkens what lies near the border
True
"""
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter1d
from torch import Tensor

from ...core.errors import InputError

BASELINES = ("zeros", "blur", "mean")
BLUR_WINDOW, BLUR_SIGMA = 11, 5.0


@lru_cache(maxsize=None)
def blur_window(length: int = BLUR_WINDOW, sigma: float = BLUR_SIGMA) -> np.ndarray:
    """RISE's 1D blur weights: a unit impulse filtered by ``gaussian_filter1d`` (reflecting at the window's ends)."""
    impulse = np.zeros(length)
    impulse[length // 2] = 1.0
    return gaussian_filter1d(impulse, sigma)


def blur(x: Tensor) -> Tensor:
    """``x`` (B, C, *spatial) blurred along every spatial axis, zero-padded, the size kept."""
    window = torch.from_numpy(blur_window()).to(x)
    out = x
    for axis in range(2, x.dim()):
        moved = out.movedim(axis, -1)
        flat = moved.reshape(-1, 1, moved.shape[-1])
        filtered = F.conv1d(flat, window.view(1, 1, -1), padding=BLUR_WINDOW // 2)
        out = filtered.reshape(moved.shape).movedim(-1, axis)
    return out


def baseline(x: Tensor, kind: Any) -> Tensor:
    """The baseline for ``x`` (B, C, *spatial): ``kind`` one of :data:`BASELINES` or a tensor broadcastable to
    ``x`` (such as one image (C, *spatial), or a value per channel (C, 1, 1)), or the same as a numpy array."""
    if isinstance(kind, np.ndarray):
        kind = torch.from_numpy(np.ascontiguousarray(kind))
    if isinstance(kind, Tensor):
        try:
            return torch.broadcast_to(kind.to(x), x.shape)
        except RuntimeError:
            raise InputError(f"a baseline tensor of shape {tuple(kind.shape)} does not broadcast to the inputs "
                             f"{tuple(x.shape)}") from None
    if kind == "zeros":
        return torch.zeros_like(x)
    if kind == "blur":
        return blur(x)
    if kind == "mean":
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=True).expand_as(x)
    if not isinstance(kind, str):
        raise TypeError(f"baseline= takes one of {BASELINES}, or a tensor or numpy array that broadcasts to the "
                        f"inputs (such as a value per channel, shape (C, 1, 1)); got a {type(kind).__name__}")
    raise ValueError(f"baseline={kind!r} is not one of {BASELINES} nor a tensor")
