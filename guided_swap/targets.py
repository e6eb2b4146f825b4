"""What is explained: a score per sample, built from a target and the model's outputs.

A target is one of: None (each sample's argmax), an int (the same class for all), a sequence or LongTensor
with one class per sample, a callable ``outputs -> (B,) score``, a :class:`Channel` of a captured layer
(feature visualisation), or a :class:`Box`: one detection per image of a detector (torchvision's list of dicts).

>>> import torch
>>> score, classes = class_score(torch.tensor([[1.0, 5.0], [7.0, 2.0]]), None)
>>> classes, score
(tensor([1, 0]), tensor([5., 7.]))
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

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


@dataclass(frozen=True)
class Box:
    """Explain one detection per image: the score of detection ``index`` in each image's dict of a detector
    that returns torchvision's format (a list with one dict per image: ``boxes``, ``labels``, ``scores``, most
    confident first). With ``label``, ``index`` counts only the detections of that class. :meth:`indices`
    says which detection of ``outputs[b]`` was explained. The score is differentiable: torchvision keeps the
    autograd graph from the image to ``scores`` through non-maximum suppression (an index selection).

    >>> import torch
    >>> detections = [{"scores": torch.tensor([0.9, 0.5, 0.2]), "labels": torch.tensor([3, 1, 1])}]
    >>> Box(0).indices(detections), Box(1, label=1).indices(detections), box_score(Box(1, label=1), detections, 1)
    ([0], [2], tensor([0.2000]))
    """

    index: int = 0
    label: Optional[int] = None

    def __post_init__(self):
        for name in ("index", "label"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"Box {name} must be an int, got {type(value).__name__}")
        if self.index < 0:
            raise ValueError(f"Box index must be >= 0 (0 is each image's most confident detection), got {self.index}")

    def indices(self, outputs: Any) -> List[int]:
        """The position of the explained detection in each image's dict, validated against ``outputs``."""
        return [self._index(b, detections) for b, detections in enumerate(_detections(outputs))]

    def _index(self, image: int, detections: Dict[str, Tensor]) -> int:
        scores = detections["scores"]
        if self.label is None:
            candidates, which = torch.arange(scores.shape[0]), "detections"
        elif "labels" not in detections:
            raise TargetError(f"Box(label={self.label}) needs 'labels' in each image's dict; image {image} has "
                              f"{sorted(detections)}")
        else:
            candidates = torch.nonzero(detections["labels"] == self.label).flatten()
            which = f"detections of label {self.label}"
        if self.index >= candidates.numel():
            raise TargetError(f"image {image} has {candidates.numel()} {which}; Box(index={self.index}) needs at least "
                              f"{self.index + 1}. Pick a lower index, or lower the detector's score threshold "
                              "(box_score_thresh for Faster/Mask R-CNN, score_thresh for RetinaNet, FCOS and SSD)")
        return int(candidates[self.index])


def _detections(outputs: Any) -> List[Dict[str, Tensor]]:
    if not isinstance(outputs, (list, tuple)) or not all(isinstance(d, dict) and "scores" in d for d in outputs):
        raise TargetError("a Box target needs a detector's output, a list with one dict per image holding 'scores' "
                          f"(torchvision's format); this model returns a {type(outputs).__name__}. Pass a callable "
                          "target outputs -> (B,) score instead")
    return list(outputs)


def box_score(target: Box, outputs: Any, batch: int) -> Tensor:
    """The (B,) score of a :class:`Box` target: each image's chosen detection score."""
    detections = _detections(outputs)
    if len(detections) != batch:
        raise TargetError(f"the detector returned {len(detections)} dicts for a batch of {batch} images")
    picked = target.indices(detections)
    return torch.stack([d["scores"][i] for d, i in zip(detections, picked)])


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
