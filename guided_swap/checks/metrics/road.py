"""ROAD, RemOve And Debias (Rong et al. 2022): remove a share of the positions a map ranks, impute them by noisy
linear imputation (:mod:`.imputation`), and measure how the target's score changes.

At percentile ``p`` (pytorch-grad-cam's convention, reproduced exactly): most-relevant-first (``"morf"``) keeps
the positions whose map value is below the map's ``p``-th percentile and imputes the rest, so ``p=10`` removes
the 90% most relevant; least-relevant-first (``"lerf"``) does the same with ``1 - map``, removing the least
relevant. Each value is ``score(imputed) - score(clean)``, averaged over the percentiles. A faithful map makes
MoRF drop the score steeply (very negative) and LeRF barely move it (near 0): ``"combined"`` is
``(LeRF - MoRF) / 2``, higher is better.

Every copy (percentiles x samples) is imputed on the CPU and scored in chunks of ``chunk`` through the
explainer's forward, under ``torch.no_grad``. The noise comes from ``generator`` (the CPU's default generator
when None) in pytorch-grad-cam's order: for ``"combined"``, LeRF's percentiles first, then MoRF's; within a
percentile, sample by sample. Seeding the same generator gives pytorch-grad-cam's numbers.

>>> import torch, guided_swap as gs
>>> from guided_swap.checks import metrics
>>> model, x, _ = gs.demo.load_demo()
>>> ex = gs.convert(model, layer="auto")
>>> e = ex.explain(x[:2])
>>> values = metrics.road(ex, x[:2], e.cam, percentiles=(30, 80), generator=torch.Generator().manual_seed(0))
>>> tuple(values.shape)
(2,)
"""
import warnings
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .imputation import impute
from .inputs import as_batch, as_maps, check_chunk, chunked
from .scoring import score_for, scores

PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
ORDERS = ("morf", "lerf", "combined")


def road(ex: Any, x: Any, maps: Any, target: Any = None, percentiles: Sequence[float] = PERCENTILES,
         order: str = "combined", noise: float = 0.01, generator: Optional[torch.Generator] = None,
         chunk: int = 32, score: str = "auto") -> Tensor:
    """ROAD per sample, (B,): the mean over ``percentiles`` of the score change for ``order`` "morf" or "lerf",
    or ``(LeRF - MoRF) / 2`` for "combined" (equal to pytorch-grad-cam's ``ROADMostRelevantFirstAverage``,
    ``ROADLeastRelevantFirstAverage`` and ``ROADCombined``). ``maps`` (B, *spatial) at the input's size."""
    curves = road_curves(ex, x, maps, target, percentiles, order, noise, generator, chunk, score)
    means = {name: curve.double().mean(dim=1).float() for name, curve in curves.items()}
    if order == "combined":
        return (means["lerf"] - means["morf"]) / 2
    return means[order]


def road_curves(ex: Any, x: Any, maps: Any, target: Any = None, percentiles: Sequence[float] = PERCENTILES,
                order: str = "combined", noise: float = 0.01, generator: Optional[torch.Generator] = None,
                chunk: int = 32, score: str = "auto") -> dict:
    """``{order: (B, P) score changes}`` for "morf" or "lerf", both for "combined" (the percentiles in order)."""
    if order not in ORDERS:
        raise ValueError(f"order={order!r} is not one of {ORDERS}")
    percentiles = _percentiles(percentiles)
    _check_noise(noise, generator)
    chunk = check_chunk(chunk)
    batch, like = as_batch(ex, x)
    maps = as_maps(maps, batch)
    scorer, clean = score_for(ex, batch, like, target, score)
    orders = ("lerf", "morf") if order == "combined" else (order,)
    tasks = [(name, p) for name in orders for p in percentiles]
    keep = _keep_masks(maps, tasks)  # (T, B, *spatial)
    _warn_if_nothing_kept(keep, tasks)
    size = batch.shape[0]
    copies = ((impute(batch[r % size], keep.flatten(0, 1)[r], noise, generator), r % size)
              for r in chunked(len(tasks) * size, chunk))
    changes = (scores(ex, scorer, like, copies) - clean.repeat(len(tasks))).view(len(tasks), size)
    return {name: changes[i * len(percentiles):(i + 1) * len(percentiles)].t() for i, name in enumerate(orders)}


def _keep_masks(maps: Tensor, tasks: Sequence[Tuple[str, float]]) -> Tensor:
    """Per task and sample, the positions kept: the ranked values below their ``p``-th percentile (numpy's,
    per sample, as pytorch-grad-cam computes it; the values are ``map`` for MoRF, ``1 - map`` for LeRF)."""
    host = maps.cpu()
    values = {"morf": host, "lerf": 1 - host}
    masks = []
    for name, p in tasks:
        ranked = values[name]
        masks.append(torch.stack([ranked[b] < float(np.percentile(ranked[b].numpy(), p))
                                  for b in range(ranked.shape[0])]) if len(ranked) else ranked.bool())
    return torch.stack(masks)


def _percentiles(percentiles: Any) -> Tuple[float, ...]:
    """``percentiles=`` checked, as Python numbers: a list, tuple or range, or a 1D numpy array or tensor, of
    numbers strictly between 0 and 100."""
    values = None
    if isinstance(percentiles, (np.ndarray, Tensor)):
        values = tuple(percentiles.tolist()) if percentiles.ndim == 1 else None
    elif isinstance(percentiles, (list, tuple, range)):
        values = tuple(p.item() if isinstance(p, (np.generic, Tensor)) and np.ndim(p) == 0 else p
                       for p in percentiles)
    if not values or any(isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 100
                         for p in values):
        raise ValueError(f"percentiles= takes a non-empty list of numbers between 0 and 100 (exclusive), such as "
                         f"(10, 20, ..., 90); got {percentiles!r}")
    return values


def _check_noise(noise: Any, generator: Any) -> None:
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not np.isfinite(noise) or noise < 0:
        raise ValueError(f"noise= is the imputation noise's standard deviation, a finite number >= 0; got {noise!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator= takes a torch.Generator, got {type(generator).__name__}")


def _warn_if_nothing_kept(keep: Tensor, tasks: Sequence[Tuple[str, float]]) -> None:
    """A map whose ``p``-th percentile is its minimum (a flat region: a ReLU'd CAM's zeros) keeps nothing at
    that percentile: the imputation has nothing to go on and the score is NaN, as in pytorch-grad-cam."""
    empty = ~keep.flatten(2).any(dim=2)  # (T, B)
    if bool(empty.any()):
        samples = sorted({int(b) for b in torch.nonzero(empty)[:, 1]})
        where = sorted({f"{tasks[int(t)][0]} {tasks[int(t)][1]}" for t in torch.nonzero(empty)[:, 0]})
        warnings.warn(f"ROAD removes every position of sample(s) {samples} at {', '.join(where)}: the map's "
                      "percentile equals its minimum (a flat region, such as a CAM's zeros), so nothing is left to "
                      "impute from and those scores are NaN. Break the ties in position order with "
                      "gs.metrics.tie_broken(maps), or use percentiles above the map's share of its minimum",
                      RuntimeWarning, stacklevel=3)
