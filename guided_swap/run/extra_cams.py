"""``explain(x, target, cams=NAMES)``: the CAMs that need passes of their own, computed in the same call.

Score-CAM (``"scorecam"``), Ablation-CAM (``"ablationcam"``) and FullGrad (``"fullgrad"``) cannot be made from
the activation and gradient of one pass: they need more passes through the model
(:mod:`guided_swap.run.perturbation_cams`, :mod:`guided_swap.run.fullgrad`). Named in ``cams=``, they are made
once ``explain``'s own pass is done and are then read like every other CAM: ``e.cams["scorecam"]``,
``e.layers[L].cams_raw["ablationcam"]``, ``e.to_dict(["cams.fullgrad"])``. Score-CAM and Ablation-CAM are made
at every captured layer; FullGrad has no layer (it reads every layer that adds a bias) and is the same map, at
the input's resolution, in every layer's ``cams`` and ``cams_raw``. ``cams=`` may also name the CAMs made from
``A`` and ``G`` (``gs.cam_methods()``, EigenCAM among them); those are made on first access as always.

>>> import torch, guided_swap as gs
>>> from torch import nn
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
...                       nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
>>> ex = gs.convert(model, layer="4")
>>> e = ex.explain(torch.randn(2, 3, 16, 16), [3, 5], cams=("scorecam", "ablationcam", "fullgrad"))
>>> tuple(e.cams["scorecam"].shape), tuple(e.cams_raw["ablationcam"].shape), tuple(e.cams_raw["fullgrad"].shape)
((2, 16, 16), (2, 6, 6), (2, 16, 16))
>>> requested("gradcam++", None, None)   # made from A and G: nothing to run
()
"""
from typing import Any, Optional, Sequence, Tuple, Union

from torch import Tensor

from ..capture.base import Capture
from ..core import cam as cam_maths
from ..core.errors import LayerError
from ..core.inputs import first_tensor
from ..core.maps import Explanation
from ..core import pass_cams as pass_maths
from ..core.pass_cams import PASS_CAMS
from ..core.targets import ChannelScore, Score
from .fullgrad import fullgrad_map
from .perturbation_cams import ablationcam, scorecam

#: Rows (perturbed copies) per forward when ``chunk`` is not given.
DEFAULT_CHUNK = 64
#: Score-CAM's copies run the whole model: on a CPU, per image, a forward of 64 large images is up to 1.5x slower
#: than one of 16 (resnet50 at 224 px: 110-120 against 76 ms an image on 2 cores), the caches no longer hold it.
CPU_WHOLE_MODEL_CHUNK = 16
_MAKERS = {"scorecam": scorecam, "ablationcam": ablationcam}


def requested(cams: Union[str, Sequence[str], None], smooth: Optional[int], chunk: Any) -> Tuple[str, ...]:
    """The names in ``cams`` that need passes of their own, after refusing unknown names and settings that do
    not go with them."""
    names = (cams,) if isinstance(cams, str) else tuple(cams or ())
    known = PASS_CAMS + cam_maths.cam_methods()
    unknown = [name for name in names if not isinstance(name, str) or name not in known]
    if unknown:
        raise cam_maths.CamError(f"cams= names {unknown} are not CAMs; the CAMs are {known}")
    passes = tuple(name for name in PASS_CAMS if name in names)
    if passes and smooth is not None:
        raise ValueError(f"cams={passes} are not smoothed: their passes run on the clean input only. Explain "
                         "without smooth= for them (and with it, separately, for the smoothed gradient CAMs)")
    if passes and chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk= is how many perturbed copies go through one forward, an int >= 1; got {chunk!r}")
    return passes


def default_chunk(name: str, x: Any) -> int:
    """Copies per forward when ``chunk`` is not given: 16 for Score-CAM on a CPU (whole-model forwards), else 64."""
    tensor = first_tensor(x)
    on_cpu = not isinstance(tensor, Tensor) or tensor.device.type == "cpu"
    return CPU_WHOLE_MODEL_CHUNK if name == "scorecam" and on_cpu else DEFAULT_CHUNK


def add_pass_cams(capture: Capture, x: Any, score: Score, explanation: Explanation, names: Sequence[str],
                  chunk: Optional[int], interpolate: str) -> None:
    """Make the CAMs ``names`` (of :data:`PASS_CAMS`) for ``explanation``, the pass over ``x``, and put them in
    every layer's maps."""
    if isinstance(score, ChannelScore):
        raise cam_maths.CamError(f"cams={tuple(names)} weigh channels by the model's output score; a Channel target "
                                 "explains a layer's channel instead. Use the gradient CAMs for it")
    if not explanation.layers:
        raise LayerError(f"cams={tuple(names)} are read as e.cams[name], which needs a captured layer: convert with "
                         "layer=NAME or 'auto' (FullGrad itself reads every layer with a bias, whichever is captured)")
    classes: Optional[Tensor] = explanation.target
    for name in (n for n in names if n in _MAKERS):
        for maps in explanation.layers.values():
            weights = _MAKERS[name](capture, x, score, classes, maps, chunk or default_chunk(name, x))
            maps.pass_weights[name] = weights
            maps.pass_cams[name] = pass_maths.weighted_cam(maps.feature_map.detach(), weights)
    if "fullgrad" in names:
        made = fullgrad_map(capture, x, score, classes, interpolate)
        for maps in explanation.layers.values():
            maps.pass_cams["fullgrad"] = made
