"""What is explained: a score per sample, built from a target and the model's outputs.

A target is one of: None (each sample's argmax), an int (the same class for all), a sequence or LongTensor
with one class per sample, a callable ``outputs -> (B,) score``, a :class:`Channel` of a captured layer
(feature visualisation), or a :class:`Box`: one detection per image of a detector (torchvision's list of dicts).

>>> import torch
>>> score, classes = class_score(torch.tensor([[1.0, 5.0], [7.0, 2.0]]), None)
>>> classes, score
(tensor([1, 0]), tensor([5., 7.]))
"""
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

from .errors import OutputError, TargetError

#: Which entry of a model's output is explained: None (the output itself, or the entry :func:`default_output`
#: reads: ``logits``, or the only one), an index or a key.
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


@dataclass(frozen=True)
class BoxMatch:
    """Explain the detections that match reference boxes, as pytorch-grad-cam's ``FasterRCNNBoxScoreTarget``
    writes it: for each reference box (``boxes`` (K, 4), x1 y1 x2 y2, with ``labels`` (K,)), the detection of
    largest IoU with it counts when that IoU exceeds ``iou_threshold`` and its label is the reference's; the
    image's score is the sum of IoU + score over the matches, and 0 when nothing matches (the maps are then
    zero, and explain warns). One set of references for every image, or a list with one set per image.

    >>> import torch
    >>> detections = [{"boxes": torch.tensor([[0., 0., 10., 10.], [20., 20., 30., 30.]]),
    ...                "scores": torch.tensor([0.9, 0.6]), "labels": torch.tensor([3, 1])}]
    >>> BoxMatch([[1., 1., 10., 10.]], [3]).scores(detections)
    tensor([1.7100])
    >>> BoxMatch([[1., 1., 10., 10.]], [1]).scores(detections)  # the label differs: no match
    tensor([0.])
    """

    boxes: Any
    labels: Any
    iou_threshold: float = 0.5

    def __post_init__(self):
        if isinstance(self.iou_threshold, bool) or not isinstance(self.iou_threshold, (int, float)) or \
                not 0 <= self.iou_threshold < 1:
            raise ValueError(f"BoxMatch iou_threshold is an IoU in [0, 1), got {self.iou_threshold!r}")

    def _references(self, batch: int) -> List[Tuple[Tensor, Tensor]]:
        per_image = isinstance(self.boxes, (list, tuple)) and len(self.boxes) and \
            (isinstance(self.boxes[0], (Tensor, np.ndarray)) and self.boxes[0].ndim == 2 or
             isinstance(self.boxes[0], (list, tuple)) and len(self.boxes[0]) and
             isinstance(self.boxes[0][0], (list, tuple, Tensor)))
        boxes = list(self.boxes) if per_image else [self.boxes] * batch
        labels = list(self.labels) if per_image else [self.labels] * batch
        if len(boxes) != batch or len(labels) != batch:
            raise TargetError(f"BoxMatch has reference boxes for {len(boxes)} images; the batch has {batch}: give "
                              "one set of boxes for every image, or a list with one set per image")
        references = []
        for image, (b, l) in enumerate(zip(boxes, labels)):
            b = torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) if not isinstance(b, Tensor) else b.reshape(-1, 4)
            l = torch.as_tensor(l).reshape(-1)
            if b.shape[0] != l.shape[0]:
                raise TargetError(f"BoxMatch image {image}: {b.shape[0]} boxes but {l.shape[0]} labels; give one label "
                                  "per box")
            references.append((b, l))
        return references

    def scores(self, outputs: Any) -> Tensor:
        """The (B,) differentiable score of each image's detections in ``outputs`` (torchvision's format)."""
        detections = _detections(outputs)

        out = []
        for (boxes, labels), found in zip(self._references(len(detections)), detections):
            score = found["scores"].sum() * 0  # zero, and still part of the graph: no match gives zero maps
            if found["boxes"].shape[0]:
                ious = box_iou(boxes.to(found["boxes"]), found["boxes"])  # (K, N)
                best, index = ious.max(dim=1)
                for k in range(boxes.shape[0]):
                    if best[k] > self.iou_threshold and found["labels"][index[k]] == labels[k].to(found["labels"]):
                        score = score + best[k] + found["scores"][index[k]]
            out.append(score)
        return torch.stack(out)


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
    if _is_bool(target):
        raise TypeError("target must be an int, a sequence of ints, a LongTensor, None, a callable or a Channel; got a bool")
    indices = _class_tensor(target, batch).to(logits.device)
    bad = (indices < 0) | (indices >= classes)
    if bool(bad.any()):
        raise TargetError(f"target class {indices[bad][0].item()} is out of range: the model has {classes} classes (0..{classes - 1})")
    return indices


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def _is_int(value: Any) -> bool:
    """A Python or numpy integer (not a bool): one class for every sample."""
    return isinstance(value, numbers.Integral) and not _is_bool(value)


