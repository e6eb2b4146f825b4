"""CAM options and multi-layer fusion, as pure functions of ``(A, G)`` and of maps.

Every built-in CAM is a sum over channels of its *weighted activations* (pytorch-grad-cam's term; Captum's
``LayerGradCam(attr_dim_summation=False)`` returns Grad-CAM's), then a ReLU. The options change that last step:

- ``signed=True``: no ReLU (Captum's ``relu_attributions=False``);
- ``per_channel=True``: the weighted activations themselves, (B, K, *spatial), not summed (ReLU'd elementwise unless
  ``signed``);
- ``eigen_smooth=True``: the first principal component of the weighted activations over the positions instead of
  their sum (pytorch-grad-cam's ``eigen_smooth``), signed by :func:`~guided_swap.core.cam.principal_component`'s
  rule. EigenGrad-CAM always is one.

Score-CAM and Ablation-CAM weigh each channel by what their own passes measured: their weighted activations are
``w_k A_k`` (:func:`weights_map`), so the same options apply. FullGrad has none: options on it are refused.

:func:`fuse` combines the maps of several layers as pytorch-grad-cam does with several target layers (``"mean"``)
or as its RefineCAM does (``"product"``), each map min-max scaled like its ``scale_cam_image``.

>>> import torch
>>> A = torch.ones(1, 2, 1, 2); G = torch.tensor([1.0, -3.0]).view(1, 2, 1, 1).expand(1, 2, 1, 2)
>>> cam_map("gradcam", A, G), cam_map("gradcam", A, G, signed=True)
(tensor([[[0., 0.]]]), tensor([[[-2., -2.]]]))
>>> cam_map("gradcam", A, G, per_channel=True, signed=True)[0, :, 0, 0]
tensor([ 1., -3.])
>>> fuse([torch.tensor([[[0.0, 2.0]]]), torch.tensor([[[1.0, 3.0]]])], (1, 2), "mean")
tensor([[[0.0000, 1.0000]]])
"""
from typing import Sequence

import torch
from torch import Tensor

from . import cam
from .pass_cams import PASS_CAMS

FUSIONS = ("mean", "product")
#: pytorch-grad-cam's ``scale_cam_image``: ``(m - min) / (max(m - min) + 1e-7)`` per image.
MIN_MAX_EPS = 1e-7


def check_flags(**flags: bool) -> None:
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{key}= is True or False, got {value!r}")


def cam_map(name: str, activation: Tensor, gradient: Tensor, *, signed: bool = False, per_channel: bool = False,
            eigen_smooth: bool = False) -> Tensor:
    """The CAM ``name`` of ``(A, G)`` with options (the module docstring): (B, *spatial), or (B, K, *spatial)
    with ``per_channel``. No option: :func:`guided_swap.core.cam.compute`, the same map as ``cams_raw[name]``.
    A user's CAM (``register_cam``) has no weighted activations: options raise :class:`~guided_swap.CamError`,
    and so does FullGrad, or a Score-CAM or Ablation-CAM this pass did not make (:func:`weights_map` makes those)."""
    check_flags(signed=signed, per_channel=per_channel, eigen_smooth=eigen_smooth)
    if not (signed or per_channel or eigen_smooth):
        return cam.compute(name, activation, gradient)
    _refuse_pass_cam(name)
    cam.get_cam(name)  # an unknown name: the registry's error
    if name not in cam.WEIGHTED:
        raise cam.CamError(f"{name!r} is a CAM of your own, a function giving one map: signed=, per_channel= and "
                           "eigen_smooth= need the weighted activations it sums, which only the built-in CAMs "
                           f"{cam.BUILT_IN} have. Register a variant that computes what you want instead")
    return reduce(name, cam.WEIGHTED[name](activation, gradient), signed=signed, per_channel=per_channel,
                  eigen_smooth=eigen_smooth)


