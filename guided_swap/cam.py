"""Class activation maps as pure functions of the activation ``A`` (B, K, h, w) and its gradient ``G``.

All of them take ordinary gradients (docs/methods.md); none needs a model.

>>> import torch
>>> A = torch.ones(1, 2, 2, 2); G = torch.tensor([1.0, -3.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
>>> gradcam(A, G)
tensor([[[0., 0.],
         [0., 0.]]])
>>> pixelwise_cam(A, -G)
tensor([[[2., 2.],
         [2., 2.]]])
"""
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "area")


def _check(activation: Tensor, gradient: Tensor) -> None:
    if activation.shape != gradient.shape:
        raise ValueError(f"activation {tuple(activation.shape)} and gradient {tuple(gradient.shape)} differ in shape")
    if activation.dim() < 3:
        raise ValueError(
            f"a class activation map needs a feature map (B, K, h, w); got shape {tuple(activation.shape)}. "
            "Capture a convolutional layer (see guided_swap.layer_names(model))"
        )


def gradcam(activation: Tensor, gradient: Tensor) -> Tensor:
    """Grad-CAM: ``ReLU(sum_k mean_hw(G_k) * A_k)``, shape (B, h, w)."""
    _check(activation, gradient)
    weights = gradient.mean(dim=tuple(range(2, gradient.dim())), keepdim=True)
    return torch.relu((weights * activation).sum(dim=1))


def pixelwise_cam(activation: Tensor, gradient: Tensor) -> Tensor:
    """Pixel-wise CAM: ``ReLU(sum_k G_k * A_k)``, shape (B, h, w)."""
    _check(activation, gradient)
    return torch.relu((gradient * activation).sum(dim=1))


def guided_pixelwise_cam(activation: Tensor, gradient: Tensor) -> Tensor:
    """Guided pixel-wise CAM: ``ReLU(sum_k ReLU(G_k) * A_k)``, shape (B, h, w)."""
    _check(activation, gradient)
    return torch.relu((torch.relu(gradient) * activation).sum(dim=1))


def upsample(cam: Tensor, size: Sequence[int], mode: str = "bilinear") -> Tensor:
    """Resize a (B, h, w) map to (B, *size)."""
    if mode not in INTERPOLATIONS:
        raise ValueError(f"interpolation {mode!r} is not one of {INTERPOLATIONS}")
    if cam.dim() != 3:
        raise ValueError(f"expected a (B, h, w) map, got shape {tuple(cam.shape)}")
    extra = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(cam.unsqueeze(1), size=tuple(size), mode=mode, **extra).squeeze(1)


def guided_gradcam(cam: Tensor, guided_gradient: Tensor) -> Tensor:
    """Guided Grad-CAM: the upsampled (B, H, W) map times the guided-backprop map (B, C, H, W), per channel."""
    if cam.shape[0] != guided_gradient.shape[0] or cam.shape[1:] != guided_gradient.shape[2:]:
        raise ValueError(f"cam {tuple(cam.shape)} does not fit gradient {tuple(guided_gradient.shape)}")
    return cam.unsqueeze(1) * guided_gradient
