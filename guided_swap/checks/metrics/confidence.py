"""Confidence change: multiply each input by its map and measure how the target's score moves
(pytorch-grad-cam's ``CamMultImageConfidenceChange``, ``DropInConfidence`` and ``IncreaseInConfidence``).

The map, in [0, 1] as CAMs are, scales every channel of its position (the image as normalised for the model,
as pytorch-grad-cam multiplies it). A map that keeps what the model uses keeps (or raises) the score: the
change is near 0 or positive; a map that misses it drops the score. ``drop_in_confidence`` is the drop
(``max(-change, 0)``, lower is better) and ``increase_in_confidence`` whether the score rose (1 or 0; its
mean over a data set is the share of images whose masked version the model finds more convincing).

>>> import torch, guided_swap as gs
>>> from guided_swap.checks import metrics
>>> model, x, _ = gs.demo.load_demo()
>>> ex = gs.convert(model, layer="auto")
>>> e = ex.explain(x[:2])
>>> change = metrics.confidence_change(ex, x[:2], e.cam)
>>> bool(torch.equal(metrics.drop_in_confidence(ex, x[:2], e.cam), (-change).clamp_min(0)))
True
"""
from typing import Any

import torch
from torch import Tensor

from .inputs import as_batch, as_maps
from .scoring import score_for, scores


def confidence_change(ex: Any, x: Any, maps: Any, target: Any = None, score: str = "auto") -> Tensor:
    """(B,) ``score(x * map) - score(x)``: two forwards of the batch, no gradient."""
    batch, like = as_batch(ex, x)
    maps = as_maps(maps, batch)
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