def weights_map(name: str, activation: Tensor, weights: Tensor, *, signed: bool = False, per_channel: bool = False,
                eigen_smooth: bool = False) -> Tensor:
    """A CAM made from per-sample channel weights ``weights`` (B, K) that its own passes computed (Score-CAM,
    Ablation-CAM), with options: its weighted activations are ``w_k A_k`` (pytorch-grad-cam's), in float32 at least.

    >>> A = torch.tensor([[[[1.0, 2.0]], [[3.0, 1.0]]]])      # (1, 2 channels, 1, 2)
    >>> weights_map("scorecam", A, torch.tensor([[1.0, -1.0]]), signed=True)
    tensor([[[-2.,  1.]]])
    """
    check_flags(signed=signed, per_channel=per_channel, eigen_smooth=eigen_smooth)
    activation = cam.working(activation)
    weighted = weights.to(activation.dtype).view(weights.shape + (1,) * (activation.dim() - 2)) * activation
    return reduce(name, weighted, signed=signed, per_channel=per_channel, eigen_smooth=eigen_smooth)


def reduce(name: str, weighted: Tensor, *, signed: bool, per_channel: bool, eigen_smooth: bool) -> Tensor:
    """The CAM ``name``'s map from its weighted activations (B, K, *spatial): their sum over the channels (their
    principal component with ``eigen_smooth`` or for an Eigen CAM), or themselves with ``per_channel``; then the
    ReLU unless ``signed``."""
    eigen = eigen_smooth or name in cam.ALWAYS_EIGEN
    if per_channel:
        if eigen:
            raise cam.CamError(f"per_channel=True gives the weighted activations channel by channel; "
                               f"{'eigen_smooth=True' if eigen_smooth else name!r} reduces them to one principal "
                               "component, which has no channels. Ask for one or the other")
        return weighted if signed else torch.relu(weighted)
    reduced = cam.principal_component(weighted) if eigen else weighted.sum(dim=1)
    return reduced if signed else torch.relu(reduced)


def _refuse_pass_cam(name: str) -> None:
    """Options on a CAM of :data:`~guided_swap.core.pass_cams.PASS_CAMS` that :func:`weights_map` cannot make."""
    if name == "fullgrad":
        raise cam.CamError("FullGrad ('fullgrad') sums min-max scaled maps of the input gradient and of every bias "
                           "layer's |b_k G_k|, each channel scaled on its own: it has no weighted activations w_k A_k "
                           "of one layer, so signed=, per_channel= and eigen_smooth= have nothing to apply to. Read "
                           "e.cams_raw['fullgrad'] (or e.fused('fullgrad')) as it is")
    if name in PASS_CAMS:
        raise cam.CamError(f"{name!r} needs passes of its own, which this explanation did not run: explain with "
                           f"cams=({name!r},) for its map and its options")


def min_max(maps: Tensor) -> Tensor:
    """Each (B, *spatial) map scaled to [0, 1] as pytorch-grad-cam's ``scale_cam_image`` does:
    ``(m - min) / (max(m - min) + 1e-7)`` (a constant map becomes zeros).

    >>> min_max(torch.tensor([[2.0, 4.0, 6.0]]))
    tensor([[0.0000, 0.5000, 1.0000]])
    """
    if maps.dim() < 2:
        raise ValueError(f"min_max scales (B, *spatial) maps, got shape {tuple(maps.shape)}")
    flat = maps.flatten(1)
    shifted = maps - flat.amin(dim=1).view(-1, *([1] * (maps.dim() - 1)))
    top = shifted.flatten(1).amax(dim=1).view(-1, *([1] * (maps.dim() - 1)))
    return shifted / (top + MIN_MAX_EPS)


def fuse(maps: Sequence[Tensor], size: Sequence[int], how: str = "mean", interpolate: str = "bilinear") -> Tensor:
    """One (B, *size) map in [0, 1] from the non-negative (B, *spatial) maps of several layers.

    ``"mean"`` (pytorch-grad-cam with several target layers): each map min-max scaled and resized to ``size``,
    the mean over the layers, ReLU, min-max scaled again. ``"product"`` (pytorch-grad-cam's RefineCAM): each map
    min-max scaled, resized and min-max scaled again (its one-layer CAM), their product, min-max scaled.
    """
    if not isinstance(how, str) or how not in FUSIONS:
        raise ValueError(f"how={how!r}: fuse the layers' maps by one of {FUSIONS}")
    maps = list(maps)
    if not maps:
        raise ValueError("fuse needs the maps of at least one layer")
    resized = [cam.upsample(min_max(cam.working(m)), size, interpolate) for m in maps]
    if how == "mean":
        return min_max(torch.relu(torch.stack(resized).mean(dim=0)))
    return min_max(torch.stack([min_max(m) for m in resized]).prod(dim=0))