def _class_tensor(target: Any, batch: int) -> Tensor:
    """The (B,) long tensor of one class per sample that a class target (not None) stands for: an int (Python
    or numpy) or a 0-d integer tensor or array is the same class for every sample."""
    if _is_int(target):
        return torch.full((batch,), int(target), dtype=torch.long)
    zero_d = isinstance(target, (Tensor, np.ndarray)) and target.ndim == 0
    indices = _as_long_tensor(target)
    if zero_d:
        return indices.reshape(1).expand(batch)
    if indices.dim() != 1 or indices.numel() != batch:
        raise TargetError(f"target has {indices.numel()} entries of shape {tuple(indices.shape)}; "
                          f"the batch has {batch} samples: give one class per sample")
    return indices


def _as_long_tensor(target: Any) -> Tensor:
    if isinstance(target, np.ndarray):
        if not (np.issubdtype(target.dtype, np.integer)):
            raise TypeError(f"a target array must hold integer class indices, got dtype {target.dtype}")
        target = torch.from_numpy(np.ascontiguousarray(target))
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"a target tensor must hold integer class indices, got dtype {target.dtype}")
        return target.long().reshape(-1) if target.dim() == 0 else target.long()
    if isinstance(target, Sequence) and not isinstance(target, str):
        if not all(_is_int(t) for t in target):
            raise TypeError(f"a target sequence must hold ints, got {list(target)[:5]}")
        return torch.tensor([int(t) for t in target], dtype=torch.long)
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
    if not score.is_floating_point():
        raise TargetError(f"a callable target must return floating-point scores computed from the outputs (such as "
                          f"logits or probabilities), which are differentiated; got dtype {score.dtype}")
    return score


#: The entry explained by default when a model's output names its entries (a dict, Hugging Face's ModelOutput,
#: a namedtuple) and no ``output=`` is given; an output that names one entry only is explained by that one.
DEFAULT_OUTPUT = "logits"


def entry_names(outputs: Any) -> Optional[List[Any]]:
    """The names of a structured output's entries (dict keys, namedtuple fields), or None when it names none.

    >>> entry_names({"logits": 1, "hidden": 2}), entry_names((1, 2)), entry_names(torch.zeros(1))
    (['logits', 'hidden'], None, None)
    """
    if isinstance(outputs, Mapping):
        return list(outputs.keys())
    if isinstance(outputs, tuple) and hasattr(outputs, "_fields"):
        return list(outputs._fields)
    return None


def default_entry(names: Optional[Sequence[Any]]) -> OutputKey:
    """Of an output's entry names, the one explained without ``output=``: ``"logits"``, else the only one;
    None when the names leave it open.

    >>> default_entry(["logits", "hidden_states"]), default_entry(["last_hidden_state"]), default_entry(["a", "b"])
    ('logits', 'last_hidden_state', None)
    """
    names = list(names or ())
    if DEFAULT_OUTPUT in names:
        return DEFAULT_OUTPUT
    return names[0] if len(names) == 1 else None


def default_output(outputs: Any, key: OutputKey = None) -> OutputKey:
    """The entry explained: ``key`` when given, else (:func:`default_entry`) the ``logits`` entry, or the only
    entry, of an output that names its entries (Hugging Face's ``ModelOutput``, a dict, a namedtuple), else
    None (the output itself).

    >>> default_output({"logits": 1, "hidden_states": 2}), default_output({"logits": 1}, "hidden_states")
    ('logits', 'hidden_states')
    >>> default_output(torch.zeros(2, 3)) is None, default_output((torch.zeros(2, 3),)) is None
    (True, True)
    """
    return key if key is not None else default_entry(entry_names(outputs))


def select_output(outputs: Any, key: OutputKey) -> Tensor:
    """The entry of a model's outputs that is explained: the tensor itself, ``outputs[key]``, or (no key) the
    ``logits`` entry, or the only entry, of an output that names its entries (:func:`default_output`)."""
    key = default_output(outputs, key)
    if key is None:
        if not isinstance(outputs, Tensor):
            raise OutputError(f"the model returns a {type(outputs).__name__}; convert with output=KEY to say which "
                              "entry is explained")
        return outputs
    if isinstance(key, str) and hasattr(outputs, "_fields"):
        return getattr(outputs, key)
    return outputs[key]


