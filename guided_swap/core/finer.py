"""FinerCAM's target: a class's evidence against the classes it is most easily confused with.

FinerCAM (Zhang et al. 2025, pytorch-grad-cam's ``FinerCAM``) is a CAM of another score: per sample, the main
class ``c`` (the target, default the argmax) and the classes ``j`` ranked ``compare`` (default 1, 2, 3) when all
classes are sorted by how close their logit is to ``y_c`` (rank 0 is ``c`` itself) give

    ``s = sum_j p_j (y_c - alpha y_j) / (sum_j p_j + 1e-9)``,   ``p = softmax(y)``

(the softmax weights are part of the score and are differentiated too, as in pytorch-grad-cam). Explain it like
any target: every CAM of that pass (``e.cams[name]``) is FinerCAM with that CAM as its base, and ``e.target`` holds
the main classes.

>>> import torch
>>> logits = torch.tensor([[4.0, 3.5, 0.0, 3.9]])
>>> score, main = Finer(compare=(1,))(logits, {}, 1)
>>> main, score                      # class 0 against class 3, the nearest: 4.0 - 3.9
(tensor([0]), tensor([0.1000]))
"""
import math
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from .errors import TargetError
from .targets import OutputKey, Score, class_indices, default_output, select_output

#: pytorch-grad-cam's default ranks of the compared classes (clamped to the number of other classes).
DEFAULT_COMPARE = (1, 2, 3)
DENOMINATOR_EPS = 1e-9


@dataclass(frozen=True)
class Finer(Score):
    """FinerCAM's score (see the module docstring): ``ex.explain(x, gs.Finer())`` then ``e.cams["gradcam"]``.

    ``target``: the main class, as a class target is given (None: each sample's argmax, an int, one per sample);
    ``alpha``: the weight of the compared classes' logits; ``compare``: their ranks by closeness to the main
    class's logit (default ``(1, 2, 3)``, fewer when the model has fewer other classes); ``output``: the explained
    output entry (default: the explainer's).
    """

    target: Any = None
    alpha: float = 1.0
    compare: Optional[Tuple[int, ...]] = None
    output: OutputKey = None
    fixed: Optional[Tuple[Tensor, Tensor]] = field(default=None, repr=False, compare=False)
    kind = "finer"

    def __post_init__(self):
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise TypeError(f"Finer alpha= is a finite number (pytorch-grad-cam's default is 1), got {self.alpha!r}")
        if self.compare is not None:
            ranks = tuple(self.compare) if isinstance(self.compare, (list, tuple)) else None
            if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in ranks):
                raise TypeError(f"Finer compare= is a non-empty sequence of ranks >= 0 (1 is the class whose logit "
                                f"is nearest the main class's), got {self.compare!r}")
            object.__setattr__(self, "compare", ranks)

    def bound(self, output: OutputKey) -> "Finer":
        return self if self.output is not None or output is None else replace(self, output=output)

    def logits(self, outputs: Any) -> Tensor:
        if default_output(outputs, self.output) is None and not isinstance(outputs, Tensor):
            raise TargetError(f"FinerCAM compares a model's class scores, (B, K) logits, but this model returns a "
                              f"{type(outputs).__name__} (a detector's detections have none to compare): explain a "
                              "detection with target=guided_swap.Box(i) (or convert with output=KEY for a model that "
                              "returns its logits among other outputs)")
        logits = select_output(outputs, self.output)
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[1] < 2:
            raise TargetError("Finer compares classes: it needs (B, K) logits with K >= 2, got "
                              f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
        return logits

    def chosen(self, logits: Tensor, main: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """The main class (B,) and the compared classes (B, m) of each sample, read from ``logits``."""
        main = class_indices(logits, self.target) if main is None else main
        count = logits.shape[1]
        ranks = self.compare or DEFAULT_COMPARE[:count - 1]
        if max(ranks) >= count:
            raise TargetError(f"Finer compare={ranks} asks for rank {max(ranks)}, but the model has {count} classes "
                              f"(ranks 0..{count - 1})")
        values = logits.detach()
        distance = (values - values.gather(1, main.unsqueeze(1))).abs()
        order = distance.argsort(dim=1, stable=True)
        return main, order[:, list(ranks)]

    def __call__(self, outputs, captures, batch, classes=None):
        logits = self.logits(outputs)
        main, others = self.fixed if self.fixed is not None else self.chosen(logits, classes)
        weights = logits.softmax(dim=1).gather(1, others)
        contrast = logits.gather(1, main.unsqueeze(1)) - self.alpha * logits.gather(1, others)
        return (weights * contrast).sum(dim=1) / (weights.sum(dim=1) + DENOMINATOR_EPS), main

    def classes_for(self, outputs, batch):
        return self.chosen(self.logits(outputs))[0]

    def for_copies(self, outputs, batch):
        main, others = self.chosen(self.logits(outputs))
        return main, lambda rows: replace(self, fixed=(main[rows], others[rows]))
