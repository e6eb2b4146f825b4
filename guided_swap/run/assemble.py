"""One pass's maps, assembled the one way every caller does it (eager, compiled, smoothed, exported).

>>> import torch, torchvision, guided_swap as gs
>>> ex = gs.convert(torchvision.models.resnet18().eval(), layer="layer4")
>>> x = torch.randn(1, 3, 64, 64)
>>> result = ex.capture.run(x, gs.core.targets.as_score(None))
>>> explanation_of(ex.capture, result, (64, 64)).cam.shape
torch.Size([1, 64, 64])
"""
from typing import Optional, Sequence, Tuple

from ..capture.base import Capture
from ..core.maps import Explanation, PassResult, explanation_from_pass
from ..core.targets import explained_logits


def explanation_of(capture: Capture, result: PassResult, input_size: Sequence[int],
                   interpolate: str = "bilinear", sizes: Optional[Sequence[Tuple[int, ...]]] = None) -> Explanation:
    """The :class:`Explanation` of ``result``, one pass of ``capture`` over an input of spatial size
    ``input_size`` (``sizes``: each input's, for several): its layers, explained output, rule, swapped count and
    layouts are the capture's."""
    logits = explained_logits(result.outputs, capture.output, result.score.shape[0])
    return explanation_from_pass(result, layers=capture.layers, logits=logits, input_size=tuple(input_size),
                                 interpolate=interpolate, rule=capture.rule.name, swapped=len(capture.swapped),
                                 layouts=capture.layouts, input_sizes=sizes or None,
                                 layer_inputs=capture.layer_inputs if sizes else None)