def explained_logits(outputs: Any, key: OutputKey, batch: int) -> Tensor:
    """The logits an explanation records: the explained output, or (B, 0) for a model whose output is not a
    tensor and names no entry (a detector's list of dicts; see ``e.outputs``)."""
    if default_output(outputs, key) is not None or isinstance(outputs, Tensor):
        return select_output(outputs, key)
    device = next((t.device for t in torch.utils._pytree.tree_leaves(outputs) if isinstance(t, Tensor)), None)
    return torch.empty(batch, 0, device=device)


# --- one score for every path --------------------------------------------------------------------------------

class Score:
    """A target made into a score (:func:`as_score`): ``score(outputs, captures, batch, classes=None)`` gives
    the (B,) score and the class per sample (None for targets that are not classes).

    ``classes``, when given, are classes chosen already for these samples: the plain fork reuses the main
    graph's, and SmoothGrad the clean input's for every noisy copy. ``kind`` names the kind of target (a
    compiled pass compiles once per kind). Every capture path scores through this one object, so each kind of
    target works on every path or fails with one error.
    """

    kind = "score"

    def __call__(self, outputs: Any, captures: Dict[str, Tensor], batch: int,
                 classes: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        raise NotImplementedError

    def classes_for(self, outputs: Any, batch: int) -> Optional[Tensor]:
        """The classes this target stands for on ``outputs`` (None: a score function, applied as it is)."""
        return None

    def for_copies(self, outputs: Any, batch: int) -> Tuple[Optional[Tensor], Callable[[Tensor], "Score"]]:
        """This target resolved once, on ``outputs`` (the clean input's), for copies of its samples (SmoothGrad's
        noisy copies, ``aug_smooth``'s flips and scales): the classes (None for a score function) and
        ``rows -> Score``, the score of a batch of copies of the samples ``rows``. A score function is applied to
        each copy as it is."""
        return None, lambda rows: self

    def bound(self, output: OutputKey) -> "Score":
        """This score for an explainer whose explained output is ``output`` (a score that reads logits takes it
        when it names none itself)."""
        return self

    def traceable(self, device: torch.device, batch: int) -> "Score":
        """This score with its values as tensors on ``device``, checked on the host without a device
        synchronisation (a compiled pass then never recompiles for new values; :meth:`check_after` checks
        what needs the pass's shapes)."""
        return self

    def check_after(self, outputs: Any, captures: Dict[str, Tensor]) -> None:
        """Range checks a :meth:`traceable` score left for after the pass."""


@dataclass(frozen=True)
class ClassScore(Score):
    """The logit of a class per sample: ``target`` None (argmax), an int, or one class per sample."""

    target: Any
    output: OutputKey = None
    #: "checked": validated on the host; "clamped" (a traceable copy): a device tensor kept in range in the pass
    #: and range-checked after it; "given": a tensor gathered as it is (an exported program's input)
    mode: str = "checked"

    @property
    def kind(self) -> str:
        return "argmax" if self.target is None else "classes"

    def logits(self, outputs: Any) -> Tensor:
        if default_output(outputs, self.output) is None and not isinstance(outputs, Tensor):
            raise TargetError(f"this model returns a {type(outputs).__name__}, not logits: explain a detection with "
                              "target=guided_swap.Box(i), or pass a callable outputs -> (B,) score (or convert with "
                              "output=KEY for a model that returns logits among other outputs; an entry named "
                              "'logits', or the only entry, is read without it)")
        return select_output(outputs, self.output)

    def __call__(self, outputs, captures, batch, classes=None):
        logits = self.logits(outputs)
        if classes is None and self.mode != "checked" and self.target is not None:
            classes = self.target.clamp(0, logits.shape[1] - 1) if self.mode == "clamped" else self.target.view(-1)
        if classes is not None:
            return logits.gather(1, classes.unsqueeze(1)).squeeze(1), classes
        return class_score(logits, self.target)

    def classes_for(self, outputs, batch):
        return class_indices(self.logits(outputs), self.target)

    def for_copies(self, outputs, batch):
        classes = self.classes_for(outputs, batch)
        return classes, lambda rows: ClassScore(classes[rows], self.output)

    def traceable(self, device, batch):
        if self.target is None:
            return self
        classes = _class_tensor(self.target, batch)
        return ClassScore(_to_device(classes, device), self.output, mode="clamped")

    def check_after(self, outputs, captures):
        if self.mode != "clamped" or self.target is None:
            return
        count = self.logits(outputs).shape[1]
        bad = (self.target < 0) | (self.target >= count)
        if bool(bad.any()):  # one synchronisation for classes that live on a device
            raise TargetError(f"target class {int(self.target[bad][0])} is out of range: the model has {count} "
                              f"classes (0..{count - 1})")


@dataclass(frozen=True)
class ChannelScore(Score):
    """A :class:`Channel` target: the channel's sum over space, or one unit of it."""

    channel: Channel
    values: Optional[Tuple[Tensor, Optional[Tensor]]] = None  # a traceable copy: channel and unit as tensors
    kind = "channel"

    def __call__(self, outputs, captures, batch, classes=None):
        if self.values is None:
            return channel_score(self.channel, captures), None
        return _channel_score_of_tensors(captures[self.channel.layer], *self.values), None

    def traceable(self, device, batch):
        unit = None if self.channel.unit is None else _to_device(torch.tensor(self.channel.unit), device)
        return ChannelScore(self.channel, (_to_device(torch.tensor([self.channel.channel]), device), unit))

    def check_after(self, outputs, captures):
        target, activation = self.channel, captures[self.channel.layer]
        if not 0 <= target.channel < activation.shape[1]:
            raise TargetError(f"channel {target.channel} is out of range: {target.layer!r} has "
                              f"{activation.shape[1]} channels")
        spatial = tuple(activation.shape[2:])
        if target.unit is not None and (len(target.unit) != len(spatial) or
                                        any(not 0 <= u < s for u, s in zip(target.unit, spatial))):
            raise TargetError(f"unit {target.unit} does not fit the channel map of shape {spatial}")


@dataclass(frozen=True)
class FunctionScore(Score):
    """A user's callable ``outputs -> (B,) score``."""

    fn: Callable
    kind = "callable"

    def __call__(self, outputs, captures, batch, classes=None):
        return callable_score(self.fn, outputs, batch), None


@dataclass(frozen=True)
class BoxMatchScore(Score):
    """A :class:`BoxMatch` target: each image's matched detections' IoU + score, 0 without a match."""

    match: BoxMatch
    kind = "box"

    def __call__(self, outputs, captures, batch, classes=None):
        scores = self.match.scores(outputs)
        if scores.shape[0] != batch:
            raise TargetError(f"the detector returned {scores.shape[0]} dicts for a batch of {batch} images")
        return scores, None


@dataclass(frozen=True)
class BoxScore(Score):
    """A :class:`Box` target: each image's chosen detection score."""

    box: Box
    kind = "box"

    def __call__(self, outputs, captures, batch, classes=None):
        return box_score(self.box, outputs, batch), None


def as_score(target: Any, output: OutputKey = None, layers: Sequence[str] = ()) -> Score:
    """The :class:`Score` of ``target`` for an explainer whose explained output is ``output`` and whose captured
    layers are ``layers``; a target of a type no path understands fails here, before any pass.

    >>> score = as_score([1, 0])
    >>> score(torch.tensor([[1.0, 5.0], [7.0, 2.0]]), {}, 2)
    (tensor([5., 7.]), tensor([1, 0]))
    """
    if isinstance(target, Score):
        return target.bound(output)
    if isinstance(target, Box):
        return BoxScore(target)
    if isinstance(target, BoxMatch):
        return BoxMatchScore(target)
    if isinstance(target, Channel):
        if target.layer not in layers:
            raise TargetError(f"Channel target layer {target.layer!r} is not captured by this explainer "
                              f"(captured: {list(layers)}); convert with layer=[..., {target.layer!r}]")
        return ChannelScore(target)
    if callable(target) and not isinstance(target, Tensor):
        return FunctionScore(target)
    if _is_bool(target):
        raise TypeError("target must be an int, a sequence of ints, a LongTensor, None, a callable, a Channel or a "
                        "Box; got a bool")
    if _is_int(target):
        target = int(target)  # a numpy integer is one class, as an int
    elif isinstance(target, np.ndarray):
        target = _as_long_tensor(target)
    elif target is not None:
        _as_long_tensor(target)  # refuses what is not one class per sample
    return ClassScore(target, output)


def _channel_score_of_tensors(activation: Tensor, channel: Tensor, unit: Optional[Tensor]) -> Tensor:
    """A channel score with the channel and unit as tensors (new values do not recompile a compiled pass)."""
    channel_map = activation.index_select(1, channel.clamp(0, activation.shape[1] - 1)).squeeze(1)
    flat = channel_map.reshape(channel_map.shape[0], -1)
    if unit is None:
        return flat.sum(dim=1)
    sizes = channel_map.shape[1:]
    if unit.numel() != len(sizes):  # a unit that does not fit raises after the pass; the score stays differentiable
        return flat[:, 0] * 0
    offset, stride = unit.new_zeros(()), 1
    for axis in reversed(range(len(sizes))):  # the row-major offset of the unit, computed on the device
        offset, stride = offset + unit[axis].clamp(0, sizes[axis] - 1) * stride, stride * sizes[axis]
    return flat.index_select(1, offset.view(1)).squeeze(1)


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    # From pageable host memory a non-blocking copy is staged at once: no wait on the device.
    return tensor if tensor.device == device else tensor.to(device, non_blocking=True)
