"""Class activation maps as pure functions of the activation ``A`` (B, K, *spatial) and its gradient ``G``.

All of them take ordinary gradients (docs/methods.md); none needs a model. The spatial part may have any rank:
(l) for a Conv1d signal, (h, w) for an image, (d, h, w) or (t, h, w) for a volume or a video.

>>> import torch
>>> A = torch.ones(1, 2, 2, 2); G = torch.tensor([1.0, -3.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
>>> gradcam(A, G)
tensor([[[0., 0.],
         [0., 0.]]])
>>> pixelwise_cam(A, -G)
tensor([[[2., 2.],
         [2., 2.]]])
>>> upsample(torch.ones(1, 2, 2, 2), (4, 8, 8)).shape   # a (B, t, h, w) map, trilinear
torch.Size([1, 4, 8, 8])
"""
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# "linear", "bilinear" and "trilinear" all mean linear interpolation along every spatial axis of the map.
LINEAR = ("linear", "bilinear", "trilinear")
INTERPOLATIONS_BY_RANK = {
    1: LINEAR + ("nearest", "nearest-exact", "area"),
    2: LINEAR + ("nearest", "nearest-exact", "bicubic", "area"),
    3: LINEAR + ("nearest", "nearest-exact", "area"),
}
INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "area", "linear", "trilinear", "nearest-exact")
_LINEAR_MODE = {1: "linear", 2: "bilinear", 3: "trilinear"}


def _check(activation: Tensor, gradient: Tensor) -> None:
    if activation.shape != gradient.shape:
        raise ValueError(f"activation {tuple(activation.shape)} and gradient {tuple(gradient.shape)} differ in shape")
    if activation.dim() < 3:
        raise ValueError(
            f"a class activation map needs a feature map (B, K, *spatial); got shape {tuple(activation.shape)}. "
            "Capture a convolutional layer (see guided_swap.layer_names(model))"
        )


def _spatial_dims(tensor: Tensor) -> tuple:
    return tuple(range(2, tensor.dim()))


def gradcam(activation: Tensor, gradient: Tensor) -> Tensor:
    """Grad-CAM: ``ReLU(sum_k mean_spatial(G_k) * A_k)``, shape (B, *spatial)."""
    _check(activation, gradient)
    weights = gradient.mean(dim=_spatial_dims(gradient), keepdim=True)
    return torch.relu((weights * activation).sum(dim=1))


def pixelwise_cam(activation: Tensor, gradient: Tensor) -> Tensor:
    """Pixel-wise CAM: ``ReLU(sum_k G_k * A_k)``, shape (B, *spatial)."""
    _check(activation, gradient)
    return torch.relu((gradient * activation).sum(dim=1))


def guided_pixelwise_cam(activation: Tensor, gradient: Tensor) -> Tensor:
    """Guided pixel-wise CAM: ``ReLU(sum_k ReLU(G_k) * A_k)``, shape (B, *spatial)."""
    _check(activation, gradient)
    return torch.relu((torch.relu(gradient) * activation).sum(dim=1))


def upsample(cam: Tensor, size: Sequence[int], mode: str = "bilinear") -> Tensor:
    """Resize a (B, *spatial) map to (B, *size): linear, bilinear or trilinear by the map's rank for the
    linear modes (any of the three names), or ``nearest``, ``area`` (``bicubic`` for 2-d maps only)."""
    if mode not in INTERPOLATIONS:
        raise ValueError(f"interpolation {mode!r} is not one of {INTERPOLATIONS}")
    rank = cam.dim() - 1
    if rank not in INTERPOLATIONS_BY_RANK or len(tuple(size)) != rank:
        raise ValueError(f"expected a (B, *spatial) map with 1 to 3 spatial dimensions matching size {tuple(size)}, "
                         f"got shape {tuple(cam.shape)}")
    if mode not in INTERPOLATIONS_BY_RANK[rank]:
        raise ValueError(f"interpolation {mode!r} does not work on a {rank}-d map; use one of "
                         f"{INTERPOLATIONS_BY_RANK[rank]}")
    mode = _LINEAR_MODE[rank] if mode in LINEAR else mode
    extra = {"align_corners": False} if mode in LINEAR + ("bicubic",) else {}
    return F.interpolate(cam.unsqueeze(1), size=tuple(size), mode=mode, **extra).squeeze(1)


def guided_gradcam(cam: Tensor, guided_gradient: Tensor) -> Tensor:
    """Guided Grad-CAM: the upsampled (B, *S) map times the guided-backprop map (B, C, *S), per channel."""
    if cam.shape[0] != guided_gradient.shape[0] or cam.shape[1:] != guided_gradient.shape[2:]:
        raise ValueError(f"cam {tuple(cam.shape)} does not fit gradient {tuple(guided_gradient.shape)}")
    return cam.unsqueeze(1) * guided_gradient
