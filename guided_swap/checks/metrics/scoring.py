"""What a metric measures on each perturbed copy: the target, resolved once on the clean input, as a score.

A metric takes any target ``explain`` takes and scores the copies through the explainer's forward (the
capture's ``forward``: the model's own output), under ``torch.no_grad``:

- a class target (None for each sample's top class, an int, one class per sample): with ``score="auto"`` or
  ``"softmax"`` the softmax probability of that class (pytorch-grad-cam's ``ClassifierOutputSoftmaxTarget``,
  what its examples and RISE use); ``score="logit"``: the logit. None is resolved on the clean input, so every
  copy of a sample is scored for the same class;
- ``gs.Box(i)`` (a detector): the detection explained on the clean image becomes a ``gs.BoxMatch`` of its box
  and label, so each copy scores IoU + score of its best match with that detection (0 when it is gone), as
  pytorch-grad-cam's ``FasterRCNNBoxScoreTarget``; a ``gs.BoxMatch`` is used as it is;
- a callable ``outputs -> (rows,) score`` is applied to the outputs of each chunk of copies.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
>>> x = torch.ones(2, 1, 2, 2)
>>> scorer, clean = score_for(model, x, x, target=None)
>>> scorer.kind, tuple(clean.shape), bool(torch.allclose(clean, model(x).softmax(1).amax(1)))
('softmax', (2,), True)
"""
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from ...core.errors import TargetError
from ...core.targets import (BoxMatch, BoxMatchScore, BoxScore, ChannelScore, ClassScore, FunctionScore, as_score,
                             select_output)
from ...run.explainer import Explainer

SCORES = ("auto", "softmax", "logit")


@dataclass(frozen=True)
class Scorer:
    """The score of a metric's copies. ``kind``: "softmax", "logit", "function" or "box"; ``classes``: the class
    of each sample (class targets); ``references``: each sample's (boxes, labels) to match (box targets)."""

    kind: str
    output: Any = None
    classes: Optional[Tensor] = None
    fn: Optional[Callable] = None
    references: Optional[List[Tuple[Tensor, Tensor]]] = None
    iou_threshold: float = 0.5

    def __call__(self, outputs: Any, owners: Tensor) -> Tensor:
        """The (rows,) float32 scores of a chunk's ``outputs``; ``owners[r]``: the sample row ``r`` copies."""
        if self.kind in ("softmax", "logit"):
            logits = select_output(outputs, self.output)
            values = logits.float().softmax(dim=-1) if self.kind == "softmax" else logits.float()
            return values.gather(1, self.classes.to(values.device)[owners.to(values.device)].unsqueeze(1)).squeeze(1)
        if self.kind == "box":
            chosen = [self.references[int(o)] for o in owners]
            match = BoxMatch([b for b, _ in chosen], [l for _, l in chosen], self.iou_threshold)
            return match.scores(outputs).float()
        try:
            return FunctionScore(self.fn)(outputs, {}, len(owners))[0].float()
        except TargetError as error:
            raise TargetError(f"{error}. A metric calls a callable target on the outputs of each chunk of perturbed "
                              f"copies ({len(owners)} rows here, not the batch of samples): score every row of the "
                              "outputs it is given") from None


def forward(ex: Any, x: Tensor, like: Any) -> Any:
    """The model's output for the (rows, C, ...) tensor ``x`` given in the form of ``like`` (a detector's list of
    images), without autograd."""
    with torch.no_grad():
        if isinstance(ex, Explainer):
            return ex(ex.capture.unstack(x, like))
        return ex(x if isinstance(like, Tensor) else list(x))


def score_for(ex: Any, x: Tensor, like: Any, target: Any = None, score: str = "auto") -> Tuple[Scorer, Tensor]:
    """The :class:`Scorer` of ``target`` and the clean input's (B,) scores (one forward of ``x``)."""
    if score not in SCORES:
        raise ValueError(f"score={score!r} is not one of {SCORES}")
    output = ex.output if isinstance(ex, Explainer) else None
    layers = ex.layers if isinstance(ex, Explainer) else ()
    wanted = as_score(target, output, layers)
    outputs = forward(ex, x, like)
    batch = x.shape[0]
    scorer = _scorer(wanted, outputs, batch, output, score)
    return scorer, scorer(outputs, torch.arange(batch))


def _scorer(wanted, outputs: Any, batch: int, output: Any, score: str) -> Scorer:
    if not isinstance(wanted, ClassScore) and score != "auto":
        raise ValueError(f"score={score!r} applies to class targets; this target is scored by its own function "
                         "(leave score='auto')")
    if isinstance(wanted, ClassScore):
        classes = wanted.classes_for(outputs, batch).cpu()
        return Scorer("logit" if score == "logit" else "softmax", output, classes=classes)
    if isinstance(wanted, BoxScore):
        picked = wanted.box.indices(outputs)
        references = [(d["boxes"][i:i + 1].detach(), d["labels"][i:i + 1].detach())
                      for d, i in zip(outputs, picked)]
        return Scorer("box", output, references=references)
    if isinstance(wanted, BoxMatchScore):
        return Scorer("box", output, references=wanted.match._references(batch),
                      iou_threshold=wanted.match.iou_threshold)
    if isinstance(wanted, ChannelScore):
        raise TargetError("a metric scores the model's output, and a Channel target is a captured layer's: pass a "
                          "class, a Box, or a callable outputs -> (B,) score")
    if isinstance(wanted, FunctionScore):
        return Scorer("function", output, fn=wanted.fn)
    raise TargetError(f"a metric cannot score a {type(wanted).__name__} target: pass a class, a Box or a callable")


def scores(ex: Any, scorer: Scorer, like: Any, chunks: Iterable[Tuple[Tensor, Tensor]]) -> Tensor:
    """The scores of every row of ``chunks`` (each ``(copies, owners)``), in order, as one float32 CPU tensor."""
    out = [scorer(forward(ex, copies, like), owners).detach().cpu() for copies, owners in chunks]
    return torch.cat(out) if out else torch.empty(0)
