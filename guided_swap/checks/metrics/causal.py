"""Deletion and insertion curves (Petsiuk et al. 2018, RISE, "causal metrics") and their area.

Rank the positions by the map, most relevant first (ties in position order). Deletion starts from the input
and replaces the positions, in that order, by a baseline (default zeros), ``steps`` equal shares at a time;
insertion starts from the baseline (default the input blurred) and puts the input's positions back in the same
order. After each share the target's score is read: the curve has ``steps + 1`` points, from nothing changed
to everything changed. Its area (trapezoids over the share changed, 0 to 1) sums it up: a faithful map makes
the deletion curve fall fast (low area, better) and the insertion curve rise fast (high area, better).
Share ``k`` changes the first ``ceil(k · n / steps)`` of the ``n`` positions, RISE's ``step`` when ``steps``
divides ``n``.

The copies of the batch go through the explainer's forward in chunks of ``chunk``, without autograd; the clean
input's score is read once and is the curve's first point (deletion) or last (insertion).

>>> import torch, guided_swap as gs
>>> from guided_swap.checks import metrics
>>> model, x, _ = gs.demo.load_demo()
>>> ex = gs.convert(model, layer="auto")
>>> e = ex.explain(x[:2])
>>> result = metrics.deletion(ex, x[:2], e.cam, steps=8)
>>> tuple(result.curve.shape), tuple(result.auc.shape), result.fractions[-1].item()
((2, 9), (2,), 1.0)
"""
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor

from .baselines import baseline as make_baseline
from .inputs import as_batch, as_maps, check_chunk, chunked, positive_int
from .scoring import score_for, scores

DEFAULT_STEPS = 32


@dataclass(frozen=True)
class Curve:
    """A deletion or insertion result: ``curve`` (B, steps+1) scores, ``auc`` (B,) its area over ``fractions``
    (steps+1,), the share of positions changed at each point; and the settings that made it."""

    kind: str
    curve: Tensor
    auc: Tensor
    fractions: Tensor
    baseline: str
    steps: int
    score: str


def deletion(ex: Any, x: Any, maps: Any, target: Any = None, steps: int = DEFAULT_STEPS,
             baseline: Union[str, Tensor] = "zeros", chunk: int = 32, score: str = "auto") -> Curve:
    """The deletion curve: the most relevant positions replaced by ``baseline`` first (lower area is better)."""
    return causal_curve("deletion", ex, x, maps, target, steps, baseline, chunk, score)


def insertion(ex: Any, x: Any, maps: Any, target: Any = None, steps: int = DEFAULT_STEPS,
              baseline: Union[str, Tensor] = "blur", chunk: int = 32, score: str = "auto") -> Curve:
    """The insertion curve: from ``baseline``, the most relevant positions put back first (higher area is better)."""
    return causal_curve("insertion", ex, x, maps, target, steps, baseline, chunk, score)


def auc(curve: Tensor) -> Tensor:
    """The trapezoid area of (B, K+1) curves over K equal steps of [0, 1] (RISE's ``auc``).

    >>> auc(torch.tensor([[1.0, 0.5, 0.0]]))
    tensor([0.5000])
    """
    return (curve.sum(dim=1) - curve[:, 0] / 2 - curve[:, -1] / 2) / (curve.shape[1] - 1)


def causal_curve(kind: str, ex: Any, x: Any, maps: Any, target: Any, steps: int, baseline: Union[str, Tensor],
                 chunk: int, score: str) -> Curve:
    if positive_int(steps) is None:
        raise ValueError(f"steps= is how many shares the positions are changed in, an int >= 1; got {steps!r}")
    steps = int(steps)
    chunk = check_chunk(chunk)
    batch, like = as_batch(ex, x)
    maps = as_maps(maps, batch)
    base = make_baseline(batch, baseline)
    scorer, clean = score_for(ex, batch, like, target, score)
    start, finish = (batch, base) if kind == "deletion" else (base, batch)
    size, positions = batch.shape[0], maps.shape[1:].numel()
    ranks = _ranks(maps)  # (B, *spatial)
    counts = (torch.arange(steps + 1) * positions + steps - 1) // steps  # positions changed at each point
    first = 1 if kind == "deletion" else 0  # the points read by a forward: all but the clean input's

    def copies(rows: Tensor):
        owners, points = rows % size, first + rows // size
        limit = counts[points].to(ranks.device).view(-1, *[1] * (maps.dim() - 1))
        changed = (ranks[owners] < limit).unsqueeze(1)
        return torch.where(changed, finish[owners], start[owners]), owners

    read = scores(ex, scorer, like, (copies(r) for r in chunked(steps * size, chunk)))
    read = read.view(steps, size).t()
    curve = torch.cat([clean.view(-1, 1), read] if kind == "deletion" else [read, clean.view(-1, 1)], dim=1)
    return Curve(kind, curve, auc(curve), counts.float() / positions,
                 baseline if isinstance(baseline, str) else "tensor", steps, scorer.kind)


def tie_broken(maps: Any) -> Tensor:
    """``maps`` (B, *spatial) with no two positions tied: each position's ordinal rank as float32, 0 the least
    relevant and ``n - 1`` the most, tied values in position order (the earlier the more relevant, as deletion and
    insertion rank them). Only the order is kept, and ROAD depends on nothing else where no two values tie: ROAD
    on ``tie_broken(maps)`` is ROAD on the maps with their ties broken, where a flat region (a ReLU'd CAM's zeros)
    otherwise leaves nothing kept at low percentiles. Exact up to 2**24 positions per map.

    >>> tie_broken(torch.tensor([[0.0, 0.5, 0.0, 0.0]]))
    tensor([[2., 3., 1., 0.]])
    """
    maps = torch.as_tensor(maps)
    return (maps.shape[1:].numel() - 1 - _ranks(maps.float())).float()


def _ranks(maps: Tensor) -> Tensor:
    """Each position's place in its map's order, most relevant first, ties in position order."""
    flat = maps.reshape(maps.shape[0], maps.shape[1:].numel())
    order = torch.argsort(-flat, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks.view(maps.shape)
