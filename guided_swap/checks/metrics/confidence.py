"""Confidence change: multiply each input by its map and measure how the target's score moves
(pytorch-grad-cam's ``CamMultImageConfidenceChange``, ``DropInConfidence`` and ``IncreaseInConfidence``).

The map, in [0, 1] as pytorch-grad-cam's CAMs are (raw maps are refused: scale them with
:func:`unit_range`), scales every channel of its position (the image as normalised for the model,
as pytorch-grad-cam multiplies it). A map that keeps what the model uses keeps (or raises) the score: the
change is near 0 or positive; a map that misses it drops the score. ``drop_in_confidence`` is the drop
(``max(-change, 0)``, lower is better) and ``increase_in_confidence`` whether the score rose (1 or 0; its
mean over a data set is the share of images whose masked version the model finds more convincing).

>>> import torch, guided_swap as gs
>>> from guided_swap.checks import metrics
>>> model, x, _ = gs.demo.load_demo()
>>> ex = gs.convert(model, layer="auto")
>>> e = ex.explain(x[:2])
>>> maps = metrics.unit_range(e.cam)
>>> change = metrics.confidence_change(ex, x[:2], maps)
>>> bool(torch.equal(metrics.drop_in_confidence(ex, x[:2], maps), (-change).clamp_min(0)))
True
"""
from typing import Any

import torch
from torch import Tensor

from ...core.errors import InputError
from .inputs import as_batch, as_maps
from .scoring import score_for, scores


def unit_range(maps: Any) -> Tensor:
    """Each map of ``maps`` (B, *spatial) min-max scaled to [0, 1], as pytorch-grad-cam scales its CAMs (a
    constant map becomes zeros).

    >>> unit_range(torch.tensor([[2.0, 4.0, 3.0]]))
    tensor([[0.0000, 1.0000, 0.5000]])
    """
    maps = torch.as_tensor(maps).float()
    flat = maps.reshape(maps.shape[0], -1)
    low, high = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    return ((flat - low) / (high - low).clamp_min(torch.finfo(flat.dtype).tiny)).view(maps.shape)


def _check_unit_range(maps: Tensor) -> None:
    low, high = float(maps.min()), float(maps.max())
    if low < 0 or high > 1:
        raise InputError(f"confidence change multiplies the input by the map, so maps must be in [0, 1]; these span "
                         f"[{low:.4g}, {high:.4g}]. Scale them first: gs.metrics.unit_range(maps) (min-max per map, "
                         "as pytorch-grad-cam scales its CAMs), or maps / maps.amax(dim=(1, 2), keepdim=True) for "
                         "maps >= 0; a signed map's magnitude: maps.abs()")


def confidence_change(ex: Any, x: Any, maps: Any, target: Any = None, score: str = "auto") -> Tensor:
    """(B,) ``score(x * map) - score(x)``: two forwards of the batch, no gradient. ``maps`` in [0, 1]
    (:func:`unit_range` scales raw maps)."""
    batch, like = as_batch(ex, x)
    maps = as_maps(maps, batch)
    if maps.numel():
        _check_unit_range(maps)
    scorer, clean = score_for(ex, batch, like, target, score)
    owners = torch.arange(batch.shape[0])
    masked = (batch * maps.unsqueeze(1)).to(batch.dtype)  # float32 maps keep a bfloat16 model's input bfloat16
    return scores(ex, scorer, like, [(masked, owners)]) - clean


def drop_in_confidence(ex: Any, x: Any, maps: Any, target: Any = None, score: str = "auto") -> Tensor:
    """(B,) ``max(score(x) - score(x * map), 0)`` (pytorch-grad-cam's ``DropInConfidence``)."""
    return (-confidence_change(ex, x, maps, target, score)).clamp_min(0)


def increase_in_confidence(ex: Any, x: Any, maps: Any, target: Any = None, score: str = "auto") -> Tensor:
    """(B,) 1.0 where ``score(x * map) > score(x)``, else 0.0 (pytorch-grad-cam's ``IncreaseInConfidence``)."""
    return (confidence_change(ex, x, maps, target, score) > 0).float()
