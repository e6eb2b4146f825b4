"""pytorch-grad-cam's ``aug_smooth=True``: a CAM averaged over flipped and rescaled copies of each input.

Each input ``x`` goes through the explainer as six copies, ttach's ``HorizontalFlip() x Multiply([0.9, 1, 1.1])``
as pytorch-grad-cam applies them (the input as the model takes it, flipped along its last axis or not, times
0.9, 1 or 1.1). Each copy's map is the layers' fused map (:meth:`~guided_swap.Explanation.fused`, ``how="mean"``:
pytorch-grad-cam's map, min-max scaled, at the input's size), flipped back; the result is the mean of the six.
The copies go through the explainer's own ``explain`` ``chunk`` at a time (default: all ``6 B`` in one pass).

The target is resolved once, on the clean input (``None``: its argmax, for every copy; pytorch-grad-cam given no
targets takes each copy's own argmax instead); a callable, :class:`~guided_swap.Channel` or
:class:`~guided_swap.Finer` target is applied to each copy as it is (a ``Finer`` keeps the clean input's classes).

>>> import torch, torchvision, guided_swap as gs
>>> ex = gs.convert(torchvision.models.resnet18().eval(), layer="layer4")
>>> ex.aug_smooth(torch.randn(2, 3, 64, 64), [1, 2], "gradcam++").shape
torch.Size([2, 64, 64])
"""
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..core.targets import as_score

#: ttach's order: every flip with every factor, ``itertools.product([False, True], [0.9, 1, 1.1])``.
AUGMENTATIONS = tuple((flip, factor) for flip in (False, True) for factor in (0.9, 1.0, 1.1))


def check(x: Any, chunk: Any) -> None:
    if not isinstance(x, Tensor) or x.dim() < 3 or not x.is_floating_point():
        raise TypeError("aug_smooth takes a floating (B, C, *spatial) tensor (it flips the last axis and scales the "
                        f"values); got {type(x).__name__ if not isinstance(x, Tensor) else tuple(x.shape)}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk= is how many augmented inputs go through one pass, an int >= 1; got {chunk!r}")


def aug_smooth(explainer, x: Tensor, target: Any = None, cam: str = "gradcam", *,
               layers: Optional[Sequence[str]] = None, eigen_smooth: bool = False, chunk: Optional[int] = None,
               interpolate: str = "bilinear") -> Tensor:
    """The (B, *spatial) mean over :data:`AUGMENTATIONS` of each copy's fused map of ``cam`` (module docstring)."""
    check(x, chunk)
    explainer.capture.check(x, None)
    score = as_score(target, explainer.output, explainer.layers)
    explainer.capture.prepare(x)
    batch, copies = x.shape[0], len(AUGMENTATIONS)
    with torch.no_grad():
        outputs = explainer.capture(x)
    _, score_of_rows = score.for_copies(outputs, batch)
    flips = torch.tensor([flip for flip, _ in AUGMENTATIONS], device=x.device)
    factors = torch.tensor([factor for _, factor in AUGMENTATIONS], dtype=x.dtype, device=x.device)
    total = None
    for start in range(0, batch * copies, chunk or batch * copies):
        index = torch.arange(start, min(start + (chunk or batch * copies), batch * copies), device=x.device)
        augmentation, rows = index // batch, index % batch
        flipped = flips[augmentation].view(-1, *([1] * (x.dim() - 1)))
        scaled = x[rows] * factors[augmentation].view(-1, *([1] * (x.dim() - 1)))
        e = explainer.explain(torch.where(flipped, scaled.flip(-1), scaled), score_of_rows(rows),
                              interpolate=interpolate)
        fused = e.fused(cam, layers, how="mean", eigen_smooth=eigen_smooth)
        fused = torch.where(flipped.view(-1, *([1] * (fused.dim() - 1))), fused.flip(-1), fused)
        if total is None:
            total = torch.zeros((batch,) + tuple(fused.shape[1:]), dtype=fused.dtype, device=fused.device)
        total.index_add_(0, rows, fused)
    return total / copies
