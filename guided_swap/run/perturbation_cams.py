"""Score-CAM and Ablation-CAM: channel weights from the model's score on perturbed copies, batched in chunks.

Both make one forward per (sample, channel) pair, without gradients, ``chunk`` pairs per forward, for all the
samples of the batch together (pytorch-grad-cam loops over the samples in Python, 16 or 32 copies at a time):

- **Score-CAM** (Wang et al. 2020): the input times each channel's activation, upsampled to the input with the
  corners aligned and min-max scaled, through the whole model; the weights are the softmax over the channels of
  those scores. A channel that is constant gives an all-zero mask: every such channel of a sample shares one
  forward of a zero input.
- **Ablation-CAM** (Desai & Ramaswamy 2020): the layer's activation with one channel set to zero, through the
  model *from the layer on* only (:meth:`guided_swap.Capture.tail`, a cut of the explain graph); the weights are
  the relative drops ``(y - y_k) / y``. A channel that is zero already changes nothing and is not run.

Each gives the channel weights ``w`` (B, K); the map is ``ReLU(sum_k w_k A_k)`` at the layer's resolution
(:func:`guided_swap.core.pass_cams.weighted_cam`), as pytorch-grad-cam's before its min-max scaling, and the
weights stay with the explanation for ``cam_map``'s options.

>>> import torch, guided_swap as gs
>>> from torch import nn
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
>>> ex = gs.convert(model, layer="3")
>>> x = torch.randn(2, 3, 16, 16)
>>> e, score = ex.explain(x, [3, 5]), gs.core.targets.as_score([3, 5])
>>> scorecam(ex.capture, x, score, e.target, e.layers["3"], chunk=8).shape       # 32 masked inputs, 8 a pass
torch.Size([2, 16])
>>> ablationcam(ex.capture, x, score, e.target, e.layers["3"], chunk=8).shape    # 32 ablated activations
torch.Size([2, 16])
"""
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor

from ..capture.base import Capture
from ..core import pass_cams as maths
from ..core.errors import TargetError
from ..core.maps import LayerMaps, listing
from ..core.targets import Score

Rows = Tuple[Tensor, Tensor]  # (sample index, channel index) per row


def scorecam(capture: Capture, x: Any, score: Score, classes: Optional[Tensor], maps: LayerMaps,
             chunk: int) -> Tensor:
    """Score-CAM's channel weights at the layer of ``maps`` (module docstring), (B, K)."""
    A = maps.feature_map.detach()
    clean = capture.stack(x).detach()
    size = tuple(clean.shape[2:])
    blank = _blank_masks(A, size)
    live = _rows(~blank)
    zero_samples = torch.nonzero(blank.any(dim=1)).flatten()

    def inputs(samples: Tensor, channels: Tensor) -> Tensor:  # masked in float32 at least, in the input's dtype
        masks = maths.scorecam_masks(A[samples, channels], size)
        return (clean[samples] * masks.unsqueeze(1)).to(clean.dtype)

    def forward(samples: Tensor, rows_input: Tensor) -> Tensor:
        return _scores(score, capture(capture.unstack(rows_input, like=x)), samples, classes)

    scores = torch.empty(A.shape[:2], dtype=torch.promote_types(A.dtype, torch.float32), device=A.device)
    with torch.no_grad():
        if zero_samples.numel():  # an all-zero mask gives a zero input, whichever channel it came from
            zero = forward(zero_samples, torch.zeros_like(clean[zero_samples]))
            scores[blank] = zero[torch.searchsorted(zero_samples, torch.nonzero(blank)[:, 0])]
        for samples, channels in _chunks(live, chunk):
            scores[samples, channels] = forward(samples, inputs(samples, channels))
    return maths.softmax_weights(scores)


def ablationcam(capture: Capture, x: Any, score: Score, classes: Optional[Tensor], maps: LayerMaps,
                chunk: int) -> Tensor:
    """Ablation-CAM's channel weights at the layer of ``maps`` (module docstring), (B, K)."""
    own = maps.activation.detach()          # the capture as the model holds it (channels may not come first)
    axis = maps.layout.channel_axis(own.dim())
    tail = capture.tail(maps.name, x)
    clean = capture.stack(x).detach()

    def run(samples: Tensor, substitute: Tensor) -> Tensor:
        rows_input = capture.unstack(clean[samples], like=x) if tail.needs_input else x
        return _scores(score, tail(rows_input, substitute, samples), samples, classes)

    with torch.no_grad():
        everyone = torch.arange(own.shape[0], device=own.device)
        original = run(everyone, own)
        _refuse_zero_scores(original)
        ablated = original.unsqueeze(1).repeat(1, own.shape[axis])
        for samples, channels in _chunks(_rows(_live_channels(own, axis)), chunk):
            ablated[samples, channels] = run(samples, _ablate(own, samples, channels, axis))
    return maths.ablation_weights(original, ablated)


def _scores(score: Score, outputs: Any, samples: Tensor, classes: Optional[Tensor]) -> Tensor:
    """The explained score of each row, for the classes of the row's sample."""
    values, _ = score(outputs, {}, samples.numel(), None if classes is None else classes[samples])
    return values.detach().to(torch.promote_types(values.dtype, torch.float32))


def _blank_masks(A: Tensor, size: Tuple[int, ...]) -> Tensor:
    """(B, K): whether the Score-CAM mask of (sample, channel) is all zero: its upsampled map is constant."""
    flat = A.flatten(2)
    blank = flat.amax(dim=2) == flat.amin(dim=2)
    candidates = torch.nonzero(blank)
    if candidates.numel():  # upsampling a constant map can round unevenly: check the masks themselves
        masks = maths.scorecam_masks(A[candidates[:, 0], candidates[:, 1]], size)
        blank[candidates[:, 0], candidates[:, 1]] = ~masks.flatten(1).any(dim=1)
    return blank


def _live_channels(own: Tensor, axis: int) -> Tensor:
    """(B, K): whether a channel holds anything but zeros (ablating an all-zero channel changes nothing)."""
    return own.movedim(axis, 1).flatten(2).ne(0).any(dim=2)


def _ablate(own: Tensor, samples: Tensor, channels: Tensor, axis: int) -> Tensor:
    """One row per (sample, channel): the sample's capture with that channel set to zero."""
    keep = torch.ones(samples.numel(), own.shape[axis], dtype=own.dtype, device=own.device)
    keep[torch.arange(samples.numel(), device=own.device), channels] = 0
    shape = [samples.numel()] + [1] * (own.dim() - 1)
    shape[axis] = own.shape[axis]
    return own[samples] * keep.view(shape)


def _rows(which: Tensor) -> Rows:
    """The (sample, channel) pairs where ``which`` (B, K) is true, sample-major."""
    found = torch.nonzero(which)
    return found[:, 0], found[:, 1]


def _chunks(rows: Rows, chunk: int) -> List[Rows]:
    samples, channels = rows
    return [(samples[i:i + chunk], channels[i:i + chunk]) for i in range(0, samples.numel(), chunk)]


def _refuse_zero_scores(original: Tensor) -> None:
    zero = torch.nonzero(original == 0).flatten().tolist()
    if zero:
        raise TargetError(f"Ablation-CAM divides by the explained score, which is exactly 0 for sample(s) "
                          f"{listing(zero)}; explain another target there, or use Score-CAM")
