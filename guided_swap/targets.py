"""What is explained: a score per sample, built from a target and the model's outputs.

A target is one of: None (each sample's argmax), an int (the same class for all), a sequence or LongTensor
with one class per sample, a callable ``outputs -> (B,) score``, or a :class:`Channel` of a captured layer
(feature visualisation).

>>> import torch
>>> score, classes = class_score(torch.tensor([[1.0, 5.0], [7.0, 2.0]]), None)
>>> classes, score
(tensor([1, 0]), tensor([5., 7.]))
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .errors import OutputError, TargetError

#: Which entry of a model's output is explained: None (the output is one tensor), an index or a key.
OutputKey = Union[None, int, str]


@dataclass(frozen=True)
class Channel:
    """Explain one channel of a captured layer: its sum over space, or one ``unit`` (i, j) of it.

    >>> Channel("layer3", 7), Channel("layer3", 7, unit=(2, 3))
    (Channel(layer='layer3', channel=7, unit=None), Channel(layer='layer3', channel=7, unit=(2, 3)))
    """

    layer: str
    channel: int
    unit: Optional[Tuple[int, ...]] = None


def class_indices(logits: Tensor, target: Any) -> Tensor:
    """The per-sample class indices a class target stands for, validated against ``logits`` (B, K)."""
    if logits.dim() != 2:
        raise TargetError(
            f"class targets need (B, K) logits, but the explained output has shape {tuple(logits.shape)}; "
            "pass a callable target that maps the outputs to a (B,) score"
        )
    batch, classes = logits.shape
    if target is None:
        return logits.argmax(dim=1)
    if isinstance(target, bool):
        raise TypeError("target must be an int, a sequence of ints, a LongTensor, None, a callable or a Channel; got a bool")
    if isinstance(target, int):
        indices = torch.full((batch,), target, dtype=torch.long, device=logits.device)
    else:
        indices = _as_long_tensor(target).to(logits.device)
        if indices.dim() != 1 or indices.numel() != batch:
            raise TargetError(f"target has {indices.numel()} entries of shape {tuple(indices.shape)}; "
                              f"the batch has {batch} samples: give one class per sample")
    bad = (indices < 0) | (indices >= classes)
    if bool(bad.any()):
        raise TargetError(f"target class {indices[bad][0].item()} is out of range: the model has {classes} classes (0..{classes - 1})")
    return indices


def _as_long_tensor(target: Any) -> Tensor:
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"a target tensor must hold integer class indices, got dtype {target.dtype}")
        return target.long().reshape(-1) if target.dim() == 0 else target.long()
    if isinstance(target, Sequence) and not isinstance(target, str):
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in target):
            raise TypeError(f"a target sequence must hold ints, got {list(target)[:5]}")
        return torch.tensor(list(target), dtype=torch.long)
    raise TypeError(
        f"target of type {type(target).__name__} is not understood: use None, an int, a sequence of ints, a "
        "LongTensor, a callable outputs -> (B,) score, or guided_swap.Channel(layer, channel)"
    )


def class_score(logits: Tensor, target: Any) -> Tuple[Tensor, Tensor]:
    """The (B,) scores ``logits[i, t_i]`` and the indices ``t``."""
    indices = class_indices(logits, target)
    return logits.gather(1, indices.unsqueeze(1)).squeeze(1), indices


def channel_score(target: Channel, captures: Dict[str, Tensor]) -> Tensor:
    """The (B,) score of a :class:`Channel` target: that channel's sum over space, or one unit of it."""
    if target.layer not in captures:
        raise TargetError(f"Channel target layer {target.layer!r} is not captured by this explainer "
                          f"(captured: {list(captures)}); convert with layer=[..., {target.layer!r}]")
    activation = captures[target.layer]
    if not 0 <= target.channel < activation.shape[1]:
        raise TargetError(f"channel {target.channel} is out of range: {target.layer!r} has {activation.shape[1]} channels")
    channel = activation[:, target.channel]
    if target.unit is None:
        return channel.reshape(channel.shape[0], -1).sum(dim=1)
    if len(target.unit) != channel.dim() - 1 or any(not 0 <= u < s for u, s in zip(target.unit, channel.shape[1:])):
        raise TargetError(f"unit {target.unit} does not fit the channel map of shape {tuple(channel.shape[1:])}")
    return channel[(slice(None),) + tuple(target.unit)]


def callable_score(fn: Callable, outputs: Any, batch: int) -> Tensor:
    """The (B,) score a user's callable returns for the model's outputs, validated."""
    score = fn(outputs)
    if not isinstance(score, Tensor):
        raise TargetError(f"a callable target must return a tensor of shape ({batch},), got {type(score).__name__}")
    if score.shape != (batch,):
        raise TargetError(f"a callable target must return one score per sample, shape ({batch},); got {tuple(score.shape)}")
    return score


def select_output(outputs: Any, key: OutputKey) -> Tensor:
    """The entry of a model's outputs that is explained: the tensor itself, or ``outputs[key]``."""
    if key is None:
        if not isinstance(outputs, Tensor):
            raise OutputError(f"the model returns a {type(outputs).__name__}; convert with output=KEY to say which "
                              "entry is explained")
        return outputs
    if isinstance(key, str) and hasattr(outputs, "_fields"):
        return getattr(outputs, key)
    return outputs[key]
