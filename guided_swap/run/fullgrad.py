"""FullGrad (Srinivas & Fleuret 2019): one pass with ordinary gradients through every layer that adds a bias.

:meth:`guided_swap.Capture.bias_pass` gives the ordinary input gradient and, at the output of every
convolution and BatchNorm with a bias, the gradient there and the bias (a BatchNorm's is
``bias - mean * weight / sqrt(var + eps)``); the map sums, per pixel, the min-max scaled ``|x ∇x|`` of each input
channel and the min-max scaled ``|b_k G_k|`` of every channel of every such layer, upsampled to the input, as
pytorch-grad-cam's ``FullGrad`` does (:func:`guided_swap.core.pass_cams.fullgrad`). Layers whose output is not a
feature map of the input's rank (a BatchNorm1d on pooled features) have no place in the image and are left out,
as pytorch-grad-cam leaves out everything but ``Conv2d`` and ``BatchNorm2d``. No layer is chosen: the map is the
same whichever layer the explainer captures.

>>> import torch, torchvision, guided_swap as gs
>>> ex = gs.convert(torchvision.models.resnet18().eval(), layer="layer4")
>>> x = torch.randn(2, 3, 64, 64)
>>> fullgrad_map(ex.capture, x, gs.core.targets.as_score([3, 5]), None).shape
torch.Size([2, 64, 64])
"""
from typing import Any, Optional

from torch import Tensor

from ..capture.base import Capture
from ..core import pass_cams as maths
from ..core.targets import Score


def fullgrad_map(capture: Capture, x: Any, score: Score, classes: Optional[Tensor],
                 interpolate: str = "bilinear") -> Tensor:
    """FullGrad of ``x`` (module docstring), (B, *input spatial), before pytorch-grad-cam's last min-max scaling."""
    result = capture.bias_pass(x, score, classes)
    clean = capture.stack(x).detach()
    spatial = [(bias, grad) for bias, grad in result.biases if grad.dim() == clean.dim()]
    return maths.fullgrad(clean, result.input_grad, spatial, interpolate).detach()
