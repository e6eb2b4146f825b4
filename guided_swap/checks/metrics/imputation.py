"""Noisy linear imputation (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for Attribution
Methods"), the debiasing step of ROAD, on maps of any spatial rank.

Each removed position takes the weighted mean of its neighbours (removed or not), which makes one sparse linear
system per image: for removed position ``i`` with in-bounds neighbours ``j`` of weight ``w_ij``,
``(Σ_j w_ij) x_i - Σ_{j removed} w_ij x_j = Σ_{j kept} w_ij v_j``. Then ``noise · 𝒩(0, 1)`` is added to each
imputed value. The neighbours are the ``3^d - 1`` positions around ``i``; a neighbour that differs in ``k``
coordinates weighs ``2^{1-k}``, scaled to sum to 1: in 2D that is pytorch-grad-cam's (and the paper's) 1/6 for
the four direct and 1/12 for the four diagonal neighbours; in 1D 1/2 each; in 3D 1/14, 1/28 and 1/56.

What is vectorised: the assembly of each matrix and its right-hand sides (numpy over every removed position
and neighbour at once, no per-position loop; the neighbour table is made once per grid size). What stays per image:
the factorisation and solve (SciPy's SuperLU, with a symmetric ordering; every channel is one right-hand side; the
images of a call on several threads) and the noise, drawn image by
image as ``torch.empty(N, C).t().normal_()``, which gives the very numbers ``torch.randn_like`` gives
pytorch-grad-cam's ``NoisyLinearImputer`` in the same order. A removed region that touches no kept position has
no defined value: an image with every position removed is imputed as NaN.

>>> import torch
>>> image = torch.arange(9.0).view(1, 1, 3, 3)
>>> keep = torch.ones(1, 3, 3, dtype=torch.bool)
>>> keep[0, 1, 1] = False
>>> impute(image, keep, noise=0.0)[0, 0, 1, 1]  # the weighted mean of its eight neighbours
tensor(4.)
"""
import itertools
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Optional, Tuple

import numpy as np
import torch
from scipy.sparse import csc_matrix
from scipy.sparse.linalg import splu
from torch import Tensor


@lru_cache(maxsize=None)
def neighbour_weights(rank: int) -> Tuple[Tuple[Tuple[int, ...], float], ...]:
    """The ``(offset, weight)`` of each neighbour of a position in ``rank`` dimensions (weights sum to 1).

    >>> [w for _, w in neighbour_weights(1)]
    [0.5, 0.5]
    >>> sorted({round(w * 12, 6) for _, w in neighbour_weights(2)})  # 1/12 diagonal, 1/6 direct
    [1.0, 2.0]
    """
    offsets = [o for o in itertools.product((-1, 0, 1), repeat=rank) if any(o)]
    raw = [2.0 ** (1 - sum(1 for v in o if v)) for o in offsets]
    total = sum(raw)
    return tuple((o, r / total) for o, r in zip(offsets, raw))


