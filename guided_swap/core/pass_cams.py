"""The maths of the CAMs that need passes of their own: Score-CAM, Ablation-CAM and FullGrad.

Gradient CAMs (:mod:`guided_swap.core.cam`) are functions of ``A`` and ``G`` alone. These three need more of the
model: Score-CAM the score of the input masked by each channel, Ablation-CAM the score with each channel of ``A``
set to zero, FullGrad the ordinary gradient at the output of every layer that adds a bias. Running those passes
is the explainer's business (:mod:`guided_swap.run.extra_cams`); here are the pure functions of what they
return. Each follows pytorch-grad-cam's code (``ScoreCAM``, ``AblationCAM``, ``FullGrad``), which the tests
compare against; docs/cams.md says where its choices are arbitrary. As every CAM's, their maths run in float32
at least (:func:`~guided_swap.core.cam.working`): a float16 or bfloat16 model's maps are float32 (in float16,
Score-CAM's ``1e-8`` is 0, and a constant channel's mask was ``0 / 0``).

>>> import torch
>>> A = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]], [[1.0, 1.0], [1.0, 1.0]]]])   # (1, 2, 2, 2)
>>> scorecam_masks(A[0], (3, 3))[0]      # channel 0 upsampled (corners aligned), min-max scaled
tensor([[0.0000, 0.1667, 0.3333],
        [0.3333, 0.5000, 0.6667],
        [0.6667, 0.8333, 1.0000]])
>>> bool(scorecam_masks(A[0], (3, 3))[1].eq(0).all())   # a constant channel masks everything out
True
>>> weighted_cam(A, ablation_weights(torch.tensor([2.0]), torch.tensor([[1.0, 3.0]])))
tensor([[[0.0000, 0.0000],
         [0.5000, 1.0000]]])
"""
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cam import _LINEAR_MODE, CamError, upsample, working

#: The CAMs that need passes of their own; ``explain(x, cams=NAMES)`` computes them in the same call.
PASS_CAMS = ("scorecam", "ablationcam", "fullgrad")
#: pytorch-grad-cam's constant in Score-CAM's per-channel min-max scaling of the upsampled activation.
SCORECAM_EPS = 1e-8
#: pytorch-grad-cam's constant in its min-max scaling (``scale_cam_image``), which FullGrad applies per channel.
MINMAX_EPS = 1e-7


class BiasPass(NamedTuple):
    """One forward and backward with ordinary gradients everywhere, for FullGrad."""

    outputs: object                          # the model's output
    score: Tensor                            # (B,) the explained score
    input_grad: Tensor                       # the ordinary d score / d x
    biases: Tuple[Tuple[Tensor, Tensor], ...]  # per bias-adding layer: its bias (K,), d score / d its output


def scorecam_masks(rows: Tensor, size: Sequence[int]) -> Tensor:
    """Score-CAM's masks: each (*spatial) map of ``rows`` (n, *spatial) upsampled to ``size`` with the corners
    aligned (pytorch-grad-cam's ``UpsamplingBilinear2d``), then min-max scaled to [0, 1]; (n, *size), in float32 at
    least."""
    rows = working(rows)
    mode = _LINEAR_MODE[rows.dim() - 1]
    up = F.interpolate(rows.unsqueeze(1), size=tuple(size), mode=mode, align_corners=True).squeeze(1)
    flat = up.flatten(1)
    low = flat.min(dim=1).values.view(-1, *([1] * len(size)))
    high = flat.max(dim=1).values.view(-1, *([1] * len(size)))
    return (up - low) / (high - low + SCORECAM_EPS)


def softmax_weights(scores: Tensor) -> Tensor:
    """Score-CAM's channel weights: the softmax over the channels of the masked inputs' scores (B, K)."""
    return torch.softmax(scores, dim=1)


def ablation_weights(original: Tensor, ablated: Tensor) -> Tensor:
    """Ablation-CAM's channel weights ``(y - y_k) / y``: the relative drop of the score ``original`` (B,) when
    channel ``k`` is ablated (``ablated``, (B, K))."""
    return (original.unsqueeze(1) - ablated) / original.unsqueeze(1)


def weighted_cam(activation: Tensor, weights: Tensor) -> Tensor:
    """``ReLU(sum_k w_k A_k)`` for per-sample channel weights (B, K); (B, *spatial), in float32 at least."""
    activation = working(activation)
    shape = weights.shape + (1,) * (activation.dim() - 2)
    return torch.relu((weights.view(shape).to(activation.dtype) * activation).sum(dim=1))


def channel_minmax(t: Tensor) -> Tensor:
    """Each (sample, channel) map of ``t`` (B, K, *spatial) min-max scaled as pytorch-grad-cam's
    ``scale_cam_image`` does: ``(t - min) / (max(t - min) + 1e-7)``."""
    flat = t.flatten(2)
    shifted = flat - flat.min(dim=2, keepdim=True).values
    return (shifted / (shifted.max(dim=2, keepdim=True).values + MINMAX_EPS)).view_as(t)


def fullgrad(x: Tensor, input_grad: Tensor, biases: Sequence[Tuple[Tensor, Tensor]],
             interpolate: str = "bilinear") -> Tensor:
    """FullGrad (Srinivas & Fleuret 2019) as pytorch-grad-cam sums it, before its last min-max scaling:
    ``sum_c minmax(|x ∇x|_c) + sum_layers upsample(sum_k minmax(|b_k G_k|))`` (B, *input spatial).

    Each channel is min-max scaled on its own; the sum over a layer's channels comes before the upsampling,
    which is linear, so it equals pytorch-grad-cam's per-channel resize and sum at a fraction of the work. The sums
    run in float32 at least.
    """
    size = tuple(x.shape[2:])
    total = channel_minmax((working(input_grad) * working(x)).abs()).sum(dim=1)
    for bias, grad in biases:
        grad = working(grad)
        shape = (1, -1) + (1,) * (grad.dim() - 2)
        layer = channel_minmax((bias.view(shape).to(grad.dtype) * grad).abs()).sum(dim=1)
        total = total + (layer if tuple(layer.shape[1:]) == size else upsample(layer, size, interpolate))
    return total


def batchnorm_bias(name: str, weight: Optional[Tensor], bias: Tensor, mean: Optional[Tensor],
                   var: Optional[Tensor], eps: float) -> Tensor:
    """What an eval-mode BatchNorm adds per channel: ``bias - mean * weight / sqrt(var + eps)`` (FullGrad's
    official code and pytorch-grad-cam's), in float32 at least. One without running statistics adds no fixed bias:
    a ``CamError``.

    >>> batchnorm_bias("bn", torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([3.0]), 1.0)
    tensor([0.5000])
    """
    if mean is None or var is None:
        raise CamError(f"FullGrad needs the bias every BatchNorm adds, but {name!r} normalises with batch statistics "
                       "(no running statistics), so it adds none that is fixed; FullGrad cannot be computed here")
    mean, var, bias = working(mean), working(var), working(bias)
    scale = torch.ones_like(mean) if weight is None else working(weight)
    return -(mean * scale / torch.sqrt(var + eps)) + bias


def module_bias(name: str, module: nn.Module) -> Optional[Tensor]:
    """The bias ``module`` adds per channel, when it is a convolution (``Conv1d/2d/3d``) or a BatchNorm with one;
    else None: the layers FullGrad reads."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.bias
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.bias is not None:
        return batchnorm_bias(name, module.weight, module.bias, module.running_mean, module.running_var, module.eps)
    return None