@lru_cache(maxsize=8)
def _grid(spatial: Tuple[int, ...]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For a grid: each position's neighbour (flat index, -1 outside) per offset (n, O), the weights (O,), and
    each position's in-bounds weight sum (n,)."""
    rank = len(spatial)
    coords = np.stack(np.unravel_index(np.arange(int(np.prod(spatial))), spatial), axis=1)  # (n, rank)
    offsets = np.array([o for o, _ in neighbour_weights(rank)])  # (O, rank)
    weights = np.array([w for _, w in neighbour_weights(rank)])
    moved = coords[:, None, :] + offsets[None]  # (n, O, rank)
    inside = np.all((moved >= 0) & (moved < np.array(spatial)), axis=2)
    flat = np.ravel_multi_index(tuple(np.clip(moved, 0, np.array(spatial) - 1).transpose(2, 0, 1)), spatial)
    neighbours = np.where(inside, flat, -1)
    return neighbours, weights, (inside * weights).sum(axis=1)


def system(keep: np.ndarray, values: np.ndarray, spatial: Tuple[int, ...]) -> Tuple[np.ndarray, csc_matrix, np.ndarray]:
    """One image's system: the removed positions (ascending flat indices), its symmetric positive definite
    matrix and its right-hand sides (N, C), the weighted sums of each removed position's kept neighbours; from
    the image's ``keep`` mask (n,) and ``values`` (C, n)."""
    neighbours, weights, in_bounds = _grid(spatial)
    removed = np.flatnonzero(~keep)
    variable = np.full(keep.shape[0], -1)
    variable[removed] = np.arange(removed.size)
    around = neighbours[removed]  # (N, O)
    linked = (around >= 0) & ~keep[np.where(around >= 0, around, 0)]
    rows = np.repeat(np.arange(removed.size), around.shape[1]).reshape(around.shape)[linked]
    columns = variable[around[linked]]
    entries = -np.broadcast_to(weights, around.shape)[linked]
    diagonal = np.arange(removed.size)
    matrix = csc_matrix((np.concatenate([entries, in_bounds[removed]]),
                         (np.concatenate([rows, diagonal]), np.concatenate([columns, diagonal]))),
                        shape=(removed.size, removed.size))
    kept = np.concatenate([values * keep, np.zeros((values.shape[0], 1))], axis=1)  # index -1: outside, zero
    rhs = kept[:, around] @ weights  # (C, N)
    return removed, matrix, np.ascontiguousarray(rhs.T)


def solve(matrix: csc_matrix, rhs: np.ndarray) -> np.ndarray:
    """``matrix⁻¹ rhs`` (rhs (N, C), float64) by SuperLU with a symmetric ordering; NaN when singular."""
    if matrix.shape[0] == 0:
        return np.zeros((0, rhs.shape[1]))
    try:
        factor = splu(matrix, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
    except RuntimeError:  # exactly singular: no kept position anywhere
        return np.full(rhs.shape, np.nan)
    return factor.solve(rhs)


def impute(images: Tensor, keep: Tensor, noise: float = 0.01, generator: Optional[torch.Generator] = None) -> Tensor:
    """``images`` (B, C, *spatial) with the positions where ``keep`` (B, *spatial) is False imputed, image by
    image in batch order (the noise of image 0 is drawn first). A new tensor in ``images``' dtype (the imputed
    values are computed in float32, as pytorch-grad-cam computes them); ``images`` is not changed. The images'
    systems are assembled and solved on ``torch.get_num_threads()`` threads (SuperLU lets go of the GIL); the
    noise is drawn afterwards, in batch order, so the result does not depend on the thread count."""
    batch, channels, spatial = images.shape[0], images.shape[1], tuple(images.shape[2:])
    keep_host = keep.bool().reshape(batch, -1).cpu().numpy()
    values_host = images.detach().reshape(batch, channels, -1).cpu().double().numpy()
    out = images.detach().clone().reshape(batch, channels, -1)

    def imputed(b: int) -> Tuple[np.ndarray, np.ndarray]:
        removed, matrix, rhs = system(keep_host[b], values_host[b], spatial)
        if removed.size == 0:
            return removed, rhs
        return removed, solve(matrix, rhs) if keep_host[b].any() else np.full(rhs.shape, np.nan)

    workers = max(1, min(batch, torch.get_num_threads()))
    with ThreadPoolExecutor(workers) as pool:
        solutions = list(pool.map(imputed, range(batch)))
    for b, (removed, solution) in enumerate(solutions):
        if removed.size == 0:
            continue
        values = torch.from_numpy(solution).float().t().to(images.device)
        where = torch.from_numpy(removed).to(images.device)
        filled = values + noise * _noise(removed.size, channels, generator, images.device)  # float32, as pgc
        out[b][:, where] = filled.to(out.dtype)  # in the images' dtype (a float64 or bfloat16 model's)
    return out.reshape(images.shape)


def _noise(count: int, channels: int, generator: Optional[torch.Generator], device) -> Tensor:
    """(C, N) standard normal noise, drawn as ``torch.randn_like`` draws it for the transpose of SciPy's (N, C)
    solution (Fortran order, so the transpose is a contiguous (C, N)), on the generator's device (the CPU's
    default generator when None, as pytorch-grad-cam draws it)."""
    where = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(channels, count, generator=generator, device=where).to(device)
